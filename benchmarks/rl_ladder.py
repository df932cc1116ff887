"""RL with verifiable rewards on the reasoning ladder, in one 10-minute GPU call: pretrain a ~26M-parameter model
from scratch on ladder traces of 1-8 operations, measure pass@1 / pass@16 per level, then run Kimi k1.5's
mirror-descent objective and GRPO (clip-higher) from the same base at the same rollout budget on the levels
whose pass@1 lies in [0.1, 0.6], and measure again on every level.

    python benchmarks/rl_ladder.py                  # one H100, ~9 min
    python benchmarks/rl_ladder.py --smoke          # CPU, a tiny model, about a minute (writes to a temp folder)

Phases and their time budgets (seconds, flags): data export (multiprocess), BPE + shards, pretraining
(--pretrain-seconds; the cosine schedule is sized from the measured step time), evaluation of the base
(--eval-per-level problems per level x 16 samples at temperature 1, seeded, the same draws for every model),
the engine's offline throughput on one RL batch (the baseline of "rollout tokens/s"), then each RL method for
--rl-steps steps or --rl-seconds. Writes benchmarks/results/rl_ladder.json and rl_ladder*.png.
"""
import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

from perf_common import environment, finish_training, print_table, results_path, train_for_seconds
from nanokimi.checkpoint import TOKENIZER, load_model_checkpoint, resolve_checkpoint
from nanokimi.data import Tokenizer
from nanokimi.post.rl.config import load_rl_config
from nanokimi.post.rl.loop import RLTrainer, evaluate_pass_at_k, prompt_ids
from nanokimi.post.rl.plot import plot_rl_runs
from nanokimi.post.rl.rollout import EngineBackend
from nanokimi.tasks import get_task, summarize

EXPORT_SEED = 0


def _export_chunk(job):
    levels, start, stop, held_out = job
    task = get_task("ladder", levels=levels, per_level=1, seed=EXPORT_SEED)
    docs = []
    for index in range(start, stop):
        for level in task.levels:
            example = task.generate("train", level, index)
            if example.question not in held_out:
                docs.append(json.dumps({"text": task.sft_text(example)}))
    return docs


