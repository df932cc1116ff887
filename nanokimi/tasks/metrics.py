"""pass@k, maj@k and the per-level summary of graded samples. Pure Python."""
from __future__ import annotations

from collections import Counter

from nanokimi.tasks.base import TaskError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the (huge) binomials."""
    if not 0 <= c <= n or n < 1:
        raise TaskError(f"pass@k needs 0 <= c <= n and n >= 1, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise TaskError(f"pass@k needs 1 <= k <= n (samples per problem); got k={k} with n={n}. "
                        f"Lower k or sample more (--n).")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_vote(keys: list[str | None]) -> str | None:
    """The most common non-None key; ties go to the one seen first. None if every key is None."""
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(key for key in keys if key is not None and counts[key] == best)


def maj_at_k(keys: list[str | None], correct: list[bool], k: int) -> float:
    """Share of the n // k disjoint groups of k consecutive samples whose majority answer is correct."""
    if not 1 <= k <= len(keys):
        raise TaskError(f"maj@k needs 1 <= k <= n; got k={k} with n={len(keys)}.")
    right = {key for key, ok in zip(keys, correct) if ok and key is not None}
    groups = len(keys) // k
    return sum(majority_vote(keys[g * k:(g + 1) * k]) in right for g in range(groups)) / groups


def summarize(problems: list[dict], ks: list[int]) -> dict:
    """problems: [{"difficulty", "samples": [{"correct", "reward", "key", "num_tokens", "truncated"}]}]
    -> {"all": row, "levels": {level: row}}, each row with problems, pass@k, maj@k, mean reward/length,
    truncated share."""
    def row(group: list[dict]) -> dict:
        samples = [s for p in group for s in p["samples"]]
        out = {"problems": len(group), "samples": len(samples)}
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(len(p["samples"]), sum(s["correct"] for s in p["samples"]), k)
                                   for p in group) / len(group)
        for k in ks:
            out[f"maj@{k}"] = sum(maj_at_k([s["key"] for s in p["samples"]], [s["correct"] for s in p["samples"]], k)
                                  for p in group) / len(group)
        out["mean_reward"] = sum(s["reward"] for s in samples) / len(samples)
        out["mean_tokens"] = sum(s["num_tokens"] for s in samples) / len(samples)
        out["truncated"] = sum(s["truncated"] for s in samples) / len(samples)
        return out

    levels = sorted({p["difficulty"] for p in problems if p["difficulty"] is not None})
    return {"all": row(problems),
            "levels": {level: row([p for p in problems if p["difficulty"] == level]) for level in levels}}
