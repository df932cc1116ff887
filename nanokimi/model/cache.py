"""Inference caches: fixed-size buffers allocated once per generation, written in place.

Each mixer owns one small cache object; `ModelCache` holds them and the number of tokens seen.
"""
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """GQA: rotated keys and values, [B, L, Hkv, D]."""
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class LatentCache:
    """MLA: the compressed latent c_kv [B, L, kv_lora_rank] and the shared rotated key [B, L, rope_dim]."""
    c_kv: torch.Tensor
    k_rope: torch.Tensor


@dataclass
class RecurrentCache:
    """KDA: the last conv_size-1 pre-conv inputs [B, K-1, C] and the fp32 delta-rule state [B, H, Dk, Dv]."""
    conv: torch.Tensor
    state: torch.Tensor


class ModelCache:
    def __init__(self, layers: list, batch_size: int, max_len: int):
        self.layers = layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # tokens already in the cache

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"cache was made for batch_size={self.batch_size}, got a batch of {batch_size}; "
                             "make a new one with model.new_cache(batch_size=...).")
        if self.pos + new_tokens > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.pos} used and {new_tokens} more requested. "
                             "Make it larger with model.new_cache(max_len=...).")

    def reset(self) -> None:
        self.pos = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentCache):
                layer.conv.zero_()
                layer.state.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in vars(layer).values())
