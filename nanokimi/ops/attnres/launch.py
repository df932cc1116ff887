"""Launch configurations of the Triton kernels in ops/attnres (triton_phase1.py, triton_phase2.py), in one table.

The kernels are memory-bound, and how fast they stream depends on how they are launched: tokens per tile,
warps per program, pipeline stages and, for the backward kernels (programs loop over token tiles), programs
per SM. What suits one shape does not suit another, so each launch looks its config up by what changes it:

    key = (kernel, BLOCK_D, S_PAD, dtype)   ->   {N: LaunchConfig}
    kernel: "phase1_forward" | "phase1_backward" | "merge_forward" | "merge_backward" (merge = accumulate+merge)
            | "merge_norm_forward" | "merge_norm_backward" (the merge with the next sublayer's RMSNorm fused)
            | "phase1_norm_forward" | "phase1_norm_backward" (phase 1 with the first query's RMSNorm fused)
    BLOCK_D = next_pow2(D); S_PAD = next_pow2(S queries), 1 for the merges; dtype: the sources' (phase 1) or
    the stream's (merges) dtype name, e.g. "float32"; N: the source count (phase 1), 1 for the merges.

`config_for` returns the entry of the nearest tuned N for the key (configs vary slowly with N, and any config
is valid at any N), else (the kernels with a norm fused) the entry of the kernel they extend, else
`default_config` (of that kernel), a shape heuristic that is safe everywhere. `TUNED` holds measured configs;
benchmarks/attnres_tune.py measures a grid on a GPU and prints a replacement for it (and writes a JSON file that
`load_tuned` applies over it without editing this file). Tests and the tuner pass a `config=` to the op functions instead of using the table.
"""
import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch

KERNELS = ("phase1_forward", "phase1_backward", "merge_forward", "merge_backward", "merge_norm_forward",
           "merge_norm_backward", "phase1_norm_forward", "phase1_norm_backward")
# programs loop over tiles: programs_per_sm
GRID_STRIDE = ("phase1_backward", "merge_backward", "merge_norm_backward", "phase1_norm_backward")
# an untuned kernel launches with the entry of the kernel it extends: the kernels with a norm fused stream the
# same tiles
UNTUNED_AS = {"merge_norm_forward": "merge_forward", "merge_norm_backward": "merge_backward",
              "phase1_norm_forward": "phase1_forward", "phase1_norm_backward": "phase1_backward"}
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


# Measured best configs at the bench-kl-900m shape (16384 tokens per call, D = 1024), on H100s: the bf16 entries of
# the four phase-1 kernels by `benchmarks/attnres_tune.py --kernels phase1_forward,phase1_backward,
# phase1_norm_forward,phase1_norm_backward --dtypes bfloat16 --budget-s 150` (2026-12-06, commit 844dbaa, after
# the loads were put in the 3-D layout; results/attnres_tune_phase1.json); every other entry by
# `benchmarks/attnres_tune.py --budget-s 150` (2026-12-05, commit 17d5453, results/attnres_tune.json; the fp32
# phase-1 entries predate the layout change). Other GPUs and shapes fall back to the nearest N or the default.
TUNED: dict[tuple[str, int, int, str], dict[int, LaunchConfig]] = {
    ('phase1_forward', 1024, 4, 'float32'): {
        1: LaunchConfig(block_t=1, num_warps=8, num_stages=3, programs_per_sm=4),
        2: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        3: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        4: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        5: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        6: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        7: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        8: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
    },
    ('phase1_forward', 1024, 1, 'float32'): {
        9: LaunchConfig(block_t=2, num_warps=4, num_stages=3, programs_per_sm=4),
    },
    ('phase1_backward', 1024, 4, 'float32'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4, chunk_d=1024),
        2: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4, chunk_d=1024),
        3: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=8, chunk_d=1024),
        4: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=8, chunk_d=1024),
        5: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=8, chunk_d=1024),
        6: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=8, chunk_d=1024),
        7: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024),
        8: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024),
    },
    ('phase1_backward', 1024, 1, 'float32'): {
        9: LaunchConfig(block_t=2, num_warps=4, num_stages=3, programs_per_sm=8, chunk_d=1024),
    },
    ('merge_forward', 1024, 1, 'float32'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
    },
    ('merge_backward', 1024, 1, 'float32'): {
        1: LaunchConfig(block_t=4, num_warps=4, num_stages=3, programs_per_sm=2),
    },
    ('merge_norm_forward', 1024, 1, 'float32'): {
        1: LaunchConfig(block_t=1, num_warps=8, num_stages=3, programs_per_sm=4),
    },
    ('merge_norm_backward', 1024, 1, 'float32'): {
        1: LaunchConfig(block_t=4, num_warps=4, num_stages=3, programs_per_sm=2),
    },
    ('phase1_forward', 1024, 4, 'bfloat16'): {
        1: LaunchConfig(block_t=2, num_warps=4, num_stages=3, programs_per_sm=4),
        2: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        3: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        4: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        5: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        6: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        7: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        8: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
    },
    ('phase1_forward', 1024, 1, 'bfloat16'): {
        9: LaunchConfig(block_t=2, num_warps=2, num_stages=3, programs_per_sm=4),
    },
    ('phase1_backward', 1024, 4, 'bfloat16'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        2: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        3: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        4: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        5: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        6: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        7: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        8: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
    },
    ('phase1_backward', 1024, 1, 'bfloat16'): {
        9: LaunchConfig(block_t=2, num_warps=2, num_stages=3, programs_per_sm=8, chunk_d=1024, sums_in_registers=True),
    },
    ('merge_forward', 1024, 1, 'bfloat16'): {
        1: LaunchConfig(block_t=4, num_warps=8, num_stages=3, programs_per_sm=4),
    },
    ('merge_backward', 1024, 1, 'bfloat16'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=8),
    },
    ('merge_norm_forward', 1024, 1, 'bfloat16'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
    },
    ('merge_norm_backward', 1024, 1, 'bfloat16'): {
        1: LaunchConfig(block_t=4, num_warps=4, num_stages=3, programs_per_sm=2),
    },
    ('phase1_norm_forward', 1024, 4, 'bfloat16'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        2: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        3: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        4: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        5: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        6: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=4),
        7: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
        8: LaunchConfig(block_t=1, num_warps=2, num_stages=3, programs_per_sm=4),
    },
    ('phase1_norm_backward', 1024, 4, 'bfloat16'): {
        1: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        2: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        3: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        4: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        5: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        6: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        7: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
        8: LaunchConfig(block_t=1, num_warps=4, num_stages=3, programs_per_sm=2, chunk_d=1024, sums_in_registers=True, prefetch=1),
    },
}

