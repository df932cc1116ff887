"""Attention Residuals ops: naive.py is the readable reference, two_phase.py the form the model runs."""
from nanokimi.ops.attnres.naive import attnres_naive, attnres_stack_naive, attnres_stack_stored_naive
from nanokimi.ops.attnres.two_phase import (EAGER, Kernels, SharedSource, compiled_kernels, depth_attention,
                                            depth_attention_qe, merge_partial, share_source, source_rstd)

__all__ = ["attnres_naive", "attnres_stack_naive", "attnres_stack_stored_naive", "depth_attention",
           "depth_attention_qe", "merge_partial", "source_rstd", "share_source", "SharedSource", "compiled_kernels", "Kernels", "EAGER"]
