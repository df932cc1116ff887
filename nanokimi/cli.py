"""nanokimi: train, sample, evaluate, convert and inspect Kimi-family models.

  nanokimi train [--preset NAME | --config FILE.toml] [--out DIR] [--resume] [section.key=value ...]
  nanokimi generate --ckpt DIR --prompt TEXT [--nbce-window W]
  nanokimi eval --ckpt DIR [--task gsm8k|math500|ladder|mused --n 16 --k 1,4,16 ...]
  nanokimi tasks export ladder --out FILE.jsonl --levels 1-8 --count N
  nanokimi rl --ckpt DIR --task ladder|mused|gsm8k|math500 [--out DIR] [section.key=value ...]
  nanokimi plot RUN_DIR [RUN_DIR ...] --out FILE.png
  nanokimi data prepare --source SOURCE
  nanokimi model info --preset NAME
  nanokimi convert --from-hf HF_DIR --out DIR | --to-hf CHECKPOINT_DIR --out HF_DIR
  nanokimi serve CKPT [--host 127.0.0.1] [--port 8000] [--ttft-slo-ms MS] [--kv-offload-gb GB] ...
  nanokimi serve CKPT --prefill-workers P --decode-workers D   (or --replicas N; docs/disagg.md)
  nanokimi chat CKPT [--system TEXT]
  nanokimi sft --ckpt BASE --data FILE.jsonl [--out DIR] [--resume] [section.key=value ...]
  nanokimi lepa --ckpt BASE --task ladder|mused|gsm8k [--iterations N] [--trials N] [--no-plan] [--templates FILE]
"""
import argparse
import json
import math
import os
import sys
import warnings

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
    config_file, preset = args.config, args.preset
    own_config = Path(out) / "config.toml"
    if args.resume and not config_file and own_config.is_file():
        config_file = str(own_config)  # continue with the run's own settings (its model, its preset)
        if preset:
            warnings.warn(f"--preset {preset} is ignored with --resume: the run in {out} continues its own model "
                          f"(see {own_config}).", stacklevel=1)
            preset = None
    run = load_run_config(preset, config_file, args.overrides)
    if not any(o.strip().startswith("train.stop_at=") for o in args.overrides):
        run.train.stop_at = 0  # a stop_at saved by an older nanokimi belongs to that invocation only
    trainer = Trainer(run, out, resume=args.resume, progress=not args.no_progress)
    what = f"resuming {run.preset} at step {trainer.step}" if args.resume else f"training {run.preset}"
    print(f"{what} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M params) on "
          f"{trainer.device} with {run.optim.name}; data {trainer.data_dir}; writing {out}", file=sys.stderr)
    source = trainer.manifest.source
    if source.get("chars_used", 0) < source.get("chars", 0):
        print(f"data: a fixed sample of {source['chars_used'] / 1e6:.1f}M of the {source['chars'] / 1e6:.1f}M "
              f"characters of {run.data.source} (data.max_mb={run.data.max_mb:g}; data.max_mb=0 uses all)",
              file=sys.stderr)
    if args.resume and trainer.step >= run.train.max_steps:
        print(f"the run is already at train.max_steps={run.train.max_steps}: nothing to train. Continue it "
              f"further with: nanokimi train --out {out} --resume train.max_steps={2 * run.train.max_steps}",
              file=sys.stderr)
    from nanokimi.train.fast import describe_paths
    print("paths: " + describe_paths(trainer.model, trainer.device,
                                     torch.bfloat16 if trainer.device.type == "cuda" else torch.float32)
          + " | " + trainer.describe_step(), file=sys.stderr)
    result = trainer.fit()
    val = (f"val loss {result['val_loss']:.4f}, val bits/byte {result['val_bpb']:.4f}" if "val_loss" in result
           else "not evaluated")
    print(f"done: step {result['step']}, {result['tokens']:,} tokens, {val}; checkpoint {trainer.checkpoint_dir}")
    if run.train.sample_tokens > 0:
        from nanokimi.infer.sample import sample_text
        text = sample_text(trainer.model, trainer.tokenizer_file, "def ", run.train.sample_tokens, temperature=0.8,
                           seed=run.train.seed)
        print("sample:\n" + text)
    _finish_with_plot_and_next_steps(out, run.train.max_steps)
    return 0


