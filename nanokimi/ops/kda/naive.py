"""Kimi Delta Attention, token by token: the readable reference every faster form is tested against.

Per head, with state S in R^{K x V} (fp32):
    S_t = Diag(exp(g_t)) S_{t-1}                      decay each key channel
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T        delta rule
    o_t = S_t^T (scale * q_t)
q and k are expected L2-normalised by the caller; g is the per-channel log-decay (<= 0).
"""
import torch


def check_kda_inputs(q, k, v, g, beta, initial_state=None):
    """Validate the shapes every KDA implementation shares; returns (B, T, H, K, V).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].
    """
    if q.dim() != 4:
        raise ValueError(f"KDA: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(
            f"KDA: q, k and g must all be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"g {tuple(g.shape)} (g is the per-channel log-decay, one value per key channel)"
        )
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"KDA: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    V = v.shape[-1]
    if beta.shape != (B, T, H):
        raise ValueError(f"KDA: beta must be [B, T, H] = [{B}, {T}, {H}] (one gate per head), got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(
            f"KDA: initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {V}], got {tuple(initial_state.shape)}"
        )
    return B, T, H, K, V


def kda_recurrent(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None).
    """
    B, T, H, K, V = check_kda_inputs(q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        S = initial_state.float()
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)  # [B, H, K, V]
        k_t = k[:, t]  # [B, H, K]
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + beta[:, t, :, None, None] * k_t.unsqueeze(-1) * (v[:, t] - prediction).unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(v.dtype), (S if output_final_state else None)
