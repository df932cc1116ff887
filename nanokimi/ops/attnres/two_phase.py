"""Block Attention Residuals, two-phase (arXiv 2603.15031 §4): the form the model runs; naive.py is the reference.

Within a block, every sublayer attends over the same completed sources (embedding + finished block sums) plus
its own block's partial sum, which grows sublayer by sublayer. So:
  phase 1 (`depth_attention`, once per block): all S queries of the block against the N completed sources at
          once; returns each query's normalised mixture and its log-sum-exp over those sources.
  phase 2 (`merge_partial`, once per sublayer): one more logit, for the partial sum, merged into the phase-1
          result by online softmax: h = w * mixture + (1 - w) * partial, w = sigmoid(lse - partial_logit).

What makes it cheap (the work is memory-bound: a few flops per element of each [B, T, D] source):
  - Keys are never materialised: query . (RMSNorm(v) * key_weight) = rstd(v) * (v . (query * key_weight)).
  - rstd(v) = 1 / RMS(v), [B, T], is computed once per source (`source_rstd`, when the source is finished) and
    passed to every later read, so no source is re-normalised per query. The rstds are constants to autograd:
    phase 1's backward adds their gradient into its source's gradient itself (d rstd / d v = -rstd^3 v / D), so
    no rstd backward runs per source and no [B, T] rstd gradients are accumulated across blocks.
  - Phase 1 is one autograd Function that saves only the sources (references, no copies) and the [.., S, N]
    logits; backward recomputes the softmax weights from the logits. No [S, N, B, T, D] intermediate is kept.
  - A source read by several blocks (`share_source`: the embedding, every finished block sum) gets one gradient
    sum per backward pass: each reading block's phase-1 backward adds its share into it (in place, inside the
    Triton kernel), and a link node hands the total to the source after the last reader. Without it, each
    reader returned a fresh [B, T, D] gradient and autograd added them: two more passes over [B, T, D] each.
  - Per sublayer the module makes one call (`accumulate_merge`): the block's partial sum plus the sublayer's
    output, and the next sublayer's merged input from it; one compiled graph (or Triton kernel) per sublayer.
    `accumulate_merge_norm` also applies the next sublayer's pre-norm (RMSNorm), so the merged input h itself
    (and, in backward, its gradient) never goes through memory: the module calls it when given that norm.
  - The first sublayer of a block has no partial sum: its input is phase 1's first mixture, h = mixture0 cast to
    the stream's dtype. `phase1_norm_forward` (given that sublayer's RMSNorm, `depth_attention_qe(first_norm=)`)
    returns its normed input x0 = rms_norm(h) in mixture 0's place, and `phase1_norm_backward` takes grad x0,
    recomputes h from the sources and logits, and returns the norm weight's gradient too: neither mixture 0, h
    nor their gradients go through memory in the compiled and Triton forms (2 passes fewer in forward, 3 or more
    in backward per block).
  - Two implementations of phase 1's forward and backward with the same maths: "stacked" (eager: stack the N
    sources once, then batched matmuls: a few large kernels) and "fused" (for torch.compile: per-source
    reductions and one sum over sources, no stacked copy, so the compiler emits a few kernels that read each
    source once and keep the fp32 upcast in registers). `compiled_kernels()` returns the fused ones compiled.
All softmax maths runs in fp32 (float64 for float64 sources) with autocast off.
"""
import functools
from typing import NamedTuple

import torch

from nanokimi.ops.norm import rms_norm


def _wide(x):
    """fp32 for half/bfloat16/fp32 inputs; float64 stays float64."""
    return x.to(wide_dtype(x.dtype))


def wide_dtype(dtype):
    """The dtype sums are accumulated in: fp32 for half/bfloat16/fp32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def source_rstd(source, eps=1e-6):
    """1 / RMS of each token's source vector: source [..., D] -> [...] in fp32 (float64 for float64)."""
    return torch.rsqrt(_wide(source).square().mean(-1) + eps)


