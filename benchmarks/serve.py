"""Mooncake trace replay against `nanokimi serve` and `transformers serve --continuous-batching`.

    python benchmarks/serve.py            # bench-dsv3-900m (+ HF peer) and bench-kl-900m on one GPU (~9 min)
    python benchmarks/serve.py --smoke    # CPU, tiny models, a scaled-down trace (writes to a temp folder)
    python benchmarks/serve.py --smoke --requests 160 --length-scale 0.25 --max-input 16384 \
        --gpu-cache-tokens 65536 --step-tokens 4096 --cpu-tier-gb 16 --output-scale 1   # tiny models, full window
    python benchmarks/serve.py --smoke --smoke-peer --presets bench-dsv3-900m   # + transformers serve (accelerate)

The trace (../shared/data/mooncake/synthetic_trace.jsonl, Mooncake's FAST'25 release) gives each request an
arrival time, input and output lengths and the hash ids of its 512-token prefix blocks. Each hash id becomes a
block of text made of tokens drawn from a generator seeded by the id, so equal ids are equal text and shared
prefixes are really shared; lengths are scaled by --length-scale (block = 512 x scale tokens). Every system gets
the same text prompts over HTTP (/v1/completions, streamed, greedy, max_tokens = the scaled output length) from
a client in its own process, at the trace's arrival times sped up by the time scale.

The time scale comes from a measurement (unless --time-scale is given): per preset, the engine's throughput
without prefix caching on requests spread over the window (requests/s, all submitted at once) times --load
(1.3) is the arrival rate. So the offered load means the same on any GPU: more than the server sustains without
caching, less than it sustains when half the prompt tokens are cached.

nanokimi runs on a GPU pool of --gpu-cache-tokens (far below the window's prefix working set): prefix caching
off, on, on with a pinned CPU tier of --cpu-tier-gb (`cpu`), all serving every request; `--modes ... cpu-slo`
adds the same with SLO admission (early 429s) at --ttft-slo-ms / --tbt-slo-ms. Reported per run: TTFT and TPOT
p50/p99 over completed requests, goodput (requests per second of trace time that completed within both SLOs),
reject rate, prefix-hit rate per tier, the CPU tier's copies; failed requests keep their reason (`first_error`,
`errors`).
The JSON is rewritten after every run. Weights are random (bench presets); lengths come from max_tokens.
"""
import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf_common import ROOT, environment, free_memory, print_table, results_path, write_results

TRACES = [base / "data" / "mooncake" / "synthetic_trace.jsonl"
          for base in (ROOT / "shared", ROOT.parent / "shared", ROOT.parent.parent / "shared")]
TRACE = next((t for t in TRACES if t.is_file()), TRACES[1])
PRESETS = ("bench-dsv3-900m", "bench-kl-900m")  # dsv3 first: its peer run lands before a cut-off
PEER_PRESETS = ("bench-dsv3-900m",)  # transformers has no KDA model to serve bench-kl-900m's layout with
MODES = {  # name: (prefix caching, CPU tier, SLO admission)
    "off": (False, False, False), "on": (True, False, False), "cpu": (True, True, False), "cpu-slo": (True, True, True)}
SMOKE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kda_num_heads=2, kda_head_dim=16,
             intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             first_k_dense=1, vocab_size=512, max_position_embeddings=4096)
MLA_CACHE_NOTE = (" (why: this transformers' continuous-batching paged cache sizes keys and values by "
                  "config.head_dim, which DeepseekV3Config sets to qk_rope_head_dim, narrower than MLA's keys "
                  "(qk_nope_head_dim + qk_rope_head_dim): every request fails; transformers 5.25 sizes MLA caches "
                  "right: see docs/serve.md for the wheels to carry)")
SMOKE_ARGS = dict(requests=24, length_scale=1 / 64, max_input=512, gpu_cache_tokens=768, cpu_tier_gb=0.05,
                  step_tokens=256, output_scale=0.5, ttft_slo_ms=5000.0, tbt_slo_ms=1000.0)
TOKEN_RANGE = (300, 500)  # merged tokens of the benchmark tokenizer: one token each when re-encoded


