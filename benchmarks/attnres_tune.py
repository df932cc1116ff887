"""Check the launch-config heuristic of the Attention Residuals Triton kernels (nanokimi/ops/attnres/launch.py)
against the fastest config of a grid, per kernel and shape.

At the bench-kl-900m residual stream's shapes (B * T = 16384 tokens, D = 1024, 32 sublayers in 8 blocks of S = 4):
phase 1 runs at S = 4 queries over N = 1..8 sources (blocks 0..7: phase1_*, or phase1_norm_* with the block's
first sublayer's RMSNorm fused in, as the model runs by default) and at S = 1 over N = 9 (the final read,
phase1_*), and accumulate+merge once per sublayer that is not first in its block (24 per step: merge_*, or
merge_norm_* with the next sublayer's RMSNorm fused in, as the model runs by default). For fp32 and bf16
sources (the stream's dtype; sublayer outputs are bf16, as under autocast) each kernel is timed
(triton.testing.do_bench, median) over a grid of configs, as the model runs it (phase 1's backward adds
into existing gradient sums, except at the final read, the first in backward):
    phase1_forward, phase1_norm_forward, merge_forward, merge_norm_forward: block_t x num_warps, with 4..64 tile
                     values per thread
    merge_backward, merge_norm_backward: the same x programs_per_sm (2, 4, 8)
    phase1_backward, phase1_norm_backward: block_t (1, 2, 4) x chunk_d (128..1024) x num_warps, 8..32 chunk
                     values per thread, x programs_per_sm (2, 4, 8); where one chunk covers D, each also with
                     sums_in_registers (the programs' query / norm-weight gradient sums held in registers)
The whole grid runs at the largest N of each S; then phase 1's backward kernels try the 6 fastest configs again
with prefetch 1 and 2 (the rows of the tile that many tiles ahead asked into L2: GPU only); the other N try the 3
fastest configs of it all and the default. Every
config's outputs are checked against the default config's (fp32 1e-5, bf16 1e-2, query gradients summed over
tokens in another order 1e-4); one that fails to compile, run or check is skipped with a note, and past
--budget-s the remaining shapes time the default only. Kernels are compiled first by worker processes in
parallel (Triton's on-disk cache then serves this process).

Prints one table (kernel, shape, best config, ms, GB/s, default ms) and the per-step totals (with the norms fused:
merge_norm_* and phase1_norm_* for the blocks, the default; and unfused: merge_* and phase1_*, whose norms then
run as torch kernels not counted here). "default" is the heuristic's config (`launch.config_for`): its ms against
the best one's says whether the heuristic still holds on this GPU and shape; where it does not, change its rules
(and the test that pins them). Writes the JSON file (device, date, commit, every measurement, the best config per
case) to a temp folder unless --out is given: tuner grids are not kept in benchmarks/results.

    python benchmarks/attnres_tune.py            # GPU; under 4 minutes on an H100
    python benchmarks/attnres_tune.py --quick    # CPU smoke run in Triton's interpreter: tiny shapes, 2 configs
    python benchmarks/attnres_tune.py --kernels phase1_norm_backward,phase1_backward --dtypes bfloat16
                                                 # only these
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

if "--quick" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from perf_common import git_commit, results_path, short_error  # noqa: E402

from nanokimi.ops.attnres import two_phase  # noqa: E402
from nanokimi.ops.attnres.launch import CHUNKED, GRID_STRIDE, KERNELS, LaunchConfig, config_for  # noqa: E402

EPS = 1e-6
TOP = 3  # configs of the full grid that the other source counts try
PREFETCH_TOP, PREFETCH = 6, (1, 2)  # phase 1's backward: its fastest configs again with these prefetch distances
MERGE_KERNELS = ("merge_forward", "merge_backward", "merge_norm_forward", "merge_norm_backward")
# the kernels with a sublayer's pre-norm fused: the model runs these or the plain ones they extend, not both
FUSED_NORM = {"merge_norm_forward", "merge_norm_backward", "phase1_norm_forward", "phase1_norm_backward"}
EXTENDS = {"merge_norm_forward": "merge_forward", "merge_norm_backward": "merge_backward",  # the kernel a fused
           "phase1_norm_forward": "phase1_forward", "phase1_norm_backward": "phase1_backward"}  # one replaces


class Case(NamedTuple):
    """One kernel at one shape: dtype of the sources (phase 1) or stream (merges); S queries, N sources;
    accumulate: phase 1's backward adds into gradient sums; calls: how often a training step runs it."""
    kernel: str
    dtype: torch.dtype
    S: int = 1
    N: int = 1
    accumulate: bool = False
    calls: int = 1

    def label(self):
        shape = f"S={self.S} N={self.N}" if self.kernel.startswith("phase1") else "-"
        return f"{self.kernel:20} {str(self.dtype).removeprefix('torch.'):8} {shape:9}"


