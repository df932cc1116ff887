"""Inference: the engine (continuous batching over a paged hybrid cache, prefix caching, CUDA-graph decode),
its offline front end LLM, and the simple fixed-batch generate()."""
from nanokimi.infer.engine import Engine
from nanokimi.infer.generate import DecodeStep, generate, release_decode_graphs, sample_next
from nanokimi.infer.llm import LLM
from nanokimi.infer.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "Engine", "RequestOutput", "CompletionOutput", "generate", "sample_next",
           "DecodeStep", "release_decode_graphs"]