def _finish_with_plot_and_next_steps(out: str, max_steps: int) -> None:
    from nanokimi.train.plot import plot_runs

    png = str(os.path.join(out, "loss.png"))
    try:
        print(f"loss curve: {plot_runs([out], png)}")
    except ImportError as e:
        print(f"loss curve: not drawn ({e})")
    print(f"next:\n  nanokimi generate --ckpt {out} --prompt 'def main(' --max-new-tokens 200\n"
          f"  nanokimi eval --ckpt {out}\n"
          f"  nanokimi train --out {out} --resume train.max_steps={4 * max_steps}   # train on from where it stopped")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def cmd_generate(args) -> int:
    from nanokimi.infer.sample import load_for_sampling, sample_text

    _check(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be >= 1.")
    _check(math.isfinite(args.temperature) and args.temperature >= 0,
           f"--temperature {args.temperature} must be >= 0 (0 = greedy).")
    _check(0 < args.top_p <= 1, f"--top-p {args.top_p} must be in (0, 1] (1 = off).")
    _check(args.top_k >= 0, f"--top-k {args.top_k} must be >= 0 (0 = off).")
    _check(math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0,
           f"--repetition-penalty {args.repetition_penalty} must be > 0 (1 = off).")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt is not valid UTF-8 text (the shell passed undecodable bytes); re-encode it as "
                         "UTF-8, e.g. with iconv.") from None
    if args.nbce_window is not None:
        from nanokimi.infer import LLM, SamplingParams

        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty,
                                nbce_window=args.nbce_window,
                                nbce_beta=args.nbce_beta, nbce_pooling=args.nbce_pooling)
        # NBCE keeps its own caches; the engine's paged cache stays small
        out = LLM(args.ckpt, max_num_seqs=1, max_cache_tokens=1024).generate([args.prompt], params, use_tqdm=False)[0]
        print(f"nbce: {out.metrics['nbce_windows']} windows of {out.metrics['nbce_window_tokens']} tokens",
              file=sys.stderr)
        print(args.prompt + out.text)
        return 0

    model, tokenizer = load_for_sampling(args.ckpt)
    print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, report=True,
                      repetition_penalty=args.repetition_penalty))
    return 0


def cmd_eval(args) -> int:
    if args.task is not None:
        from nanokimi.tasks.cli import run_eval
        return run_eval(args)
    if args.options:
        raise ConfigError(f"key=value options ({' '.join(args.options)}) go with --task; bits per byte takes none.")
    from nanokimi.train.evaluate import evaluate_checkpoint

    for name in ("batches", "batch_size", "seq_len"):
        _check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1.")
    result = evaluate_checkpoint(args.ckpt, args.data, args.batches, args.batch_size, args.seq_len)
    print(json.dumps(result, indent=1))
    return 0


def cmd_rl(args) -> int:
    if args.nproc > 1:
        from nanokimi.train.launch import launch_torchrun
        return launch_torchrun(args.nproc, sys.argv[2:], module="nanokimi.post.rl")
    from nanokimi.post.rl.cli import run_rl
    return run_rl(args)


def cmd_plot(args) -> int:
    from nanokimi.post.rl.plot import is_rl_run, plot_rl_runs
    if all(is_rl_run(run) for run in args.runs):  # reward, accuracy and length instead of loss curves
        print(plot_rl_runs(args.runs, args.out))
        return 0
    from nanokimi.train.plot import plot_runs

    print(plot_runs(args.runs, args.out))
    return 0


