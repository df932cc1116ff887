"""The CPU study behind docs/rl.md's "Why RL does not lift pass@1 here": a 0.7M-parameter ladder model pretrained on
the CPU (levels 1-3, the H100 base's profile one level down), RL arms side by side from it, and the diagnostics.

    python benchmarks/rl_ladder_cpu.py base --work /tmp/rlcpu                # pretrain (~11 min, 1 thread), evaluate
    python benchmarks/rl_ladder_cpu.py arm --work /tmp/rlcpu --name g_a1e-4 -- rl.loss=grpo optim.lr=1e-4 ...
    python benchmarks/rl_ladder_cpu.py arm ... --sgd 0.9 -- optim.lr=0.03      # SGD with momentum instead of AdamW
    python benchmarks/rl_ladder_cpu.py errors --work /tmp/rlcpu --level 3     # where wrong samples go wrong
    python benchmarks/rl_ladder_cpu.py practised --work /tmp/rlcpu --name g_a1e-4   # drawn vs undrawn RL problems

Every arm is evaluated on the same held-out problems (--per-level per level, --k samples at temperature 1) with the
base's sampling seeds, so before/after pair up per problem; the edge lift's standard error comes from the
per-problem differences. Each command appends its result to benchmarks/results/rl_ladder_cpu.json.
"""
import argparse
import collections
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

import rl_ladder
from perf_common import environment, results_path
from nanokimi.checkpoint import TOKENIZER, load_model_checkpoint, load_trainer_state, resolve_checkpoint
from nanokimi.data import Tokenizer
from nanokimi.post.rl.config import load_rl_config
from nanokimi.post.rl.loop import RLTrainer, evaluate_pass_at_k, prompt_ids, response_text
from nanokimi.post.rl.rollout import EngineBackend
from nanokimi.tasks import get_task

LEVELS, EDGE = "1-3", "2,3"
PRETRAIN = dict(docs=30000, vocab_size=300, batch_size=32, seq_len=128, pretrain_lr=3e-3, warmup=50,
                model=dict(hidden=128, layers=3, heads=2, kv_heads=1, ffn=384))


def backend(model, tokenizer, task):
    return EngineBackend(model, tokenizer, task.stop, max_num_seqs=512, max_cache_tokens=300_000)


def problem_scores(be, tokenizer, task, examples, k, max_tokens, temperature, seed=0) -> list[float]:
    problems = evaluate_pass_at_k(be, tokenizer, task, examples, k, max_tokens, temperature, seed)
    return rl_ladder.problem_pass_at_1(problems)


def by_level(scores, levels) -> dict:
    out = collections.defaultdict(list)
    for lv, s in zip(levels, scores):
        out[lv].append(s)
    return {lv: sum(v) / len(v) for lv, v in sorted(out.items())}


def cmd_base(a, work: Path, eval_task, examples) -> dict:
    base_dir = work / "base"
    if not base_dir.exists():
        held_out = {e.question for e in examples}
        rl_ladder.export_traces(work / "ladder.jsonl", LEVELS, PRETRAIN["docs"], held_out, 1)
        args = argparse.Namespace(pretrain_seconds=a.pretrain_seconds, **PRETRAIN)
        rl_ladder.pretrain(args, work / "ladder.jsonl", base_dir, "cpu")
    base = resolve_checkpoint(base_dir)
    tokenizer = Tokenizer.load(base / TOKENIZER)
    be = backend(load_model_checkpoint(base, "cpu"), tokenizer, eval_task)
    levels = [e.difficulty for e in examples]
    result = {}
    for temperature in (1.0, 0.1):
        scores = problem_scores(be, tokenizer, eval_task, examples, a.k, a.max_tokens, temperature)
        if temperature == 1.0:
            (work / "base_eval.json").write_text(json.dumps(scores))
        result[f"pass@1_T{temperature}"] = by_level(scores, levels)
    return result


def cmd_arm(a, work: Path, eval_task, examples) -> dict:
    import nanokimi.optim

    build = nanokimi.optim.build_optimizer

    def build_optimizer(model, **kwargs):  # the arms beside the trainer's own optimizers
        for name, p in model.named_parameters():
            if a.freeze and any(part in name for part in a.freeze.split(",")):
                p.requires_grad_(False)
        if a.sgd:
            sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=kwargs["lr"],
                                  momentum=a.sgd)
            for group in sgd.param_groups:
                group["initial_lr"] = group["lr"]
            return sgd
        return build(model, **kwargs)

    nanokimi.optim.build_optimizer = build_optimizer
    base = resolve_checkpoint(work / "base")
    tokenizer = Tokenizer.load(base / TOKENIZER)
    before = json.loads((work / "base_eval.json").read_text())
    out = work / "runs" / a.name
    shutil.rmtree(out, ignore_errors=True)
    rl_task = get_task("ladder", levels=EDGE, per_level=a.pool, seed=0)
    run = load_rl_config(None, ["rl.train_split=rl", "rl.device=cpu", f"rl.max_tokens={a.max_tokens}",
                                "rl.save_every=100000", "rl.eval_per_level=1", "rl.eval_samples=2", "rl.eval_ks=1",
                                *a.overrides])
    started = time.perf_counter()
    trainer = RLTrainer(run, load_model_checkpoint(base, "cpu"), tokenizer, rl_task, out, progress=False)
    trainer.fit(evaluate=False)
    seconds = time.perf_counter() - started
    after = problem_scores(trainer.backend, tokenizer, eval_task, examples, a.k, a.max_tokens, 1.0)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
    levels = [e.difficulty for e in examples]
    edge = [int(x) for x in EDGE.split(",")]
    lift, se = rl_ladder.paired_lift(before, after, levels, edge)

    def mean(key, part):
        values = [r[key] for r in records[part] if key in r]
        return sum(values) / len(values)

    return {"overrides": a.overrides, "pool_per_level": a.pool, "sgd_momentum": a.sgd, "frozen": a.freeze,
            "steps": trainer.step, "rl_seconds": seconds, "before": by_level(before, levels),
            "after": by_level(after, levels),
            "edge_lift": lift, "edge_lift_se": se, "reward_first5": mean("reward_mean", slice(0, 5)),
            "reward_last5": mean("reward_mean", slice(-5, None)), "entropy_first5": mean("entropy", slice(0, 5)),
            "entropy_last5": mean("entropy", slice(-5, None)), "grad_norm": mean("grad_norm", slice(None)),
            "kl_old": mean("kl_old", slice(None))}


