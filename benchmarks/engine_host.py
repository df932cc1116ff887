"""Host time of the engine's decode step: the Python work of Engine.step() outside the model forward
(scheduling, block tables, input tensors, sampling, stop checks, outputs), on the CPU with the tiny preset.

    python benchmarks/engine_host.py            # batches 16, 128, 512 and 1024, prompt 64, both modes
    python benchmarks/engine_host.py --profile  # also print where the host time goes (cProfile, largest batch)
    python benchmarks/engine_host.py --modes plain-attn,verify-attn --batches 256,1024   # speculative verify steps

Modes: "greedy" (temperature 0, outputs streamed every step: the server's shape) and "sampled" (temperature 1,
top_p 0.95, a seed and logprobs=0 per request, finished outputs only: RL rollouts' shape); "verify-attn": greedy
on an attention-only model (mixers "AA": its verify rows run in the graphed step) where every sequence verifies a
draft of 4 tokens each step (a drafter that repeats the last token: mostly rejected, so every step is a verify
step), and "plain-attn", the same model without drafts (batch: sequences, not graph rows); "suffix-attn" (not run
by default): an RL rollout's shape on that model, "sampled" requests in groups of GROUP sharing a prompt, with Seer's
grouped drafts (speculative="suffix"; the drafter's indexing and lookups count as host work; a random model's
drafts are mostly rejected, so most rows verify every step); "penalized" (not run by
default): "sampled" with frequency 0.5, presence 0.2 and repetition 1.1 penalties, whose adjustment of the logits
(`sampling.apply_penalties`, its [rows, vocab] arithmetic included: on a GPU that part is kernels) counts as host
work. The step runs
use_cuda_graph="static" (the padded step a CUDA graph captures, the path CUDA decodes take; a batch above the
largest graph bucket runs eagerly); the model's forward and the sampling kernels (DEVICE_CALLS) inside are timed
separately and taken off. Times are this thread's CPU time (time.thread_time), so other
processes on a shared machine do not inflate them; the forward still runs, so sampling sees real logits.
host ms/step is the median step; the mean includes the steps in which Python's garbage collector made a full pass
(GC ms/step: the collector's time while timed, in the forward or not; the first Engine of a process freezes the
objects of start-up, `nanokimi.runtime.host.freeze_startup_objects`, so full passes no longer walk torch and the model).
"""
import argparse
import os
import cProfile
import gc
import importlib
import pstats
import statistics
import time
from pathlib import Path

import torch

from perf_common import environment, print_table, results_path, write_results
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine, SamplingParams
from nanokimi.model import build_model

MODES = ("greedy", "sampled", "plain-attn", "verify-attn", "penalized", "suffix-attn")
DEFAULT_MODES = MODES[:4]
DRAFT = 4  # tokens a verify-attn sequence drafts each step
GROUP = 16  # suffix-attn: samples per prompt
# device work besides the forward, timed and taken off like it: the sampling kernels (sort, softmax, cumsum,
# searchsorted) and the logprob kernels (log_softmax, topk) cost milliseconds on the CPU, microseconds of
# launches on a GPU; the parameters' and results' copies inside them are counted as device work too
DEVICE_CALLS = (("nanokimi.infer.sampling", "sample_rows"), ("nanokimi.infer.sampling", "_logprob_parts"))
PROFILE_SORT = tuple(os.environ.get("PROFILE_SORT", "tottime").split(","))


class RepeatDrafter:
    """Drafts the sequence's last token `limit` times: a verify row of 1 + limit tokens every step."""

    def track(self, seq):
        pass

    observe = release = track

    def propose(self, seq, limit):
        return [seq.tokens[-1]] * limit


def request_params(mode: str, max_tokens: int, i: int) -> SamplingParams:
    if mode == "penalized":
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=i, logprobs=0, ignore_eos=True,
                              frequency_penalty=0.5, presence_penalty=0.2, repetition_penalty=1.1)
    if mode == "suffix-attn":
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=i, ignore_eos=True,
                              group_id=str(i // GROUP))
    if mode != "sampled":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=i, logprobs=0, ignore_eos=True)


