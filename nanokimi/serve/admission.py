"""Mooncake-style admission: predict a request's TTFT and TBT from a measured step-time model and refuse it
(429) before any prefill work is spent when either would miss its SLO.

The engine runs one batched forward per step (chunked prefill tokens + one token per decoding sequence), so
a step's time is modelled as

    step_seconds ≈ c0 + c_prefill * prefill_tokens + c_decode * decode_seqs

fit by least squares over the last few hundred measured steps. For a new request with U uncached prompt
tokens behind Q uncached tokens already queued, while B sequences decode:

    steps  = ceil((Q + U) / (step_tokens - B))          prefill chunks until its first token
    TTFT   ≈ (steps + 1) * (c0 + c_decode * B) + c_prefill * (Q + U)     (+1: the step in flight)
    TBT    ≈ c0 + c_decode * B_then

where B_then is the decode batch *when its prefill finishes* (Mooncake predicts load at that moment, not now):
the running sequences with more than `steps` tokens still to go, plus everything queued ahead, plus itself.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


class StepTimeModel:
    """Least-squares fit of step time against (prefill tokens, decoding sequences) over a sliding window."""

    def __init__(self, window: int = 512):
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None

    def observe(self, prefill_tokens: int, decode_seqs: int, seconds: float) -> None:
        """One step's work and wall time. A step 5x slower than predicted (a one-off such as a CUDA graph
        capture or a stalled machine) is left out once the window has 32 samples."""
        if prefill_tokens == 0 and decode_seqs == 0:
            return
        if len(self.samples) >= 32 and self.ready and seconds > 5 * self.predict(prefill_tokens, decode_seqs):
            return
        self.samples.append((float(prefill_tokens), float(decode_seqs), seconds))
        self._coef = None

    @property
    def ready(self) -> bool:
        return any(p > 0 for p, _, _ in self.samples) and any(d > 0 for _, d, _ in self.samples)

    def coefficients(self) -> tuple[float, float, float]:
        """(c0, c_prefill, c_decode) in seconds, each >= 0."""
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> tuple[float, float, float]:
        """Non-negative least squares over the three terms: the best fit among the subsets of terms whose
        unconstrained solution is non-negative (3 terms, so 7 small solves)."""
        data = np.array(self.samples, dtype=np.float64)  # [N, 3]: prefill, decode, seconds
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])  # [N, 3]
        best, best_err = (0.0, 0.0, 0.0), float("inf")
        for subset in ((0, 1, 2), (1, 2), (0, 1), (0, 2), (0,), (1,), (2,)):
            coef, *_ = np.linalg.lstsq(x[:, subset], data[:, 2], rcond=None)
            if (coef < 0).any():
                continue
            err = float(((x[:, subset] @ coef - data[:, 2]) ** 2).sum())
            if err < best_err:
                full = [0.0, 0.0, 0.0]
                for i, c in zip(subset, coef):
                    full[i] = float(c)
                best, best_err = tuple(full), err
        return best

    def predict(self, prefill_tokens: float, decode_seqs: float) -> float:
        c0, cp, cd = self.coefficients()
        return c0 + cp * prefill_tokens + cd * decode_seqs


@dataclass
class Verdict:
    admit: bool
    ttft_s: float          # predicted
    tbt_s: float           # predicted
    reason: str = ""       # "ttft" | "tbt" when refused
    retry_after_s: int = 0


@dataclass
class Admission:
    """SLOs in seconds (None: never refuse for that reason). `step_tokens` is the engine's token budget per step."""
    ttft_slo_s: float | None
    tbt_slo_s: float | None
    step_tokens: int
    model: StepTimeModel
    headroom: float = 1.0  # a prediction must fit in this fraction of the SLO (room for prediction error)

    def predict(self, uncached_tokens: int, queued_tokens: int, remaining_decode_steps: list[int],
                queued_requests: int) -> tuple[float, float, int]:
        """(TTFT seconds, TBT seconds, prefill steps) for a request arriving now.

        remaining_decode_steps: tokens still to generate for each running sequence (at most: max_tokens - done).
        """
        batch_now = len(remaining_decode_steps)
        prefill = queued_tokens + uncached_tokens
        per_step = max(self.step_tokens - batch_now, 1)
        steps = max(math.ceil(prefill / per_step), 1)
        c0, cp, cd = self.model.coefficients()
        ttft = (steps + 1) * (c0 + cd * batch_now) + cp * prefill  # + the step in flight when it arrives
        batch_then = sum(1 for left in remaining_decode_steps if left > steps) + queued_requests + 1
        tbt = c0 + cd * batch_then
        return ttft, tbt, steps

    def decide(self, uncached_tokens: int, queued_tokens: int, remaining_decode_steps: list[int],
               queued_requests: int) -> Verdict:
        if not self.model.ready or (self.ttft_slo_s is None and self.tbt_slo_s is None):
            return Verdict(True, 0.0, 0.0)
        ttft, tbt, _ = self.predict(uncached_tokens, queued_tokens, remaining_decode_steps, queued_requests)
        if self.ttft_slo_s is not None and ttft > self.headroom * self.ttft_slo_s:
            queue_drain = ttft - self.model.predict(uncached_tokens, 0)
            return Verdict(False, ttft, tbt, "ttft", max(1, math.ceil(queue_drain)))
        if self.tbt_slo_s is not None and tbt > self.headroom * self.tbt_slo_s:
            longest = max(remaining_decode_steps, default=1)
            return Verdict(False, ttft, tbt, "tbt", max(1, math.ceil(longest * tbt)))
        return Verdict(True, ttft, tbt)
