"""Which prompts to roll out next: a curriculum over difficulty (easy -> hard), prioritized sampling
(probability ∝ 1 - success rate, Kimi k1.5) and the bookkeeping dynamic sampling needs (DAPO: groups whose
rewards are all equal carry no signal, so they are dropped and more prompts drawn)."""
from __future__ import annotations

import random


class PromptSampler:
    """Draws examples (objects with `.id` and `.difficulty`) for RL.

    curriculum="linear": at step s only difficulties <= lowest + (highest - lowest) * min(1, s / curriculum_steps)
    are drawn (rounded down, at least the lowest). prioritized: weight 1 - success + floor per example, success
    being the share of correct samples seen so far for that example (unseen: 0). Otherwise uniform. The caller
    passes the random generator of each draw (the RL loop seeds one per step, round and rank), so the only state
    is the success counts (`state_dict` / `load_state_dict`)."""

    def __init__(self, examples: list, curriculum: str = "none", curriculum_steps: int = 100,
                 prioritized: bool = False, floor: float = 0.05):
        if not examples:
            raise ValueError("the RL prompt set is empty; check the task's levels and per_level.")
        if curriculum not in ("none", "linear"):
            raise ValueError(f"rl.curriculum={curriculum!r} must be 'none' or 'linear'.")
        if curriculum_steps < 1:
            raise ValueError(f"rl.curriculum_steps must be >= 1, got {curriculum_steps}.")
        self.examples = list(examples)
        self.curriculum, self.curriculum_steps = curriculum, curriculum_steps
        self.prioritized, self.floor = prioritized, floor
        self.seen: dict[str, list[int]] = {}  # id -> [correct, total]
        levels = sorted({e.difficulty for e in self.examples if e.difficulty is not None})
        self.levels = levels
        self.by_id = {e.id: e for e in self.examples}

    def max_difficulty(self, step: int):
        if self.curriculum == "none" or not self.levels:
            return None
        share = min(1.0, step / self.curriculum_steps)
        return self.levels[0] + int((self.levels[-1] - self.levels[0]) * share)

    def candidates(self, step: int) -> list:
        top = self.max_difficulty(step)
        if top is None:
            return self.examples
        return [e for e in self.examples if e.difficulty is None or e.difficulty <= top]

    def success_rate(self, example) -> float:
        correct, total = self.seen.get(example.id, (0, 0))
        return correct / total if total else 0.0

    def weight(self, example) -> float:
        return 1.0 - self.success_rate(example) + self.floor if self.prioritized else 1.0

    def sample(self, count: int, step: int, rng: random.Random) -> list:
        """`count` examples, drawn with replacement from the step's candidates by weight."""
        pool = self.candidates(step)
        return rng.choices(pool, weights=[self.weight(e) for e in pool], k=count)

    def update(self, example_id: str, correct: list[bool]) -> None:
        entry = self.seen.setdefault(example_id, [0, 0])
        entry[0] += sum(bool(c) for c in correct)
        entry[1] += len(correct)

    def state_dict(self) -> dict:
        return {"seen": {k: list(v) for k, v in self.seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {k: list(v) for k, v in state["seen"].items()}


def informative(rewards: list[float]) -> bool:
    """A group carries signal when its rewards are not all equal (dynamic sampling keeps only those)."""
    return max(rewards) - min(rewards) > 1e-9
