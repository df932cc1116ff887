"""`nanokimi` command line. Each subcommand imports its machinery only when it runs."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanokimi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="inspect model configs").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts and cache sizes of a preset")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_model_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
