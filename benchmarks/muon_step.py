"""Optimizer step time: nanokimi Muon, eager and CUDA-graph captured, beside torch.optim.Muon and fused AdamW.

Matrix sets: GPT-2-124M's 48 hidden matrices (12 layers x qkv 2304x768, attn-out 768x768, fc 3072x768,
proj 768x3072), Muon alone; and the bench-kl-900m model (nanokimi.build_model; skipped with a message if
unavailable) through build_optimizer, Muon + AdamW. Gradients are random (no forward/backward); each row is
the median of `--iters` steps after warmup, timed with CUDA events, so an eager step bound by the CPU's
kernel launches shows its wall time. Prints one table and writes benchmarks/results/muon_step.json.
`--profile` adds, for the 124M set, the top 15 kernels by self device time and a per-category sum
(GEMM, elementwise, foreach, reduction, copy, other) of the eager and the captured step. The "NS method"
column says which Newton-Schulz form (classic or gram) each nanokimi row used for how many matrices;
`--counts` prints, without timing anything, the GEMM FLOPs and elementwise bytes per shape of the previous
step (classic NS, five separate elementwise passes) and the current one, and the Newton-Schulz batches and
kernel launches before and after cross-shape batching (one batch per block shape, baddbmm polynomials) and now.
The 124M (and --quick) set also times the captured step under each option in VARIANTS (Muon's overlap_passes,
side_stream, combo_kernels and stream_priorities turned off, cuBLASLt; `--variants` picks), each first checked
against the default's one-step update (VARIANT_BOUND);
`--profile` then also profiles the fastest one if it beats the default, and prints each captured profile's
timeline per graph replay (span, busy time, per stream; `--trace-dir` keeps the chrome traces).

    python benchmarks/muon_step.py                # GPU
    python benchmarks/muon_step.py --profile      # GPU, plus where the time goes
    python benchmarks/muon_step.py --profile --skip-model --variants "no side_stream"   # 124M, one variant
    python benchmarks/muon_step.py --quick        # tiny CPU smoke run, seconds (the captured rows fall back)
    python benchmarks/muon_step.py --counts       # FLOP and byte counts of the 124M set, old vs new (CPU)
"""
import argparse
import contextlib
import datetime
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from perf_common import git_commit, median_ms, results_path  # noqa: E402

from nanokimi.ops.newton_schulz import GRAM_SEGMENT, choose_method, newton_schulz_flops, segments  # noqa: E402
from nanokimi.optim import CapturedStep, Muon, build_optimizer, matrix_blocks  # noqa: E402

TOP_KERNELS = 15
CATEGORIES = (  # first match wins; matched against the lower-cased kernel name
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "cublas", "bmm", "addmm")),
    ("foreach", ("multi_tensor_apply", "foreach")),
    ("reduction", ("reduce", "norm")),
    ("copy", ("copy", "memcpy", "memset")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill")),
)


