"""Phase 1 of block Attention Residuals (`depth_attention`) as two Triton kernels: the maths of two_phase.py's
`_phase1_forward_stacked` / `_phase1_backward_stacked`, with each source read once per pass.

forward, one program per tile of BLOCK_T tokens (all of D in registers):
    for each source n: load v_n [BLOCK_T, D] once (any float dtype, upcast to fp32 in registers),
        logit[s] = rstd_n * (v_n . qe_s) for all S queries at once,
        online softmax over n (running max m, running sum l) with acc[s] = acc[s] * exp(m_old - m) + exp(logit - m) v_n
    write the S mixtures acc / l (fp32 or rounded once to the caller's dtype), lse = m + log l, and the logits
    [.., S, N] backward reads.
backward, programs loop over token tiles (grid-stride), streaming D in chunks of CHUNK_D columns:
    pass 1 over the chunks: gv[s, n] = g_s . v_n for all S grad_mixtures and N sources (the only sums over D),
    then per token, from gv and the saved logits (alpha = exp(logit - lse)):
        dot[s] = sum_n alpha[s, n] gv[s, n]                           (= g_s . mixture_s)
        grad_logit[s, n] = alpha[s, n] (gv[s, n] - dot[s] + grad_lse[s])
    pass 2 over the chunks (the tile's g and sources again, now in L2), no sums over D:
        grad_v_n = sum_s alpha[s, n] g_s + sum_s rstd_n grad_logit[s, n] qe_s
                   - (sum_s grad_logit[s, n] logit[s, n]) rstd_n^2 / D  v_n       written in v_n's dtype
        (the last term is the path through rstd_n = source_rstd(v_n): grad rstd_n times -rstd_n^3 v_n / D);
        where the caller passes a gradient sum for v_n (`sums`), grad_v_n is added into it in place (read, add in
        fp32, write back): a source read by several blocks has its gradients summed there, not by autograd
        (the sum may be fp32 for a bf16 source: gradients are written in each buffer's own dtype)
        grad_qe[s] += sum over the tile's tokens of rstd_n grad_logit[s, n] v_n   (per chunk, added into the
    program's own row of a zeroed [programs, S, D] buffer); one torch sum over programs finishes it
    (deterministic, no atomics).
alpha = exp(logit - lse) comes from the saved logits, so nothing of size [S, N, B, T, D] is ever kept.

The N sources, N rstds, S mixtures and their gradients are separate tensors, passed to the kernels as tuples
(one pointer argument each, no device-side pointer table, so nothing is copied host to device and the calls
can be captured in a CUDA graph). N and S are compile-time constants: one kernel per source count, as with the
compiled kernels. Tokens per tile, warps and the backward grid come from launch.py's table (`config_for`).
Where the kernels do not apply (float64, mixed source dtypes, S * D too large for registers) the `fallback`
phase-1 functions run instead.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from nanokimi.ops.attnres.launch import LaunchConfig, check_config, config_for, grid_programs
from nanokimi.ops.attnres.two_phase import Kernels

# S_PAD * BLOCK_D fp32 values per token held in registers (accumulators in forward, grad_mixtures and the
# per-program grad_qe in backward); above this the kernels would spill, and the fallback runs instead
MAX_TILE_ELEMENTS = 16384
SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tile_offsets(rows, d, D: tl.constexpr):
    """[BLOCK_T, BLOCK_D] element offsets of a tile of a contiguous [M, D] tensor (int64: M * D may pass 2^31)."""
    return rows.to(tl.int64)[:, None] * D + d[None, :]


@triton.jit
def _phase1_forward_kernel(values, rstds, qe_ptr, mixtures, logits_ptr, lse_ptr, M,
                           N: tl.constexpr, S: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    s_ids = tl.arange(0, S_PAD)
    d = tl.arange(0, BLOCK_D)
    row_ok, s_ok, d_ok = rows < M, s_ids < S, d < D
    tile = _tile_offsets(rows, d, D)  # [BT, BD]
    tile_ok = row_ok[:, None] & d_ok[None, :]
    out_ok = s_ok[:, None] & row_ok[None, :]  # [S_PAD, BT]
    logit_offsets = rows.to(tl.int64)[None, :] * (S * N) + s_ids[:, None] * N  # [S_PAD, BT]
    qe = tl.load(qe_ptr + s_ids[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)

    running_max = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
    for n in tl.static_range(N):
        v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
        rstd = tl.load(rstds[n] + rows, mask=row_ok, other=0.0)  # [BT]
        logit = tl.sum(v[None, :, :] * qe[:, None, :], axis=2) * rstd[None, :]  # [S_PAD, BT]
        tl.store(logits_ptr + logit_offsets + n, logit, mask=out_ok)
        new_max = tl.maximum(running_max, logit)
        rescale = tl.exp(running_max - new_max)  # 0 for the first source
        weight = tl.exp(logit - new_max)
        running_sum = running_sum * rescale + weight
        acc = acc * rescale[:, :, None] + weight[:, :, None] * v[None, :, :]
        running_max = new_max

    tl.store(lse_ptr + rows[None, :] * S + s_ids[:, None], running_max + tl.log(running_sum), mask=out_ok)
    acc = acc / running_sum[:, :, None]
    for s in tl.static_range(S):
        mixture = tl.sum(tl.where(s_ids[:, None, None] == s, acc, 0.0), axis=0)  # [BT, BD]: row s of acc
        tl.store(mixtures[s] + tile, mixture.to(mixtures[s].dtype.element_ty), mask=tile_ok)


@triton.jit
def _load_grad_mixtures(grad_mixtures, tile, tile_ok, s_ids, S: tl.constexpr, S_PAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, CHUNK_D: tl.constexpr):
    """[S_PAD, BT, CD] fp32: the S grad_mixtures at one tile's chunk of columns (padded queries are 0)."""
    g = tl.zeros([S_PAD, BLOCK_T, CHUNK_D], tl.float32)
    for s in tl.static_range(S):
        g_s = tl.load(grad_mixtures[s] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
        g = tl.where(s_ids[:, None, None] == s, g_s[None, :, :], g)
    return g


@triton.jit
def _phase1_backward_kernel(values, rstds, grad_mixtures, qe_ptr, logits_ptr, lse_ptr, grad_lse_ptr,
                            grad_values, grad_qe_partial_ptr, M, tiles,
                            N: tl.constexpr, S: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                            N_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK_D: tl.constexpr,
                            ACCUMULATE: tl.constexpr):
    # ACCUMULATE: bit n set = grad_values[n] holds a gradient sum that v_n's gradient is added into
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    s_ids = tl.arange(0, S_PAD)
    n_ids = tl.arange(0, N_PAD)
    c = tl.arange(0, CHUNK_D)
    s_ok, n_ok = s_ids < S, n_ids < N
    source = n_ids[None, None, :]  # [1, 1, N_PAD]: the source axis of the per-tile [S_PAD, BT, N_PAD] tensors
    partial_row = grad_qe_partial_ptr + pid * (S * D) + s_ids[:, None] * D  # [S_PAD, 1]: this program's grad_qe

    tile_id = pid
    while tile_id < tiles:
        rows = tile_id * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]; the last tile may pass M: masked
        row_ok = rows < M
        out_ok = s_ok[:, None] & row_ok[None, :]  # [S_PAD, BT]
        lse_offsets = rows[None, :] * S + s_ids[:, None]
        lse = tl.load(lse_ptr + lse_offsets, mask=out_ok, other=0.0)  # [S_PAD, BT]
        grad_lse = tl.load(grad_lse_ptr + lse_offsets, mask=out_ok, other=0.0)
        small_ok = out_ok[:, :, None] & n_ok[None, None, :]  # [S_PAD, BT, N_PAD]
        logit = tl.load(logits_ptr + rows.to(tl.int64)[None, :, None] * (S * N) + s_ids[:, None, None] * N + source,
                        mask=small_ok, other=0.0)  # [S_PAD, BT, N_PAD]
        alpha = tl.where(small_ok, tl.exp(logit - lse[:, :, None]), 0.0)  # 0 at padded queries, tokens, sources
        rstd = tl.zeros([BLOCK_T, N_PAD], tl.float32)
        for n in tl.static_range(N):
            rstd_n = tl.load(rstds[n] + rows, mask=row_ok, other=0.0)  # [BT]
            rstd = tl.where(n_ids[None, :] == n, rstd_n[:, None], rstd)

        # pass 1, chunk by chunk over D: gv[s, t, n] = g_s . v_n, the only reductions over D
        gv = tl.zeros([S_PAD, BLOCK_T, N_PAD], tl.float32)
        for start in range(0, D, CHUNK_D):
            d = start + c
            tile = _tile_offsets(rows, d, D)  # [BT, CD]
            tile_ok = row_ok[:, None] & (d < D)[None, :]
            g = _load_grad_mixtures(grad_mixtures, tile, tile_ok, s_ids, S, S_PAD, BLOCK_T, CHUNK_D)
            for n in tl.static_range(N):
                v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
                gv += tl.where(source == n, tl.sum(g * v[None, :, :], axis=2)[:, :, None], 0.0)

        # every per-token scalar of the backward, from the dots (nothing here reads D)
        dot = tl.sum(alpha * gv, axis=2)  # [S_PAD, BT]: sum_n alpha[s, n] (g_s . v_n)
        grad_logit = alpha * (gv - dot[:, :, None] + grad_lse[:, :, None])  # [S_PAD, BT, N_PAD]
        grad_dot = grad_logit * rstd[None, :, :]  # logit = rstd * (v . qe)
        rstd_scale = tl.sum(grad_logit * logit, axis=0) * rstd * rstd * (-1.0 / D)  # [BT, N_PAD]: via rstd_n

        # pass 2, chunk by chunk (the tile's chunks again, now in L2): grad v_n and this program's grad_qe
        for start in range(0, D, CHUNK_D):
            d = start + c
            d_ok = d < D
            tile = _tile_offsets(rows, d, D)
            tile_ok = row_ok[:, None] & d_ok[None, :]
            qe_ok = s_ok[:, None] & d_ok[None, :]  # [S_PAD, CD]
            g = _load_grad_mixtures(grad_mixtures, tile, tile_ok, s_ids, S, S_PAD, BLOCK_T, CHUNK_D)
            qe = tl.load(qe_ptr + s_ids[:, None] * D + d[None, :], mask=qe_ok, other=0.0)  # [S_PAD, CD]
            grad_qe = tl.zeros([S_PAD, CHUNK_D], tl.float32)
            for n in tl.static_range(N):
                alpha_n = tl.sum(tl.where(source == n, alpha, 0.0), axis=2)  # [S_PAD, BT]
                grad_dot_n = tl.sum(tl.where(source == n, grad_dot, 0.0), axis=2)
                scale_n = tl.sum(tl.where(n_ids[None, :] == n, rstd_scale, 0.0), axis=1)  # [BT]
                v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
                grad_v = (tl.sum(alpha_n[:, :, None] * g + grad_dot_n[:, :, None] * qe[:, None, :], axis=0)
                          + scale_n[:, None] * v)  # [BT, CD]
                if (ACCUMULATE >> n) & 1:
                    grad_v += tl.load(grad_values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(grad_values[n] + tile, grad_v.to(grad_values[n].dtype.element_ty), mask=tile_ok)
                grad_qe += tl.sum(grad_dot_n[:, :, None] * v[None, :, :], axis=1)
            partial = partial_row + d[None, :]  # [S_PAD, CD]
            tl.store(partial, tl.load(partial, mask=qe_ok, other=0.0) + grad_qe, mask=qe_ok)
        tile_id += programs


def supports(qe, values) -> bool:
    """Whether the Triton kernels run these inputs (else the fallback does)."""
    first = values[0]
    on_device = first.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and qe.dtype == torch.float32 and first.dtype in SOURCE_DTYPES
            and all(v.dtype == first.dtype and v.shape == first.shape and v.device == first.device for v in values)
            and triton.next_power_of_2(len(qe)) * triton.next_power_of_2(first.shape[-1]) <= MAX_TILE_ELEMENTS)


