"""`nanokimi rl --ckpt BASE --task NAME [--out DIR] [--config FILE] [--resume] [--nproc N] [section.key=value ...]`."""
from __future__ import annotations

import sys
from pathlib import Path


def add_rl_args(parser):
    parser.add_argument("--ckpt", help="base checkpoint: a run folder or a checkpoint folder (rl.ckpt)")
    parser.add_argument("--task", help="ladder | mused | gsm8k | math500 (rl.task)")
    parser.add_argument("--config", help="TOML with sections rl and optim")
    parser.add_argument("--out", help="run folder (default runs/rl-TASK)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs), through torchrun")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. rl.loss=grpo rl.steps=50")
    return parser


def build_task(cfg):
    from nanokimi.config import ConfigError
    from nanokimi.tasks import TaskError, get_task

    options = {}
    if cfg.task_levels:
        options["levels" if cfg.task == "ladder" else "depths"] = cfg.task_levels
    if cfg.task_per_level:
        options["per_level"] = cfg.task_per_level
    if cfg.task_path:
        options["path"] = cfg.task_path
    try:
        return get_task(cfg.task, **options)
    except TaskError as e:
        raise ConfigError(f"rl.task: {e}") from None


def pick_device(name: str, rank: int, world_size: int):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_rl(args, rank: int = 0, world_size: int = 1) -> int:
    from nanokimi.checkpoint import load_model_checkpoint, resolve_checkpoint
    from nanokimi.config import ConfigError
    from nanokimi.data import load_tokenizer
    from nanokimi.post.rl.config import load_rl_config
    from nanokimi.post.rl.loop import RLTrainer

    overrides = list(args.overrides)
    if args.ckpt:
        overrides.append(f"rl.ckpt={args.ckpt}")
    if args.task:
        overrides.append(f"rl.task={args.task}")
    out = Path(args.out or f"runs/rl-{args.task or 'task'}")
    config_file = args.config
    if args.resume and not config_file and (out / "config.toml").is_file():
        config_file = str(out / "config.toml")  # continue with the run's own settings
    if args.resume and not config_file:
        raise ConfigError(f"--resume: '{out}' holds no RL run (no config.toml); give --out of an existing run, or "
                          "start a new one without --resume.")
    run = load_rl_config(config_file, overrides)
    if not run.rl.ckpt:
        raise ConfigError("nanokimi rl needs a base model: --ckpt RUN_DIR (or rl.ckpt in the config).")
    if not (args.task or config_file or any(o.strip().startswith("rl.task=") for o in overrides)):
        raise ConfigError("nanokimi rl needs a task: --task ladder|mused|gsm8k|math500 (or rl.task in the config).")
    device = pick_device(run.rl.device, rank, world_size)
    base = resolve_checkpoint(run.rl.ckpt)
    model = load_model_checkpoint(base, device)
    tokenizer = load_tokenizer(base)  # tokenizer.json, or Kimi's tiktoken.model + tokenizer_config.json
    ref_model = None
    if run.rl.loss == "grpo" and run.rl.kl_coef > 0:
        ref_model = load_model_checkpoint(base, device).eval().requires_grad_(False)
    task = build_task(run.rl)
    trainer = RLTrainer(run, model, tokenizer, task, out, tokenizer_file=base, ref_model=ref_model,
                        resume=args.resume, progress=not args.no_progress, rank=rank, world_size=world_size)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"rl {run.rl.loss} on {run.rl.task} from {base} ({params / 1e6:.1f}M params) on {world_size} x {device}; "
              f"{run.rl.prompts_per_step} prompts x {run.rl.samples_per_prompt} samples per step; writing {out}",
              file=sys.stderr)
    result = trainer.fit()
    if rank == 0:
        after = result["eval_after"]["all"]
        before = result.get("eval_before", {}).get("all", {})
        ks = run.eval_ks()
        line = ", ".join(f"pass@{k} {before.get(f'pass@{k}', float('nan')):.3f} -> {after[f'pass@{k}']:.3f}"
                         for k in ks)
        print(f"done: step {result['step']}, {result['tokens']:,} generated tokens; {line}; checkpoint "
              f"{trainer.checkpoint_dir}")
    return 0


def main_distributed(argv=None) -> int:
    """`python -m nanokimi.post.rl` under torchrun: every rank runs the same RL trainer on its share."""
    import argparse

    from nanokimi.config import ConfigError
    from nanokimi.data import DataError
    from nanokimi.train.distributed import close_distributed, init_distributed
    from nanokimi.train.trainer import TrainingError

    args = add_rl_args(argparse.ArgumentParser(prog="nanokimi rl")).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from nanokimi.post.rl.config import load_rl_config
        device = load_rl_config(args.config, [o for o in args.overrides if o.startswith("rl.device")]).rl.device
        rank, world_size = init_distributed(device)
        try:
            return run_rl(args, rank, world_size)
        finally:
            close_distributed()
    except (ConfigError, DataError, TrainingError, FileNotFoundError) as e:
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2
