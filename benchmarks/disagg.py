"""Disaggregated prefill/decode (1 prefill + 1 decode GPU) vs 2 data-parallel replicas on the Mooncake trace.

    python benchmarks/disagg.py            # 2 GPUs, bench-kl-900m: --replicas 2 vs 1 prefill + 1 decode worker
    python benchmarks/disagg.py --smoke    # CPU worker processes (gloo), tiny model, a scaled-down trace (temp folder)

The trace replay of benchmarks/serve.py (same trace lines, same text prompts from hash ids, same streamed
greedy /v1/completions client in its own process, same summary): each layout serves it through `nanokimi
serve`'s app with one worker process per GPU. Reported per layout: TTFT and TPOT (time between tokens) p50/p99
over completed requests, goodput (requests per second of trace time that met both SLOs), rejects and failures.
The question (Mooncake's claim): with long prompts, replicas stall their running streams behind prefill
chunks and miss a TBT SLO that the decode-only GPU meets, so 1P+1D has the higher goodput at that SLO.
Weights are random (a bench preset); output lengths come from max_tokens.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from perf_common import ROOT, environment, import_script, print_table, results_path, write_results

serve_bench = import_script(ROOT / "benchmarks" / "serve.py")


def layouts(names: list[str]) -> dict:
    table = {"replicas": dict(replicas=2), "disagg": dict(prefill_workers=1, decode_workers=1)}
    return {name: table[name] for name in names}


def run_layout(ckpt: Path, layout: dict, work: list[dict], args, device: str) -> dict:
    from nanokimi.serve.app import ServeOptions, create_app
    from nanokimi.serve.disagg import DisaggOptions, load_disagg_server
    from nanokimi.serve.run import BackgroundServer

    options = ServeOptions(max_cache_tokens=args.gpu_cache_tokens, max_step_tokens=args.step_tokens,
                           ttft_slo_ms=args.ttft_slo_ms if args.admission else None,
                           tbt_slo_ms=args.tbt_slo_ms if args.admission else None,
                           served_model_name="bench", max_body_bytes=16 << 20, device=device)
    server = load_disagg_server(str(ckpt), options, DisaggOptions(device=device, **layout))
    started = time.perf_counter()
    with BackgroundServer(create_app(server), startup_timeout=900) as bg:
        ready_s = time.perf_counter() - started
        results = serve_bench.run_client(bg.url, "bench", work, args.timeout)
        snapshot = server.loop.snapshot()
    row = serve_bench.summarize(results, work, args.ttft_slo_ms / 1000, args.tbt_slo_ms / 1000)
    queries = max(snapshot.get("prefix_cache_queries", 0), 1)
    row.update(prefix_hit_rate=round(snapshot.get("prefix_cache_hit_tokens", 0) / queries, 4),
               preemptions=snapshot.get("preemptions", 0), startup_s=round(ready_s, 1),
               workers=[{k: w.get(k) for k in ("rank", "role", "routed", "prefill_tokens", "decode_tokens")}
                        for w in snapshot.get("workers", [])])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU workers (gloo), tiny model, scaled-down trace")
    ap.add_argument("--preset", default="bench-kl-900m")
    ap.add_argument("--layouts", nargs="+", default=["replicas", "disagg"], choices=["replicas", "disagg"])
    ap.add_argument("--trace", default=str(serve_bench.TRACE))
    ap.add_argument("--start", type=int, default=3693)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--length-scale", type=float, default=0.5, help="prompt tokens per trace token (long prompts)")
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--max-input", type=int, default=16384)
    ap.add_argument("--gpu-cache-tokens", type=int, default=131072, help="KV pool of each worker")
    ap.add_argument("--step-tokens", type=int, default=4096)
    ap.add_argument("--ttft-slo-ms", type=float, default=4000.0)
    ap.add_argument("--tbt-slo-ms", type=float, default=60.0, help="TBT SLO; goodput uses it for TPOT")
    ap.add_argument("--no-admission", dest="admission", action="store_false", help="never refuse (no 429s)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one replay may take")
    ap.add_argument("--out", help="results file (default benchmarks/results/disagg.json)")
    args = ap.parse_args()

    import torch

    from nanokimi import ModelConfig, build_model
    from nanokimi.checkpoint import save_checkpoint

    if not Path(args.trace).is_file():
        print(f"the trace {args.trace} is missing (Mooncake's synthetic_trace.jsonl)", file=sys.stderr)
        return 2
    if args.smoke:
        args.requests, args.length_scale, args.time_scale = min(args.requests, 16), 1 / 64, 20.0
        args.max_input, args.gpu_cache_tokens, args.step_tokens = 512, 2048, 256
        args.output_scale, args.ttft_slo_ms, args.tbt_slo_ms = 0.25, 8000.0, 2000.0
        device = "cpu"
    else:
        if torch.cuda.device_count() < 2:
            print(f"benchmarks/disagg.py needs 2 GPUs (one per worker); this machine has "
                  f"{torch.cuda.device_count()}. Use --smoke for the CPU run.", file=sys.stderr)
            return 2
        device = "cuda"
    folder = Path(tempfile.mkdtemp(prefix="nanokimi-disagg-bench-"))
    tokenizer = serve_bench.make_tokenizer(folder)
    overrides = dict(serve_bench.SMOKE, mixers="KA" if "kl" in args.preset else "A") if args.smoke else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(args.preset, **overrides))
    ckpt = save_checkpoint(folder / "ckpt", model, tokenizer_file=folder / "tokenizer.json")
    shutil.copyfile(folder / "tokenizer_config.json", ckpt / "tokenizer_config.json")
    del model
    trace = serve_bench.load_trace(Path(args.trace), args.start, args.requests, args.length_scale, args.time_scale,
                                   args.output_scale, args.max_input)
    work = [dict(arrival=r["arrival"], max_tokens=r["max_tokens"],
                 prompt="".join(serve_bench.block_text(tokenizer, h, n) for h, n in r["blocks"])) for r in trace]
    print(f"trace: {len(work)} requests over {work[-1]['arrival']:.1f} s, prompts {args.length_scale:g} x trace, "
          f"SLO TTFT {args.ttft_slo_ms:g} ms / TBT {args.tbt_slo_ms:g} ms, {device}", flush=True)
    rows = {}
    for name, layout in layouts(args.layouts).items():
        print(f"{args.preset} {name} {layout} ...", flush=True)
        try:
            rows[name] = dict(preset=args.preset, layout=layout, **run_layout(ckpt, layout, work, args, device))
        except Exception as e:  # noqa: BLE001 - recorded; the other layout still runs
            rows[name] = dict(preset=args.preset, layout=layout, error=f"{type(e).__name__}: {str(e)[:600]}")
        print(f"  {json.dumps(rows[name])}", flush=True)
    headers = ["layout", "done", "429", "failed", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "goodput/s",
               "hit rate"]
    print_table(headers, [[name, r.get("completed"), r.get("rejected"), r.get("failed"), r.get("ttft_p50_ms"),
                           r.get("ttft_p99_ms"), r.get("tpot_p50_ms"), r.get("tpot_p99_ms"), r.get("goodput_rps"),
                           r.get("prefix_hit_rate")] for name, r in rows.items()])
    out = Path(args.out) if args.out else results_path("disagg", args.smoke)
    env = environment(torch.device("cuda:0" if device == "cuda" else "cpu"))
    write_results(out, env, rows, extra=dict(
        trace=str(args.trace), start=args.start, requests=len(work), length_scale=args.length_scale,
        time_scale=args.time_scale, output_scale=args.output_scale, max_input=args.max_input,
        gpu_cache_tokens=args.gpu_cache_tokens, step_tokens=args.step_tokens, ttft_slo_ms=args.ttft_slo_ms,
        tbt_slo_ms=args.tbt_slo_ms, admission=args.admission, gpus=2 if device == "cuda" else 0))
    print(f"wrote {out}")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