def model_cases(sublayers, blocks, dtypes, kernels=None):
    """The kernel calls of one training step of a block-AttnRes stream with `sublayers` in `blocks` blocks (only
    those of `kernels`, if given)."""
    size = math.ceil(sublayers / min(blocks, sublayers))
    sizes = [min(size, sublayers - start) for start in range(0, sublayers, size)]  # queries per block
    cases = []
    for dtype in dtypes:
        for kernel in ("phase1_forward", "phase1_backward", "phase1_norm_forward", "phase1_norm_backward"):
            for k, S in enumerate(sizes):  # block k reads the embedding and k block sums
                cases.append(Case(kernel, dtype, S, k + 1, accumulate=kernel.endswith("backward")))
            if kernel not in FUSED_NORM:
                cases.append(Case(kernel, dtype, 1, len(sizes) + 1))  # the final read: first in backward
        merges = sum(S - 1 for S in sizes)
        cases += [Case(kernel, dtype, calls=merges) for kernel in MERGE_KERNELS]
    return [case for case in cases if kernels is None or case.kernel in kernels]


def config_grid(case, D, quick):
    """Configs to try for case: tiles of 4..64 values per thread (phase 1's backward: chunks of 8..32 values
    per thread, 1..4 tokens, chunk_d 128..1024), the heuristic's config (launch.config_for) first."""
    first = [config_for(case.kernel, D, case.dtype, case.S, case.N)]
    per_token = _next_pow2(D) * (_next_pow2(case.S) if case.kernel.startswith("phase1") else 1)
    grid = []
    if case.kernel in CHUNKED:  # streams D in chunks: S_PAD * block_t * chunk_d values per step
        s_pad = _next_pow2(case.S)
        for block_t in (1, 2, 4):
            for chunk_d in (128, 256, 512, 1024):
                for warps in (2, 4, 8, 16):
                    if chunk_d <= _next_pow2(D) and 8 <= s_pad * block_t * chunk_d / (32 * warps) <= 32:
                        # one chunk over D: also with the program's gradient sums kept in registers
                        registers = (False, True) if chunk_d == _next_pow2(D) else (False,)
                        grid += [LaunchConfig(block_t, warps, 3, p, chunk_d, r) for r in registers for p in (2, 4, 8)]
    for block_t in (1, 2, 4, 8, 16, 32) if case.kernel not in CHUNKED else ():
        for warps in (2, 4, 8, 16):
            per_thread = per_token * block_t / (32 * warps)
            if not 4 <= per_thread <= 64:
                continue
            programs = (2, 4, 8) if case.kernel.endswith("backward") else (4,)
            grid += [LaunchConfig(block_t, warps, 3, p) for p in programs]
    configs = list(dict.fromkeys(first + grid))
    if quick:  # the default and one other
        others = [configs[0]._replace(num_warps=w) for w in (2, 4)]
        configs = [configs[0], next(c for c in configs[1:] + others if c != configs[0])]
    return configs


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def make_inputs(case, M, D, device):
    """Random inputs of case's kernel for M tokens; what phase 1's and the merge's backward read from their
    forward comes from the torch forms (so building inputs compiles no Triton kernel)."""
    g = torch.Generator(device=device).manual_seed(case.S * 100 + case.N)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    if case.kernel.startswith("phase1"):  # with the norm: an fp32 stream and mixtures, as the model's default
        values = [randn(M, D, dtype=case.dtype, scale=1 + n % 3) for n in range(case.N)]
        inputs = dict(values=values, rstds=[two_phase.source_rstd(v, EPS) for v in values],
                      qe=randn(case.S, D, scale=2 / D ** 0.5))
        if case.kernel.endswith("backward"):  # grad_mixtures[0]: of mixture 0, or of the fp32 normed input x0
            _, inputs["logits"], inputs["lse"] = two_phase._phase1_forward_stacked(inputs["qe"], inputs["rstds"],
                                                                                   values)
            inputs.update(grad_mixtures=[randn(M, D) for _ in range(case.S)], grad_lse=randn(M, case.S),
                          sums=[randn(M, D, dtype=case.dtype) for _ in range(case.N)] if case.accumulate else None)
            inputs["work_sums"] = None if inputs["sums"] is None else [s.clone() for s in inputs["sums"]]
        if case.kernel in FUSED_NORM:
            inputs["norm_weight"] = 1 + randn(D, scale=0.1)
        return inputs
    inputs = dict(partial=randn(M, D, dtype=case.dtype), out=randn(M, D, dtype=torch.bfloat16), mixture=randn(M, D),
                  lse=randn(M), qe=randn(D, scale=2 / D ** 0.5), norm_weight=1 + randn(D, scale=0.1))
    if case.kernel.endswith("backward"):  # grad_h: of h (merge) or of the fp32 normed input x (merge_norm)
        fused = case.kernel in FUSED_NORM
        inputs.update(new_partial=two_phase._accumulate(inputs["partial"], inputs["out"], case.dtype),
                      grad_h=randn(M, D, dtype=torch.float32 if fused else case.dtype),
                      grad_p=randn(M, D, dtype=case.dtype))
    return inputs


