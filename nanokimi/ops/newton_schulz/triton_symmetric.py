"""Batched products whose result is known to be symmetric, one Triton kernel: only the upper-triangular output
tiles are computed, each written twice (as computed, and transposed into the mirror position).

Every s x s matrix of the Gram-form Newton-Schulz recursion is a polynomial in the symmetric G = X X^T, so G,
R_k, P_k = a I + b R_k + c R_k^2, P_k R_k, P_k R_k P_k and Q = P_{m-1} ... P_0 are all symmetric, and each
product that makes one of them needs only the tiles on and above the diagonal: with T = ceil(s / BLOCK) tile
rows, T (T + 1) / 2 of the T^2 tiles (21 of 36 for s = 768 and BLOCK = 128), about half the FLOPs.

    out[b] = scale[b] (alpha A[b] B[b] + beta C[b] + shift I)        A [N, s, K], B [N, K, s], C, out [N, s, s]

Gram matrices: A = X, B = X^T for wide X [N, s, l] (X^T, X for tall [N, l, s]); the transposes are strides,
nothing is copied. Newton-Schulz's polynomial is the same call with A = B = C = R, alpha = c, beta = b,
shift = a (and the normalisation's 1 / n as scale), so the elementwise part a I + b R rides in the GEMM's
epilogue instead of being a separate kernel (`_affine`) whose output the GEMM reads back.

The kernel: grid (T (T + 1) / 2, N); program (t, b) takes the upper tile (i, j), i <= j, numbered column by
column (t = j (j + 1) / 2 + i, so neighbouring programs share B's column block), and accumulates
A[b, rows i, :] @ B[b, :, cols j] in fp32 with tl.dot over BLOCK_K slices of K (bf16 / fp16 operands; fp32
operands at full fp32 precision). The epilogue adds beta C + shift I, multiplies by scale, rounds once to out's
dtype, and stores the tile's upper part (global row <= column) at (i, j) and its strict upper part again at the
mirrored addresses (out[col, row] = value[row, col], the store's pointers swapped, no data transposed in code). So a
diagonal tile's lower half is its own upper half mirrored, and the result is symmetric bit for bit even where
A[b] B[b] rounds differently from B[b] A[b] (P R and R P are equal only mathematically). fp32 operands (tests)
run without tensor cores on the GPU, slowly. Compiled offline for sm_90 (Triton 3.9, bf16): every config uses
wgmma with pipelined loads, 96 KB (128 x 128, 3 stages), 128 KB (4 stages) and 64 KB (64 x 64) of shared memory.

Triton's interpreter (the CPU tests; 3.9) multiplies bf16 tiles as their raw bit patterns and truncates fp32 to
bf16; there the kernel upcasts bf16 operands to fp32 (exact: a product of two bf16 fits fp32) and rounds its
bf16 output to nearest even by hand (EMULATE_BF16, off on CUDA), so the CPU tests see the GPU's arithmetic.

Launch: `triton.autotune` over CONFIGS (few: the first step pays each config's compile), once per size, operand
layout (tall or wide) and epilogue, at the first eager CUDA call; later calls launch its pick directly. In Triton's
interpreter, and while a CUDA graph is being captured before that shape was tuned (a benchmark synchronises),
`default_config` runs untimed. Inside, nothing is allocated and nothing waits for the device, so the calls can be
captured (tuned before: Muon's CapturedStep warms up eagerly). `symmetric_matmul(..., config=...)` launches one
given config (tests, benchmarks).
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmetricConfig(NamedTuple):
    """One launch of the kernel: BLOCK x BLOCK output tiles, BLOCK_K slices of the inner dimension, Triton's
    num_warps and num_stages (software-pipelined loads)."""
    block: int
    block_k: int
    num_warps: int
    num_stages: int


# Autotune candidates: 128 x 128 tiles (two warpgroups on Hopper), three or four stages of 32 KB of bf16 operands;
# 64 x 64 tiles for small s or few matrices (more programs for the SMs).
CONFIGS = (SymmetricConfig(128, 64, 8, 3), SymmetricConfig(128, 64, 8, 4), SymmetricConfig(64, 64, 4, 4))


def default_config(s, dtype):
    """The config used without timing (interpreter, CUDA-graph capture): 64 x 64 tiles for small s or fp32
    operands (128 x 128 fp32 tiles need twice the shared memory), else 128 x 128."""
    return CONFIGS[2] if s <= 256 or dtype == torch.float32 else CONFIGS[0]


def supports(X):
    """Whether the kernel runs tensors like X: Triton's dtypes here (bf16, fp16, fp32) on CUDA, or on the CPU
    under Triton's interpreter (TRITON_INTERPRET=1, set before the kernel was defined)."""
    on_device = X.is_cuda or (X.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and X.dtype in DTYPES


def upper_tiles(s, block):
    """Programs per matrix: the tiles (i, j), i <= j, of a ceil(s / block) square grid of tiles."""
    t = triton.cdiv(s, block)
    return t * (t + 1) // 2


@triton.jit
def _symmetric_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, out_ptr, S, K,
                      stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                      stride_cb, stride_cm, stride_cn, stride_ob, stride_om, stride_on,
                      alpha, beta, shift,
                      HAS_C: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_S: tl.constexpr, EVEN_K: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # tile = j (j + 1) / 2 + i with i <= j; the float square root may land one off either way
    j = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > tile, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= tile, j + 1, j)
    i = tile - j * (j + 1) // 2
    rows = i * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] output rows: tile row i
    cols = j * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] output columns: tile column j
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + rows[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK, BLOCK_K]
    b_ptrs = b_ptr + batch * stride_bb + ks[:, None] * stride_bk + cols[None, :] * stride_bn  # [BLOCK_K, BLOCK]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_S and EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = ks < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(rows[:, None] < S) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (cols[None, :] < S), other=0.0)
        if EMULATE_BF16:  # the interpreter multiplies bf16 as raw bits: fp32 instead, exact for bf16 products
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    inside = (rows[:, None] < S) & (cols[None, :] < S)  # [BLOCK, BLOCK]
    result = alpha * acc
    if HAS_C:
        c = tl.load(c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=inside,
                    other=0.0)
        result += beta * c.to(tl.float32)
    result += tl.where(rows[:, None] == cols[None, :], shift, 0.0)
    if HAS_SCALE:
        result *= tl.load(scale_ptr + batch)
    if EMULATE_BF16:  # the interpreter truncates to bf16: round to nearest even here, as the GPU's cast does
        bits = result.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = result.to(out_ptr.dtype.element_ty)
    out = out_ptr + batch * stride_ob
    tl.store(out + rows[:, None] * stride_om + cols[None, :] * stride_on, result,
             mask=inside & (rows[:, None] <= cols[None, :]))
    tl.store(out + cols[None, :] * stride_om + rows[:, None] * stride_on, result,  # out[col, row] = value[row, col]
             mask=inside & (rows[:, None] < cols[None, :]))


