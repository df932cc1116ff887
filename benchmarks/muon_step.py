"""Optimizer step time: nanokimi Muon beside torch.optim.Muon and fused AdamW, in the same run.

Matrix sets: GPT-2-124M's 48 hidden matrices (12 layers x qkv 2304x768, attn-out 768x768, fc 3072x768,
proj 768x3072) and the bench-kl-900m model (nanokimi.build_model; skipped with a message if unavailable).
Gradients are random (no forward/backward); each row is the median of `--iters` steps after warmup, timed with
CUDA events. Prints one table and writes benchmarks/results/muon_step.json.

    python benchmarks/muon_step.py            # GPU
    python benchmarks/muon_step.py --quick    # tiny CPU smoke run, seconds
"""
import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf_common import git_commit, results_path  # noqa: E402

from nanokimi.optim import Muon, build_optimizer  # noqa: E402


def gpt2_shapes(layers=12, d=768):
    return [shape for _ in range(layers) for shape in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def ns_flops(shapes, steps=5):
    """FLOPs of the Newton-Schulz iterations: per matrix and step, 2 s^2 l (gram) + 2 s^3 + 2 s^2 l."""
    total = 0
    for shape in shapes:
        count = shape[0] if len(shape) == 3 else 1
        s, l = sorted(shape[-2:])
        total += count * steps * (4 * s * s * l + 2 * s**3)
    return total


def median_step_ms(step, device, warmup, iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def with_random_grads(shapes, device):
    params = [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params




def bench_matrix_set(set_name, shapes, device, warmup, iters, lr=0.02):
    """Rows for nanokimi Muon (quintic, polar_express), torch.optim.Muon and fused AdamW on the same shapes."""
    rows = []
    flops = ns_flops(shapes)
    candidates = [
        ("nanokimi Muon quintic", lambda ps: Muon(ps, lr=lr), shapes),
        ("nanokimi Muon polar_express", lambda ps: Muon(ps, lr=lr, coefficients="polar_express"), shapes),
    ]
    if hasattr(torch.optim, "Muon"):
        candidates.append(("torch.optim.Muon", lambda ps: torch.optim.Muon(
            ps, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
            unbound_2d_shapes(shapes)))
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    candidates.append((f"AdamW {'fused' if fused.get('fused') else 'foreach'}",
                       lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, **fused), shapes))
    for name, make, its_shapes in candidates:
        params = with_random_grads(its_shapes, device)
        opt = make(params)
        ms = median_step_ms(opt.step, device, warmup, iters)
        is_muon = "Muon" in name
        rows.append({"set": set_name, "optimizer": name, "matrices": sum(p.shape[0] if p.ndim == 3 else 1
                                                                        for p in params),
                     "params_M": round(sum(p.numel() for p in params) / 1e6, 2), "step_ms": round(ms, 3),
                     "ns_tflops": round(flops / ms / 1e9, 1) if is_muon else None})
        del params, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def unbound_2d_shapes(shapes):
    return [tuple(s[-2:]) for s in shapes for _ in range(s[0] if len(s) == 3 else 1)]


def bench_model(preset, device, warmup, iters, lr=1e-3):
    """Rows for a whole nanokimi model: builder's Muon+AdamW set, its Muon part alone, peers on the same tensors."""
    try:
        from nanokimi import ModelConfig, build_model
        model = build_model(ModelConfig.preset(preset)).to(device)
    except Exception as error:  # the model API may not exist on this branch yet
        print(f"[skip] {preset}: could not build the model ({type(error).__name__}: {error})")
        return []
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt_set = build_optimizer(model, "muon", lr=lr)
    muon_shapes = [tuple(p.shape) for g in opt_set.optimizers["muon"].param_groups for p in g["params"]]
    rows = [{"set": preset, "optimizer": "nanokimi Muon+AdamW (builder)", "matrices": None,
             "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
             "step_ms": round(median_step_ms(opt_set.step, device, warmup, iters), 3), "ns_tflops": None}]
    muon = opt_set.optimizers["muon"]
    ms = median_step_ms(muon.step, device, warmup, iters)
    rows.append({"set": preset, "optimizer": "nanokimi Muon (its part)",
                 "matrices": sum(p.shape[0] if p.ndim == 3 else 1 for g in muon.param_groups for p in g["params"]),
                 "params_M": round(sum(p.numel() for g in muon.param_groups for p in g["params"]) / 1e6, 2),
                 "step_ms": round(ms, 3), "ns_tflops": round(ns_flops(muon_shapes) / ms / 1e9, 1)})
    del opt_set, muon
    model_params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    adamw = torch.optim.AdamW(model_params, lr=lr, weight_decay=0.1, **fused)
    rows.append({"set": preset, "optimizer": "AdamW fused, all params", "matrices": None,
                 "params_M": rows[0]["params_M"],
                 "step_ms": round(median_step_ms(adamw.step, device, warmup, iters), 3), "ns_tflops": None})
    del adamw, model, model_params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if hasattr(torch.optim, "Muon"):
        params = with_random_grads(unbound_2d_shapes(muon_shapes), device)
        peer = torch.optim.Muon(params, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
        ms = median_step_ms(peer.step, device, warmup, iters)
        rows.append({"set": preset, "optimizer": "torch.optim.Muon (same matrices)", "matrices": len(params),
                     "params_M": round(sum(p.numel() for p in params) / 1e6, 2), "step_ms": round(ms, 3),
                     "ns_tflops": round(ns_flops(muon_shapes) / ms / 1e9, 1)})
    return rows




def print_table(rows):
    header = f"{'set':<16} {'optimizer':<34} {'matrices':>8} {'params M':>9} {'step ms':>9} {'NS TFLOP/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['set']:<16} {r['optimizer']:<34} {r['matrices'] if r['matrices'] is not None else '':>8} "
              f"{r['params_M']:>9} {r['step_ms']:>9.3f} {r['ns_tflops'] if r['ns_tflops'] is not None else '':>10}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run (seconds)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/muon_step.json; --quick writes to a temp folder)")
    parser.add_argument("--skip-model", action="store_true", help="only the GPT-2-124M matrix set")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = results_path("muon_step", args.quick)

    if args.quick:
        device, warmup, iters = torch.device("cpu"), 1, 1
        rows = bench_matrix_set("gpt2-tiny", gpt2_shapes(layers=1, d=16) + [(4, 32, 16)], device, warmup, iters)
    else:
        if not torch.cuda.is_available():
            sys.exit("muon_step.py needs CUDA (use --quick for the CPU smoke run)")
        device, warmup, iters = torch.device("cuda"), args.warmup, args.iters
        rows = bench_matrix_set("gpt2-124m", gpt2_shapes(), device, warmup, iters)
        if not args.skip_model:
            rows += bench_model("bench-kl-900m", device, warmup, iters)
    print_table(rows)
    result = {"benchmark": "muon_step", "quick": args.quick,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "warmup": warmup, "iters": iters, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
