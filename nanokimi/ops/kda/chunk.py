"""Kimi Delta Attention, chunkwise, in plain PyTorch (fp32 inside, differentiable through autograd).

Split the sequence into chunks of C tokens. Inside a chunk, with Γ_t = exp(G_t) and G_t the cumulative
log-decay from the chunk start up to and including token t, the delta rule unrolls to (per head):
    A_kk[t, j] = beta_t sum_c k_tc k_jc exp(G_tc - G_jc)       j < t
    A_qk[t, j] = scale sum_c q_tc k_jc exp(G_tc - G_jc)         j <= t
    (I + A_kk) [U~ | W] = Diag(beta) [V | Γ⊙K]                 UT transform: one triangular solve
    U = U~ - W S                                                delta values against the incoming state S
    O = scale (Γ⊙Q) S + A_qk U
    S' = Diag(Γ_C) S + (exp(G_C - G)⊙K)^T U
Only the last two lines carry state, so the loop over chunks is short; everything else is batched.

Stability: exp(G_t - G_j) must never be formed as exp(G_t) * exp(-G_j), because G reaches -1000s under
strong decay. Each chunk is cut into sub-blocks of 16 tokens. For a key in sub-block b and a query in a
later sub-block, the decay is split at E_b (G at the last token of b): exp(G_t - E_b) * exp(E_b - G_j), both
factors <= 1. Inside a sub-block the decays are taken pairwise, exp(G_t - G_j) with j <= t. The cumulative
sums are kept in fp64 so that differences of large sums stay exact before they are rounded to fp32.
"""
import torch
import torch.nn.functional as F

from nanokimi.ops.kda.naive import check_kda_inputs

SUB_BLOCK = 16


def kda_chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunkwise KDA; same contract as `kda_recurrent`.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].
    chunk_size: tokens per chunk, a multiple of 16 (or at most 16). Any T works: the last chunk is padded.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None).
    """
    B, T, H, K, V = check_kda_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1 or (chunk_size > SUB_BLOCK and chunk_size % SUB_BLOCK):
        raise ValueError(f"kda_chunk: chunk_size must be <= {SUB_BLOCK} or a multiple of {SUB_BLOCK}, got {chunk_size}")
    scale = K ** -0.5 if scale is None else scale
    sub = min(SUB_BLOCK, chunk_size)
    C = min(chunk_size, max(sub, -(-T // sub) * sub))  # short inputs get one short chunk
    N = -(-T // C)
    pad = N * C - T

    def to_chunks(x):  # [B, T, H, D] -> [B, H, N, C, D] fp32, zero-padded (padding: g=0, beta=0, k=0)
        x = F.pad(x.float().transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q, k, v, g = (to_chunks(x) for x in (q, k, v, g))
    beta = to_chunks(beta.unsqueeze(-1))  # [B, H, N, C, 1]
    G = g.double().cumsum(-2)  # [B, H, N, C, K] in-chunk cumulative log-decay, fp64

    A_qk = _decayed_scores(q * scale, k, G, sub, strict=False)  # [B, H, N, C, C]
    A_kk = _decayed_scores(k, k, G, sub, strict=True) * beta  # [B, H, N, C, C]
    rhs = beta * torch.cat([v, k * G.exp().float()], dim=-1)  # [B, H, N, C, V + K]
    u_tilde, w = torch.linalg.solve_triangular(A_kk, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    G_end = G[..., -1:, :]  # [B, H, N, 1, K]
    chunk_decay = G_end.exp().float().transpose(-1, -2)  # [B, H, N, K, 1]
    k_to_end = k * (G_end - G).exp().float()  # [B, H, N, C, K]
    if initial_state is None:
        S = q.new_zeros(B, H, K, V)
    else:
        S = initial_state.float()
    states, deltas = [], []
    for n in range(N):
        states.append(S)
        u = u_tilde[:, :, n] - w[:, :, n] @ S  # [B, H, C, V]
        deltas.append(u)
        S = chunk_decay[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ u  # [B, H, K, V]
    states = torch.stack(states, dim=2)  # [B, H, N, K, V]
    U = torch.stack(deltas, dim=2)  # [B, H, N, C, V]

    o = (q * scale * G.exp().float()) @ states + A_qk @ U  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).contiguous()  # [B, T, H, V]
    return o.to(v.dtype), (S if output_final_state else None)


def _decayed_scores(a, k, G, sub, strict):
    """sum_c a_tc k_jc exp(G_tc - G_jc) for j <= t (j < t when strict), zero above; no overflow for G falling.

    a, k: [..., C, K] fp32; G: [..., C, K] fp64 cumulative log-decay. Returns [..., C, C] fp32.
    """
    *lead, C, K = a.shape
    nb = C // sub
    G_blocks = G.unflatten(-2, (nb, sub))  # [..., nb, sub, K]
    E = G_blocks[..., -1, :]  # [..., nb, K] cumulative decay at the end of each sub-block

    block_of = torch.arange(C, device=a.device) // sub  # [C]
    later = block_of[None, :, None] > torch.arange(nb, device=a.device)[:, None, None]  # [nb, C, 1]
    query_gap = torch.where(later, G.unsqueeze(-3) - E.unsqueeze(-2), -torch.inf)  # [..., nb, C, K]
    key_gap = E.unsqueeze(-2) - G_blocks  # [..., nb, sub, K], <= 0
    a_decayed = a.unsqueeze(-3) * query_gap.float().exp()  # [..., nb, C, K]
    k_decayed = k.unflatten(-2, (nb, sub)) * key_gap.float().exp()  # [..., nb, sub, K]
    across = a_decayed @ k_decayed.transpose(-1, -2)  # [..., nb, C, sub]: key block b, any query t
    across = across.permute(*range(len(lead)), -2, -3, -1).reshape(*lead, C, C)

    offset = 1 if strict else 0
    causal = torch.ones(sub, sub, dtype=torch.bool, device=a.device).tril(-offset)  # [sub, sub]
    pair_gap = G_blocks.unsqueeze(-2) - G_blocks.unsqueeze(-3)  # [..., nb, sub, sub, K]: G_t - G_j
    pair_decay = torch.where(causal[..., None], pair_gap, -torch.inf).float().exp()
    a_blocks = a.unflatten(-2, (nb, sub))  # [..., nb, sub, K]
    within = torch.einsum("...tc,...jc,...tjc->...tj", a_blocks, k.unflatten(-2, (nb, sub)), pair_decay)
    same_block = torch.eye(nb, device=a.device, dtype=a.dtype)[:, None, :, None]  # [nb, 1, nb, 1]
    within = (within.unsqueeze(-2) * same_block).reshape(*lead, C, C)  # block diagonal [..., C, C]
    return across + within
