"""MoBA (Mixture of Block Attention), dense-mask reference: readable, O(Tq * Tk) memory, CPU friendly.

Keys are cut into blocks of `block_size` (the last may be partial). Per query and head:
    gate_i = <q, mean(K over block i)>            fp32, no scaling, no gradient
    candidates = blocks that end before the query's own block starts
    chosen = own block + top-(topk - 1) candidates by gate
    out = causal softmax(scale * q K^T) over the tokens of the chosen blocks only
Queries sit at absolute positions q_offset .. q_offset + Tq - 1, keys at 0 .. Tk - 1.
"""
import torch


def moba_mask_naive(q, k, *, block_size, topk, q_offset=0):
    """q: [B, Tq, H, Dk], k: [B, Tk, Hkv, Dk]. Returns the attention mask [B, H, Tq, Tk] (True = attend)."""
    B, Tq, H, Dk = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    num_blocks = -(-Tk // block_size)
    key_pos = torch.arange(Tk, device=q.device)
    key_block = key_pos // block_size  # [Tk]
    query_pos = q_offset + torch.arange(Tq, device=q.device)  # [Tq]
    query_block = query_pos // block_size  # [Tq]

    with torch.no_grad():
        keys = k.float().repeat_interleave(H // Hkv, dim=2)  # [B, Tk, H, Dk]
        block_sum = keys.new_zeros(B, num_blocks, H, Dk).index_add_(1, key_block, keys)
        block_len = torch.bincount(key_block, minlength=num_blocks).float()  # [num_blocks]
        block_mean = block_sum / block_len[None, :, None, None]  # [B, num_blocks, H, Dk]
        gate = torch.einsum("bthd,bnhd->bhtn", q.float(), block_mean)  # [B, H, Tq, num_blocks]

    blocks = torch.arange(num_blocks, device=q.device)
    is_history = blocks[None, :] < query_block[:, None]  # [Tq, num_blocks]
    chosen = torch.zeros(B, H, Tq, num_blocks, dtype=torch.bool, device=q.device)
    num_history = min(topk - 1, num_blocks)
    if num_history > 0:
        top = gate.masked_fill(~is_history, float("-inf")).topk(num_history, dim=-1).indices
        chosen.scatter_(-1, top, True)
        chosen &= is_history  # a query with fewer candidates than topk - 1 picked some non-candidates
    chosen |= blocks[None, :] == query_block[:, None]  # own block, always
    causal = key_pos[None, :] <= query_pos[:, None]  # [Tq, Tk]
    return chosen[..., key_block] & causal  # [B, H, Tq, Tk]


def moba_attention_naive(q, k, v, *, block_size, topk, scale=None, q_offset=0):
    """q: [B, Tq, H, Dk], k: [B, Tk, Hkv, Dk], v: [B, Tk, Hkv, Dv] -> [B, Tq, H, Dv] in q's dtype."""
    H, Dk = q.shape[2], q.shape[3]
    group = H // k.shape[2]
    scale = Dk ** -0.5 if scale is None else scale
    mask = moba_mask_naive(q, k, block_size=block_size, topk=topk, q_offset=q_offset)  # [B, H, Tq, Tk]
    keys = k.float().repeat_interleave(group, dim=2)  # [B, Tk, H, Dk]
    values = v.float().repeat_interleave(group, dim=2)  # [B, Tk, H, Dv]
    scores = torch.einsum("bthd,bshd->bhts", q.float(), keys) * scale  # [B, H, Tq, Tk]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, values).to(q.dtype)
