"""Paged inference: the token mixers over a packed batch of sequences whose caches live in shared pools.

An engine step runs the model over N packed tokens [1, N, D]: first `num_decode` single-token rows (one
per sequence, attended as a batch), then prefill pieces (several tokens of one sequence each). MLA keeps
(c_kv, k_rope) and GQA keeps (k, v) per token in blocks of `block_size` tokens shared by all sequences; a
sequence's block table lists its blocks in order, so its token p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. KDA keeps one state slot (the fp32
delta-rule state and the conv tail) per running sequence.

Prefill pieces run their projections, norms and gates over all their tokens at once and only the sequence
mixing per piece: attention over the piece's context gathered from the blocks (after its new tokens are
written to their slots), or the conv and delta rule from the piece's state slot. The reference,
`_prefill_piece`, runs the mixer's own cached forward per piece over a dense copy of its context: the same
maths as `model(ids, cache=...)` (BATCHED_PREFILL = False selects it; MoBA layers always take it).
The decode rows run absorbed MLA (on CUDA a Triton kernel that reads the blocks in place, else over
gathered blocks) or masked GQA with one length per row, and KDA over the gathered state slots; every
index is a device tensor, so that step can be a CUDA graph.
"""
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanokimi.model.attention import GroupedQueryAttention, MultiHeadLatentAttention, causal_attention
from nanokimi.model.cache import KVCache, LatentCache, RecurrentCache
from nanokimi.model.kda import KimiDeltaAttention, causal_depthwise_conv, kda_outside_compile, l2_normalize
from nanokimi.ops.kda.decode import kda_chains_reference, kda_decode_slots, kda_decode_slots_reference
from nanokimi.ops.paged_write import write_rows_
from nanokimi.ops.kda.fla_kernels import fla_status, kda_fla_varlen
from nanokimi.ops.paged_mla import merge_partials, paged_mla_partials, triton_available


@dataclass
class PrefillPiece:
    """`length` tokens of one sequence at packed offset `offset`, positions start .. start+length-1."""
    offset: int
    length: int
    start: int
    block_table: torch.Tensor  # [num_blocks] long, covers start + length tokens
    state_slot: int
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # KDA: copy the state after j tokens to slot
    # speculative verification: a list that each KDA layer appends (layer pool, conv window [K-1+T, C], states
    # after each token [T, H, Dk, Dv]) to, so the engine can roll the slot back to any accepted prefix
    saved_states: list | None = None


@dataclass
class PagedBatch:
    """Where every token of an engine step reads and writes its cache. Decode rows come first."""
    block_size: int
    num_decode: int
    positions: torch.Tensor  # [Sd] long: position of each decode row's token
    block_tables: torch.Tensor  # [Sd, max_blocks] long (unused entries: block 0)
    slot_mapping: torch.Tensor  # [Sd] long: cache slot each decode token is written to
    state_slots: torch.Tensor  # [Sd] long: KDA state slot of each decode row
    prefill: list[PrefillPiece] = field(default_factory=list)
    prefill_positions: torch.Tensor | None = None  # [Np] long: position of every prefill token (in piece order)
    prefill_slots: torch.Tensor | None = None  # [Np] long: the cache slot each prefill token is written to
    short: "ShortPieces | None" = None  # several short pieces (drafts under verification): attend as one batch
    packed: "PackedContext | None" = None  # the other pieces: attend as one packed sequence, block-diagonal mask
    memo: dict = field(default_factory=dict)  # index tensors built by the first KDA layer, reused by the others
    # speculative verify rows in the graph step (KDA): each decode row's depth in its draft's chain (a chain's
    # rows are consecutive; depth j > 0 continues from the state row-1 wrote to its slot); `rounds` = max depth + 1
    depths: torch.Tensor | None = None
    rounds: int = 1


@dataclass
class ShortPieces:
    """Short prefill pieces padded into rows (built by the engine's runner, one transfer each):
    members: their piece indices; index [P, Tmax] long: each (piece, t)'s token among the prefill tokens
    (padding repeats the piece's last token); positions [P, Tmax]; block_tables [P, MB] (padded with 0)."""
    members: list[int]
    lengths: list[int]
    index: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor


SHORT_PIECE_TOKENS = 16  # prefill pieces this short (speculative drafts under verification) attend as one batch


def short_pieces(pieces: list["PrefillPiece"], tables: list[list[int]], first: int, device) -> ShortPieces | None:
    """The ShortPieces of a step's pieces (host block tables `tables`; `first` = the number of decode rows),
    None unless at least two pieces have at most SHORT_PIECE_TOKENS tokens."""
    members = [i for i, p in enumerate(pieces) if p.length <= SHORT_PIECE_TOKENS]
    if len(members) < 2:
        return None
    lengths = [pieces[i].length for i in members]
    longest, width = max(lengths), max(len(tables[i]) for i in members)
    index = [[pieces[i].offset - first + min(t, n - 1) for t in range(longest)] for i, n in zip(members, lengths)]
    positions = [[pieces[i].start + t for t in range(longest)] for i in members]
    padded = [tables[i] + [0] * (width - len(tables[i])) for i in members]
    host = torch.tensor([index, positions], dtype=torch.long).to(device, non_blocking=True)
    return ShortPieces(members, lengths, host[0], host[1], torch.tensor(padded, dtype=torch.long).to(device))


@dataclass
class PackedContext:
    """The prefill pieces that attend in one call (built by the engine's runner, once per step for every
    layer): members: their piece indices; spans: each member's rows in the packed queries; query_index
    [Nq] long: each packed query's token among the prefill tokens (None: all of them, in order);
    key_slots [Lk] long: the cache slot of every key, each member's whole context (its new tokens included)
    one after another; mask [Nq, Lk] bool: a query sees the keys of its own piece up to its position."""
    members: list[int]
    spans: list[tuple[int, int]]
    query_index: torch.Tensor | None
    key_slots: torch.Tensor
    mask: torch.Tensor


PACKED_ATTENTION = True  # False: every prefill piece attends over its own gathered context (the reference)
PACKED_ATTENTION_PAIRS = 1 << 26  # larger (queries x keys) steps attend per piece: the mask grows with the product