def gpt2_shapes(layers=12, d=768):
    return [shape for _ in range(layers) for shape in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


# Elementwise bytes per fp32 parameter of one step (bf16 Newton-Schulz input and output):
OLD_BYTES = {"momentum": 12, "weight decay": 8, "Nesterov + cast": 10, "normalise": 6, "update": 10}
NEW_BYTES = {"momentum + Nesterov + cast": 14, "decay + update": 10}


def ns_flops(shapes, steps=5, method="classic"):
    """GEMM FLOPs of the Newton-Schulz iterations over `shapes`; method "auto" is what nanokimi's Muon runs."""
    total = 0
    for shape in shapes:
        count = shape[0] if len(shape) == 3 else 1
        total += count * newton_schulz_flops(shape[-2:], steps, choose_method(shape[-2:], steps, method))
    return total


def method_summary(opt):
    """'classic x12, gram x36' for a nanokimi Muon (or a CapturedStep/OptimizerSet around one), else ''."""
    inner = getattr(opt, "optimizer", opt)
    muon = getattr(inner, "optimizers", {}).get("muon", inner)
    if not isinstance(muon, Muon):
        return ""
    counts, methods = {}, muon.last_methods()
    for group in muon.param_groups:
        for p in group["params"]:
            for block in matrix_blocks(p, group["heads"], group["split"]):
                method = methods.get(tuple(block.shape[-2:]), "?")
                counts[method] = counts.get(method, 0) + block.numel() // math.prod(block.shape[-2:])
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def print_counts(shapes, steps=5):
    """GEMM FLOPs and elementwise bytes per distinct shape, previous step vs current step."""
    print(f"{'shape':>12} {'count':>5} {'method':>8} {'GFLOP old':>10} {'GFLOP new':>10} {'saved':>6} "
          f"{'MB old':>8} {'MB new':>8}")
    totals = [0, 0, 0, 0]
    for shape in sorted(set(shapes), key=shapes.index):
        count, numel = shapes.count(shape), shape[0] * shape[1]
        old, new = ns_flops([shape], steps) * count, ns_flops([shape], steps, "auto") * count
        old_mb, new_mb = sum(OLD_BYTES.values()) * numel * count / 1e6, sum(NEW_BYTES.values()) * numel * count / 1e6
        totals = [t + v for t, v in zip(totals, (old, new, old_mb, new_mb))]
        print(f"{str(shape):>12} {count:>5} {choose_method(shape, steps):>8} {old / 1e9:>10.1f} {new / 1e9:>10.1f} "
              f"{1 - new / old:>6.0%} {old_mb:>8.0f} {new_mb:>8.0f}")
    print(f"{'total':>12} {len(shapes):>5} {'':>8} {totals[0] / 1e9:>10.1f} {totals[1] / 1e9:>10.1f} "
          f"{1 - totals[1] / totals[0]:>6.0%} {totals[2]:>8.0f} {totals[3]:>8.0f}")
    print(f"bytes per parameter: old {sum(OLD_BYTES.values())} {OLD_BYTES}; "
          f"new {sum(NEW_BYTES.values())} {NEW_BYTES}")
    return {"gflop_old": totals[0] / 1e9, "gflop_new": totals[1] / 1e9, "mb_old": totals[2], "mb_new": totals[3]}


def launches(gram_batches, steps=5, per_shape=False):
    """(GEMM, other) kernel launches of one Newton-Schulz call: a classic batch (gram_batches=0) or a group of
    that many gram batches of one short side. per_shape: the previous plan (one call per block shape, so
    groups of one; each polynomial a baddbmm copy + GEMM + diagonal add; the 1 / n a separate scaling op);
    now the start (_start, one op) writes the first polynomial's operands with the 1 / n, and each polynomial
    is a GEMM between two small ops on the diagonals only (the first needs just the second)."""
    chunks = segments(steps, GRAM_SEGMENT) if gram_batches else [1] * steps
    big = 2 * max(gram_batches, 1)  # each batch's Gram and final product with X_0, per segment
    gemms = sum(big + 4 * m - 3 for m in chunks)  # s x s: R^2 per step, P R P and P Q per further step
    other = 2 + 2 * steps if per_shape else 2 * steps
    return gemms, other


def print_plan(shapes, steps=5):
    """Newton-Schulz batches of Muon's plan for `shapes`, with kernel launches before and after."""
    batches = {}  # (method, shape) -> matrices: Muon's batches (muon_fast.plan_step), one per block shape
    for shape in shapes:
        batches[choose_method(shape, steps), shape] = batches.get((choose_method(shape, steps), shape), 0) + 1
    groups = {}
    for (method, (rows, cols)), count in batches.items():
        key = ("gram", min(rows, cols)) if method == "gram" else ("classic", (rows, cols))
        groups.setdefault(key, []).append(((rows, cols), count))
    before, after = [0, 0], [0, 0]
    print("Newton-Schulz calls (batches stacked as [N, rows, cols]):")
    for (method, _), batches in groups.items():
        matrices = sum(n for _, n in batches)
        print(f"  {method:<8} " + " + ".join(f"{shape} x{n}" for shape, n in batches) +
              f": s x s products over {matrices} matrices")
        new = launches(len(batches) if method == "gram" else 0, steps)
        after = [a + v for a, v in zip(after, new)]
    for shape in sorted(set(shapes), key=shapes.index):
        old = launches(1 if choose_method(shape, steps) == "gram" else 0, steps, per_shape=True)
        before = [b + v for b, v in zip(before, old)]
    print(f"kernel launches per step: before (one call per block shape) {before[0]} GEMM + {before[1]} other; "
          f"now {after[0]} GEMM + {after[1]} other")
    return {"launches_before": before, "launches_now": after}


def with_random_grads(shapes, device, seed=None):
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, device=device, generator=generator) * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    return params


