"""Block Attention Residuals, two-phase (arXiv 2603.15031 §4): the form the model runs; naive.py is the reference.

Within a block, every sublayer attends over the same completed sources (embedding + finished block sums) plus
its own block's partial sum, which grows sublayer by sublayer. So:
  phase 1 (`depth_attention`, once per block): all S queries of the block against the completed sources at once;
          returns each query's normalised mixture and its log-sum-exp over those sources.
  phase 2 (`merge_partial`, once per sublayer): one more logit, for the partial sum, merged into the phase-1
          result by online softmax: h = w * mixture + (1 - w) * partial, w = sigmoid(lse - partial_logit).
Keys never need materialising: query . (RMSNorm(v) * key_weight) = rstd(v) * (v . (query * key_weight)).
All softmax maths is fp32 with autocast off. Phase 1 recomputes itself in backward (activation checkpointing),
so autograd keeps only references to the sources, not a stacked copy per block.
"""
import torch
from torch.utils.checkpoint import checkpoint

from nanokimi.ops.attnres.naive import attnres_naive, attnres_stack_naive

__all__ = ["attnres_naive", "attnres_stack_naive", "depth_attention", "merge_partial"]


def _wide(x):
    """fp32 for half/bfloat16/fp32 inputs; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rstd(x32, eps):
    return torch.rsqrt(x32.pow(2).mean(-1) + eps)


def _depth_attention(queries, key_weights, eps, *sources):
    with torch.autocast(sources[0].device.type, enabled=False):
        values = _wide(torch.stack(sources, dim=2))  # [B, T, N, D]: depth next to D, so both contractions are bmm
        effective_queries = _wide(queries) * _wide(key_weights)  # [S, D]
        logits = (values @ effective_queries.T) * _rstd(values, eps).unsqueeze(-1)  # [B, T, N, S]
        lse = torch.logsumexp(logits, dim=2)  # [B, T, S]
        alpha = torch.exp(logits - lse.unsqueeze(2))
        mixture = alpha.transpose(-1, -2) @ values  # [B, T, S, D]
    return mixture.movedim(2, 0), lse.movedim(2, 0)  # [S, B, T, D], [S, B, T]


def depth_attention(sources, queries, key_weights, eps=1e-6, recompute=True):
    """Phase 1: S pseudo-queries against N sources at once.

    sources: sequence of N tensors [B, T, D]; queries, key_weights: [S, D].
    Returns (mixture [S, B, T, D], lse [S, B, T]) in fp32 (float64 for float64 sources): mixture[s] = sum_n softmax_n(logit[s, n]) v_n.
    With recompute, backward re-runs this function instead of keeping its fp32 intermediates.
    """
    if len(sources) == 0:
        raise ValueError("depth_attention needs at least one source (the token embedding).")
    if queries.dim() != 2 or queries.shape != key_weights.shape or queries.shape[-1] != sources[0].shape[-1]:
        raise ValueError(f"queries {tuple(queries.shape)} and key_weights {tuple(key_weights.shape)} must both be "
                         f"[S, D] with D = {sources[0].shape[-1]}, the sources' last dimension.")
    needs_grad = torch.is_grad_enabled() and (queries.requires_grad or key_weights.requires_grad
                                              or any(s.requires_grad for s in sources))
    if recompute and needs_grad:
        return checkpoint(_depth_attention, queries, key_weights, eps, *sources, use_reentrant=False)
    return _depth_attention(queries, key_weights, eps, *sources)


def merge_partial(mixture, lse, partial, query, key_weight, eps=1e-6):
    """Phase 2: fold the block's partial sum into a phase-1 result by online softmax.

    mixture: [B, T, D] and lse: [B, T] (one query's phase-1 outputs); partial: [B, T, D]; query, key_weight: [D].
    Returns h [B, T, D] in partial's dtype: softmax over (phase-1 sources + partial) applied to their values.
    """
    with torch.autocast(partial.device.type, enabled=False):
        partial32 = _wide(partial)
        effective_query = _wide(query) * _wide(key_weight)  # [D]
        partial_logit = (partial32 @ effective_query) * _rstd(partial32, eps)  # [B, T]
        weight = torch.sigmoid(lse - partial_logit).unsqueeze(-1)  # [B, T, 1]: share of the phase-1 sources
        h = partial32 + weight * (mixture - partial32)
    return h.to(partial.dtype)