def packed_context(pieces: list["PrefillPiece"], tables: list[list[int]], skip: list[int], first: int,
                   block_size: int, device) -> PackedContext | None:
    """The PackedContext of a step's pieces other than `skip` (host block tables `tables`; `first` = the
    number of decode rows), or None when fewer than two remain, PACKED_ATTENTION is off, or the mask would
    exceed PACKED_ATTENTION_PAIRS entries."""
    members = [i for i in range(len(pieces)) if i not in set(skip)]
    lengths = [pieces[i].length for i in members]
    ends = [pieces[i].start + pieces[i].length for i in members]
    if not PACKED_ATTENTION or len(members) < 2 or sum(lengths) * sum(ends) > PACKED_ATTENTION_PAIRS:
        return None
    member = torch.arange(len(members))
    width = max(len(tables[i]) for i in members)
    padded = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in members], dtype=torch.long)
    ends_t, lengths_t = torch.tensor(ends), torch.tensor(lengths)
    key_piece = member.repeat_interleave(ends_t)  # [Lk]
    key_pos = torch.arange(len(key_piece)) - (ends_t.cumsum(0) - ends_t).repeat_interleave(ends_t)
    key_slots = padded[key_piece, key_pos // block_size] * block_size + key_pos % block_size
    query_piece = member.repeat_interleave(lengths_t)  # [Nq]
    starts = torch.tensor([pieces[i].start for i in members])
    query_pos = starts.repeat_interleave(lengths_t) + torch.arange(len(query_piece)) - \
        (lengths_t.cumsum(0) - lengths_t).repeat_interleave(lengths_t)
    queries = torch.cat([torch.arange(pieces[i].offset - first, pieces[i].offset - first + pieces[i].length)
                         for i in members])
    everything = len(members) == len(pieces)
    host = torch.cat([key_slots, key_piece, key_pos, query_piece, query_pos, queries]).to(device, non_blocking=True)
    Lk, Nq = len(key_slots), len(query_piece)
    key_slots, key_piece, key_pos, query_piece, query_pos, queries = host.split([Lk, Lk, Lk, Nq, Nq, Nq])
    mask = (query_piece[:, None] == key_piece[None, :]) & (key_pos[None, :] <= query_pos[:, None])
    bounds = [0] + lengths_t.cumsum(0).tolist()
    return PackedContext(members, list(zip(bounds[:-1], bounds[1:])), None if everything else queries, key_slots,
                         mask)


@dataclass
class PagedLatentCache:
    """MLA blocks: c_kv [num_blocks, block_size, kv_lora_rank], k_rope [num_blocks, block_size, rope_dim]."""
    c_kv: torch.Tensor
    k_rope: torch.Tensor


@dataclass
class PagedKVCache:
    """GQA blocks: k, v [num_blocks, block_size, Hkv, D]."""
    k: torch.Tensor
    v: torch.Tensor


class PagedCache:
    """One pool per layer: blocks for attention layers, state slots (RecurrentCache rows) for KDA layers."""

    def __init__(self, layers: list, num_blocks: int, block_size: int, num_state_slots: int):
        self.layers, self.num_blocks, self.block_size = layers, num_blocks, block_size
        self.num_state_slots = num_state_slots

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in vars(layer).values())

    def recurrent_layers(self) -> list[RecurrentCache]:
        return [layer for layer in self.layers if isinstance(layer, RecurrentCache)]


def apply_state_slot_ops(layers: list[RecurrentCache], ops: list[tuple]) -> None:
    """("zero", slot) and ("copy", source, target) on the KDA state slots (conv tail and delta-rule state) of
    every layer, with the effect of running them in order, in a few batched operators per layer. The ops are
    cut into runs in which no slot is written twice and no copy reads a slot written before it in the run;
    a run's copies all read before anything is written, then its zeros are written."""
    if not ops or not layers:
        return
    runs, run, written = [], [], set()
    for op in ops:
        if op[0] not in ("zero", "copy"):
            raise ValueError(f"state slot ops are ('zero', slot) or ('copy', source, target), got {op!r}")
        reads = {op[1]} if op[0] == "copy" else set()
        if op[-1] in written or reads & written:
            runs.append(run)
            run, written = [], set()
        run.append(op)
        written.add(op[-1])
    runs.append(run)
    device = layers[0].state.device
    for run in runs:
        zeros = [op[1] for op in run if op[0] == "zero"]
        copies = [op[1:] for op in run if op[0] == "copy"]
        host = torch.tensor(zeros + [s for s, _ in copies] + [t for _, t in copies], dtype=torch.long)
        zeros_t, sources, targets = host.to(device, non_blocking=True).split([len(zeros), len(copies), len(copies)])
        for layer in layers:
            for pool in (layer.conv, layer.state):
                if copies:
                    pool.index_copy_(0, targets, pool.index_select(0, sources))
                if zeros:
                    pool.index_fill_(0, zeros_t, 0)


def _new_layer_pool(mixer: nn.Module, num_blocks: int, block_size: int, num_state_slots: int, device, dtype):
    if isinstance(mixer, KimiDeltaAttention):
        return mixer.new_cache(num_state_slots, 0, device, dtype)
    if isinstance(mixer, MultiHeadLatentAttention):
        return PagedLatentCache(torch.zeros(num_blocks, block_size, mixer.kv_lora_rank, device=device, dtype=dtype),
                                torch.zeros(num_blocks, block_size, mixer.rope_dim, device=device, dtype=dtype))
    shape = (num_blocks, block_size, mixer.num_kv_heads, mixer.head_dim)
    return PagedKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


def new_paged_cache(model: nn.Module, num_blocks: int, block_size: int, num_state_slots: int) -> PagedCache:
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    layers = [_new_layer_pool(b.mixer, num_blocks, block_size, num_state_slots, device, dtype) for b in model.layers]
    return PagedCache(layers, num_blocks, block_size, num_state_slots)


def paged_cache_bytes(model: nn.Module, block_size: int) -> tuple[int, int]:
    """(bytes of one block over all attention layers, bytes of one state slot over all KDA layers)."""
    probe = new_paged_cache_on_meta(model, block_size)
    per_block = sum(t.numel() * t.element_size() for layer in probe.layers if not isinstance(layer, RecurrentCache)
                    for t in vars(layer).values())
    per_slot = sum(t.numel() * t.element_size() for layer in probe.recurrent_layers() for t in vars(layer).values())
    return per_block, per_slot


