"""Attention Residuals on the residual stream (DESIGN.md §2.5, arXiv 2603.15031).

Instead of h_l = h_{l-1} + f_{l-1}(...), sublayer l reads a learned softmax over depth of earlier sources:
    h_l = sum_i alpha_{i->l} v_i,   alpha_{i->l} = softmax_i(w_l . RMSNorm(v_i)),   v_0 = token embedding
with one pseudo-query w_l per sublayer (zero-init: a uniform average at the start) and one more for the final
hidden state that goes to the final norm and LM head. mode="full": the sources are every earlier sublayer's
output. mode="block": consecutive sublayers form blocks; the sources are the embedding, the sum of each finished
block, and the current block's partial sum (computed two-phase, see nanokimi.ops.attnres).

The mixing is across depth at the same token only: no token reads another token's sources, so the module is
the same for any T and a decode step (T = 1) needs nothing cached from earlier tokens.

Driven by the transformer one call per sublayer:
    state = residual.start(embedding, norm_0)
    for l in range(num_sublayers):
        x = residual.normed_input(state, l, norm_l)        # norm_l(input of sublayer l)
        state = residual.add(state, l, f_l(x), norm_{l+1})  # norm_{l+1}: None after the last sublayer
    h_final = residual.finish(state)
Given the next sublayer's pre-norm (an RMSNorm), `add` (and `start`, given sublayer 0's) returns that sublayer's
input already normed, from the same kernel that computes it (`fuse_norm`, on by default): the merge's for a
sublayer inside a block, phase 1's for the first sublayer of a block (whose input is phase 1's first mixture).
The un-normed input h is then never written, and `normed_input` returns the normed one. Without the norms
(`sublayer_input` + the caller's norm) the same numbers come out.
"""
import math
from typing import NamedTuple

import torch
from torch import nn

from nanokimi.model.norm import RMSNorm
from nanokimi.ops.attnres import EAGER, attnres_kernels, depth_attention_qe, share_source
from nanokimi.ops.attnres.two_phase import FirstNorm, finish_shared_source, wide_dtype
from nanokimi.runtime.attnres import AttnResKernels

MODES = ("full", "block")


class AttnResState(NamedTuple):
    """The residual stream between sublayers, all [B, T, D].

    dtype: the stream's (the embedding's): the sublayer inputs h and the running partial sum are in it.
    sources: embedding, then each finished block's sum, as SharedSources (`share_source`: the blocks reading
    one sum its gradient into one tensor), stored in the storage dtype (`AttentionResiduals.storage_dtype`);
    rstds: each stored source's 1 / RMS [B, T] (fp32, no gradient), computed once when the source is finished;
    partial: sum of the current block's outputs so far (None at a block's start); mixture (S tensors [B, T, D],
    fp32, or the storage dtype with storage="auto-all"; mixture[0] None where phase 1 returned the block's first
    input normed instead) and lse (S tensors [B, T], fp32): phase 1 of the current block; qe [L + 1, D]: every
    query times its key weight, built once per forward; position: the next sublayer; h: its input, computed by
    the call that produced this state (None after the last sublayer, or when it was computed normed); normed,
    norm: the next sublayer's input already normed by its pre-norm `norm` (the fused merge + norm, or phase 1 +
    norm for a block's first sublayer), else None.
    """
    sources: tuple
    rstds: tuple
    partial: torch.Tensor | None
    mixture: tuple | None
    lse: tuple | None
    qe: torch.Tensor
    position: int
    h: torch.Tensor | None
    dtype: torch.dtype
    normed: torch.Tensor | None = None
    norm: nn.Module | None = None


