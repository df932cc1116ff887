"""Checkpoints: a folder with the weights (safetensors), the model config, the tokenizer, and the
trainer state (optimizer, schedule position, RNG, data position).

A training run keeps its checkpoints as step folders with a pointer to the newest, like torchtitan:

    RUN/checkpoints/step-75/    model.safetensors  config.json  tokenizer.json  trainer.pt
    RUN/checkpoints/step-150/   ...
    RUN/checkpoints/latest      the text "step-150"

A step folder is written under `step-N.tmp`, every file fsynced, then renamed to `step-N` (a rename is
atomic): a folder named `step-N` is always complete. `latest` is replaced atomically (write a temporary
file, fsync, os.replace) after the rename, and older steps are deleted only after that, so a crash at
any moment leaves at least the previous complete step. Readers follow `latest` and, when it is missing
or names a folder that is not there, fall back to the newest complete step with a warning.
Runs of older nanokimi versions (`RUN/checkpoint/`) still load."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from nanokimi.config import ConfigError, ModelConfig
from nanokimi.model import Transformer, build_model

WEIGHTS, CONFIG, TRAINER_STATE, TOKENIZER = "model.safetensors", "config.json", "trainer.pt", "tokenizer.json"
CHECKPOINTS, LATEST, LEGACY = "checkpoints", "latest", "checkpoint"
SHARDED_METADATA = Path("sharded") / ".metadata"  # written by nanokimi.train.sharded_checkpoint (DCP)
STEP_NAME = re.compile(r"step-(\d+)")
EXPORT_HINT = "python -m nanokimi.train.sharded_checkpoint {path} OUT_DIR"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file and what to do."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected (also a FileNotFoundError, as before the step layout)."""


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


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then every folder (so the new names are durable too)."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def write_checkpoint_files(folder: Path, model: Transformer, trainer_state: dict | None = None,
                           tokenizer_file: str | Path | None = None) -> None:
    """The files of a single-process checkpoint, written into an existing (temporary) folder."""
    save_model(model, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, folder / TRAINER_STATE)


def save_checkpoint(path: str | Path, model: Transformer, trainer_state: dict | None = None,
                    tokenizer_file: str | Path | None = None) -> Path:
    """Write one checkpoint folder at PATH (replacing it): everything goes to PATH.tmp, fsynced, renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, model, trainer_state, tokenizer_file)
    fsync_tree(tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    fsync_path(path.parent)
    return path


def step_of(folder: Path) -> int | None:
    match = STEP_NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """A step folder that was renamed into place: it has its config and its weights (whole or sharded)."""
    return folder.is_dir() and (folder / CONFIG).is_file() and (
        (folder / WEIGHTS).is_file() or (folder / SHARDED_METADATA).is_file())


def complete_steps(checkpoints: Path) -> list[Path]:
    """The complete step folders of a `checkpoints/` folder, oldest first."""
    if not checkpoints.is_dir():
        return []
    steps = [p for p in checkpoints.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(steps, key=step_of)


def read_latest(checkpoints: Path) -> Path | None:
    """The step folder named by `checkpoints/latest`, if the pointer exists and that folder is complete."""
    try:
        name = (checkpoints / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = checkpoints / name
    return folder if step_of(folder) is not None and is_complete(folder) else None


def latest_step(checkpoints: Path, warn: bool = True) -> Path | None:
    """Follow `latest`; if it is missing or dangling, the newest complete step (with a warning)."""
    followed = read_latest(checkpoints)
    if followed is not None:
        return followed
    steps = complete_steps(checkpoints)
    if steps and warn:
        warnings.warn(f"{checkpoints / LATEST} is missing or names an incomplete folder; using the newest complete "
                      f"checkpoint, {steps[-1]}.", stacklevel=2)
    return steps[-1] if steps else None


def save_step(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 2,
              is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Write RUN/checkpoints/step-STEP through `write(tmp_folder)`, then point `latest` at it and keep the
    newest `keep` steps. With several processes every rank calls this (write() may be collective); rank 0
    (`is_main`) does the file system work and `barrier` orders it."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    final = checkpoints / f"step-{step}"
    tmp = checkpoints / f"step-{step}.tmp"
    if is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            fsync_tree(tmp)
            if final.exists():  # saved again at the same step (e.g. stopped right after a resume): same state
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(checkpoints)
            write_latest(checkpoints, final.name)
            prune(checkpoints, keep)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def write_latest(checkpoints: Path, name: str) -> None:
    """Replace `checkpoints/latest` atomically: a temporary file, fsynced, then os.replace."""
    tmp = checkpoints / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoints / LATEST)
    fsync_path(checkpoints)


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete steps (never the one `latest` names) and stale temporaries."""
    latest = read_latest(checkpoints)
    steps = complete_steps(checkpoints)
    for old in steps[:-keep] if keep > 0 else []:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    newest = step_of(steps[-1]) if steps else -1
    for tmp in checkpoints.glob("step-*.tmp"):
        if (step_of(tmp.with_suffix("")) or 0) <= newest:
            shutil.rmtree(tmp, ignore_errors=True)