def runner(case, x, config):
    """run(check) -> the kernel's outputs; check=True works on fresh copies of anything it writes in place."""
    from nanokimi.ops.attnres.triton_phase1 import (phase1_backward, phase1_forward, phase1_norm_backward,
                                                    phase1_norm_forward)
    from nanokimi.ops.attnres.triton_phase2 import accumulate_merge_backward, accumulate_merge_forward

    first_norm = (None, x.get("norm_weight"), EPS, torch.float32)  # mixtures fp32, norm weight, eps, stream dtype
    if case.kernel == "phase1_forward":
        def run(check=False):
            mixtures, logits, lse = phase1_forward(x["qe"], x["rstds"], x["values"], config=config)
            return [*mixtures, logits, lse]
    elif case.kernel == "phase1_norm_forward":
        def run(check=False):
            outputs, logits, lse = phase1_norm_forward(x["qe"], x["rstds"], x["values"], *first_norm, config=config)
            return [*outputs, logits, lse]
    elif case.kernel in ("phase1_backward", "phase1_norm_backward"):
        def run(check=False):  # the sums over tokens first: grad qe (and grad norm_weight)
            sums = x["work_sums"] if not check or x["sums"] is None else [s.clone() for s in x["sums"]]
            args = (x["qe"], x["rstds"], x["values"], x["logits"], x["lse"], x["grad_mixtures"], x["grad_lse"], sums)
            if case.kernel == "phase1_backward":
                grad_qe, grads = phase1_backward(*args, config=config)
                return [grad_qe, *grads]
            grad_qe, grads, grad_norm_weight = phase1_norm_backward(*args, None, *first_norm, config=config)
            return [grad_qe, grad_norm_weight, *grads]
    else:
        norm = dict(norm_weight=x["norm_weight"], norm_eps=EPS) if case.kernel in FUSED_NORM else {}
        if case.kernel.endswith("forward"):
            def run(check=False):
                return list(accumulate_merge_forward(x["partial"], x["out"], x["mixture"], x["lse"], x["qe"],
                                                     case.dtype, EPS, config, **norm))
        else:
            def run(check=False):  # the sums over tokens first: grad qe (and grad norm_weight)
                grads = accumulate_merge_backward(x["new_partial"], x["mixture"], x["lse"], x["qe"], x["grad_p"],
                                                  x["grad_h"], torch.bfloat16, EPS, config, **norm)
                return [*grads[4:], *grads[:4]]
    return run


