"""What Attention Residuals cost: training-step time with attn_res = none / block / full.

Two tables in one run:
  residual: the residual stream alone (D=1024, 32 sublayers, B=4, T=4096), with cheap stand-in sublayers, so
            the time is the residual's own forward + backward: PreNorm add vs block vs full AttnRes.
  model:    a full training step (forward, cross-entropy, backward, AdamW) of bench-kl-900m, B=4, T=4096, bf16
            autocast, per attn_res setting (needs nanokimi.build_model; T halves on OOM).
Medians over timed steps after warm-up. Writes benchmarks/results/attnres_overhead.json (device, date, commit).

    python benchmarks/attnres_overhead.py            # GPU
    python benchmarks/attnres_overhead.py --quick    # CPU smoke run: tiny sizes, 2 steps
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

from nanokimi.model.attn_res import AttentionResiduals  # noqa: E402

MODES = ("none", "block", "full")




def timed(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each timed call of step()."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


class PreNormResidual:
    """The standard residual stream, with the same start/sublayer_input/add/finish calls as AttentionResiduals."""

    def start(self, embedding):
        return embedding

    def sublayer_input(self, state, l):
        return state

    def add(self, state, l, out):
        return state + out

    def finish(self, state):
        return state


def residual_rows(args, device):
    """Residual stream alone: stand-in sublayers out = tanh(h) * scale (one elementwise pass each)."""
    B, T, D, L = args.batch, args.seq_len, args.hidden, args.sublayers
    rows = []
    for mode in MODES:
        residual = PreNormResidual() if mode == "none" else AttentionResiduals(
            D, L, mode=mode, num_blocks=args.blocks).to(device)
        embedding = torch.randn(B, T, D, device=device, requires_grad=True)
        scales = torch.full((L,), 0.5, device=device, requires_grad=True)

        def step():
            state = residual.start(embedding)
            for l in range(L):
                h = residual.sublayer_input(state, l)
                state = residual.add(state, l, torch.tanh(h) * scales[l])
            residual.finish(state).square().mean().backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = timed(step, args.warmup, args.steps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append(dict(table="residual", attn_res=mode, B=B, T=T, D=D, sublayers=L,
                         median_ms=statistics.median(times), peak_gib=peak))
    return rows


def model_rows(args, device):
    """One training-step row per attn_res setting, all at the same T: the first T (halving from --seq-len) that fits."""
    try:
        from nanokimi import ModelConfig, build_model
    except ImportError as error:
        print(f"model table skipped: {error}")
        return []
    seq_len = args.seq_len
    while True:
        try:
            return [model_step_row(ModelConfig, build_model, args, device, mode, seq_len) for mode in MODES]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if seq_len <= 512:
                print("model table skipped: out of memory even at T=512")
                return []
            seq_len //= 2
            print(f"out of memory: model rows rerun at T={seq_len}")


def model_step_row(ModelConfig, build_model, args, device, mode, seq_len):
    config = ModelConfig.preset(args.preset, attn_res=mode, attn_res_blocks=args.blocks)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    input_ids = torch.randint(0, config.vocab_size, (args.batch, seq_len + 1), device=device)
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    autocast_dtype = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype):
            logits = model(inputs)  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, args.warmup, args.steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    median = statistics.median(times)
    return dict(table="model", attn_res=mode, preset=args.preset, B=args.batch, T=seq_len, compiled=args.compile,
                median_ms=median, tokens_per_s=args.batch * seq_len / median * 1e3, peak_gib=peak,
                params=sum(p.numel() for p in model.parameters()))


def add_overheads(rows):
    for table in ("residual", "model"):
        base = next((r for r in rows if r["table"] == table and r["attn_res"] == "none" and r["median_ms"]), None)
        for r in rows:
            if r["table"] == table and base and r["median_ms"] and r.get("T") == base.get("T"):
                r["overhead_vs_none"] = r["median_ms"] / base["median_ms"] - 1


def print_table(rows):
    header = f"{'table':9} {'attn_res':8} {'B':>2} {'T':>5} {'median ms':>10} {'overhead':>9} {'tok/s':>9} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r['median_ms']:.2f}" if r["median_ms"] else r.get("note", "-")
        over = f"{100 * r['overhead_vs_none']:+.1f}%" if "overhead_vs_none" in r else "-"
        tok = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"{r['table']:9} {r['attn_res']:8} {r.get('B', '-'):>2} {r['T']:>5} {ms:>10} {over:>9} {tok:>9} {peak:>8}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, tiny sizes, 2 steps")
    parser.add_argument("--preset", default="bench-kl-900m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024, help="residual table: hidden size")
    parser.add_argument("--sublayers", type=int, default=32, help="residual table: number of sublayers")
    parser.add_argument("--blocks", type=int, default=8, help="attn_res_blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model table)")
    parser.add_argument("--skip-model", action="store_true", help="only the residual table")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/attnres_overhead.json; --quick writes to a temp folder)")
    args = parser.parse_args()
    if args.out is None:
        args.out = results_path("attnres_overhead", args.quick)
    if args.quick:
        args.preset, args.batch, args.seq_len, args.hidden, args.sublayers = "tiny", 1, 64, 64, 8
        args.warmup, args.steps, args.compile = 0, 2, False
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")

    rows = residual_rows(args, device)
    if not args.skip_model:
        rows += model_rows(args, device)
    add_overheads(rows)
    print_table(rows)

    report = dict(
        benchmark="attnres_overhead",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        quick=args.quick,
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