def new_paged_cache_on_meta(model: nn.Module, block_size: int) -> PagedCache:
    dtype = model.embed.weight.dtype
    layers = [_new_layer_pool(b.mixer, 1, block_size, 1, "meta", dtype) for b in model.layers]
    return PagedCache(layers, 1, block_size, 1)


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position: block_table[p // bs] * bs + p % bs."""
    return block_table[positions // block_size] * block_size + positions % block_size


def gather_blocks(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """pool [num_blocks, bs, ...], block_tables [S, MB] -> the sequences' tokens in order [S, MB * bs, ...]."""
    gathered = pool[block_tables]  # [S, MB, bs, ...]
    return gathered.flatten(1, 2)


def paged_mixer_forward(mixer: nn.Module, x: torch.Tensor, cache, batch: PagedBatch) -> torch.Tensor:
    """x [1, N, D] (decode rows first, then the prefill pieces) -> [1, N, D]."""
    parts = []
    pieces = batch.prefill
    if getattr(mixer, "moba", False):  # MoBA picks blocks per query: every row goes through the exact cached forward
        rows = [PrefillPiece(i, 1, p, batch.block_tables[i], 0) for i, p in enumerate(batch.positions.tolist())]
        pieces = rows + pieces
    else:
        if batch.num_decode:
            # not parts.append(_decode_rows(...)): under torch.compile the kernels inside break the graph with
            # the list's bound method on the stack, whose guard dies with it (a recompile on every call)
            decoded = _decode_rows(mixer, x[0, :batch.num_decode].unsqueeze(1), cache, batch)  # [Sd, 1, D]
            if not pieces:  # a decode-only step (what CUDA graphs capture)
                return decoded.transpose(0, 1)
            parts.append(decoded.squeeze(1))
        if pieces and BATCHED_PREFILL:
            parts.append(_prefill_batched(mixer, x[:, batch.num_decode:], cache, batch)[0])
            pieces = []
    for piece in pieces:
        parts.append(_prefill_piece(mixer, x[:, piece.offset:piece.offset + piece.length], cache, piece,
                                    batch.block_size)[0])
    return torch.cat(parts).unsqueeze(0)


def _prefill_batched(mixer: nn.Module, x: torch.Tensor, cache, batch: PagedBatch) -> torch.Tensor:
    """All prefill pieces of a step at once: projections, norms and gates over every token together, only
    the sequence mixing (conv + delta rule, or attention over the context) per piece. The same maths as the
    mixer's cached forward of each piece (`_prefill_piece`, tested equal). x [1, Np, D] -> [1, Np, D]."""
    first = batch.num_decode  # piece offsets count the decode rows before them
    spans = [(p.offset - first, p.offset - first + p.length) for p in batch.prefill]
    if isinstance(mixer, KimiDeltaAttention):
        return _kda_prefill(mixer, x, cache, batch.prefill, spans, batch.memo)
    rows = x[0].unsqueeze(1)  # [Np, 1, D]: each token a row with its own position
    if isinstance(mixer, MultiHeadLatentAttention):
        q_nope, q_rope, c_kv, k_rope = _mla_project(mixer, rows, batch.prefill_positions)
        cache.c_kv.view(-1, mixer.kv_lora_rank).index_copy_(0, batch.prefill_slots, c_kv[:, 0].to(cache.c_kv.dtype))
        cache.k_rope.view(-1, mixer.rope_dim).index_copy_(0, batch.prefill_slots,
                                                           k_rope[:, 0, 0].to(cache.k_rope.dtype))
        outs, packed = {}, None
        if batch.short is not None and not mixer.record_max_logits:
            outs = _mla_short_pieces(mixer, q_nope, q_rope, cache, batch.short)
        if batch.packed is not None and not mixer.record_max_logits:
            packed = _mla_packed(mixer, q_nope, q_rope, cache, batch.packed)
        for i, (piece, (a, b)) in enumerate(zip(batch.prefill, spans)):
            if i in outs or (packed is not None and i in batch.packed.members):
                continue
            end = piece.start + piece.length
            table = piece.block_table[None]
            context = gather_blocks(cache.c_kv, table)[:, :end]  # [1, L, r], this piece's tokens included
            context_rope = gather_blocks(cache.k_rope, table)[:, :end].unsqueeze(2)  # [1, L, 1, dr]
            qn, qr = q_nope[a:b].transpose(0, 1), q_rope[a:b].transpose(0, 1)  # [1, T, H, .]
            if piece.length <= mixer.absorb_max_tokens and not mixer.record_max_logits:
                outs[i] = mixer._attend_absorbed(qn, qr, context, context_rope, piece.start)
            else:
                outs[i] = mixer._attend_expanded(qn, qr, context, context_rope, piece.start)
        return mixer.o_proj(_attended(outs, batch.packed, packed, len(spans)).flatten(2))
    H, Hkv, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = mixer.rotary(mixer.q_proj(rows).view(-1, 1, H, D), batch.prefill_positions)
    k = mixer.rotary(mixer.k_proj(rows).view(-1, 1, Hkv, D), batch.prefill_positions)
    v = mixer.v_proj(rows).view(-1, 1, Hkv, D)
    cache.k.flatten(0, 1).index_copy_(0, batch.prefill_slots, k[:, 0].to(cache.k.dtype))
    cache.v.flatten(0, 1).index_copy_(0, batch.prefill_slots, v[:, 0].to(cache.v.dtype))
    outs = _gqa_short_pieces(mixer, q, cache, batch.short) if batch.short is not None else {}
    packed = _gqa_packed(mixer, q, cache, batch.packed) if batch.packed is not None else None
    for i, (piece, (a, b)) in enumerate(zip(batch.prefill, spans)):
        if i in outs or (packed is not None and i in batch.packed.members):
            continue
        end = piece.start + piece.length
        table = piece.block_table[None]
        keys, values = gather_blocks(cache.k, table)[:, :end], gather_blocks(cache.v, table)[:, :end]
        outs[i] = causal_attention(q[a:b].transpose(0, 1), keys, values, mixer.scale, piece.start)
    return mixer.o_proj(_attended(outs, batch.packed, packed, len(spans)).flatten(2))


def _packed_attention(q, k, v, packed: PackedContext, scale: float) -> torch.Tensor | None:
    """q [Nq, H, Dk] (all prefill tokens, or those packed.query_index picks), k [Lk, Hkv, Dk], v [Lk, Hkv, Dv]:
    one attention call over the packed pieces with the block-diagonal causal mask -> o [Nq, H, Dv] (the
    members' queries one after another), or None where it cannot run (the caller attends per piece)."""
    global PACKED_ATTENTION
    if not PACKED_ATTENTION:  # switched off by an earlier layer of this step
        return None
    if packed.query_index is not None:
        q = q.index_select(0, packed.query_index)
    if q.shape[1] != k.shape[1]:  # GQA: the memory-efficient kernel takes no enable_gqa; repeat the key heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    options = dict(attn_mask=packed.mask, scale=scale)
    if not q.is_cuda:
        o = F.scaled_dot_product_attention(*args, **options)
    else:  # the memory-efficient kernel only: the math fallback would hold H x Nq x Lk scores
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                o = F.scaled_dot_product_attention(*args, **options)
        except RuntimeError as error:
            warnings.warn(f"packed prefill attention has no memory-efficient kernel here ({error}); "
                          "attending per piece.")
            PACKED_ATTENTION = False
            return None  # the caller attends each piece on its own
    return o[0].transpose(0, 1)  # [Nq, H, Dv]


def _attended(outs: dict, packed: PackedContext | None, o: torch.Tensor | None, count: int) -> torch.Tensor:
    """Every piece's attention output [1, Np, H, Dv] in order: outs {piece: [1, T, H, Dv]} of the pieces that
    attended alone, and o [Nq, H, Dv] of the packed members. When the packed call took every piece
    (packed.query_index None), its output is the answer as it is: no split, no concatenation."""
    if o is not None and packed.query_index is None:
        return o[None]
    if o is not None:
        outs.update({i: o[a:b][None] for i, (a, b) in zip(packed.members, packed.spans)})
    return torch.cat([outs[i] for i in range(count)], dim=1)


def _mla_packed(mixer: MultiHeadLatentAttention, q_nope, q_rope, cache: PagedLatentCache, packed: PackedContext):
    """MLA's expanded attention (`_attend_expanded`) of the packed pieces in one call: keys and values from
    kv_b_proj over every member's context latents. q_nope [Np, 1, H, dn], q_rope [Np, 1, H, dr] ->
    o [Nq, H, dv] or None (see _packed_attention)."""
    H, Lk = mixer.num_heads, packed.key_slots.shape[0]
    latent = cache.c_kv.view(-1, mixer.kv_lora_rank).index_select(0, packed.key_slots)  # [Lk, r]
    rope = cache.k_rope.view(-1, mixer.rope_dim).index_select(0, packed.key_slots)  # [Lk, dr]
    k_nope, v = mixer.kv_b_proj(latent).view(Lk, H, -1).split([mixer.nope_dim, mixer.v_dim], dim=-1)
    k = torch.cat([k_nope, rope[:, None].expand(Lk, H, mixer.rope_dim)], dim=-1)  # [Lk, H, dn+dr]
    q = torch.cat([q_nope, q_rope], dim=-1)[:, 0]  # [Np, H, dn+dr]
    return _packed_attention(q, k, v, packed, mixer.scale)


def _gqa_packed(mixer: GroupedQueryAttention, q, cache: PagedKVCache, packed: PackedContext):
    """Causal attention of the packed pieces in one call over their gathered keys. q [Np, 1, H, D] ->
    o [Nq, H, D] or None (see _packed_attention)."""
    keys = cache.k.flatten(0, 1).index_select(0, packed.key_slots)  # [Lk, Hkv, D]
    values = cache.v.flatten(0, 1).index_select(0, packed.key_slots)
    return _packed_attention(q[:, 0], keys, values, packed, mixer.scale)


def _gqa_short_pieces(mixer: GroupedQueryAttention, q, cache: PagedKVCache, short: ShortPieces):
    """Causal attention of several short pieces at once over their gathered blocks (their keys are written).
    q [Np, 1, H, D] -> {piece index: [1, T, H, D]}."""
    index, positions, tables, lengths, members = (short.index, short.positions, short.block_tables, short.lengths,
                                                  short.members)
    P, T = index.shape
    qp = q[index.flatten(), 0].view(P, T, mixer.num_heads, mixer.head_dim).transpose(1, 2)  # [P, H, T, D]
    keys = gather_blocks(cache.k, tables).transpose(1, 2)  # [P, Hkv, L, D]
    values = gather_blocks(cache.v, tables).transpose(1, 2)
    allowed = torch.arange(keys.shape[2], device=q.device)[None, None, :] <= positions[:, :, None]  # [P, T, L]
    o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=allowed[:, None], scale=mixer.scale,
                                       enable_gqa=mixer.num_heads != mixer.num_kv_heads).transpose(1, 2)
    return {i: o[row:row + 1, :n] for row, (i, n) in enumerate(zip(members, lengths))}


def _mla_short_pieces(mixer: MultiHeadLatentAttention, q_nope, q_rope, cache: PagedLatentCache,
                      short: ShortPieces):
    """Absorbed MLA attention of several short pieces at once over their gathered latent blocks.
    q_nope [Np, 1, H, dn], q_rope [Np, 1, H, dr] -> {piece index: [1, T, H, dv]}."""
    index, positions, tables, lengths, members = (short.index, short.positions, short.block_tables, short.lengths,
                                                  short.members)
    P, T = index.shape
    H = mixer.num_heads
    qn = q_nope[index.flatten(), 0].view(P, T, H, -1)
    qr = q_rope[index.flatten(), 0].view(P, T, H, -1)
    w = mixer.kv_b_proj.weight.view(H, mixer.nope_dim + mixer.v_dim, mixer.kv_lora_rank)
    w_k, w_v = w[:, :mixer.nope_dim], w[:, mixer.nope_dim:]  # [H, dn, r], [H, dv, r]
    q_latent = torch.einsum("bthd,hdr->bthr", qn, w_k)
    keys_latent = gather_blocks(cache.c_kv, tables)  # [P, L, r]
    keys_rope = gather_blocks(cache.k_rope, tables)  # [P, L, dr]
    scores = torch.einsum("bthr,bsr->bths", q_latent, keys_latent) + torch.einsum("bthd,bsd->bths", qr, keys_rope)
    allowed = torch.arange(keys_latent.shape[1], device=qn.device)[None, None, :] <= positions[:, :, None]
    scores = (scores.float() * mixer.scale).masked_fill(~allowed[:, :, None, :], float("-inf"))
    o_latent = torch.einsum("bths,bsr->bthr", scores.softmax(-1).to(keys_latent.dtype), keys_latent)
    o = torch.einsum("bthr,hvr->bthv", o_latent, w_v)  # [P, T, H, dv]
    return {i: o[row:row + 1, :n] for row, (i, n) in enumerate(zip(members, lengths))}


def _kda_prefill(mixer: KimiDeltaAttention, x: torch.Tensor, cache: RecurrentCache, pieces, spans,
                 memo: dict | None = None) -> torch.Tensor:
    """KimiDeltaAttention.forward for several sequences packed in x [1, Np, D], each continuing from its
    state slot (conv tail and delta-rule state, both updated in place)."""
    H, D, K = mixer.num_heads, mixer.head_dim, mixer.conv_size
    N = x.shape[1]
    qkv = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], dim=-1)[0]  # [Np, 3HD]
    qkv = F.silu(_kda_conv_packed(mixer, qkv, cache, pieces, spans, {} if memo is None else memo))
    q, k, v = (t.reshape(1, N, H, D) for t in qkv.split(H * D, dim=-1))
    q, k = l2_normalize(q).to(v.dtype), l2_normalize(k).to(v.dtype)
    g, beta = _kda_gates(mixer, x)
    o = _kda_varlen(q, k, v, g, beta, cache, pieces, spans, memo)  # [1, Np, H, D]
    return _kda_output(mixer, o, x)


