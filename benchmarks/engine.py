"""The inference engine on one GPU: offline throughput beside Hugging Face transformers, decode speed, prefix
caching's time to first token, and long-context decode of the KDA hybrid against all-MLA. Random weights
(speed does not depend on them), bf16, greedy, end-of-text ignored (every request runs to its length).

    python benchmarks/engine.py                      # both 900m presets with HF peers, ~8 min on an H100
    python benchmarks/engine.py --no-peer --skip-long
    python benchmarks/engine.py --smoke              # CPU, tiny models, seconds (writes to a temp folder)

Offline: `--requests` requests whose input/output lengths are the first lines of the Mooncake trace
  (../shared/data/mooncake/synthetic_trace.jsonl) scaled so the mean prompt is `--mean-prompt` tokens
  (outputs capped at 256); the tokens of each 512-token hash block of the trace are drawn from a generator
  seeded by its hash id, so requests that share hash ids share prefixes. All submitted at once. Peers, on
  the first `--peer-requests` of them (HF is slow): transformers generate() in fixed batches of 16
  (left-padded, each batch runs to its longest output) and, for the dsv3 layout, transformers' continuous
  batching (generate_batch; one max_new_tokens for all, so it generates more than asked); the engine also
  runs that subset alone. Useful tok/s counts only the requested output tokens.
Decode: batch 16 and 128, prompt 512: tok/s = batch / median engine.step() time of decode-only steps; the
  floor is the HBM time to read the weights, caches and KDA states once per step (2.97 TB/s).
TTFT: a 4096-token prompt whose first 3584 tokens are cached (with the KDA snapshot at 3584) vs a fresh one.
Long: decode at 128k context at the largest batch whose cache fits, the hybrid against all-MLA; the
  sequences are marked prefilled without running the prefill (decode cost does not depend on the values).
"""
import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from perf_common import (ROOT, environment, find_peer_script, free_memory, import_script, print_table, results_path,
                         short_error, sync, write_results)
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine, SamplingParams
from nanokimi.infer.runner import GRAPH_BATCH_SIZES
from nanokimi.model import build_model

TRACES = [base / "data" / "mooncake" / "synthetic_trace.jsonl" for base in (ROOT / "shared", ROOT.parent / "shared",
                                                                                  ROOT.parent.parent / "shared")]
TRACE = next((t for t in TRACES if t.is_file()), TRACES[-1])
PRESETS = {"bench-kl-900m": dict(preset="bench-kl-900m", peer="kl"),
           "bench-dsv3-900m": dict(preset="bench-dsv3-900m", peer="dsv3")}
SMOKE = dict(vocab_size=512, num_layers=2, max_position_embeddings=2048)
SMOKE_PRESETS = {"bench-kl-900m": dict(preset="tiny", overrides=dict(SMOKE, mixers="KA"), peer="kl"),
                 "bench-dsv3-900m": dict(preset="tiny", overrides=dict(SMOKE, mixers="A", mla_rope=True), peer="dsv3")}
HBM_BYTES_PER_S = 2.97e12


def workload(n: int, mean_prompt: int, max_prompt: int, vocab: int, max_output: int = 256) -> list[dict]:
    """n requests: prompt token ids and output length, from the Mooncake trace (or seeded random lengths)."""
    if TRACE.is_file():
        rows = [json.loads(line) for _, line in zip(range(n), TRACE.open())]
        source = "mooncake/synthetic_trace.jsonl"
    else:
        print(f"  {TRACE} not found: seeded random lengths instead", flush=True)
        g = torch.Generator().manual_seed(0)
        rows = [dict(input_length=int(torch.randint(100, 20000, (), generator=g)),
                     output_length=int(torch.randint(1, 400, (), generator=g)), hash_ids=[-i - 1]) for i in range(n)]
        source = "random"
    scale = mean_prompt / statistics.mean(r["input_length"] for r in rows)
    block = max(1, round(512 * scale))  # tokens per hash block after scaling
    out = []
    for r in rows:
        length = min(max(8, round(r["input_length"] * scale)), max_prompt)
        ids = []
        for h in r["hash_ids"]:
            ids += torch.randint(3, vocab, (block,), generator=torch.Generator().manual_seed(int(h) + 12345)).tolist()
            if len(ids) >= length:
                break
        ids += torch.randint(3, vocab, (max(0, length - len(ids)),)).tolist()
        out.append(dict(prompt=ids[:length], output=min(max(1, r["output_length"]), max_output)))
    for item in out:
        item["source"] = source
    return out


