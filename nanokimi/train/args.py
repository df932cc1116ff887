"""The arguments of `nanokimi train`, shared by the CLI and `python -m nanokimi.train` (one process per rank)."""
import argparse


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", help="model preset (default tiny)")
    parser.add_argument("--config", help="TOML run config (sections model, data, train, optim)")
    parser.add_argument("--out", help="run folder (default runs/PRESET)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to train on, through torchrun")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="e.g. train.max_steps=200 optim.lr=0.01 (before or after the options)")
    return parser


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `nanokimi train` arguments; section.key=value overrides may come before and after the options."""
    args, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") or "=" not in a for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    return args
