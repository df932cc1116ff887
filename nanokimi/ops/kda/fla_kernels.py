"""KDA through fla-core's Triton kernels (CUDA only): `chunk_kda` for sequences, `fused_recurrent_kda` for decode.

Both are called so that they compute exactly what `kda_recurrent` computes: q and k are already
L2-normalised (use_qk_l2norm_in_kernel=False), g is already the per-channel log-decay
(use_gate_in_kernel=False, so no A_log/softplus inside), beta is already in (0, 1)
(use_beta_sigmoid_in_kernel=False), no gate clamping (safe_gate=False), the state is [B, H, K, V]
(state_v_first=False), layouts are [B, T, H, D] and the scale is passed explicitly.
"""
import functools
import importlib.metadata
import importlib.util

import torch


@functools.lru_cache(maxsize=1)
def fla_status():
    """(importable, description), e.g. (True, "fla-core 0.6.0") or (False, "fla-core not installed")."""
    if importlib.util.find_spec("fla") is None:
        return False, "fla-core not installed"
    try:
        version = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    try:
        import fla.ops.kda  # noqa: F401  (imports triton; fails cleanly where triton is missing)
    except Exception as error:  # any import-time failure means: do not use these kernels
        return False, f"fla-core {version} failed to import ({type(error).__name__}: {error})"
    return True, f"fla-core {version}"


def kda_fla(q, k, v, g, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V]. CUDA tensors.
    cu_seqlens [N + 1] (B = 1): N sequences end to end, each from its own state (fla's varlen mode).

    T == 1 without autograd uses `fused_recurrent_kda` (the decode kernel; it has no backward);
    everything else uses `chunk_kda`. Returns (o [B, T, H, V] in v's dtype, state [B, H, K, V] fp32 or None).
    """
    available, description = fla_status()
    if not available:
        raise RuntimeError(f"KDA impl='fla' needs fla-core on CUDA ({description}); pip install nanokimi[cuda]")
    if not q.is_cuda:
        raise RuntimeError(f"KDA impl='fla' needs CUDA tensors, got {q.device}; use impl='chunk' on CPU")
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    if q.dtype != v.dtype or k.dtype != v.dtype:
        q, k = q.to(v.dtype), k.to(v.dtype)
    if initial_state is not None:
        initial_state = initial_state.float()  # chunk_kda requires an fp32 state
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state)
    )
    options = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
        use_gate_in_kernel=False,
        use_beta_sigmoid_in_kernel=False,
    )
    if cu_seqlens is not None:
        options["cu_seqlens"] = cu_seqlens.long()
    if q.shape[1] == 1 and not needs_grad and cu_seqlens is None:
        o, state = fused_recurrent_kda(q, k, v, g, beta, **options)
    else:
        o, state = chunk_kda(q, k, v, g, beta, safe_gate=False, **options)
    return o.to(v.dtype), (state.float() if state is not None else None)


def kda_fla_varlen(q, k, v, g, beta, scale, initial_state, cu_seqlens, cu_seqlens_cpu=None):
    """Several sequences packed along T in one `chunk_kda` call (inference: no autograd).

    q, k, g: [1, N, H, K]; v: [1, N, H, V]; beta: [1, N, H]; initial_state: [S, H, K, V] (one per sequence);
    cu_seqlens: [S + 1] long, the sequences' boundaries in N (cu_seqlens_cpu: the same on the host, which spares
    fla a device-to-host read to build its chunk index). Returns (o [1, N, H, V] in v's dtype,
    final states [S, H, K, V] fp32).
    """
    available, description = fla_status()
    if not available or not q.is_cuda:
        raise RuntimeError(f"kda_fla_varlen needs fla-core on CUDA ({description}); use kda() per sequence")
    from fla.ops.kda import chunk_kda

    o, state = chunk_kda(q.to(v.dtype), k.to(v.dtype), v, g, beta, scale=scale, initial_state=initial_state.float(),
                         output_final_state=True, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                         use_beta_sigmoid_in_kernel=False, safe_gate=False, cu_seqlens=cu_seqlens,
                         cu_seqlens_cpu=cu_seqlens_cpu)
    return o.to(v.dtype), state.float()