def load_trace(path: Path, start: int, requests: int, length_scale: float, time_scale: float, output_scale: float,
               max_input: int) -> list[dict]:
    """Lines start .. start+requests, scaled: arrival (s, from the first), block list (hash id, tokens), max_tokens."""
    block = max(1, round(512 * length_scale))
    out, t0 = [], None
    with path.open() as f:
        for i, line in enumerate(f):
            if len(out) == requests:
                break
            if i < start:
                continue
            r = json.loads(line)
            t0 = r["timestamp"] if t0 is None else t0
            tokens = min(max(1, round(r["input_length"] * length_scale)), max_input)
            blocks, left = [], tokens
            for h in r["hash_ids"]:
                if left <= 0:
                    break
                blocks.append((h, min(block, left)))
                left -= block
            out.append(dict(arrival=(r["timestamp"] - t0) / 1000 / time_scale, blocks=blocks, input_tokens=tokens,
                            max_tokens=max(1, round(r["output_length"] * output_scale))))
    return out


def block_text(tokenizer, h: int, n: int) -> str:
    rng = random.Random(h)
    return tokenizer.decode([rng.randrange(*TOKEN_RANGE) for _ in range(n)])


def make_tokenizer(folder: Path):
    """A small BPE tokenizer (stdlib source); the models' larger vocabularies only produce unknown ids, which
    decode to nothing: fine, output lengths come from max_tokens."""
    import json as json_module

    from nanokimi.data import Tokenizer
    texts = [Path(json_module.__file__).read_text(), Path(argparse.__file__).read_text(),
             Path(asyncio.__file__).parent.joinpath("base_events.py").read_text()]
    tokenizer = Tokenizer.train(texts, vocab_size=512)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>"}))
    return tokenizer


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def request_body(model: str, prompt: str, max_tokens: int) -> dict:
    """The one request every system gets: a streamed greedy /v1/completions call. Each field is one that both
    nanokimi's schema and transformers serve's (CompletionCreateParams) accept; transformers 5.17 ignores
    stream_options and puts the usage on its last chunk anyway."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def read_stream(lines: list[tuple[float, str]]) -> dict:
    """Folds one SSE reply, (arrival time, line) pairs, into its first and last token-frame times, the frame
    count, the usage and an error. An error frame (transformers serve sends `data: {"error": ...}` with HTTP 200
    when generation fails), a line that is not JSON, or a reply with neither a frame with choices nor usage is an
    error, with the offending line kept for the log."""
    out = dict(first=None, last=None, frames=0, usage=None, error=None)
    for t, line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except json.JSONDecodeError:
            return dict(out, error=f"a stream line that is not JSON: {line[:600]}")
        if not isinstance(chunk, dict) or "error" in chunk:
            return dict(out, error=f"an error frame in the stream: {line[:600]}")
        out["usage"] = chunk.get("usage") or out["usage"]
        if chunk.get("choices"):
            out["first"] = out["first"] or t
            out["last"] = t
            out["frames"] += 1
    if out["first"] is None and not out["usage"]:
        out["error"] = "a stream with no token frame and no usage: " + " | ".join(x for _, x in lines)[:600]
    return out


async def _replay(url: str, model: str, work: list[dict], timeout_s: float) -> list[dict]:
    import httpx

    async def one(http, r, t0):
        await asyncio.sleep(max(0.0, t0 + r["arrival"] - time.perf_counter()))
        body = request_body(model, r["prompt"], r["max_tokens"])
        start = time.perf_counter()
        lines = []
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return dict(status=resp.status_code, error=f"HTTP {resp.status_code}: {text[:600]}")
                async for line in resp.aiter_lines():
                    lines.append((time.perf_counter(), line))
        except httpx.HTTPError as e:
            return dict(status=-1, error=f"{type(e).__name__}: {e}")
        got = read_stream(lines)
        if got["error"] is not None:
            return dict(status=-1, error=got["error"])
        first, last, usage = got["first"], got["last"], got["usage"]
        tokens = usage["completion_tokens"] if usage else got["frames"]
        return dict(status=200, ttft=None if first is None else first - start,
                    tpot=(last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
                    e2e=time.perf_counter() - start, completion_tokens=tokens,
                    prompt_tokens=usage["prompt_tokens"] if usage else None)

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(http, r, t0)) for r in work]
        await asyncio.wait(tasks, timeout=timeout_s)
        for task in tasks:  # past the time limit: the unfinished count as failed (status -2)
            task.cancel()
        return [t.result() if t.done() and not t.cancelled() else dict(status=-2, error="replay time limit")
                for t in tasks]


def run_client(url: str, model: str, work: list[dict], timeout_s: float) -> list[dict]:
    """Replay `work` from a separate process (the server's threads and the client do not share a GIL)."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "work.json", Path(tmp) / "out.json"
        job.write_text(json.dumps(dict(url=url, model=model, work=work, timeout_s=timeout_s)))
        subprocess.run([sys.executable, __file__, "--client", str(job), str(out)], check=True,
                       timeout=timeout_s + 60)
        return json.loads(out.read_text())


def summarize(results: list[dict], work: list[dict], ttft_slo: float, tpot_slo: float) -> dict:
    done = [r for r in results if r["status"] == 200 and r.get("ttft") is not None]
    ttft = [r["ttft"] for r in done]
    tpot = [r["tpot"] for r in done if r["tpot"] is not None]
    good = [r for r in done if r["ttft"] <= ttft_slo and (r["tpot"] is None or r["tpot"] <= tpot_slo)]
    span = max(w["arrival"] for w in work) - min(w["arrival"] for w in work)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return dict(requests=len(results), completed=len(done), rejected=sum(r["status"] == 429 for r in results),
                failed=sum(r["status"] not in (200, 429) for r in results),
                reject_rate=round(sum(r["status"] == 429 for r in results) / len(results), 4),
                ttft_p50_ms=ms(percentile(ttft, 50)), ttft_p99_ms=ms(percentile(ttft, 99)),
                tpot_p50_ms=ms(percentile(tpot, 50)), tpot_p99_ms=ms(percentile(tpot, 99)),
                goodput_rps=round(len(good) / max(span, 1e-9), 4), good_fraction=round(len(good) / len(results), 4),
                trace_span_s=round(span, 2),
                prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in done),
                completion_tokens=sum(r.get("completion_tokens") or 0 for r in done),
                first_error=next((r.get("error") for r in results if r["status"] not in (200, 429)), None),
                errors=failure_counts(results))


