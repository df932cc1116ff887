import random

import pytest

from nanokimi.serve.admission import Admission, StepTimeModel


def fitted(c0=0.004, cp=2e-5, cd=3e-4, noise=0.0, n=300) -> StepTimeModel:
    rng = random.Random(0)
    model = StepTimeModel()
    for _ in range(n):
        p, d = rng.choice([0, 0, 64, 512, 2000]), rng.randint(0, 64)
        model.observe(p, d, (c0 + cp * p + cd * d) * (1 + noise * rng.uniform(-1, 1)))
    return model


def test_step_model_recovers_its_coefficients():
    c0, cp, cd = fitted().coefficients()
    assert c0 == pytest.approx(0.004, rel=1e-6) and cp == pytest.approx(2e-5, rel=1e-6)
    assert cd == pytest.approx(3e-4, rel=1e-6)
    noisy = fitted(noise=0.1).coefficients()
    assert noisy[1] == pytest.approx(2e-5, rel=0.1) and noisy[2] == pytest.approx(3e-4, rel=0.2)


def test_no_samples_means_admit_everything():
    admission = Admission(0.001, 0.001, 2048, StepTimeModel())
    assert admission.decide(10_000, 10_000, [100] * 50, 10).admit


def test_ttft_prediction_counts_queued_prefill_and_rejects_past_the_slo():
    admission = Admission(ttft_slo_s=0.2, tbt_slo_s=None, step_tokens=2048, model=fitted())
    ttft, _, steps = admission.predict(1000, 0, [], 0)
    assert steps == 1 and ttft == pytest.approx(0.004 + 2e-5 * 1000)
    ttft, _, steps = admission.predict(1000, 5000, [], 3)  # 6000 tokens ahead of the first token: 3 chunks
    assert steps == 3 and ttft == pytest.approx(3 * 0.004 + 2e-5 * 6000)
    assert admission.decide(1000, 0, [], 0).admit
    verdict = admission.decide(1000, 20_000, [], 10)
    assert not verdict.admit and verdict.reason == "ttft" and verdict.retry_after_s >= 1


def test_tbt_uses_the_decode_batch_when_the_prefill_finishes():
    admission = Admission(ttft_slo_s=None, tbt_slo_s=0.0045 + 3e-4 * 10, step_tokens=256, model=fitted())
    _, tbt, steps = admission.predict(100, 0, [1] * 40 + [50] * 9, 0)
    assert steps == 1  # the 40 almost-done sequences are gone by then: 9 left + this one
    assert tbt == pytest.approx(0.004 + 3e-4 * 10)
    assert admission.decide(100, 0, [1] * 40 + [50] * 9, 0).admit
    verdict = admission.decide(100, 0, [50] * 49, 0)
    assert not verdict.admit and verdict.reason == "tbt"