def make_model(spec: dict, device, dtype, **extra):
    cfg = ModelConfig.preset(spec["preset"], **{**spec.get("overrides", {}), **extra})
    return build_model(cfg, device=device, dtype=dtype).eval(), cfg


def run_offline(engine: Engine, work: list[dict]) -> dict:
    """All requests at once; the prefix cache starts empty (sharing within the workload is real, across
    runs it would not be)."""
    engine.reset_prefix_cache()
    stats0 = engine.stats()
    sync(engine.device)
    t0 = time.perf_counter()
    for i, item in enumerate(work):
        engine.add_request(f"w{i}", item["prompt"], SamplingParams(max_tokens=item["output"], temperature=0,
                                                                    ignore_eos=True))
    done, ttfts = 0, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done += 1
                ttfts.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
    sync(engine.device)
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    generated = sum(item["output"] for item in work)
    return dict(requests=len(work), seconds=round(seconds, 3), useful_tokens_per_s=round(generated / seconds, 1),
                requests_per_s=round(len(work) / seconds, 2), prompt_tokens=sum(len(w["prompt"]) for w in work),
                output_tokens=generated, ttft_p50_s=round(statistics.median(ttfts), 3),
                prefix_cache_hit_tokens=stats["prefix_cache_hit_tokens"] - stats0["prefix_cache_hit_tokens"],
                preemptions=stats["preemptions"] - stats0["preemptions"], steps=stats["steps"] - stats0["steps"])


def prefill_in_one_step(engine: Engine, tokens: int) -> None:
    """Prefill every waiting request with a step budget of `tokens` (the whole batch in one step), so that
    decoding meets one batch bucket: one graph, one compilation."""
    budget, engine.scheduler.max_step_tokens = engine.scheduler.max_step_tokens, tokens
    try:
        while engine.num_waiting_prefill_tokens() > 0 or engine.scheduler.waiting:
            engine.step()
    finally:
        engine.scheduler.max_step_tokens = budget


