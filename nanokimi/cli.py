"""nanokimi: train, sample, evaluate, convert and inspect Kimi-family models.

  nanokimi train [--preset NAME | --config FILE.toml] [--out DIR] [--resume] [section.key=value ...]
  nanokimi generate --ckpt DIR --prompt TEXT [--nbce-window W]
  nanokimi eval --ckpt DIR [--task gsm8k|math500|ladder|mused --n 16 --k 1,4,16 ...]
  nanokimi tasks export ladder --out FILE.jsonl --levels 1-8 --count N
  nanokimi plot RUN_DIR [RUN_DIR ...] --out FILE.png
  nanokimi data prepare --source SOURCE
  nanokimi model info --preset NAME
  nanokimi convert --from-hf HF_DIR --out DIR | --to-hf CHECKPOINT_DIR --out HF_DIR
  nanokimi chat CKPT [--system TEXT]
  nanokimi sft --ckpt BASE --data FILE.jsonl [--out DIR] [--resume] [section.key=value ...]
  nanokimi lepa --ckpt BASE --task ladder|mused|gsm8k [--iterations N] [--trials N] [--no-plan] [--templates FILE]
"""
import argparse
import json
import sys

from nanokimi.config import ConfigError


def cmd_model_info(args) -> int:
    from nanokimi.config import ModelConfig
    from nanokimi.model.info import format_info, model_info

    info = model_info(ModelConfig.preset(args.preset))
    print(json.dumps(info, indent=1) if args.json else format_info(args.preset, info))
    return 0


def cmd_train(args) -> int:
    import torch

    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    if args.nproc > 1:
        from nanokimi.train.launch import launch_torchrun
        return launch_torchrun(args.nproc, sys.argv[2:])
    from pathlib import Path

    out = args.out or f"runs/{args.preset or 'tiny'}"
    config_file = args.config
    if args.resume and not config_file and (Path(out) / "config.toml").is_file():
        config_file = str(Path(out) / "config.toml")  # continue with the run's own settings
    run = load_run_config(args.preset, config_file, args.overrides)
    trainer = Trainer(run, out, resume=args.resume, progress=not args.no_progress)
    print(f"training {run.preset} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M params) on "
          f"{trainer.device} with {run.optim.name}; data {trainer.data_dir}; writing {out}", file=sys.stderr)
    from nanokimi.train.fast import describe_paths
    print("paths: " + describe_paths(trainer.model, trainer.device,
                                     torch.bfloat16 if trainer.device.type == "cuda" else torch.float32), file=sys.stderr)
    result = trainer.fit()
    print(f"done: step {result['step']}, {result['tokens']:,} tokens, val loss {result.get('val_loss', float('nan')):.4f}, "
          f"val bits/byte {result.get('val_bpb', float('nan')):.4f}; checkpoint {trainer.checkpoint_dir}")
    if run.train.sample_tokens > 0:
        from nanokimi.infer.sample import sample_text
        text = sample_text(trainer.model, trainer.tokenizer_file, "def ", run.train.sample_tokens, temperature=0.8,
                           seed=run.train.seed)
        print("sample:\n" + text)
    return 0


def cmd_generate(args) -> int:
    from nanokimi.infer.sample import load_for_sampling, sample_text

    if args.nbce_window is not None:
        from nanokimi.infer import LLM, SamplingParams

        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, nbce_window=args.nbce_window,
                                nbce_beta=args.nbce_beta, nbce_pooling=args.nbce_pooling)
        # NBCE keeps its own caches; the engine's paged cache stays small
        out = LLM(args.ckpt, max_num_seqs=1, max_cache_tokens=1024).generate([args.prompt], params, use_tqdm=False)[0]
        print(f"nbce: {out.metrics['nbce_windows']} windows of {out.metrics['nbce_window_tokens']} tokens",
              file=sys.stderr)
        print(args.prompt + out.text)
        return 0

    model, tokenizer_file = load_for_sampling(args.ckpt)
    print(sample_text(model, tokenizer_file, args.prompt, args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, report=True))
    return 0


