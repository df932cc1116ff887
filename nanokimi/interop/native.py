"""nanokimi's own checkpoint directory, as `nanokimi convert` writes and reads it: the files of nanokimi.checkpoint
(config.json + model.safetensors) and the tokenizer files, written atomically like save_hf."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from nanokimi.checkpoint import load_model_checkpoint, write_checkpoint_files
from nanokimi.interop.hf import _replace_dir, write_tokenizer_files
from nanokimi.model.transformer import Transformer


def save_native(model: Transformer, path: str | Path, overwrite: bool = False,
                tokenizer_files: dict[str, Path] | None = None) -> Path:
    """config.json + model.safetensors, and copies of `tokenizer_files` (see interop.hf.tokenizer_files_of)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_checkpoint_files(tmp, model)
        write_tokenizer_files(tokenizer_files or {}, tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_native(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> Transformer:
    """The model of a nanokimi checkpoint folder (nanokimi.checkpoint.load_model_checkpoint), cast to `dtype`."""
    return load_model_checkpoint(path, device=device or "cpu", dtype=dtype)