def _kda_conv_packed(mixer: KimiDeltaAttention, qkv: torch.Tensor, cache: RecurrentCache, pieces, spans,
                     memo: dict):
    """KDA's causal conv of every piece in one pass: each piece's window (its slot's K-1 conv inputs, then
    its tokens) laid end to end, one conv over the whole, and each piece's rows picked out (rows whose taps
    straddle two windows are dropped). The slots' conv tails (and snapshot tails) are updated from the
    windows. qkv [Np, C] (pre-conv inputs of the packed pieces) -> [Np, C]. memo: the index tensors, built
    once per step (every KDA layer of a step has the same layout)."""
    K1 = mixer.conv_size - 1
    if ("conv", K1) not in memo:
        host_slots, P = [piece.state_slot for piece in pieces], len(pieces)
        window_starts, tails, keep, snapshot_rows, snapshot_slots, total = [], [], [], [], [], 0
        rows = []  # each window row's row in [the slots' conv tails (P x K-1); the pieces' tokens]
        for i, (piece, (a, b)) in enumerate(zip(pieces, spans)):  # its window: rows total .. total + K-1 + T - 1
            window_starts.append(total)
            rows.extend([*range(i * K1, (i + 1) * K1), *range(P * K1 + a, P * K1 + b)])
            tails.extend(range(total + b - a, total + b - a + K1))  # its last K-1 rows: the conv tail after it
            keep.extend(range(total, total + b - a))  # output row r is the conv of window rows r .. r+K-1
            for j, snapshot in piece.snapshots:  # the conv tail after j tokens: the K-1 inputs before token j
                snapshot_rows.extend(range(total + j, total + j + K1))
                snapshot_slots.append(snapshot)
            total += K1 + b - a
        if P == 1:  # one window: the tail then the tokens, and every conv row is kept
            rows, keep = [], []
        sizes = [len(host_slots), len(tails), len(keep), len(snapshot_rows), len(snapshot_slots), len(rows)]
        host = torch.tensor(host_slots + tails + keep + snapshot_rows + snapshot_slots + rows, dtype=torch.long)
        memo["conv", K1] = window_starts, *host.to(qkv.device, non_blocking=True).split(sizes)
    window_starts, slots, tails, keep, snapshot_rows, snapshot_slots, rows = memo["conv", K1]
    history = cache.conv.index_select(0, slots).to(qkv.dtype)  # [P, K-1, C]
    if len(pieces) == 1:
        window = torch.cat([history[0], qkv])  # [K-1+T, C]
    else:  # every piece's window in one gather
        window = torch.cat([history.flatten(0, 1), qkv]).index_select(0, rows)  # [sum(K-1+T), C]
    for piece, start, (a, b) in zip(pieces, window_starts, spans):
        if piece.saved_states is not None:
            piece.saved_states.append([cache, window[start:start + K1 + b - a].to(cache.conv.dtype), None])
    if len(snapshot_slots):
        tails_then = window.index_select(0, snapshot_rows).view(len(snapshot_slots), K1, -1)
        cache.conv.index_copy_(0, snapshot_slots, tails_then.to(cache.conv.dtype))
    cache.conv.index_copy_(0, slots, window.index_select(0, tails).view(len(pieces), K1, -1).to(cache.conv.dtype))
    mixed = causal_depthwise_conv(window[None], mixer.conv.weight.to(qkv.dtype))[0]  # [sum(K-1+T) - (K-1), C]
    return mixed if len(pieces) == 1 else mixed.index_select(0, keep)