def decode_speed(engine: Engine, cfg, batch: int, prompt: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", torch.randint(3, cfg.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    prefill_in_one_step(engine, batch * prompt)
    for _ in range(3):  # capture the graphs of this batch
        engine.step()
    times = []
    for _ in range(steps):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.step()
        sync(engine.device)
        times.append(time.perf_counter() - t0)
    for i in range(batch):
        engine.abort(f"d{batch}-{i}")
    engine.step()
    step_s = statistics.median(times)
    runner = engine.runner
    bucket = next((s for s in GRAPH_BATCH_SIZES if s >= batch), None)
    return dict(batch=batch, prompt=prompt, step_ms=round(step_s * 1e3, 3), tokens_per_s=round(batch / step_s, 1),
                graphed=runner.use_graphs, compiled=any(size == bucket for size, _ in runner.compiled_buckets),
                compile_s=round(runner.compile_seconds, 1))


def floor_tokens_per_s(model, engine: Engine, batch: int, context: int) -> float:
    """batch / (time to read every weight, each sequence's attention cache and KDA state (read + write) once)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    from nanokimi.model.paged import paged_cache_bytes
    per_block, per_slot = paged_cache_bytes(model, engine.block_size)
    per_seq = per_block * context / engine.block_size + 2 * per_slot
    return batch / ((weights + batch * per_seq) / HBM_BYTES_PER_S)


def ttft_prefix(engine: Engine, cfg, total: int, cached: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, cfg.vocab_size, (cached,), generator=g).tolist()

    def first_token(ids, name) -> float:
        sync(engine.device)
        t0 = time.perf_counter()
        engine.add_request(name, ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        sync(engine.device)
        return time.perf_counter() - t0

    def suffix():
        return torch.randint(3, cfg.vocab_size, (total - cached,), generator=g).tolist()

    first_token(prefix, "warm")  # an earlier prompt: its blocks and the KDA snapshot at its last full block
    hits0 = engine.stats()["prefix_cache_hit_tokens"]
    hit = [first_token(prefix + suffix(), f"hit{i}") for i in range(repeats)]
    hits = engine.stats()["prefix_cache_hit_tokens"] - hits0
    cold = [first_token(torch.randint(3, cfg.vocab_size, (total,), generator=g).tolist(), f"cold{i}")
            for i in range(repeats)]
    return dict(prompt=total, cached_prefix=cached, ttft_cached_ms=round(statistics.median(hit) * 1e3, 2),
                ttft_uncached_ms=round(statistics.median(cold) * 1e3, 2),
                speedup=round(statistics.median(cold) / statistics.median(hit), 2),
                hit_tokens_per_request=hits // repeats)


def long_context(spec, device, dtype, context: int, steps: int, fraction: float) -> dict:
    model, cfg = make_model(spec, device, dtype, max_position_embeddings=context + 64)
    engine = Engine(model, block_size=64, max_num_seqs=512, gpu_memory_fraction=fraction, enable_prefix_caching=False,
                    num_state_snapshots=0, max_cache_tokens=None if device.type == "cuda" else 4 * (context + 64))
    fits = min(512, engine.stats()["cache_tokens_total"] // (context + 64))
    result = dict(context=context, cache_fits_sequences=fits)
    batch = fits
    while batch >= 1:
        try:
            for i in range(batch):  # mark prefilled without the prefill: decode cost does not depend on the values
                engine.add_request(f"l{i}", [3] * context, SamplingParams(max_tokens=steps + 8, temperature=0,
                                                                          ignore_eos=True))
            scheduler = engine.scheduler
            for seq in list(scheduler.waiting):
                scheduler._admit(seq)
                scheduler._grow(seq, context)
                seq.num_computed = context - 1
            engine._apply_slot_ops()
            for _ in range(3):
                engine.step()
            times = []
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                engine.step()
                sync(device)
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            result.update(batch=batch, step_ms=round(step_s * 1e3, 2), tokens_per_s=round(batch / step_s, 1),
                          graphed=engine.runner.use_graphs)
            break
        except torch.OutOfMemoryError:
            for i in range(batch):
                engine.abort(f"l{i}")
            engine.step()
            free_memory(device)
            batch = int(batch * 0.75)
    del engine, model
    free_memory(device)
    return result


def hf_worker(args) -> None:
    """Runs in a subprocess: one HF peer over the workload file, prints/writes JSON."""
    build = import_script(args.peer_script).build
    work = json.loads(Path(args.workload).read_text())
    model = build(args.layout).to("cuda", torch.bfloat16).eval()
    generated = sum(w["output"] for w in work)
    result = dict(peer=f"transformers-{args.layout}-{args.hf_worker}", requests=len(work))
    with torch.no_grad():
        if args.hf_worker == "fixed":
            batches = [work[i:i + 16] for i in range(0, len(work), 16)]
            model.generate(torch.full((2, 8), 5, device="cuda"), max_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for part in batches:
                width = max(len(w["prompt"]) for w in part)
                ids = torch.tensor([[0] * (width - len(w["prompt"])) + w["prompt"] for w in part], device="cuda")
                mask = torch.tensor([[0] * (width - len(w["prompt"])) + [1] * len(w["prompt"]) for w in part],
                                    device="cuda")
                longest = max(w["output"] for w in part)
                model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                               do_sample=False)
            torch.cuda.synchronize()
        else:
            from transformers import GenerationConfig
            longest = max(w["output"] for w in work)
            config = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=None, pad_token_id=0)
            model.generate_batch([[5] * 8] * 2, generation_config=config, max_new_tokens=4)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = model.generate_batch([w["prompt"] for w in work], generation_config=config)
            torch.cuda.synchronize()
            made = [len(getattr(o, "generated_tokens", []) or []) for o in outs.values()]
            result.update(note=f"one max_new_tokens={longest} for every request", generated_tokens=sum(made))
            # useful: the requests' own output lengths, as far as the peer made them (an H100 run once returned
            # no tokens in 0.3 s; counting the asked-for lengths then reported 5,196 tokens/s)
            useful = min(sum(made), generated)
            if useful < generated:
                first = next(iter(outs.values()), None)
                result["error"] = (f"generate_batch made {useful:,} of the {generated:,} useful tokens; first "
                                   f"output: {str(first)[:300]}")
                generated = useful
    seconds = time.perf_counter() - t0
    result.update(seconds=round(seconds, 3), useful_tokens_per_s=round(generated / seconds, 1),
                  requests_per_s=round(len(work) / seconds, 2))
    Path(args.json).write_text(json.dumps(result))


def run_hf(script, layout: str, mode: str, work: list[dict], timeout_s: int) -> dict:
    import os
    import subprocess
    import tempfile
    if script is None:
        return {"error": "peer script not found; pass --peer-script PATH (../shared/bench/peer_hf.py)"}
    folder = Path(tempfile.mkdtemp())
    (folder / "work.json").write_text(json.dumps(work))
    cmd = [sys.executable, __file__, "--hf-worker", mode, "--layout", layout, "--workload", str(folder / "work.json"),
           "--peer-script", str(script), "--json", str(folder / "out.json")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s}s"}
    if proc.returncode != 0 or not (folder / "out.json").is_file():
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1200:]}"}
    return json.loads((folder / "out.json").read_text())


PARTS = ("decode", "ab", "ttft", "offline", "peer", "long")
AB_VARIANTS = {  # decode-step A/B: (compile, KDA decode rows); the first is the engine before this work
    "graph": (False, "gather"), "graph+kda-kernel": (False, "auto"),
    "graph+compile+kda-kernel": (True, "auto"), "graph+compile": (True, "gather"),
}


def decode_ab(spec, device, dtype, batches, prompt: int, steps: int, compile_budget_s: float, deadline: float) -> dict:
    """The decode step of each AB_VARIANTS entry at the given batch sizes, one fresh engine per variant (the
    same weights); a variant that would start after `deadline` (time.perf_counter()) is skipped."""
    import nanokimi.model.paged as paged
    model, cfg = make_model(spec, device, dtype)
    out = {}
    for name, (compile_step, kda_decode) in AB_VARIANTS.items():
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget"}
            continue
        paged.KDA_DECODE = kda_decode
        try:
            t0 = time.perf_counter()
            engine = Engine(model, max_num_seqs=max(batches), compile=compile_step, compile_budget_s=compile_budget_s,
                            max_cache_tokens=max(batches) * (prompt + steps + 64), max_step_tokens=4096,
                            enable_prefix_caching=False)
            row = {f"b{b}": decode_speed(engine, cfg, b, prompt, steps) for b in batches}
            row.update(kda_decode_kernel=paged.use_kda_slot_kernel(engine.device), compiled=engine.runner.compiled,
                       compile_s=round(engine.runner.compile_seconds, 1), seconds=round(time.perf_counter() - t0, 1))
            out[name] = row
            del engine
        except Exception as error:  # noqa: BLE001 - record it and go on with the next variant
            traceback.print_exc()
            out[name] = {"error": short_error(error)}
        free_memory(device)
        print(f"  decode A/B {name}: {out[name]}", flush=True)
    paged.KDA_DECODE = "auto"
    del model
    free_memory(device)
    return out


def wall_ms(fn, device, calls: int = 3) -> float:
    """Median wall time of fn() in ms, synchronised, outside the profiler."""
    times = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def prefill_ab(spec, device, dtype, shapes, repeats: int = 3) -> dict:
    """Time to prefill (and sample one token of) `count` fresh prompts of `length` tokens that share one step,
    with the pieces' attention packed into one call per layer vs one call per piece (PACKED_ATTENTION)."""
    import nanokimi.model.paged as paged
    model, cfg = make_model(spec, device, dtype)
    engine = Engine(model, max_num_seqs=64, max_step_tokens=max(c * n for c, n in shapes),
                    max_cache_tokens=2 * max(c * n for c, n in shapes), enable_prefix_caching=False)
    g = torch.Generator().manual_seed(5)
    out = {}
    try:
        for count, length in shapes:
            for packed in (True, False, True):  # the first round warms up kernels and allocations
                paged.PACKED_ATTENTION = packed
                times = []
                for _ in range(repeats):
                    for i in range(count):
                        engine.add_request(f"pf{i}", torch.randint(3, cfg.vocab_size, (length,), generator=g).tolist(),
                                           SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
                    sync(device)
                    t0 = time.perf_counter()
                    while engine.has_unfinished():
                        engine.step()
                    sync(device)
                    times.append(time.perf_counter() - t0)
                out[f"{count}x{length}_{'packed' if packed else 'per_piece'}_ms"] = round(
                    statistics.median(times) * 1e3, 2)
    finally:
        paged.PACKED_ATTENTION = True
    del engine, model
    free_memory(device)
    print(f"  prefill A/B (attention packed vs per piece): {out}", flush=True)
    return out


def profile_parts(engine: Engine, cfg, batch: int, prompt: int, prefill_tokens: int) -> dict:
    """Kernel-time summaries (torch.profiler, CUDA): one decode step at `batch` and one prefill step of a
    fresh `prefill_tokens`-token prompt."""
    from perf_common import kernel_profile
    g = torch.Generator().manual_seed(11)
    for i in range(batch):
        engine.add_request(f"p{i}", torch.randint(3, cfg.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    prefill_in_one_step(engine, batch * prompt)
    for _ in range(3):
        engine.step()
    decode_wall = wall_ms(engine.step, engine.device)
    out = {f"decode_b{batch}": dict(kernel_profile(engine.step, 3, top=25), wall_ms=decode_wall)}
    for i in range(batch):
        engine.abort(f"p{i}")
    engine.step()
    engine.reset_prefix_cache()
    count = iter(range(10 ** 6))

    def prefill_step():
        prompt_ids = torch.randint(3, cfg.vocab_size, (prefill_tokens,), generator=g).tolist()
        engine.add_request(f"pp{next(count)}", prompt_ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()

    prefill_step()
    wall = wall_ms(prefill_step, engine.device)
    out[f"prefill_{prefill_tokens}"] = dict(kernel_profile(prefill_step, 1, top=25), wall_ms=wall)
    for name, summary in out.items():  # wall far above GPU busy: the step waits on the host (launches, Python)
        print(f"  profile {name}: wall {summary['wall_ms']} ms, GPU busy {summary['gpu_busy_ms']} ms, "
              f"{summary['kernels_per_call']} kernels, by kind {summary['kinds_ms']}", flush=True)
        for kernel, ms, kind in summary["top_kernels"]:
            print(f"    {ms:9.4f} ms  {kind:13s} {kernel}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run of every part (tiny models)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run, of {','.join(PARTS)} (default all; 'ab' = decode A/B "
                         "of the switchable variants, bench-kl-900m only; 'peer' = the HF peers)")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--mean-prompt", type=int, default=1024)
    ap.add_argument("--peer-requests", type=int, default=32)
    ap.add_argument("--no-peer", action="store_true", help="same as leaving 'peer' out of --parts")
    ap.add_argument("--skip-long", action="store_true", help="same as leaving 'long' out of --parts")
    ap.add_argument("--compile-budget", type=float, default=120.0,
                    help="seconds of torch.compile per engine (Engine compile_budget_s); later buckets run uncompiled")
    ap.add_argument("--time-budget", type=float, default=330.0,
                    help="seconds since the start after which the decode A/B skips its remaining variants")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler kernel-time summaries of one decode step (batch 16), one prefill step")
    ap.add_argument("--long-context", type=int, default=131072)
    ap.add_argument("--mla-decode", choices=["auto", "triton", "gather"], default="auto",
                    help="MLA decode attention: the Triton paged kernel (auto on CUDA) or gathered blocks")
    ap.add_argument("--peer-script")
    ap.add_argument("--out")
    ap.add_argument("--hf-worker", choices=["fixed", "cb"], help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    if args.no_peer:
        parts.discard("peer")
    if args.skip_long:
        parts.discard("long")
    presets = SMOKE_PRESETS if args.smoke else PRESETS
    if set(args.presets) - set(presets):
        ap.error(f"--presets: unknown {sorted(set(args.presets) - set(presets))}; choose from {','.join(presets)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    import nanokimi.model.paged as paged
    paged.PAGED_KERNEL = args.mla_decode
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_requests = 24 if args.smoke else args.requests
    mean_prompt = 96 if args.smoke else args.mean_prompt
    decode_batches, decode_prompt, decode_steps = ((4, 8), 64, 4) if args.smoke else ((16, 128), 512, 32)
    ttft_total, ttft_cached = (256, 224) if args.smoke else (4096, 3584)
    long_ctx = 1024 if args.smoke else args.long_context
    peer = None if "peer" not in parts or device.type != "cuda" else find_peer_script(args.peer_script)
    env = environment(device)
    out = Path(args.out) if args.out else results_path("engine", args.smoke)
    results, table = {}, []
    started = time.perf_counter()
    extra = dict(mla_decode=args.mla_decode, parts=sorted(parts), compile_budget_s=args.compile_budget)
    for name in args.presets:
        spec = presets[name]
        row = results[name] = {}
        try:
            model, cfg = make_model(spec, device, dtype)
            small = {} if device.type == "cuda" else dict(snapshot_interval=64)  # the CPU smoke's short prompts
            engine = Engine(model, max_num_seqs=256, max_step_tokens=4096 if device.type == "cuda" else 256,
                            gpu_memory_fraction=0.6, **small,
                            compile_budget_s=args.compile_budget)
            row["report"] = engine.report
            print(f"[{time.perf_counter() - started:.0f}s] {name}: {engine.report}", flush=True)
            if "decode" in parts:
                for batch in decode_batches:
                    row[f"decode_b{batch}"] = decode_speed(engine, cfg, batch, decode_prompt, decode_steps)
                    row[f"decode_b{batch}"]["floor_tokens_per_s"] = round(
                        floor_tokens_per_s(model, engine, batch, decode_prompt + decode_steps), 1)
                    print(f"[{time.perf_counter() - started:.0f}s]  decode b{batch}: {row[f'decode_b{batch}']}",
                          flush=True)
            if args.profile:  # on the CPU (--smoke) it only checks that the part runs: no CUDA kernels to list
                try:
                    row["profile"] = profile_parts(engine, cfg, decode_batches[0], decode_prompt, ttft_total)
                except Exception as error:  # noqa: BLE001 - a profile is extra: the measurements go on
                    traceback.print_exc()
                    row["profile"] = {"error": short_error(error)}
            if "ttft" in parts and name == "bench-kl-900m":
                row["ttft_prefix"] = ttft_prefix(engine, cfg, ttft_total, ttft_cached, 3)
                print(f"[{time.perf_counter() - started:.0f}s]  ttft: {row['ttft_prefix']}", flush=True)
            write_results(out, env, results, dict(extra, seconds=round(time.perf_counter() - started, 1)))
            if "offline" in parts:
                work = workload(n_requests, mean_prompt, cfg.max_position_embeddings // 4, cfg.vocab_size,
                                max_output=24 if args.smoke else 256)
                # no compilation inside the timed run: buckets compiled so far (decode part) stay compiled, the
                # others are captured uncompiled (compiling every bucket the trace reaches takes minutes)
                engine.runner.compile_budget_s = min(engine.runner.compile_budget_s, engine.runner.compile_seconds)
                run_offline(engine, work[:16])  # warm up: graphs of the small buckets, lazy inits
                row["offline"] = run_offline(engine, work)
                row["offline"]["source"] = work[0]["source"]
                print(f"[{time.perf_counter() - started:.0f}s]  offline: {row['offline']}", flush=True)
                if peer is not None:
                    row["offline_peer_subset"] = run_offline(engine, work[:args.peer_requests])  # what the peers run
                    print(f"  offline, the peers' {args.peer_requests} requests: {row['offline_peer_subset']}",
                          flush=True)
            row["compile"] = dict(compiled=engine.runner.compiled, seconds=round(engine.runner.compile_seconds, 1),
                                  buckets=engine.runner.compiled_buckets)
            del engine, model
            free_memory(device)
            if "ab" in parts and name == "bench-kl-900m":
                shapes = [(4, 64), (8, 32)] if args.smoke else [(4, 1024), (16, 256)]
                try:
                    row["prefill_ab"] = prefill_ab(spec, device, dtype, shapes)
                except Exception as error:  # noqa: BLE001 - the decode A/B still runs
                    traceback.print_exc()
                    row["prefill_ab"] = {"error": short_error(error)}
                    free_memory(device)
                row["decode_ab"] = decode_ab(spec, device, dtype, decode_batches, decode_prompt, decode_steps,
                                             args.compile_budget, started + args.time_budget)
            if peer is not None and "offline" in parts:
                sub = work[:args.peer_requests]
                row["hf_fixed"] = run_hf(peer, spec["peer"], "fixed", sub, 150)
                print(f"  hf fixed batches: {row['hf_fixed']}", flush=True)
                if spec["peer"] == "dsv3":
                    row["hf_continuous"] = run_hf(peer, "dsv3", "cb", sub, 120)
                    print(f"  hf generate_batch: {row['hf_continuous']}", flush=True)
        except Exception as error:  # noqa: BLE001 - record it and go on with the next part
            traceback.print_exc()
            row["error"] = short_error(error)
            free_memory(device)
        off = row.get("offline", {})
        table.append([name, off.get("useful_tokens_per_s"), off.get("requests_per_s"), off.get("ttft_p50_s"),
                      row.get("offline_peer_subset", {}).get("useful_tokens_per_s"),
                      row.get("hf_fixed", {}).get("useful_tokens_per_s"),
                      row.get("hf_continuous", {}).get("useful_tokens_per_s"),
                      row.get(f"decode_b{decode_batches[0]}", {}).get("tokens_per_s"),
                      row.get(f"decode_b{decode_batches[1]}", {}).get("tokens_per_s"),
                      row.get(f"decode_b{decode_batches[1]}", {}).get("floor_tokens_per_s")])
        write_results(out, env, results, dict(extra, seconds=round(time.perf_counter() - started, 1)))
    if "long" in parts:
        hybrid = presets["bench-kl-900m"]
        all_mla = dict(hybrid, overrides=dict(hybrid.get("overrides", {}), mixers="A"))
        layouts = {"hybrid-KKKA": hybrid, "all-MLA": all_mla}
        for name, spec in layouts.items():
            try:
                results[f"long/{name}"] = long_context(spec, device, dtype, long_ctx, 3 if args.smoke else 8, 0.8)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                results[f"long/{name}"] = {"error": short_error(error)}
                free_memory(device)
            print(f"  long {name}: {results[f'long/{name}']}", flush=True)
            write_results(out, env, results, dict(extra, seconds=round(time.perf_counter() - started, 1)))
    print_table(["model", "engine tok/s", "req/s", "TTFT p50 s", "engine tok/s (peer subset)", "HF fixed tok/s",
                 "HF CB tok/s", f"decode b{decode_batches[0]}", f"decode b{decode_batches[1]}", "floor"], table)
    ab = results.get("bench-kl-900m", {}).get("decode_ab")
    if ab:
        print_table(["decode variant"] + [f"b{b} ms/step" for b in decode_batches]
                    + [f"b{b} tok/s" for b in decode_batches] + ["KDA kernel", "compiled", "compile s"],
                    [[variant] + [r.get(f"b{b}", {}).get("step_ms") for b in decode_batches]
                     + [r.get(f"b{b}", {}).get("tokens_per_s") for b in decode_batches]
                     + [r.get("kda_decode_kernel"), r.get("compiled"), r.get("compile_s")]
                     for variant, r in ab.items()])
    write_results(out, env, results, dict(extra, seconds=round(time.perf_counter() - started, 1)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
