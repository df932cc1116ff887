"""Launch configurations of the Triton kernels in ops/attnres (triton_phase1.py, triton_phase2.py): one heuristic.

The kernels are memory-bound, and how fast they stream depends on how they are launched: tokens per tile,
warps per program, pipeline stages and, for the backward kernels (programs loop over token tiles), programs
per SM. `config_for(kernel, D, dtype, S, N)` derives them from the shape:

    kernel: "phase1_forward" | "phase1_backward" | "merge_forward" | "merge_backward" (merge = accumulate+merge)
            | "merge_norm_forward" | "merge_norm_backward" (the merge with the next sublayer's RMSNorm fused)
            | "phase1_norm_forward" | "phase1_norm_backward" (phase 1 with the first query's RMSNorm fused)
    D: hidden size (BLOCK_D = next_pow2(D)); S: queries (phase 1; S_PAD = next_pow2(S)); N: sources (phase 1);
    dtype: the sources' or the stream's (no choice depends on it: the tuner's best configs were the same, or
    within a few percent, for fp32 and bf16); the SM count enters through `grid_programs`.

The rules (see `config_for`) reproduce the configs `benchmarks/attnres_tune.py` measured fastest on an H100 at the
bench-kl-900m shape (16384 tokens, D = 1024, S = 4 and 1, N = 1..9; 2026-12-05/06, commits 17d5453 and 844dbaa):
every bf16 phase-1 config and every merge config is the best measured or within 5% of it (docs/perf-log.md has
the table); running the tuner again checks them on another GPU or shape. Tests and the tuner pass a `config=` to
the op functions instead.
"""
import functools
from typing import NamedTuple

import torch

KERNELS = ("phase1_forward", "phase1_backward", "merge_forward", "merge_backward", "merge_norm_forward",
           "merge_norm_backward", "phase1_norm_forward", "phase1_norm_backward")
# programs loop over tiles: programs_per_sm
GRID_STRIDE = ("phase1_backward", "merge_backward", "merge_norm_backward", "phase1_norm_backward")
CHUNKED = ("phase1_backward", "phase1_norm_backward")  # kernels that stream D in chunks: chunk_d


class LaunchConfig(NamedTuple):
    """How one Triton kernel is launched. block_t: tokens per tile (a power of two; capped at the token count);
    num_warps, num_stages: Triton's launch options; programs_per_sm: programs per SM of the grid-stride
    (backward) kernels, whose grid is min(tiles, programs_per_sm * SMs) (in the CPU interpreter, with no SMs,
    programs_per_sm is the whole grid). Forward kernels run one program per tile and ignore it. chunk_d: columns
    of D that phase 1's backward streams per step (a power of two, capped at next_pow2(D); 0: all of D at once);
    the other kernels hold whole rows and ignore it. sums_in_registers (phase 1's backward, where one chunk covers
    D): each program keeps its share of the query gradient (and the norm weight's) in registers over all its
    tiles and writes it once, instead of adding it into its row of the partial-sum buffer per tile (S x D fp32
    read and written per tile, through L2); ignored by the other kernels and where chunk_d < D. prefetch (phase 1's
    backward): at the start of each tile, ask L2 for the rows of the program's tile that many tiles ahead (its
    sources, gradient sums and grad_mixtures; one bulk prefetch per tensor, so the next tile's loads find them in
    L2 while this tile computes); 0: none. Needs an sm_90+ GPU and 16-byte aligned rows; elsewhere (the
    interpreter, older GPUs) it is ignored. A hint: results are bit-identical with and without it."""
    block_t: int
    num_warps: int
    num_stages: int = 3
    programs_per_sm: int = 4
    chunk_d: int = 0
    sums_in_registers: bool = False
    prefetch: int = 0


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def config_for(kernel: str, D: int, dtype: torch.dtype | None = None, S: int = 1, N: int = 1) -> LaunchConfig:
    """The config a kernel launches with at hidden size D, S queries and N sources (see the module docstring).

    Phase 1 holds S_PAD x BLOCK_D values per token: 2048 of them per tile (one token at S = 4, D = 1024; two for
    the final read, S = 1). Its forward runs 4 warps for one or two sources, 2 for more (the loads of a source
    are short, so fewer warps keep more of them in flight per warp). Its backward streams whole rows
    (chunk_d = BLOCK_D up to 4096 values per tile) with the query-gradient sums in registers, 4 warps per 4096
    values (else 2), 2 programs per SM for one-token tiles (which also prefetch the next tile into L2), else 8.
    The merges take 4096 / BLOCK_D tokens per tile (4 at D = 1024) and 4 warps; their backward 2 programs per SM.
    The kernels with a norm fused launch as the kernel they extend (they stream the same tiles)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}.")
    block_d = _next_pow2(D)
    if not kernel.startswith("phase1"):
        block_t = max(1, min(64, 4096 // block_d))
        return LaunchConfig(block_t=block_t, num_warps=4, programs_per_sm=2 if kernel in GRID_STRIDE else 4)
    per_token = _next_pow2(S) * block_d
    block_t = max(1, min(16, 2048 // per_token))
    if kernel not in GRID_STRIDE:
        return LaunchConfig(block_t=block_t, num_warps=4 if N <= 2 else 2)
    chunk_d = min(block_d, max(16, 4096 // (_next_pow2(S) * block_t)))
    return LaunchConfig(block_t=block_t, num_warps=4 if _next_pow2(S) * block_t * chunk_d >= 4096 else 2,
                        programs_per_sm=2 if block_t == 1 else 8, chunk_d=chunk_d,
                        sums_in_registers=chunk_d >= block_d, prefetch=1 if block_t == 1 else 0)


def check_config(config: LaunchConfig) -> LaunchConfig:
    """config, if every field is usable; else a ValueError that says which is not."""
    if config.block_t < 1 or config.block_t & (config.block_t - 1):
        raise ValueError(f"block_t={config.block_t} must be a power of two (tokens per tile).")
    if config.num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps={config.num_warps} must be a power of two from 1 to 32.")
    if config.chunk_d < 0 or config.chunk_d & (config.chunk_d - 1) or 0 < config.chunk_d < 16:
        raise ValueError(f"chunk_d={config.chunk_d} must be 0 (all of D) or a power of two >= 16.")
    if not isinstance(config.sums_in_registers, bool):
        raise ValueError(f"sums_in_registers={config.sums_in_registers!r} must be True or False.")
    if not isinstance(config.prefetch, int) or isinstance(config.prefetch, bool) or config.prefetch < 0:
        raise ValueError(f"prefetch={config.prefetch!r} must be an int >= 0 (tiles ahead; 0: no prefetch).")
    if config.num_stages < 1 or config.programs_per_sm < 1:
        raise ValueError(f"num_stages={config.num_stages} and programs_per_sm={config.programs_per_sm} "
                         "must be >= 1.")
    return config


def grid_programs(config: LaunchConfig, tiles: int, device: torch.device) -> int:
    """Programs of a grid-stride kernel: programs_per_sm per SM (the whole grid in the interpreter), at most
    one per tile."""
    return max(1, min(tiles, config.programs_per_sm * _sm_count(device)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def sm_major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA device (9 for sm_90), looked up once per device."""
    return torch.cuda.get_device_capability(device)[0]