class AttentionResiduals(nn.Module):
    def __init__(self, hidden_size: int, num_sublayers: int, mode: str = "full", num_blocks: int = 8,
                 eps: float = 1e-6, storage: str = "auto", fuse_norm: bool = True):
        """storage, fuse_norm: the kernel settings of nanokimi.runtime.attnres.AttnResKernels (not architecture: a
        model gets them from outside, `set_attnres_kernels`). storage: the dtype the stored sources are kept in
        (see `storage_dtype`; fp32 means float64 for a float64 stream). fuse_norm: when `add` (or `start`) is given
        the next sublayer's RMSNorm, compute that sublayer's normed input in the kernel that computes its input
        (`accumulate_merge_norm` inside a block, `phase1_norm_forward` for a block's first sublayer) instead of
        the input h and then norm(h). The results are the same either way (same maths, same roundings; sums may
        run in another order)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode='{mode}' must be one of {MODES} (use the plain PreNorm residual for 'none').")
        AttnResKernels(storage=storage, fuse_norm=fuse_norm)  # checks them
        if num_sublayers < 1 or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size} and num_sublayers={num_sublayers} must be >= 1.")
        if mode == "block" and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.hidden_size = hidden_size
        self.num_sublayers = num_sublayers
        self.mode = mode
        self.storage = storage
        self.fuse_norm = fuse_norm
        self.eps = eps
        self.kernels = EAGER
        # sublayers per block; the last block is shorter when num_blocks does not divide num_sublayers
        self.block_size = 1 if mode == "full" else math.ceil(num_sublayers / min(num_blocks, num_sublayers))
        self.num_blocks = math.ceil(num_sublayers / self.block_size)
        # one pseudo-query and one key-RMSNorm weight per sublayer, then the final read's; kept as vectors
        # (not one [L + 1, D] matrix) so optimizers that treat matrices specially (Muon) leave them to AdamW
        self.queries = nn.ParameterList(nn.Parameter(torch.zeros(hidden_size)) for _ in range(num_sublayers + 1))
        self.key_weights = nn.ParameterList(nn.Parameter(torch.ones(hidden_size)) for _ in range(num_sublayers + 1))

    def reset_parameters(self) -> None:
        """Zero queries (uniform average over depth) and unit key weights: the paper's initialisation."""
        with torch.no_grad():
            for q, w in zip(self.queries, self.key_weights):
                q.zero_()
                w.fill_(1.0)

    def compile_kernels(self, mode: str | None = None, triton: bool | None = None) -> "AttentionResiduals":
        """Run the residual stream's ops through torch.compile (fused kernels, fullgraph); returns self.
        triton=True: phase 1 and the per-sublayer accumulate + merge (forward and backward) run as the Triton
        kernels of nanokimi.ops.attnres.triton_phase1 / triton_phase2 instead (block sums and rstds stay
        compiled); None (default): as `attnres(impl="auto")` picks on the module's device. False: torch.compile
        only. nanokimi.train.fast.compile_model calls this (after the model is on its device). The maths,
        parameters and state_dict do not change."""
        impl = "auto" if triton is None else "triton" if triton else "torch"
        self.kernels = attnres_kernels(impl, self.queries[0].device, mode)
        return self

    def use_settings(self, settings: AttnResKernels) -> "AttentionResiduals":
        """Apply kernel settings (storage dtype, fused pre-norm); returns self. The parameters do not change."""
        self.storage, self.fuse_norm = settings.storage, settings.fuse_norm
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_sublayers={self.num_sublayers}, mode={self.mode}, "
                f"block_size={self.block_size}, num_blocks={self.num_blocks}, storage={self.storage}, "
                f"fuse_norm={self.fuse_norm}")

    def storage_dtype(self, embedding: torch.Tensor) -> torch.dtype:
        """The dtype the sources and mixtures are stored in for a stream starting at embedding. "auto": under
        autocast of the embedding's device an fp32 stream's sublayers end in autocast's dtype (their last linear),
        so the sources take it; otherwise the embedding's dtype. "fp32": fp32 (float64 stays float64)."""
        if self.storage == "fp32":
            return wide_dtype(embedding.dtype)
        device = embedding.device.type
        if embedding.dtype == torch.float32 and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return embedding.dtype

    def _block_range(self, l: int) -> tuple[int, int]:
        start = (l // self.block_size) * self.block_size
        return start, min(start + self.block_size, self.num_sublayers)

    def _phase1(self, sources: tuple, rstds: tuple, qe: torch.Tensor, first: int, stop: int,
                first_norm: FirstNorm | None = None):
        """S mixtures (fp32; in the sources' storage dtype with storage="auto-all") and S lse (fp32) of queries
        first..stop - 1; with first_norm, the first of them is sublayer `first`'s normed input instead."""
        dtype = sources[0].value.dtype
        return depth_attention_qe(sources, qe[first:stop], self.eps, rstds, self.kernels,
                                  dtype if self.storage == "auto-all" else wide_dtype(dtype), first_norm)

    def _block_start(self, sources: tuple, rstds: tuple, qe: torch.Tensor, l: int, dtype: torch.dtype,
                     norm: nn.Module | None) -> AttnResState:
        """The state before sublayer l, the first of its block: phase 1 of the block, and l's input from its first
        mixture, normed by norm in phase 1's kernel where `fuses(norm)`."""
        if not self.fuses(norm):
            mixture, lse = self._phase1(sources, rstds, qe, *self._block_range(l))
            return AttnResState(sources, rstds, None, mixture, lse, qe, l, mixture[0].to(dtype), dtype)
        outputs, lse = self._phase1(sources, rstds, qe, *self._block_range(l), FirstNorm(norm.weight, norm.eps, dtype))
        return AttnResState(sources, rstds, None, (None, *outputs[1:]), lse, qe, l, None, dtype, outputs[0], norm)

    def start(self, embedding: torch.Tensor, first_norm: nn.Module | None = None) -> AttnResState:
        """embedding: [B, T, D] token embeddings (v_0). first_norm: the pre-norm of sublayer 0 (None: unknown);
        where `fuses(first_norm)`, the state holds sublayer 0's input normed (see `normed_input`)."""
        if embedding.dim() != 3 or embedding.shape[-1] != self.hidden_size:
            raise ValueError(f"embedding must be [B, T, {self.hidden_size}], got {tuple(embedding.shape)}.")
        compute_dtype = torch.promote_types(embedding.dtype, torch.float32)
        with torch.autocast(embedding.device.type, enabled=False):  # one product for the whole forward
            qe = (torch.stack(list(self.queries)).to(compute_dtype)
                  * torch.stack(list(self.key_weights)).to(compute_dtype))  # [L + 1, D]
        storage = self.storage_dtype(embedding)
        source = share_source(embedding, None if storage == embedding.dtype else storage)
        sources, rstds = (source,), (self.kernels.source_rstd(source.value, self.eps),)
        return self._block_start(sources, rstds, qe, 0, embedding.dtype, first_norm)

    def sublayer_input(self, state: AttnResState, l: int) -> torch.Tensor:
        """The [B, T, D] input of sublayer l (before its pre-norm)."""
        self._check_order(state, l)
        if state.h is None:
            raise ValueError(f"sublayer {l}'s input was computed normed (add() or start() was given its norm, and "
                             "fuse_norm is on), so only normed_input() has it; pass no norm to add() or start() to "
                             "get the input itself.")
        return state.h

    def normed_input(self, state: AttnResState, l: int, norm: nn.Module) -> torch.Tensor:
        """norm(input of sublayer l), [B, T, D]: the fused output (merge + norm, or phase 1 + norm) when add() or
        start() was given this norm for sublayer l, else norm(h)."""
        self._check_order(state, l)
        if state.norm is None:
            return norm(state.h)
        if state.norm is not norm:
            raise ValueError(f"sublayer {l}'s input was normed by the norm passed to add() or start() for it, not "
                             "the one given here; pass add() / start() the norm that sublayer applies.")
        return state.normed

    def fuses(self, norm: nn.Module | None) -> bool:
        """Whether add() and start() compute the next input normed by norm (an RMSNorm, with fuse_norm on)."""
        return self.fuse_norm and isinstance(norm, RMSNorm)

    def add(self, state: AttnResState, l: int, out: torch.Tensor,
            next_norm: nn.Module | None = None) -> AttnResState:
        """Record sublayer l's output out [B, T, D]; returns the next state (with the next sublayer's input).
        next_norm: the pre-norm of sublayer l + 1 (None: unknown, or l is the last); where `fuses(next_norm)`, the
        state holds that sublayer's input normed (see `normed_input`) instead of the input itself: from the merge's
        kernel inside a block, from the next block's phase 1 at a block boundary."""
        self._check_order(state, l)
        dtype = state.dtype
        first, stop = self._block_range(l)
        if l + 1 < stop:  # the block goes on: its partial sum grows, and the next input merges it in
            i = l + 1 - first
            args = (state.partial, out, state.mixture[i], state.lse[i], state.qe[l + 1], dtype, self.eps)
            if self.fuses(next_norm):
                partial, normed = self.kernels.accumulate_merge_norm(*args, next_norm.weight, next_norm.eps)
                return state._replace(partial=partial, position=l + 1, h=None, normed=normed, norm=next_norm)
            partial, h = self.kernels.accumulate_merge(*args)
            return state._replace(partial=partial, position=l + 1, h=h, normed=None, norm=None)
        block_sum, rstd = finish_shared_source(self.kernels, state.partial, out, state.sources[0].value.dtype,
                                               self.eps)
        sources, rstds = state.sources + (block_sum,), state.rstds + (rstd,)
        if stop == self.num_sublayers:
            return AttnResState(sources, rstds, None, None, None, state.qe, l + 1, None, dtype)
        return self._block_start(sources, rstds, state.qe, stop, dtype, next_norm)

    def finish(self, state: AttnResState) -> torch.Tensor:
        """The final hidden state [B, T, D]: the last query's mixture of all sources (then final norm, LM head)."""
        if state.position != self.num_sublayers:
            raise ValueError(f"finish() called after {state.position} of {self.num_sublayers} sublayers; "
                             "call add() for every sublayer first.")
        L = self.num_sublayers
        mixture, _ = self._phase1(state.sources, state.rstds, state.qe, L, L + 1)
        return mixture[0].to(state.dtype)

    def _check_order(self, state: AttnResState, l: int) -> None:
        if l != state.position:
            raise ValueError(f"sublayer {l} called but the residual stream expects sublayer {state.position}; "
                             "call sublayer_input (or normed_input) and add in order 0, 1, ..., num_sublayers - 1.")


def set_attnres_kernels(model: nn.Module, settings: AttnResKernels) -> nn.Module:
    """Apply AttnRes kernel settings to every AttentionResiduals module of model (a no-op for PreNorm models);
    returns model. Runtime settings, kept out of ModelConfig: what the trainer and the benchmarks call."""
    for module in model.modules():
        if isinstance(module, AttentionResiduals):
            module.use_settings(settings)
    return model