def run_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The checkpoint to continue a run from: checkpoints/latest (or the newest complete step), else the
    `checkpoint/` folder of an older nanokimi; None when the run saved nothing."""
    run_dir = Path(run_dir)
    found = latest_step(run_dir / CHECKPOINTS, warn=warn)
    if found is None and is_complete(run_dir / LEGACY):
        found = run_dir / LEGACY
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder behind `path`: a step folder (or any checkpoint folder) itself, a `checkpoints/`
    folder or a run folder through `latest` (falling back to the newest complete step, with a warning),
    or an older run's `checkpoint/`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint path '{path}' does not exist.")
    if is_complete(path):
        return path
    if path.name.endswith(".tmp") and step_of(Path(path.name[:-4])) is not None:
        raise CheckpointError(f"'{path}' is a checkpoint that was never finished (a save was cut off); use the run "
                              f"folder '{path.parent.parent}' or a step-N folder next to it.")
    found = latest_step(path, warn=True) if path.name == CHECKPOINTS else run_checkpoint(path)
    if found is not None:
        return found
    raise CheckpointNotFound(f"no checkpoint in '{path}': expected a run folder with {CHECKPOINTS}/step-N/ (the run "
                          f"saved no step yet?), a {CHECKPOINTS}/ folder, or a folder holding {WEIGHTS} and {CONFIG}.")


def _check_not_sharded(path: Path) -> None:
    if (path / SHARDED_METADATA).is_file() and not (path / WEIGHTS).is_file():
        raise CheckpointError(f"'{path}' is a sharded checkpoint of a multi-process (--nproc) run; export it to one "
                              f"file first: {EXPORT_HINT.format(path=path)}, then pass OUT_DIR.")


def load_model_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG} is damaged ({e}); use another checkpoint of the run "
                              f"(an older {CHECKPOINTS}/step-N).") from None
    if isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw):
        raise CheckpointError(f"'{path}' is a Hugging Face checkpoint (model_type {raw.get('model_type')!r}), not a "
                              f"nanokimi one; import it first: nanokimi convert --from-hf {path} --out DIR.")
    try:
        return ModelConfig.from_dict(raw)
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG} is not a nanokimi model config: {e}") from None


def load_weights(model: Transformer, path: str | Path, device: str | torch.device = "cpu",
                 fix: str = "use another checkpoint of the run", check: bool = True) -> None:
    """Read PATH/model.safetensors into `model` in place (every reader of weights goes through here: generate,
    eval, resume, RL, convert). A damaged file is a one-line CheckpointError ending with `fix`; check=True also
    refuses a file whose names do not match the model (a tied LM head is stored once)."""
    path = Path(path)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and RuntimeError on shape mismatches)
        raise CheckpointError(f"{path / WEIGHTS} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
                              f"the file is damaged or truncated; {fix}.") from None
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        missing = [k for k in missing if k not in ("lm_head.weight", "embed.weight")]
    if check and (missing or unexpected):
        raise CheckpointError(f"checkpoint {path / WEIGHTS} does not match its config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}.")


def load_model_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> Transformer:
    """The model of a checkpoint folder (config.json + model.safetensors), on `device`, cast to `dtype` if given."""
    path = Path(path)
    _check_not_sharded(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise CheckpointNotFound(f"'{path}' is not a nanokimi checkpoint: {path / name} is missing. "
                                  f"Point --ckpt at a run folder or one of its {CHECKPOINTS}/step-N folders.")
    model = build_model(load_model_config(path), device=device)
    load_weights(model, path, device)
    return model if dtype is None else model.to(dtype)


def load_trainer_state(path: str | Path) -> dict:
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointNotFound(f"{file} is missing: this checkpoint has no trainer state to resume from.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises pickle, zip and runtime errors on damaged files
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}):"
                              f" the file is damaged or truncated. Delete the folder {file.parent} to resume from the "
                              "step before it.") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a nanokimi trainer state; delete {file.parent} to resume from the step "
                              "before it.")
    return state
