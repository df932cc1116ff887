"""MoBA prefill vs causal SDPA (flash): forward and forward+backward time of one attention op.

    python benchmarks/moba.py            # GPU: H=8, D=128, bf16, B=1, T = 32k .. 1M
    python benchmarks/moba.py --quick    # tiny CPU smoke run (seconds)

Prints one table; writes benchmarks/results/moba.json (device, date, git commit, torch version). Medians of
a few repetitions after one warm-up (which includes torch.compile of the flex kernels). Configurations
expected to take too long are skipped; SDPA forward at the longest T is extrapolated quadratically from the
previous T and marked "estimated".
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from perf_common import git_commit, results_path  # noqa: E402
from nanokimi.ops.moba import moba_attention  # noqa: E402

GPU_PLAN = dict(lengths=[32768, 131072, 524288, 1048576], heads=8, dim=128, dtype=torch.bfloat16,
                configs=[(512, 3), (4096, 12)],
                max_fwd=dict(sdpa=524288, flex=1048576, efficient=131072),
                max_bwd=dict(sdpa=131072, flex=131072, efficient=32768))
QUICK_PLAN = dict(lengths=[128, 256], heads=2, dim=16, dtype=torch.float32, configs=[(32, 3)],
                  max_fwd=dict(sdpa=128, flex=256, efficient=256),
                  max_bwd=dict(sdpa=256, flex=0, efficient=128), reps=1)


def timed(fn, reps, device):
    """Median milliseconds of fn() over reps calls after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def measure(name, attention, T, plan, device, backward):
    """One row: time attention(q, k, v) (and its backward) on fresh [1, T, H, D] inputs."""
    H, D, dtype = plan["heads"], plan["dim"], plan["dtype"]
    row = dict(impl=name, T=T, pass_="fwd+bwd" if backward else "fwd")
    try:
        q, k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        if backward:
            grad = torch.randn(1, T, H, D, device=device, dtype=dtype)

            def step():
                torch.autograd.grad(attention(q, k, v), (q, k, v), grad)
        else:
            def step():
                with torch.no_grad():
                    attention(q, k, v)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reps = plan.get("reps") or (1 if T >= 524288 else 3 if T >= 131072 else 5)
        row.update(ms=timed(step, reps, device), status="ok")
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        row.update(ms=None, status="oom")
    finally:
        q = k = v = grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run(plan, device):
    rows = []
    for T in plan["lengths"]:
        for backward in (False, True):
            limit = plan["max_bwd" if backward else "max_fwd"]
            if T <= limit["sdpa"]:
                rows.append(dict(measure("sdpa", sdpa_causal, T, plan, device, backward), config="causal"))
            elif not backward:
                prev = [r for r in rows if r["impl"] == "sdpa" and r["pass_"] == "fwd" and r.get("ms")]
                est = prev[-1]["ms"] * (T / prev[-1]["T"]) ** 2 if prev else None
                rows.append(dict(impl="sdpa", T=T, pass_="fwd", config="causal", ms=est,
                                 status="estimated" if est else "skipped"))
            for block_size, topk in plan["configs"]:
                config = f"b{block_size}/top{topk}"
                for impl in ("flex", "efficient"):
                    if T > limit[impl]:
                        rows.append(dict(impl=f"moba-{impl}", T=T, pass_="fwd+bwd" if backward else "fwd",
                                         config=config, ms=None, status="skipped"))
                        continue

                    def attention(q, k, v, impl=impl, block_size=block_size, topk=topk):
                        return moba_attention(q, k, v, block_size=block_size, topk=topk, impl=impl)
                    rows.append(dict(measure(f"moba-{impl}", attention, T, plan, device, backward), config=config))
                    print(f"  T={T} {config} {impl} {'fwd+bwd' if backward else 'fwd'}: {rows[-1]['status']} "
                          f"{rows[-1].get('ms')}", file=sys.stderr, flush=True)
    return rows


def table(rows):
    sdpa = {(r["T"], r["pass_"]): r["ms"] for r in rows if r["impl"] == "sdpa" and r.get("ms")}
    lines = [f"{'T':>8} {'pass':>8} {'impl':>15} {'config':>11} {'ms':>10} {'vs sdpa':>8} {'peak GB':>8}  status"]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r.get("ms") else "-"
        ref = sdpa.get((r["T"], r["pass_"]))
        speed = f"{ref / r['ms']:.2f}x" if r.get("ms") and ref and r["impl"] != "sdpa" else "-"
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") else "-"
        lines.append(f"{r['T']:>8} {r['pass_']:>8} {r['impl']:>15} {r['config']:>11} {ms:>10} {speed:>8} "
                     f"{peak:>8}  {r['status']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/moba.json; --quick writes to a temp folder)")
    args = parser.parse_args()
    if args.out is None:
        args.out = results_path("moba", args.quick)
    quick = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    plan = QUICK_PLAN if quick else GPU_PLAN
    # every (T, config) compiles the two flex kernels anew; past dynamo's recompile limit flex would fall
    # back to its unfused eager form, which materialises [T, T]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if quick:
        import warnings
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
    rows = run(plan, device)
    print(table(rows))
    commit = git_commit()
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  git_commit=commit, torch=torch.__version__, quick=quick,
                  shape=dict(B=1, H=plan["heads"], D=plan["dim"], dtype=str(plan["dtype"])),
                  rows=[{("pass" if key == "pass_" else key): val for key, val in r.items()} for r in rows])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
