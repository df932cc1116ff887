"""Tasks with answers a program can check: prompts, reference answers, graders, pass@k.

    from nanokimi.tasks import get_task, pass_at_k
    task = get_task("gsm8k", path="data/gsm8k/test.jsonl")     # or "math500" (path=), "ladder", "mused"
    task.is_correct(response, example.answer); task.reward(response, example.answer)

This package imports no torch: graders and generators are cheap to use from RL reward code. The
evaluation runner that generates with a model is `nanokimi.tasks.evaluate`.
"""
import inspect

from nanokimi.tasks.base import Example, Task, TaskError
from nanokimi.tasks.metrics import maj_at_k, majority_vote, pass_at_k, summarize

TASKS = ("gsm8k", "math500", "ladder", "mused")


def get_task(name: str, **options) -> Task:
    """A task by name with its options (path= for gsm8k and math500; levels=, per_level=, seed= for ladder;
    levels= (depths), per_level=, distractors=, mode=, seed= for mused; few_shot= for all)."""
    if name == "gsm8k":
        from nanokimi.tasks.gsm8k import GSM8K as cls
    elif name == "math500":
        from nanokimi.tasks.math500 import Math500 as cls
    elif name == "ladder":
        from nanokimi.tasks.ladder import Ladder as cls
    elif name == "mused":
        from nanokimi.tasks.mused import MuseD as cls
    else:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [key for key in options if key not in known]
    if unknown:
        raise TaskError(f"{name} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(known)}.")
    try:
        return cls(**options)
    except TypeError as e:
        raise TaskError(f"{name}: {e}") from None


__all__ = ["Example", "TASKS", "Task", "TaskError", "get_task", "maj_at_k", "majority_vote", "pass_at_k", "summarize"]