def failure_counts(results: list[dict], keep: int = 3) -> dict[str, int]:
    """The most frequent failure messages (not 429s) with their counts: a GPU run's log and JSON say why
    requests failed."""
    counts: dict[str, int] = {}
    for r in results:
        if r["status"] not in (200, 429) and r.get("error"):
            counts[r["error"]] = counts.get(r["error"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:keep])


def compile_costs(at_start: dict, at_end: dict) -> dict:
    """Seconds the engine spent compiling decode graphs while starting and during the replay, and its graphs:
    torch.compile's caches live in the process, so a run after another may find its graphs already compiled
    (the first H100 run's `on` server took 31.6 s to start against 3.3 s for `off` and `cpu`)."""
    start, end = at_start.get("compile_seconds", 0.0), at_end.get("compile_seconds", 0.0)
    return dict(compile_s_startup=start, compile_s_replay=round(end - start, 1),
                cuda_graphs=at_end.get("cuda_graphs", 0), cuda_graphs_compiled=at_end.get("cuda_graphs_compiled", 0))


def result_keys(rows: list[dict]) -> dict[str, dict]:
    """The JSON's rows by "preset / system / mode"; a mode run again (`--modes on off on`) gets " #2", " #3"."""
    out: dict[str, dict] = {}
    for r in rows:
        key = base = f"{r['preset']} / {r['system']} / {r['mode']}"
        repeat = 1
        while key in out:
            repeat += 1
            key = f"{base} #{repeat}"
        out[key] = r
    return out


