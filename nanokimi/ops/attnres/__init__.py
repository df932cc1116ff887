"""Attention Residuals ops: naive.py is the readable reference, two_phase.py the form the model runs (eager PyTorch,
or under torch.compile), triton_phase1.py / triton_phase2.py its Triton kernels. `attnres(..., impl=)` picks one for
a depth-attention read; `attnres_kernels(impl, device)` is the kernel set the residual stream module runs."""
import importlib.util

import torch

from nanokimi.ops.attnres.naive import attnres_naive, attnres_stack_naive, attnres_stack_stored_naive
from nanokimi.ops.attnres.two_phase import (EAGER, Kernels, SharedSource, compiled_kernels, depth_attention,
                                            depth_attention_qe, merge_partial, share_source, source_rstd)

IMPLS = ("auto", "naive", "torch", "triton")

__all__ = ["IMPLS", "attnres", "attnres_backend", "attnres_kernels", "attnres_naive", "attnres_stack_naive",
           "attnres_stack_stored_naive", "depth_attention", "depth_attention_qe", "merge_partial", "source_rstd",
           "share_source", "SharedSource", "compiled_kernels", "Kernels", "EAGER"]


def attnres_backend(device) -> tuple[str, str]:
    """(impl, reason) that impl="auto" takes on `device`, for a one-line report."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", f"{device.type} device: the Triton kernels need CUDA"
    if importlib.util.find_spec("triton") is None:
        return "torch", "triton is not installed; pip install triton"
    return "triton", "CUDA with triton"


def attnres_kernels(impl: str = "auto", device="cpu", mode: str | None = None) -> Kernels:
    """The two-phase kernel set for impl "torch" (compiled_kernels(mode): torch.compile'd, on any device) or
    "triton" (phase 1 and the merges as Triton kernels over the compiled set, which still runs what they do not
    take); "auto": attnres_backend(device)'s choice. ("naive" has no kernel set: the module's eager default, EAGER,
    is the two-phase form in plain PyTorch.)"""
    if impl not in IMPLS or impl == "naive":
        raise ValueError(f"attnres_kernels: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        impl = attnres_backend(device)[0]
    if impl == "triton":
        from nanokimi.ops.attnres.triton_kernels import triton_kernels
        return triton_kernels(compiled_kernels(mode))
    return compiled_kernels(mode)


def attnres(sources, queries, key_weights, eps=1e-6, impl="auto"):
    """S depth-attention reads of N sources at the same token: out[s] = sum_n softmax_n(w_s . RMSNorm_s(v_n)) v_n.

    sources: [N, B, T, D] or a list of N tensors [B, T, D]; queries, key_weights: [S, D]. Returns [S, B, T, D] in the
    sources' dtype. impl: "naive" (naive.py, one read at a time), "torch" (the two-phase form, eager), "triton" (its
    Triton kernels; inputs they do not take run the torch form), "auto" (attnres_backend).
    """
    if impl not in IMPLS:
        raise ValueError(f"attnres: impl must be one of {IMPLS}, got {impl!r}")
    sources = list(sources)
    if not sources:
        raise ValueError("attnres needs at least one source (the token embedding).")
    if impl == "auto":
        impl = attnres_backend(sources[0].device)[0]
    if impl == "naive":
        if queries.dim() != 2 or queries.shape != key_weights.shape:
            raise ValueError(f"queries {tuple(queries.shape)} and key_weights {tuple(key_weights.shape)} must both "
                             "be [S, D].")
        return torch.stack([attnres_naive(sources, q, w, eps) for q, w in zip(queries, key_weights)])
    kernels = EAGER if impl == "torch" else attnres_kernels("triton", sources[0].device)
    mixtures, _ = depth_attention(sources, queries, key_weights, eps, kernels=kernels)
    return torch.stack(mixtures).to(sources[0].dtype)
