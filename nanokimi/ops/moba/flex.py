"""MoBA on FlexAttention (torch.nn.attention.flex_attention): the packing of efficient.py, with both
attentions run as block-sparse flex kernels that also return the log-sum-exp.

  own block: queries and keys cut into block-aligned tiles, batched as [B * tiles, H, block, D], causal.
  history:   packed entry rows [B, Hkv, P, Dk] against the unchanged keys [B, Hkv, Tk, Dk]; every
             128-row tile of P attends exactly one key block, a "full" block of a BlockMask with
             BLOCK_SIZE = (128, block_size), so the kernel skips every other block and evaluates no mask.
On CUDA the kernel is torch.compile'd once per shape (called directly when already inside torch.compile);
block_size must be a multiple of 128 there. On CPU flex runs eagerly and forward only (torch raises in
backward), which is what the CPU tests use. Few-query (decode) calls take the gather mode of efficient.py.
"""
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .efficient import (block_means, block_tiles, gathered_attention, history_layout, merge,
                        pack_queries, select_history_blocks, use_gather_mode)

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 spells it return_lse=True
    AuxRequest = None

FLEX_TILE = 128  # query and key rows per sparse tile; also the CUDA granularity of block_size
_compiled_flex = None


def _flex_with_lse(q, k, v, block_mask, scale):
    """q: [B, H, Tq, Dk], k: [B, Hkv, Tk, Dk], v: [B, Hkv, Tk, Dv] -> (o [B, H, Tq, Dv], lse [B, H, Tq] fp32)."""
    global _compiled_flex
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            from nanokimi.runtime import compile_fn
            _compiled_flex = compile_fn(flex_attention, dynamic=False)
        fn = _compiled_flex
    gqa = q.shape[1] != k.shape[1]
    if AuxRequest is None:
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    o, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return o, aux.lse


def causal_block_mask(length, device):
    """BlockMask of plain causal attention over `length` rows, built directly (no [length, length] mask)."""
    tiles = -(-length // FLEX_TILE)
    rows = torch.arange(tiles, device=device, dtype=torch.int32)
    full_indices = rows.expand(tiles, tiles)  # row i lists 0 .. i - 1 first
    diagonal_indices = (rows[:, None] + rows[None, :]) % tiles  # row i lists i first

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return BlockMask.from_kv_blocks(torch.ones_like(rows)[None, None], diagonal_indices[None, None].contiguous(),
                                    rows[None, None], full_indices[None, None].contiguous(),
                                    BLOCK_SIZE=FLEX_TILE, mask_mod=causal, seq_lengths=(length, length))


def own_block_flex(q, k, v, *, block_size, scale, q_offset):
    """Causal attention of each query over its own block. Returns o [B, Tq, H, Dv], lse [B, Tq, H] fp32."""
    B, Tq, H, Dk = q.shape
    Dv = v.shape[3]
    lead = q_offset % block_size
    first_key = q_offset - lead
    q_tiles = block_tiles(q, lead, block_size)  # [B, n, S, H, Dk]
    n = q_tiles.shape[1]

    def batched(x):  # [B, n, S, h, D] -> [B * n, h, S, D]
        return x.flatten(0, 1).transpose(1, 2)

    o, lse = _flex_with_lse(batched(q_tiles), batched(block_tiles(k[:, first_key:], 0, block_size)),
                            batched(block_tiles(v[:, first_key:], 0, block_size)),
                            causal_block_mask(block_size, q.device), scale)
    o = o.transpose(1, 2).reshape(B, n * block_size, H, Dv)[:, lead:lead + Tq]
    lse = lse.transpose(1, 2).reshape(B, n * block_size, H)[:, lead:lead + Tq]
    return o, lse


def history_block_mask(tile_block, num_blocks, block_size, key_length):
    """tile_block: [B, Hkv, n] key block of each 128-row tile (-1 = unused) -> BlockMask over [n * 128, Tk]."""
    tile_block = tile_block.to(torch.int32)
    used = (tile_block >= 0).to(torch.int32)
    blocks = torch.arange(num_blocks, device=tile_block.device, dtype=torch.int32)
    indices = (tile_block.clamp(min=0).unsqueeze(-1) + blocks) % num_blocks  # [B, Hkv, n, num_blocks], own first
    row_block = tile_block.repeat_interleave(FLEX_TILE, dim=-1)  # [B, Hkv, P]

    def same_block(b, h, q_idx, kv_idx):
        return kv_idx // block_size == row_block[b, h, q_idx]

    return BlockMask.from_kv_blocks(torch.zeros_like(used), indices, used, indices,
                                    BLOCK_SIZE=(FLEX_TILE, block_size), mask_mod=same_block,
                                    seq_lengths=(row_block.shape[-1], key_length))


def moba_attention_flex(q, k, v, *, block_size, topk, scale=None, q_offset=0):
    """q: [B, Tq, H, Dk], k: [B, Tk, Hkv, Dk], v: [B, Tk, Hkv, Dv] -> [B, Tq, H, Dv] in q's dtype."""
    B, Tq, H, Dk = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if q.is_cuda and block_size % FLEX_TILE:
        raise ValueError(f"impl='flex' on CUDA needs block_size to be a multiple of {FLEX_TILE}, got {block_size}; "
                         "use impl='efficient' or a block size such as 512 or 4096.")
    scale = Dk ** -0.5 if scale is None else scale
    history = select_history_blocks(q, block_means(k, block_size), block_size=block_size, topk=topk,
                                    q_offset=q_offset)  # [B, Tq, H, slots]
    if use_gather_mode(Tq, Tk, block_size, topk):
        out = gathered_attention(q, k, v, history, block_size=block_size, scale=scale, q_offset=q_offset)
        return out.to(q.dtype)
    o_own, lse_own = own_block_flex(q, k, v, block_size=block_size, scale=scale, q_offset=q_offset)
    if history.shape[-1] == 0:
        return o_own.to(q.dtype)
    num_blocks = -(-Tk // block_size)
    layout = history_layout(history, num_blocks, H // Hkv, rows_per_tile=FLEX_TILE)
    mask = history_block_mask(layout.tile_block, num_blocks, block_size, Tk)
    o_packed, lse_packed = _flex_with_lse(pack_queries(q, layout), k.transpose(1, 2), v.transpose(1, 2), mask, scale)
    return merge(o_own.float(), lse_own, o_packed, lse_packed, layout, history).to(q.dtype)