def run_nanokimi(model, tokenizer, template, mode: str, work, args, device) -> dict:
    import torch

    from nanokimi.infer import LLM
    from nanokimi.serve.app import ServeOptions, Server, _engine_kwargs, _tier_store, create_app
    from nanokimi.serve.run import BackgroundServer

    caching, cpu_tier, admission = MODES[mode]
    options = ServeOptions(max_cache_tokens=args.gpu_cache_tokens, enable_prefix_caching=caching,
                           kv_offload_gb=args.cpu_tier_gb if cpu_tier else 0.0,
                           ttft_slo_ms=args.ttft_slo_ms if admission else None,
                           tbt_slo_ms=args.tbt_slo_ms if admission else None,
                           max_step_tokens=args.step_tokens, served_model_name="bench", max_body_bytes=16 << 20,
                           max_wait_ms=args.max_wait_ms)
    llm = LLM(model, tokenizer=tokenizer, device=str(device), kv_tiers=_tier_store(options, "bench"),
              **_engine_kwargs(options))
    server = Server.from_llm(llm, template, "bench", options)
    started = time.perf_counter()
    with BackgroundServer(create_app(server)) as bg:
        ready_s = time.perf_counter() - started
        at_start = server.loop.snapshot().get("raw", {})  # the engine thread owns the engine: read its snapshot
        results = run_client(bg.url, "bench", work, args.timeout)
        snapshot = server.loop.snapshot()
    row = summarize(results, work, args.ttft_slo_ms / 1000, args.tbt_slo_ms / 1000)
    queries = max(snapshot.get("prefix_cache_queries", 0), 1)
    for tier in ("gpu", "cpu", "disk"):
        hits = snapshot["tiers"].get(tier, {}).get("hit_tokens")
        row[f"prefix_hit_rate_{tier}"] = None if hits is None or mode == "off" else round(hits / queries, 4)
    row.update(preemptions=snapshot.get("preemptions", 0), prompt_tokens_computed=snapshot.get("prefill_tokens", 0),
               startup_s=round(ready_s, 1),
               **compile_costs(at_start, snapshot["raw"]))
    if cpu_tier:
        store = llm.engine.tiers.store.counters
        row.update(tier_offloads=store["offloads"], tier_offloads_hit=store["offloads_hit"],
                   tier_gb_down=round(store["bytes_down"] / 2**30, 3), tier_gb_up=round(store["bytes_up"] / 2**30, 3))
    del server, llm
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_transformers_peer(model, tokenizer_dir: Path, work, args, device, folder: Path, time_left) -> dict:
    """`transformers serve HF_DIR --continuous-batching` in a subprocess, the same client against it."""
    import httpx

    from nanokimi.interop.hf import save_hf

    hf_dir = folder / "hf"
    save_hf(model, hf_dir, layout="deepseek_v3", tokenizer_path=tokenizer_dir / "tokenizer.json", overwrite=True)
    shutil.copyfile(tokenizer_dir / "tokenizer_config.json", hf_dir / "tokenizer_config.json")
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    version = importlib.metadata.version("transformers")  # the one `exe` imports: same environment and path
    port = 18000 + os.getpid() % 1000
    help_text = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120).stdout
    dtype_flag = "--dtype" if "--dtype" in help_text else "--torch-dtype"  # the flag's name changed across versions
    cmd = [exe, "serve", str(hf_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cuda:0" if device.type == "cuda" else "cpu", dtype_flag,
           "bfloat16" if device.type == "cuda" else "float32"]
    log = (folder / "transformers_serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started, deadline = time.perf_counter(), time.monotonic() + args.peer_startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({proc.returncode}): "
                                   + (folder / "transformers_serve.log").read_text()[-800:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("transformers serve did not come up in time")
            time.sleep(1)
        warm = run_client(url, str(hf_dir), work[:2], 120)  # first requests: lazy initialisation, warm-up
        broken = [r for r in warm if r["status"] != 200 or r.get("ttft") is None]
        if broken:
            print(f"  transformers serve's first failing response: {broken[0]}", flush=True)
            error = str(broken[0].get("error", broken[0]))
            raise RuntimeError(f"transformers {version} serve failed the warm-up request: {error}"
                               + (MLA_CACHE_NOTE if "index_copy_" in error else ""))
        ready_s = time.perf_counter() - started
        results = run_client(url, str(hf_dir), work, max(60.0, min(args.timeout, time_left())))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    row = summarize(results, work, args.ttft_slo_ms / 1000, args.tbt_slo_ms / 1000)
    row.update(prefix_hit_rate_gpu=None, prefix_hit_rate_cpu=None, prefix_hit_rate_disk=None, preemptions=None,
               startup_s=round(ready_s, 1), transformers=version)
    return row


def measure_capacity(model, tokenizer, work: list[dict], args, device, probes: int = 32) -> float:
    """Requests per second the engine completes with prefix caching off: `probes` requests spread evenly over
    the replay, submitted at once (after a warm-up), on the benchmark's GPU pool and step size. The replay speed
    is set against it, so the offered load means the same on any GPU."""
    from nanokimi.infer import LLM, SamplingParams
    from nanokimi.serve.app import ServeOptions, _engine_kwargs

    options = ServeOptions(max_cache_tokens=args.gpu_cache_tokens, enable_prefix_caching=False,
                           max_step_tokens=args.step_tokens)
    llm = LLM(model, tokenizer=tokenizer, device=str(device), **_engine_kwargs(options))
    picked = work[::max(1, len(work) // probes)][:probes]
    prompts = [tokenizer.encode(r["prompt"]) for r in picked]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0) for r in picked]
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up
    started = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - started
    del llm
    free_memory(device)
    return len(picked) / seconds


def working_set_tokens(trace: list[dict]) -> int:
    """Tokens of the distinct prefix blocks in the replay (a trace hash id names a block and its whole prefix)."""
    blocks = {}
    for r in trace:
        for h, n in r["blocks"]:
            blocks[h] = max(blocks.get(h, 0), n)
    return sum(blocks.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, scaled-down trace")
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=["off", "on", "cpu"], choices=list(MODES),
                    help="off / on: prefix caching; cpu: + CPU tier; cpu-slo: + SLO admission (early 429s); "
                         "a mode named twice runs twice (the second run finds the first's compiled graphs)")
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--start", type=int, default=3693,
                    help="first trace line replayed (the trace's start shares few prefixes: its cache is cold)")
    ap.add_argument("--requests", type=int, default=160, help="requests replayed from --start")
    ap.add_argument("--length-scale", type=float, default=0.25, help="prompt tokens per trace token")
    ap.add_argument("--output-scale", type=float, default=1.0, help="output tokens per trace token")
    ap.add_argument("--load", type=float, default=1.3,
                    help="arrival rate as a multiple of the engine's measured no-caching capacity (sets the speed)")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="replay this many times faster than the trace (instead of --load)")
    ap.add_argument("--max-input", type=int, default=16384, help="prompts are cut to this many tokens")
    ap.add_argument("--gpu-cache-tokens", type=int, default=65536, help="GPU KV pool of every nanokimi run")
    ap.add_argument("--cpu-tier-gb", type=float, default=16.0)
    ap.add_argument("--step-tokens", type=int, default=4096)
    ap.add_argument("--max-wait-ms", type=float, default=2000.0,
                    help="the server's bound on cache-aware reordering and hold-backs; 0: arrival order, no hold-backs")
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--tbt-slo-ms", type=float, default=100.0, help="TBT SLO; goodput uses it for TPOT")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip transformers serve")
    ap.add_argument("--smoke-peer", action="store_true", help="with --smoke: run transformers serve too")
    ap.add_argument("--peer-startup-timeout", type=float, default=180)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one replay may take")
    ap.add_argument("--budget-s", type=float, default=360,
                    help="skip the runs that would start after this many seconds (the peer's replay stops 60 s later)")
    ap.add_argument("--out", help="results file (default benchmarks/results/serve.json)")
    ap.add_argument("--client", nargs=2, metavar=("WORK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        job = json.loads(Path(args.client[0]).read_text())
        results = asyncio.run(_replay(job["url"], job["model"], job["work"], job["timeout_s"]))
        Path(args.client[1]).write_text(json.dumps(results))
        return 0

    import torch

    from nanokimi import ModelConfig, build_model
    from nanokimi.data.chat import ChatTemplate

    if not Path(args.trace).is_file():
        print(f"the trace {args.trace} is missing (Mooncake's synthetic_trace.jsonl)", file=sys.stderr)
        return 2
    if args.load <= 0 or (args.time_scale is not None and args.time_scale <= 0):
        print("--load and --time-scale must be > 0", file=sys.stderr)
        return 2
    if args.smoke:  # scaled-down values, except for the options given on the command line
        given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        for name, value in SMOKE_ARGS.items():
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
        args.peer = args.peer and args.smoke_peer  # transformers serve takes a minute or two to start on a small CPU
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    presets = args.presets or PRESETS
    folder = Path(tempfile.mkdtemp(prefix="nanokimi-serve-bench-"))
    tokenizer = make_tokenizer(folder)
    template = ChatTemplate()
    trace = load_trace(Path(args.trace), args.start, args.requests, args.length_scale, 1.0, args.output_scale,
                       args.max_input)
    prompts = ["".join(block_text(tokenizer, h, n) for h, n in r["blocks"]) for r in trace]
    native_rps = len(trace) / max(trace[-1]["arrival"], 1e-9)
    print(f"trace: {len(trace)} requests over {trace[-1]['arrival']:.1f} s as recorded, prompts "
          f"{args.length_scale:g} x trace (median {statistics.median(r['input_tokens'] for r in trace)} tokens, "
          f"prefix working set {working_set_tokens(trace)} tokens), GPU pool {args.gpu_cache_tokens} tokens, "
          f"SLO TTFT {args.ttft_slo_ms:g} ms / TBT {args.tbt_slo_ms:g} ms", flush=True)
    out = Path(args.out) if args.out else results_path("serve", args.smoke)
    extra = dict(trace=str(args.trace), start=args.start, requests=len(trace), length_scale=args.length_scale,
                 output_scale=args.output_scale, max_input=args.max_input, gpu_cache_tokens=args.gpu_cache_tokens,
                 prefix_working_set_tokens=working_set_tokens(trace), cpu_tier_gb=args.cpu_tier_gb,
                 step_tokens=args.step_tokens, max_wait_ms=args.max_wait_ms, ttft_slo_ms=args.ttft_slo_ms,
                 tbt_slo_ms=args.tbt_slo_ms)
    rows = []

    def record(row: dict) -> None:  # the JSON is rewritten after every run: a cut-off run keeps what it measured
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
        if row.get("first_error"):
            print(f"  {row['system']} {row['mode']}: first failing response: {row['first_error']}", flush=True)
        write_results(out, environment(device), result_keys(rows), extra=extra)

    for preset in presets:
        overrides = dict(SMOKE, mixers="KA" if "kl" in preset else "A",
                         max_position_embeddings=max(4096, 2 * args.max_input)) if args.smoke else {}
        cfg = ModelConfig.preset(preset, **overrides)
        torch.manual_seed(0)
        model = build_model(cfg, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        speed = dict(time_scale=args.time_scale)
        if args.time_scale is None:
            try:
                capacity = measure_capacity(model, tokenizer, [dict(prompt=p, max_tokens=r["max_tokens"])
                                                               for p, r in zip(prompts, trace)], args, device)
            except Exception as e:  # noqa: BLE001 - recorded; the other preset goes on
                record(dict(preset=preset, system="nanokimi", mode="capacity",
                            error=f"measuring the no-caching capacity failed: {type(e).__name__}: {str(e)[:600]}"))
                del model
                free_memory(device)
                continue
            speed = dict(capacity_rps_no_caching=round(capacity, 3), load=args.load,
                         time_scale=round(min(64.0, max(0.05, args.load * capacity / native_rps)), 4))
        work = [dict(arrival=r["arrival"] / speed["time_scale"], max_tokens=r["max_tokens"], prompt=p)
                for p, r in zip(prompts, trace)]
        print(f"{preset}: {json.dumps(speed)}: {len(work)} requests arrive over {work[-1]['arrival']:.1f} s",
              flush=True)
        for mode in args.modes:
            if time.perf_counter() - began > args.budget_s:
                record(dict(preset=preset, system="nanokimi", mode=mode, error="skipped: --budget-s spent"))
                continue
            print(f"{preset} nanokimi {mode} ...", flush=True)
            try:
                row = run_nanokimi(model, tokenizer, template, mode, work, args, device)
            except Exception as e:  # noqa: BLE001 - recorded; the other runs go on
                row = dict(error=f"{type(e).__name__}: {str(e)[:600]}")
            record(dict(preset=preset, system="nanokimi", mode=mode, **speed, **row))
        if args.peer and preset in PEER_PRESETS:
            mode = "continuous batching"
            if time.perf_counter() - began > args.budget_s:
                record(dict(preset=preset, system="transformers serve", mode=mode, error="skipped: --budget-s spent"))
            else:
                print(f"{preset} transformers serve --continuous-batching ...", flush=True)
                try:
                    row = run_transformers_peer(model, folder, work, args, device, folder,
                                                lambda: args.budget_s + 60 - (time.perf_counter() - began))
                except Exception as e:  # noqa: BLE001 - the peer's failure is a result, nanokimi's rows stay
                    row = dict(error=f"{type(e).__name__}: {str(e)[:1200]}")
                record(dict(preset=preset, system="transformers serve", mode=mode, **speed, **row))
        del model
        free_memory(device)
    headers = ["preset", "system", "mode", "done", "429", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
               "goodput/s", "hit gpu", "hit cpu"]
    print_table(headers, [[r["preset"], r["system"], r["mode"], r.get("completed"), r.get("rejected"),
                           r.get("ttft_p50_ms"), r.get("ttft_p99_ms"), r.get("tpot_p50_ms"), r.get("tpot_p99_ms"),
                           r.get("goodput_rps"), r.get("prefix_hit_rate_gpu"), r.get("prefix_hit_rate_cpu")]
                          for r in rows])
    for preset in presets:
        got = {r["mode"]: r.get("ttft_p50_ms") for r in rows if r["preset"] == preset and r["system"] == "nanokimi"}
        if got.get("off") and got.get("cpu"):
            print(f"{preset}: p50 TTFT, caching off / caching + CPU tier: {got['off'] / got['cpu']:.2f}x")
    print(f"wrote {out}")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
