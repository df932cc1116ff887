"""nanokimi's own checkpoint directory: config.json (ModelConfig.to_dict()) + model.safetensors (state_dict names,
the tied LM head left out). Written atomically, like save_hf."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from nanokimi.config import ConfigError, ModelConfig
from nanokimi.interop.hf import _replace_dir, write_tokenizer_files
from nanokimi.model.transformer import Transformer


def save_native(model: Transformer, path: str | Path, overwrite: bool = False,
                tokenizer_files: dict[str, Path] | None = None) -> Path:
    """config.json + model.safetensors, and copies of `tokenizer_files` (see interop.hf.tokenizer_files_of)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "nanokimi": "1"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        write_tokenizer_files(tokenizer_files or {}, tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_native(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Transformer:
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).exists():
            raise ConfigError(f"{path} has no {name}; a nanokimi checkpoint holds config.json and model.safetensors "
                              "(convert a Hugging Face one with `nanokimi convert --from-hf`).")
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    state = load_file(str(path / "model.safetensors"), device=str(device or "cpu"))
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    if dtype is not None:
        state = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in state.items()}
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{path}/model.safetensors does not match its config.json: missing "
                          f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}.")
    return model if dtype is None else model.to(dtype)