def _phase1_forward_stacked(qe, rstds, values, dtype=None):
    """qe [S, D]; rstds: N tensors [...]; values: N tensors [..., D]; dtype: the mixtures' (None: fp32, float64
    for float64 values; they are computed in that wide dtype and rounded to dtype once).
    Returns S mixtures [..., D], logits [..., S, N], lse [..., S]."""
    stacked = torch.stack([_wide(v) for v in values], dim=-2)  # [..., N, D]
    logits = (stacked @ qe.T).transpose(-1, -2) * torch.stack(rstds, dim=-1).unsqueeze(-2)  # [..., S, N]
    lse = logits.logsumexp(-1)
    alpha = torch.exp(logits - lse.unsqueeze(-1))
    mixtures = (alpha @ stacked).unbind(-2)
    return (mixtures if dtype is None else [m.to(dtype) for m in mixtures]), logits, lse


def _phase1_backward_stacked(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums=None, grad_dtypes=None):
    """Gradients of phase 1 from its saved logits: (grad qe [S, D], N grads of values). Each value's gradient
    includes the path through its own rstd (rstd_n = source_rstd(v_n), so d rstd_n / d v_n = -rstd_n^3 v_n / D).
    grad_dtypes: None or N dtypes, each value's gradient's (None: the value's own; a bf16 source read by several
    blocks has its gradient summed in fp32). sums: None or N entries, None or a gradient sum [..., D] in that
    dtype; where given, the value's returned gradient is that sum plus its own (a new tensor here; the Triton
    kernel adds in place)."""
    grad_mixture = torch.stack([_wide(g) for g in grad_mixtures], dim=-2)  # [..., S, D]
    stacked = torch.stack([_wide(v) for v in values], dim=-2)  # [..., N, D]
    rstd = torch.stack(rstds, dim=-1).unsqueeze(-2)  # [..., 1, N]
    alpha = torch.exp(logits - lse.unsqueeze(-1))  # [..., S, N]
    grad_alpha = grad_mixture @ stacked.transpose(-1, -2)  # [..., S, N]
    grad_logits = alpha * (grad_alpha - (alpha * grad_alpha).sum(-1, keepdim=True) + grad_lse.unsqueeze(-1))
    grad_dots = grad_logits * rstd  # logits = rstd * dots, dots = values . qe
    S, D = qe.shape
    # grad rstd = sum_s grad_logits * dots = sum_s grad_logits * logits / rstd; times d rstd / d v = -rstd^3 v / D
    rstd_scale = (grad_logits * logits).sum(-2) * rstd.squeeze(-2).square() * (-1 / D)  # [..., N]
    grad_stacked = (alpha.transpose(-1, -2) @ grad_mixture + grad_dots.transpose(-1, -2) @ qe
                    + rstd_scale.unsqueeze(-1) * stacked)  # [..., N, D]
    grad_qe = grad_dots.reshape(-1, S, len(values)).transpose(0, 1).reshape(S, -1) @ stacked.reshape(-1, D)
    sums = [None] * len(values) if sums is None else sums
    grad_dtypes = [v.dtype for v in values] if grad_dtypes is None else grad_dtypes
    return grad_qe, [(g if s is None else g + s).to(dtype)
                     for g, s, dtype in zip(grad_stacked.unbind(-2), sums, grad_dtypes)]


def _phase1_forward_fused(qe, rstds, values, dtype=None):
    """Same as _phase1_forward_stacked, written as per-source reductions and one elementwise sum over sources
    so a compiler fuses it without a stacked copy of the sources."""
    logits = torch.stack([r.unsqueeze(-1) * (_wide(v).unsqueeze(-2) * qe).sum(-1) for r, v in zip(rstds, values)],
                         dim=-1)  # [..., S, N]
    lse = logits.logsumexp(-1)
    alpha = torch.exp(logits - lse.unsqueeze(-1))
    mixtures = [sum(alpha[..., s, n, None] * _wide(v) for n, v in enumerate(values)) for s in range(len(qe))]
    return (mixtures if dtype is None else [m.to(dtype) for m in mixtures]), logits, lse


