"""Seer (arXiv 2511.14617) on one GPU: the rollout of one RL step (prompts x k samples, temperature 1) through
the plain engine, each Seer technique, and all of them, in one 10-minute call.

    python benchmarks/rollout.py                       # one H100: pretrain a ladder+MuseD model, then roll out
    python benchmarks/rollout.py --model-ckpt runs/x   # reuse a checkpoint (skips pretraining)
    python benchmarks/rollout.py --smoke               # CPU, tiny model, about a minute (temp output)

Variants (engine options, docs/seer.md): plain; context (scheduling="context_aware": group probes first, then
the longest expected group); divided (context + chunk_tokens: running sequences yield their batch place at
chunk ends); suffix (speculative="suffix": drafts from the group's other samples); all (the three together).
Each variant rolls out twice on one engine and the second pass is timed (the first captures the CUDA graphs and
compiles the step for every shape the rollout meets, as in an RL run after its first steps). Per variant and
task: rollout wall time, steps and ms per step, generated tokens/s, p50/p99 request completion time, speculative
acceptance (mean tokens emitted per verified row), how many verify rows replayed the graphed decode step (of
all; a KDA hybrid's too, benchmarks/kda_verify.py) and how many graphs were captured while timed (0 expected).
Sampled outputs are compared with plain's (same per-request
seeds; speculation emits plain sampling's draws: equal unless batch composition changes a float);
a greedy run on a smaller batch reports the share of every variant's outputs equal to plain's (1.0 in exact
arithmetic; in bf16 a near-tie between two kernels' roundings can flip a sequence). Writes
benchmarks/results/rollout.json and rollout.png (completion-time distributions).
"""
import argparse
import gc
import json
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from perf_common import (environment, finish_training, print_table, results_path, train_for_seconds,
                         write_results)
from nanokimi.checkpoint import TOKENIZER, load_model_checkpoint, resolve_checkpoint
from nanokimi.data import Tokenizer
from nanokimi.tasks import get_task

VARIANTS = {
    "plain": {},
    "context": dict(scheduling="context_aware"),
    "divided": dict(scheduling="context_aware", chunk_tokens=128),
    "suffix": dict(speculative="suffix"),
    "all": dict(scheduling="context_aware", chunk_tokens=128, speculative="suffix"),
}
TASK_OPTIONS = {"ladder": dict(levels="1-8"), "mused": dict(levels="1-6")}


def _export(job):
    name, start, stop = job
    task = get_task(name, per_level=1, seed=0, **TASK_OPTIONS[name])
    return [json.dumps({"text": task.sft_text(task.generate("train", level, i))})
            for i in range(start, stop) for level in task.levels]


def export_traces(path: Path, tasks: list[str], count: int, workers: int) -> int:
    """About `count` training traces per task, levels mixed evenly, as jsonl (shuffled by interleaving)."""
    jobs = []
    for name in tasks:
        levels = len(get_task(name, **TASK_OPTIONS[name]).levels)
        indices = math.ceil(count / levels)
        step = max(1, indices // (workers * 4))
        jobs += [(name, i, min(i + step, indices)) for i in range(0, indices, step)]
    jobs = jobs[0::2] + jobs[1::2]
    written = 0
    with multiprocessing.get_context("fork").Pool(workers) as pool, open(path, "w") as f:
        for docs in pool.imap(_export, jobs):
            f.write("".join(d + "\n" for d in docs))
            written += len(docs)
    return written


def pretrain(args, data: Path, out: Path, device: str) -> dict:
    """A small GQA model trained from scratch on the traces for --pretrain-seconds."""
    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    m = args.model
    overrides = [f"data.source={data}", "data.text_field=text", f"data.vocab_size={args.vocab_size}",
                 f"data.dir={out.parent / 'shards'}", f"model.vocab_size={args.vocab_size}",
                 f"model.hidden_size={m['hidden']}", f"model.num_layers={m['layers']}", "model.mixers=G",
                 f"model.num_heads={m['heads']}", f"model.num_kv_heads={m['kv_heads']}", "model.head_dim=64",
                 f"model.intermediate_size={3 * m['hidden']}", f"model.max_position_embeddings={args.context}",
                 f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "train.max_steps=1000000",
                 f"train.device={device}", "train.eval_every=1000000", "train.save_every=1000000",
                 "train.log_every=100", "train.sample_tokens=0", "optim.lr=3e-3", "optim.warmup_steps=100",
                 "optim.min_lr_ratio=0.05"]
    started = time.perf_counter()
    trainer = Trainer(load_run_config("tiny-dense", None, overrides), out, progress=False)
    losses, _ = train_for_seconds(trainer, args.pretrain_seconds, started, warm=3, probe=10, margin=0.95)
    loss = finish_training(trainer, losses)[-1]
    trainer.save()
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"pretrained {params / 1e6:.1f}M params, {trainer.step} steps in {time.perf_counter() - started:.0f}s, "
          f"loss {loss:.3f}", flush=True)
    return {"params": params, "steps": trainer.step, "seconds": time.perf_counter() - started, "final_loss": loss}


