"""Phase 2 of block Attention Residuals fused with the block's running sum, as two Triton kernels: the maths of
two_phase.py's `_accumulate_merge`, one sublayer's residual work in one launch each way.

forward, one program per tile of BLOCK_T tokens (all of D in registers):
    p = partial + out (in the stream's dtype, as torch rounds it), written once: the block's new partial sum
    pw = p in fp32; logit = rstd(pw) * (pw . qe); w = sigmoid(lse - logit)
    h = pw + w (mixture - pw), written in the stream's dtype: the next sublayer's input (mixture read in its
    stored dtype, fp32 or bf16, and upcast in registers)
backward, programs loop over token tiles (grid-stride), recomputing logit and w from p (nothing else saved):
    grad_mixture = w g_h (written in the mixture's dtype);  grad_lse = w (1 - w) (g_h . (mixture - pw));  grad_logit = -grad_lse
    grad_p = (1 - w) g_h + grad_logit (rstd qe - (pw . qe) rstd^3 pw / D) + g_p      (g_p: grad of p itself)
    grad_partial = grad_p; grad_out = grad_p in out's dtype
    grad_qe += sum over the tile's tokens of grad_logit rstd pw   (registers, per program; one torch sum after)
The rstd of the partial sum is recomputed in both passes ([BLOCK_T] values, from the tile already loaded).
Tokens per tile, warps and the backward grid come from launch.py's table (`config_for`). Inputs the kernels
do not take (float64, D above MAX_D, tensors off CUDA without the interpreter) run the `fallback` (the
compiled or eager `_accumulate_merge`).
"""
import os

import torch
import triton
import triton.language as tl

from nanokimi.ops.attnres.launch import LaunchConfig, check_config, config_for, grid_programs
from nanokimi.ops.attnres.triton_phase1 import SOURCE_DTYPES, _tile_offsets

MAX_D = 16384


