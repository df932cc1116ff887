"""Checkpoints: a folder with the weights (safetensors), the model config, the tokenizer, and the
trainer state (optimizer, schedule position, RNG, data position). Written to a temporary folder and
renamed into place, so a crash never leaves a half-written checkpoint."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from nanokimi.config import ModelConfig
from nanokimi.model import Transformer, build_model

WEIGHTS, CONFIG, TRAINER_STATE, TOKENIZER = "model.safetensors", "config.json", "trainer.pt", "tokenizer.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: Transformer, trainer_state: dict | None = None,
                    tokenizer_file: str | Path | None = None) -> Path:
    """Write the checkpoint folder atomically: everything goes to PATH.tmp, which then replaces PATH."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_model_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"'{path}' is not a nanokimi checkpoint: {path / name} is missing. "
                                    "Point --ckpt at a run's checkpoint folder (RUN_DIR/checkpoint) or a run folder.")
    cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    model = build_model(cfg, device=device)
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k not in ("lm_head.weight", "embed.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path / WEIGHTS} does not match its config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}.")
    return model


def load_trainer_state(path: str | Path) -> dict:
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: this checkpoint has no trainer state to resume from.")
    return torch.load(file, map_location="cpu", weights_only=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder that contains `checkpoint/`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path '{path}' does not exist.")
    if (path / WEIGHTS).is_file():
        return path
    if (path / "checkpoint" / WEIGHTS).is_file():
        return path / "checkpoint"
    raise FileNotFoundError(f"no checkpoint in '{path}': expected {path / WEIGHTS} or {path / 'checkpoint' / WEIGHTS}.")
