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
    program's own row of a zeroed [programs, S, D] buffer; with LaunchConfig.sums_in_registers and one chunk
    over D, summed in registers over the program's tiles and written once: the same additions, without an
    S x D read-add-write per tile); one torch sum over programs finishes it (deterministic, no atomics).
alpha = exp(logit - lse) comes from the saved logits, so nothing of size [S, N, B, T, D] is ever kept.

With the first query's pre-norm (`phase1_norm_forward` / `phase1_norm_backward`, FIRST_NORM: the first sublayer of
a block reads mixture 0 through its RMSNorm, weight w [D]), mixture 0 itself never goes through memory:
forward: h = mixture 0 rounded as the module stores it (to the mixtures' dtype, then the stream's), a row
    reduction in registers gives rstd_h = 1 / RMS(h), and x0 = w * (h rstd_h rounded to h's dtype) is written in
    mixture 0's place.
backward: grad_mixtures[0] is g_x, the gradient of x0. With g_n = w g_x (rounded to h's dtype, the gradient of
    the normalised h), the gradient of mixture 0 is g_0 = rstd_h g_n - rstd_h^3 (g_n . h) / D h, which needs two
    per-token sums over D before any dot with it. So pass 1 also recomputes h chunk by chunk (sum_n alpha[0, n]
    v_n, rounded as in forward) and accumulates h . h, g_n . h and h . v_n beside gv (row 0 holding g_n . v_n);
    between the passes
        g_0 . v_n = rstd_h (g_n . v_n) - rstd_h^3 (g_n . h) / D (h . v_n)
    replaces row 0 of gv (without g_0's rounding to the stream's dtype, a no-op for an fp32 stream). Pass 2
    recomputes h per chunk again, forms g_0 itself (rounded as autograd rounds it unfused) in row 0 of g, and adds
    grad w += sum over the tile's tokens of g_x (h rstd_h) into the program's row of a zeroed [programs, D]
    buffer (summed over programs by torch, like grad_qe). h needs every source of the chunk before its dots, so
    each pass reads the chunk's sources twice; the second read comes from L1 / L2, not memory.

The N sources, N rstds, S mixtures and their gradients are separate tensors, passed to the kernels as tuples
(one pointer argument each, no device-side pointer table, so nothing is copied host to device and the calls
can be captured in a CUDA graph). N and S are compile-time constants: one kernel per source count, as with the
compiled kernels. Tokens per tile, warps and the backward grid come from launch.py's table (`config_for`).
Where the kernels do not apply (float64, mixed source dtypes, S * D too large for registers) the `fallback`
phase-1 functions run instead.
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanokimi.ops.attnres.launch import LaunchConfig, check_config, config_for, grid_programs, sm_major

# S_PAD * BLOCK_D fp32 values per token held in registers (accumulators in forward, grad_mixtures and the
# per-program grad_qe in backward); above this the kernels would spill, and the fallback runs instead
MAX_TILE_ELEMENTS = 16384
SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _tile_offsets(rows, d, D: tl.constexpr):
    """[BLOCK_T, BLOCK_D] element offsets of a tile of a contiguous [M, D] tensor (int64: M * D may pass 2^31),
    marked contiguous in runs of 4 only: every load then reads 4 elements per thread (16 bytes of fp32, 8 of bf16),
    the layout the fp32 3-D tensors take, so loaded tiles need no layout conversion through shared memory."""
    RUN: tl.constexpr = 4 if d.shape[0] >= 4 else d.shape[0]
    return tl.max_contiguous(rows.to(tl.int64)[:, None] * D + d[None, :], [1, RUN])


@triton.jit
def _inv_rms(x, eps, D: tl.constexpr):
    """1 / RMS of each row of x [BT, BD] (fp32; columns past D are zero): [BT]."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to DTYPE and back: the value a tensor of DTYPE stores (a no-op for fp32)."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _row(x, row_ids, row):
    """x[row] of x [R, A, B] (row_ids: its index vector [R]): [A, B]."""
    return tl.sum(tl.where(row_ids[:, None, None] == row, x, 0.0), axis=0)


@triton.jit
def _prefetch_rows(base, first_row, rows, D: tl.constexpr):
    """Ask L2 to fetch `rows` rows of D elements from row first_row of the contiguous [M, D] tensor at base: one bulk
    prefetch (sm_90+) issued by the program's first thread; base and a row's bytes must be multiples of 16. A hint
    only: nothing comes into registers and no result changes."""
    row_bytes: tl.constexpr = D * base.dtype.element_ty.primitive_bitwidth // 8
    tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .u32 thread; mov.u32 thread, %tid.x; setp.eq.u32 first, thread, 0;"
        " @first cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + first_row.to(tl.int64) * D + tl.zeros([1], tl.int64), rows * row_bytes + tl.zeros([1], tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _phase1_forward_kernel(values, rstds, qe_ptr, mixtures, logits_ptr, lse_ptr, norm_weight_ptr, M, norm_eps,
                           N: tl.constexpr, S: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FIRST_NORM: tl.constexpr,
                           MIXTURE_DTYPE: tl.constexpr, INPUT_DTYPE: tl.constexpr):
    # FIRST_NORM: mixtures[0] receives x0 = rms_norm(mixture 0 rounded to MIXTURE_DTYPE, then to INPUT_DTYPE)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    s_ids = tl.arange(0, S_PAD)
    d = tl.arange(0, BLOCK_D)
    row_ok, s_ok, d_ok = rows < M, s_ids < S, d < D
    tile = _tile_offsets(rows, d, D)  # [BT, BD]
    tile_ok = row_ok[:, None] & d_ok[None, :]
    out_ok = s_ok[:, None] & row_ok[None, :]  # [S_PAD, BT]
    logit_offsets = rows.to(tl.int64)[None, :] * (S * N) + s_ids[:, None] * N  # [S_PAD, BT]
    # [S_PAD, 1, BD]: loaded in 3-D, so the 3-D tensors below take the load's vectorised layout
    qe = tl.load(qe_ptr + s_ids[:, None, None] * D + d[None, None, :], mask=s_ok[:, None, None] & d_ok[None, None, :],
                 other=0.0)

    running_max = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
    for n in tl.static_range(N):
        v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
        rstd = tl.load(rstds[n] + rows, mask=row_ok, other=0.0)  # [BT]
        logit = tl.sum(v[None, :, :] * qe, axis=2) * rstd[None, :]  # [S_PAD, BT]
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
        mixture = _row(acc, s_ids, s)  # [BT, BD]
        if FIRST_NORM and s == 0:  # the first sublayer's input h, rounded as the module stores it, then its norm
            h = _rounded(_rounded(mixture, MIXTURE_DTYPE), INPUT_DTYPE)
            normed = _rounded(h * _inv_rms(h, norm_eps, D)[:, None], INPUT_DTYPE)
            norm_weight = tl.load(norm_weight_ptr + d, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
            tl.store(mixtures[0] + tile, (normed * norm_weight[None, :]).to(mixtures[0].dtype.element_ty),
                     mask=tile_ok)
        else:
            tl.store(mixtures[s] + tile, mixture.to(mixtures[s].dtype.element_ty), mask=tile_ok)


@triton.jit
def _load_grad_mixtures(grad_mixtures, tile, tile_ok, s_ids, S: tl.constexpr, S_PAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, CHUNK_D: tl.constexpr):
    """[S_PAD, BT, CD] fp32: the S grad_mixtures at one tile's chunk of columns (padded queries are 0), as one 3-D
    load (pointers chosen per query), so the 3-D tensors take its vectorised layout; grad_mixtures[0] is loaded
    apart where its dtype differs from the others' (the first query's normed input)."""
    FIRST_APART: tl.constexpr = grad_mixtures[0].dtype != grad_mixtures[S - 1].dtype
    pointers = grad_mixtures[S - 1] + tile[None, :, :]
    for s in tl.static_range(1 if FIRST_APART else 0, S - 1):
        pointers = tl.where(s_ids[:, None, None] == s, grad_mixtures[s] + tile[None, :, :], pointers)
    loaded = (s_ids < S) & (s_ids > 0) if FIRST_APART else s_ids < S
    g = tl.load(pointers, mask=loaded[:, None, None] & tile_ok[None, :, :], other=0.0).to(tl.float32)
    if FIRST_APART:
        g_first = tl.load(grad_mixtures[0] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
        g = tl.where(s_ids[:, None, None] == 0, g_first[None, :, :], g)
    return g


@triton.jit
def _column(x, column_ids, column):
    """x[:, column] of x [R, C] (column_ids: its index vector [C]): [R]."""
    return tl.sum(tl.where(column_ids[None, :] == column, x, 0.0), axis=1)


@triton.jit
def _first_input_chunk(values, alpha_first, tile, tile_ok, n_ids, N: tl.constexpr, BLOCK_T: tl.constexpr,
                       CHUNK_D: tl.constexpr, MIXTURE_DTYPE: tl.constexpr, INPUT_DTYPE: tl.constexpr):
    """The first query's sublayer input h at one tile's chunk of columns, [BT, CD] fp32: mixture 0 recomputed as
    sum_n alpha[0, n] v_n (alpha_first [BT, N_PAD]) and rounded as the forward rounds it."""
    h = tl.zeros([BLOCK_T, CHUNK_D], tl.float32)
    for n in tl.static_range(N):
        h += _column(alpha_first, n_ids, n)[:, None] * tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)
    return _rounded(_rounded(h, MIXTURE_DTYPE), INPUT_DTYPE)


@triton.jit
def _phase1_backward_kernel(values, rstds, grad_mixtures, qe_ptr, logits_ptr, lse_ptr, grad_lse_ptr,
                            grad_values, grad_qe_partial_ptr, norm_weight_ptr, grad_norm_weight_partial_ptr, M, tiles,
                            norm_eps, N: tl.constexpr, S: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                            N_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK_D: tl.constexpr,
                            ACCUMULATE: tl.constexpr, FIRST_NORM: tl.constexpr, MIXTURE_DTYPE: tl.constexpr,
                            INPUT_DTYPE: tl.constexpr, SUMS_IN_REGISTERS: tl.constexpr, PREFETCH: tl.constexpr):
    # ACCUMULATE: bit n set = grad_values[n] holds a gradient sum that v_n's gradient is added into
    # FIRST_NORM: grad_mixtures[0] is the gradient g_x of x0 = norm_weight * rms_norm(h), h = mixture 0 rounded to
    # MIXTURE_DTYPE then INPUT_DTYPE; the gradient of mixture 0 is formed here from g_x and h (recomputed)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    s_ids = tl.arange(0, S_PAD)
    n_ids = tl.arange(0, N_PAD)
    c = tl.arange(0, CHUNK_D)
    s_ok, n_ok = s_ids < S, n_ids < N
    source = n_ids[None, None, :]  # [1, 1, N_PAD]: the source axis of the per-tile [S_PAD, BT, N_PAD] tensors
    partial_row = grad_qe_partial_ptr + pid * (S * D) + s_ids[:, None] * D  # [S_PAD, 1]: this program's grad_qe
    # SUMS_IN_REGISTERS (one chunk covers D): this program's grad_qe and grad norm_weight summed here over its tiles
    program_grad_qe = tl.zeros([S_PAD, CHUNK_D], tl.float32)
    program_grad_norm_weight = tl.zeros([CHUNK_D], tl.float32)

    tile_id = pid
    while tile_id < tiles:
        if PREFETCH > 0:  # the rows of this program's tile PREFETCH tiles ahead, into L2 while this one computes
            ahead = tile_id + PREFETCH * programs
            if ahead < tiles:
                first_row = ahead * BLOCK_T
                rows_ahead = tl.minimum(M - first_row, BLOCK_T)
                for n in tl.static_range(N):
                    _prefetch_rows(values[n], first_row, rows_ahead, D)
                    if (ACCUMULATE >> n) & 1:
                        _prefetch_rows(grad_values[n], first_row, rows_ahead, D)
                for s in tl.static_range(S):
                    _prefetch_rows(grad_mixtures[s], first_row, rows_ahead, D)
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
        if FIRST_NORM:
            alpha_first = _row(alpha, s_ids, 0)  # [BT, N_PAD]: mixture 0's weights
            h_dot_h = tl.zeros([BLOCK_T], tl.float32)  # h . h
            grad_normed_dot_h = tl.zeros([BLOCK_T], tl.float32)  # g_n . h, g_n = norm_weight g_x in h's dtype
            h_dot_v = tl.zeros([BLOCK_T, N_PAD], tl.float32)  # h . v_n

        # pass 1, chunk by chunk over D: gv[s, t, n] = g_s . v_n, the only reductions over D (with FIRST_NORM,
        # row 0 holds g_n . v_n until the sums below turn it into g_0 . v_n)
        gv = tl.zeros([S_PAD, BLOCK_T, N_PAD], tl.float32)
        for start in range(0, D, CHUNK_D):
            d = start + c
            tile = _tile_offsets(rows, d, D)  # [BT, CD]
            tile_ok = row_ok[:, None] & (d < D)[None, :]
            g = _load_grad_mixtures(grad_mixtures, tile, tile_ok, s_ids, S, S_PAD, BLOCK_T, CHUNK_D)
            if FIRST_NORM:
                norm_weight = tl.load(norm_weight_ptr + d, mask=d < D, other=0.0).to(tl.float32)  # [CD]
                grad_normed = _rounded(_row(g, s_ids, 0) * norm_weight[None, :], INPUT_DTYPE)  # [BT, CD]
                g = tl.where(s_ids[:, None, None] == 0, grad_normed[None, :, :], g)
                h = tl.zeros([BLOCK_T, CHUNK_D], tl.float32)  # mixture 0, as _first_input_chunk sums it
            for n in tl.static_range(N):
                v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
                gv += tl.where(source == n, tl.sum(g * v[None, :, :], axis=2)[:, :, None], 0.0)
                if FIRST_NORM:
                    h += _column(alpha_first, n_ids, n)[:, None] * v
            if FIRST_NORM:  # h needs every source first; its dots with them re-read the chunk (L1 / L2)
                h = _rounded(_rounded(h, MIXTURE_DTYPE), INPUT_DTYPE)
                h_dot_h += tl.sum(h * h, axis=1)
                grad_normed_dot_h += tl.sum(grad_normed * h, axis=1)
                for n in tl.static_range(N):
                    v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)
                    h_dot_v += tl.where(n_ids[None, :] == n, tl.sum(h * v, axis=1)[:, None], 0.0)

        if FIRST_NORM:  # the norm's backward: g_0 = rstd_h g_n - rstd_h^3 (g_n . h) / D h, dotted with each v_n
            rstd_h = 1.0 / tl.sqrt(h_dot_h / D + norm_eps)  # [BT]
            h_scale = rstd_h * rstd_h * rstd_h * grad_normed_dot_h / D  # [BT]
            first_gv = rstd_h[:, None] * _row(gv, s_ids, 0) - h_scale[:, None] * h_dot_v  # [BT, N_PAD]
            gv = tl.where(s_ids[:, None, None] == 0, first_gv[None, :, :], gv)
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
            if FIRST_NORM:  # g_x -> the gradient of mixture 0 (rounded as autograd rounds it unfused); grad norm_weight
                grad_x = _row(g, s_ids, 0)  # [BT, CD]
                norm_weight = tl.load(norm_weight_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
                grad_normed = _rounded(grad_x * norm_weight[None, :], INPUT_DTYPE)
                h = _first_input_chunk(values, alpha_first, tile, tile_ok, n_ids, N, BLOCK_T, CHUNK_D,
                                       MIXTURE_DTYPE, INPUT_DTYPE)
                normed = _rounded(h * rstd_h[:, None], INPUT_DTYPE)
                if SUMS_IN_REGISTERS:
                    program_grad_norm_weight += tl.sum(grad_x * normed, axis=0)
                else:
                    grad_norm_weight_row = grad_norm_weight_partial_ptr + pid * D + d  # [CD]: this program's row
                    tl.store(grad_norm_weight_row, tl.load(grad_norm_weight_row, mask=d_ok, other=0.0)
                             + tl.sum(grad_x * normed, axis=0), mask=d_ok)
                grad_h = rstd_h[:, None] * grad_normed - h_scale[:, None] * h
                grad_first = _rounded(_rounded(grad_h, INPUT_DTYPE), MIXTURE_DTYPE)
                g = tl.where(s_ids[:, None, None] == 0, grad_first[None, :, :], g)
            qe = tl.load(qe_ptr + s_ids[:, None, None] * D + d[None, None, :], mask=qe_ok[:, None, :],
                         other=0.0)  # [S_PAD, 1, CD]
            grad_qe = tl.zeros([S_PAD, CHUNK_D], tl.float32)
            for n in tl.static_range(N):
                alpha_n = tl.sum(tl.where(source == n, alpha, 0.0), axis=2)  # [S_PAD, BT]
                grad_dot_n = tl.sum(tl.where(source == n, grad_dot, 0.0), axis=2)
                scale_n = tl.sum(tl.where(n_ids[None, :] == n, rstd_scale, 0.0), axis=1)  # [BT]
                v = tl.load(values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, CD]
                grad_v = (tl.sum(alpha_n[:, :, None] * g + grad_dot_n[:, :, None] * qe, axis=0)
                          + scale_n[:, None] * v)  # [BT, CD]
                if (ACCUMULATE >> n) & 1:
                    grad_v += tl.load(grad_values[n] + tile, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(grad_values[n] + tile, grad_v.to(grad_values[n].dtype.element_ty), mask=tile_ok)
                grad_qe += tl.sum(grad_dot_n[:, :, None] * v[None, :, :], axis=1)
            if SUMS_IN_REGISTERS:
                program_grad_qe += grad_qe
            else:
                partial = partial_row + d[None, :]  # [S_PAD, CD]
                tl.store(partial, tl.load(partial, mask=qe_ok, other=0.0) + grad_qe, mask=qe_ok)
        tile_id += programs
    if SUMS_IN_REGISTERS:  # the same fp32 additions in the same order as the per-tile read-add-writes
        tl.store(partial_row + c[None, :], program_grad_qe, mask=s_ok[:, None] & (c < D)[None, :])
        if FIRST_NORM:
            tl.store(grad_norm_weight_partial_ptr + pid * D + c, program_grad_norm_weight, mask=c < D)


def supports(qe, values) -> bool:
    """Whether the Triton kernels run these inputs (else the fallback does)."""
    first = values[0]
    on_device = first.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and qe.dtype == torch.float32 and first.dtype in SOURCE_DTYPES
            and all(v.dtype == first.dtype and v.shape == first.shape and v.device == first.device for v in values)
            and triton.next_power_of_2(len(qe)) * triton.next_power_of_2(first.shape[-1]) <= MAX_TILE_ELEMENTS)


def can_prefetch(tensors) -> bool:
    """Whether `_prefetch_rows` may run on these [..., D] tensors: CUDA (not the interpreter) on an sm_90+ GPU,
    each tensor starting at a 16-byte boundary with rows a multiple of 16 bytes (the bulk prefetch's rules)."""
    first = tensors[0]
    return (first.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and sm_major(first.device) >= 9
            and all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0 for t in tensors))


