"""Which evicted blocks are worth copying down to the CPU tier? A replay of benchmarks/serve.py's trace window
through the engine's real BlockPool (LRU of freed prefix blocks), without a model.

    python benchmarks/serve_tier_policy.py            # the default window of benchmarks/serve.py, 65,536-token pool

Requests run one after another (no concurrency: the GPU pool is as roomy as it can be). Every prompt's full
16-token blocks and its output's blocks are registered like the engine does; each block is named by its trace
hash id (hash ids are prefix-chained) and its position, output blocks by request. Policies for a block the pool
evicts: `all` copies every one down; `reused` only blocks that were hit (GPU or tier) at least once before the
eviction; `none` keeps no tier. Reported: blocks copied down, prompt tokens served from the GPU and the tier,
and how many copied blocks were ever hit. The CPU tier is as large as the working set (as in serve.py's runs).
"""
import argparse
import sys
from pathlib import Path

import torch
from perf_common import environment, results_path, write_results
from serve import TRACE, load_trace


def replay(trace: list[dict], pool_tokens: int, policy: str, block: int = 16) -> dict:
    from nanokimi.infer.block_manager import BlockPool

    pool = BlockPool(pool_tokens // block + 1)
    tier: set = set()
    hit_before: set = set()
    counts = dict(copied=0, copied_hit=0, gpu_hit_tokens=0, tier_hit_tokens=0, prompt_tokens=0)
    copied_ever_hit: set = set()

    def evicted(_block, key):
        if policy == "all" or (policy == "reused" and key in hit_before):
            if key not in tier:
                counts["copied"] += 1
            tier.add(key)

    pool.on_evict = evicted
    for i, r in enumerate(trace):
        keys = [(h, j) for h, n in r["blocks"] for j in range(n // block)]
        counts["prompt_tokens"] += r["input_tokens"]
        held = []
        for key in keys[:max(0, (r["input_tokens"] - 1) // block)]:  # the last token is always computed
            b = pool.lookup(key)
            if b is not None:
                pool.take(b)
                counts["gpu_hit_tokens"] += block
            elif key in tier:
                b = pool.allocate() if pool.num_free else None
                if b is None:
                    break
                pool.register(b, key)
                counts["tier_hit_tokens"] += block
                copied_ever_hit.add(key)
            else:
                break
            hit_before.add(key)
            held.append(b)
        for key in keys[len(held):] + [("out", i, j) for j in range(r["max_tokens"] // block)]:
            if not pool.num_free:
                break
            b = pool.allocate()
            pool.register(b, key)
            held.append(b)
        pool.release(held)
    counts["copied_hit"] = len(copied_ever_hit)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--start", type=int, default=3693)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--max-input", type=int, default=16384)
    ap.add_argument("--gpu-cache-tokens", type=int, nargs="+", default=[65536, 131072])
    args = ap.parse_args()
    if not Path(args.trace).is_file():
        print(f"the trace {args.trace} is missing (Mooncake's synthetic_trace.jsonl)", file=sys.stderr)
        return 2
    trace = load_trace(Path(args.trace), args.start, args.requests, args.length_scale, 1.0, 1.0, args.max_input)
    rows = {}
    print(f"{'pool tokens':>11}  {'policy':>6}  {'copied':>7}  {'ever hit':>8}  {'GPU hit':>7}  {'tier hit':>8}")
    for pool_tokens in args.gpu_cache_tokens:
        for policy in ("none", "reused", "all"):
            c = replay(trace, pool_tokens, policy)
            gpu, tier = c["gpu_hit_tokens"] / c["prompt_tokens"], c["tier_hit_tokens"] / c["prompt_tokens"]
            rows[f"{pool_tokens} / {policy}"] = dict(pool_tokens=pool_tokens, policy=policy, **c,
                                                     gpu_hit_rate=round(gpu, 4), tier_hit_rate=round(tier, 4))
            print(f"{pool_tokens:>11}  {policy:>6}  {c['copied']:>7}  {c['copied_hit']:>8}  {gpu:>7.3f}  {tier:>8.3f}")
    out = results_path("serve_tier_policy", False)
    env = dict(environment(torch.device("cpu")), device="cpu (block bookkeeping only, no model)")
    write_results(out, env, rows,
                  extra=dict(trace=args.trace, start=args.start, requests=len(trace), length_scale=args.length_scale))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
