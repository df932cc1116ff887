"""Reasoning ladder: arithmetic over a random DAG of n operations (+, -, * on small integers), n = 1..20.

A problem (n = 3) and its trace, one operation per line:

    prompt                    trace
    k = 4                     w = 4 + 7 = 11
    p = 7                     c = 11 * 4 = 44
    w = k + p                 q = 44 - 7 = 37
    c = w * k                 #### 37
    q = c - p
    question: q

Every operation feeds the asked variable (each one consumes the previous result, its other operand is
a fresh constant or any earlier variable), so solving it takes all n steps: difficulty = n. Values stay
within +-max_value. Problems are generated from (seed, split, n, index) and are the same on every machine.
"""
from __future__ import annotations

import random
import re
import string

from nanokimi.tasks.base import Example, GeneratedTask, TaskError
from nanokimi.tasks.gsm8k import canonical_number

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
ANSWER = re.compile(r"####\s*(-?\d+)")
SINGLE = list(string.ascii_lowercase)
DOUBLE = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]


def parse_levels(levels: str | int | list[int] | range) -> list[int]:
    """'1-8' / '1,3,5' / 4 / [1, 2] -> sorted list of levels within 1..20."""
    if isinstance(levels, int):
        out = [levels]
    elif isinstance(levels, str):
        out = []
        try:
            for part in levels.split(","):
                low, _, high = part.strip().partition("-")
                out += range(int(low), int(high or low) + 1)
        except ValueError:
            raise TaskError(f"levels must look like '1-8' or '1,3,5', got {levels!r}.") from None
    else:
        out = list(levels)
    if not out or any(not 1 <= n <= 20 for n in out):
        raise TaskError(f"ladder levels must lie in 1..20, got {levels!r}.")
    return sorted(set(out))


def make_problem(rng: random.Random, n: int, max_value: int = 99, max_leaf: int = 9) -> dict:
    """{"lines": problem lines, "question": var, "steps": [(var, x, op, y, value)], "answer": int}."""
    names = iter(rng.sample(SINGLE if 2 * n + 1 <= len(SINGLE) else DOUBLE, 2 * n + 1))
    values: dict[str, int] = {}
    lines, steps = [], []

    def fits(op: str, a: int, b: int) -> bool:
        return abs(OPS[op](a, b)) <= max_value and abs(OPS[op](b, a)) <= max_value

    def add_leaf(value: int) -> str:
        name = next(names)
        values[name] = value
        lines.append(f"{name} = {value}")
        return name

    last = None
    for _ in range(n):
        first = last if last is not None else add_leaf(rng.randint(1, max_leaf))
        earlier = [name for name in values if name != first]
        other, allowed = None, []
        for _try in range(8):
            use_earlier = earlier and rng.random() < 0.5
            candidate = rng.choice(earlier) if use_earlier else rng.randint(1, max_leaf)
            value = values[candidate] if use_earlier else candidate
            allowed = [op for op in OPS if fits(op, values[first], value)]
            if allowed:
                other = candidate
                break
        if other is None:  # a fresh constant always fits + or -, as |first| <= max_value
            other = rng.randint(1, max_leaf)
            allowed = [op for op in "+-" if fits(op, values[first], other)]
        if isinstance(other, int):
            other = add_leaf(other)
        op = rng.choice(allowed)
        x, y = (first, other) if rng.random() < 0.5 else (other, first)
        name = next(names)
        values[name] = OPS[op](values[x], values[y])
        lines.append(f"{name} = {x} {op} {y}")
        steps.append((name, values[x], op, values[y], values[name]))
        last = name
    return {"lines": lines, "question": last, "steps": steps, "answer": values[last]}


def evaluate_problem(text: str) -> int:
    """Recompute the asked value from a problem's text (independent of the generator)."""
    env: dict[str, int] = {}
    question = None
    for line in text.strip().splitlines():
        if line.startswith("question:"):
            question = line.split(":", 1)[1].strip()
            continue
        name, expr = (part.strip() for part in line.split("=", 1))
        tokens = expr.split()
        if len(tokens) == 1:
            env[name] = int(tokens[0])
        else:
            x, op, y = tokens
            env[name] = OPS[op](env[x], env[y])
    if question is None:
        raise ValueError("no 'question:' line")
    return env[question]


class Ladder(GeneratedTask):
    name = "ladder"
    stop = ("\n\n",)
    instruction = "Compute the value of the asked variable, one operation per line, and end with '#### N'."

    def __init__(self, levels="1-20", per_level: int = 50, seed: int = 0, max_value: int = 99, few_shot: int = 0):
        super().__init__(few_shot)
        if per_level < 1 or max_value < 9:
            raise TaskError(f"ladder needs per_level >= 1 and max_value >= 9, got {per_level} and {max_value}.")
        self.levels, self.per_level, self.seed, self.max_value = parse_levels(levels), per_level, seed, max_value

    def generate(self, split: str, level: int, index: int) -> Example:
        rng = random.Random(f"ladder:{self.seed}:{split}:{level}:{index}")
        problem = make_problem(rng, level, self.max_value)
        question = "\n".join(problem["lines"]) + f"\nquestion: {problem['question']}\n"
        trace = "".join(f"{name} = {x} {op} {y} = {value}\n" for name, x, op, y, value in problem["steps"])
        return Example(id=f"{split}/{level}/{index}", question=question, answer=str(problem["answer"]),
                       solution=trace + f"#### {problem['answer']}", difficulty=level)

    def extract(self, response: str) -> str | None:
        match = ANSWER.search(response)
        return str(int(match.group(1))) if match else None

    def answers_match(self, extracted: str, answer: str) -> bool:
        return extracted == canonical_number(answer)