@triton.jit
def _accumulate_merge_forward_kernel(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, new_partial_ptr, h_ptr,
                                     M, eps, D: tl.constexpr, HAS_PARTIAL: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < M, d < D
    tile = _tile_offsets(rows, d, D)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    dtype = new_partial_ptr.dtype.element_ty
    p = tl.load(out_ptr + tile, mask=tile_ok, other=0.0).to(dtype)
    if HAS_PARTIAL:
        p = (tl.load(partial_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32) + p.to(tl.float32)).to(dtype)
    tl.store(new_partial_ptr + tile, p, mask=tile_ok)
    pw = p.to(tl.float32)  # [BT, BD]
    qe = tl.load(qe_ptr + d, mask=d_ok, other=0.0)  # [BD]
    rstd = 1.0 / tl.sqrt(tl.sum(pw * pw, axis=1) / D + eps)  # [BT]
    logit = tl.sum(pw * qe[None, :], axis=1) * rstd
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    weight = tl.sigmoid(lse - logit)  # share of the phase-1 sources
    mixture = tl.load(mixture_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    h = pw + weight[:, None] * (mixture - pw)
    tl.store(h_ptr + tile, h.to(h_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _accumulate_merge_backward_kernel(new_partial_ptr, mixture_ptr, lse_ptr, qe_ptr, grad_h_ptr, grad_p_ptr,
                                      grad_partial_ptr, grad_out_ptr, grad_mixture_ptr, grad_lse_ptr,
                                      grad_qe_partial_ptr, M, tiles, eps, D: tl.constexpr,
                                      HAS_GRAD_P: tl.constexpr, SEPARATE_GRAD_OUT: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qe = tl.load(qe_ptr + d, mask=d_ok, other=0.0)  # [BD]
    grad_qe = tl.zeros([BLOCK_D], tl.float32)
    tile_id = pid
    while tile_id < tiles:
        rows = tile_id * BLOCK_T + tl.arange(0, BLOCK_T)  # the last tile may pass M: masked
        row_ok = rows < M
        tile = _tile_offsets(rows, d, D)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        pw = tl.load(new_partial_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
        rstd = 1.0 / tl.sqrt(tl.sum(pw * pw, axis=1) / D + eps)  # [BT]
        dot = tl.sum(pw * qe[None, :], axis=1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        weight = tl.sigmoid(lse - dot * rstd)
        mixture = tl.load(mixture_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        grad_h = tl.load(grad_h_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        grad_mixture = weight[:, None] * grad_h
        tl.store(grad_mixture_ptr + tile, grad_mixture.to(grad_mixture_ptr.dtype.element_ty), mask=tile_ok)
        grad_lse = weight * (1.0 - weight) * tl.sum(grad_h * (mixture - pw), axis=1)  # [BT]; 0 on masked rows
        tl.store(grad_lse_ptr + rows, grad_lse, mask=row_ok)
        grad_logit = -grad_lse
        grad_p = ((1.0 - weight[:, None]) * grad_h + (grad_logit * rstd)[:, None] * qe[None, :]
                  - (grad_logit * dot * rstd * rstd * rstd / D)[:, None] * pw)
        if HAS_GRAD_P:
            grad_p += tl.load(grad_p_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(grad_partial_ptr + tile, grad_p.to(grad_partial_ptr.dtype.element_ty), mask=tile_ok)
        if SEPARATE_GRAD_OUT:
            tl.store(grad_out_ptr + tile, grad_p.to(grad_out_ptr.dtype.element_ty), mask=tile_ok)
        grad_qe += tl.sum((grad_logit * rstd)[:, None] * pw, axis=0)
        tile_id += programs
    tl.store(grad_qe_partial_ptr + pid * D + d, grad_qe, mask=d_ok)


def _launch_config(kernel, D, M, dtype, config):
    """config (checked), else the table's for D and the stream dtype; its block_t capped at the token count."""
    config = check_config(config) if config is not None else config_for(kernel, D, dtype)
    return config._replace(block_t=min(config.block_t, triton.next_power_of_2(max(M, 1))))


def supports(partial, out, mixture, dtype) -> bool:
    """Whether the Triton kernels run these inputs (else the fallback does)."""
    on_device = out.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and dtype in SOURCE_DTYPES and out.dtype in SOURCE_DTYPES and mixture.dtype in SOURCE_DTYPES
            and (partial is None or (partial.dtype == dtype and partial.shape == out.shape))
            and mixture.shape == out.shape and out.shape[-1] <= MAX_D)


def accumulate_merge_forward(partial, out, mixture, lse, qe, dtype, eps, config: LaunchConfig | None = None):
    """The forward kernel alone, no autograd: (new partial, h), both [..., D] in dtype. Inputs as for
    `accumulate_merge`, contiguous (partial may be None)."""
    D = out.shape[-1]
    M = out.numel() // D
    new_partial = torch.empty(out.shape, dtype=dtype, device=out.device)
    h = torch.empty(out.shape, dtype=dtype, device=out.device)
    if M > 0:
        config = _launch_config("merge_forward", D, M, dtype, config)
        _accumulate_merge_forward_kernel[(triton.cdiv(M, config.block_t),)](
            out if partial is None else partial, out, mixture, lse, qe, new_partial, h, M, eps, D=D,
            HAS_PARTIAL=partial is not None, BLOCK_T=config.block_t, BLOCK_D=triton.next_power_of_2(D),
            num_warps=config.num_warps, num_stages=config.num_stages)
    return new_partial, h


def accumulate_merge_backward(new_partial, mixture, lse, qe, grad_new_partial, grad_h, out_dtype, eps,
                              config: LaunchConfig | None = None):
    """The backward kernel alone, no autograd: from the forward's new partial sum [..., D], mixture, lse and qe
    and the gradients of its two outputs (grad_new_partial may be None; all contiguous), returns (grad of
    partial [..., D] in the stream's dtype, grad of out [..., D] in out_dtype (the same tensor when the dtypes
    agree), grad of mixture [..., D] in the mixture's dtype, grad of lse [...] fp32, grad of qe [D] fp32)."""
    D = new_partial.shape[-1]
    M = new_partial.numel() // D
    device = new_partial.device
    grad_partial = torch.empty_like(new_partial)
    separate = out_dtype != new_partial.dtype
    grad_out = torch.empty(new_partial.shape, dtype=out_dtype, device=device) if separate else grad_partial
    grad_mixture = torch.empty_like(mixture)
    grad_lse = torch.empty_like(lse)
    if M == 0:
        return grad_partial, grad_out, grad_mixture, grad_lse, torch.zeros_like(qe)
    config = _launch_config("merge_backward", D, M, new_partial.dtype, config)
    tiles = triton.cdiv(M, config.block_t)
    programs = grid_programs(config, tiles, device)
    grad_qe_partial = torch.empty(programs, D, dtype=torch.float32, device=device)
    _accumulate_merge_backward_kernel[(programs,)](
        new_partial, mixture, lse, qe, grad_h, grad_h if grad_new_partial is None else grad_new_partial,
        grad_partial, grad_out, grad_mixture, grad_lse, grad_qe_partial, M, tiles, eps, D=D,
        HAS_GRAD_P=grad_new_partial is not None, SEPARATE_GRAD_OUT=separate, BLOCK_T=config.block_t,
        BLOCK_D=triton.next_power_of_2(D), num_warps=config.num_warps, num_stages=config.num_stages)
    return grad_partial, grad_out, grad_mixture, grad_lse, grad_qe_partial.sum(0)


class _AccumulateMerge(torch.autograd.Function):
    """(partial [..., D] or None, out [..., D], mixture [..., D] (fp32 / bf16 / fp16), lse [...] fp32, qe [D] fp32) ->
    (new partial, h), both [..., D] in dtype. Saves the new partial sum (which the stream keeps anyway), the
    mixture and lse: no intermediate of its own."""

    @staticmethod
    def forward(ctx, partial, out, mixture, lse, qe, dtype, eps, config):
        out, mixture, lse, qe = out.contiguous(), mixture.contiguous(), lse.contiguous(), qe.contiguous()
        partial = None if partial is None else partial.contiguous()
        new_partial, h = accumulate_merge_forward(partial, out, mixture, lse, qe, dtype, eps, config)
        ctx.save_for_backward(new_partial, mixture, lse, qe)
        ctx.has_partial, ctx.out_dtype, ctx.eps, ctx.config = partial is not None, out.dtype, eps, config
        ctx.set_materialize_grads(False)
        return new_partial, h

    @staticmethod
    def backward(ctx, grad_new_partial, grad_h):
        new_partial, mixture, lse, qe = ctx.saved_tensors
        grad_h = torch.zeros_like(new_partial) if grad_h is None else grad_h.contiguous()
        grad_new_partial = None if grad_new_partial is None else grad_new_partial.contiguous()
        grad_partial, grad_out, grad_mixture, grad_lse, grad_qe = accumulate_merge_backward(
            new_partial, mixture, lse, qe, grad_new_partial, grad_h, ctx.out_dtype, ctx.eps, ctx.config)
        return grad_partial if ctx.has_partial else None, grad_out, grad_mixture, grad_lse, grad_qe, None, None, None


def accumulate_merge(partial, out, mixture, lse, qe, dtype, eps, fallback=None, config: LaunchConfig | None = None):
    """Triton form of two_phase's `_accumulate_merge` (same signature and results): partial [..., D] in dtype
    or None (a block's first output), out [..., D] (any float dtype), mixture [..., D] (fp32 / bf16 / fp16, as
    stored) and lse [...] (fp32; one query's phase 1), qe [D] fp32. Returns (new partial, h), both in dtype.
    config: launch both kernels with it instead of the table's (tests)."""
    if not supports(partial, out, mixture, dtype):
        if fallback is None:
            raise ValueError(
                f"the Triton accumulate+merge kernels need CUDA tensors (or TRITON_INTERPRET=1), a stream dtype "
                f"among {[str(t) for t in SOURCE_DTYPES]}, a mixture among them, matching shapes and D <= {MAX_D}; got "
                f"dtype {dtype}, out {tuple(out.shape)} {out.dtype} on {out.device}, mixture {mixture.dtype}. "
                "Use triton_kernels(base), which falls back to base's function for such inputs.")
        return fallback(partial, out, mixture, lse, qe, dtype, eps)
    return _AccumulateMerge.apply(partial, out, mixture, lse, qe.to(torch.float32), dtype, eps, config)
