"""LEPA against the no-plan baseline (rejection-sampling self-training) on the ladder task, same generation budget.

A small model is pretrained from scratch in this script on ladder problems of low levels (plain traces, traces
with an operation-skeleton plan, and reflections; benchmarks/ladder_model.py), then self-trains twice from
the same checkpoint: once with LEPA (plan, solve, reflect with the answer, fine-tune on the successful
(plan, solution) pairs) and once without plans (up to the same number of trials per problem, correct samples
kept), and once more without plans but with 2 * trials - 1 trials (as many generations per problem as LEPA's
plan + reflection + solution rounds can take). Held-out pass@1 per level is measured before and after each
iteration; the table gives the generated tokens of each arm.

    python benchmarks/lepa_ladder.py            # one H100, under 10 minutes
    python benchmarks/lepa_ladder.py --smoke    # CPU, about a minute: runs end to end, numbers meaningless
"""
import argparse
import tempfile
import time
from pathlib import Path

import perf_common  # noqa: F401  (puts the repository root on sys.path)
import torch

from ladder_model import TEMPLATES, build_ladder_model
from nanokimi.post.lepa import LepaConfig, run_lepa
from perf_common import environment, print_table, results_path, write_results


def plot(path: Path, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, summary in runs.items():
        evals = [r["eval_before"] for r in summary["iterations"]] + [summary["final_eval"]]
        left.plot(range(len(evals)), [e["pass@1"] for e in evals], marker="o", label=name)
        levels = list(summary["final_eval"]["by_level"])
        line, = right.plot([int(x) for x in levels], [summary["final_eval"]["by_level"][x] for x in levels],
                           marker="o", label=f"{name} (after)")
        base = summary["iterations"][0]["eval_before"]["by_level"]  # the pretrained model, prompted this arm's way
        right.plot([int(x) for x in base], list(base.values()), "--", color=line.get_color(), alpha=0.6,
                   label=f"{name} (before)")
    left.set(xlabel="iteration", ylabel="held-out pass@1", title="ladder: LEPA vs no-plan")
    right.set(xlabel="ladder level (operations)", ylabel="pass@1", title="by level after self-training")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script end to end")
    parser.add_argument("--out", default=None, help="work folder (default: a fresh temporary folder)")
    parser.add_argument("--pretrain-levels", default="1-8")
    parser.add_argument("--levels", default="1-8", help="levels LEPA trains and evaluates on")
    parser.add_argument("--pretrain-seconds", type=float, default=160, help="data preparation + pretraining")
    parser.add_argument("--docs", type=int, default=80_000, help="pretraining conversations")
    parser.add_argument("--total-seconds", type=float, default=560, help="an arm that would end later is skipped")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--eval-per-level", type=int, default=30)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.pretrain_seconds, args.docs, args.iterations, args.trials, args.problems, args.eval_per_level = \
            5, 200, 1, 2, 6, 2
        args.levels = "1-3"
    out = Path(args.out or tempfile.mkdtemp(prefix="nanokimi-lepa-ladder-"))
    started = time.time()
    ckpt, base_facts = build_ladder_model(
        out / "base", args.pretrain_levels, docs=args.docs, seconds=args.pretrain_seconds,
        batch_size=4 if args.smoke else 128, device=device, max_steps=20 if args.smoke else 1_000_000,
        size=dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                  intermediate_size=128) if args.smoke else None)
    print(f"pretrained {ckpt}: {base_facts}", flush=True)
    levels = [int(x) for x in args.levels.split("-")]
    sft = [f"train.device={device}", "train.batch_size=4" if args.smoke else "train.batch_size=8",
           # 5e-4 (5x the base's last pretraining rate, fresh AdamW) cut held-out pass@1 from 0.24 to 0.03 in 2 steps
           "train.seq_len=512", "optim.name=adamw", "optim.lr=5e-5", "optim.warmup_steps=2", "sft.epochs=3",
           "train.log_every=5"] + (["train.max_steps=2"] if args.smoke else [])
    runs = {}
    path = results_path("lepa_ladder", args.smoke)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    extra = {"settings": settings, "sft_overrides": sft, "base_model": base_facts, "templates": vars(TEMPLATES)}
    # the train split must outgrow one iteration's problems; the held-out set is the first eval_per_level per level
    per_level = max(args.eval_per_level, 2 * -(-args.problems // (levels[-1] - levels[0] + 1)))
    arms = (("lepa", True, args.trials), ("no-plan", False, args.trials),
            (f"no-plan x{2 * args.trials - 1}", False, 2 * args.trials - 1))  # as many generate calls as LEPA's most
    rows, skipped = [], []
    longest = 0.0
    for name, plan, trials in arms:
        if time.time() - started + 1.3 * longest > args.total_seconds:  # the next arm takes about the longest one
            skipped.append(name)
            print(f"{name}: skipped, it would end after --total-seconds {args.total_seconds:.0f}", flush=True)
            continue
        cfg = LepaConfig(task="ladder", task_options={"levels": args.levels, "per_level": per_level},
                         iterations=args.iterations, trials=trials, problems=args.problems,
                         eval_problems=args.eval_per_level * (levels[-1] - levels[0] + 1), plan=plan,
                         temperature=0.8, plan_tokens=24 if args.smoke else 160,
                         solution_tokens=24 if args.smoke else 256, seed=0, sft_overrides=sft,
                         max_cache_tokens=256 * (160 + 2 * 256 + 512))  # a whole round in one wave (256 rows)
        t0 = time.time()
        summary = runs[name] = run_lepa(str(ckpt), str(out / name.replace(" ", "_")), cfg, TEMPLATES, progress=False)
        for r in summary["iterations"]:
            rows.append([name, r["iteration"], f"{r['eval_before']['pass@1']:.3f}", f"{r['eval_after']['pass@1']:.3f}",
                         f"{r['success_first']:.2f}", f"{r['success_final']:.2f}", f"{r['trials_mean']:.2f}",
                         r["leak_rejections"], f"{r['plan_tokens_mean']:.1f}", r["generated_tokens"],
                         r["sft_examples"]])
        result = {"trials": trials, "iterations": summary["iterations"], "final_eval": summary["final_eval"],
                  "seconds": round(time.time() - t0, 1)}
        longest = max(longest, result["seconds"])
        extra["skipped"] = skipped
        write_results(path, environment(torch.device(device)), {name: result}, extra=extra)  # partial runs keep arms
        print(f"{name}: held-out pass@1 {summary['iterations'][0]['eval_before']['pass@1']:.3f} -> "
              f"{summary['final_eval']['pass@1']:.3f} ({result['seconds']:.0f} s; "
              f"{time.time() - started:.0f} s in all)", flush=True)
    print_table(["mode", "iter", "pass@1 before", "pass@1 after", "solved 1st", "solved final", "trials",
                 "leaks", "plan tok", "gen tokens", "sft ex"], rows)
    final = {name: s["final_eval"]["by_level"] for name, s in runs.items()}
    levels_run = next(iter(final.values()))
    print_table(["level", *final], [[lvl, *(f"{final[n][lvl]:.2f}" for n in final)] for lvl in levels_run])
    try:
        plot(path.with_suffix(".png"), runs)
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
    print(f"wrote {path} ({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
