"""`nanokimi data prepare`: the argparse arguments and the function the top-level CLI calls."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from nanokimi.data.corpus import DataError
from nanokimi.data.shards import prepare


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--source", default="stdlib",
                        help="'stdlib' (default: this Python's standard library), a text file, a .jsonl file, "
                             "a folder, or a glob pattern")
    parser.add_argument("--out", default=None, help="output folder (default: data/<name of the source>)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="size of the BPE to train (default 4096)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="use this tokenizer.json instead of training one (needs an <|endoftext|> token)")
    parser.add_argument("--text-field", default="text", metavar="NAME", help="jsonl field holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (0.01)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file (16M)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=8.0,
                        help="train the BPE on this many million characters of train documents (8)")
    parser.add_argument("--max-mb", type=float, default=0.0,
                        help="use a fixed sample of whole documents of about this many million characters (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder prepared differently")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def default_out(source: str) -> Path:
    name = "stdlib" if source == "stdlib" else Path(source.split("*")[0].rstrip("/") or "glob").stem
    return Path("data") / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data")


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare the data and print a summary; a DataError propagates (the CLI prints it as one line)."""
    out = Path(args.out) if args.out else default_out(args.source)
    m = prepare(args.source, out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                text_field=args.text_field, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                tokenizer_sample_chars=int(args.tokenizer_sample_mb * 1e6), max_chars=int(args.max_mb * 1e6),
                overwrite=args.overwrite,
                progress=not args.no_progress)
    print(f"{out}: source {m.source['spec']} ({m.source['files']} files), tokenizer vocab {m.tokenizer['vocab_size']} "
          f"({'trained' if m.tokenizer['trained'] else 'given'}), prepared in {m.seconds['total']:.1f} s")
    for name, s in m.splits.items():
        print(f"  {name:5s} {s.documents:8d} docs {s.tokens:12,d} tokens {s.bytes:14,d} bytes "
              f"({m.bytes_per_token(name):.2f} bytes/token) in {len(s.shards)} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_prepare_args(argparse.ArgumentParser(prog="nanokimi data prepare", description=__doc__))
    try:
        return run_prepare(parser.parse_args(argv))
    except DataError as e:
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