def supports_first_norm(values, dtype, norm_weight, input_dtype) -> bool:
    """Whether the kernels with the first query's norm run these (besides `supports`): a mixture dtype (None:
    fp32) and stream dtype among SOURCE_DTYPES, and a norm weight [D] of one of them on the sources' device."""
    return ((dtype is None or dtype in SOURCE_DTYPES) and input_dtype in SOURCE_DTYPES
            and norm_weight.dtype in SOURCE_DTYPES and norm_weight.shape == values[0].shape[-1:]
            and norm_weight.device == values[0].device)


def _launch_config(kernel, qe, values, M, config):
    """config (checked), else the table's for these shapes; its block_t capped at the token count, its chunk_d
    (0: all of D) at next_pow2(D)."""
    S, D = qe.shape
    config = check_config(config) if config is not None else config_for(kernel, D, values[0].dtype, S, len(values))
    block_d = triton.next_power_of_2(D)
    return config._replace(block_t=min(config.block_t, triton.next_power_of_2(max(M, 1))),
                           chunk_d=min(config.chunk_d or block_d, block_d))


class _Norm(NamedTuple):
    """The first query's norm as the kernels take it: weight [D], eps, and the dtypes h is rounded to (the
    mixtures', then the stream's)."""
    weight: torch.Tensor
    eps: float
    mixture_dtype: torch.dtype
    input_dtype: torch.dtype


