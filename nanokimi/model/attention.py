"""Full-attention token mixers: GQA (RoPE) and Multi-head Latent Attention (RoPE or NoPE, MoBA mode).

Both can record each head's exact max pre-softmax logit (for QK-Clip) and rescale their own weights.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.config import ModelConfig
from nanokimi.model.cache import KVCache, LatentCache
from nanokimi.model.norm import RMSNorm
from nanokimi.model.packing import Documents
from nanokimi.model.rope import Rotary, yarn_mscale
from nanokimi.runtime.attention import pad_v_for_flash
from nanokimi.runtime.rows import scale_rows_

LATENT_NORM_EPS = 1e-6  # MLA's q/kv latent norms use a fixed eps in DeepSeek-V3 and Kimi Linear, not rms_norm_eps


def causal_attention(q, k, v, scale: float, q_offset: int, documents: Documents | None = None) -> torch.Tensor:
    """q [B, Tq, H, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv]; queries sit at q_offset.. -> [B, Tq, H, Dv].
    With `documents` (packed rows, no cache) attention is block-diagonal: each token sees its own document."""
    Tq, Tk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if documents is not None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.attention_mask(), scale=scale, enable_gqa=gqa)
    elif q_offset == 0 and Tq == Tk:
        Dv = v.shape[-1]
        if pad_v_for_flash(q, v):  # MLA: qk 192, v 128, where flash is the best kernel that takes it
            v = F.pad(v, (0, q.shape[-1] - Dv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[..., :Dv]
    elif Tq == 1:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        allowed = torch.arange(Tk, device=q.device)[None, :] <= q_offset + torch.arange(Tq, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def masked_cache_attention(q, k, v, scale: float, pos: torch.Tensor) -> torch.Tensor:
    """Fixed-shape attention over a whole preallocated cache (CUDA-graph friendly decode).

    q [B, T, H, Dk] at positions pos..pos+T-1; k [B, L, Hkv, Dk], v [B, L, Hkv, Dv] hold the full
    cache; pos is a 0-d device tensor. Keys past each query's position are masked out. The query
    heads of a group become extra query rows of their shared key head, so K/V are never repeated.
    -> [B, T, H, Dv]
    """
    B, T, H, Dk = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q.view(B, T, Hkv, G, Dk).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * G, Dk)
    query_pos = (pos + torch.arange(T, device=q.device)).repeat_interleave(G)  # [T*G]
    allowed = torch.arange(L, device=q.device)[None, :] <= query_pos[:, None]  # [T*G, L]
    o = F.scaled_dot_product_attention(rows, k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale)
    return o.view(B, Hkv, T, G, -1).permute(0, 2, 1, 3, 4).reshape(B, T, H, -1)


def check_packing(cache, documents: Documents | None) -> None:
    if documents is not None and cache is not None:
        raise ValueError("documents= packs several sequences into a row for training; it cannot be combined with "
                         "a cache (generate one sequence per row instead).")


def write_cache(buffer: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[:, pos:pos+T] = values with a device-tensor position. buffer [B, L, ...], values [B, T, ...]."""
    buffer.index_copy_(1, pos + torch.arange(values.shape[1], device=buffer.device), values.to(buffer.dtype))