_fixed_kernel = triton.heuristics({"EVEN_S": lambda args: args["S"] % args["BLOCK"] == 0,
                                   "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_symmetric_kernel)
_TRITON_CONFIGS = {c: triton.Config({"BLOCK": c.block, "BLOCK_K": c.block_k}, num_warps=c.num_warps,
                                    num_stages=c.num_stages) for c in CONFIGS}


_tuned_kernel = triton.autotune(configs=list(_TRITON_CONFIGS.values()),
                                key=["S", "K", "stride_am", "stride_bn", "HAS_C", "HAS_SCALE"])(_fixed_kernel)
_chosen = {}  # (s, K, A's row stride, B's column stride, with C, with scale, dtype) -> the autotuner's SymmetricConfig
last_config = None  # the SymmetricConfig of the latest call (benchmarks report it)


def _as_config(triton_config):
    """The SymmetricConfig of one of the autotuner's triton.Config candidates."""
    return SymmetricConfig(triton_config.kwargs["BLOCK"], triton_config.kwargs["BLOCK_K"], triton_config.num_warps,
                           triton_config.num_stages)


def launch_config(key, s, A):
    """The config of a call without one: the autotuner's pick for this key once it has timed the candidates; None
    where it can time them now (eager, on CUDA); default_config where it cannot (Triton's interpreter; a CUDA graph
    being captured, where its benchmark would synchronise; some Triton versions time even a single candidate, so
    the tuner itself is not called then)."""
    if key in _chosen:
        return _chosen[key]
    capturing = A.is_cuda and torch.cuda.is_current_stream_capturing()
    return default_config(s, A.dtype) if capturing or not A.is_cuda else None


def symmetric_matmul(A, B, out=None, *, alpha=1.0, C=None, beta=0.0, shift=0.0, scale=None, config=None):
    """out[b] = scale[b] (alpha A[b] B[b] + beta C[b] + shift I) for every b, where the result is known to be
    symmetric (only its upper tiles are computed; see the module docstring). Returns out.

    A [N, s, K], B [N, K, s]: one dtype among DTYPES, any strides (views such as X.mT cost nothing); fp32
    accumulation. C [N, s, s] (any float dtype, read in fp32) or None; scale [N] or [N, 1, 1] (fp32) or None;
    alpha, beta, shift: Python floats. out [N, s, s] in A's dtype, any strides (e.g. a slice of a larger buffer;
    it must not overlap A, B or C), new when None. config: a SymmetricConfig to launch, None for launch_config's
    (the first eager CUDA call of each shape and layout times every candidate in CONFIGS, its later calls launch
    the fastest directly).
    """
    global last_config
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1] or A.shape[1] != B.shape[2]:
        raise ValueError(f"symmetric_matmul needs A [N, s, K] and B [N, K, s], got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    N, s, K = A.shape
    if A.dtype != B.dtype or A.dtype not in DTYPES or A.device != B.device:
        raise ValueError(f"symmetric_matmul needs A and B of one dtype among {DTYPES} on one device, got "
                         f"{A.dtype} on {A.device} and {B.dtype} on {B.device}")
    if out is None:
        out = A.new_empty(N, s, s)
    for name, t in (("out", out), ("C", C)):
        if t is not None and (tuple(t.shape) != (N, s, s) or t.device != A.device):
            raise ValueError(f"symmetric_matmul's {name} must be [N, s, s] = {[N, s, s]} on {A.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if out.dtype != A.dtype:
        raise ValueError(f"symmetric_matmul writes A's dtype {A.dtype}; out is {out.dtype}")
    if scale is not None:
        if scale.numel() != N:
            raise ValueError(f"symmetric_matmul's scale needs one value per matrix ({N}), got {tuple(scale.shape)}")
        scale = scale.reshape(N).to(torch.float32)
    if N == 0 or s == 0:
        return out
    C_args = (C, C.stride(0), C.stride(1), C.stride(2)) if C is not None else (out, 0, 0, 0)
    args = (A, B, C_args[0], out if scale is None else scale, out, s, K, *A.stride(), *B.stride(), *C_args[1:],
            *out.stride(), float(alpha), float(beta), float(shift))
    emulate = A.dtype == torch.bfloat16 and not A.is_cuda  # the interpreter's bf16 gaps (module docstring)
    flags = dict(HAS_C=C is not None, HAS_SCALE=scale is not None, IEEE=A.dtype == torch.float32 or emulate,
                 EMULATE_BF16=emulate)
    key = (s, K, A.stride(1), B.stride(2), C is not None, scale is not None, A.dtype)
    config = config or launch_config(key, s, A)
    if config is None:
        _tuned_kernel[lambda meta: (upper_tiles(s, meta["BLOCK"]), N)](*args, **flags)
        config = _chosen[key] = _as_config(_tuned_kernel.best_config)
    else:
        _fixed_kernel[(upper_tiles(s, config.block), N)](*args, **flags, BLOCK=config.block, BLOCK_K=config.block_k,
                                                          num_warps=config.num_warps, num_stages=config.num_stages)
    last_config = config
    return out


def gram(X, out=None, config=None):
    """X X^T for wide X [N, s, l] (l >= s), X^T X for tall X [N, l, s]: [N, s, s] in X's dtype, into out if given."""
    A, B = (X.mT, X) if X.shape[-2] > X.shape[-1] else (X, X.mT)
    return symmetric_matmul(A, B, out, config=config)


def polynomial(R, a, b, c, scale=None, config=None):
    """scale (a I + b R + c R R) for symmetric R [N, s, s] (scale [N] or [N, 1, 1], or None): Newton-Schulz's P in
    one kernel, the elementwise part in the epilogue."""
    return symmetric_matmul(R, R, alpha=c, C=R, beta=b, shift=a, scale=scale, config=config)
