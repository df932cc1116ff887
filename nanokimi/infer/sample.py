"""Text in, text out: load a checkpoint with its tokenizer, sample from it, or score it on data."""
from pathlib import Path

import torch

from nanokimi.train.checkpoint import TOKENIZER, load_model_checkpoint, load_trainer_state, resolve_checkpoint


def load_for_sampling(ckpt: str, device: str | None = None):
    """(model in eval mode, path of its tokenizer.json) from a run folder or checkpoint folder."""
    path = resolve_checkpoint(ckpt)
    tokenizer_file = path / TOKENIZER
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} is missing: this checkpoint carries no tokenizer.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model_checkpoint(path, device).eval(), tokenizer_file


def sample_text(model, tokenizer_file, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> str:
    from nanokimi.data import Tokenizer
    from nanokimi.infer.generate import generate

    tokenizer = Tokenizer.load(tokenizer_file)
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                   top_p=top_p, top_k=top_k, seed=seed, eos_id=tokenizer.eot_id)
    model.train(was_training)
    new = [t for t in out[0, len(ids):].tolist()]
    if tokenizer.eot_id in new:
        new = new[:new.index(tokenizer.eot_id)]
    return prompt + tokenizer.decode(new)


def evaluate_checkpoint(ckpt: str, data: str | None, batches: int, batch_size: int, seq_len: int) -> dict:
    """Validation loss and bits per byte of a checkpoint on its run's data (or on `data`)."""
    from nanokimi.data import Manifest, iter_eval, prepare
    from nanokimi.train.trainer import evaluate

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
