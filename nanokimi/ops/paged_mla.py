"""Absorbed MLA decode over a paged latent cache, reading the blocks in place (Triton, split over the keys).

For each decode row s with query position p_s, over its keys 0..p_s found through its block table:
    scores[h, j] = scale * (q_latent[s, h] . c_kv[j] + q_rope[s, h] . k_rope[j])
    out[s, h]    = softmax_j(scores[h]) @ c_kv
Every head of a row shares the latent keys (MQA over [c_kv, k_rope]), so one program loads a block once for
all heads. The keys of a row are split into `splits` ranges computed in parallel, each keeping a running
max and sum (online softmax); `paged_mla_decode` merges the ranges. `paged_mla_decode_reference` gathers
the blocks and runs the same maths in PyTorch; the tests compare the two.
"""
import importlib.util

import torch


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # found, not imported (importing it is slow)


def triton_available() -> bool:
    return TRITON_INSTALLED


def paged_mla_decode_reference(q_latent, q_rope, c_kv, k_rope, block_tables, positions, scale: float) -> torch.Tensor:
    """q_latent [S, H, r], q_rope [S, H, dr]; c_kv [NB, bs, r], k_rope [NB, bs, dr] (the pools);
    block_tables [S, MB] long; positions [S] long (last key of each row) -> [S, H, r] fp32."""
    keys = c_kv[block_tables].flatten(1, 2).float()  # [S, L, r]
    rope = k_rope[block_tables].flatten(1, 2).float()  # [S, L, dr]
    scores = torch.einsum("shr,slr->shl", q_latent.float(), keys) + torch.einsum("shd,sld->shl", q_rope.float(), rope)
    allowed = torch.arange(keys.shape[1], device=keys.device)[None, :] <= positions[:, None]  # [S, L]
    scores = (scores * scale).masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("shl,slr->shr", scores.softmax(-1), keys)


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def paged_mla_decode(q_latent, q_rope, c_kv, k_rope, block_tables, positions, scale: float,
                     split_tokens: int = 512) -> torch.Tensor:
    """The Triton form of paged_mla_decode_reference (same arguments; -> [S, H, r] fp32). Keys are split
    in ranges of about split_tokens (whole blocks) computed in parallel and merged here."""
    partials = paged_mla_partials(q_latent, q_rope, c_kv, k_rope, block_tables, positions, scale, split_tokens)
    return merge_partials(*partials, q_latent.shape[1], q_latent.shape[2])


def paged_mla_partials(q_latent, q_rope, c_kv, k_rope, block_tables, positions, scale: float,
                       split_tokens: int = 512):
    """The kernel's part of paged_mla_decode: per row, key range and (padded) head, the unnormalised output,
    the running max and the sum of exponentials -> (part_acc [S, splits, BH, BR], part_max, part_sum
    [S, splits, BH]). Apart from merge_partials so that compiled code can fuse the merge."""
    S, H, R = q_latent.shape
    DR, BS, MB = q_rope.shape[-1], c_kv.shape[1], block_tables.shape[1]
    if BS < 16 or BS & (BS - 1):
        raise ValueError(f"paged_mla_decode needs a power-of-two block_size >= 16, got {BS}")
    blocks_per_split = max(1, split_tokens // BS)
    splits = -(-MB // blocks_per_split)
    BLOCK_H, BLOCK_R, BLOCK_DR = _next_pow2(H), _next_pow2(R), _next_pow2(DR)
    device = q_latent.device
    part_acc = torch.empty(S, splits, BLOCK_H, BLOCK_R, device=device, dtype=torch.float32)
    part_max = torch.empty(S, splits, BLOCK_H, device=device, dtype=torch.float32)
    part_sum = torch.empty(S, splits, BLOCK_H, device=device, dtype=torch.float32)
    from nanokimi.ops.paged_mla_triton import paged_mla_kernel

    paged_mla_kernel[(S, splits)](q_latent.contiguous(), q_rope.contiguous(), c_kv, k_rope,
                                   block_tables.contiguous(), positions.contiguous(), part_acc, part_max, part_sum,
                                   scale, H, R, DR, MB, blocks_per_split, BS=BS, BLOCK_H=BLOCK_H, BLOCK_R=BLOCK_R,
                                   BLOCK_DR=BLOCK_DR)
    return part_acc, part_max, part_sum


def merge_partials(part_acc, part_max, part_sum, H: int, R: int) -> torch.Tensor:
    """Combine the key ranges' online-softmax partials (paged_mla_partials) -> [S, H, r] fp32."""
    overall = part_max.amax(1, keepdim=True)  # [S, 1, BH]; every row has key 0, so this is finite
    weight = torch.exp(part_max - overall).nan_to_num(0.0)  # empty ranges: exp(-inf) = 0
    total = (part_sum * weight).sum(1)  # [S, BH]
    out = (part_acc * weight[..., None]).sum(1) / total[..., None]  # [S, BH, BR]
    return out[:, :H, :R]