def _norm_arguments(norm, qe):
    """The kernels' norm arguments: (weight, eps, constexprs); without a norm, placeholders that the
    FIRST_NORM=False kernels never read."""
    if norm is None:
        return qe, 0.0, dict(FIRST_NORM=False, MIXTURE_DTYPE=tl.float32, INPUT_DTYPE=tl.float32)
    return norm.weight.contiguous(), norm.eps, dict(FIRST_NORM=True, MIXTURE_DTYPE=TRITON_DTYPES[norm.mixture_dtype],
                                                    INPUT_DTYPE=TRITON_DTYPES[norm.input_dtype])


def _forward(kernel, qe, rstds, values, dtype, config, norm=None):
    """Launch the forward kernel: S outputs (with a norm, x0 [..., D] in the wider of the stream's and the weight's
    dtype, then S - 1 mixtures; else S mixtures) in dtype (None: fp32), logits [..., S, N], lse [..., S]."""
    S, D = qe.shape
    N, shape = len(values), values[0].shape
    M = values[0].numel() // D
    config = _launch_config(kernel, qe, values, M, config)
    device = values[0].device
    dtypes = [dtype or torch.float32] * S
    if norm is not None:
        dtypes[0] = torch.promote_types(norm.input_dtype, norm.weight.dtype)
    mixtures = tuple(torch.empty(shape, dtype=dtype_s, device=device) for dtype_s in dtypes)
    logits = torch.empty(*shape[:-1], S, N, dtype=torch.float32, device=device)
    lse = torch.empty(*shape[:-1], S, dtype=torch.float32, device=device)
    if M > 0:
        norm_weight, norm_eps, norm_constants = _norm_arguments(norm, qe)
        _phase1_forward_kernel[(triton.cdiv(M, config.block_t),)](
            tuple(v.contiguous() for v in values), tuple(r.contiguous() for r in rstds), qe.contiguous(),
            mixtures, logits, lse, norm_weight, M, norm_eps, N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S),
            BLOCK_T=config.block_t, BLOCK_D=triton.next_power_of_2(D), num_warps=config.num_warps,
            num_stages=config.num_stages, **norm_constants)
    return mixtures, logits, lse


