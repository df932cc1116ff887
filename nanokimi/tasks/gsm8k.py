"""GSM8K from a local jsonl ({"question", "answer"}, the reference after "####").

Strict extraction reads the number after the first "####" in the response; flexible falls back to the
last number in the response when there is none. Commas, "$" and a trailing "." are stripped; numbers
compare by value (18 == 18.00).
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nanokimi.tasks.base import Example, Task, TaskError

NUMBER = r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s*\.\d+"
STRICT = re.compile(r"####\s*(" + NUMBER + ")")
ANY_NUMBER = re.compile(NUMBER)
CALCULATOR = re.compile(r"<<[^<>]*>>")


def canonical_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '-0.0' -> '0', '18.00' -> '18'; None if `text` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    if value == 0:
        return "0"
    return format(value, "f")


def extract_strict(response: str) -> str | None:
    match = STRICT.search(response)
    return canonical_number(match.group(1)) if match else None


def extract_flexible(response: str) -> str | None:
    strict = extract_strict(response)
    if strict is not None:
        return strict
    numbers = ANY_NUMBER.findall(response)
    return canonical_number(numbers[-1]) if numbers else None


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{line_no}: not valid JSON ({e.msg}).") from None
            missing = [name for name in fields if name not in row]
            if missing:
                raise TaskError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}.")
            rows.append(row)
    return rows


def split_file(path: str | Path | None, split: str, task: str) -> Path:
    """A jsonl file, or a folder holding SPLIT.jsonl. The test split is the file itself when given a file;
    the train split (few-shot examples) is train.jsonl beside it."""
    if path is None:
        raise TaskError(f"{task} reads a local jsonl: pass path= (CLI: --data PATH), "
                        f"e.g. --data data/{task}/test.jsonl.")
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    elif split != "test":
        path = path.with_name(f"{split}.jsonl")
    if not path.is_file():
        raise TaskError(f"{task}: {path} does not exist; pass a jsonl file or a folder holding {split}.jsonl.")
    return path


class GSM8K(Task):
    name = "gsm8k"
    stop = ("\n\nQuestion:", "\n\n\n")
    instruction = "Solve the problem step by step. End with a line '#### N' where N is the final number."

    def __init__(self, path: str | Path | None = None, mode: str = "flexible", few_shot: int = 0):
        super().__init__(few_shot)
        if mode not in ("strict", "flexible"):
            raise TaskError(f"gsm8k mode must be 'strict' or 'flexible', got {mode!r}.")
        self.path, self.mode = path, mode
        if path is not None:
            split_file(path, "test", self.name)

    def _load(self, split: str) -> list[Example]:
        path = split_file(self.path, split, self.name)
        examples = []
        for i, row in enumerate(read_jsonl(path, ("question", "answer"))):
            solution = CALCULATOR.sub("", row["answer"])
            answer = solution.rsplit("####", 1)[-1].strip()
            if canonical_number(answer) is None:
                raise TaskError(f"{path}: row {i + 1} has no number after '####' in its answer.")
            examples.append(Example(id=f"{split}/{i}", question=row["question"], answer=answer, solution=solution))
        return examples

    def format_question(self, example: Example) -> str:
        return f"Question: {example.question}\nAnswer:"

    def format_solution(self, example: Example) -> str:
        return " " + example.solution

    def extract(self, response: str) -> str | None:
        return extract_strict(response) if self.mode == "strict" else extract_flexible(response)

    def answers_match(self, extracted: str, answer: str) -> bool:
        return extracted == canonical_number(answer)
