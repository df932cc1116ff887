"""The Task interface: examples with a reference answer, prompts, and a grader.

Pure Python (no torch): RL reward code and lm-eval import this cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class TaskError(ValueError):
    """Bad task input (unknown task, missing data file, bad option); the CLI prints it in one line."""


@dataclass(frozen=True)
class Example:
    """One problem. `answer` is the reference the grader compares against; `solution` is a worked
    solution ending in the answer (used for few-shot prefixes and SFT text) or "" when there is none."""
    id: str
    question: str
    answer: str
    solution: str = ""
    difficulty: int | None = None
    meta: dict = field(default_factory=dict, compare=False)


class Task:
    """A task with answers a program can check.

        task = get_task("ladder", levels="1-8")
        ex = task.examples(split="test", limit=10)[0]
        task.prompt(ex)                    # text prompt (with the few-shot prefix, if any)
        task.messages(ex)                  # the same as chat messages
        task.is_correct(response, ex.answer), task.reward(response, ex.answer)

    Subclasses set `name`, `stop` (strings that end a response) and implement `_load`, `format_question`,
    `extract` and `answers_match`.
    """

    name = "task"
    stop: tuple[str, ...] = ()
    instruction = ""

    def __init__(self, few_shot: int = 0):
        if few_shot < 0:
            raise TaskError(f"few_shot must be >= 0, got {few_shot}.")
        self.few_shot = few_shot
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str = "test", limit: int | None = None) -> list[Example]:
        if limit is not None and limit < 1:
            raise TaskError(f"limit must be >= 1, got {limit}.")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        items = self._cache[split]
        return items if limit is None else items[:limit]

    def _load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def format_question(self, example: Example) -> str:
        """The problem as the model reads it, ending where its answer starts."""
        raise NotImplementedError

    def format_solution(self, example: Example) -> str:
        """The text a correct model writes after the prompt (no trailing stop string)."""
        return example.solution

    def few_shot_prefix(self) -> str:
        if self.few_shot == 0:
            return ""
        shots = self.examples("train", limit=self.few_shot)
        if len(shots) < self.few_shot:
            raise TaskError(f"{self.name}: few_shot={self.few_shot} but the train split has {len(shots)} examples.")
        return "".join(self.format_question(s) + self.format_solution(s) + "\n\n" for s in shots)

    def prompt(self, example: Example) -> str:
        return self.few_shot_prefix() + self.format_question(example)

    def messages(self, example: Example) -> list[dict]:
        """Chat form: worked examples as earlier turns, then the question with the answer-format instruction."""
        turns = []
        if self.few_shot:
            for shot in self.examples("train", limit=self.few_shot):
                turns += [{"role": "user", "content": f"{self.instruction}\n\n{shot.question}".strip()},
                          {"role": "assistant", "content": self.format_solution(shot)}]
        return turns + [{"role": "user", "content": f"{self.instruction}\n\n{example.question}".strip()}]

    def sft_text(self, example: Example) -> str:
        """Prompt (without few-shot prefix) followed by the worked solution: one training document."""
        return self.format_question(example) + self.format_solution(example)

    def extract(self, response: str) -> str | None:
        """The answer stated in a response, in a canonical form usable as a vote key; None if there is none."""
        raise NotImplementedError

    def answers_match(self, extracted: str, answer: str) -> bool:
        raise NotImplementedError

    def grade(self, response: str, answer: str) -> tuple[str | None, bool, float]:
        """(extracted answer or None, correct, reward) in one pass; the reward is 1.0 for a correct final
        answer and 0.0 otherwise. A task that shapes its reward overrides this."""
        extracted = self.extract(response)
        correct = extracted is not None and self.answers_match(extracted, answer)
        return extracted, correct, float(correct)

    def is_correct(self, response: str, answer: str) -> bool:
        return self.grade(response, answer)[1]

    def reward(self, response: str, answer: str) -> float:
        return self.grade(response, answer)[2]


class GeneratedTask(Task):
    """A task whose problems are generated from (seed, split, level, index): `levels` and `per_level` fix the
    evaluation set; `export` writes as many training problems as asked, none of them in the test split."""

    levels: list[int]
    per_level: int

    def generate(self, split: str, level: int, index: int) -> Example:
        raise NotImplementedError

    def _load(self, split: str) -> list[Example]:
        return [self.generate(split, level, i) for i in range(self.per_level) for level in self.levels]

    def format_question(self, example: Example) -> str:
        return example.question

    def export(self, count: int, split: str = "train", exclude_split: str | None = "test"):
        """Yield `count` examples spread evenly over the levels, skipping any whose question also occurs in
        `exclude_split` (so the test set stays unseen by a model trained on them)."""
        held_out = {e.question for e in self.examples(exclude_split)} if exclude_split else set()
        made, index = 0, 0
        while made < count:
            for level in self.levels:
                example = self.generate(split, level, index)
                if example.question not in held_out and made < count:
                    made += 1
                    yield example
            index += 1
            if index > 100 * count + 1000:
                raise TaskError(f"{self.name}: could not find {count} training problems outside the test split; "
                                "lower the count or use higher levels.")