def phase1_forward(qe, rstds, values, dtype=None, fallback=None, config: LaunchConfig | None = None):
    """qe [S, D] fp32; rstds: N tensors [...] fp32; values: N tensors [..., D] (fp32 / bf16 / fp16, one dtype).
    Returns S mixtures [..., D] in dtype (None: fp32; fp32 / bf16 / fp16), logits [..., S, N], lse [..., S] (the
    contract of two_phase's kernels). config: launch with it instead of the table's (tests,
    benchmarks/attnres_tune.py)."""
    if not supports(qe, values) or (dtype is not None and dtype not in SOURCE_DTYPES):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values))
        return fallback(qe, rstds, values, dtype)
    return _forward("phase1_forward", qe, rstds, values, dtype, config)


def phase1_norm_forward(qe, rstds, values, dtype, norm_weight, norm_eps, input_dtype, fallback=None,
                        config: LaunchConfig | None = None):
    """`phase1_forward` with the first query's sublayer pre-norm (two_phase's `_phase1_norm_forward_stacked`):
    the first output is x0 = rms_norm(mixture0.to(dtype).to(input_dtype), norm_weight, norm_eps) [..., D] in the
    wider of input_dtype and norm_weight's dtype, computed from the mixture in registers (mixture 0 is never
    written); then the S - 1 other mixtures, logits, lse. norm_weight [D] and input_dtype (the stream's) among
    fp32 / bf16 / fp16."""
    if not supports(qe, values) or not supports_first_norm(values, dtype, norm_weight, input_dtype):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values, norm_weight, input_dtype))
        return fallback(qe, rstds, values, dtype, norm_weight, norm_eps, input_dtype)
    norm = _Norm(norm_weight, norm_eps, dtype or torch.float32, input_dtype)
    return _forward("phase1_norm_forward", qe, rstds, values, dtype, config, norm)