_active = dict(TUNED)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_config(kernel: str, D: int, S: int = 1) -> LaunchConfig:
    """The untuned heuristic: about 4096 fp32 values per tensor per program (phase 1: S_PAD * BLOCK_D per token,
    so one token at S = 4, D = 1024; merges: up to 64 tokens), one warp per 512 (phase 1) or 1024 (merges) of
    them, 4 <= warps <= 16, 4 backward programs per SM. Phase 1's backward streams D in chunks: S_PAD * block_t *
    chunk_d = 2048 values per chunk (one token and chunk_d = 512 at S = 4, D = 1024), one warp per 512 of them;
    one token per tile keeps a program's tile (S + N rows of D, read twice) small enough to stay in L2 between
    its two passes."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}.")
    kernel = UNTUNED_AS.get(kernel, kernel)  # a kernel with a norm fused: the heuristic of the one it extends
    per_token = _next_pow2(D) * (_next_pow2(S) if kernel.startswith("phase1") else 1)
    if kernel == "phase1_backward":
        block_t = 1 if per_token >= 2048 else min(2048 // per_token, 16)
        chunk_d = min(_next_pow2(D), max(16, 2048 // (_next_pow2(S) * block_t)))
        warps = min(max(_next_pow2(S) * block_t * chunk_d // 512, 4), 16)
        return LaunchConfig(block_t=block_t, num_warps=warps, programs_per_sm=4, chunk_d=chunk_d)
    if kernel.startswith("phase1"):
        block_t = min(max(1, 4096 // per_token), 16)
        warps = min(max(per_token * block_t // 512, 4), 16)
    else:
        block_t = min(max(1, 4096 // per_token), 64)
        warps = min(max(per_token * block_t // 1024, 4), 16)
    return LaunchConfig(block_t=block_t, num_warps=warps)


def config_for(kernel: str, D: int, dtype: torch.dtype, S: int = 1, N: int = 1) -> LaunchConfig:
    """The config a kernel launches with at hidden size D, S queries and N sources of dtype (see the module
    docstring): the tuned entry at the nearest N, else that of the kernel it extends (UNTUNED_AS), else
    default_config (the extended kernel's)."""
    for name in (kernel, UNTUNED_AS.get(kernel)):
        by_sources = _active.get((name, _next_pow2(D), _next_pow2(S), _dtype_name(dtype)))
        if by_sources:
            return by_sources[min(by_sources, key=lambda n: (abs(n - N), n))]
    return default_config(kernel, D, S)


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


def use_tuned(table: dict) -> None:
    """Replace the active table (a dict shaped like TUNED); `use_tuned(TUNED)` restores the built-in one."""
    for (kernel, block_d, s_pad, dtype), by_sources in table.items():
        if kernel not in KERNELS or not by_sources:
            raise ValueError(f"bad table entry {(kernel, block_d, s_pad, dtype)}: kernel must be one of {KERNELS} "
                             "and map source counts to LaunchConfigs.")
        for config in by_sources.values():
            check_config(config)
    _active.clear()
    _active.update({key: dict(value) for key, value in table.items()})


def table_from_json(entries: list[dict]) -> dict:
    """The table from the "table" list of benchmarks/results/attnres_tune.json (one dict per tuned shape:
    kernel, block_d, s_pad, dtype, sources, config). Entries of phase 1's backward without a chunk_d were tuned
    for its earlier form and are left out (default_config applies to them)."""
    table = {}
    for e in entries:
        if e["kernel"] in CHUNKED and "chunk_d" not in e["config"]:
            continue  # tuned for the kernel before it streamed D in chunks: its best config no longer applies
        key = (e["kernel"], int(e["block_d"]), int(e["s_pad"]), e["dtype"])
        table.setdefault(key, {})[int(e["sources"])] = LaunchConfig(**e["config"])
    return table


def load_tuned(path: str | Path) -> dict:
    """Apply the configs measured by benchmarks/attnres_tune.py (its JSON file) to every later launch, on top of
    the built-in TUNED: the file's entries replace the built-in ones of their (kernel, BLOCK_D, S_PAD, dtype)
    keys, and the keys it lacks (e.g. kernels a `--kernels` run left out) keep the built-in ones. Returns the
    file's table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tuner results at {path}; write them with `python benchmarks/attnres_tune.py "
                                f"--out {path}` on the GPU, or leave the option out to use the built-in table.")
    table = table_from_json(json.loads(path.read_text())["table"])
    use_tuned({**TUNED, **table})
    return table