def _kda_gates(mixer: KimiDeltaAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA's per-channel log-decay g [B, T, H, D] and beta [B, T, H] (fp32) of x [B, T, hidden]."""
    B, T, H, D = x.shape[0], x.shape[1], mixer.num_heads, mixer.head_dim
    g = mixer.f_b_proj(mixer.f_a_proj(x)).float() + mixer.dt_bias.float()
    g = (-mixer.A_log.float().exp().repeat_interleave(D) * F.softplus(g)).view(B, T, H, D)
    return g, torch.sigmoid(mixer.b_proj(x).float())


def _kda_output(mixer: KimiDeltaAttention, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """KDA's gated per-head norm and output projection: o [B, T, H, D] -> [B, T, hidden]."""
    B, T, H, D = *x.shape[:2], mixer.num_heads, mixer.head_dim
    gate = mixer.g_b_proj(mixer.g_a_proj(x)).view(B, T, H, D)
    o32 = F.rms_norm(o.float(), (D,), mixer.o_norm_weight.float(), mixer.eps)
    return mixer.o_proj((o32 * torch.sigmoid(gate.float())).to(x.dtype).reshape(B, T, H * D))


def _kda_decode_in_slots(mixer: KimiDeltaAttention, x: torch.Tensor, cache: RecurrentCache, slots: torch.Tensor,
                         depths: torch.Tensor | None = None, rounds: int = 1, kernel: bool = True) -> torch.Tensor:
    """KimiDeltaAttention.forward of one token per row, each continuing from its state slot: the conv
    tails are gathered and written back, the delta-rule states are read and written in place by the
    Triton decode kernel (ops.kda.decode; kernel=False: its torch reference). With depths (speculative
    verify rows, `PagedBatch.depths`), a row at depth j > 0 continues from the row before it: its conv window
    is its chain's first row's conv tail followed by the rows before it, and its delta rule runs after theirs.
    Every row writes the state (and conv tail) after its token to its own slot. x [S, 1, D] -> [S, 1, D]."""
    H, D = mixer.num_heads, mixer.head_dim
    qkv = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], dim=-1)  # [S, 1, 3HD]
    tails = cache.conv.index_select(0, slots).to(qkv.dtype)  # [S, K-1, 3HD]
    if depths is None:
        window = torch.cat([tails, qkv], dim=1)  # [S, K, 3HD]
    else:
        window = torch.cat([_chained_conv_inputs(tails, qkv[:, 0], depths), qkv], dim=1)
    write_rows_(cache.conv, slots, window[:, 1:])
    qkv = F.silu(causal_depthwise_conv(window, mixer.conv.weight.to(qkv.dtype)))[:, 0]  # [S, 3HD]
    q, k, v = (t.reshape(-1, H, D) for t in qkv.split(H * D, dim=-1))
    q, k = l2_normalize(q).to(v.dtype), l2_normalize(k).to(v.dtype)
    g, beta = _kda_gates(mixer, x)
    if kernel:
        o = kda_decode_slots_outside_compile(q, k, v, g[:, 0], beta[:, 0], cache.state, slots, D ** -0.5,
                                             depths=depths, rounds=rounds)
    else:
        o = kda_decode_slots_reference(q, k, v, g[:, 0], beta[:, 0], cache.state, slots, D ** -0.5,
                                       depths=depths, rounds=rounds)
    return _kda_output(mixer, o.unsqueeze(1), x)


def _chained_conv_inputs(tails: torch.Tensor, qkv: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """The K-1 conv inputs before each row's token when a row at depth j continues its chain's first row
    (row - j): entry i is the first row's tail entry j + i while j + i < K-1, else the input of row
    row + i - (K-1) (a row before it in the chain). tails [S, K-1, C], qkv [S, C], depths [S] -> [S, K-1, C]."""
    S, K1, C = tails.shape
    first = (torch.arange(S, device=depths.device) - depths)[:, None]  # [S, 1] each row's chain's first row
    offset = depths[:, None] + torch.arange(K1, device=depths.device)  # [S, K-1]
    index = torch.where(offset < K1, first * K1 + offset, S * K1 + first + offset - K1)
    return torch.cat([tails.reshape(S * K1, C), qkv]).index_select(0, index.flatten()).view(S, K1, C)


def _kda_varlen(q, k, v, g, beta, cache: RecurrentCache, pieces, spans, memo: dict | None = None) -> torch.Tensor:
    """The delta rule over packed pieces, each from its state slot (updated in place). A piece with interior
    snapshots runs in segments that end on them; after each segment its state is copied to the snapshot
    slot. With fla-core on CUDA, round r runs every piece's r-th segment in one chunk_kda call with cu_seqlens
    (`_kda_round`; a round of short segments steps them through the slot kernel instead), the tokens gathered
    into round order once per layer and the outputs back once; otherwise each piece runs its segments one kda()
    after another, the state passed along (`_kda_by_piece`). -> o [1, Np, H, V]."""
    keep = [i for i, p in enumerate(pieces) if p.saved_states is not None]
    if keep:
        return _kda_varlen_keeping_states(q, k, v, g, beta, cache, pieces, spans, keep)
    if not (VARLEN_KDA and use_varlen_kda(q.device)):
        return _kda_by_piece(q, k, v, g, beta, cache, pieces, spans)
    memo = {} if memo is None else memo
    if "rounds" not in memo:
        memo["rounds"] = _kda_rounds(pieces, spans, q.shape[1], q.device)
    rounds, order, inverse = memo["rounds"]
    packed = [t if order is None else t.index_select(1, order) for t in (q, k, v, g, beta)]  # round after round
    outs, first = [], 0
    for active, local, slots, bounds, snapshots, chains in rounds:
        size = local[-1][1]
        outs.append(_kda_round(*(t[:, first:first + size] for t in packed), cache, active, local, slots, bounds,
                               chains))
        if snapshots is not None:  # the states that end on a snapshot point, copied in one go
            sources, targets = snapshots
            cache.state.index_copy_(0, targets, cache.state.index_select(0, sources))
        first += size
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o if inverse is None else o.index_select(1, inverse)


def _kda_rounds(pieces, spans, N: int, device):
    """The step's delta-rule rounds (built once, for every KDA layer): per round, its (piece, segment) pairs,
    the segments' bounds within the round, the pieces' state slots, cu_seqlens, the snapshot copies
    (sources, targets) or None, and for a round of short segments (at most SHORT_SEGMENT tokens each, where
    the slot kernel is used: `short_segment_step`) each token's slot and depth and the longest segment, else
    None; then `order` [Np] (the tokens round after round) and `inverse` (back to piece order), both None
    when the order is the packed one."""
    short = short_segment_step(device) is not None
    segments = []  # per piece: [(start, end, snapshot slot or None)] in packed token indices
    for piece, (a, b) in zip(pieces, spans):
        cuts = [(a + j, slot) for j, slot in piece.snapshots]
        segments.append(list(zip([a] + [c for c, _ in cuts], [c for c, _ in cuts] + [b],
                                 [slot for _, slot in cuts] + [None])))
    rounds, order = [], []
    for r in range(max(len(s) for s in segments)):
        active = [(piece, segs[r]) for piece, segs in zip(pieces, segments) if r < len(segs)]
        local = _spans([b - a for _, (a, b, _) in active])
        pairs = [(piece.state_slot, snapshot) for piece, (_, _, snapshot) in active if snapshot is not None]
        longest = max(b - a for a, b in local)
        chained = short and longest <= SHORT_SEGMENT  # every segment of the round steps through the slot kernel
        token_slots = [piece.state_slot for piece, (a, b, _) in active for _ in range(b - a)] if chained else []
        depths = [t for _, (a, b, _) in active for t in range(b - a)] if chained else []
        bounds_cpu = torch.tensor([0] + [b for _, b in local])  # cu_seqlens; fla builds its chunk index from the
        host = torch.cat([torch.tensor([piece.state_slot for piece, _ in active]), bounds_cpu,  # host copy: no sync
                          torch.tensor([source for source, _ in pairs] + [target for _, target in pairs]
                                       + token_slots + depths, dtype=torch.long)])
        slots, bounds, snapshots, token_slots, depths = host.to(device, non_blocking=True).split(
            [len(active), len(active) + 1, 2 * len(pairs), len(token_slots), len(depths)])
        rounds.append((active, local, slots, (bounds, bounds_cpu), snapshots.view(2, -1) if pairs else None,
                       (token_slots, depths, longest) if chained else None))
        order.extend(t for _, (a, b, _) in active for t in range(a, b))
    if order == list(range(N)):
        return rounds, None, None
    index = torch.tensor(order)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(N))
    both = torch.cat([index, inverse]).to(device, non_blocking=True)
    return rounds, both[:N], both[N:]