def moved_bytes(case, M, D):
    """Bytes a call must move at least (each source read once, each gradient sum read and written)."""
    es, tensor = torch.finfo(case.dtype).bits // 8, M * D
    if case.kernel in ("phase1_forward", "phase1_norm_forward"):  # with the norm, x0 (fp32) in mixture 0's place
        return case.N * tensor * es + case.S * tensor * 4 + M * (case.N + case.S * case.N + case.S) * 4
    if case.kernel in ("phase1_backward", "phase1_norm_backward"):
        grads = case.N * tensor * es * (2 if case.accumulate else 1)
        return case.N * tensor * es + case.S * tensor * 4 + grads + M * (case.N + case.S * case.N + 2 * case.S) * 4
    x_size = 4 if case.kernel in FUSED_NORM else es  # the fused kernels write / read the fp32 normed input instead of h
    if case.kernel.endswith("forward"):  # partial, out (bf16), mixture (fp32) in; new partial, h or x out
        return tensor * (es + 2 + 4 + es + x_size) + M * 4
    separate = 2 if case.dtype != torch.bfloat16 else 0  # new partial, mixture, grad h or x, grad p in; grads out
    return tensor * (es + 4 + x_size + es + 4 + es + separate) + 2 * M * 4


def rel(a, b):
    a, b = a.float(), b.float()
    scale = b.norm()
    return ((a - b).norm() / scale).item() if scale > 0 else a.norm().item()


def check(outputs, expected, case):
    """None if outputs match the default config's, else what differs."""
    summed = 0 if not case.kernel.endswith("backward") else 2 if case.kernel in FUSED_NORM else 1
    for i, (a, b) in enumerate(zip(outputs, expected)):
        summed_over_tokens = i < summed  # grad qe (and grad norm_weight) first
        bound = 1e-4 if summed_over_tokens else 1e-5 if b.dtype == torch.float32 else 1e-2
        error = rel(a, b)
        if not error < bound:  # also catches NaN
            return f"output {i} differs from the default config's by {error:.2e} (bound {bound:.0e})"
    return None


def time_ms(run, device, quick):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
    times = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _compile_task(task):
    """In a worker process: run one config once at a small token count, so Triton compiles it into its
    on-disk cache (the same kernel specialisations as at full size: token and tile counts stay multiples of 16)."""
    case, config, tokens, hidden, device = task
    try:
        runner(case, make_inputs(case, tokens, hidden, device), config)()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - reported, and the config is tried again in the main process
        return short_error(exc)


class Compiler:
    """Compiles configs ahead of timing in worker processes; without workers, timing compiles them itself."""

    def __init__(self, jobs, tokens, hidden, device, notes):
        self.tokens, self.hidden, self.device, self.notes, self.pool = tokens, hidden, device, notes, None
        if jobs > 0:
            try:
                spawn = multiprocessing.get_context("spawn")  # workers start CUDA themselves
                self.pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn)
            except Exception as exc:  # noqa: BLE001 - compile in this process instead
                notes.append(f"no compile workers ({short_error(exc)}): compiling while timing")

    def compile(self, work, deadline):
        if self.pool is None or not work:
            return
        futures = {self.pool.submit(_compile_task, (case, config, self.tokens, self.hidden, self.device)):
                   (case, config) for case, config in work}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
                error = future.result()
                if error:
                    case, config = futures[future]
                    self.notes.append(f"compile worker: {case.label().strip()} {fmt(config)}: {error}")
        except concurrent.futures.TimeoutError:
            self.notes.append("compile workers passed the time budget; the rest compile while timing")
        except Exception as exc:  # noqa: BLE001 - e.g. a worker died: compile in this process from here on
            self.notes.append(f"compile workers failed ({short_error(exc)}): compiling while timing")
            self.close()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def fmt(config):
    stages = f" s{config.num_stages}" if config.num_stages != 3 else ""
    chunk = f" c{config.chunk_d}" if config.chunk_d else ""
    registers = " r" if config.sums_in_registers else ""
    prefetch = f" f{config.prefetch}" if config.prefetch else ""
    return f"bt{config.block_t} w{config.num_warps} p{config.programs_per_sm}{chunk}{registers}{prefetch}{stages}"


