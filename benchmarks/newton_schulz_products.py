"""Newton-Schulz's products, cuBLAS (torch.bmm / baddbmm) against the Triton symmetric kernel
(nanokimi/ops/newton_schulz/triton_symmetric.py: upper-triangular tiles only, the polynomial's elementwise part in
its epilogue), on GPT-2-124M's Gram-form set: 36 matrices with short side s = 768.

Rows (X bf16 random; each timed as one CUDA graph of `--reps` back-to-back calls, so Python's launch overhead is
out, median of `--iters` replays, divided by reps):
    gram wide / tall, l = 2304 and 3072: G = X X^T for X [36, 768, l], X^T X for X [36, l, 768]
    gram gpt2 group: qkv [12, 2304, 768] and fc [12, 3072, 768] (tall), proj [12, 768, 3072] (wide), each into
        its slice of one [36, 768, 768] buffer, as newton_schulz_group does
    product: P R of two commuting symmetric [36, 768, 768] (bmm against the kernel)
    polynomial, and polynomial scaled: P = a I + b R + c R^2 (times 1 / n per matrix): the compiled elementwise
        op + an in-place baddbmm (newton_schulz's "bmm" products) against one fused kernel
    newton_schulz_group: the whole five-step Gram iteration of the GPT-2 set, products "bmm" vs "triton_symmetric"
Columns: milliseconds, TFLOP/s counting the full product's FLOPs for both (so they compare), the kernel's
speedup, the autotuner's choice and each candidate config's time. Before timing, every kernel result is checked
against cuBLAS's (relative difference, exact symmetry). Writes benchmarks/results/newton_schulz_products.json
(device, date, commit).

    python benchmarks/newton_schulz_products.py            # GPU, about a minute (compiles and autotuning first)
    python benchmarks/newton_schulz_products.py --quick    # tiny CPU check in Triton's interpreter, seconds
Without CUDA and without --quick it says so and exits 0.
"""
import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

if "--quick" in sys.argv[1:] or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: --quick runs on the CPU, in the interpreter
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf_common import git_commit, median_ms, results_path  # noqa: E402

from nanokimi.ops.newton_schulz import (_polynomial, _start, coefficient_schedule,  # noqa: E402
                                       newton_schulz_group)
from nanokimi.ops.newton_schulz import triton_symmetric as sym  # noqa: E402

QUINTIC = coefficient_schedule("quintic", 1)[0]


def config_name(config):
    """'BLOCK/BLOCK_K/warps/stages' of a SymmetricConfig."""
    return "/".join(map(str, config))


def check(result, reference):
    """(relative difference from the cuBLAS result, whether result is exactly symmetric)."""
    difference = (result.double() - reference.double()).norm() / reference.double().norm()
    return round(difference.item(), 6), bool(torch.equal(result, result.mT))


def timed_ms(fn, device, reps, iters):
    """Milliseconds per call of fn: on CUDA a graph of `reps` calls replayed (after eager warm-up calls, which
    compile and autotune), on the CPU fn itself."""
    if device.type != "cuda":
        return median_ms(fn, device, 0, iters)
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    ms = median_ms(graph.replay, device, 3, iters) / reps
    del graph
    torch.cuda.synchronize()
    return ms


def symmetric_pair(X):
    """Two commuting symmetric matrices [N, s, s]: R = G / trace(G) of X, and P = a I + b R + c R^2."""
    G = torch.bmm(X, X.mT) if X.shape[-2] <= X.shape[-1] else torch.bmm(X.mT, X)
    R, _ = _start(G.float(), 1e-7)
    R = R.to(X.dtype)
    return _polynomial(R, *QUINTIC), R


