"""`nanokimi eval`: validation loss and bits per byte of a checkpoint."""
from pathlib import Path

import torch

from nanokimi.checkpoint import load_trainer_state, resolve_checkpoint
from nanokimi.infer.sample import load_for_sampling
from nanokimi.train.trainer import evaluate


def evaluate_checkpoint(ckpt: str, data: str | None, batches: int, batch_size: int, seq_len: int) -> dict:
    """Validation loss and bits per byte of a checkpoint on its run's data (or on `data`)."""
    from nanokimi.data import Manifest, iter_eval, prepare

    path = resolve_checkpoint(ckpt)
    model, tokenizer_file = load_for_sampling(str(path))
    device = next(model.parameters()).device
    if data is None:
        data_dir = Path(load_trainer_state(path)["data_dir"])
    elif (Path(data) / "manifest.json").is_file():
        data_dir = Path(data)
    else:
        data_dir = Path(data.rstrip("/") + ".nanokimi-eval")
        prepare(data, data_dir, tokenizer_path=tokenizer_file)
    manifest = Manifest.load(data_dir)
    stream = iter_eval(data_dir, "val", batch_size, seq_len, batches, device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    return {"checkpoint": str(path), "data": str(data_dir), **evaluate(model, stream, manifest.bytes_per_token("val"), autocast)}
