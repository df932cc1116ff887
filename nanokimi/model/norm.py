"""RMSNorm, computed in fp32 and cast back before the weight (the Kimi / DeepSeek-V3 convention)."""
import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / RMS(x)): normalised in fp32, rounded to x's dtype, then scaled by weight [D] (the result in
    the wider of the two dtypes). RMSNorm's maths; AttnRes's fused merge + norm (ops/attnres) computes the same."""
    x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps); fused where torch has a kernel
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