def _check_gradient_dtypes(values, sums, grad_dtypes):
    """grad_dtypes as a list (None: the values' dtypes), after checking it and the sums against the values."""
    grad_dtypes = [v.dtype for v in values] if grad_dtypes is None else list(grad_dtypes)
    if len(grad_dtypes) != len(values):
        raise ValueError(f"got {len(grad_dtypes)} grad_dtypes for {len(values)} sources; pass one per source.")
    if sums is not None:
        check_sums(sums, values, grad_dtypes)
    return grad_dtypes


def _readable(grads):
    """grads (tensors [..., D]) contiguous in one dtype the kernel reads: theirs if they share one among
    SOURCE_DTYPES, else fp32."""
    dtype = grads[0].dtype if grads else torch.float32
    if dtype not in SOURCE_DTYPES or any(g.dtype != dtype for g in grads):
        dtype = torch.float32
    return tuple(g.to(dtype).contiguous() for g in grads)


def _backward(kernel, qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, config, norm=None):
    """Launch the backward kernel: (grad qe [S, D], N grads of values, and with a norm grad norm_weight [D] in its
    dtype)."""
    S, D = qe.shape
    N = len(values)
    M = values[0].numel() // D
    device = values[0].device
    sums = [None] * N if sums is None else sums
    grad_values = tuple(torch.empty(v.shape, dtype=dtype, device=device) if s is None else s
                        for s, v, dtype in zip(sums, values, grad_dtypes))
    norm_grads = () if norm is None else (torch.zeros_like(norm.weight),)
    if M == 0:
        return torch.zeros_like(qe), grad_values, *norm_grads
    config = _launch_config(kernel, qe, values, M, config)
    tiles = triton.cdiv(M, config.block_t)
    programs = grid_programs(config, tiles, device)
    grad_qe_partial = torch.zeros(programs, S, D, dtype=torch.float32, device=device)  # the kernel adds into it
    if norm is None:  # the kernel reads any one float dtype (one tuple, one element type)
        grads = _readable(grad_mixtures)
        grad_norm_weight_partial = grad_qe_partial  # not read
    else:  # the gradient of x0 in its own dtype (or fp32), the mixtures' in theirs
        grads = _readable(grad_mixtures[:1]) + _readable(grad_mixtures[1:])
        grad_norm_weight_partial = torch.zeros(programs, D, dtype=torch.float32, device=device)
    norm_weight, norm_eps, norm_constants = _norm_arguments(norm, qe)
    sources = tuple(v.contiguous() for v in values)
    _phase1_backward_kernel[(programs,)](
        sources, tuple(r.contiguous() for r in rstds), grads, qe.contiguous(),
        logits.contiguous(), lse.contiguous(), grad_lse.to(torch.float32).contiguous(), grad_values, grad_qe_partial,
        norm_weight, grad_norm_weight_partial, M, tiles, norm_eps, N=N, S=S, D=D, S_PAD=triton.next_power_of_2(S),
        N_PAD=triton.next_power_of_2(N), BLOCK_T=config.block_t, CHUNK_D=config.chunk_d,
        ACCUMULATE=sum(1 << n for n, s in enumerate(sums) if s is not None),
        SUMS_IN_REGISTERS=config.sums_in_registers and config.chunk_d >= triton.next_power_of_2(D),
        PREFETCH=config.prefetch if config.prefetch and can_prefetch((*sources, *grads, *grad_values)) else 0,
        num_warps=config.num_warps, num_stages=config.num_stages, **norm_constants)
    if norm is None:
        return grad_qe_partial.sum(0), grad_values
    return grad_qe_partial.sum(0), grad_values, grad_norm_weight_partial.sum(0).to(norm.weight.dtype)