def _kda_by_piece(q, k, v, g, beta, cache: RecurrentCache, pieces, spans) -> torch.Tensor:
    """The delta rule of each piece as one kda() per segment (segments end on its interior snapshots), the
    state handed from one segment to the next rather than through its slot: the slot is written once at
    the end and each snapshot slot once. -> o [1, Np, H, V] (the pieces' outputs are laid end to end)."""
    outs = []
    for piece, (a, b) in zip(pieces, spans):
        state = cache.state[piece.state_slot:piece.state_slot + 1]  # [1, H, K, V]
        start = a
        for end, snapshot in [(a + j, slot) for j, slot in piece.snapshots] + [(b, None)]:
            out, state = kda_outside_compile(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end],
                                             beta[:, start:end], initial_state=state, output_final_state=True)
            if snapshot is not None:
                cache.state[snapshot].copy_(state[0])
            outs.append(out)
            start = end
        cache.state[piece.state_slot].copy_(state[0])
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def short_segment_step(device: torch.device):
    """How a round of short delta-rule segments (a prompt's last, partial block after its snapshot point: at most
    SHORT_SEGMENT tokens) runs: the KDA slot kernel stepping each segment as a chain of one-token rows in one
    launch (where decode rows use it: CUDA, checked), instead of one chunk_kda call per layer; None: chunk_kda.
    SHORT_SEGMENTS = "reference" takes the kernel's torch reference anywhere (tests), "off" never."""
    if SHORT_SEGMENTS == "reference":
        return kda_chains_reference
    if SHORT_SEGMENTS == "auto" and use_kda_slot_kernel(device) and check_short_segments(device):
        return kda_decode_slots_outside_compile
    return None


def check_short_segments(device: torch.device) -> bool:
    """Run the slot kernel once on `device` over chains that share their slot (short prefill segments) against
    kda_chains_reference; on an error or a mismatch warn and keep chunk_kda. Cached per device."""
    key = str(device)
    if key not in SHORT_SEGMENTS_CHECKED:
        ok = False
        try:  # chains of 4, 1 and 2 tokens, each in one slot
            error = _slot_kernel_error(device, [3, 3, 3, 3, 0, 4, 4], [0, 1, 2, 3, 0, 0, 1], 4, kda_chains_reference, 1)
            ok = error < 2e-2
            if not ok:
                warnings.warn(f"the KDA slot kernel is off its reference over shared-slot chains on {device} "
                              f"(relative error {error:.2e}); short prefill segments run chunk_kda.")
        except Exception as error:  # noqa: BLE001 - chunk_kda computes the same thing
            warnings.warn(f"the KDA slot kernel failed over shared-slot chains on {device} "
                          f"({type(error).__name__}: {error}); short prefill segments run chunk_kda.")
        SHORT_SEGMENTS_CHECKED[key] = ok
    return SHORT_SEGMENTS_CHECKED[key]


def use_varlen_kda(device: torch.device) -> bool:
    """Whether the pieces' delta rule runs as one fla chunk_kda call with cu_seqlens (CUDA with fla-core)."""
    return device.type == "cuda" and fla_status()[0]


def _kda_round(q, k, v, g, beta, cache: RecurrentCache, active, local, slots, bounds, chains=None) -> torch.Tensor:
    """One segment per active piece, laid end to end in q .. beta [1, n, ...] (`local`: each one's bounds),
    from (and back to) the pieces' state slots (`slots` on the device, `bounds`: cu_seqlens on the device and
    on the host) -> o [1, n, H, V]. chains (short segments only): each token's slot and depth in its segment,
    and the longest segment; the segments then run as chains of one-token steps in one slot-kernel call."""
    global VARLEN_KDA
    if chains is not None:
        token_slots, depths, longest = chains
        o = short_segment_step(q.device)(q[0], k[0], v[0], g[0], beta[0], cache.state, token_slots,
                                         q.shape[-1] ** -0.5, depths=depths, rounds=longest)
        return o[None]
    if VARLEN_KDA and len(active) > 1 and use_varlen_kda(q.device):
        try:
            out, final = kda_fla_varlen_outside_compile(q, k, v, g, beta, q.shape[-1] ** -0.5,
                                                        cache.state.index_select(0, slots), *bounds)
            cache.state.index_copy_(0, slots, final)
            return out
        except Exception as error:  # noqa: BLE001 - the per-segment calls compute the same thing
            warnings.warn(f"fla chunk_kda over packed sequences failed ({type(error).__name__}: {error}); "
                          "running the pieces one at a time.")
            VARLEN_KDA = False
    outs = []
    for (piece, _), (a, b) in zip(active, local):
        state = cache.state[piece.state_slot:piece.state_slot + 1]
        out, final = kda_outside_compile(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                         initial_state=state, output_final_state=True)
        state.copy_(final)
        outs.append(out)
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _kda_varlen_keeping_states(q, k, v, g, beta, cache: RecurrentCache, pieces, spans, keep) -> torch.Tensor:
    """`_kda_varlen` when some pieces (speculative drafts under verification) need the state after each of
    their tokens: those run the recurrence one token at a time, padded into one batch [P, Tmax] (the state
    of a padded step is never read: the engine rolls every such slot back to an accepted prefix); the
    other pieces run as before."""
    others = [i for i in range(len(pieces)) if i not in set(keep)]
    outs = {}
    if others:
        rest = _kda_varlen(*(torch.cat([t[:, spans[i][0]:spans[i][1]] for i in others], dim=1)
                             for t in (q, k, v, g, beta)), cache, [pieces[i] for i in others],
                           _spans([spans[i][1] - spans[i][0] for i in others]))
        for i, (a, b) in zip(others, _spans([spans[i][1] - spans[i][0] for i in others])):
            outs[i] = rest[:, a:b]
    lengths = [spans[i][1] - spans[i][0] for i in keep]
    longest = max(lengths)

    def padded(t):  # [1, Np, ...] -> [P, Tmax, ...]
        out = t.new_zeros(len(keep), longest, *t.shape[2:])
        for row, i in enumerate(keep):
            out[row, :lengths[row]] = t[0, spans[i][0]:spans[i][1]]
        return out

    qp, kp, vp, gp, bp = (padded(t) for t in (q, k, v, g, beta))
    slots = torch.tensor([pieces[i].state_slot for i in keep], device=q.device)
    state = cache.state.index_select(0, slots)  # [P, H, Dk, Dv]
    steps, states = [], []
    for t in range(longest):
        o, state = kda_outside_compile(qp[:, t:t + 1], kp[:, t:t + 1], vp[:, t:t + 1], gp[:, t:t + 1],
                                       bp[:, t:t + 1], initial_state=state, output_final_state=True)
        steps.append(o)
        states.append(state.to(cache.state.dtype))
    o = torch.cat(steps, dim=1)  # [P, Tmax, H, Dv]
    states = torch.stack(states, dim=1)  # [P, Tmax, H, Dk, Dv]
    for row, i in enumerate(keep):
        outs[i] = o[row:row + 1, :lengths[row]]
        cache.state[pieces[i].state_slot].copy_(states[row, lengths[row] - 1])
        pieces[i].saved_states[-1][2] = states[row, :lengths[row]]
    return torch.cat([outs[i] for i in range(len(pieces))], dim=1)