def host_ms(model, mode: str, batch: int, prompt: int, steps: int, profile: bool = False,
            gc_off: bool = False) -> dict:
    draft = DRAFT if mode in ("verify-attn", "suffix-attn") else 0
    drafter = "suffix" if mode == "suffix-attn" else RepeatDrafter()
    speculative = dict(speculative=drafter, num_speculative_tokens=DRAFT) if draft else {}
    engine = Engine(model, max_num_seqs=max(256, batch), use_cuda_graph="static", max_step_tokens=8192,
                    max_cache_tokens=batch * (prompt + steps * (1 + draft) + 64), **speculative)
    engine.stream_outputs = mode not in ("sampled", "penalized", "suffix-attn")
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        if mode != "suffix-attn" or i % GROUP == 0:
            ids = torch.randint(3, model.config.vocab_size, (prompt,), generator=g).tolist()
        engine.add_request(f"r{i}", ids, request_params(mode, steps * (1 + draft) + 16, i))
    while engine.scheduler.waiting or engine.num_waiting_prefill_tokens() > 0:
        engine.step()
    for _ in range(3):
        engine.step()
    forward = []  # per step: the model's own calls (a batch above the graph buckets runs eagerly) and DEVICE_CALLS
    hidden_states, lm_head = model.hidden_states, model.lm_head.forward
    device_calls = [(importlib.import_module(module), name) for module, name in DEVICE_CALLS]
    originals = [getattr(module, name) for module, name in device_calls]

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.thread_time()
            out = fn(*args, **kwargs)
            forward[-1] += time.thread_time() - t0
            return out
        return call

    model.hidden_states, model.lm_head.forward = timed(hidden_states), timed(lm_head)
    for (module, name), fn in zip(device_calls, originals):
        setattr(module, name, timed(fn))
    total = []
    collections = []  # (generation, seconds) of the garbage collector's passes while timed
    started = []

    def on_gc(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections.append((info["generation"], time.perf_counter() - started.pop()))

    profiler = cProfile.Profile() if profile else None
    if gc_off:
        gc.collect()
        gc.disable()
    gc.callbacks.append(on_gc)
    try:
        for _ in range(steps):
            if profiler is not None:
                profiler.enable()
            forward.append(0.0)
            t0 = time.thread_time()
            engine.step()
            total.append(time.thread_time() - t0)
            if profiler is not None:
                profiler.disable()
    finally:
        gc.callbacks.remove(on_gc)
        gc.enable()
        del model.hidden_states, model.lm_head.forward
        for (module, name), fn in zip(device_calls, originals):
            setattr(module, name, fn)
    if profiler is not None:
        print(f"\n{mode}, batch {batch}: the engine's functions by own time (forward included; {steps} steps)")
        pstats.Stats(profiler).sort_stats(*PROFILE_SORT).print_stats(r"infer|builtins|method", 25)
    host = [t - f for t, f in zip(total, forward)]
    median = statistics.median(host)
    return dict(mode=mode, batch=batch, prompt=prompt, steps=steps, host_ms=round(median * 1e3, 3),
                host_us_per_row=round(median * 1e6 / batch, 2),
                host_mean_ms=round(statistics.mean(host) * 1e3, 3),  # with the garbage collector's full passes
                gc_full_passes=sum(generation == 2 for generation, _ in collections),
                gc_ms_per_step=round(sum(seconds for _, seconds in collections) * 1e3 / steps, 3),
                device_ms=round(statistics.median(forward) * 1e3, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,128,512,1024")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join(MODES)}")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="cProfile the steps of the largest batch")
    ap.add_argument("--gc-off", action="store_true", help="Python's garbage collector off while timed (its full "
                    "passes land in whichever step allocates; verify steps allocate more)")
    ap.add_argument("--name", default="tiny-KA", help="the results' key (e.g. a label for a before/after pair)")
    ap.add_argument("--out")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise SystemExit(f"engine_host.py: error: --modes takes {', '.join(MODES)}; got {args.modes!r}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {}
    for mixers in ("KA", "AA"):  # the hybrid for greedy/sampled, attention only for the verify comparison
        cfg = ModelConfig.preset("tiny", vocab_size=512, num_layers=2, mixers=mixers, max_position_embeddings=2048)
        torch.manual_seed(0)
        models[mixers] = build_model(cfg).eval()
    batches = [int(b) for b in args.batches.split(",")]
    rows = [host_ms(models["AA" if mode.endswith("-attn") else "KA"], mode, b, args.prompt, args.steps,
                    args.profile and b == max(batches), args.gc_off)
            for mode in modes for b in batches]
    print_table(["mode", "batch", "host ms/step", "host us/row", "host mean ms", "GC ms/step", "full GC passes",
                 "device ms/step"],
                [[r["mode"], r["batch"], r["host_ms"], r["host_us_per_row"], r["host_mean_ms"], r["gc_ms_per_step"],
                  r["gc_full_passes"], r["device_ms"]] for r in rows])
    out = results_path("engine_host", False) if args.out is None else Path(args.out)
    write_results(out, environment(torch.device("cpu")), {args.name: rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
