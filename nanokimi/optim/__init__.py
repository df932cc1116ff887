"""Optimizers: Muon (batched Newton-Schulz, per-head/split/per-expert), the Muon+AdamW builder, QK-Clip, and the
CUDA-graph step (CapturedStep)."""
from nanokimi.optim.builder import OptimizerSet, build_optimizer
from nanokimi.optim.graphed import CapturedStep
from nanokimi.optim.muon import Muon, matrix_blocks
from nanokimi.optim.qk_clip import apply_qk_clip, enable_qk_clip_recording

__all__ = ["CapturedStep", "Muon", "OptimizerSet", "apply_qk_clip", "build_optimizer", "enable_qk_clip_recording",
           "matrix_blocks"]