def bench_case(name, shape, flops, bmm_fn, sym_fn, config_fns, reference, device, reps, iters):
    """One row: bmm_fn and sym_fn (autotuned) timed, sym_fn's result checked against reference, and each
    candidate config (config_fns: SymmetricConfig -> fn) timed too."""
    result = sym_fn()
    relative, symmetric = check(result, reference)
    chosen = sym.last_config
    bmm_ms = timed_ms(bmm_fn, device, reps, iters)
    sym_ms = timed_ms(sym_fn, device, reps, iters)
    configs = {}
    for config in sym.CONFIGS:
        try:
            configs[config_name(config)] = round(timed_ms(config_fns(config), device, reps, iters), 4)
        except Exception as error:  # a config this GPU cannot run (shared memory): reported, not fatal
            configs[config_name(config)] = f"failed: {type(error).__name__}"
    return {"case": name, "shape": shape, "bmm_ms": round(bmm_ms, 4), "symmetric_ms": round(sym_ms, 4),
            "speedup": round(bmm_ms / sym_ms, 3), "bmm_tflops": round(flops / bmm_ms / 1e9, 1),
            "symmetric_tflops_equiv": round(flops / sym_ms / 1e9, 1), "check_rel": relative, "symmetric": symmetric,
            "autotuned": None if chosen is None else config_name(chosen), "configs_ms": configs}


def gram_rows(N, s, lengths, dtype, device, reps, iters):
    rows = []
    for l in lengths:
        for tall in (False, True):
            X = torch.randn((N, l, s) if tall else (N, s, l), device=device).to(dtype)
            A, B = (X.mT, X) if tall else (X, X.mT)
            out = torch.empty(N, s, s, device=device, dtype=dtype)
            reference = torch.bmm(A, B)
            rows.append(bench_case(
                f"gram {'tall' if tall else 'wide'} l={l}", list(X.shape), 2 * N * s * s * l,
                lambda A=A, B=B: torch.bmm(A, B, out=out), lambda A=A, B=B: sym.symmetric_matmul(A, B, out),
                lambda config, A=A, B=B: lambda: sym.symmetric_matmul(A, B, out, config=config),
                reference, device, reps, iters))
    return rows


def gpt2_group_inputs(count, s, lengths, dtype, device):
    """qkv [count, l0, s] and fc [count, l1, s] tall, proj [count, s, l1] wide."""
    return [torch.randn(shape, device=device).to(dtype)
            for shape in ((count, lengths[0], s), (count, lengths[1], s), (count, s, lengths[1]))]


def group_gram_row(count, s, lengths, dtype, device, reps, iters):
    Xs = gpt2_group_inputs(count, s, lengths, dtype, device)
    out = torch.empty(len(Xs) * count, s, s, device=device, dtype=dtype)
    slices = out.split(count)

    def bmm():
        for X, G in zip(Xs, slices):
            torch.bmm(X.mT, X, out=G) if X.shape[-2] > X.shape[-1] else torch.bmm(X, X.mT, out=G)
        return out

    def kernel(config=None):
        for X, G in zip(Xs, slices):
            sym.gram(X, G, config=config)
        return out

    reference = bmm().clone()
    flops = sum(2 * X.shape[0] * s * s * max(X.shape[-2:]) for X in Xs)
    return bench_case("gram gpt2 group", [list(X.shape) for X in Xs], flops, bmm, kernel,
                      lambda config: lambda: kernel(config), reference, device, reps, iters)


def square_rows(N, s, dtype, device, reps, iters):
    X = torch.randn(N, s, 4 * s, device=device).to(dtype)
    P, R = symmetric_pair(X)
    out = torch.empty_like(R)
    flops = 2 * N * s**3
    rows = [bench_case("product P R", [N, s, s], flops, lambda: torch.bmm(P, R, out=out),
                       lambda: sym.symmetric_matmul(P, R, out),
                       lambda config: lambda: sym.symmetric_matmul(P, R, out, config=config),
                       torch.bmm(P, R), device, reps, iters)]
    inv = torch.rand(N, 1, 1, device=device) + 0.5  # a per-matrix scale like the normalisation's 1 / n
    for name, scale in (("polynomial", None), ("polynomial scaled", inv)):
        rows.append(bench_case(
            name, [N, s, s], flops, lambda scale=scale: _polynomial(R, *QUINTIC, scale),
            lambda scale=scale: _polynomial(R, *QUINTIC, scale, products="triton_symmetric"),
            lambda config, scale=scale: lambda: sym.polynomial(R, *QUINTIC, scale, config=config),
            _polynomial(R, *QUINTIC, scale), device, reps, iters))
    return rows


