"""How close the batched bf16 Newton-Schulz comes to the fp32 one-matrix reference (CPU, no GPU needed).

For each input kind and coefficient set, the worst over a few seeds of
  direction error = ||offdiag(U^T (O - O_ref) V)|| / ||O_ref||   (G = U S V^T: O's directions, leaving out the
                    singular values, which Newton-Schulz only brings near 1)
  and O's smallest and largest singular value,
for the classic and the Gram form as `newton_schulz` runs them (bf16 operands, fp32 accumulation on the CPU as on
CUDA). Prints one table and writes benchmarks/results/newton_schulz_accuracy.json.

    python benchmarks/newton_schulz_accuracy.py            # ~1 minute on 2 cores
    python benchmarks/newton_schulz_accuracy.py --quick    # small inputs only, one seed, result in a temp folder
"""
import argparse
import json
import math
from pathlib import Path

import torch

from perf_common import environment, print_table, results_path  # noqa: E402

from nanokimi.ops.newton_schulz import coefficient_schedule, newton_schulz, orthogonalize_naive  # noqa: E402


def orthonormal(rows, cols, generator):
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def with_singular_values(s, rows, cols, generator):
    """[rows, cols] (rows <= cols) with singular values s, Frobenius norm 1."""
    s = s / s.norm()
    return (orthonormal(rows, rows, generator) * s) @ orthonormal(cols, rows, generator).T


INPUTS = {  # name -> (rows, cols, maker); rows <= cols (wide: the short side is iterated)
    "randn 23x61": (23, 61, lambda r, c, g: torch.randn(r, c, generator=g, dtype=torch.float64)),
    "randn 96x384": (96, 384, lambda r, c, g: torch.randn(r, c, generator=g, dtype=torch.float64)),
    "spectrum down to 1e-3, 96x288": (96, 288, lambda r, c, g: with_singular_values(
        torch.logspace(-3, 0, r, dtype=torch.float64), r, c, g)),
    "power law s_i = i^-1.5, 96x384": (96, 384, lambda r, c, g: with_singular_values(
        torch.arange(1, r + 1, dtype=torch.float64) ** -1.5, r, c, g)),
    "randn 768x2304 (GPT-2 qkv)": (768, 2304, lambda r, c, g: torch.randn(r, c, generator=g, dtype=torch.float64)),
}
QUICK = ("randn 23x61", "spectrum down to 1e-3, 96x288")


def direction_error(O, G, reference):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    M = U.mT @ (O.double() - reference.double()) @ Vh.mT
    return ((M - torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))).norm() / reference.double().norm()).item()


def measure(name, coefficients, method, seeds):
    rows, cols, make = INPUTS[name]
    schedule = coefficient_schedule(coefficients, 5)
    worst, low, high = 0.0, math.inf, 0.0
    for seed in range(seeds if rows < 512 else 1):
        G = make(rows, cols, torch.Generator().manual_seed(seed))
        reference = orthogonalize_naive(G.float())
        O = newton_schulz(G.float()[None].bfloat16(), schedule, method, eps=1e-7)[0]
        sv = torch.linalg.svdvals(O.double())
        worst = max(worst, direction_error(O, G, reference))
        low, high = min(low, sv.min().item()), max(high, sv.max().item())
    return {"input": name, "coefficients": coefficients, "method": method, "direction_error": round(worst, 5),
            "sv_min": round(low, 3), "sv_max": round(high, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small inputs, one seed")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names, seeds = (QUICK, 1) if args.quick else (tuple(INPUTS), args.seeds)
    rows = [measure(name, coefficients, method, seeds)
            for name in names for coefficients in ("quintic", "polar_express") for method in ("classic", "gram")]
    print_table(["input", "coefficients", "method", "direction error", "sv min", "sv max"],
                [[r["input"], r["coefficients"], r["method"], f"{r['direction_error']:.2e}", r["sv_min"], r["sv_max"]]
                 for r in rows])
    out = args.out or results_path("newton_schulz_accuracy", args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(torch.device("cpu")), "seeds": seeds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
