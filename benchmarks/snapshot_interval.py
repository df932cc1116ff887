"""What the KDA snapshot interval trades: prefix-cache hits against delta-rule calls per prefill (CPU, no model).

A hybrid request can reuse a cached prefix only up to a point where a snapshot of the KDA state exists
(docs/engine.md, "KDA snapshots"). The engine takes snapshots every `snapshot_interval` tokens and at each
prompt's last full block and resend point; a prefill chunk runs its delta rule in one segment per snapshot point
inside it, and every segment is one fla `chunk_kda` call per KDA layer, a chain of Triton launches with Python
around it (on an H100 the 4,096-token prefill step of bench-kl-900m took 235.6 ms of wall for 16.8 ms of GPU
work with 9 segments per layer; the all-MLA model's 51.7 ms). This replays Mooncake's trace with the engine's
rules and unlimited snapshot memory: for each interval, the share of prompt tokens served from the cache and the
delta-rule calls per KDA layer per 1,000 computed tokens, and a modelled prefill time: --ms-per-round per
segment (20.4 ms: 12 KDA layers x 1.7 ms, what the 9 segments added to the hybrid's step over the all-MLA one's)
plus --ms-per-1k-tokens for the rest (12.6 ms: the all-MLA step, 51.7 ms per 4,096 tokens).

    python benchmarks/snapshot_interval.py                        # 3,000 requests, trace lengths x1 and x0.25
    python benchmarks/snapshot_interval.py --length-scales 0.25   # as benchmarks/serve.py scales the trace

Trace blocks are 512 x scale tokens (each hash id one block of shared content; a prompt's last block may be
partial); engine blocks are 16 tokens, prefill chunks 4,096 tokens (the engine's CUDA settings).
Writes benchmarks/results/snapshot_interval.json.
"""
import argparse
import json
import math
from pathlib import Path

import torch

from perf_common import ROOT, environment, print_table, results_path

TRACE = ROOT.parent / "shared" / "data" / "mooncake" / "synthetic_trace.jsonl"
INTERVALS = (512, 1024, 2048, 4096, 8192)


def snapshot_points(length: int, interval: int, block: int) -> set[int]:
    """The engine's snapshot points of a prompt (Sequence.is_snapshot_point): multiples of the interval, the
    prompt's last full block and the deepest block a resend of the prompt can reuse."""
    points = set(range(interval, length + 1, interval))
    points |= {p for p in (length // block * block, (length - 1) // block * block) if p > 0}
    return points


def replay(requests: list[dict], interval: int, trace_block: int, block: int, chunk: int, ms_per_round: float,
           ms_per_1k: float) -> dict:
    """Requests in order; snapshots keyed by the trace blocks they cover -> hit share and calls per 1k tokens."""
    snapshots: dict[tuple, set[int]] = {}  # hash ids of the blocks covering [0, p) -> points p
    prompt_tokens = hit_tokens = calls = 0
    for r in requests:
        n, ids = r["tokens"], r["hash_ids"]
        hit = 0  # the deepest snapshot of a prefix this prompt shares (its last token is always computed)
        for k in range(1, len(ids) + 1):
            for p in snapshots.get(tuple(ids[:k]), ()):
                if p <= n - 1:
                    hit = max(hit, p)
        points = snapshot_points(n, interval, block)
        cuts = {p for p in points if hit < p < n} | set(range(hit + chunk, n, chunk))  # segment ends inside
        calls += len(cuts) + 1
        prompt_tokens += n
        hit_tokens += hit
        for p in points:
            snapshots.setdefault(tuple(ids[:math.ceil(p / trace_block)]), set()).add(p)
    computed = prompt_tokens - hit_tokens
    return dict(interval=interval, hit_share=round(hit_tokens / prompt_tokens, 4),
                computed_tokens=computed, calls_per_layer=calls,
                calls_per_1k_computed=round(1000 * calls / computed, 3),
                modelled_prefill_s=round((calls * ms_per_round + computed / 1000 * ms_per_1k) / 1000, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--length-scales", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--intervals", type=int, nargs="+", default=list(INTERVALS))
    ap.add_argument("--ms-per-round", type=float, default=20.4)
    ap.add_argument("--ms-per-1k-tokens", type=float, default=12.6)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.trace.is_file():
        ap.error(f"--trace: {args.trace} not found (the Mooncake trace lives in ../shared/data/mooncake/)")
    with args.trace.open() as f:
        raw = [json.loads(line) for _, line in zip(range(args.requests), f)]
    rows = []
    for scale in args.length_scales:
        trace_block = max(1, round(512 * scale))
        requests = [dict(tokens=max(1, round(r["input_length"] * scale)), hash_ids=r["hash_ids"]) for r in raw]
        for interval in args.intervals:
            rows.append(dict(length_scale=scale, **replay(requests, interval, trace_block, block=16, chunk=4096,
                                                          ms_per_round=args.ms_per_round,
                                                          ms_per_1k=args.ms_per_1k_tokens)))
    print_table(["length scale", "interval", "prompt share from cache", "delta-rule calls / layer",
                 "calls per 1k computed tokens", "modelled prefill s"],
                [[r["length_scale"], r["interval"], r["hit_share"], r["calls_per_layer"], r["calls_per_1k_computed"],
                  r["modelled_prefill_s"]] for r in rows])
    out = Path(args.out) if args.out else results_path("snapshot_interval", False)
    env = environment(torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="snapshot_interval", device=env["device"], date=env["date"],
                                   commit=env["git_commit"], torch=env["torch"], requests=len(raw),
                                   trace=args.trace.name, ms_per_round=args.ms_per_round,
                                   ms_per_1k_tokens=args.ms_per_1k_tokens, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