def group_row(count, s, lengths, dtype, device, reps, iters):
    """The whole newton_schulz_group call (5 quintic steps, segments 2-2-1, normalisation folded in)."""
    Xs = gpt2_group_inputs(count, s, lengths, dtype, device)
    schedule = coefficient_schedule("quintic", 5)
    run = lambda products: newton_schulz_group(Xs, schedule, eps=1e-7, products=products)  # noqa: E731
    reference, result = run("bmm"), run("triton_symmetric")
    difference = max(check(r, ref)[0] for r, ref in zip(result, reference))
    bmm_ms = timed_ms(lambda: run("bmm"), device, max(1, reps // 4), iters)
    sym_ms = timed_ms(lambda: run("triton_symmetric"), device, max(1, reps // 4), iters)
    return {"case": "newton_schulz_group (5 steps)", "shape": [list(X.shape) for X in Xs],
            "bmm_ms": round(bmm_ms, 4), "symmetric_ms": round(sym_ms, 4), "speedup": round(bmm_ms / sym_ms, 3),
            "bmm_tflops": None, "symmetric_tflops_equiv": None, "check_rel": difference, "symmetric": None,
            "autotuned": None, "configs_ms": {}}


def print_table(rows):
    header = (f"{'case':<30} {'bmm ms':>8} {'sym ms':>8} {'speedup':>7} {'bmm TF/s':>8} {'sym TF/s':>8} "
              f"{'check':>9}  autotuned  ms per config (BLOCK/BLOCK_K/warps/stages)")
    print(header)
    print("-" * len(header))
    for r in rows:
        tflops = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
        configs = ", ".join(f"{k}: {v}" for k, v in r["configs_ms"].items())
        print(f"{r['case']:<30} {r['bmm_ms']:>8.4f} {r['symmetric_ms']:>8.4f} {r['speedup']:>7.3f} "
              f"{tflops(r['bmm_tflops']):>8} {tflops(r['symmetric_tflops_equiv']):>8} {r['check_rel']:>9.2e}  "
              f"{r['autotuned'] or ''}  {configs}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU check in Triton's interpreter (seconds)")
    parser.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    parser.add_argument("--iters", type=int, default=20, help="graph replays timed (median)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/newton_schulz_products.json; --quick: a temp "
                             "folder)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = results_path("newton_schulz_products", args.quick)
    if args.quick:
        device, dtype, count, s, lengths, reps, iters = torch.device("cpu"), torch.bfloat16, 2, 40, (72, 96), 1, 1
    elif torch.cuda.is_available():
        device, dtype, count, s, lengths, reps, iters = (torch.device("cuda"), torch.bfloat16, 12, 768, (2304, 3072),
                                                         args.reps, args.iters)
    else:
        print("newton_schulz_products.py times CUDA kernels and there is no CUDA device here: nothing measured. "
              "Run it on a GPU, or pass --quick for a tiny CPU check of the same code in Triton's interpreter.")
        return None
    torch.manual_seed(0)
    N = 3 * count
    rows = gram_rows(N, s, lengths, dtype, device, reps, iters)
    rows.append(group_gram_row(count, s, lengths, dtype, device, reps, iters))
    rows += square_rows(N, s, dtype, device, reps, iters)
    rows.append(group_row(count, s, lengths, dtype, device, reps, iters))
    print_table(rows)
    # single products: one rounding apart; the whole iteration (last row) compounds bf16 rounding and is reported only
    bad = [r["case"] for r in rows if r["symmetric"] is not None and (not r["symmetric"] or r["check_rel"] > 2e-2)]
    result = {"benchmark": "newton_schulz_products", "quick": args.quick,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "triton": triton.__version__,
              "matrices": N, "s": s, "lengths": list(lengths), "reps": reps, "iters": iters, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if bad:
        sys.exit(f"the symmetric kernel's results differ from cuBLAS's (or are not symmetric) in {bad}")
    return result


if __name__ == "__main__":
    main()