# Muon's execution options (OptimConfig's muon_* fields) turned off, each a captured row beside the default
# (name -> Muon keyword arguments). Options that lost such an A/B are deleted and logged in docs/perf-log.md.
VARIANTS = {
    "no overlap_passes": {"overlap_passes": False},
    "no side_stream": {"side_stream": False},
    "no combo_kernels": {"combo_kernels": False},
    "no stream_priorities": {"stream_priorities": False},
    "cublaslt": {"blas": "cublaslt"},
}
# Options that are not Muon's: "blas" sets torch's preferred BLAS library (cuBLAS or cuBLASLt) while the row's
# optimizer is made, warmed up, captured and timed.
# Largest relative difference of any parameter's one-step update from the default's: every variant does the same
# arithmetic (combo kernels may fuse it differently, a bf16 rounding at most).
VARIANT_BOUND = 5e-2


@contextlib.contextmanager
def blas_library(name):
    """torch's preferred BLAS library set to `name` ("cublas" or "cublaslt") inside, restored after; None: unchanged."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def muon_options(options):
    """(Muon's keyword arguments, the BLAS library) of a VARIANTS entry."""
    options = dict(options)
    return options, options.pop("blas", None)


def one_step_update(shapes, device, lr, options):
    """(the update of every param after one eager Muon step with `options`, seconds it took, compiles included)."""
    params = with_random_grads(shapes, device, seed=0)
    start = [p.detach().clone() for p in params]
    release(device)
    began = time.perf_counter()
    options, blas = muon_options(options)
    with blas_library(blas if device.type == "cuda" else None):
        Muon(params, lr=lr, **options).step()
    release(device)
    seconds = time.perf_counter() - began
    return [p.detach() - s for p, s in zip(params, start)], seconds


def check_variant(shapes, device, lr, options, reference):
    """Max relative difference of the variant's one-step updates from the default's (raises past VARIANT_BOUND)
    and the variant's first step in seconds (its compiles)."""
    updates, seconds = one_step_update(shapes, device, lr, options)
    worst = max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(updates, reference))
    if not worst < VARIANT_BOUND:
        raise RuntimeError(f"Muon({options}) moved a parameter {worst:.2e} away from the default's update "
                           f"(bound {VARIANT_BOUND}); its row would time a different optimizer")
    return worst, seconds


def unbound_2d_shapes(shapes):
    return [tuple(s[-2:]) for s in shapes for _ in range(s[0] if len(s) == 3 else 1)]


