"""`nanokimi convert`: Hugging Face checkpoints to nanokimi's own format and back.

    nanokimi convert --from-hf HF_DIR --out NANOKIMI_DIR [--dtype bfloat16]
    nanokimi convert --to-hf NANOKIMI_DIR --out HF_DIR --layout kimi_linear|deepseek_v3 [--tokenizer PATH]

Both directions keep the tokenizer: tokenizer.json (HF tokenizers) or Kimi's tiktoken.model +
tokenizer_config.json, with the chat template (chat_template.jinja) and generation_config.json's eos ids.
"""
import argparse
from pathlib import Path
import sys

import torch

from nanokimi.interop.hf import LAYOUTS, infer_layout, load_hf, save_hf, tokenizer_files_of
from nanokimi.interop.native import load_native, save_native

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="transformers checkpoint to read (config.json + safetensors)")
    source.add_argument("--to-hf", metavar="NANOKIMI_DIR", help="nanokimi checkpoint to export for transformers")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (replaced atomically)")
    parser.add_argument("--layout", choices=LAYOUTS, help="HF layout for --to-hf (default: deepseek_v3 for "
                        "all-MLA RoPE models, else kimi_linear)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard for --to-hf, e.g. 2GB")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json, or a folder with tokenizer files, to copy next to the --to-hf weights "
                             "(default: the checkpoint's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Returns 0 on success, 2 when --out exists (ConfigError and FileNotFoundError propagate to the caller)."""
    try:
        return _convert(args)
    except FileExistsError as e:
        print(f"nanokimi convert: error: {e}", file=sys.stderr)
        return 2


def _convert(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.from_hf:
        model = load_hf(args.from_hf, dtype=dtype)
        has_tokenizer = any((Path(args.from_hf) / n).is_file() for n in ("tokenizer.json", "tiktoken.model"))
        save_native(model, args.out, overwrite=args.overwrite,
                    tokenizer_files=tokenizer_files_of(args.from_hf) if has_tokenizer else None)
        what = f"{args.from_hf} (HF {model.config.layer_mixers}) -> {args.out} (nanokimi)"
    else:
        model = load_native(args.to_hf, dtype=dtype)
        tokenizer = args.tokenizer
        if tokenizer is None and any((Path(args.to_hf) / n).is_file() for n in ("tokenizer.json", "tiktoken.model")):
            tokenizer = Path(args.to_hf)  # a training or converted checkpoint carries its tokenizer
        save_hf(model, args.out, layout=args.layout, max_shard_bytes=args.max_shard_size,
                tokenizer_path=tokenizer, overwrite=args.overwrite)
        what = f"{args.to_hf} (nanokimi) -> {args.out} (HF {args.layout or infer_layout(model.config)})"
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {what}: {n / 1e6:.2f}M parameters")
    return 0