def measure(case, configs, args, device, deadline, notes):
    """One row per config that compiled, ran and matched the default config's outputs: dicts with config, ms."""
    inputs = make_inputs(case, args.tokens, args.hidden, device)
    default = configs[0]
    rows = []
    expected = None
    for config in configs:
        if rows and time.monotonic() > deadline:
            notes.append(f"{case.label().strip()}: time budget reached after {len(rows)} of {len(configs)} configs")
            break
        try:
            run = runner(case, inputs, config)
            outputs = run(check=True)
            if config == default:
                expected = [o.clone() for o in outputs]
            elif expected is None:
                raise RuntimeError("the default config failed, so nothing to check against")
            else:
                problem = check(outputs, expected, case)
                if problem:
                    raise RuntimeError(problem)
            del outputs
            ms = time_ms(run, device, args.quick)
        except Exception as exc:  # noqa: BLE001 - skip this config, keep sweeping
            notes.append(f"{case.label().strip()} {fmt(config)} skipped: {short_error(exc)}")
            continue
        rows.append(dict(config=config, ms=ms, default=config == default))
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def tune(args, device, notes):
    cases = model_cases(args.sublayers, args.blocks, args.dtypes, args.kernels)
    start = time.monotonic()
    deadline = start + args.budget_s
    compiler = Compiler(args.jobs, args.compile_tokens if not args.quick else args.tokens, args.hidden, device, notes)
    results = {}
    try:
        # the full grid where each (kernel, dtype, S) has the most sources, and for the merges
        widest = {}
        for case in cases:
            key = (case.kernel, case.dtype, case.S)
            if key not in widest or case.N > widest[key].N:
                widest[key] = case
        first = list(widest.values())
        grids = {case: config_grid(case, args.hidden, args.quick) for case in first}
        compiler.compile([(case, c) for case in first for c in grids[case]], deadline)
        for case in first:
            results[case] = measure(case, grids[case], args, device, deadline, notes)
            print(f"{case.label()} {len(results[case])}/{len(grids[case])} configs ({time.monotonic() - start:.0f} s)",
                  flush=True)
        # phase 1's backward: the fastest configs again, with the next tiles prefetched into L2
        refined = {}
        for case in first:
            ranked = sorted(results[case], key=lambda r: r["ms"])
            if case.kernel in CHUNKED and device.type == "cuda" and ranked:
                refined[case] = [grids[case][0]] + [r["config"]._replace(prefetch=distance)
                                                    for r in ranked[:PREFETCH_TOP] for distance in PREFETCH]
        compiler.compile([(case, c) for case, configs in refined.items() for c in configs[1:]], deadline)
        for case, configs in refined.items():
            rows = measure(case, configs, args, device, deadline, notes)
            results[case] += [r for r in rows if not r["default"]]
            print(f"{case.label()} +{len(rows) - 1}/{len(configs) - 1} prefetch configs "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        # the other source counts: the default and the widest case's fastest configs
        rest = [case for case in cases if case not in results]
        for case in rest:
            ranked = sorted(results[widest[(case.kernel, case.dtype, case.S)]], key=lambda r: r["ms"])
            grids[case] = list(dict.fromkeys([config_for(case.kernel, args.hidden, case.dtype, case.S, case.N)]
                                             + [r["config"] for r in ranked[:1 if args.quick else TOP]]))
        compiler.compile([(case, c) for case in rest for c in grids[case]], deadline)
        for case in rest:
            configs = grids[case] if time.monotonic() < deadline else grids[case][:1]
            results[case] = measure(case, configs, args, device, deadline, notes)
            print(f"{case.label()} {len(results[case])}/{len(grids[case])} configs ({time.monotonic() - start:.0f} s)",
                  flush=True)
    finally:
        compiler.close()
    return cases, results, time.monotonic() - start


def summarise(cases, results, args):
    """Per case: best and default (the heuristic's) rows; the best configs as a list of dicts."""
    rows, table = [], []
    for case in cases:
        measured = results.get(case) or []
        if not measured:
            rows.append(dict(case=case, best=None, default=None))
            continue
        best = min(measured, key=lambda r: r["ms"])
        default = next((r for r in measured if r["default"]), None)
        rows.append(dict(case=case, best=best, default=default, tried=len(measured)))
        table.append(dict(kernel=case.kernel, block_d=_next_pow2(args.hidden),
                          s_pad=_next_pow2(case.S) if case.kernel.startswith("phase1") else 1,
                          dtype=str(case.dtype).removeprefix("torch."),
                          sources=case.N if case.kernel.startswith("phase1") else 1, config=best["config"]._asdict()))
    return rows, table


def print_report(rows, args):
    header = (f"{'kernel':20} {'dtype':8} {'shape':9} {'calls':>5} {'best config':16} {'ms':>8} {'GB/s':>7} "
              f"{'default ms':>10} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    total_best = total_default = 0.0
    for row in rows:
        case = row["case"]
        if row["best"] is None:
            print(f"{case.label()} {case.calls:>5} (no config ran)")
            continue
        best, default = row["best"], row["default"]
        gbps = moved_bytes(case, args.tokens, args.hidden) / (best["ms"] * 1e-3) / 1e9
        default_ms = default["ms"] if default else float("nan")
        total_best += case.calls * best["ms"]
        total_default += case.calls * (default_ms if default else best["ms"])
        print(f"{case.label()} {case.calls:>5} {fmt(best['config']):16} {best['ms']:>8.3f} {gbps:>7.0f} "
              f"{default_ms:>10.3f} {default_ms / best['ms']:>6.2f}x")
    # with the norms fused, a plain kernel's call is left out where a fused one replaces it (same dtype, S, N)
    replaced = {(EXTENDS[r["case"].kernel], r["case"].dtype, r["case"].S, r["case"].N) for r in rows
                if r["case"].kernel in FUSED_NORM}
    for dtype in args.dtypes:
        for label, fused in (("norms fused", True), ("norms unfused", False)):
            step = [r for r in rows if r["best"] and r["case"].dtype == dtype
                    and ((r["case"].kernel, dtype, r["case"].S, r["case"].N) not in replaced if fused
                         else r["case"].kernel not in FUSED_NORM)]
            best = sum(r["case"].calls * r["best"]["ms"] for r in step)
            default = sum(r["case"].calls * (r["default"] or r["best"])["ms"] for r in step)
            print(f"per training step, {str(dtype).removeprefix('torch.')} stream, {label}: AttnRes Triton kernels "
                  f"{default:.2f} ms with the heuristic's configs, {best:.2f} ms with the best measured")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run in Triton's interpreter: tiny shapes, "
                        "2 configs per kernel")
    parser.add_argument("--tokens", type=int, default=16384, help="B * T")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--sublayers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=8, help="attn_res_blocks")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="source / stream dtypes, comma-separated")
    parser.add_argument("--kernels", default=None,
                        help="only these kernels, comma-separated (default: all of " + ", ".join(KERNELS) + ")")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="after this many seconds, the remaining shapes time their default config only")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compile worker processes (default: one per CPU core but one, at most 16, on a GPU; "
                             "0 with --quick); 0: compile while timing")
    parser.add_argument("--compile-tokens", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/attnres_tune.json; --quick: a temp folder)")
    args = parser.parse_args()
    args.dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    if args.kernels is not None:
        args.kernels = [name.strip() for name in args.kernels.split(",") if name.strip()]
        unknown = [name for name in args.kernels if name not in KERNELS]
        if unknown or not args.kernels:
            parser.error(f"--kernels: unknown {unknown}; choose among {', '.join(KERNELS)}.")
    if args.quick:
        args.tokens, args.hidden, args.sublayers, args.blocks, args.budget_s = 16, 24, 4, 2, 120.0
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("needs a CUDA GPU (or --quick, which runs in Triton's CPU interpreter).")
    device = torch.device("cuda" if cuda else "cpu")
    if args.jobs is None:
        args.jobs = 0 if args.quick else min(16, max(1, (os.cpu_count() or 2) - 1))
    out = args.out or results_path("attnres_tune", True)  # a temp folder: grids are checks, not results

    notes = []
    cases, results, elapsed = tune(args, device, notes)
    rows, table = summarise(cases, results, args)
    print()
    print_report(rows, args)
    for note in notes:
        print(f"note: {note}")
    print(f"tuned in {elapsed:.0f} s")

    import triton
    report = dict(
        benchmark="attnres_tune",
        device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), quick=args.quick, elapsed_s=round(elapsed, 1),
        shape=dict(tokens=args.tokens, hidden=args.hidden, sublayers=args.sublayers, blocks=args.blocks),
        kernels=args.kernels or list(KERNELS),
        measurements=[dict(kernel=c.kernel, dtype=str(c.dtype).removeprefix("torch."), S=c.S, N=c.N,
                           accumulate=c.accumulate, calls=c.calls, config=r["config"]._asdict(), ms=r["ms"],
                           gbps=moved_bytes(c, args.tokens, args.hidden) / (r["ms"] * 1e-3) / 1e9,
                           default=r["default"])
                      for c in cases for r in results.get(c, [])],
        table=table, notes=notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