def _phase1_backward_fused(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums=None, grad_dtypes=None):
    grad_mixture = torch.stack([_wide(g) for g in grad_mixtures], dim=-2)  # [..., S, D]: fused into its readers
    alpha = torch.exp(logits - lse.unsqueeze(-1))  # [..., S, N]
    grad_alpha = torch.stack([(grad_mixture * _wide(v).unsqueeze(-2)).sum(-1) for v in values], dim=-1)
    grad_logits = alpha * (grad_alpha - (alpha * grad_alpha).sum(-1, keepdim=True) + grad_lse.unsqueeze(-1))
    grad_values, grad_qe = [], 0
    D = qe.shape[-1]
    sums = [None] * len(values) if sums is None else sums
    grad_dtypes = [v.dtype for v in values] if grad_dtypes is None else grad_dtypes
    for n, (r, v, s, dtype) in enumerate(zip(rstds, values, sums, grad_dtypes)):
        grad_dots = grad_logits[..., n] * r.unsqueeze(-1)  # [..., S]
        rstd_scale = (grad_logits[..., n] * logits[..., n]).sum(-1) * r.square() * (-1 / D)  # [...]: via rstd
        grad = ((alpha[..., n, None] * grad_mixture + grad_dots.unsqueeze(-1) * qe).sum(-2)
                + rstd_scale.unsqueeze(-1) * _wide(v))
        grad_values.append((grad if s is None else grad + s).to(dtype))
        grad_qe = grad_qe + (grad_dots.unsqueeze(-1) * _wide(v).unsqueeze(-2)).flatten(0, -3).sum(0)  # [S, D]
    return grad_qe, grad_values


def _phase1_norm_forward_stacked(qe, rstds, values, dtype, norm_weight, norm_eps, input_dtype):
    """Phase 1 with the first query's sublayer pre-norm: `_phase1_forward_stacked` (mixtures in dtype), then mixture
    0 becomes that sublayer's normed input x0 = rms_norm(mixture0.to(input_dtype), norm_weight, norm_eps) [..., D]
    (input_dtype: the stream's, which the module casts the mixture to; x0 in the wider of it and norm_weight's
    dtype): what the module computes unfused as norm(h). Returns (x0, then the other S - 1 mixtures), logits
    [..., S, N], lse [..., S]. The compiled and Triton forms never write mixture 0."""
    mixtures, logits, lse = _phase1_forward_stacked(qe, rstds, values, dtype)
    x0 = rms_norm(mixtures[0].to(input_dtype), norm_weight, norm_eps)
    return (x0, *mixtures[1:]), logits, lse


def _phase1_norm_backward_stacked(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, dtype,
                                  norm_weight, norm_eps, input_dtype):
    """Gradients of `_phase1_norm_forward_stacked`: grad_mixtures[0] is the gradient of x0, the rest as for
    `_phase1_backward_stacked`. Recomputes mixture 0 (the forward again: the same ops, so the same h), takes the
    norm's backward by autograd (the unfused path's ops and roundings) for the gradient of mixture 0, then runs
    `_phase1_backward_stacked`. Returns (grad qe [S, D], N grads of values, grad norm_weight [D] in its dtype)."""
    mixture0 = _phase1_forward_stacked(qe, rstds, values, dtype)[0][0]
    with torch.enable_grad():
        h = mixture0.to(input_dtype).detach().requires_grad_()
        weight = norm_weight.detach().requires_grad_()
        grad_h, grad_norm_weight = torch.autograd.grad(rms_norm(h, weight, norm_eps), (h, weight), grad_mixtures[0])
    grad_mixture0 = grad_h.to(mixture0.dtype)  # the cast's backward, as autograd rounds it unfused
    grad_qe, grad_values = _phase1_backward_stacked(qe, rstds, values, logits, lse, (grad_mixture0, *grad_mixtures[1:]),
                                                    grad_lse, sums, grad_dtypes)
    return grad_qe, grad_values, grad_norm_weight


