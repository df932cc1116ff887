"""Kimi Delta Attention op: naive recurrence (reference), chunkwise PyTorch, and fla-core kernels on CUDA.

`kda(...)` picks the implementation; `kda_backend(device)` says which one "auto" takes and why.
"""
import torch

from nanokimi.ops.kda.chunk import kda_chunk
from nanokimi.ops.kda.fla_kernels import fla_status, kda_fla
from nanokimi.ops.kda.naive import check_kda_inputs, kda_recurrent

IMPLS = ("auto", "naive", "chunk", "fla")
CHUNK_MIN_T = 8  # on CPU the token loop beats the chunk form below 8 tokens (fwd and fwd+bwd, measured)

__all__ = ["kda", "kda_backend", "kda_by_sequence", "kda_chunk", "kda_recurrent", "IMPLS"]


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, impl="auto", cu_seqlens=None):
    """Kimi Delta Attention over a sequence, per head (see naive.py for the exact recurrence).

    q, k, g: [B, T, H, K] (q, k L2-normalised; g the per-channel log-decay, <= 0); v: [B, T, H, V];
    beta: [B, T, H] in (0, 1); initial_state: [B, H, K, V]; scale defaults to K ** -0.5.
    impl: "auto" (fla-core kernels on CUDA when installed, else the chunk form, or the recurrence when
    T < 8), "naive", "chunk" or "fla".
    cu_seqlens: [N + 1] long, N sequences of different lengths laid end to end in a batch of one (B = 1,
    fla's varlen format): each starts from its own initial state (zeros without one; initial_state is [N, H, K, V])
    and the final state is [N, H, K, V]. fla runs them as they are; the other forms pad them into a batch of N.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32, or None unless output_final_state).
    """
    if impl not in IMPLS:
        raise ValueError(f"kda: impl must be one of {IMPLS}, got {impl!r}")
    B, T, H, K, V = check_kda_inputs(q, k, v, g, beta, initial_state if cu_seqlens is None else None)
    scale = K ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = _auto_impl(q.device, T)
    if impl == "fla":
        return kda_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        return kda_by_sequence(kda_chunk if impl == "chunk" else kda_recurrent, q, k, v, g, beta, scale,
                               initial_state, output_final_state, cu_seqlens)
    if impl == "chunk":
        return kda_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)
    return kda_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)


def kda_by_sequence(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Run `fn` (kda_chunk or kda_recurrent) over the sequences of a varlen batch [1, total, ...] padded into
    [N, L, ...]. The padding (zeros: no decay, beta 0) sits after each sequence, so it changes neither the
    outputs nor the final states."""
    if q.shape[0] != 1:
        raise ValueError(f"kda: cu_seqlens needs the sequences laid end to end in a batch of one, got B={q.shape[0]}.")
    total = q.shape[1]
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"kda: cu_seqlens must be [N + 1] offsets from 0 to T={total}, got {cu_seqlens.tolist()}.")
    starts, lengths = cu_seqlens[:-1], cu_seqlens.diff()  # [N], [N]
    L = int(lengths.max())
    steps = torch.arange(L, device=q.device)
    valid = steps[None, :] < lengths[:, None]  # [N, L]
    index = (starts[:, None] + steps[None, :]).clamp(max=total - 1)  # [N, L]

    def padded(x):  # [1, total, ...] -> [N, L, ...], zeros past each sequence's end
        mask = valid.view(*valid.shape, *([1] * (x.dim() - 2)))
        return x[0, index] * mask

    o, state = fn(padded(q), padded(k), padded(v), padded(g), padded(beta), scale, initial_state, output_final_state)
    return o[valid].unsqueeze(0), state  # [1, total, H, V]


def kda_backend(device):
    """(path, reason) that impl="auto" takes for sequences on `device`, for a one-line report.

    e.g. ("fla", "fla-core 0.6.0 on CUDA") or ("torch-chunk", "fla-core not installed; pip install nanokimi[cuda]").
    """
    device = torch.device(device)
    available, description = fla_status() if device.type == "cuda" else (False, "")
    if available:
        return "fla", f"{description} on CUDA"
    if device.type != "cuda":
        return "torch-chunk", f"{device.type} device: fla kernels need CUDA (recurrence below {CHUNK_MIN_T} tokens)"
    return "torch-chunk", f"{description}; pip install nanokimi[cuda]"


def _auto_impl(device, T):
    if device.type == "cuda" and fla_status()[0]:
        return "fla"
    return "chunk" if T >= CHUNK_MIN_T else "naive"
