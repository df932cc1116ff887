"""The network. `build_model(cfg)` returns a `Transformer`; see transformer.py for the forward pass."""
import torch

from nanokimi.config import ModelConfig
from nanokimi.model.transformer import Transformer


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """Build and initialise a model. device="meta" builds shapes only (for counting huge presets)."""
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    return model if dtype is None else model.to(dtype)


__all__ = ["build_model", "Transformer"]