def _phase1_norm_forward_fused(qe, rstds, values, dtype, norm_weight, norm_eps, input_dtype):
    """`_phase1_norm_forward_stacked` written as `_phase1_forward_fused`, so a compiler keeps mixture 0 in registers
    and writes only x0."""
    mixtures, logits, lse = _phase1_forward_fused(qe, rstds, values, dtype)
    x0 = rms_norm(mixtures[0].to(input_dtype), norm_weight, norm_eps)
    return (x0, *mixtures[1:]), logits, lse


def _phase1_norm_backward_fused(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, dtype,
                                norm_weight, norm_eps, input_dtype):
    """`_phase1_norm_backward_stacked` with the norm's backward written out (no autograd inside, so it compiles):
    h = mixture 0 recomputed from the logits and rounded as in forward, rstd_h = 1 / RMS(h), from the gradient
    g_x of x0: g_n = norm_weight g_x rounded to h's dtype (the gradient of the normalised h), grad h = rstd_h g_n
    - rstd_h^3 h (g_n . h) / D, grad norm_weight = sum over tokens of g_x * (h rstd_h rounded to h's dtype)."""
    alpha0 = torch.exp(logits[..., 0, :] - lse[..., :1])  # [..., N]
    mixture0 = sum(alpha0[..., n, None] * _wide(v) for n, v in enumerate(values))  # [..., D] fp32
    mixture_dtype = mixture0.dtype if dtype is None else dtype
    h = mixture0.to(mixture_dtype).to(input_dtype)  # as forward rounds it
    h_wide = h.float()
    rstd_h = torch.rsqrt(h_wide.square().mean(-1, keepdim=True) + norm_eps)  # [..., 1]
    normed = (h_wide * rstd_h).to(h.dtype)
    grad_x = grad_mixtures[0]
    grad_norm_weight = (grad_x * normed).flatten(0, -2).sum(0).to(norm_weight.dtype)
    grad_normed = (grad_x * norm_weight).to(h.dtype).float()
    D = h.shape[-1]
    grad_h = rstd_h * grad_normed - rstd_h ** 3 * h_wide * (grad_normed * h_wide).sum(-1, keepdim=True) / D
    grad_mixture0 = grad_h.to(h.dtype).to(mixture_dtype)
    grad_qe, grad_values = _phase1_backward_fused(qe, rstds, values, logits, lse, (grad_mixture0, *grad_mixtures[1:]),
                                                  grad_lse, sums, grad_dtypes)
    return grad_qe, grad_values, grad_norm_weight


def _merge(mixture, lse, partial, qe, eps):
    """Phase 2 maths: mixture [..., D] (any float dtype) and lse [...] of one query, partial [..., D], qe [D].
    Returns h [..., D] in partial's dtype."""
    partial_wide = _wide(partial)
    partial_logit = (partial_wide * qe).sum(-1) * source_rstd(partial, eps)  # [...]
    weight = torch.sigmoid(lse - partial_logit).unsqueeze(-1)  # share of the phase-1 sources
    return (partial_wide + weight * (mixture - partial_wide)).to(partial.dtype)


def _accumulate(partial, out, dtype):
    """The block's running sum after one more sublayer output (out may be bf16 under autocast)."""
    return out.to(dtype) if partial is None else partial + out.to(dtype)