def captured(opt, warmup):
    """CapturedStep around opt, quiet about the CPU fallback (the --quick run has no GPU to capture on)."""
    step = CapturedStep(opt, warmup_steps=max(1, min(3, warmup)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step.step()
    return step


def graph_note(name, opt):
    """The row name, marked when a CapturedStep ran eagerly (CPU, or a failed capture: the reason is printed)."""
    if isinstance(opt, CapturedStep) and not opt.captured:
        print(f"[note] {name}: not captured ({opt.failed}); the row times the eager step")
        return f"{name} [eager fallback]"
    return name


def row(set_name, optimizer, params, ms, flops=None, matrices=None, methods="", variant=None):
    if matrices is None:
        matrices = sum(p.shape[0] if p.ndim == 3 else 1 for p in params)
    return {"set": set_name, "optimizer": optimizer, "variant": variant, "matrices": matrices,
            "params_M": round(sum(p.numel() for p in params) / 1e6, 2), "step_ms": round(ms, 3),
            "ns_tflops": round(flops / ms / 1e9, 1) if flops else None, "ns_methods": methods}


def release(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_matrix_set(set_name, shapes, device, warmup, iters, lr=0.02, variants=VARIANTS):
    """nanokimi Muon eager and captured (the default, then each of `variants`, checked against the default's
    update first), torch.optim.Muon and AdamW, each on its own copy of the shapes."""
    flops, ours = ns_flops(shapes), ns_flops(shapes, method="auto")
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    checks = {}
    if variants:
        reference, seconds = one_step_update(shapes, device, lr, {})
        checks["default"] = (0.0, seconds)
        for name, options in variants.items():
            checks[name] = check_variant(shapes, device, lr, options, reference)
            print(f"[check] {name}: update within {checks[name][0]:.1e} of the default's "
                  f"(first step {checks[name][1]:.1f} s)")
        del reference
        release(device)
    candidates = [
        ("nanokimi eager", lambda ps: Muon(ps, lr=lr), shapes, ours, None),
        ("nanokimi captured (graph)", lambda ps: captured(Muon(ps, lr=lr), warmup), shapes, ours, "default"),
    ]
    for name, options in variants.items():
        candidates.append((f"nanokimi captured + {name}",
                           lambda ps, options=muon_options(options)[0]: captured(Muon(ps, lr=lr, **options), warmup),
                           shapes, ours, name))
    if hasattr(torch.optim, "Muon"):
        candidates.append(("torch.optim.Muon", lambda ps: torch.optim.Muon(
            ps, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
            unbound_2d_shapes(shapes), flops, None))
    candidates.append((f"AdamW {'fused' if fused.get('fused') else 'foreach'}",
                       lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, **fused), shapes, None, None))
    rows = []
    for name, make, its_shapes, its_flops, variant in candidates:
        params = with_random_grads(its_shapes, device)
        with blas_library(muon_options(variants.get(variant, {}))[1] if device.type == "cuda" else None):
            opt = make(params)
            ms = median_ms(opt.step, device, warmup, iters)
        rows.append(row(set_name, graph_note(name, opt), params, ms, its_flops, methods=method_summary(opt),
                        variant=variant))
        if variant in checks:
            rows[-1]["check_rel"], rows[-1]["first_step_s"] = round(checks[variant][0], 6), round(checks[variant][1], 2)
        del params, opt
        release(device)
    return rows


def bench_model(preset, device, warmup, iters, lr=1e-3):
    """A whole nanokimi model through build_optimizer (eager, captured), and its peers on the same tensors."""
    try:
        from nanokimi import ModelConfig, build_model
        model = build_model(ModelConfig.preset(preset)).to(device)
    except Exception as error:  # the model API may not exist on this branch yet
        print(f"[skip] {preset}: could not build the model ({type(error).__name__}: {error})")
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    muon_shapes = None
    for name, wrap in (("nanokimi eager (Muon+AdamW)", lambda o: o),
                       ("nanokimi captured (graph)", lambda o: captured(o, warmup))):
        opt_set = build_optimizer(model, "muon", lr=lr)
        muon = opt_set.optimizers["muon"]
        muon_shapes = [tuple(p.shape) for g in muon.param_groups for p in g["params"]]
        step = wrap(opt_set)
        ms = median_ms(step.step, device, warmup, iters)
        rows.append(row(preset, graph_note(name, step), params, ms, ns_flops(muon_shapes, method="auto"),
                        matrices=len(unbound_2d_shapes(muon_shapes)), methods=method_summary(step)))
        del opt_set, muon, step
        release(device)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, **fused)
    rows.append(row(preset, "AdamW fused, all params", params, median_ms(adamw.step, device, warmup, iters),
                    matrices=None))
    del adamw, model, params
    release(device)
    if hasattr(torch.optim, "Muon"):
        matrices = with_random_grads(unbound_2d_shapes(muon_shapes), device)
        peer = torch.optim.Muon(matrices, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
        ms = median_ms(peer.step, device, min(warmup, 1), min(iters, 5))  # ~0.8 s a step: fewer of them
        rows.append(row(preset, "torch.optim.Muon (Muon's matrices)", matrices, ms, ns_flops(muon_shapes)))
        del matrices, peer
        release(device)
    return rows


def category(kernel_name):
    lowered = kernel_name.lower()
    return next((name for name, keys in CATEGORIES if any(k in lowered for k in keys)), "other")


def profile_step(step, device, steps=5, trace=None):
    """Top kernels by self device time (CPU time on the CPU) over `steps` steps, per step, and a category sum;
    on CUDA also the per-stream timeline of each graph replay (graph_timeline), the chrome trace kept at `trace`
    (a path) when given."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(event):
        if device.type == "cuda":
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        return event.self_cpu_time_total

    kernels = [e for e in events if self_us(e) > 0 and (device.type == "cpu" or e.device_type.name == "CUDA")]
    kernels.sort(key=self_us, reverse=True)
    top = [{"kernel": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": round(self_us(e) / steps / 1e3, 4),
            "category": category(e.key)} for e in kernels[:TOP_KERNELS]]
    categories = {}
    for e in kernels:
        categories[category(e.key)] = categories.get(category(e.key), 0.0) + self_us(e) / steps / 1e3
    cpu_ms = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    result = {"top": top, "categories_ms": {k: round(v, 4) for k, v in sorted(categories.items())},
              "cpu_ms_per_step": round(cpu_ms, 3)}
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as folder:
            path = Path(trace) if trace else Path(folder) / "trace.json"
            prof.export_chrome_trace(str(path))
            timeline = graph_timeline(json.loads(path.read_text()))
        if timeline:
            result["timeline"] = timeline
    return result


def busy_ms(intervals):
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def graph_timeline(trace):
    """Per CUDA-graph replay in a chrome trace (its kernels share the launch's correlation id), medians over the
    replays: span (first kernel start to last kernel end), the union of all kernels' busy time, and per stream
    (ordered by GEMM time, so the first is the Newton-Schulz products') its kernels, busy time and GEMM time.
    None for a trace without graph replays (an eager step launches each kernel on its own)."""
    launches = {}
    for event in trace.get("traceEvents", []):
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event:
            launches.setdefault(event.get("args", {}).get("correlation"), []).append(event)
    replays = [events for events in launches.values() if len(events) >= 10]
    if not replays:
        return None
    spans, unions, streams = [], [], {}
    for events in replays:
        intervals = [(e["ts"], e["ts"] + e["dur"]) for e in events]
        spans.append((max(end for _, end in intervals) - min(start for start, _ in intervals)) / 1e3)
        unions.append(busy_ms(intervals))
        for stream in {e["args"].get("stream") for e in events}:
            mine = [e for e in events if e["args"].get("stream") == stream]
            entry = streams.setdefault(stream, {"kernels": [], "busy_ms": [], "gemm_ms": []})
            entry["kernels"].append(len(mine))
            entry["busy_ms"].append(busy_ms([(e["ts"], e["ts"] + e["dur"]) for e in mine]))
            entry["gemm_ms"].append(sum(e["dur"] for e in mine if category(e["name"]) == "gemm") / 1e3)
    median = lambda values: round(sorted(values)[len(values) // 2], 4)  # noqa: E731
    per_stream = sorted(({"stream": stream, **{k: median(v) for k, v in entry.items()}}
                         for stream, entry in streams.items()), key=lambda e: -e["gemm_ms"])
    return {"replays": len(replays), "span_ms": median(spans), "busy_union_ms": median(unions),
            "streams": per_stream}


def best_variant(rows):
    """The fastest captured variant row's variant name, if it beats the default's captured row; else None."""
    timed = {r["variant"]: r["step_ms"] for r in rows if r.get("variant") and "[eager fallback]" not in r["optimizer"]}
    faster = [v for v in timed if v != "default" and timed[v] < timed.get("default", float("inf"))]
    return min(faster, key=timed.get) if faster else None


def profile_matrix_set(set_name, shapes, device, warmup, lr=0.02, variant=None, trace_dir=None):
    """Profiles of the eager and captured default step, and of the captured `variant` (a VARIANTS name); with
    trace_dir, each profile's chrome trace is kept there (trace_<n>.json, in row order)."""
    result = {}
    options, blas = muon_options(VARIANTS.get(variant, {}))
    makers = [("nanokimi eager", lambda ps: Muon(ps, lr=lr), None),
              ("nanokimi captured (graph)", lambda ps: captured(Muon(ps, lr=lr), warmup), None)]
    if variant is not None:
        makers.append((f"nanokimi captured + {variant}", lambda ps: captured(Muon(ps, lr=lr, **options), warmup),
                       blas))
    for n, (name, make, library) in enumerate(makers):
        params = with_random_grads(shapes, device)
        with blas_library(library):
            opt = make(params)
            trace = None if trace_dir is None else Path(trace_dir) / f"trace_{n}.json"
            result[name] = profile_step(opt.step, device, trace=trace)
        del params, opt
        release(device)
    print_profile(set_name, result)
    return {set_name: result}


def print_profile(set_name, result):
    for name, prof in result.items():
        print(f"\nprofile: {set_name}, {name} (per step; CPU self time {prof['cpu_ms_per_step']} ms)")
        print("  by category: " + ", ".join(f"{k} {v:.3f} ms" for k, v in prof["categories_ms"].items()))
        for k in prof["top"]:
            print(f"  {k['ms_per_step']:>8.4f} ms  {k['calls_per_step']:>6.1f}x  {k['category']:<11} {k['kernel'][:80]}")
        if "timeline" in prof:
            t = prof["timeline"]
            print(f"  timeline (median of {t['replays']} replays): span {t['span_ms']:.3f} ms, "
                  f"any kernel running {t['busy_union_ms']:.3f} ms")
            for entry in t["streams"]:
                print(f"    stream {entry['stream']}: {entry['kernels']} kernels, busy {entry['busy_ms']:.3f} ms, "
                      f"GEMMs {entry['gemm_ms']:.3f} ms")


def print_table(rows):
    header = (f"{'set':<16} {'optimizer':<66} {'matrices':>8} {'params M':>9} {'step ms':>9} {'NS TFLOP/s':>10}"
              f"  NS method")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['set']:<16} {r['optimizer']:<66} {r['matrices'] if r['matrices'] is not None else '':>8} "
              f"{r['params_M']:>9} {r['step_ms']:>9.3f} {r['ns_tflops'] if r['ns_tflops'] is not None else '':>10}"
              f"  {r['ns_methods']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run (seconds)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/muon_step.json; --quick writes to a temp folder)")
    parser.add_argument("--skip-model", action="store_true", help="only the GPT-2-124M matrix set")
    parser.add_argument("--profile", action="store_true",
                        help=f"also profile the 124M set: top {TOP_KERNELS} kernels and a per-category sum")
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="with --profile: keep each profiled row's chrome trace there (trace_<n>.json)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated captured-step variants to time beside the default (of {list(VARIANTS)}; "
                             "'' for none)")
    parser.add_argument("--counts", action="store_true",
                        help="only print the 124M set's GEMM FLOPs and elementwise bytes, old vs new step (no timing)")
    args = parser.parse_args(argv)
    if args.counts:
        return {**print_counts(gpt2_shapes()), **print_plan(gpt2_shapes())}
    if args.out is None:
        args.out = results_path("muon_step", args.quick)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v}

    if args.quick:
        device, warmup, iters = torch.device("cpu"), 1, 1
        set_name, shapes = "gpt2-tiny", gpt2_shapes(layers=1, d=16) + [(4, 32, 16)]
        rows = bench_matrix_set(set_name, shapes, device, warmup, iters, variants=variants)
    else:
        if not torch.cuda.is_available():
            sys.exit("muon_step.py needs CUDA (use --quick for the CPU smoke run)")
        device, warmup, iters = torch.device("cuda"), args.warmup, args.iters
        set_name, shapes = "gpt2-124m", gpt2_shapes()
        rows = bench_matrix_set(set_name, shapes, device, warmup, iters, variants=variants)
        if not args.skip_model:
            rows += bench_model("bench-kl-900m", device, warmup, iters)
    print_table(rows)
    profiles = None
    if args.profile:
        if args.trace_dir:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
        profiles = profile_matrix_set(set_name, shapes, device, warmup, variant=best_variant(rows),
                                      trace_dir=args.trace_dir)
    result = {"benchmark": "muon_step", "quick": args.quick,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "warmup": warmup, "iters": iters, "rows": rows}
    if profiles:
        result["profile"] = profiles
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