def _spans(lengths: list[int]) -> list[tuple[int, int]]:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


def rollback_recurrent_state(saved_states: list, slot: int, keep: int) -> None:
    """Put a verified piece's KDA state slot back to the state after its first `keep` tokens (the rejected
    draft tokens after them leave no trace): the saved per-token state and the conv tail at that point."""
    for pool, window, states in saved_states:
        K1 = pool.conv.shape[1]
        pool.state[slot].copy_(states[keep - 1])
        pool.conv[slot].copy_(window[keep:keep + K1])


def _mla_project(mixer: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor):
    """MLA's projections for tokens as rows, each at its own position: x [S, 1, D] ->
    q_nope [S, 1, H, dn], q_rope [S, 1, H, dr], c_kv [S, 1, r], k_rope [S, 1, 1, dr] (rotated when RoPE)."""
    S, H = x.shape[0], mixer.num_heads
    q = mixer.q_proj(x) if hasattr(mixer, "q_proj") else mixer.q_b_proj(mixer.q_a_norm(mixer.q_a_proj(x)))
    q_nope, q_rope = q.view(S, 1, H, -1).split([mixer.nope_dim, mixer.rope_dim], dim=-1)
    c_kv, k_rope = mixer.kv_a_proj(x).split([mixer.kv_lora_rank, mixer.rope_dim], dim=-1)
    c_kv = mixer.kv_a_norm(c_kv)
    k_rope = k_rope.unsqueeze(2)
    if mixer.use_rope:
        q_rope, k_rope = mixer.rotary(q_rope, positions), mixer.rotary(k_rope, positions)
    return q_nope, q_rope, c_kv, k_rope


def _prefill_piece(mixer: nn.Module, x: torch.Tensor, cache, piece: PrefillPiece, block_size: int) -> torch.Tensor:
    """The mixer's own cached forward for one sequence: x [1, T, D] -> [1, T, D]."""
    if isinstance(mixer, KimiDeltaAttention) and piece.saved_states is not None:
        return _kda_prefill(mixer, x, cache, [piece], [(0, piece.length)])
    if isinstance(mixer, KimiDeltaAttention):
        s = piece.state_slot  # slices are views: the forward updates the pool in place
        slot = RecurrentCache(cache.conv[s:s + 1], cache.state[s:s + 1])
        edges = [0] + [j for j, _ in piece.snapshots] + [piece.length]
        outs = []
        for i in range(len(edges) - 1):  # up to each interior snapshot, then copy the slot there
            outs.append(mixer(x[:, edges[i]:edges[i + 1]], slot))
            if i < len(piece.snapshots):
                cache.conv[piece.snapshots[i][1]].copy_(cache.conv[s])
                cache.state[piece.snapshots[i][1]].copy_(cache.state[s])
        return torch.cat(outs, dim=1)
    end = piece.start + piece.length
    table = piece.block_table[None]  # [1, MB]
    new_slots = slots_of(piece.block_table, torch.arange(piece.start, end, device=x.device), block_size)
    if isinstance(mixer, MultiHeadLatentAttention):
        dense = LatentCache(gather_blocks(cache.c_kv, table)[:, :end], gather_blocks(cache.k_rope, table)[:, :end])
        out = mixer(x, dense, piece.start)
        cache.c_kv.view(-1, cache.c_kv.shape[-1]).index_copy_(0, new_slots, dense.c_kv[0, piece.start:end])
        cache.k_rope.view(-1, cache.k_rope.shape[-1]).index_copy_(0, new_slots, dense.k_rope[0, piece.start:end])
        return out
    dense = KVCache(gather_blocks(cache.k, table)[:, :end], gather_blocks(cache.v, table)[:, :end])
    out = mixer(x, dense, piece.start)
    cache.k.flatten(0, 1).index_copy_(0, new_slots, dense.k[0, piece.start:end])
    cache.v.flatten(0, 1).index_copy_(0, new_slots, dense.v[0, piece.start:end])
    return out


def _decode_rows(mixer: nn.Module, x: torch.Tensor, cache, batch: PagedBatch) -> torch.Tensor:
    """One token per sequence, each at its own position: x [S, 1, D] -> [S, 1, D]."""
    if isinstance(mixer, KimiDeltaAttention):
        slots = batch.state_slots
        if batch.depths is not None:  # verify rows' chains: the kernel, else its torch reference
            return _kda_decode_in_slots(mixer, x, cache, slots, batch.depths, batch.rounds,
                                        kernel=use_kda_slot_kernel(x.device))
        if use_kda_slot_kernel(x.device):
            return _kda_decode_in_slots(mixer, x, cache, slots)
        rows = RecurrentCache(cache.conv.index_select(0, slots), cache.state.index_select(0, slots))
        out = mixer(x, rows)  # advances the gathered copies
        cache.conv.index_copy_(0, slots, rows.conv)
        cache.state.index_copy_(0, slots, rows.state)
        return out
    if isinstance(mixer, MultiHeadLatentAttention):
        return _mla_decode_rows(mixer, x, cache, batch)
    return _gqa_decode_rows(mixer, x, cache, batch)


VARLEN_KDA = True  # on CUDA with fla-core: the prefill pieces' delta rule in one chunk_kda call (cu_seqlens)
kda_fla_varlen_outside_compile = torch.compiler.disable(kda_fla_varlen)
BATCHED_PREFILL = True  # False: each prefill piece runs the mixer's own cached forward (the reference)
paged_mla_partials_outside_compile = torch.compiler.disable(paged_mla_partials)  # a Triton kernel: no tracing
KDA_DECODE = "auto"  # KDA decode rows: "auto" (the in-place Triton kernel on CUDA once it passed its check),
# "triton" (anywhere: Triton's interpreter on the CPU) or "gather" (the mixer's forward over gathered slots)
kda_decode_slots_outside_compile = torch.compiler.disable(kda_decode_slots)
SHORT_SEGMENT = 16  # prefill delta-rule segments of at most this many tokens may step through the slot kernel
SHORT_SEGMENTS = "auto"  # "auto" (with the slot kernel: CUDA, checked), "reference" (its torch form) or "off"
SHORT_SEGMENTS_CHECKED: dict[str, bool] = {}  # device -> whether the kernel matched kda_chains_reference there
KDA_KERNEL_CHECKED: dict[str, bool] = {}  # device -> whether the kernel matched its reference there
GATHER_ELEMENTS = 1 << 28  # decode rows gather their blocks in groups of at most this many cache elements
PAGED_KERNEL = "auto"  # MLA decode rows: "auto" (the Triton kernel on CUDA), "triton" (anywhere) or "gather"


def use_paged_kernel(device: torch.device, block_size: int) -> bool:
    """Whether MLA decode rows read the blocks in place (ops.paged_mla) rather than gathering them."""
    if PAGED_KERNEL == "gather" or not triton_available() or block_size < 16 or block_size & (block_size - 1):
        return False
    return PAGED_KERNEL == "triton" or device.type == "cuda"