def _accumulate_merge(partial, out, mixture, lse, qe, dtype, eps):
    """One sublayer's residual work in one call: the block's partial sum after its output out, and the next
    sublayer's input merged from that partial sum and the next query's phase-1 mixture [..., D] and lse [...]
    (qe [D]: its query times key weight). Returns (partial [..., D], h [..., D]), both in dtype."""
    partial = _accumulate(partial, out, dtype)
    return partial, _merge(mixture, lse, partial, qe, eps)


def _accumulate_merge_norm(partial, out, mixture, lse, qe, dtype, eps, norm_weight, norm_eps):
    """`_accumulate_merge`, then the next sublayer's pre-norm on its input: RMSNorm (nanokimi.ops.norm.rms_norm)
    with weight norm_weight [D] and eps norm_eps. Returns (partial [..., D] in dtype, x = rms_norm(h) [..., D] in
    the wider of dtype and norm_weight's dtype): what the model computes unfused as norm(h). The Triton form
    (triton_phase2.py) never writes h or its gradient."""
    partial, h = _accumulate_merge(partial, out, mixture, lse, qe, dtype, eps)
    return partial, rms_norm(h, norm_weight, norm_eps)


def _finish_source(partial, out, dtype, eps):
    """A finished source (the block's sum, accumulated in partial's dtype, then stored in dtype: rounded once)
    and its rstd (of the stored source; no gradient: phase 1's backward accounts for it)."""
    source = (out if partial is None else partial + out.to(partial.dtype)).to(dtype)
    return source, source_rstd(source.detach(), eps)


class Kernels(NamedTuple):
    """The functions the residual stream calls; eager or compiled (see `compiled_kernels`). phase1_backward takes
    the gradient sums of shared sources and their dtypes as its last arguments (see `_phase1_backward_stacked`);
    phase1_norm_forward / phase1_norm_backward are phase 1 with the first query's pre-norm applied (see
    `_phase1_norm_forward_stacked`)."""
    phase1_forward: object
    phase1_backward: object
    phase1_norm_forward: object
    phase1_norm_backward: object
    merge: object
    accumulate_merge: object
    accumulate_merge_norm: object
    finish_source: object
    source_rstd: object


EAGER = Kernels(_phase1_forward_stacked, _phase1_backward_stacked, _phase1_norm_forward_stacked,
                _phase1_norm_backward_stacked, _merge, _accumulate_merge, _accumulate_merge_norm, _finish_source,
                source_rstd)


@functools.cache
def compiled_kernels(mode: str | None = None) -> Kernels:
    """The fused kernels under torch.compile (fullgraph, static shapes: one graph per source count N, which
    is fixed per call site). Built once per process and shared by every module."""
    from nanokimi.runtime import compile_fn  # raises the recompile limit: one graph per source count N

    def compiled(fn):
        return compile_fn(fn, fullgraph=True, dynamic=False, mode=mode)
    return Kernels(compiled(_phase1_forward_fused), compiled(_phase1_backward_fused),
                   compiled(_phase1_norm_forward_fused), compiled(_phase1_norm_backward_fused), compiled(_merge),
                   compiled(_accumulate_merge), compiled(_accumulate_merge_norm), compiled(_finish_source),
                   compiled(source_rstd))


def _backward_pass_id():
    """An id of the backward pass running now (autograd's graph task; torch.utils.checkpoint uses the same)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else 0


class GradientSum:
    """One source's gradient summed over the phase-1 calls that read it, within one backward pass. Holds only
    the sum (no graph references, so no reference cycles keep tensors alive); a sum left from an earlier
    backward pass of the same graph (retain_graph) is never added to."""
    __slots__ = ("tensor", "pass_id")

    def __init__(self):
        self.tensor, self.pass_id = None, None

    def current(self):
        """The sum so far in this backward pass, or None before its first reader's backward."""
        if self.pass_id != _backward_pass_id():
            self.tensor, self.pass_id = None, _backward_pass_id()
        return self.tensor

    def take(self):
        """The finished sum (None if no reader contributed in this pass), released from this object."""
        tensor, self.tensor = self.tensor, None
        return tensor if self.pass_id == _backward_pass_id() else None


