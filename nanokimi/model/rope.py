"""Rotary position embeddings, with DeepSeek-V3 style YaRN extension and optional interleaved pairs."""
import math

import torch
from torch import nn


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, theta: float, yarn_factor: float = 1.0, original_max_position: int = 4096,
                        beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """[dim // 2] fp32. With YaRN, high-frequency channels keep their frequency, low ones are divided by
    `yarn_factor`, and a linear ramp blends the band in between."""
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if yarn_factor <= 1.0:
        return base.float()
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, theta, original_max_position)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, theta, original_max_position)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = keep the original (extrapolated) frequency
    return (base / yarn_factor * (1 - keep) + base * keep).float()


class Rotary(nn.Module):
    """Precomputed cos/sin tables; `forward(x, positions)` rotates the last dim of x [B, T, H, D]."""

    def __init__(self, dim: int, max_position: int, theta: float, interleave: bool = False,
                 yarn_factor: float = 1.0, yarn_original_max_position: int = 4096, yarn_beta_fast: float = 32.0,
                 yarn_beta_slow: float = 1.0, yarn_magnitude: float = 1.0, yarn_magnitude_all_dim: float = 0.0):
        super().__init__()
        self.dim = dim
        self.interleave = interleave
        self.max_position = max_position
        inv_freq = inverse_frequencies(dim, theta, yarn_factor, yarn_original_max_position, yarn_beta_fast,
                                       yarn_beta_slow)
        self.magnitude = yarn_mscale(yarn_factor, yarn_magnitude) / yarn_mscale(yarn_factor, yarn_magnitude_all_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table_len = 0

    def _tables(self, length: int, device):
        if self._table_len < length or self.cos.device != device:
            t = torch.arange(max(length, 1), dtype=torch.float32, device=device)
            angles = torch.outer(t, self.inv_freq.to(device))  # [L, D/2]
            angles = torch.cat([angles, angles], dim=-1)  # [L, D]
            self.cos = angles.cos() * self.magnitude
            self.sin = angles.sin() * self.magnitude
            self._table_len = max(length, 1)
        return self.cos, self.sin

    def ensure_length(self, length: int, device) -> None:
        """Build the tables for `length` positions now (before a CUDA graph capture reads them)."""
        self._tables(length, device)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """x: [B, T, H, D] for positions start .. start+T-1. A 0-d tensor `start` (fixed-shape decode)
        gathers from tables built beforehand with `ensure_length`; a 1-d tensor [B] gives each row of a
        one-token batch its own position (the paged engine's decode)."""
        T = x.shape[1]
        if isinstance(start, torch.Tensor):
            if self._table_len == 0:
                raise RuntimeError("Rotary tables are empty: call ensure_length(max_len, device) before "
                                   "a decode step with a tensor position.")
            if start.dim() == 1:  # x [B, 1, H, D], one position per row
                cos = self.cos.index_select(0, start)[:, None, None, :]  # [B, 1, 1, D]
                sin = self.sin.index_select(0, start)[:, None, None, :]
            else:
                positions = start + torch.arange(T, device=x.device)  # [T]
                cos = self.cos.index_select(0, positions)[:, None, :]  # [T, 1, D]
                sin = self.sin.index_select(0, positions)[:, None, :]
        else:
            cos, sin = self._tables(start + T, x.device)
            cos = cos[start:start + T, None, :]  # [T, 1, D]
            sin = sin[start:start + T, None, :]
        if self.interleave:  # pairs (0,1), (2,3), ... -> halves, then the usual rotation
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        x32 = x.float()
        half = self.dim // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)
