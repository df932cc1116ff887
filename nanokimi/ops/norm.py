"""RMSNorm's maths, shared by the model and the fused AttnRes ops."""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / RMS(x)): normalised in fp32, rounded to x's dtype, then scaled by weight [D] (the result in
    the wider of the two dtypes). RMSNorm's maths (nanokimi.model.norm.RMSNorm); AttnRes's fused merge + norm (ops/attnres) computes the same."""
    x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps); fused where torch has a kernel
    return weight * x32.to(x.dtype)
