"""Inference: batched generation over the model's preallocated caches (CUDA-graph decode on GPU)."""
from nanokimi.infer.generate import DecodeStep, generate, release_decode_graphs, sample_next

__all__ = ["generate", "sample_next", "DecodeStep", "release_decode_graphs"]