class _Link(torch.autograd.Function):
    """source [..., D] -> an empty tensor that every phase-1 call reading the source takes as an input, so
    autograd runs this node's backward only after all of theirs. They add the source's gradient into
    `gradient` (a GradientSum) instead of returning it; this hands the sum to the source."""

    @staticmethod
    def forward(ctx, gradient, source):
        ctx.gradient = gradient
        ctx.set_materialize_grads(False)
        return source.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return None, ctx.gradient.take()


class _FinishSource(torch.autograd.Function):
    """A block's partial sum [..., D] (or None) and its last output out [..., D] -> the stored block sum (in the
    storage dtype, no gradient of its own), its rstd [...] and a link as `_Link`'s: the readers' gradient sum
    (fp32) goes straight to partial and out, never through a tensor of the storage dtype."""

    @staticmethod
    def forward(ctx, finish_source, gradient, dtype, eps, partial, out):
        source, rstd = finish_source(partial, out, dtype, eps)
        source = source.detach()  # may be out itself (out already in dtype, no partial): returned as a new tensor
        ctx.gradient, ctx.out_dtype, ctx.has_partial = gradient, out.dtype, partial is not None
        ctx.mark_non_differentiable(source, rstd)
        ctx.set_materialize_grads(False)
        return source, rstd, out.new_empty(0)

    @staticmethod
    def backward(ctx, _source, _rstd, _link):
        total = ctx.gradient.take()
        if total is None:
            return None, None, None, None, None, None
        return None, None, None, None, total if ctx.has_partial else None, total.to(ctx.out_dtype)


class SharedSource(NamedTuple):
    """A source that several phase-1 calls of one forward read (`share_source`): value [..., D] is the source as
    stored, detached (what the kernels read; possibly in a narrower dtype than the source); link carries its
    summed gradient back (None when the source needs none)."""
    value: torch.Tensor
    link: torch.Tensor | None
    gradient: GradientSum


def share_source(source, dtype=None):
    """source [..., D] wrapped for `depth_attention_qe` calls that read it: their backward passes sum its gradient
    in one tensor (fp32, or float64 for float64 sources), handed to source once (autograd would add one fresh
    gradient per reader). dtype: store the value in this dtype (a copy, e.g. bf16 of an fp32 embedding; None:
    the source's own); the gradient goes to the source unrounded, as if the copy were the identity."""
    gradient = GradientSum()
    needs_grad = torch.is_grad_enabled() and source.requires_grad
    value = source.detach() if dtype is None else source.detach().to(dtype)
    return SharedSource(value, _Link.apply(gradient, source) if needs_grad else None, gradient)


def finish_shared_source(kernels, partial, out, dtype, eps=1e-6):
    """A finished block: (its sum partial + out [..., D] stored in dtype as a SharedSource, its rstd [...]).
    The sum is accumulated in partial's dtype (out's when partial is None) and rounded to dtype once; the
    gradient its readers sum (fp32) reaches partial and out unrounded by the storage dtype."""
    gradient = GradientSum()
    needs_grad = torch.is_grad_enabled() and (out.requires_grad or (partial is not None and partial.requires_grad))
    if not needs_grad:
        source, rstd = kernels.finish_source(partial, out, dtype, eps)
        return SharedSource(source.detach(), None, gradient), rstd
    source, rstd, link = _FinishSource.apply(kernels.finish_source, gradient, dtype, eps, partial, out)
    return SharedSource(source, link, gradient), rstd


