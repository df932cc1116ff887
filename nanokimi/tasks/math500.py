"""MATH-500 from a local jsonl ({"problem", "solution", "answer", "level", ...}).

The response's answer is its last \\boxed{...} (balanced braces). Answers compare in three steps:
normalised strings (\\dfrac -> \\frac, \\left/\\right, units, degrees, spaces, \\frac12, x = 3 -> 3,
thousands commas), then element by element for tuples, intervals and lists, then symbolic equality
through sympy in a worker process with a hard time limit (a hostile expression such as 9^{9^{9^{9}}}
is killed, and counts as not equal).
"""
from __future__ import annotations

import re
from pathlib import Path

from nanokimi.tasks.base import Example, Task
from nanokimi.tasks.gsm8k import read_jsonl, split_file
from nanokimi.tasks.sympy_worker import latex_argument, sympy_equal

MAX_SYMPY_CHARS = 400
MAX_NORMALIZE_CHARS = 2000  # longer "answers" are compared as stripped strings only (no recursive rewriting)
BOXED = re.compile(r"\\(?:boxed|fbox)")
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf|textit)\s*\{([^{}]*)\}")
UNIT_WORDS = {
    "cm", "m", "km", "mm", "in", "inch", "inches", "ft", "foot", "feet", "yard", "yards", "mile", "miles",
    "meter", "meters", "metre", "metres", "centimeter", "centimeters", "unit", "units", "sq", "square",
    "degree", "degrees", "cent", "cents", "dollar", "dollars", "hour", "hours", "minute", "minutes",
    "second", "seconds", "day", "days", "week", "weeks", "year", "years", "mph", "pound", "pounds", "kg",
    "g", "gram", "grams", "liter", "liters", "ml", "people", "students", "ways", "points", "percent",
}


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (braces balanced), or of `\\boxed 5`; None if absent
    or unclosed. Linear in len(text): braces are matched once with a stack."""
    starts = [m.end() for m in BOXED.finditer(text)]
    if not starts:
        return None
    closing, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            stack.append(i)
        elif ch == "}" and stack and text[i - 1] != "\\":
            closing[stack.pop()] = i
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1:closing[i]]
            continue
        match = re.match(r"[^\s$]+", text[i:i + 200])
        if match and i > start:
            return match.group(0)
    return None


def _brace_fractions(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \sqrt2 -> \sqrt{2}."""
    out, i = [], 0
    while i < len(s):
        for command, arity in (("\\frac", 2), ("\\sqrt", 1)):
            if s.startswith(command, i) and not s[i + len(command):i + len(command) + 1].isalpha():
                j = i + len(command)
                out.append(command)
                if command == "\\sqrt" and j < len(s) and s[j] == "[":
                    close = s.find("]", j)
                    close = len(s) - 1 if close < 0 else close
                    out.append(s[j:close + 1])
                    j = close + 1
                for _ in range(arity):
                    arg, j = latex_argument(s, j, strict=False)
                    out.append("{" + _brace_fractions(arg) + "}")
                i = j
                break
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def normalize(answer: str) -> str:
    """A canonical string for an answer; equal strings are equal answers."""
    s = answer.strip()
    if len(s) > MAX_NORMALIZE_CHARS:
        return s
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"(\S)\s*\\(?:text|mbox|mathrm)\s*\{\s*([a-zA-Z ]+)\}(\^\d)?",
               lambda m: m.group(1) if all(w.lower() in UNIT_WORDS for w in m.group(2).split()) else m.group(0), s)
    s = TEXT_COMMAND.sub(r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*(?:=|\\in)\s*", "", s) if s.count("=") <= 1 else s
    s = s.replace("\\infty", "\\infty ").replace(" ", "")
    s = _brace_fractions(s)
    s = s.rstrip(".").replace("\\{", "{").replace("\\}", "}")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")
    return s


def split_top_level(s: str, separator: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            start = i + len(separator)
    return parts + [s[start:]]


def _elements(s: str) -> tuple[str, list[str], bool] | None:
    """'(1,2]' -> ('(]', ['1', '2'], ordered=True); '3,5,7' -> ('', [...], ordered=False); None if atomic."""
    if "\\cup" in s:
        return "cup", split_top_level(s, "\\cup"), False
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and _closes_at_end(s):
        inner = split_top_level(s[1:-1])
        if len(inner) > 1 or s[0] == "{":
            return s[0] + s[-1], inner, s[0] != "{"
    parts = split_top_level(s)
    return ("", parts, False) if len(parts) > 1 else None


def _closes_at_end(s: str) -> bool:
    depth = 0
    for i, ch in enumerate(s):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def equivalent(given: str, reference: str, timeout: float = 3.0) -> bool:
    """Whether two answers (without \\boxed) are equal: normalised strings, then elementwise, then sympy."""
    a, b = normalize(given), normalize(reference)
    if a == b:
        return True
    if not a or not b:
        return False
    a_parts, b_parts = _elements(a), _elements(b)
    if a_parts is not None or b_parts is not None:
        if a_parts is None or b_parts is None:
            return False
        (a_kind, a_items, ordered), (b_kind, b_items, _) = a_parts, b_parts
        if a_kind != b_kind or len(a_items) != len(b_items):
            return False
        if ordered:
            return all(equivalent(x, y, timeout) for x, y in zip(a_items, b_items))
        remaining = list(b_items)
        for x in a_items:
            match = next((y for y in remaining if equivalent(x, y, timeout)), None)
            if match is None:
                return False
            remaining.remove(match)
        return True
    if len(a) > MAX_SYMPY_CHARS or len(b) > MAX_SYMPY_CHARS:
        return False
    return sympy_equal(a, b, timeout)


class Math500(Task):
    name = "math500"
    stop = ("\n\nProblem:",)
    instruction = "Solve the problem. Put the final answer in \\boxed{}."

    def __init__(self, path: str | Path | None = None, few_shot: int = 0, timeout: float = 3.0):
        super().__init__(few_shot)
        self.path, self.timeout = path, timeout
        if path is not None:
            split_file(path, "test", self.name)

    def _load(self, split: str) -> list[Example]:
        path = split_file(self.path, split, self.name)
        return [Example(id=row.get("unique_id", f"{split}/{i}"), question=row["problem"], answer=row["answer"],
                        solution=row.get("solution", ""), difficulty=row.get("level"),
                        meta={"subject": row.get("subject")})
                for i, row in enumerate(read_jsonl(path, ("problem", "answer")))]

    def format_question(self, example: Example) -> str:
        return f"Problem: {example.question}\nSolution:"

    def format_solution(self, example: Example) -> str:
        return " " + (example.solution or f"The answer is $\\boxed{{{example.answer}}}$.")

    def extract(self, response: str) -> str | None:
        boxed = last_boxed(response)
        return None if boxed is None else normalize(boxed)

    def answers_match(self, extracted: str, answer: str) -> bool:
        return equivalent(extracted, answer, self.timeout)