def _launch_config(kernel, qe, values, M, config):
    """config (checked), else the table's for these shapes; its block_t capped at the token count, its chunk_d
    (0: all of D) at next_pow2(D)."""
    S, D = qe.shape
    config = check_config(config) if config is not None else config_for(kernel, D, values[0].dtype, S, len(values))
    block_d = triton.next_power_of_2(D)
    return config._replace(block_t=min(config.block_t, triton.next_power_of_2(max(M, 1))),
                           chunk_d=min(config.chunk_d or block_d, block_d))


def phase1_forward(qe, rstds, values, dtype=None, fallback=None, config: LaunchConfig | None = None):
    """qe [S, D] fp32; rstds: N tensors [...] fp32; values: N tensors [..., D] (fp32 / bf16 / fp16, one dtype).
    Returns S mixtures [..., D] in dtype (None: fp32; fp32 / bf16 / fp16), logits [..., S, N], lse [..., S] (the
    contract of two_phase's kernels). config: launch with it instead of the table's (tests,
    benchmarks/attnres_tune.py)."""
    if not supports(qe, values) or (dtype is not None and dtype not in SOURCE_DTYPES):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values))
        return fallback(qe, rstds, values, dtype)
    S, D = qe.shape
    N, shape = len(values), values[0].shape
    M = values[0].numel() // D
    config = _launch_config("phase1_forward", qe, values, M, config)
    device = values[0].device
    mixtures = tuple(torch.empty(shape, dtype=dtype or torch.float32, device=device) for _ in range(S))
    logits = torch.empty(*shape[:-1], S, N, dtype=torch.float32, device=device)
    lse = torch.empty(*shape[:-1], S, dtype=torch.float32, device=device)
    if M > 0:
        _phase1_forward_kernel[(triton.cdiv(M, config.block_t),)](
            tuple(v.contiguous() for v in values), tuple(r.contiguous() for r in rstds), qe.contiguous(),
            mixtures, logits, lse, M, N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S), BLOCK_T=config.block_t,
            BLOCK_D=triton.next_power_of_2(D), num_warps=config.num_warps, num_stages=config.num_stages)
    return mixtures, logits, lse


def phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums=None, grad_dtypes=None,
                    fallback=None, config: LaunchConfig | None = None):
    """Gradients of phase 1 from its saved logits and lse: (grad qe [S, D], N grads of values, each including the
    path through its rstd). grad_dtypes: None (each gradient in its value's dtype) or N dtypes among fp32 / bf16 /
    fp16 (a bf16 source's gradient summed in fp32). sums: None, or N entries, each None or a contiguous tensor
    of its value's shape and its gradient's dtype holding a gradient sum, which that value's gradient is added
    into in place and which is returned as its gradient. grad_mixtures: S tensors [..., D] of one dtype (fp32 /
    bf16 / fp16, read as is; others are cast to fp32 first). config: launch with it instead of the table's."""
    grad_dtypes = [v.dtype for v in values] if grad_dtypes is None else list(grad_dtypes)
    if len(grad_dtypes) != len(values):
        raise ValueError(f"got {len(grad_dtypes)} grad_dtypes for {len(values)} sources; pass one per source.")
    if sums is not None:
        check_sums(sums, values, grad_dtypes)
    if not supports(qe, values) or any(dtype not in SOURCE_DTYPES for dtype in grad_dtypes):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values))
        return fallback(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes)
    S, D = qe.shape
    N = len(values)
    M = values[0].numel() // D
    device = values[0].device
    sums = [None] * N if sums is None else sums
    grad_values = tuple(torch.empty(v.shape, dtype=dtype, device=device) if s is None else s
                        for s, v, dtype in zip(sums, values, grad_dtypes))
    if M == 0:
        return torch.zeros_like(qe), grad_values
    config = _launch_config("phase1_backward", qe, values, M, config)
    tiles = triton.cdiv(M, config.block_t)
    programs = grid_programs(config, tiles, device)
    grad_qe_partial = torch.zeros(programs, S, D, dtype=torch.float32, device=device)  # the kernel adds into it
    grad_dtype = grad_mixtures[0].dtype  # the kernel reads any one float dtype (one tuple, one element type)
    if grad_dtype not in SOURCE_DTYPES or any(g.dtype != grad_dtype for g in grad_mixtures):
        grad_dtype = torch.float32
    _phase1_backward_kernel[(programs,)](
        tuple(v.contiguous() for v in values), tuple(r.contiguous() for r in rstds),
        tuple(g.to(grad_dtype).contiguous() for g in grad_mixtures), qe.contiguous(), logits.contiguous(),
        lse.contiguous(), grad_lse.to(torch.float32).contiguous(), grad_values, grad_qe_partial, M, tiles,
        N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S), N_PAD=triton.next_power_of_2(N), BLOCK_T=config.block_t,
        CHUNK_D=config.chunk_d, ACCUMULATE=sum(1 << n for n, s in enumerate(sums) if s is not None),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return grad_qe_partial.sum(0), grad_values


