"""Kimi Delta Attention op: naive recurrence (reference), chunkwise PyTorch, and fla-core kernels on CUDA."""
from nanokimi.ops.kda.naive import kda_recurrent


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False):
    return kda_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)


__all__ = ["kda", "kda_recurrent"]