def phase1_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums=None, grad_dtypes=None,
                    fallback=None, config: LaunchConfig | None = None):
    """Gradients of phase 1 from its saved logits and lse: (grad qe [S, D], N grads of values, each including the
    path through its rstd). grad_dtypes: None (each gradient in its value's dtype) or N dtypes among fp32 / bf16 /
    fp16 (a bf16 source's gradient summed in fp32). sums: None, or N entries, each None or a contiguous tensor
    of its value's shape and its gradient's dtype holding a gradient sum, which that value's gradient is added
    into in place and which is returned as its gradient. grad_mixtures: S tensors [..., D] of one dtype (fp32 /
    bf16 / fp16, read as is; others are cast to fp32 first). config: launch with it instead of the table's."""
    grad_dtypes = _check_gradient_dtypes(values, sums, grad_dtypes)
    if not supports(qe, values) or any(dtype not in SOURCE_DTYPES for dtype in grad_dtypes):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values))
        return fallback(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes)
    return _backward("phase1_backward", qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes,
                     config)


def phase1_norm_backward(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, dtype,
                         norm_weight, norm_eps, input_dtype, fallback=None, config: LaunchConfig | None = None):
    """Gradients of `phase1_norm_forward` (two_phase's `_phase1_norm_backward_stacked`): grad_mixtures[0] is the
    gradient of x0, the others as for `phase1_backward` (and sums, grad_dtypes, config). Mixture 0 is recomputed
    from the sources and logits in registers, and the norm's backward runs there: returns (grad qe [S, D], N
    grads of values, grad norm_weight [D] in its dtype, summed per program then over programs)."""
    grad_dtypes = _check_gradient_dtypes(values, sums, grad_dtypes)
    if (not supports(qe, values) or any(dtype_n not in SOURCE_DTYPES for dtype_n in grad_dtypes)
            or not supports_first_norm(values, dtype, norm_weight, input_dtype)):
        if fallback is None:
            raise ValueError(_unsupported_message(qe, values, norm_weight, input_dtype))
        return fallback(qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums, grad_dtypes, dtype,
                        norm_weight, norm_eps, input_dtype)
    norm = _Norm(norm_weight, norm_eps, dtype or torch.float32, input_dtype)
    return _backward("phase1_norm_backward", qe, rstds, values, logits, lse, grad_mixtures, grad_lse, sums,
                     grad_dtypes, config, norm)


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


def _unsupported_message(qe, values, norm_weight=None, input_dtype=None):
    dtypes = sorted({str(v.dtype) for v in values})
    norm = ("" if norm_weight is None else
            f", norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} on {norm_weight.device}, stream dtype "
            f"{input_dtype}")
    return (f"the Triton phase-1 kernels need CUDA tensors (or TRITON_INTERPRET=1), fp32 qe, sources of one dtype "
            f"among {[str(t) for t in SOURCE_DTYPES]} and one shape, and S_pad * D_pad <= {MAX_TILE_ELEMENTS} (with "
            f"the first query's norm: a weight [D] and a stream dtype among them too); got qe {tuple(qe.shape)} "
            f"{qe.dtype}, sources {dtypes} on {values[0].device}{norm}. "
            "Use triton_kernels(base), which falls back to base's phase 1 for such inputs.")