class _DepthAttention(torch.autograd.Function):
    """Phase 1 with a hand-written backward: saves the sources (references) and logits, not the softmax.
    Returns the S mixtures and S lse [...] as separate tensors so each gets its own gradient (no select-backward
    of a stacked [..., S, D] output, which would write S zero-filled copies). The rstds get no gradient: the
    sources' gradients include the path through them. Inputs after qe: the first query's norm weight [D] (None:
    no norm), N rstds, N values, then one link per entry of `gradients` (N entries, a GradientSum for a shared
    source, else None): a shared source's gradient goes into its sum, and its link gets an empty one. With a norm
    weight, the first output is x0 = rms_norm(mixture0.to(input_dtype), norm_weight, norm_eps) instead of mixture
    0 (`_phase1_norm_forward_stacked`), and the weight gets its gradient."""

    @staticmethod
    def forward(ctx, kernels, gradients, dtype, norm_eps, input_dtype, qe, norm_weight, *tensors):
        n = len(gradients)
        rstds, values = tensors[:n], tensors[n:2 * n]
        with torch.autocast(qe.device.type, enabled=False):
            if norm_weight is None:
                mixtures, logits, lse = kernels.phase1_forward(qe, rstds, values, dtype)
            else:
                mixtures, logits, lse = kernels.phase1_norm_forward(qe, rstds, values, dtype, norm_weight, norm_eps,
                                                                    input_dtype)
        ctx.kernels, ctx.gradients = kernels, gradients
        ctx.dtype, ctx.norm_eps, ctx.input_dtype, ctx.has_norm = dtype, norm_eps, input_dtype, norm_weight is not None
        ctx.save_for_backward(qe, logits, lse, norm_weight, *rstds, *values)
        return *mixtures, *lse.movedim(-1, 0).contiguous().unbind(0)  # S contiguous lse [...]

    @staticmethod
    def backward(ctx, *grads):
        qe, logits, lse, norm_weight, *rstds_and_values = ctx.saved_tensors
        n = len(ctx.gradients)
        rstds, values = rstds_and_values[:n], rstds_and_values[n:]
        S = len(qe)
        grad_mixtures, grad_lse = grads[:S], torch.stack(grads[S:], dim=-1)  # S x [..., D], [..., S]
        sums = [None if sum_ is None else sum_.current() for sum_ in ctx.gradients]
        # a shared source's gradient is summed in fp32 (float64) whatever the dtype it is stored in
        grad_dtypes = [v.dtype if sum_ is None else wide_dtype(v.dtype) for sum_, v in zip(ctx.gradients, values)]
        grad_norm_weight = None
        with torch.autocast(qe.device.type, enabled=False):
            if not ctx.has_norm:
                grad_qe, grad_values = ctx.kernels.phase1_backward(qe, rstds, values, logits, lse, grad_mixtures,
                                                                   grad_lse, sums, grad_dtypes)
            else:
                grad_qe, grad_values, grad_norm_weight = ctx.kernels.phase1_norm_backward(
                    qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, ctx.dtype,
                    norm_weight, ctx.norm_eps, ctx.input_dtype)
        link_grads = []
        for sum_, grad in zip(ctx.gradients, grad_values):
            if sum_ is not None:
                sum_.tensor = grad
                link_grads.append(grad.new_empty(0))
        return (None, None, None, None, None, grad_qe, grad_norm_weight, *([None] * n),
                *(None if sum_ is not None else grad for sum_, grad in zip(ctx.gradients, grad_values)), *link_grads)


class FirstNorm(NamedTuple):
    """The pre-norm of the sublayer that reads phase 1's first query (an RMSNorm: weight [D], eps), and input_dtype,
    the dtype its input h is in: the residual stream's, h = mixture0.to(input_dtype)."""
    weight: torch.Tensor
    eps: float
    input_dtype: torch.dtype


def _check_queries(queries, key_weights, D):
    if queries.dim() != 2 or queries.shape != key_weights.shape or queries.shape[-1] != D:
        raise ValueError(f"queries {tuple(queries.shape)} and key_weights {tuple(key_weights.shape)} must both be "
                         f"[S, D] with D = {D}, the sources' last dimension.")


