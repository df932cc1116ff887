"""RL losses against hand-computed values on tiny batches, and gradients by finite differences."""
import math

import pytest
import torch

from nanokimi.post.rl.losses import (aggregate, grpo_loss, group_advantages, k15_loss, kl_estimate, length_penalty,
                                     sequence_logprobs, token_entropy, token_logprobs)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # [1, 2, 2]
    targets = torch.tensor([[1, 0]])
    assert torch.allclose(token_logprobs(logits, targets), torch.tensor([[math.log(0.75), math.log(0.5)]]))
    # temperature 2: softmax of [0, log 3]/2 = [1, sqrt 3]/(1 + sqrt 3)
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert token_logprobs(logits, targets, temperature=2.0)[0, 0].item() == pytest.approx(expected, rel=1e-6)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(token_entropy(logits), torch.tensor([[h, math.log(2.0)]]))
    mask = torch.tensor([[1.0, 0.0]])
    assert sequence_logprobs(token_logprobs(logits, targets), mask).item() == pytest.approx(math.log(0.75))


def test_group_advantages_with_and_without_std():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    assert torch.allclose(group_advantages(rewards, 2, std_normalize=False), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with_std = group_advantages(rewards, 2, std_normalize=True)
    assert torch.allclose(with_std, torch.tensor([0.5 / (0.5 ** 0.5 + 1e-6), -0.5 / (0.5 ** 0.5 + 1e-6), 0.0, 0.0]))


def test_k15_loss_hand_computed():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.2], [-0.3, 0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # sequence log-ratios 0.3 and -0.3
    loss, stats = k15_loss(logp, old, mask, torch.tensor([1.0, 0.0]), k=2, tau=0.5)
    # residuals: 1 - 0.5 - 0.5*0.3 = 0.35 ; 0 - 0.5 + 0.5*0.3 = -0.35 -> mean of squares 0.1225
    assert loss.item() == pytest.approx(0.1225, rel=1e-6)
    assert torch.allclose(stats["seq_log_ratio"], torch.tensor([0.3, -0.3]))


def test_k15_gradient_at_old_policy_is_scaled_policy_gradient():
    """At θ = θ_old the surrogate's gradient is -2τ (r - r̄) ∇log π: its sign follows the advantage."""
    logp = torch.zeros(4, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    loss, _ = k15_loss(logp, logp.detach(), mask, rewards, k=2, tau=0.3)
    loss.backward()
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    assert torch.allclose(logp.grad, -2 * 0.3 * centred[:, None] * mask / 4)


def test_grpo_loss_hand_computed_each_aggregation():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # per token: seq0 -min(1.5, 1.28) = -1.28, -1.0 ; seq1 -min(-0.5, -0.8) = 0.8, (masked)
    expected = {"token-mean": (-1.28 - 1.0 + 0.8) / 3, "seq-mean-token-mean": ((-1.28 - 1.0) / 2 + 0.8) / 2,
                "seq-mean-token-sum-norm": (-1.28 - 1.0 + 0.8) / (2 * 4)}
    for mode, value in expected.items():
        loss, stats = grpo_loss(logp, old, mask, adv, clip_low=0.2, clip_high=0.28, aggregation=mode, max_len=4)
        assert loss.item() == pytest.approx(value, rel=1e-5), mode
        assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, mask, adv, aggregation="mean")


def test_grpo_kl_term_and_estimators():
    logp = torch.full((1, 1), math.log(0.5))
    ref = torch.full((1, 1), math.log(0.25))
    l = math.log(0.5)  # log ρ = log π_ref - log π_θ
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(-l)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * l * l)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - l - 1)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logp, ref, "k4")
    loss, stats = grpo_loss(logp, logp, torch.ones(1, 1), torch.tensor([0.0]), ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 - l - 1), rel=1e-6)
    assert stats["kl_ref"].item() == pytest.approx(0.5 - l - 1, rel=1e-6)


def test_aggregate_shared_denominators_add_up():
    """Micro-batches that pass the whole batch's denominators sum to the whole batch's loss."""
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    mask[:, 0] = 1
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(loss, mask, mode, max_len=7)
        parts = sum(aggregate(loss[i:i + 2], mask[i:i + 2], mode, max_len=7, num_seqs=6, num_tokens=mask.sum())
                    for i in (0, 2, 4))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-5), mode


def test_length_penalty_hand_computed():
    lengths = torch.tensor([10, 20, 30, 5, 5, 5, 10, 20, 30])
    correct = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 0])
    # group 1: λ = 0.5, 0, -0.5 ; group 2: equal lengths -> 0 ; group 3 all wrong: min(0, λ)
    expected = 0.2 * torch.tensor([0.5, 0.0, -0.5, 0, 0, 0, 0.0, 0.0, -0.5])
    assert torch.allclose(length_penalty(lengths, correct, k=3, weight=0.2), expected)


def test_gradients_by_finite_differences():
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.1 - 1.0
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    logp = (old + 0.05 * torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: k15_loss(x, old, mask, rewards, k=2, tau=0.7)[0], (logp,))
    adv = group_advantages(rewards, 2)
    ref = old + 0.2
    assert torch.autograd.gradcheck(
        lambda x: grpo_loss(x, old, mask, adv, 0.2, 0.28, ref_logp=ref, kl_coef=0.3,
                            aggregation="seq-mean-token-mean")[0], (logp,))
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, temperature=0.7), (logits,))