@torch.no_grad()
def max_causal_logit(q, k, scale: float, q_offset: int = 0, chunk: int = 512,
                     documents: Documents | None = None) -> torch.Tensor:
    """Exact per-head max of scale * q.k over the batch under the causal mask (and within each document of
    packed rows), in query chunks so the [Tq, Tk] matrix is never whole.
    q [B, Tq, H, D], k [B, Tk, Hkv, D] -> [H] fp32."""
    H, Hkv = q.shape[2], k.shape[2]
    k = k.float().repeat_interleave(H // Hkv, dim=2).transpose(1, 2)  # [B, H, Tk, D]
    key_pos = torch.arange(k.shape[2], device=q.device)
    best = torch.full((H,), -math.inf, device=q.device)
    for start in range(0, q.shape[1], chunk):
        qc = q[:, start:start + chunk].float().transpose(1, 2)  # [B, H, c, D]
        scores = (qc @ k.transpose(-1, -2)) * scale  # [B, H, c, Tk]
        query_pos = q_offset + start + torch.arange(qc.shape[2], device=q.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], -math.inf)
        if documents is not None:  # [B, 1, c, Tk]: keys of other documents
            other = documents.ids[:, start:start + chunk, None] != documents.ids[:, None, :]
            scores = scores.masked_fill(other.unsqueeze(1), -math.inf)
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave)
        self.scale = cfg.head_dim ** -0.5
        self.record_max_logits = False
        self.max_logits = None

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                documents: Documents | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        check_packing(cache, documents)
        q = self.rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), pos)
        k = self.rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), pos)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if isinstance(pos, torch.Tensor):
            write_cache(cache.k, pos, k)
            write_cache(cache.v, pos, v)
            o = masked_cache_attention(q, cache.k, cache.v, self.scale, pos)
            return self.o_proj(o.reshape(B, T, -1))
        if cache is not None:
            cache.k[:, pos:pos + T] = k
            cache.v[:, pos:pos + T] = v
            k, v = cache.k[:, :pos + T], cache.v[:, :pos + T]
        if self.record_max_logits:
            self.max_logits = max_causal_logit(q, k, self.scale, pos, documents=documents)
        o = causal_attention(q, k, v, self.scale, pos, documents)  # [B, T, H, D]
        return self.o_proj(o.reshape(B, T, -1))

    @torch.no_grad()
    def qk_clip_(self, tau: float) -> torch.Tensor:
        """Rescale heads whose recorded max logit exceeds tau so it becomes tau. Returns gamma [H].
        MHA: W_q and W_k rows of the head by sqrt(gamma). GQA (a key head shared by several query
        heads): the whole gamma goes to W_q, so the other heads of the group stay bit-identical."""
        gamma = _clip_factors(self.max_logits, tau, self.num_heads, self.q_proj.weight.device)  # [H]
        mha = self.num_kv_heads == self.num_heads
        per_row = (gamma.sqrt() if mha else gamma).repeat_interleave(self.head_dim)  # [H * d]
        scale_rows_(self.q_proj.weight, per_row)
        if mha:
            scale_rows_(self.k_proj.weight, per_row)
        return gamma


def _clip_factors(max_logits, tau: float, num_heads: int, device) -> torch.Tensor:
    """gamma [H] = min(1, tau / max_logit) per head, exactly 1 where the head stays under tau (no host sync)."""
    if max_logits is None:
        raise RuntimeError("QK-Clip needs the max logits of a forward pass: set record_max_logits=True first "
                           "(nanokimi.optim.qk_clip.enable_qk_clip_recording(model)).")
    max_logits = max_logits.to(device)
    return torch.where(max_logits > tau, tau / max_logits, torch.ones(num_heads, device=device))


