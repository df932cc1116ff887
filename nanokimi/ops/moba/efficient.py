"""MoBA without the [Tq, Tk] mask: own block by block-local causal attention, history blocks by gathered
attention, merged by the log-sum-exp rule. Pure torch ops, CPU and CUDA, forward and backward.

Two modes:
  tiles  (prefill) own block: queries padded into key-block-aligned tiles, causal within each tile.
         history: every (query, chosen block) pair is one "entry"; entries of one (batch, kv head) are
         sorted by block and packed into tiles of ROWS_PER_TILE rows that all attend the same key block.
         Work and memory are O(Tq * topk * block_size), chunked so that the fp32 scores of one chunk
         stay under SCORE_BUDGET elements (recomputed in backward through checkpointing).
  gather (decode, few queries) each query gathers its own block and its chosen blocks (topk * block_size
         keys) and takes one masked softmax over them.
The packing helpers are shared with the FlexAttention path (flex.py).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROWS_PER_TILE = 128  # history rows per tile; every row of a tile attends the same key block
SCORE_BUDGET = 1 << 25  # fp32 score elements per chunk of the tiled attention
GATE_BUDGET = 1 << 27  # fp32 gate elements per chunk of queries in block selection


def block_means(k, block_size):
    """k: [B, Tk, Hkv, Dk] -> mean key of each block [B, num_blocks, Hkv, Dk] fp32 (the last may be partial)."""
    B, Tk, Hkv, Dk = k.shape
    k = k.detach()
    num_full = Tk // block_size
    means = [k[:, : num_full * block_size].view(B, num_full, block_size, Hkv, Dk).sum(2, dtype=torch.float32)
             / block_size]
    if Tk > num_full * block_size:
        means.append(k[:, num_full * block_size:].sum(1, keepdim=True, dtype=torch.float32) / (Tk % block_size))
    return torch.cat(means, dim=1)


def select_history_blocks(q, means, *, block_size, topk, q_offset=0):
    """Gating. q: [B, Tq, H, Dk]; means: [B, num_blocks, Hkv, Dk] (from `block_means`).

    Returns the chosen history blocks [B, Tq, H, min(topk - 1, num_blocks)] (int64), -1 where a query has
    fewer candidate blocks (blocks that end before its own block starts) than slots.
    """
    B, Tq, H, Dk = q.shape
    num_blocks, Hkv = means.shape[1], means.shape[2]
    group = H // Hkv
    num_history = min(topk - 1, num_blocks)
    if num_history <= 0:
        return torch.empty(B, Tq, H, 0, dtype=torch.long, device=q.device)
    blocks = torch.arange(num_blocks, device=q.device)
    rows = max(1, GATE_BUDGET // (B * H * num_blocks))
    chosen = []
    for start in range(0, Tq, rows):
        q_chunk = q[:, start:start + rows].detach().float()
        t = q_chunk.shape[1]
        gate = torch.einsum("btkgd,bnkd->btkgn", q_chunk.view(B, t, Hkv, group, Dk), means)  # [B, t, Hkv, G, n]
        own = (q_offset + start + torch.arange(t, device=q.device)) // block_size  # [t]
        is_history = blocks[None, :] < own[:, None]  # [t, num_blocks]
        gate = gate.masked_fill(~is_history[None, :, None, None, :], float("-inf"))
        top_gate, top = gate.topk(num_history, dim=-1)
        chosen.append(top.masked_fill(top_gate == float("-inf"), -1).view(B, t, H, num_history))
    return torch.cat(chosen, dim=1)


def _maybe_checkpoint(fn, num_chunks, *args):
    """Recompute `fn` in backward instead of keeping its scores, when the work is split into several chunks."""
    if num_chunks > 1 and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                                           for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def block_tiles(x, front, block_size):
    """Pad x [B, T, h, D] with `front` zero rows before and enough after to cut it into tiles
    [B, num_tiles, block_size, h, D]."""
    B, T, h, D = x.shape
    num_tiles = -(-(front + T) // block_size)
    x = F.pad(x, (0, 0, 0, 0, front, num_tiles * block_size - front - T))
    return x.view(B, num_tiles, block_size, h, D)


def _own_tiles_attention(q_tiles, k_tiles, v_tiles, scale):
    """q_tiles: [B, n, S, Hkv, G, Dk]; k_tiles: [B, n, S, Hkv, Dk]; v_tiles: [B, n, S, Hkv, Dv].
    Causal attention inside each tile. Returns o [B, n, S, Hkv, G, Dv] fp32 and lse [B, n, S, Hkv, G]."""
    S = q_tiles.shape[2]
    causal = torch.ones(S, S, dtype=torch.bool, device=q_tiles.device).tril()
    scores = torch.einsum("bnikgd,bnjkd->bnkgij", q_tiles.float(), k_tiles.float()) * scale
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # [B, n, Hkv, G, S]
    o = torch.einsum("bnkgij,bnjkd->bnikgd", (scores - lse.unsqueeze(-1)).exp(), v_tiles.float())
    return o, lse.permute(0, 1, 4, 2, 3)


def own_block_attention(q, k, v, *, block_size, scale, q_offset):
    """Causal attention of each query over its own block. Returns o [B, Tq, H, Dv] fp32, lse [B, Tq, H] fp32."""
    B, Tq, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    first_key = q_offset // block_size * block_size
    lead = q_offset % block_size
    q_tiles = block_tiles(q, lead, block_size)  # [B, n, S, H, Dk], tile i = key block first_key / S + i
    n = q_tiles.shape[1]
    q_tiles = q_tiles.view(B, n, block_size, Hkv, H // Hkv, Dk)
    k_tiles = block_tiles(k[:, first_key:], 0, block_size)  # [B, n, S, Hkv, Dk]
    v_tiles = block_tiles(v[:, first_key:], 0, block_size)
    per_chunk = max(1, SCORE_BUDGET // (B * H * block_size * block_size))
    num_chunks = -(-n // per_chunk)
    outs, lses = [], []
    for s in range(0, n, per_chunk):
        o, lse = _maybe_checkpoint(_own_tiles_attention, num_chunks, q_tiles[:, s:s + per_chunk],
                                   k_tiles[:, s:s + per_chunk], v_tiles[:, s:s + per_chunk], scale)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, 1).reshape(B, n * block_size, H, Dv)[:, lead:lead + Tq]
    lse = torch.cat(lses, 1).reshape(B, n * block_size, H)[:, lead:lead + Tq]
    return o, lse


class HistoryLayout(NamedTuple):
    """Packing of (query, history block) entries into tiles; per (batch, kv head), entries ordered (t, g, slot).

    dest:       [B, Hkv, E]   packed row of each entry (E = Tq * G * slots)
    row_query:  [B, Hkv, P]   query row (t * G + g) each packed row reads (padding rows read row 0)
    tile_block: [B, Hkv, P // ROWS_PER_TILE] key block each tile attends, -1 for unused tiles
    """
    dest: torch.Tensor
    row_query: torch.Tensor
    tile_block: torch.Tensor


def history_layout(history, num_blocks, group, rows_per_tile=ROWS_PER_TILE):
    """history: [B, Tq, H, slots] chosen blocks (-1 = none) -> HistoryLayout. Entries with no block are packed
    as block 0; the merge drops them."""
    B, Tq, H, slots = history.shape
    Hkv = H // group
    E = Tq * group * slots
    device = history.device
    block = history.view(B, Tq, Hkv, group, slots).permute(0, 2, 1, 3, 4).reshape(B, Hkv, E).clamp(min=0)
    order = block.argsort(dim=-1, stable=True)
    sorted_block = block.gather(-1, order)
    count = torch.zeros(B, Hkv, num_blocks, dtype=torch.long, device=device)
    count.scatter_add_(-1, block, torch.ones_like(block))  # entries per key block
    tiles = (count + rows_per_tile - 1) // rows_per_tile
    tile_end = tiles.cumsum(-1)  # [B, Hkv, num_blocks]
    first_entry = count.cumsum(-1) - count
    rank = torch.arange(E, device=device) - first_entry.gather(-1, sorted_block)
    dest_sorted = (tile_end - tiles).gather(-1, sorted_block) * rows_per_tile + rank
    dest = torch.empty_like(order).scatter_(-1, order, dest_sorted)
    num_tiles = -(-E // rows_per_tile) + num_blocks  # >= sum of ceil(count / rows_per_tile)
    entry = torch.arange(E, device=device).expand(B, Hkv, E)
    row_entry = torch.zeros(B, Hkv, num_tiles * rows_per_tile, dtype=torch.long, device=device)
    row_entry.scatter_(-1, dest, entry)
    tile = torch.arange(num_tiles, device=device).expand(B, Hkv, num_tiles).contiguous()
    tile_block = torch.searchsorted(tile_end, tile, right=True)
    tile_block = tile_block.masked_fill(tile_block >= num_blocks, -1)
    return HistoryLayout(dest, row_entry // slots, tile_block)


def pack_queries(q, layout):
    """q: [B, Tq, H, Dk] -> packed history queries [B, Hkv, P, Dk]."""
    B, Tq, H, Dk = q.shape
    Hkv = layout.dest.shape[1]
    grouped = q.view(B, Tq, Hkv, H // Hkv, Dk).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Tq * (H // Hkv), Dk)
    return grouped.gather(2, layout.row_query.unsqueeze(-1).expand(-1, -1, -1, Dk))


def _history_tiles_attention(q_tiles, k_blocks, v_blocks, tile_block, scale):
    """q_tiles: [B, Hkv, n, R, Dk]; k_blocks: [B, Hkv, num_blocks, S, Dk]; tile_block: [B, Hkv, n].
    Returns o [B, Hkv, n, R, Dv] fp32 and lse [B, Hkv, n, R]."""
    B, Hkv = tile_block.shape[:2]
    b = torch.arange(B, device=q_tiles.device)[:, None, None]
    h = torch.arange(Hkv, device=q_tiles.device)[None, :, None]
    block = tile_block.clamp(min=0)
    keys, values = k_blocks[b, h, block], v_blocks[b, h, block]  # [B, Hkv, n, S, D]
    scores = torch.einsum("bhnid,bhnjd->bhnij", q_tiles.float(), keys.float()) * scale
    lse = scores.logsumexp(dim=-1)
    o = torch.einsum("bhnij,bhnjd->bhnid", (scores - lse.unsqueeze(-1)).exp(), values.float())
    return o, lse


def history_attention(q_packed, k, v, layout, *, block_size, scale):
    """q_packed: [B, Hkv, P, Dk] from `pack_queries`. Returns o [B, Hkv, P, Dv] fp32 and lse [B, Hkv, P]."""
    B, Hkv, P, Dk = q_packed.shape
    Tk, Dv = k.shape[1], v.shape[3]
    num_blocks = -(-Tk // block_size)
    pad = num_blocks * block_size - Tk
    k_blocks = F.pad(k, (0, 0, 0, 0, 0, pad)).view(B, num_blocks, block_size, Hkv, Dk).permute(0, 3, 1, 2, 4)
    v_blocks = F.pad(v, (0, 0, 0, 0, 0, pad)).view(B, num_blocks, block_size, Hkv, Dv).permute(0, 3, 1, 2, 4)
    n = layout.tile_block.shape[-1]
    rows = P // n
    q_tiles = q_packed.view(B, Hkv, n, rows, Dk)
    per_chunk = max(1, SCORE_BUDGET // (B * Hkv * rows * block_size))
    num_chunks = -(-n // per_chunk)
    outs, lses = [], []
    for s in range(0, n, per_chunk):
        o, lse = _maybe_checkpoint(_history_tiles_attention, num_chunks, q_tiles[:, :, s:s + per_chunk],
                                   k_blocks, v_blocks, layout.tile_block[:, :, s:s + per_chunk], scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2).reshape(B, Hkv, P, Dv), torch.cat(lses, 2).reshape(B, Hkv, P)


def merge(o_own, lse_own, o_packed, lse_packed, layout, history):
    """Log-sum-exp merge of the own-block part (o_own [B, Tq, H, Dv], lse_own [B, Tq, H]) with the packed
    history part (o_packed [B, Hkv, P, Dv], lse_packed [B, Hkv, P]). Returns [B, Tq, H, Dv] fp32."""
    B, Tq, H, slots = history.shape
    Hkv, Dv = o_packed.shape[1], o_packed.shape[3]
    group = H // Hkv
    dest = layout.dest.view(B, Hkv, Tq * group, slots)
    lse_slots = lse_packed.float().gather(-1, layout.dest).view(B, Hkv, Tq, group, slots)
    lse_slots = lse_slots.permute(0, 2, 1, 3, 4).reshape(B, Tq, H, slots).masked_fill(history < 0, float("-inf"))
    lse = torch.cat([lse_own.unsqueeze(-1), lse_slots], dim=-1).logsumexp(dim=-1)  # [B, Tq, H]
    out = (lse_own - lse).exp().unsqueeze(-1) * o_own
    weight = (lse_slots - lse.unsqueeze(-1)).exp()  # [B, Tq, H, slots]
    weight = weight.view(B, Tq, Hkv, group, slots).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Tq * group, slots)
    history_out = 0
    for s in range(slots):
        rows = o_packed.gather(2, dest[..., s, None].expand(-1, -1, -1, Dv))  # [B, Hkv, Tq * G, Dv]
        history_out = history_out + weight[..., s, None] * rows.float()
    if slots:
        history_out = history_out.view(B, Hkv, Tq, group, Dv).permute(0, 2, 1, 3, 4).reshape(B, Tq, H, Dv)
    return out + history_out


def gathered_attention(q, k, v, history, *, block_size, scale, q_offset):
    """Decode form: each query gathers its own block and its chosen blocks and takes one masked softmax.
    q: [B, Tq, H, Dk]; history: [B, Tq, H, slots]. Memory O(Tq * H * topk * block_size * D)."""
    B, Tq, H, Dk = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    offsets = torch.arange(block_size, device=q.device)
    query_pos = q_offset + torch.arange(Tq, device=q.device)  # [Tq]
    own_key = (query_pos // block_size * block_size)[:, None] + offsets  # [Tq, S]
    own_ok = own_key <= query_pos[:, None]
    history_key = history.clamp(min=0).unsqueeze(-1) * block_size + offsets  # [B, Tq, H, slots, S]
    history_ok = (history >= 0).unsqueeze(-1).expand_as(history_key)
    key = torch.cat([own_key.expand(B, H, Tq, block_size).transpose(1, 2), history_key.flatten(-2)], dim=-1)
    ok = torch.cat([own_ok.expand(B, H, Tq, block_size).transpose(1, 2), history_ok.flatten(-2)], dim=-1)
    key = key.masked_fill(~ok, 0)  # [B, Tq, H, W]
    kv_head = torch.arange(H, device=q.device) // group
    flat = (torch.arange(B, device=q.device)[:, None, None, None] * Tk + key) * Hkv + kv_head[:, None]
    keys = k.reshape(B * Tk * Hkv, Dk)[flat]  # [B, Tq, H, W, Dk]
    values = v.reshape(B * Tk * Hkv, Dv)[flat]  # [B, Tq, H, W, Dv]
    scores = torch.einsum("bthd,bthwd->bthw", q.float(), keys.float()) * scale
    probs = scores.masked_fill(~ok, float("-inf")).softmax(dim=-1)
    return torch.einsum("bthw,bthwd->bthd", probs, values.float())


def use_gather_mode(Tq, Tk, block_size, topk):
    """Few queries (decode): per-query gathering costs no more than about two copies of the cache."""
    return Tq * topk * block_size <= 2 * Tk


def moba_attention_efficient(q, k, v, *, block_size, topk, scale=None, q_offset=0, mode="auto"):
    """q: [B, Tq, H, Dk], k: [B, Tk, Hkv, Dk], v: [B, Tk, Hkv, Dv] -> [B, Tq, H, Dv] in q's dtype.

    mode: "auto" (gather for few queries, else tiles), "tiles" or "gather".
    """
    B, Tq, H, Dk = q.shape
    Tk = k.shape[1]
    scale = Dk ** -0.5 if scale is None else scale
    history = select_history_blocks(q, block_means(k, block_size), block_size=block_size, topk=topk,
                                    q_offset=q_offset)  # [B, Tq, H, slots]
    if mode == "auto":
        mode = "gather" if use_gather_mode(Tq, Tk, block_size, topk) else "tiles"
    if mode == "gather":
        out = gathered_attention(q, k, v, history, block_size=block_size, scale=scale, q_offset=q_offset)
        return out.to(q.dtype)
    if mode != "tiles":
        raise ValueError(f"mode={mode!r}: use 'auto', 'tiles' or 'gather'.")
    o_own, lse_own = own_block_attention(q, k, v, block_size=block_size, scale=scale, q_offset=q_offset)
    if history.shape[-1] == 0:
        return o_own.to(q.dtype)
    layout = history_layout(history, -(-Tk // block_size), H // k.shape[2])
    o_packed, lse_packed = history_attention(pack_queries(q, layout), k, v, layout, block_size=block_size,
                                             scale=scale)
    return merge(o_own, lse_own, o_packed, lse_packed, layout, history).to(q.dtype)
