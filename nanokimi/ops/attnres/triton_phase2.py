"""Phase 2 of block Attention Residuals fused with the block's running sum, as Triton kernels: the maths of
two_phase.py's `_accumulate_merge` (and `_accumulate_merge_norm`, the same with the next sublayer's pre-norm
applied), one sublayer's residual work in one launch each way.

forward, one program per tile of BLOCK_T tokens (all of D in registers):
    p = partial + out (in the stream's dtype, as torch rounds it), written once: the block's new partial sum
    pw = p in fp32; logit = rstd(pw) * (pw . qe); w = sigmoid(lse - logit)
    h = pw + w (mixture - pw): the next sublayer's input (mixture read in its stored dtype, fp32 or bf16, and
    upcast in registers). `accumulate_merge` writes h in the stream's dtype; `accumulate_merge_norm` writes only
    x = norm_weight * (h / RMS(h)), the next sublayer's normed input (RMSNorm, rounded as nanokimi.model.norm
    rounds it), so h never goes through memory.
backward, programs loop over token tiles (grid-stride), recomputing logit and w from p (nothing else saved):
    [norm: h recomputed from pw, w and the mixture; rstd_h = 1 / RMS(h); n = h rstd_h; from g_x:
        grad_norm_weight += sum over the tile's tokens of g_x n;  g_n = norm_weight g_x
        g_h = rstd_h g_n - rstd_h^3 h (g_n . h) / D]
    grad_mixture = w g_h (written in the mixture's dtype)
    grad_lse = w (1 - w) (g_h . (mixture - pw));  grad_logit = -grad_lse
    grad_p = (1 - w) g_h + grad_logit (rstd qe - (pw . qe) rstd^3 pw / D) + g_p      (g_p: grad of p itself)
    grad_partial = grad_p; grad_out = grad_p in out's dtype
    grad_qe += sum over the tile's tokens of grad_logit rstd pw   (registers, per program; one torch sum after)
The rstd of the partial sum is recomputed in both passes ([BLOCK_T] values, from the tile already loaded).
Tokens per tile, warps and the backward grid come from launch.py's table (`config_for`; kernels "merge_*" and
"merge_norm_*"). Inputs the kernels do not take (float64, D above MAX_D, tensors off CUDA without the
interpreter) run the `fallback` (the compiled or eager two_phase function).
"""
import os

import torch
import triton
import triton.language as tl

from nanokimi.ops.attnres.launch import LaunchConfig, check_config, config_for, grid_programs
from nanokimi.ops.attnres.triton_phase1 import SOURCE_DTYPES, _inv_rms, _tile_offsets

MAX_D = 16384