class MultiHeadLatentAttention(nn.Module):
    """MLA. Caches only the normalised latent c_kv and the shared rotated k_rope per token.
    Short cached calls (decode) use weight absorption: attention runs over the latent directly."""

    absorb_max_tokens = 16

    def __init__(self, cfg: ModelConfig, moba: bool = False):
        super().__init__()
        self.num_heads = H = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.hidden_size, bias=False)
        self.use_rope = cfg.mla_rope
        self.rotary = Rotary(self.rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave,
                             cfg.yarn_factor, cfg.yarn_original_max_position, cfg.yarn_beta_fast,
                             cfg.yarn_beta_slow, cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
        self.scale = qk_dim ** -0.5 * yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
        self.moba = moba
        self.moba_block_size, self.moba_topk = cfg.moba_block_size, cfg.moba_topk
        self.record_max_logits = False
        self.max_logits = None

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> LatentCache:
        return LatentCache(torch.zeros(batch_size, max_len, self.kv_lora_rank, device=device, dtype=dtype),
                           torch.zeros(batch_size, max_len, self.rope_dim, device=device, dtype=dtype))

    def _q_weight(self) -> torch.Tensor:
        return self.q_proj.weight if hasattr(self, "q_proj") else self.q_b_proj.weight

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None, pos: int = 0,
                documents: Documents | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        check_packing(cache, documents)
        if documents is not None and self.moba:
            raise ValueError("packed documents are not supported by MoBA layers ('B' in the layer pattern): its "
                             "block selection would look across documents. Train without packing (sft.pack=false).")
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # [B, T, r]
        k_rope = k_rope.unsqueeze(2)  # [B, T, 1, dr]
        if self.use_rope:
            q_rope, k_rope = self.rotary(q_rope, pos), self.rotary(k_rope, pos)
        if isinstance(pos, torch.Tensor):
            write_cache(cache.c_kv, pos, c_kv)
            write_cache(cache.k_rope, pos, k_rope.squeeze(2))
            o = self._attend_latent_cache(q_nope, q_rope, cache.c_kv, cache.k_rope, pos)
            return self.o_proj(o.reshape(B, T, -1))
        if cache is not None:
            cache.c_kv[:, pos:pos + T] = c_kv
            cache.k_rope[:, pos:pos + T] = k_rope.squeeze(2)
            c_kv, k_rope = cache.c_kv[:, :pos + T], cache.k_rope[:, :pos + T].unsqueeze(2)
        absorbed = cache is not None and T <= self.absorb_max_tokens and not self.moba and not self.record_max_logits
        if absorbed:
            o = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, pos)
        else:
            o = self._attend_expanded(q_nope, q_rope, c_kv, k_rope, pos, documents)
        return self.o_proj(o.reshape(B, T, -1))

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, pos, documents=None):
        B, S, _ = c_kv.shape
        H = self.num_heads
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, H, dn+dr]
        k = torch.cat([k_nope, k_rope.expand(B, S, H, self.rope_dim)], dim=-1)  # [B, S, H, dn+dr]
        if self.record_max_logits:
            self.max_logits = max_causal_logit(q, k, self.scale, pos, documents=documents)
        if self.moba:
            from nanokimi.ops.moba import moba_attention
            return moba_attention(q, k, v, block_size=self.moba_block_size, topk=self.moba_topk,
                                  scale=self.scale, q_offset=pos)
        return causal_attention(q, k, v, self.scale, pos, documents)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, pos):
        """Fold kv_b_proj into the query (key part) and the output (value part): one shared latent 'head'."""
        H = self.num_heads
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, :self.nope_dim], w[:, self.nope_dim:]  # [H, dn, r], [H, dv, r]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_k)
        q = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, r+dr]
        k = torch.cat([c_kv.unsqueeze(2), k_rope], dim=-1)  # [B, S, 1, r+dr]
        o_latent = causal_attention(q, k, c_kv.unsqueeze(2), self.scale, pos)  # [B, T, H, r]
        return torch.einsum("bthr,hvr->bthv", o_latent, w_v)

    def _attend_latent_cache(self, q_nope, q_rope, c_kv, k_rope, pos):
        """Absorbed attention over the whole preallocated cache, keys past pos masked (fixed shapes for
        CUDA graphs). The latent and rope scores are two matmuls, so the cache is never concatenated.
        q_nope [B, T, H, dn], q_rope [B, T, H, dr], c_kv [B, L, r], k_rope [B, L, dr] -> [B, T, H, dv]."""
        H, T, L = self.num_heads, q_nope.shape[1], c_kv.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, :self.nope_dim], w[:, self.nope_dim:]  # [H, dn, r], [H, dv, r]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_k)
        scores = torch.einsum("bthr,bsr->bths", q_latent, c_kv) + torch.einsum("bthd,bsd->bths", q_rope, k_rope)
        query_pos = pos + torch.arange(T, device=c_kv.device)  # [T]
        allowed = torch.arange(L, device=c_kv.device)[None, :] <= query_pos[:, None]  # [T, L]
        scores = (scores.float() * self.scale).masked_fill(~allowed[None, :, None, :], float("-inf"))
        o_latent = torch.einsum("bths,bsr->bthr", scores.softmax(-1).to(c_kv.dtype), c_kv)  # [B, T, H, r]
        return torch.einsum("bthr,hvr->bthv", o_latent, w_v)

    @torch.no_grad()
    def qk_clip_(self, tau: float) -> torch.Tensor:
        """Per head over tau: q_nope and k_nope rows by sqrt(gamma), q_rope rows by gamma; the shared
        k_rope (in kv_a_proj) is never touched. Returns gamma [H]."""
        gamma = _clip_factors(self.max_logits, tau, self.num_heads, self.kv_b_proj.weight.device)  # [H]
        root, ones = gamma.sqrt()[:, None], torch.ones_like(gamma)[:, None]  # [H, 1]
        q_rows = torch.cat([root.expand(-1, self.nope_dim), gamma[:, None].expand(-1, self.rope_dim)], 1)
        kv_rows = torch.cat([root.expand(-1, self.nope_dim), ones.expand(-1, self.v_dim)], 1)
        scale_rows_(self._q_weight(), q_rows.flatten())  # per head: q_nope rows by sqrt(gamma), q_rope by gamma
        scale_rows_(self.kv_b_proj.weight, kv_rows.flatten())  # per head: k_nope rows by sqrt(gamma), v untouched
        return gamma