def cmd_errors(a, work: Path, *_) -> dict:
    """Classify each wrong sample by its first line that differs from the reference trace."""
    base = resolve_checkpoint(work / "base")
    tokenizer = Tokenizer.load(base / TOKENIZER)
    task = get_task("ladder", levels=str(a.level), per_level=60, seed=0)
    examples = task.examples("test")
    be = backend(load_model_checkpoint(base, "cpu"), tokenizer, task)
    requests = [(prompt_ids(tokenizer, task, e), a.max_tokens, j * 7919 + i) for i, e in enumerate(examples)
                for j in range(8)]
    kinds = collections.Counter()
    for n, (tokens, _, _) in enumerate(be.generate(requests, 1.0, 1.0)):
        example = examples[n // 8]
        text = response_text(tokenizer, tokens, task.stop, {tokenizer.eot_id})
        if task.is_correct(text, example.answer):
            kinds["correct"] += 1
            continue
        kind = "other"
        for gold, got in zip(example.solution.splitlines(), text.splitlines()):
            if gold == got:
                continue
            if gold.startswith("####"):
                kind = "final line"
                break
            gold_lhs, got_lhs = gold.rsplit(" = ", 1)[0], got.rsplit(" = ", 1)[0]
            if gold_lhs == got_lhs:
                kind = "arithmetic"
            else:
                gold_ops, got_ops = gold_lhs.split(" = ", 1)[1].split(), (got_lhs.split(" = ", 1) + [""])[1].split()
                kind = "operand" if len(got_ops) == 3 and gold_ops[1] == got_ops[1] else "structure"
            break
        kinds[kind] += 1
    return {"level": a.level, "samples": 8 * len(examples), "kinds": dict(kinds)}


def cmd_practised(a, work: Path, *_) -> dict:
    """pass@1 of the base and of an arm's final policy on RL problems the arm drew and on ones it did not."""
    base = resolve_checkpoint(work / "base")
    run = resolve_checkpoint(work / "runs" / a.name)
    tokenizer = Tokenizer.load(base / TOKENIZER)
    seen = load_trainer_state(run)["sampler"]["seen"]
    task = get_task("ladder", levels=EDGE, per_level=a.pool, seed=0)
    pool = task.examples("rl")
    sets = {"drawn": random.Random(0).sample([e for e in pool if e.id in seen], 150),
            "not drawn": [e for e in pool if e.id not in seen][:150]}
    scores = {name: {label: problem_scores(backend(load_model_checkpoint(path, "cpu"), tokenizer, task), tokenizer,
                                           task, xs, a.k, a.max_tokens, 1.0, 1) for label, xs in sets.items()}
              for name, path in (("base", base), ("rl", run))}
    out = {}
    for label, xs in sets.items():
        lift, se = rl_ladder.paired_lift(scores["base"][label], scores["rl"][label], [0] * len(xs), [0])
        out[label] = {"problems": len(xs), "base": sum(scores["base"][label]) / len(xs),
                      "rl": sum(scores["rl"][label]) / len(xs), "lift": lift, "lift_se": se}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["base", "arm", "errors", "practised"])
    parser.add_argument("--work", required=True, help="folder of the base and the arms' runs")
    parser.add_argument("--name", help="arm name (arm, practised)")
    parser.add_argument("--pretrain-seconds", type=float, default=660)
    parser.add_argument("--per-level", type=int, default=100, help="held-out problems per level")
    parser.add_argument("--k", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pool", type=int, default=500, help="RL training problems per edge level")
    parser.add_argument("--level", type=int, default=3, help="errors: the level to classify")
    parser.add_argument("--sgd", type=float, default=0.0, help="arm: SGD with this momentum instead of optim.name")
    parser.add_argument("--freeze", default="", help="arm: comma-separated parameter-name parts left untrained")
    parser.add_argument("overrides", nargs="*", help="arm: rl.* / optim.* overrides")
    a = parser.parse_intermixed_args()  # the overrides may follow the options
    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_task = get_task("ladder", levels=LEVELS, per_level=a.per_level, seed=0)
    examples = eval_task.examples("test")
    result = {"base": cmd_base, "arm": cmd_arm, "errors": cmd_errors, "practised": cmd_practised}[a.command](
        a, work, eval_task, examples)
    print(json.dumps(result, indent=1))
    path = results_path("rl_ladder_cpu", False)
    payload = json.loads(path.read_text()) if path.exists() else {**environment(torch.device("cpu")), "rows": []}
    payload["rows"].append({"command": a.command, "name": a.name, **result})
    path.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
