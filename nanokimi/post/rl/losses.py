"""RL objectives as pure tensor functions (DESIGN §7): log-probs, advantages, Kimi k1.5's mirror-descent
surrogate, the GRPO clipped objective, KL estimators, loss aggregation and Kimi k1.5's length penalty.

Shapes: B responses (G groups of k samples, group-major: rows g*k .. g*k+k-1 share a prompt), T token
positions of the response (padded), V vocabulary. `mask` [B, T] is 1 on the tokens that enter the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target_t | context) under softmax(logits / temperature): logits [B, T, V], targets [B, T] -> [B, T]."""
    logp = F.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)  # [B, T, V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position: [B, T, V] -> [B, T] (nats)."""
    logp = F.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = sum of the masked token log-probs: [B, T] -> [B]."""
    return (token_logp * mask).sum(-1)


def group_advantages(rewards: torch.Tensor, k: int, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_j = r_j - mean_group(r), divided by the group's std (unbiased, + eps) when std_normalize: [B] -> [B]."""
    grouped = rewards.view(-1, k)  # [G, k]
    centred = grouped - grouped.mean(-1, keepdim=True)
    if std_normalize:
        std = grouped.std(-1, keepdim=True) if k > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π_θ || π_ref) from tokens sampled by π_θ, with log ρ = log π_ref - log π_θ:
    k1 = -log ρ, k2 = ½ (log ρ)², k3 = ρ - log ρ - 1 (Schulman's estimators). [B, T] -> [B, T]."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kl estimator {kind!r} must be one of {', '.join(KL_ESTIMATORS)}.")


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
              num_seqs: float | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean (DAPO): Σ loss·mask / Σ mask; seq-mean-token-mean (GRPO): mean over responses of each
    response's token mean; seq-mean-token-sum-norm (Dr. GRPO): Σ loss·mask / (B · max_len), max_len a
    constant (default T). num_seqs / num_tokens replace B and Σ mask as denominators, so micro-batches
    and ranks can share the whole batch's denominators (their losses then add up to the batch's loss).
    """
    masked = token_loss * mask
    if mode == "token-mean":
        return masked.sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)
    seqs = mask.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (seqs * (mask.shape[1] if max_len is None else max_len))
    raise ValueError(f"loss aggregation {mode!r} must be one of {', '.join(AGGREGATIONS)}.")


def k15_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, k: int,
             tau: float, num_seqs: float | None = None) -> tuple[torch.Tensor, dict]:
    """Kimi k1.5's policy mirror descent surrogate: mean over responses of
    (r_j - mean_group(r) - τ · log(π_θ(y_j|x) / π_old(y_j|x)))², with sequence log-probs (masked sums).

    logp, old_logp, mask [B, T]; rewards [B]. Its gradient at θ = θ_old is -2τ (r - r̄) ∇log π_θ(y|x):
    the policy gradient with a mean baseline, scaled by 2τ. num_seqs: the mean's denominator (default B)."""
    seq_log_ratio = sequence_logprobs(logp - old_logp, mask)  # [B]
    baseline = rewards.view(-1, k).mean(-1, keepdim=True).expand(-1, k).reshape(-1)  # [B]
    residual = rewards - baseline - tau * seq_log_ratio
    loss = (residual ** 2).sum() / (rewards.shape[0] if num_seqs is None else num_seqs)
    return loss, {"seq_log_ratio": seq_log_ratio.detach()}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: torch.Tensor | None = None,
              kl_coef: float = 0.0, kl_estimator: str = "k3", aggregation: str = "token-mean",
              max_len: int | None = None, num_seqs: float | None = None,
              num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate with per-sequence advantages [B] broadcast over tokens:
    per token -min(ρ_t A, clip(ρ_t, 1 - clip_low, 1 + clip_high) A) + kl_coef · KL_t(π_θ || π_ref),
    ρ_t = π_θ / π_old; then `aggregate`. Returns (loss, stats) with the clipped share and mean KL (masked)."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    token_loss = -torch.minimum(unclipped, clipped)  # [B, T]
    stats = {}
    count = mask.sum().clamp(min=1)
    with torch.no_grad():
        stats["clip_fraction"] = ((clipped < unclipped).float() * mask).sum() / count
    if ref_logp is not None and kl_coef > 0:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        token_loss = token_loss + kl_coef * kl
        stats["kl_ref"] = (kl.detach() * mask).sum() / count
    loss = aggregate(token_loss, mask, aggregation, max_len, num_seqs, num_tokens)
    return loss, stats


def length_penalty(lengths: torch.Tensor, correct: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """Kimi k1.5's length reward per group of k: λ_j = 0.5 - (len_j - min)/(max - min) (0 when all lengths are
    equal); correct responses get weight·λ_j, wrong ones weight·min(0, λ_j). lengths, correct [B] -> [B]."""
    grouped = lengths.float().view(-1, k)  # [G, k]
    low, high = grouped.min(-1, keepdim=True).values, grouped.max(-1, keepdim=True).values
    span = high - low
    lam = torch.where(span > 0, 0.5 - (grouped - low) / span.clamp(min=1e-12), torch.zeros_like(grouped))
    lam = lam.reshape(-1)
    return weight * torch.where(correct.bool(), lam, lam.clamp(max=0))