def export_traces(path: Path, levels: str, count: int, held_out: set, workers: int) -> int:
    """`count` ladder traces spread evenly over the levels (train split, test problems skipped), as jsonl."""
    per_index = len(get_task("ladder", levels=levels).levels)
    indices = math.ceil(count / per_index)
    step = max(1, indices // (workers * 4))
    jobs = [(levels, i, min(i + step, indices), held_out) for i in range(0, indices, step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool, open(path, "w") as f:
        written = 0
        for docs in pool.imap(_export_chunk, jobs):
            f.write("".join(d + "\n" for d in docs))
            written += len(docs)
    return written


def pretrain(args, data_file: Path, out: Path, device: str) -> dict:
    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    m = args.model
    overrides = [f"data.source={data_file}", "data.text_field=text", f"data.vocab_size={args.vocab_size}",
                 f"data.dir={out.parent / 'shards'}", f"model.vocab_size={args.vocab_size}",
                 f"model.hidden_size={m['hidden']}", f"model.num_layers={m['layers']}", "model.mixers=G",
                 f"model.num_heads={m['heads']}", f"model.num_kv_heads={m['kv_heads']}", "model.head_dim=64",
                 f"model.intermediate_size={m['ffn']}", "model.max_position_embeddings=512",
                 f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "train.max_steps=1000000",
                 f"train.device={device}", "train.eval_every=1000000", "train.save_every=1000000",
                 "train.log_every=50", "train.sample_tokens=0", f"optim.lr={args.pretrain_lr}",
                 f"optim.warmup_steps={args.warmup}", "optim.min_lr_ratio=0.05"]
    from dataclasses import fields

    from nanokimi.train.config import DataConfig
    if "max_mb" in {f.name for f in fields(DataConfig)}:  # the whole corpus, not the quick-start sample
        overrides.append("data.max_mb=0")
    run = load_run_config("tiny-dense", None, overrides)
    started = time.perf_counter()
    trainer = Trainer(run, out, progress=False)
    prepared = time.perf_counter()
    params = sum(p.numel() for p in trainer.model.parameters())
    losses, per_step = train_for_seconds(trainer, args.pretrain_seconds, started, warm=5, probe=20, margin=0.97)
    print(f"pretrain: {params / 1e6:.1f}M params, data ready in {prepared - started:.1f}s, "
          f"{per_step * 1e3:.1f} ms/step "
          f"-> {trainer.run.train.max_steps} steps", flush=True)
    finish_training(trainer, losses, log_every=500)
    seconds = time.perf_counter() - started
    trainer.save()
    tokens = trainer.step * args.batch_size * args.seq_len
    return {"params": params, "steps": trainer.step, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / (seconds - (prepared - started)), "final_loss": sum(losses[-20:]) / 20,
            "data_prep_seconds": prepared - started}


def per_level(summary: dict, key: str) -> dict:
    return {int(level): row[key] for level, row in summary["levels"].items()}


def offline_throughput(base: Path, tokenizer, task, examples, k: int, max_tokens: int, dtype: str,
                       engine_kwargs: dict) -> dict:
    """The engine alone (nanokimi.infer.LLM) on one RL batch: every prompt k times, temperature 1."""
    from nanokimi.infer import LLM, SamplingParams

    model = load_model_checkpoint(base, "cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM(model, tokenizer=tokenizer, dtype=dtype, **engine_kwargs)
    prompts = [prompt_ids(tokenizer, task, e) for e in examples]
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, n=k, seed=1, stop=list(task.stop))
    # warm-up on the whole batch: every batch bucket the timed run meets has its graph captured (and compiled)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm, model
    return {"dtype": dtype, "sequences": len(prompts) * k, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def run_method(args, name: str, base: Path, tokenizer, rl_task, eval_task, eval_examples, before: dict, out: Path,
               device: str, extra: list[str], steps: int, seconds: float) -> dict:
    overrides = [f"rl.loss={name}", f"rl.steps={steps}", f"rl.prompts_per_step={args.prompts}",
                 f"rl.samples_per_prompt={args.k}", f"rl.max_tokens={args.max_tokens}", "rl.train_split=rl",
                 f"rl.eval_samples={args.k}", f"rl.eval_ks=1,{args.k}", f"rl.time_limit_s={seconds}",
                 f"rl.device={device}", "rl.dynamic_sampling=true", f"rl.updates_per_step={args.updates}",
                 f"rl.epochs={args.epochs}",
                 f"optim.name={args.rl_optim}", f"optim.lr={args.rl_lr}", f"rl.micro_batch={args.micro_batch}",
                 f"rl.save_every={steps + 1}", *extra]
    run = load_rl_config(None, overrides)
    model = load_model_checkpoint(base, device)
    trainer = RLTrainer(run, model, tokenizer, rl_task, out, tokenizer_file=base / TOKENIZER, progress=False)
    trainer.log({"step": 0, "tokens": 0, **trainer.flat_eval(before)})
    started = time.perf_counter()
    trainer.fit(evaluate=False)
    seconds = time.perf_counter() - started
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
    problems = evaluate_pass_at_k(trainer.backend, tokenizer, eval_task, eval_examples, args.k, args.max_tokens, 1.0, 0)
    summary = summarize(problems, [1, args.k])
    practised = practised_lift(args, trainer, base, tokenizer, rl_task, device)
    trainer.log({"step": trainer.step, "tokens": trainer.tokens, **trainer.flat_eval(summary)})
    keys = ("reward_mean", "accuracy", "length_mean", "truncated", "entropy", "kl_old", "clip_fraction",
            "zero_variance_share", "logprob_gap", "grad_norm", "rollout_tokens_per_s", "train_tokens_per_s",
            "rollout_s", "train_s")
    mean = {}
    for key in keys:
        values = [r[key] for r in records if key in r and math.isfinite(r[key])]  # steps that kept no group: nan gap
        mean[key] = sum(values) / len(values) if values else float("nan")
    result = {"settings": run.to_dict(), "run_dir": str(out), "steps": trainer.step, "seconds": seconds,
              "rollout_tokens": trainer.tokens, "responses": trainer.step * args.prompts * args.k,
              "mean_per_step": mean, "problem_pass@1": problem_pass_at_1(problems), "practised": practised,
              "curve": [{k: r.get(k) for k in ("step", "reward_mean", "accuracy", "length_mean", "entropy",
                                               "grad_norm")} for r in records], "eval": summary}
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def problem_pass_at_1(problems: list[dict]) -> list[float]:
    """Each problem's share of correct samples (evaluations share seeds, so before/after pair up by problem)."""
    return [sum(x["correct"] for x in p["samples"]) / len(p["samples"]) for p in problems]


def paired_lift(before: list[float], after: list[float], levels: list[int], chosen: list[int]) -> tuple[float, float]:
    """Mean pass@1 change over the chosen levels (each level weighted equally when they hold as many problems)
    and its standard error from the per-problem differences."""
    diffs = [a - b for a, b, lv in zip(after, before, levels) if lv in chosen]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5


def practised_lift(args, trainer, base: Path, tokenizer, rl_task, device: str) -> dict:
    """pass@1 of the base and of the trained policy on RL training problems the run drew (up to
    --eval-per-level x 5 of them): what RL learned where it practised, beside the held-out lift."""
    drawn = [e for e in rl_task.examples("rl") if e.id in trainer.sampler.seen][:args.eval_per_level * 5]
    if not drawn:
        return {"problems": 0}
    model = load_model_checkpoint(base, device)
    base_backend = EngineBackend(model, tokenizer, rl_task.stop, max_num_seqs=512,
                                 max_cache_tokens=600 * (args.max_tokens + 160))
    scores = [problem_pass_at_1(evaluate_pass_at_k(backend, tokenizer, rl_task, drawn, args.k, args.max_tokens, 1.0, 0))
              for backend in (base_backend, trainer.backend)]
    levels = [e.difficulty for e in drawn]
    lift, se = paired_lift(scores[0], scores[1], levels, sorted(set(levels)))
    del base_backend, model
    return {"problems": len(drawn), "base_pass@1": sum(scores[0]) / len(drawn), "pass@1": sum(scores[1]) / len(drawn),
            "lift": lift, "lift_se": se}


def plot(results: dict, levels: list[int], before: dict, k: int, out: Path) -> list[str]:
    """The RL curves of both methods (nanokimi plot's RL panels) and pass@k per level before and after."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plots (pip install 'nanokimi[plot]')")
        return []
    curves = out.with_name(out.stem + "_curves.png")
    plot_rl_runs([r["run_dir"] for r in results.values()], str(curves), labels=list(results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("pass@1", f"pass@{k}")):
        ax.plot(levels, [before[key][lv] for lv in levels], marker="o", label="base")
        for name, result in results.items():
            ax.plot(levels, [per_level(result["eval"], key)[lv] for lv in levels], marker="o", label=name)
        ax.set(xlabel="ladder level (operations)", ylabel=key, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    bars = out.with_name(out.stem + "_levels.png")
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    return [str(curves), str(bars)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, about a minute; temp output")
    parser.add_argument("--levels", default="1-8")
    parser.add_argument("--docs", type=int, default=400_000, help="pretraining traces")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--pretrain-seconds", type=float, default=200)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-per-level", type=int, default=40)
    parser.add_argument("--edge", default="0.1,0.6", help="RL levels: base pass@1 within this range")
    parser.add_argument("--k", type=int, default=16, help="samples per prompt (RL) and per problem (eval)")
    parser.add_argument("--prompts", type=int, default=32, help="prompt groups per RL step")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--rl-seconds", type=float, default=100, help="time limit of each RL method")
    parser.add_argument("--total-seconds", type=float, default=560,
                        help="the whole run's budget: RL methods get at most their share of what is left")
    parser.add_argument("--rl-optim", default="adamw")
    parser.add_argument("--rl-lr", type=float, default=1e-4,
                        help="H100: 3e-5 barely moved the policy, 2e-4 (2 updates per batch) lowered every level by "
                             "12-18 points; docs/rl.md has the CPU study")
    parser.add_argument("--updates", type=int, default=1,
                        help="optimizer steps per rollout batch (1: the whole batch per step, the least noisy)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch")
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--tau", type=float, default=0.1, help="k1.5's tau")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="k1.5's length reward weight")
    parser.add_argument("--methods", default="k1.5,grpo")
    parser.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()))
    parser.add_argument("--hidden", type=int, default=512, help="model width (heads of 64; ffn 3x)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", help="work folder (default: a temp folder)")
    args = parser.parse_args()
    if args.smoke:
        args.levels, args.docs, args.vocab_size = "1-3", 3000, 300
        args.pretrain_seconds = min(args.pretrain_seconds, 25)
        args.batch_size, args.seq_len, args.eval_per_level, args.k, args.prompts = 16, 128, 3, 4, 4
        args.max_tokens, args.rl_seconds, args.warmup, args.micro_batch = 48, 30, 5, 0
        args.rl_steps = min(args.rl_steps, 3)
        args.edge, args.rl_lr = "0.0,1.0", 1e-3
        args.model = dict(hidden=64, layers=2, heads=2, kv_heads=1, ffn=128)
    else:
        args.model = dict(hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                          kv_heads=max(1, args.hidden // 128), ffn=3 * args.hidden)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # the engine reads the fp32 training weights: TF32 matmuls
    work = Path(args.out or tempfile.mkdtemp(prefix="rl_ladder_"))
    work.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    eval_task = get_task("ladder", levels=args.levels, per_level=args.eval_per_level, seed=EXPORT_SEED)
    eval_examples = eval_task.examples("test")
    held_out = {e.question for e in eval_examples}
    started = time.perf_counter()
    docs = export_traces(work / "ladder.jsonl", args.levels, args.docs, held_out, args.workers)
    export_seconds = time.perf_counter() - started
    print(f"exported {docs:,} traces in {export_seconds:.1f}s", flush=True)
    env = environment(torch.device(device))  # after the fork of the export workers: this initialises CUDA
    pre = pretrain(args, work / "ladder.jsonl", work / "base", device)
    print(f"pretrained {pre['steps']} steps, {pre['tokens'] / 1e6:.1f}M tokens, {pre['tokens_per_s']:,.0f} tok/s, "
          f"loss {pre['final_loss']:.4f}", flush=True)
    base = resolve_checkpoint(work / "base")
    tokenizer = Tokenizer.load(base / TOKENIZER)

    model = load_model_checkpoint(base, device)
    eval_backend = EngineBackend(model, tokenizer, eval_task.stop, max_num_seqs=512,
                                 max_cache_tokens=600 * (args.max_tokens + 160))
    started = time.perf_counter()
    base_problems = evaluate_pass_at_k(eval_backend, tokenizer, eval_task, eval_examples, args.k, args.max_tokens,
                                       1.0, 0)
    before = summarize(base_problems, [1, args.k])
    eval_seconds = time.perf_counter() - started
    del eval_backend, model
    levels = sorted(int(lv) for lv in before["levels"])
    base_p1, base_pk = per_level(before, "pass@1"), per_level(before, f"pass@{args.k}")
    low, high = (float(x) for x in args.edge.split(","))
    edge = [lv for lv in levels if low <= base_p1[lv] <= high]
    if not edge:  # nothing in the band: take the level closest to it
        edge = [min(levels, key=lambda lv: abs(base_p1[lv] - (low + high) / 2))]
    easy = [lv for lv in levels if base_p1[lv] > high]
    # a policy collapsed onto its own majority answer scores maj@k: the lift that sharpening alone can give
    base_maj = per_level(before, f"maj@{args.k}")
    sharpening = sum(base_maj[lv] - base_p1[lv] for lv in edge) / len(edge)
    print(f"base pass@1 by level: { {lv: round(base_p1[lv], 3) for lv in levels} } ({eval_seconds:.1f}s); "
          f"RL on levels {edge}; edge maj@{args.k} - pass@1 = {sharpening * 100:+.1f} points", flush=True)
    rl_task = get_task("ladder", levels=",".join(map(str, edge)), per_level=2000 if not args.smoke else 20,
                       seed=EXPORT_SEED)

    engine_kwargs = dict(max_num_seqs=min(args.prompts * args.k, 512), enable_prefix_caching=True,
                         max_cache_tokens=(args.prompts * args.k + 8) * (args.max_tokens + 160))
    batch_examples = rl_task.examples("rl")[:args.prompts]
    offline = {dtype: offline_throughput(base, tokenizer, rl_task, batch_examples, args.k, args.max_tokens, dtype,
                                         engine_kwargs) for dtype in (["float32", "bfloat16"] if device == "cuda"
                                                                      else ["float32"])}
    results, errors = {}, {}
    path = results_path("rl_ladder", args.smoke)
    payload = {**env, "smoke": args.smoke, "settings": {k: v for k, v in vars(args).items()},
               "export": {"docs": docs, "seconds": export_seconds}, "pretrain": pre, "base_eval": before,
               "eval_seconds": eval_seconds, "edge_levels": edge, "easy_levels": easy,
               "edge_sharpening_ceiling": sharpening, "offline_engine": offline,
               "methods": results, "errors": errors}
    write_payload(path, payload, wall)
    methods = args.methods.split(",")
    steps = args.rl_steps
    for index, name in enumerate(methods):
        # the same rollout budget: later methods run the steps the first one finished; the time left is shared
        left = args.total_seconds - (time.perf_counter() - wall) - 30 * (len(methods) - index)
        seconds = max(10.0, min(args.rl_seconds, left / (len(methods) - index)))
        extra = [f"rl.tau={args.tau}", f"rl.length_penalty={args.length_penalty}"] if name == "k1.5" else []
        try:
            results[name] = run_method(args, name, base, tokenizer, rl_task, eval_task, eval_examples, before,
                                       work / f"rl-{name}", device, extra, steps, seconds)
        except Exception as error:  # noqa: BLE001 - keep the other method's numbers; the error goes in the JSON
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"{name} failed: {errors[name]}", flush=True)
            continue
        r = results[name]
        steps = min(steps, r["steps"])
        print(f"{name}: {r['steps']} steps in {r['seconds']:.0f}s, pass@1 by level "
              f"{ {lv: round(v, 3) for lv, v in per_level(r['eval'], 'pass@1').items()} }", flush=True)
        write_payload(path, payload, wall)

    rows = []
    for lv in levels:
        row = [lv, "edge" if lv in edge else ("easy" if lv in easy else "hard"), f"{base_p1[lv]:.3f}",
               f"{base_pk[lv]:.3f}"]
        for name, r in results.items():
            row += [f"{per_level(r['eval'], 'pass@1')[lv]:.3f}", f"{per_level(r['eval'], f'pass@{args.k}')[lv]:.3f}"]
        rows.append(row)
    headers = ["level", "band", "base p@1", f"base p@{args.k}"]
    for name in results:
        headers += [f"{name} p@1", f"{name} p@{args.k}"]
    print_table(headers, rows)
    goals = {}
    best_offline = max(o["tokens_per_s"] for o in offline.values())
    for name, r in results.items():
        after = per_level(r["eval"], "pass@1")
        lift = sum(after[lv] - base_p1[lv] for lv in edge) / len(edge)
        _, lift_se = paired_lift(problem_pass_at_1(base_problems), r["problem_pass@1"],
                                 [e.difficulty for e in eval_examples], edge)
        drop = max((base_p1[lv] - after[lv] for lv in easy), default=0.0)
        ratio = r["mean_per_step"]["rollout_tokens_per_s"] / best_offline
        goals[name] = {"edge_pass@1_lift": lift, "edge_lift_se": lift_se, "edge_lift_goal_met": lift >= 0.10,
                       "easy_max_pass@1_drop": drop, "easy_goal_met": drop <= 0.02,
                       "rollout_vs_offline_throughput": ratio, "throughput_goal_met": ratio >= 0.5}
        print(f"{name}: edge pass@1 {lift * 100:+.1f} ± {lift_se * 100:.1f} points (goal +10), worst easy-level drop "
              f"{drop * 100:.1f} "
              f"(goal <= 2), rollout {r['mean_per_step']['rollout_tokens_per_s']:,.0f} tok/s = {ratio:.2f} of the "
              f"engine's offline {best_offline:,.0f} (goal 0.5), log-prob gap {r['mean_per_step']['logprob_gap']:.2e}")
        if r["practised"]["problems"]:
            p = r["practised"]
            print(f"{name}: on {p['problems']} RL training problems it drew, pass@1 {p['base_pass@1']:.3f} -> "
                  f"{p['pass@1']:.3f} ({p['lift'] * 100:+.1f} ± {p['lift_se'] * 100:.1f} points)")
    payload["rows"] = [dict(zip(headers, row)) for row in rows]  # the table above, one dict per level
    payload.update(goals=goals, plots=plot(results, levels, {"pass@1": base_p1, f"pass@{args.k}": base_pk}, args.k,
                                           path))
    write_payload(path, payload, wall)
    print(f"wrote {path} ({payload['wall_seconds']:.0f}s in all)")
    return 1 if errors else 0


def write_payload(path: Path, payload: dict, wall: float) -> None:
    """(Re)write the result file: after each phase, so a run cut off by its time slot keeps what it measured."""
    payload["wall_seconds"] = time.perf_counter() - wall
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