def rollout(model, tokenizer, prompts: list[list[int]], k: int, max_tokens: int, temperature: float,
            stop: list[str], engine_kwargs: dict, seed: int) -> dict:
    """One RL step's rollout: each prompt k times (k requests of one group, seeds seed + j), like nanokimi rl.
    The same rollout runs twice on one engine and the second is timed: the first captures the CUDA graphs
    (and compiles the step) of every shape the rollout meets, as an RL run's engine has done after its first
    steps. Timing a first pass measured compilation: variants that met new shapes paid for them, later ones
    reused the compiled code (docs/seer.md)."""
    from nanokimi.infer import Engine, SamplingParams

    engine = Engine(model, tokenizer, **engine_kwargs)

    def one_pass(engine, tag: str) -> tuple[float, dict, dict]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.monotonic()
        for g, ids in enumerate(prompts):
            for j in range(k):
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + g * k + j,
                                        stop=stop or None, group_id=str(g))
                engine.add_request(f"{tag}{g}.{j}", ids, params, arrival_time=start)
        outputs = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id[len(tag):]] = out
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return start, outputs, engine_counts(engine)

    one_pass(engine, "warm")
    engine.reset_prefix_cache()  # the timed pass computes its prompts again, as the first pass did
    before = engine_counts(engine)
    start, outputs, after = one_pass(engine, "")
    wall = time.monotonic() - start
    spent = {key: after[key] - before[key] for key in after}
    done = sorted(o.metrics["finished_time"] - start for o in outputs.values())
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    rows, steps = spent["spec_verify_rows"], spent["steps"]
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": done[len(done) // 2], "p99_s": done[min(len(done) - 1, math.ceil(0.99 * len(done)) - 1)],
            "completion_times": done, "steps": steps, "ms_per_step": 1000 * wall / max(steps, 1),
            "spec_rows": rows, "spec_tokens_per_row": (spent["spec_accepted_tokens"] + rows) / rows if rows else None,
            "spec_acceptance": spent["spec_accepted_tokens"] / spent["spec_draft_tokens"] if rows else None,
            "verify_rows_graphed": spent["verify_graphed"], "verify_rows_eager": spent["verify_eager"],
            "graphs_captured_while_timed": spent["cuda_graphs"], "compile_s_while_timed": spent["compile_seconds"],
            "prefill_tokens": spent["prefill_tokens"], "suspensions": spent["suspensions"],
            "preemptions": spent["preemptions"], "outputs": {rid: o.outputs[0].token_ids for rid, o in outputs.items()},
            "mean_length": tokens / len(outputs)}


