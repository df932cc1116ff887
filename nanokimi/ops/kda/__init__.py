"""Kimi Delta Attention op: naive recurrence (reference), chunkwise PyTorch, and fla-core kernels on CUDA."""
from nanokimi.ops.kda.naive import kda_recurrent

__all__ = ["kda_recurrent"]
