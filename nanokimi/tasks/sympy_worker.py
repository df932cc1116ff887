"""Symbolic equality of two normalised LaTeX answers, in a worker process with a hard time limit.

    sympy_equal("\\frac{1}{2}", "0.5", timeout=3.0) -> True

The worker is forked once and reused; a check that runs past `timeout` seconds kills it (the next check
starts a new one) and answers False, so an expression like 9^{9^{9^{9}}} cannot hang the grader.
LaTeX is translated by `latex_to_sympy_source` into a restricted expression language (numbers, one-letter
symbols, + - * / **, parentheses and a few named functions) before sympy parses it; anything else is
not compared symbolically.
"""
from __future__ import annotations

import multiprocessing
import re
import threading
import warnings

FUNCTIONS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "pi", "oo"}
COMMANDS = {"\\pi": " pi ", "\\infty": " oo ", "\\cdot": "*", "\\times": "*", "\\div": "/", "\\sin": " sin",
            "\\cos": " cos", "\\tan": " tan", "\\cot": " cot", "\\sec": " sec", "\\csc": " csc", "\\log": " log",
            "\\ln": " ln", "\\exp": " exp"}
STARTUP_TIMEOUT = 60.0


def latex_argument(s: str, i: int, strict: bool = True) -> tuple[str, int]:
    """The argument starting at s[i]: a {...} group or one character -> (contents, index after it). Unbalanced
    braces or a missing argument raise ValueError when strict; otherwise the group runs to the end of `s` and a
    missing argument is empty."""
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1:j], j + 1
        if strict:
            raise ValueError("unbalanced braces")
        return s[i + 1:], len(s)
    if i < len(s) or not strict:
        return s[i:i + 1], i + 1
    raise ValueError("missing argument")


def latex_to_sympy_source(s: str) -> str | None:
    r"""'\frac{1}{2}' -> '((1)/(2))', '2^{10}' -> '2**(10)', '3\sqrt{2}' -> '3 sqrt(2)'; None if `s` uses
    anything outside the small supported language (so it is never handed to sympy's parser)."""
    try:
        out = _translate(s)
    except ValueError:
        return None
    names = set(re.findall(r"[A-Za-z_]+", out))
    if any(len(name) > 1 and name not in FUNCTIONS for name in names) or "__" in out:
        return None
    if not re.fullmatch(r"[0-9A-Za-z_+\-*/(). ]*", out) or not out.strip():
        return None
    return out


def _translate(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = latex_argument(s, i + 5)
            den, i = latex_argument(s, i)
            out.append(f"(({_translate(num)})/({_translate(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            if i < len(s) and s[i] == "[":
                close = s.index("]", i)
                index, i = s[i + 1:close], close + 1
                radicand, i = latex_argument(s, i)
                out.append(f"(({_translate(radicand)})**(1/({_translate(index)})))")
            else:
                radicand, i = latex_argument(s, i)
                out.append(f" sqrt({_translate(radicand)})")
        elif s[i] == "^":
            exponent, i = latex_argument(s, i + 1)
            out.append(f"**({_translate(exponent)})")
        elif s[i] == "\\":
            match = re.match(r"\\[A-Za-z]+", s[i:])
            if not match or match.group(0) not in COMMANDS:
                raise ValueError(f"unsupported command at {s[i:i + 12]!r}")
            out.append(COMMANDS[match.group(0)])
            i += len(match.group(0))
        elif s[i] in "{}":
            out.append("(" if s[i] == "{" else ")")
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _parse(source: str):
    from sympy import E, Symbol, oo, pi
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    names = {name: Symbol(name) for name in set(re.findall(r"\b[A-Za-z]\b", source))}
    names.update({"pi": pi, "oo": oo, "e": E})
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(source, local_dict=names, transformations=transformations, evaluate=True)


def symbolic_equal(a_latex: str, b_latex: str) -> bool:
    """The check itself, run inside the worker (it may take unbounded time on hostile input)."""
    import sympy

    sources = [latex_to_sympy_source(a_latex), latex_to_sympy_source(b_latex)]
    if None in sources:
        return False
    try:
        a, b = (_parse(source) for source in sources)
    except Exception:  # noqa: BLE001 - any parse failure means "not comparable", not an error of the grader
        return False
    if not all(isinstance(x, sympy.Expr) for x in (a, b)):
        return False
    if a == b:
        return True
    if a.free_symbols or b.free_symbols:
        return sympy.simplify(a - b) == 0
    if a.is_infinite or b.is_infinite:
        return False
    a_value, b_value = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
    return abs(a_value - b_value) <= 1e-9 * max(1.0, abs(a_value), abs(b_value))


def _serve(connection) -> None:
    import sympy  # noqa: F401 - imported before "ready" so the first check's clock does not pay for it

    connection.send("ready")
    while True:
        try:
            a, b = connection.recv()
        except EOFError:
            return
        try:
            result = bool(symbolic_equal(a, b))
        except Exception:  # noqa: BLE001 - a sympy failure on odd input is "not equal"
            result = False
        connection.send(result)


class SympyWorker:
    """One reusable worker process; `check` is thread-safe (calls are serialised)."""

    def __init__(self):
        self._process = None
        self._connection = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        if method == "fork":
            import sympy  # noqa: F401 - imported once here, every forked worker starts with it loaded
        context = multiprocessing.get_context(method)
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(child,), daemon=True, name="nanokimi-sympy")
        process.start()
        child.close()
        if not parent.poll(STARTUP_TIMEOUT):
            process.kill()
            raise RuntimeError("the sympy worker did not start")
        parent.recv()
        self._process, self._connection = process, parent

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._connection.close()
        self._process = self._connection = None

    def check(self, a: str, b: str, timeout: float) -> bool:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            try:
                self._connection.send((a, b))
                if self._connection.poll(timeout):
                    return self._connection.recv()
            except (EOFError, BrokenPipeError, OSError):
                pass
            self.stop()
            return False


_worker = SympyWorker()
_warned = False


def sympy_equal(a: str, b: str, timeout: float = 3.0) -> bool:
    """Symbolic equality with a hard limit of `timeout` seconds per check (False when it runs out).
    Where no worker process can be started (e.g. inside a daemon process) answers False, with a warning."""
    global _warned
    if latex_to_sympy_source(a) is None or latex_to_sympy_source(b) is None:
        return False
    try:
        return _worker.check(a, b, timeout)
    except (AssertionError, RuntimeError, OSError) as error:
        if not _warned:
            warnings.warn(f"sympy checks are off: no worker process ({error}); answers compare as strings only.")
            _warned = True
        return False
