"""Kimi Delta Attention, chunkwise, in plain PyTorch (fp32 inside, differentiable through autograd).

Split the sequence into chunks of C tokens. Inside a chunk, with Γ_t = exp(G_t) and G_t the cumulative
log-decay from the chunk start up to and including token t, the delta rule unrolls to (per head):
    A_kk[t, j] = beta_t sum_c k_tc k_jc exp(G_tc - G_jc)       j < t (strictly lower)
    A_qk[t, j] = scale sum_c q_tc k_jc exp(G_tc - G_jc)         j <= t
    (I + A_kk) [U~ | W] = Diag(beta) [V | Γ⊙K]                 UT transform: one triangular solve
    U = U~ - W S                                                delta values against the incoming state S
    O = scale (Γ⊙Q) S + A_qk U
    S' = Diag(Γ_C) S + (exp(G_C - G)⊙K)^T U
Only the last two lines carry state, so the loop over chunks is short; everything else is batched.

Stability: exp(G_t - G_j) must never be formed as exp(G_t) * exp(-G_j), because G reaches -1000s under
strong decay. Each chunk is cut into sub-blocks of 8 tokens. For a key in sub-block b and a query in a
later sub-block, the decay is split at E_b (G at the last token of b): exp(G_t - E_b) * exp(E_b - G_j), both
factors <= 1. Inside a sub-block the decays are taken pairwise from range sums of g (exact in fp32); the
chunk-level cumulative sums are kept in fp64 so that differences of large sums stay exact. Decay factors
below exp(-30) are flushed to exactly 0: they are far below fp32 resolution against the token's own term,
and left in they turn into denormals that slow CPU matmuls down a hundredfold.
"""
import torch
import torch.nn.functional as F

from nanokimi.ops.kda.naive import check_kda_inputs

SUB_BLOCK = 8
DECAY_FLOOR = 30.0


def kda_chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunkwise KDA; same contract as `kda_recurrent`.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].
    chunk_size: tokens per chunk, a multiple of 8 (or at most 8). Any T works: the last chunk is padded.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None).
    """
    B, T, H, K, V = check_kda_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1 or (chunk_size > SUB_BLOCK and chunk_size % SUB_BLOCK):
        raise ValueError(f"kda_chunk: chunk_size must be <= {SUB_BLOCK} or a multiple of {SUB_BLOCK}, got {chunk_size}")
    scale = K ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    if T == 0:
        state = initial_state.float() if initial_state is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        return v.new_zeros(B, 0, H, V), (state if output_final_state else None)
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

    A_qk, A_kk = _intra_chunk_scores(q * scale, k, g, G, sub)  # [B, H, N, C, C] each
    A_kk = A_kk * beta
    decay_from_start = _decay(G)  # [B, H, N, C, K]
    rhs = beta * torch.cat([v, k * decay_from_start], dim=-1)  # [B, H, N, C, V + K]
    u_tilde, w = torch.linalg.solve_triangular(A_kk, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    G_end = G[..., -1:, :]  # [B, H, N, 1, K]
    chunk_decay = _decay(G_end).transpose(-1, -2)  # [B, H, N, K, 1]
    k_to_end = k * _decay(G_end - G)  # [B, H, N, C, K]
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

    o = (q * scale * decay_from_start) @ states + A_qk @ U  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).contiguous()  # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)


def _intra_chunk_scores(q, k, g, G, sub):
    """Decayed dot products inside each chunk, safe for any decay strength.

    q, k, g: [..., C, K] fp32; G: [..., C, K] fp64, the in-chunk cumsum of g.
    Returns A_qk [..., C, C] = sum_c q_tc k_jc exp(G_tc - G_jc) for j <= t, zero above,
    and A_kk [..., C, C], the same with k in place of q (its diagonal is left in; the unit-triangular
    solve ignores it).
    """
    *lead, C, K = q.shape
    nb = C // sub
    queries = torch.stack([q, k])  # [2, ..., C, K]: both score matrices share every decay factor
    k_blocks = k.unflatten(-2, (nb, sub))  # [..., nb, sub, K]

    G_blocks = G.unflatten(-2, (nb, sub))  # [..., nb, sub, K]
    E = G_blocks[..., -1, :]  # [..., nb, K] cumulative decay at the end of each sub-block
    block_of = torch.arange(C, device=q.device) // sub  # [C]
    later = block_of[None, :, None] > torch.arange(nb, device=q.device)[:, None, None]  # [nb, C, 1]
    query_decay = _decay(G.unsqueeze(-3) - E.unsqueeze(-2), keep=later)  # [..., nb, C, K]: exp(G_t - E_b)
    key_decay = _decay(E.unsqueeze(-2) - G_blocks)  # [..., nb, sub, K]: exp(E_b - G_j)
    across = (queries.unsqueeze(-3) * query_decay) @ (k_blocks * key_decay).transpose(-1, -2)  # [2, ..., nb, C, sub]
    across = across.movedim(-3, -2).reshape(2, *lead, C, C)  # key block b -> columns of b

    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()  # [sub, sub], j <= t
    after_j = causal.tril(-1)  # [sub, sub] indexed [s, j]: token s lies after key j
    pair_gap = (g.unflatten(-2, (nb, sub)).unsqueeze(-2) * after_j[..., None]).cumsum(-3)  # [..., nb, sub, sub, K]
    pair_decay = _decay(pair_gap, keep=causal[..., None])  # exp(sum of g over (j, t]) for j <= t
    q_blocks = queries.unflatten(-2, (nb, sub)).unsqueeze(-2)  # [2, ..., nb, sub, 1, K]
    within = (q_blocks * pair_decay * k_blocks.unsqueeze(-3)).sum(-1)  # [2, ..., nb, sub, sub]
    same_block = torch.eye(nb, device=q.device, dtype=q.dtype)[:, None, :, None]  # [nb, 1, nb, 1]
    within = (within.unsqueeze(-2) * same_block).reshape(2, *lead, C, C)  # block diagonal
    A_qk, A_kk = across + within
    return A_qk, A_kk


def _decay(log_decay, keep=None):
    """exp of a log-decay (<= 0; fp32 or fp64) as fp32; entries outside `keep` or below -DECAY_FLOOR give 0."""
    keep_mask = log_decay > -DECAY_FLOOR
    if keep is not None:
        keep_mask = keep_mask & keep
    return torch.where(keep_mask, log_decay, -torch.inf).float().exp()