def check_sums(sums, values, grad_dtypes=None):
    """A clear error unless sums has one entry per value, each None or a tensor to add that value's gradient into
    (of the value's shape and device, and its gradient's dtype: grad_dtypes[n], else the value's)."""
    if len(sums) != len(values):
        raise ValueError(f"got {len(sums)} gradient sums for {len(values)} sources; pass one per source (None "
                         "where the source has none yet).")
    grad_dtypes = [v.dtype for v in values] if grad_dtypes is None else grad_dtypes
    for n, (s, v, dtype) in enumerate(zip(sums, values, grad_dtypes)):
        if s is not None and (s.shape != v.shape or s.dtype != dtype or s.device != v.device
                              or not s.is_contiguous()):
            raise ValueError(f"gradient sum {n} is {tuple(s.shape)} {s.dtype} on {s.device} (contiguous: "
                             f"{s.is_contiguous()}); it must be a contiguous tensor of its source's shape and "
                             f"device, {tuple(v.shape)} on {v.device}, in its gradient's dtype {dtype}.")


def _unsupported_message(qe, values):
    dtypes = sorted({str(v.dtype) for v in values})
    return (f"the Triton phase-1 kernels need CUDA tensors (or TRITON_INTERPRET=1), fp32 qe, sources of one dtype "
            f"among {[str(t) for t in SOURCE_DTYPES]} and one shape, and S_pad * D_pad <= {MAX_TILE_ELEMENTS}; "
            f"got qe {tuple(qe.shape)} {qe.dtype}, sources {dtypes} on {values[0].device}. "
            "Use triton_kernels(base), which falls back to base's phase 1 for such inputs.")


@functools.cache
def triton_kernels(base: Kernels) -> Kernels:
    """base (e.g. compiled_kernels()) with phase 1 forward and backward, and the per-sublayer accumulate + merge
    (alone and with the next sublayer's norm), replaced by the Triton kernels (this file and triton_phase2.py);
    base's functions still run for inputs the kernels do not take (see `supports`). Built once per base."""
    from nanokimi.ops.attnres.triton_phase2 import accumulate_merge, accumulate_merge_norm
    return base._replace(phase1_forward=functools.partial(phase1_forward, fallback=base.phase1_forward),
                         phase1_backward=functools.partial(phase1_backward, fallback=base.phase1_backward),
                         accumulate_merge=functools.partial(accumulate_merge, fallback=base.accumulate_merge),
                         accumulate_merge_norm=functools.partial(accumulate_merge_norm,
                                                                 fallback=base.accumulate_merge_norm))