def use_kda_slot_kernel(device: torch.device) -> bool:
    """Whether KDA decode rows run the in-place Triton kernel. "auto" takes it on CUDA only after
    check_kda_slot_kernel passed there (the engine's runner checks before capturing any graph)."""
    if KDA_DECODE == "gather" or not triton_available():
        return False
    return KDA_DECODE == "triton" or (device.type == "cuda" and KDA_KERNEL_CHECKED.get(str(device), False))


def check_kda_slot_kernel(device: torch.device) -> bool:
    """Run the KDA decode kernel once on `device` against its reference, for decode rows and for verify rows'
    chains; on an error or a mismatch warn and keep the gathered path (chains: the reference's rounds). Cached
    per device."""
    key = str(device)
    if key not in KDA_KERNEL_CHECKED:
        ok = False
        if device.type == "cuda" and triton_available():
            try:  # rows in their own slots, alone and as verify rows' chains (graph step)
                error = max(_slot_kernel_error(device, [4, 0, 6, 1, 3], depths, 3, kda_decode_slots_reference, 0)
                            for depths in (None, [0, 1, 2, 0, 1]))
                ok = error < 2e-2
                if not ok:
                    warnings.warn(f"the Triton KDA decode kernel is off its reference on {device} (relative error "
                                  f"{error:.2e}); KDA decode rows gather their state slots instead.")
            except Exception as error:  # noqa: BLE001 - the gathered path computes the same thing
                warnings.warn(f"the Triton KDA decode kernel failed on {device} ({type(error).__name__}: {error}); "
                              "KDA decode rows gather their state slots instead.")
        KDA_KERNEL_CHECKED[key] = ok
    return KDA_KERNEL_CHECKED[key]


def _slot_kernel_error(device: torch.device, slots: list[int], depths: list[int] | None, rounds: int, reference,
                       seed: int) -> float:
    """The KDA slot kernel's largest relative error (outputs, states) against `reference` on random inputs as the
    engine passes them (bf16 q, k, v, v strided; fp32 gates and states), rows in `slots`, chained by `depths`."""
    g = torch.Generator(device=device).manual_seed(seed)
    S, H, K, N = len(slots), 2, 128, max(slots) + 1
    q, k = (l2_normalize(torch.randn(S, H, K, generator=g, device=device)).bfloat16() for _ in range(2))
    v = torch.randn(S, 3, H, K, generator=g, device=device).bfloat16()[:, 2]
    gate = -torch.rand(S, H, K, generator=g, device=device)
    beta = torch.rand(S, H, generator=g, device=device)
    state = torch.randn(N, H, K, K, generator=g, device=device)
    slots = torch.tensor(slots, device=device)
    depths = None if depths is None else torch.tensor(depths, device=device)
    expected_state, got_state = state.clone(), state.clone()
    expected = reference(q, k, v, gate, beta, expected_state, slots, K ** -0.5, depths=depths, rounds=rounds)
    got = kda_decode_slots(q, k, v, gate, beta, got_state, slots, K ** -0.5, depths=depths, rounds=rounds)
    return max(((a.float() - b.float()).norm() / b.float().norm()).item()
               for a, b in ((got, expected), (got_state, expected_state)))


def _context_mask(batch: PagedBatch, length: int, device) -> torch.Tensor:
    """[S, L] True where key position <= the row's query position."""
    return torch.arange(length, device=device)[None, :] <= batch.positions[:, None]


def _mla_decode_rows(mixer: MultiHeadLatentAttention, x, cache: PagedLatentCache, batch: PagedBatch):
    """MLA's projections (as in its forward), the new latent written to its slot, then absorbed attention
    over each row's gathered blocks: MQA over [c_kv, k_rope] with kv_b_proj folded into query and output."""
    S, H = x.shape[0], mixer.num_heads
    if mixer.moba:
        raise ValueError("MoBA layers decode through prefill pieces (paged_mixer_forward sends them there).")
    q_nope, q_rope, c_kv, k_rope = _mla_project(mixer, x, batch.positions)
    write_rows_(cache.c_kv, batch.slot_mapping, c_kv[:, 0])
    write_rows_(cache.k_rope, batch.slot_mapping, k_rope[:, 0, 0])
    w = mixer.kv_b_proj.weight.view(H, mixer.nope_dim + mixer.v_dim, mixer.kv_lora_rank)
    w_k, w_v = w[:, :mixer.nope_dim], w[:, mixer.nope_dim:]  # [H, dn, r], [H, dv, r]
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_k)
    if use_paged_kernel(x.device, batch.block_size):
        partials = paged_mla_partials_outside_compile(q_latent[:, 0], q_rope[:, 0], cache.c_kv, cache.k_rope,
                                                      batch.block_tables, batch.positions, mixer.scale)
        o_latent = merge_partials(*partials, H, mixer.kv_lora_rank)  # outside the kernel: compiled code fuses it
        o_latent = o_latent.to(q_latent.dtype).unsqueeze(1)  # [S, 1, H, r]
        return mixer.o_proj(torch.einsum("bthr,hvr->bthv", o_latent, w_v).reshape(S, 1, -1))
    length = batch.block_tables.shape[1] * batch.block_size
    group = max(1, GATHER_ELEMENTS // (length * (mixer.kv_lora_rank + mixer.rope_dim)))
    o_latent = torch.cat([_latent_attention(q_latent[i:i + group], q_rope[i:i + group], cache,
                                            batch.block_tables[i:i + group], batch.positions[i:i + group], mixer.scale)
                          for i in range(0, S, group)])  # [S, 1, H, r]
    o = torch.einsum("bthr,hvr->bthv", o_latent, w_v)
    return mixer.o_proj(o.reshape(S, 1, -1))


def _latent_attention(q_latent, q_rope, cache: PagedLatentCache, block_tables, positions, scale: float):
    """Absorbed attention of one group of decode rows over their gathered latent blocks.
    q_latent [S, 1, H, r], q_rope [S, 1, H, dr], block_tables [S, MB], positions [S] -> [S, 1, H, r]."""
    keys_latent = gather_blocks(cache.c_kv, block_tables)  # [S, L, r]
    keys_rope = gather_blocks(cache.k_rope, block_tables)  # [S, L, dr]
    scores = torch.einsum("bthr,bsr->bths", q_latent, keys_latent) + torch.einsum("bthd,bsd->bths", q_rope, keys_rope)
    allowed = torch.arange(keys_latent.shape[1], device=positions.device)[None, :] <= positions[:, None]  # [S, L]
    scores = (scores.float() * scale).masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.einsum("bths,bsr->bthr", scores.softmax(-1).to(keys_latent.dtype), keys_latent)


def _gqa_decode_rows(mixer: GroupedQueryAttention, x, cache: PagedKVCache, batch: PagedBatch):
    S, H, Hkv, D = x.shape[0], mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = mixer.rotary(mixer.q_proj(x).view(S, 1, H, D), batch.positions)
    k = mixer.rotary(mixer.k_proj(x).view(S, 1, Hkv, D), batch.positions)
    v = mixer.v_proj(x).view(S, 1, Hkv, D)
    write_rows_(cache.k, batch.slot_mapping, k[:, 0])
    write_rows_(cache.v, batch.slot_mapping, v[:, 0])
    keys = gather_blocks(cache.k, batch.block_tables).transpose(1, 2)  # [S, Hkv, L, D]
    values = gather_blocks(cache.v, batch.block_tables).transpose(1, 2)
    allowed = _context_mask(batch, keys.shape[2], x.device)[:, None, None, :]  # [S, 1, 1, L]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed, scale=mixer.scale,
                                       enable_gqa=H != Hkv)  # [S, H, 1, D]
    return mixer.o_proj(o.transpose(1, 2).reshape(S, 1, H * D))
