"""Text in, text out: load a checkpoint with its tokenizer and sample from it."""
from pathlib import Path

import torch

from nanokimi.checkpoint import TOKENIZER, load_model_checkpoint, resolve_checkpoint


def load_for_sampling(ckpt: str, device: str | None = None):
    """(model in eval mode, path of its tokenizer.json) from a run folder or checkpoint folder."""
    path = resolve_checkpoint(ckpt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_checkpoint(path, device).eval()
    tokenizer_file = path / TOKENIZER
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} is missing: this checkpoint carries no tokenizer.")
    return model, tokenizer_file


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