@triton.jit
def _merge_weight(pw, qe, lse_ptr, rows, row_ok, eps, D: tl.constexpr):
    """The phase-1 sources' share w of each token's merge, from the partial sum pw [BT, BD] (fp32) and qe [BD]:
    (w, rstd of pw, pw . qe), each [BT]."""
    rstd = _inv_rms(pw, eps, D)
    dot = tl.sum(pw * qe[None, :], axis=1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    return tl.sigmoid(lse - dot * rstd), rstd, dot


@triton.jit
def _accumulate_merge_tile(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, new_partial_ptr, rows, d, eps,
                           M, D: tl.constexpr, HAS_PARTIAL: tl.constexpr):
    """One tile's new partial sum p = partial + out (written) and merged input h = pw + w (mixture - pw), returned
    in fp32 [BT, BD] with the tile's offsets and mask."""
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
    weight, _, _ = _merge_weight(pw, qe, lse_ptr, rows, row_ok, eps, D)
    mixture = tl.load(mixture_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    return pw + weight[:, None] * (mixture - pw), tile, tile_ok


@triton.jit
def _accumulate_merge_forward_kernel(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, new_partial_ptr, h_ptr,
                                     M, eps, D: tl.constexpr, HAS_PARTIAL: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    h, tile, tile_ok = _accumulate_merge_tile(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, new_partial_ptr,
                                              rows, tl.arange(0, BLOCK_D), eps, M, D, HAS_PARTIAL)
    tl.store(h_ptr + tile, h.to(h_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _accumulate_merge_norm_forward_kernel(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, norm_weight_ptr,
                                          new_partial_ptr, x_ptr, M, eps, norm_eps, D: tl.constexpr,
                                          HAS_PARTIAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    d = tl.arange(0, BLOCK_D)
    h, tile, tile_ok = _accumulate_merge_tile(partial_ptr, out_ptr, mixture_ptr, lse_ptr, qe_ptr, new_partial_ptr,
                                              rows, d, eps, M, D, HAS_PARTIAL)
    dtype = new_partial_ptr.dtype.element_ty
    h = h.to(dtype).to(tl.float32)  # h as the unfused path stores it: the norm's input
    normed = (h * _inv_rms(h, norm_eps, D)[:, None]).to(dtype).to(tl.float32)  # rounded to h's dtype, as rms_norm
    norm_weight = tl.load(norm_weight_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(x_ptr + tile, (normed * norm_weight[None, :]).to(x_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _merge_backward_tile(grad_h, pw, mixture, weight, rstd, dot, qe, rows, row_ok, tile, tile_ok, grad_p_ptr,
                         grad_partial_ptr, grad_out_ptr, grad_mixture_ptr, grad_lse_ptr, D: tl.constexpr,
                         HAS_GRAD_P: tl.constexpr, SEPARATE_GRAD_OUT: tl.constexpr):
    """The merge's backward on one tile from the gradient of its output h (fp32 [BT, BD]): writes the gradients
    of the mixture, lse, partial and out; returns the tile's share of grad qe [BD]."""
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
    return tl.sum((grad_logit * rstd)[:, None] * pw, axis=0)


@triton.jit
def _merge_backward_inputs(tile_id, new_partial_ptr, mixture_ptr, lse_ptr, qe, d, d_ok, M, eps, D: tl.constexpr,
                           BLOCK_T: tl.constexpr):
    """What both merge backward kernels read of one tile: its rows, offsets and masks, the partial sum pw and the
    mixture (fp32 [BT, BD]), and the merge weight, rstd of pw and pw . qe ([BT]) recomputed from them."""
    rows = tile_id * BLOCK_T + tl.arange(0, BLOCK_T)  # the last tile may pass M: masked
    row_ok = rows < M
    tile = _tile_offsets(rows, d, D)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    pw = tl.load(new_partial_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
    weight, rstd, dot = _merge_weight(pw, qe, lse_ptr, rows, row_ok, eps, D)
    mixture = tl.load(mixture_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    return rows, row_ok, tile, tile_ok, pw, mixture, weight, rstd, dot


@triton.jit
def _accumulate_merge_backward_kernel(new_partial_ptr, mixture_ptr, lse_ptr, qe_ptr, grad_h_ptr, grad_p_ptr,
                                      grad_partial_ptr, grad_out_ptr, grad_mixture_ptr, grad_lse_ptr,
                                      grad_qe_partial_ptr, M, tiles, eps, D: tl.constexpr,
                                      HAS_GRAD_P: tl.constexpr, SEPARATE_GRAD_OUT: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qe = tl.load(qe_ptr + d, mask=d_ok, other=0.0)  # [BD]
    grad_qe = tl.zeros([BLOCK_D], tl.float32)
    tile_id = pid
    while tile_id < tiles:
        rows, row_ok, tile, tile_ok, pw, mixture, weight, rstd, dot = _merge_backward_inputs(
            tile_id, new_partial_ptr, mixture_ptr, lse_ptr, qe, d, d_ok, M, eps, D, BLOCK_T)
        grad_h = tl.load(grad_h_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        grad_qe += _merge_backward_tile(grad_h, pw, mixture, weight, rstd, dot, qe, rows, row_ok, tile, tile_ok,
                                        grad_p_ptr, grad_partial_ptr, grad_out_ptr, grad_mixture_ptr, grad_lse_ptr,
                                        D, HAS_GRAD_P, SEPARATE_GRAD_OUT)
        tile_id += tl.num_programs(0)
    tl.store(grad_qe_partial_ptr + pid * D + d, grad_qe, mask=d_ok)


@triton.jit
def _accumulate_merge_norm_backward_kernel(new_partial_ptr, mixture_ptr, lse_ptr, qe_ptr, norm_weight_ptr, grad_x_ptr,
                                           grad_p_ptr, grad_partial_ptr, grad_out_ptr, grad_mixture_ptr,
                                           grad_lse_ptr, grad_qe_partial_ptr, grad_norm_weight_partial_ptr, M, tiles,
                                           eps, norm_eps, D: tl.constexpr, HAS_GRAD_P: tl.constexpr,
                                           SEPARATE_GRAD_OUT: tl.constexpr, BLOCK_T: tl.constexpr,
                                           BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dtype = new_partial_ptr.dtype.element_ty
    qe = tl.load(qe_ptr + d, mask=d_ok, other=0.0)  # [BD]
    norm_weight = tl.load(norm_weight_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    grad_qe = tl.zeros([BLOCK_D], tl.float32)
    grad_norm_weight = tl.zeros([BLOCK_D], tl.float32)
    tile_id = pid
    while tile_id < tiles:
        rows, row_ok, tile, tile_ok, pw, mixture, weight, rstd, dot = _merge_backward_inputs(
            tile_id, new_partial_ptr, mixture_ptr, lse_ptr, qe, d, d_ok, M, eps, D, BLOCK_T)
        h = (pw + weight[:, None] * (mixture - pw)).to(dtype).to(tl.float32)  # the forward's h, as it rounded it
        rstd_h = _inv_rms(h, norm_eps, D)  # [BT]
        normed = (h * rstd_h[:, None]).to(dtype).to(tl.float32)
        grad_x = tl.load(grad_x_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        grad_norm_weight += tl.sum(grad_x * normed, axis=0)
        grad_normed = (grad_x * norm_weight[None, :]).to(dtype).to(tl.float32)  # in normed's dtype, as autograd
        grad_h = (rstd_h[:, None] * grad_normed
                  - (rstd_h * rstd_h * rstd_h * tl.sum(grad_normed * h, axis=1) / D)[:, None] * h)
        grad_h = grad_h.to(dtype).to(tl.float32)  # h's gradient in h's dtype, as the unfused merge reads it
        grad_qe += _merge_backward_tile(grad_h, pw, mixture, weight, rstd, dot, qe, rows, row_ok, tile, tile_ok,
                                        grad_p_ptr, grad_partial_ptr, grad_out_ptr, grad_mixture_ptr, grad_lse_ptr,
                                        D, HAS_GRAD_P, SEPARATE_GRAD_OUT)
        tile_id += tl.num_programs(0)
    tl.store(grad_qe_partial_ptr + pid * D + d, grad_qe, mask=d_ok)
    tl.store(grad_norm_weight_partial_ptr + pid * D + d, grad_norm_weight, mask=d_ok)


def _launch_config(kernel, D, M, dtype, config):
    """config (checked), else the table's for D and the stream dtype; its block_t capped at the token count."""
    config = check_config(config) if config is not None else config_for(kernel, D, dtype)
    return config._replace(block_t=min(config.block_t, triton.next_power_of_2(max(M, 1))))


def supports(partial, out, mixture, dtype, norm_weight=None) -> bool:
    """Whether the Triton kernels run these inputs (else the fallback does); norm_weight: the fused norm's."""
    on_device = out.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    norm_ok = norm_weight is None or (norm_weight.dtype in SOURCE_DTYPES and norm_weight.shape == out.shape[-1:]
                                      and norm_weight.device == out.device)
    return (on_device and dtype in SOURCE_DTYPES and out.dtype in SOURCE_DTYPES and mixture.dtype in SOURCE_DTYPES
            and (partial is None or (partial.dtype == dtype and partial.shape == out.shape))
            and mixture.shape == out.shape and out.shape[-1] <= MAX_D and norm_ok)


def normed_dtype(dtype, norm_weight):
    """The dtype of the normed input: the wider of the stream's and the norm weight's (as weight * normed)."""
    return torch.promote_types(dtype, norm_weight.dtype)


def accumulate_merge_forward(partial, out, mixture, lse, qe, dtype, eps, config: LaunchConfig | None = None,
                             norm_weight=None, norm_eps=None):
    """The forward kernel alone, no autograd: (new partial in dtype, h in dtype), both [..., D]; with norm_weight
    [D], (new partial, x = rms_norm(h) in `normed_dtype`) from the fused kernel. Inputs as for `accumulate_merge`,
    contiguous (partial may be None)."""
    D = out.shape[-1]
    M = out.numel() // D
    new_partial = torch.empty(out.shape, dtype=dtype, device=out.device)
    x_dtype = dtype if norm_weight is None else normed_dtype(dtype, norm_weight)
    x = torch.empty(out.shape, dtype=x_dtype, device=out.device)
    if M == 0:
        return new_partial, x
    kernel_name = "merge_forward" if norm_weight is None else "merge_norm_forward"
    config = _launch_config(kernel_name, D, M, dtype, config)
    common = dict(D=D, HAS_PARTIAL=partial is not None, BLOCK_T=config.block_t, BLOCK_D=triton.next_power_of_2(D),
                  num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (triton.cdiv(M, config.block_t),)
    partial = out if partial is None else partial
    if norm_weight is None:
        _accumulate_merge_forward_kernel[grid](partial, out, mixture, lse, qe, new_partial, x, M, eps, **common)
    else:
        _accumulate_merge_norm_forward_kernel[grid](partial, out, mixture, lse, qe, norm_weight, new_partial, x, M,
                                                    eps, norm_eps, **common)
    return new_partial, x


def accumulate_merge_backward(new_partial, mixture, lse, qe, grad_new_partial, grad_h, out_dtype, eps,
                              config: LaunchConfig | None = None, norm_weight=None, norm_eps=None):
    """The backward kernel alone, no autograd: from the forward's new partial sum [..., D], mixture, lse and qe
    and the gradients of its two outputs (grad_new_partial may be None; all contiguous), returns (grad of
    partial [..., D] in the stream's dtype, grad of out [..., D] in out_dtype (the same tensor when the dtypes
    agree), grad of mixture [..., D] in the mixture's dtype, grad of lse [...] fp32, grad of qe [D] fp32). With
    norm_weight [D] (the fused kernel), grad_h is the gradient of the normed output x instead, and the grad of
    norm_weight (in its dtype) comes last."""
    D = new_partial.shape[-1]
    M = new_partial.numel() // D
    device = new_partial.device
    grad_partial = torch.empty_like(new_partial)
    separate = out_dtype != new_partial.dtype
    grad_out = torch.empty(new_partial.shape, dtype=out_dtype, device=device) if separate else grad_partial
    grad_mixture = torch.empty_like(mixture)
    grad_lse = torch.empty_like(lse)
    grads = (grad_partial, grad_out, grad_mixture, grad_lse)
    if M == 0:
        return *grads, torch.zeros_like(qe), *(() if norm_weight is None else (torch.zeros_like(norm_weight),))
    kernel_name = "merge_backward" if norm_weight is None else "merge_norm_backward"
    config = _launch_config(kernel_name, D, M, new_partial.dtype, config)
    tiles = triton.cdiv(M, config.block_t)
    programs = grid_programs(config, tiles, device)
    grad_qe_partial = torch.empty(programs, D, dtype=torch.float32, device=device)
    grad_p = grad_h if grad_new_partial is None else grad_new_partial
    common = dict(D=D, HAS_GRAD_P=grad_new_partial is not None, SEPARATE_GRAD_OUT=separate, BLOCK_T=config.block_t,
                  BLOCK_D=triton.next_power_of_2(D), num_warps=config.num_warps, num_stages=config.num_stages)
    if norm_weight is None:
        _accumulate_merge_backward_kernel[(programs,)](
            new_partial, mixture, lse, qe, grad_h, grad_p, *grads, grad_qe_partial, M, tiles, eps, **common)
        return *grads, grad_qe_partial.sum(0)
    grad_norm_weight_partial = torch.empty(programs, D, dtype=torch.float32, device=device)
    _accumulate_merge_norm_backward_kernel[(programs,)](
        new_partial, mixture, lse, qe, norm_weight, grad_h, grad_p, *grads, grad_qe_partial, grad_norm_weight_partial,
        M, tiles, eps, norm_eps, **common)
    return *grads, grad_qe_partial.sum(0), grad_norm_weight_partial.sum(0).to(norm_weight.dtype)


class _AccumulateMerge(torch.autograd.Function):
    """(partial [..., D] or None, out [..., D], mixture [..., D] (fp32 / bf16 / fp16), lse [...] fp32, qe [D] fp32,
    norm_weight [D] or None) -> (new partial in dtype, h in dtype), both [..., D]; with norm_weight, (new partial,
    x = rms_norm(h)). Saves the new partial sum (which the stream keeps anyway), the mixture, lse (and the norm
    weight): no intermediate of its own; h is recomputed in backward where the norm needs it."""

    @staticmethod
    def forward(ctx, partial, out, mixture, lse, qe, norm_weight, dtype, eps, norm_eps, config):
        out, mixture, lse, qe = out.contiguous(), mixture.contiguous(), lse.contiguous(), qe.contiguous()
        partial = None if partial is None else partial.contiguous()
        norm_weight = None if norm_weight is None else norm_weight.contiguous()
        new_partial, x = accumulate_merge_forward(partial, out, mixture, lse, qe, dtype, eps, config, norm_weight,
                                                  norm_eps)
        ctx.save_for_backward(new_partial, mixture, lse, qe, norm_weight)
        ctx.has_partial, ctx.out_dtype, ctx.eps, ctx.norm_eps, ctx.config = (partial is not None, out.dtype, eps,
                                                                             norm_eps, config)
        ctx.set_materialize_grads(False)
        return new_partial, x

    @staticmethod
    def backward(ctx, grad_new_partial, grad_x):
        new_partial, mixture, lse, qe, norm_weight = ctx.saved_tensors
        x_dtype = new_partial.dtype if norm_weight is None else normed_dtype(new_partial.dtype, norm_weight)
        grad_x = (torch.zeros(new_partial.shape, dtype=x_dtype, device=new_partial.device) if grad_x is None
                  else grad_x.contiguous())
        grad_new_partial = None if grad_new_partial is None else grad_new_partial.contiguous()
        grads = accumulate_merge_backward(new_partial, mixture, lse, qe, grad_new_partial, grad_x, ctx.out_dtype,
                                          ctx.eps, ctx.config, norm_weight, ctx.norm_eps)
        grad_partial, grad_out, grad_mixture, grad_lse, grad_qe = grads[:5]
        grad_norm_weight = grads[5] if norm_weight is not None else None
        return (grad_partial if ctx.has_partial else None, grad_out, grad_mixture, grad_lse, grad_qe,
                grad_norm_weight, None, None, None, None)


def _unsupported(dtype, out, mixture, norm_weight=None):
    norm = "" if norm_weight is None else f", norm weight {tuple(norm_weight.shape)} {norm_weight.dtype}"
    return ValueError(
        f"the Triton accumulate+merge kernels need CUDA tensors (or TRITON_INTERPRET=1), a stream dtype among "
        f"{[str(t) for t in SOURCE_DTYPES]}, a mixture (and norm weight [D]) among them, matching shapes and "
        f"D <= {MAX_D}; got dtype {dtype}, out {tuple(out.shape)} {out.dtype} on {out.device}, mixture "
        f"{mixture.dtype}{norm}. Use triton_kernels(base), which falls back to base's function for such inputs.")


def accumulate_merge(partial, out, mixture, lse, qe, dtype, eps, fallback=None, config: LaunchConfig | None = None):
    """Triton form of two_phase's `_accumulate_merge` (same signature and results): partial [..., D] in dtype
    or None (a block's first output), out [..., D] (any float dtype), mixture [..., D] (fp32 / bf16 / fp16, as
    stored) and lse [...] (fp32; one query's phase 1), qe [D] fp32. Returns (new partial, h), both in dtype.
    config: launch both kernels with it instead of the table's (tests)."""
    if not supports(partial, out, mixture, dtype):
        if fallback is None:
            raise _unsupported(dtype, out, mixture)
        return fallback(partial, out, mixture, lse, qe, dtype, eps)
    return _AccumulateMerge.apply(partial, out, mixture, lse, qe.to(torch.float32), None, dtype, eps, None, config)


def accumulate_merge_norm(partial, out, mixture, lse, qe, dtype, eps, norm_weight, norm_eps, fallback=None,
                          config: LaunchConfig | None = None):
    """Triton form of two_phase's `_accumulate_merge_norm` (same signature and results): `accumulate_merge`'s
    inputs plus the next sublayer's RMSNorm weight [D] (fp32 / bf16 / fp16) and eps. Returns (new partial in
    dtype, x = rms_norm(h) in `normed_dtype`); h and its gradient never go through memory. Rounds as the unfused
    path does: h to dtype before the norm, the normalised h to dtype before the weight, and in backward the
    gradients of the normalised h and of h to dtype (no-ops for an fp32 stream); sums run in other orders."""
    if not supports(partial, out, mixture, dtype, norm_weight):
        if fallback is None:
            raise _unsupported(dtype, out, mixture, norm_weight)
        return fallback(partial, out, mixture, lse, qe, dtype, eps, norm_weight, norm_eps)
    return _AccumulateMerge.apply(partial, out, mixture, lse, qe.to(torch.float32), norm_weight, dtype, eps,
                                  norm_eps, config)
