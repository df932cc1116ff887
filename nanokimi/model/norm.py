"""RMSNorm, computed in fp32 and cast back before the weight (the Kimi / DeepSeek-V3 convention)."""
import torch
from torch import nn

from nanokimi.ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