def cmd_serve(args) -> int:
    try:
        from nanokimi.serve.app import ServeOptions, Server, create_app
        from nanokimi.serve.run import check_can_listen, serve_forever
    except ImportError as e:
        raise FileNotFoundError(f"nanokimi serve needs the serve extra ({e.name} is missing): "
                                "pip install 'nanokimi[serve]'.") from e
    for name in ("max_cache_tokens", "ttft_slo_ms", "tbt_slo_ms", "max_num_seqs", "max_step_tokens", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}.")
    if args.kv_offload_gb < 0 or args.kv_disk_gb <= 0 or not 0 < args.slo_headroom <= 1:
        raise ConfigError("need --kv-offload-gb >= 0, --kv-disk-gb > 0 and 0 < --slo-headroom <= 1.")
    check_can_listen(args.host, args.port)
    options = ServeOptions(max_cache_tokens=args.max_cache_tokens, ttft_slo_ms=args.ttft_slo_ms,
                           tbt_slo_ms=args.tbt_slo_ms, slo_headroom=args.slo_headroom,
                           kv_offload_gb=args.kv_offload_gb, kv_disk=args.kv_disk, kv_disk_gb=args.kv_disk_gb,
                           enable_prefix_caching=not args.no_prefix_caching, max_num_seqs=args.max_num_seqs,
                           max_step_tokens=args.max_step_tokens, max_body_bytes=args.max_body_bytes,
                           served_model_name=args.served_model_name, device=args.device,
                           speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    if args.prefill_workers or args.decode_workers or args.replicas:
        from nanokimi.serve.disagg import DisaggOptions, load_disagg_server
        disagg = DisaggOptions(prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                               replicas=args.replicas)
        disagg.check()
        server = load_disagg_server(args.ckpt, options, disagg)
    else:
        server = Server.load(args.ckpt, options)
    print(f"serving {server.model_name} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /, "
          "metrics at /metrics)", file=sys.stderr)
    serve_forever(create_app(server), args.host, args.port)
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
    from nanokimi.train.args import add_train_args

    parser = argparse.ArgumentParser(prog="nanokimi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = add_train_args(commands.add_parser("train", help="train a model (default: the tiny preset on the stdlib "
                                                               "corpus)"))
    train.set_defaults(func=cmd_train)

    gen = commands.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a checkpoints/step-N folder")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="> 1 makes tokens of the prompt and the output so far less likely (1 = off; docs/engine.md)")
    gen.add_argument("--nbce-window", type=int, default=None, metavar="W",
                     help="NBCE: a prompt longer than the context, cut at newlines into windows of W tokens "
                          "(the last line is the query) and decoded together (docs/nbce.md)")
    gen.add_argument("--nbce-beta", type=float, default=0.25, help="NBCE beta (default 0.25)")
    gen.add_argument("--nbce-pooling", default="min_entropy", choices=["min_entropy", "mean"],
                     help="NBCE pooling over windows (default min_entropy)")
    gen.set_defaults(func=cmd_generate)

    ev = commands.add_parser("eval", help="bits per byte of a checkpoint, or pass@k on a task (--task)")
    ev.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a checkpoints/step-N folder")
    ev.add_argument("--data", help="bits per byte: prepared data folder (its validation split) or a source (all of it; "
                    "default: the run's own validation split); --task gsm8k/math500: the task's jsonl file or folder")
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

    from nanokimi.post.rl.cli import add_rl_args
    rl = add_rl_args(commands.add_parser("rl", help="reinforcement learning with verifiable rewards (k1.5, GRPO)"))
    rl.set_defaults(func=cmd_rl)

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

    serve = commands.add_parser("serve", help="an OpenAI-compatible server (needs the serve extra)")
    serve.add_argument("ckpt", metavar="CKPT", help="run folder or checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-cache-tokens", type=int, help="GPU KV cache size in tokens (default: fit memory)")
    serve.add_argument("--ttft-slo-ms", type=float, help="refuse (429) requests predicted to miss this TTFT")
    serve.add_argument("--tbt-slo-ms", type=float, help="refuse (429) requests predicted to push TBT past this")
    serve.add_argument("--slo-headroom", type=float, default=0.8,
                       help="admit only if the prediction fits in this fraction of the SLO (default 0.8)")
    serve.add_argument("--kv-offload-gb", type=float, default=0.0, help="pinned CPU tier for evicted prefix blocks")
    serve.add_argument("--kv-disk", help="folder for a disk tier below the CPU tier")
    serve.add_argument("--kv-disk-gb", type=float, default=64.0, help="size limit of the disk tier")
    serve.add_argument("--no-prefix-caching", action="store_true", help="recompute every prompt")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    serve.add_argument("--max-step-tokens", type=int, default=2048, help="token budget of one engine step")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the run folder's name)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--speculative", choices=["ngram", "suffix"],
                       help="draft tokens from the request's own prompt and output (ngram) or its group (suffix) and "
                            "verify them in one forward; greedy output is unchanged (docs/seer.md)")
    serve.add_argument("--num-speculative-tokens", type=int, default=4, help="draft length (adapted to acceptance)")
    serve.add_argument("--prefill-workers", type=int, default=0,
                       help="disaggregated serving: prefill worker processes, one GPU each (docs/disagg.md)")
    serve.add_argument("--decode-workers", type=int, default=0, help="disaggregated serving: decode workers")
    serve.add_argument("--replicas", type=int, default=0,
                       help="data-parallel engine replicas, one GPU each, each prefilling and decoding")
    serve.set_defaults(func=cmd_serve)

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
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Options without a help text show their default in --help (the others say it in their text)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
        elif action.option_strings and action.help is None and not any(action.default is v for v in (None, False, "")):
            action.help = f"default {action.default}"


def parse_args(argv=None) -> argparse.Namespace:
    """Parse a command line; key=value items (train's overrides, a task's options) may come before and after flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    if any(a.startswith("-") or "=" not in a for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *extra]
    elif hasattr(args, "options"):  # key=value task options after flags (eval --task, tasks export)
        args.options = [*args.options, *extra]
    else:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanokimi.checkpoint import CheckpointError
    from nanokimi.data import DataError
    from nanokimi.tasks import TaskError
    from nanokimi.train.trainer import TrainingError

    debug = os.environ.get("NANOKIMI_DEBUG", "") not in ("", "0")
    plain_format = warnings.formatwarning
    if not debug:  # warnings as one line each, like the errors
        warnings.formatwarning = lambda message, category, *rest, **kw: f"nanokimi: warning: {message}\n"
    try:
        return args.func(args)
    except (ConfigError, DataError, TaskError, TrainingError, CheckpointError, FileNotFoundError, ValueError) as e:
        if debug:
            raise
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("nanokimi: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure we did not foresee: one line, the traceback on demand
        if debug:
            raise
        print(f"nanokimi: error: {type(e).__name__}: {e}\n(rerun with NANOKIMI_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain_format


if __name__ == "__main__":
    sys.exit(main())