def cmd_eval(args) -> int:
    if args.task is not None:
        from nanokimi.tasks.cli import run_eval
        return run_eval(args)
    if args.options:
        raise ConfigError(f"key=value options ({' '.join(args.options)}) go with --task; bits per byte takes none.")
    from nanokimi.train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.ckpt, args.data, args.batches, args.batch_size, args.seq_len)
    print(json.dumps(result, indent=1))
    return 0


def cmd_plot(args) -> int:
    from nanokimi.train.plot import plot_runs

    print(plot_runs(args.runs, args.out))
    return 0


def cmd_sft(args) -> int:
    from nanokimi.post.sft import run_sft

    result = run_sft(args.ckpt, args.data, args.out, args.overrides, resume=args.resume,
                     progress=not args.no_progress)
    val = f"val loss {result['val_loss']:.4f}" if "val_loss" in result else "no conversations held out"
    print(f"done: step {result['step']}, {val}; checkpoint {result['checkpoint']} (try: nanokimi chat {args.out})")
    return 0


def cmd_lepa(args) -> int:
    from nanokimi.post.lepa import LepaConfig, Templates, run_lepa

    options = {}
    if args.levels:
        options["levels"] = args.levels
    if args.data:
        options["path"] = args.data
    if args.per_level:
        options["per_level"] = args.per_level
    cfg = LepaConfig(task=args.task, task_options=options, iterations=args.iterations, trials=args.trials,
                     problems=args.problems, eval_problems=args.eval_problems, plan=not args.no_plan,
                     temperature=args.temperature, plan_tokens=args.plan_tokens, solution_tokens=args.solution_tokens,
                     seed=args.seed, sft_overrides=args.overrides)
    templates = Templates.load(args.templates) if args.templates else Templates()
    summary = run_lepa(args.ckpt, args.out, cfg, templates, progress=not args.no_progress)
    evals = [r["eval_before"].get("pass@1") for r in summary["iterations"]] + [summary["final_eval"].get("pass@1")]
    print(f"done: held-out pass@1 by iteration {evals}; checkpoint {summary['checkpoint']}; "
          f"metrics {args.out}/metrics.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanokimi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (default: the tiny preset on the stdlib corpus)")
    train.add_argument("--preset", help="model preset (default tiny)")
    train.add_argument("--config", help="TOML run config (sections model, data, train, optim)")
    train.add_argument("--out", help="run folder (default runs/PRESET)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to train on, through torchrun")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.max_steps=200 optim.lr=0.01")
    train.set_defaults(func=cmd_train)

    gen = commands.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--ckpt", required=True, help="run folder or its checkpoint folder")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--nbce-window", type=int, default=None, metavar="W",
                     help="NBCE: a prompt longer than the context, cut at newlines into windows of W tokens "
                          "(the last line is the query) and decoded together (docs/nbce.md)")
    gen.add_argument("--nbce-beta", type=float, default=0.25, help="NBCE beta (default 0.25)")
    gen.add_argument("--nbce-pooling", default="min_entropy", choices=["min_entropy", "mean"],
                     help="NBCE pooling over windows (default min_entropy)")
    gen.set_defaults(func=cmd_generate)

    ev = commands.add_parser("eval", help="bits per byte of a checkpoint, or pass@k on a task (--task)")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--data", help="bits per byte: prepared data folder or a source (default: the run's own data); "
                    "--task gsm8k/math500: the task's jsonl file or folder")
    ev.add_argument("--batches", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--task", help="gsm8k, math500, ladder or mused: sample, grade, report pass@k (docs/tasks.md)")
    ev.add_argument("--n", type=int, default=1, help="--task: samples per problem")
    ev.add_argument("--k", help="--task: comma-separated k for pass@k and maj@k (default 1 and n)")
    ev.add_argument("--temperature", type=float, default=1.0, help="--task: 0 is greedy")
    ev.add_argument("--max-tokens", type=int, default=256, help="--task: tokens per response at most")
    ev.add_argument("--limit", type=int, default=None, help="--task: first N problems only")
    ev.add_argument("--few-shot", type=int, default=0, help="--task: worked examples before each prompt")
    ev.add_argument("--seed", type=int, default=0, help="--task: sampling seed")
    ev.add_argument("--chat", action="store_true", help="--task: prompt in the chat form through the checkpoint's "
                    "chat template (replies end at the end of the turn)")
    ev.add_argument("--out", help="--task: write every sample, its grade and the settings to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("options", nargs="*", metavar="key=value", help="--task options, e.g. levels=1-8 per_level=20")
    ev.set_defaults(func=cmd_eval)

    tasks = commands.add_parser("tasks", help="task data").add_subparsers(dest="tasks_command", required=True)
    from nanokimi.tasks.cli import add_export_args, run_export
    export = add_export_args(tasks.add_parser("export", help="write generated problems with worked solutions "
                                              "(prompt + trace) as a jsonl training corpus"))
    export.set_defaults(func=run_export)

    plot = commands.add_parser("plot", help="loss curves of runs in one PNG")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="loss.png")
    plot.set_defaults(func=cmd_plot)

    data = commands.add_parser("data", help="prepare token shards").add_subparsers(dest="data_command", required=True)
    from nanokimi.data.cli import add_prepare_args, run_prepare
    prep = add_prepare_args(data.add_parser("prepare", help="tokenise a source into shards + manifest"))
    prep.set_defaults(func=run_prepare)

    model = commands.add_parser("model", help="inspect model configs").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts and cache sizes of a preset")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_model_info)

    from nanokimi.interop.cli import add_convert_args, run_convert
    convert = add_convert_args(commands.add_parser("convert", help="Hugging Face checkpoints in and out"))
    convert.set_defaults(func=run_convert)

    from nanokimi.chat_cli import add_chat_args
    add_chat_args(commands.add_parser("chat", help="chat with a checkpoint in the terminal (streams the reply)"))

    sft = commands.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant turns)")
    sft.add_argument("--ckpt", required=True, help="base checkpoint (run folder or checkpoint folder)")
    sft.add_argument("--data", required=True,
                     help='.jsonl of {"messages": [...]} or {"prompt": ..., "completion": ...}')
    sft.add_argument("--out", default="runs/sft", help="run folder (default runs/sft)")
    sft.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    sft.add_argument("--no-progress", action="store_true", help="no progress bar")
    sft.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="train.*, optim.* or sft.* (epochs, pack, train_on, val_fraction), e.g. optim.lr=1e-4")
    sft.set_defaults(func=cmd_sft)

    lepa = commands.add_parser("lepa", help="LEPA self-training: plan, solve, reflect with the answer, fine-tune")
    lepa.add_argument("--ckpt", required=True, help="base checkpoint (run folder or checkpoint folder)")
    lepa.add_argument("--task", required=True, choices=["ladder", "mused", "gsm8k", "math500"])
    lepa.add_argument("--levels", help="ladder levels / mused depths, e.g. 1-8")
    lepa.add_argument("--data", help="gsm8k / math500 data folder or file")
    lepa.add_argument("--per-level", type=int, help="ladder / mused problems per level and split")
    lepa.add_argument("--out", default="runs/lepa", help="run folder (default runs/lepa)")
    lepa.add_argument("--iterations", type=int, default=2)
    lepa.add_argument("--trials", type=int, default=5, help="attempts per problem and iteration (default 5)")
    lepa.add_argument("--problems", type=int, default=64, help="training problems per iteration (default 64)")
    lepa.add_argument("--eval-problems", type=int, default=100, help="held-out problems for pass@1 (default 100)")
    lepa.add_argument("--no-plan", action="store_true", help="the baseline: rejection-sampling self-training, no plans")
    lepa.add_argument("--temperature", type=float, default=0.8)
    lepa.add_argument("--plan-tokens", type=int, default=96)
    lepa.add_argument("--solution-tokens", type=int, default=256)
    lepa.add_argument("--templates", help="TOML file replacing prompt templates (docs/lepa.md)")
    lepa.add_argument("--seed", type=int, default=0)
    lepa.add_argument("--no-progress", action="store_true", help="no progress bar")
    lepa.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="settings of each fine-tuning (nanokimi sft's), e.g. sft.epochs=2 optim.lr=1e-4")
    lepa.set_defaults(func=cmd_lepa)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse takes a positional list only in one place: key=value items after flags land here
        if not hasattr(args, "options") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.options = args.options + extra
    from nanokimi.data import DataError
    from nanokimi.tasks import TaskError
    from nanokimi.train.trainer import TrainingError
    try:
        return args.func(args)
    except (ConfigError, DataError, TaskError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