def depth_attention(sources, queries, key_weights, eps=1e-6, rstds=None, kernels=EAGER, dtype=None, first_norm=None):
    """Phase 1: S pseudo-queries against N sources at once.

    sources: sequence of N tensors [B, T, D]; queries, key_weights: [S, D]; rstds: optional N tensors [B, T],
    each source's `source_rstd(source, eps)` (computed here when not given; pass them to reuse them across
    calls). They are treated as functions of their sources: gradients reach the sources through them, not the
    rstd tensors themselves.
    Returns (mixtures, lse [S, B, T]) in fp32 (float64 for float64 sources): mixtures is a tuple of S tensors
    [B, T, D], mixtures[s] = sum_n softmax_n(logit[s, n]) v_n, in dtype when given (computed in fp32, rounded once).
    first_norm: see `depth_attention_qe` (mixtures[0] is then the first sublayer's normed input).
    """
    if len(sources) == 0:
        raise ValueError("depth_attention needs at least one source (the token embedding).")
    _check_queries(queries, key_weights, sources[0].shape[-1])
    compute_dtype = torch.promote_types(sources[0].dtype, torch.float32)
    with torch.autocast(sources[0].device.type, enabled=False):
        qe = queries.to(compute_dtype) * key_weights.to(compute_dtype)  # [S, D]
    mixtures, lse = depth_attention_qe(sources, qe, eps, rstds, kernels, dtype, first_norm)
    return mixtures, torch.stack(lse)


def depth_attention_qe(sources, qe, eps=1e-6, rstds=None, kernels=EAGER, dtype=None, first_norm=None):
    """depth_attention with the queries already multiplied by their key weights: qe [S, D] in fp32 (float64
    for float64 sources); each source a tensor [B, T, D] or a SharedSource (`share_source`). Returns
    (S mixtures [B, T, D] in dtype (None: fp32), S lse [B, T]): what the module calls once per block.
    first_norm: None, or a FirstNorm: the first of the S outputs is then the first sublayer's normed input
    x0 = rms_norm(mixtures[0].to(first_norm.input_dtype), first_norm.weight, first_norm.eps) instead of mixture 0
    (which is never written), and the norm weight gets its gradient through it."""
    values = [s.value if isinstance(s, SharedSource) else s for s in sources]
    if rstds is None:
        rstds = [kernels.source_rstd(v.detach(), eps) for v in values]
    if len(rstds) != len(sources):
        raise ValueError(f"got {len(rstds)} rstds for {len(sources)} sources; pass one per source (or none).")
    linked = [isinstance(s, SharedSource) and s.link is not None for s in sources]
    gradients = tuple(s.gradient if link else None for s, link in zip(sources, linked))
    links = [s.link for s, link in zip(sources, linked) if link]
    norm_weight, norm_eps, input_dtype = (None, None, None) if first_norm is None else first_norm
    outputs = _DepthAttention.apply(kernels, gradients, dtype, norm_eps, input_dtype, qe, norm_weight, *rstds, *values,
                                    *links)  # S x [B, T, D], S x [B, T]
    return outputs[:len(qe)], outputs[len(qe):]


def merge_partial(mixture, lse, partial, query, key_weight, eps=1e-6, kernels=EAGER):
    """Phase 2: fold the block's partial sum into a phase-1 result by online softmax.

    mixture: [B, T, D] and lse: [B, T] (one query's phase-1 outputs); partial: [B, T, D]; query, key_weight: [D].
    Returns h [B, T, D] in partial's dtype: softmax over (phase-1 sources + partial) applied to their values.
    """
    compute_dtype = torch.promote_types(partial.dtype, torch.float32)
    with torch.autocast(partial.device.type, enabled=False):
        qe = query.to(compute_dtype) * key_weight.to(compute_dtype)  # [D]
        return kernels.merge(mixture, lse, partial, qe, eps)
