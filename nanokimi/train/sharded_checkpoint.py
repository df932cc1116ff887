"""Checkpoints of sharded (FSDP2) runs, through torch.distributed.checkpoint (DCP).

A sharded checkpoint is a step folder (RUN/checkpoints/step-N, the layout of nanokimi.checkpoint) that holds
what a single-process one does, except the weights and optimizer state:
    config.json, tokenizer.json       as in nanokimi.checkpoint
    trainer.pt                        data position, RNG, step, tokens, run config ("format": "dcp")
    sharded/                          DCP files of {"model": weights, "optim": optimizer state}, each rank
                                      writing its own shards
DCP stores every tensor by parameter name with its global shape, so a checkpoint saved by N ranks resumes on
M ranks, or on one process. The other direction works too: a sharded run resumes from a single-process
checkpoint (model.safetensors + trainer.pt). `export_checkpoint` turns a sharded checkpoint into the
single-process format (model.safetensors), which `nanokimi generate --ckpt`, `eval` and HF export read.

    python -m nanokimi.train.sharded_checkpoint RUN OUT_DIR    # export (RUN: a run folder or a step folder)
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from nanokimi.checkpoint import (CONFIG, TOKENIZER, TRAINER_STATE, WEIGHTS, CheckpointNotFound, load_trainer_state,
                                 resolve_checkpoint, save_checkpoint, save_step)

SHARDED = "sharded"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED / ".metadata").is_file()


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _optimizers(optimizer) -> list:
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, trainer_state: dict,
                            tokenizer_file: str | Path | None = None, keep: int = 2,
                            extra_files: Callable[[Path], None] | None = None) -> Path:
    """Every rank calls this. Writes RUN/checkpoints/step-STEP like a single-process run does (a temporary
    folder, fsynced and renamed, then `latest`): DCP shards from every rank, the small files (and
    `extra_files(tmp_folder)`'s) from rank 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def write(tmp: Path) -> None:
        model_state, optim_state = get_state_dict(model, _optimizers(optimizer))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDED))
        if _main():
            config = getattr(model, "config", None)
            if config is not None:
                (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=1))
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
            state = {k: v for k, v in trainer_state.items() if k != "optimizer"}
            torch.save({**state, "format": "dcp"}, tmp / TRAINER_STATE)
            if extra_files is not None:
                extra_files(tmp)

    return save_step(run_dir, step, write, keep=keep, is_main=_main(), barrier=_barrier)


def load_into(path: str | Path, model: nn.Module, optimizer) -> dict:
    """Load a checkpoint (sharded or single-process) into `model` and `optimizer`, which may be sharded
    (FSDP2 DTensors, any number of ranks) or plain; every rank calls this. Returns the trainer state
    (data position, RNG, step, tokens, ...)."""
    path = Path(path)
    state = load_trainer_state(path)
    if is_sharded_checkpoint(path):
        _load_dcp(path, model, optimizer)
    else:
        _load_full(path, model, optimizer, state.pop("optimizer"))
    return state


def _load_dcp(path: Path, model: nn.Module, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = _optimizers(optimizer)
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _load_full(path: Path, model: nn.Module, optimizer, optim_state: dict) -> None:
    """A single-process checkpoint into a (possibly sharded) run: every rank reads the whole file and keeps
    its own shard of each weight and optimizer tensor."""
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in weights:
                if name in params and not _is_tied(model, name):
                    raise ValueError(f"{path / WEIGHTS} has no tensor {name}; it does not match this model.")
                continue
            _local(tensor).copy_(_local(_shard_like(weights[name], tensor)))
    optimizers = getattr(optimizer, "optimizers", {"": optimizer})
    if hasattr(optimizer, "optimizers") and set(optim_state) != set(optimizers):
        raise ValueError(f"the checkpoint's optimizer holds {sorted(optim_state)} but this run has "
                         f"{sorted(optimizers)}; resume with the same optim.name.")
    for name, opt in optimizers.items():
        saved = optim_state[name] if name else optim_state
        ordered = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for index, values in saved["state"].items():
            param = ordered[index]
            state[index] = {k: _shard_like(v, param) if torch.is_tensor(v) and v.shape == param.shape else v
                            for k, v in values.items()}
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _is_tied(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and name in ("lm_head.weight", "embed.weight")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out like `like` (a DTensor, or a plain tensor: all of it)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def export_checkpoint(sharded: str | Path, out: str | Path) -> Path:
    """Write the single-process checkpoint folder (model.safetensors, config.json, tokenizer.json; no trainer
    state: resume from the sharded checkpoint itself) of a sharded checkpoint. Runs in one plain process,
    without a process group, on the CPU."""
    from nanokimi.config import ModelConfig
    from nanokimi.model import build_model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sharded = resolve_checkpoint(sharded)
    if not is_sharded_checkpoint(sharded):
        raise CheckpointNotFound(f"'{sharded}' is not a sharded checkpoint: {sharded / SHARDED / '.metadata'} is "
                                 "missing. Point at the run folder (or RUN/checkpoints/step-N) of a run trained with "
                                 "--nproc > 1.")
    model = build_model(ModelConfig.from_dict(json.loads((sharded / CONFIG).read_text())), device="cpu")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(sharded / SHARDED))
    set_model_state_dict(model, state["model"])
    tokenizer = sharded / TOKENIZER
    return save_checkpoint(out, model, None, tokenizer if tokenizer.is_file() else None)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m nanokimi.train.sharded_checkpoint SHARDED_CHECKPOINT_DIR OUT_DIR")
    print(export_checkpoint(sys.argv[1], sys.argv[2]))