def engine_counts(engine) -> dict:
    """The engine's running totals that a pass is measured by (differences of two calls)."""
    stats = engine.stats()
    keys = ("steps", "spec_verify_rows", "spec_accepted_tokens", "spec_draft_tokens", "prefill_tokens", "suspensions",
            "preemptions", "cuda_graphs")
    return {**{key: stats[key] for key in keys}, "compile_seconds": engine.runner.compile_seconds,
            "verify_graphed": engine.runner.verify_rows["graphed"], "verify_eager": engine.runner.verify_rows["eager"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({key.split("/")[0] for key in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for key, row in results.items():
            if key.startswith(task + "/"):
                times = row["completion_times"]
                ax.plot(times, [(i + 1) / len(times) for i in range(len(times))], label=key.split("/")[1])
        ax.set(title=f"{task}: request completion time", xlabel="seconds since the rollout began",
               ylabel="fraction of requests done")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, about a minute; temp output")
    parser.add_argument("--model-ckpt", help="reuse this checkpoint (run or checkpoint folder) instead of pretraining")
    parser.add_argument("--tasks", default="ladder,mused")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=16, help="samples per prompt (one group)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-cache-tokens", type=int, default=400_000)
    parser.add_argument("--chunk-tokens", type=int, default=128, help="divided rollout's chunk")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--use-cuda-graph", default="auto", choices=["auto", "static", "off"],
                        help="the engine's use_cuda_graph; static: the graphed step's padded buffers, run eagerly "
                             "(the CPU's stand-in for graphs)")
    parser.add_argument("--docs", type=int, default=100_000, help="pretraining traces per task")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--pretrain-seconds", type=float, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--greedy-prompts", type=int, default=8, help="prompts of the greedy equality check")
    parser.add_argument("--budget-seconds", type=float, default=560, help="skip rollouts that would not fit")
    parser.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()))
    parser.add_argument("--out", help="work folder (default: a temp folder)")
    args = parser.parse_args()
    if args.smoke:
        args.docs, args.vocab_size, args.pretrain_seconds = 600, 300, 12
        args.batch_size, args.seq_len, args.prompts, args.k, args.max_tokens = 8, 128, 4, 4, 48
        args.hidden, args.layers, args.greedy_prompts, args.context, args.dtype = 64, 2, 2, 512, "float32"
        args.max_num_seqs, args.max_cache_tokens, args.chunk_tokens = 8, 8192, 16
    args.model = dict(hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                      kv_heads=max(1, args.hidden // 128))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wall = time.perf_counter()
    work = Path(args.out or tempfile.mkdtemp(prefix="rollout_"))
    work.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"rollout.py: error: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    pre = None
    if args.model_ckpt:
        base = resolve_checkpoint(args.model_ckpt)
    else:
        docs = export_traces(work / "traces.jsonl", tasks, args.docs, args.workers)
        print(f"exported {docs:,} traces", flush=True)
        pre = pretrain(args, work / "traces.jsonl", work / "base", device)
        base = resolve_checkpoint(work / "base")
    env = environment(torch.device(device))
    tokenizer = Tokenizer.load(base / TOKENIZER)
    model = load_model_checkpoint(base, device).to(getattr(torch, args.dtype)).eval()
    context = model.config.max_position_embeddings
    engine_kwargs = dict(max_num_seqs=args.max_num_seqs, num_speculative_tokens=args.num_speculative_tokens,
                         max_cache_tokens=args.max_cache_tokens,
                         use_cuda_graph={"auto": "auto", "static": "static", "off": False}[args.use_cuda_graph])
    for options in VARIANTS.values():
        if "chunk_tokens" in options:
            options["chunk_tokens"] = args.chunk_tokens
    results, checks, rows = {}, {}, []
    for task_name in tasks:
        task = get_task(task_name, per_level=max(1, args.prompts), seed=1, **TASK_OPTIONS[task_name])
        examples = task.examples("test")
        examples = [examples[i * len(examples) // args.prompts] for i in range(min(args.prompts, len(examples)))]
        prompts = [tokenizer.encode(task.prompt(e)) for e in examples]
        max_tokens = min(args.max_tokens, context - max(len(p) for p in prompts))
        greedy = {}
        for name in variants:  # greedy: every variant must give the very tokens of plain
            out = rollout(model, tokenizer, prompts[:args.greedy_prompts], 2, max_tokens, 0.0, list(task.stop),
                          {**engine_kwargs, **VARIANTS[name]}, seed=0)
            greedy[name] = out["outputs"]
        first = greedy[variants[0]]
        checks[task_name] = {name: sum(greedy[name][r] == first[r] for r in first) / len(first) for name in variants}
        print(f"{task_name}: share of greedy outputs equal to {variants[0]}'s: {checks[task_name]}", flush=True)
        for name in variants:
            spent = time.perf_counter() - wall
            last = max((r["call_s"] for r in results.values()), default=0.0)
            if spent + 1.5 * last > args.budget_seconds:
                print(f"skipping {task_name}/{name}: {spent:.0f}s spent of {args.budget_seconds:.0f}", flush=True)
                continue
            called = time.perf_counter()
            row = rollout(model, tokenizer, prompts, args.k, max_tokens, args.temperature, list(task.stop),
                          {**engine_kwargs, **VARIANTS[name]}, seed=1000)
            row["call_s"] = time.perf_counter() - called  # both passes, with the first one's captures
            plain = results.get(f"{task_name}/plain")
            row["same_outputs_as_plain"] = None if plain is None else sum(
                row["outputs"][r] == plain["outputs"][r] for r in plain["outputs"]) / len(plain["outputs"])
            results[f"{task_name}/{name}"] = row
            speedup = None if plain is None else plain["wall_s"] / row["wall_s"]
            p99_cut = None if plain is None else 1 - row["p99_s"] / plain["p99_s"]
            verify = row["verify_rows_graphed"] + row["verify_rows_eager"]
            rows.append([task_name, name, f"{row['wall_s']:.2f}", row["steps"], f"{row['ms_per_step']:.1f}",
                         f"{row['tokens_per_s']:,.0f}", f"{row['p50_s']:.2f}", f"{row['p99_s']:.2f}",
                         f"{row['mean_length']:.0f}",
                         "" if row["spec_tokens_per_row"] is None else f"{row['spec_tokens_per_row']:.2f}",
                         f"{row['verify_rows_graphed']}/{verify}" if verify else "",
                         row["graphs_captured_while_timed"],
                         "" if speedup is None else f"{speedup:.2f}x", "" if p99_cut is None else f"{p99_cut:+.0%}",
                         "" if row["same_outputs_as_plain"] is None else f"{row['same_outputs_as_plain']:.0%}"])
            print(f"{task_name}/{name}: {row['wall_s']:.2f}s, {row['tokens_per_s']:,.0f} tok/s", flush=True)
    print_table(["task", "variant", "wall s", "steps", "ms/step", "tok/s", "p50 s", "p99 s", "mean len", "tok/verify",
                 "verify graphed", "new graphs", "speedup", "p99 cut", "same as plain"], rows)
    path = results_path("rollout", args.smoke)
    stored = {key: {k: v for k, v in row.items() if k != "outputs"} for key, row in results.items()}
    extra = {"config": {k: v for k, v in vars(args).items() if k != "model"} | {"model": args.model},
             "pretrain": pre, "greedy_equal": checks, "wall_s": time.perf_counter() - wall}
    write_results(path, env, stored, extra)
    if results:
        plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
