"""Tasks: graders on tricky answers, pass@k, the ladder and MuseD generators (no model here)."""
import itertools
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanokimi.tasks import TaskError, get_task, maj_at_k, majority_vote, pass_at_k, summarize
from nanokimi.tasks.gsm8k import canonical_number, extract_flexible, extract_strict
from nanokimi.tasks.ladder import evaluate_problem, parse_levels
from nanokimi.tasks.math500 import equivalent, last_boxed, normalize
from nanokimi.tasks.mused import Prop, entails, make_problem, parse_prop, satisfiable

ROOT = Path(__file__).resolve().parents[1]
# the main checkout's ../shared, or a worktree's ../../shared (worktrees live one level deeper)
DATA = next((p for p in (ROOT / ".." / "shared", ROOT / ".." / ".." / "shared") if p.is_dir()),
            ROOT / ".." / "shared") / "data"
GSM8K, MATH500 = DATA / "gsm8k" / "test.jsonl", DATA / "math500" / "test.jsonl"


def test_gsm8k_extraction():
    assert extract_strict("so 1,000 + 234\n#### 1,234") == "1234"
    assert extract_strict("#### $1,234.50 dollars") == "1234.5"
    assert extract_strict("#### -7") == "-7"
    assert extract_strict("the answer is 12") is None
    assert extract_flexible("the answer is 12, not 13.") == "13"
    assert extract_flexible("#### 5\nthen 99 more") == "5"
    assert extract_strict("#### 18\n#### 19") == "18"
    assert canonical_number("18.00") == "18" and canonical_number("0.50") == "0.5" and canonical_number("-0") == "0"
    assert canonical_number("eighteen") is None


def test_gsm8k_grading(tmp_path):
    rows = [{"question": "Two plus two?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
            {"question": "How many cents?", "answer": "#### 1,234"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    strict = get_task("gsm8k", path=tmp_path / "test.jsonl", mode="strict")
    flexible = get_task("gsm8k", path=tmp_path)
    four, cents = strict.examples()
    assert four.answer == "4" and "<<" not in four.solution
    assert strict.prompt(four) == "Question: Two plus two?\nAnswer:"
    for task in (strict, flexible):
        assert task.is_correct("#### 4", four.answer) and task.is_correct("#### 4.00", four.answer)
        assert task.is_correct("so #### 1,234", cents.answer) and task.is_correct("#### $1234", cents.answer)
        assert not task.is_correct("#### 5", four.answer) and not task.is_correct("", four.answer)
        assert task.reward("#### 4", "4") == 1.0 and task.reward("#### 3", "4") == 0.0
    assert flexible.is_correct("it is 4", "4") and not strict.is_correct("it is 4", "4")
    assert flexible.is_correct("x" * 100_000 + " 1,234", "1,234")
    with pytest.raises(TaskError, match="few_shot=2 but the train split|train.jsonl does not exist"):
        get_task("gsm8k", path=tmp_path, few_shot=2).prompt(four)


@pytest.mark.skipif(not GSM8K.exists(), reason="needs shared/data/gsm8k")
def test_gsm8k_reference_solutions_grade_correct():
    task = get_task("gsm8k", path=GSM8K, mode="strict", few_shot=2)
    examples = task.examples()
    assert len(examples) == 1319
    assert all(task.is_correct(task.format_solution(e), e.answer) for e in examples)
    assert sum(task.is_correct(task.format_solution(e), examples[(i + 1) % 1319].answer)
               for i, e in enumerate(examples)) < 40
    prompt = task.prompt(examples[0])
    assert prompt.count("Question:") == 3 and prompt.endswith("Answer:") and "####" in prompt
    assert task.messages(examples[0])[-1]["content"].endswith(examples[0].question)


def test_gsm8k_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="pass path="):
        get_task("gsm8k").examples()
    with pytest.raises(TaskError, match="does not exist"):
        get_task("math500", path=tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="ladder has no option 'lvls'; its options are levels, per_level"):
        get_task("ladder", lvls="1-3")  # `nanokimi eval --task ladder lvls=1-3`
    with pytest.raises(TaskError, match="unknown task 'gsm9k'"):
        get_task("gsm9k")


def test_last_boxed():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no answer here") is None and last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\boxed{2} and later \\boxed{open") == "2"


MATH_CASES = [
    ("\\dfrac{1}{2}", "0.5", True), ("\\frac12", "\\frac{1}{2}", True), ("0.5", "\\tfrac{1}{2}", True),
    ("x=3", "3", True), ("x = 3", "4", False), ("\\frac{1}{3}", "0.333", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
    ("(3, \\frac{\\pi}{2})", "(\\frac{\\pi}{2}, 3)", False),
    ("90^\\circ", "90", True), ("10,\\!080", "10080", True), ("\\$32,\\!348", "32348", True),
    ("864 \\mbox{ inches}^2", "864", True), ("5.4 \\text{ cents}", "5.4", True), ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "Navin", False), ("(3,4]", "(3,4)", False), ("3, 5, 7", "7,3,5", True),
    ("3, 5, 7", "3,5", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{8}", "3", False), ("\\sqrt2", "\\sqrt{2}", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True), ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("y = 2x + 3", "3 + 2x", True), ("2x+3", "2x+4", False), ("x \\in [-2,7]", "[-2,7]", True),
    ("\\frac{\\pi^2}{8}", "\\pi^2/8", True), ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", True),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2,1\\pm\\sqrt{5}\\}", True), ("50\\%", "50", True), ("2^{10}", "1024", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("", "0", False), ("__import__('os')", "0", False),
]


@pytest.mark.parametrize("given,reference,want", MATH_CASES)
def test_math_equivalence(given, reference, want):
    assert equivalent(given, reference) is want


def test_math500_grader_responses():
    grade = get_task("math500").is_correct  # grading needs no data file
    assert grade("The answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    assert grade("so \\boxed{x=3}", "3")
    assert grade("\\boxed{\\frac{\\sqrt{2}}{2}} is it", "\\frac{1}{\\sqrt{2}}")
    assert not grade("I am not sure.", "3")
    assert not grade("\\boxed{4}", "3")
    assert grade("junk " * 20_000 + "\\boxed{\\frac{1}{2}}", "\\frac12")
    assert not grade("\\boxed{" * 50_000, "1")
    nested = "\\boxed{" + "\\frac{1}{" * 20_000 + "2" + "}" * 20_001
    start = time.monotonic()
    assert not grade(nested, "1") and not grade(nested + "(" * 30_000, "1")
    assert time.monotonic() - start < 2


def test_gsm8k_grader_is_fast_on_hostile_text():
    task = get_task("gsm8k", mode="flexible")
    start = time.monotonic()
    assert task.is_correct("1,1" * 30_000 + " 7", "7")
    assert not task.is_correct("$ " * 50_000 + "9" * 100_000, "7")
    assert time.monotonic() - start < 2


def test_sympy_check_has_a_hard_time_limit():
    assert equivalent("2^{-1}", "0.5")  # the worker is up
    for hostile in ("9^{9^{9^{9}}}", "2^{2^{2^{2^{30}}}}", "(10^{10^{8}})!"):
        start = time.monotonic()
        assert not equivalent(hostile, "1", timeout=1.0)
        assert time.monotonic() - start < 3.0, hostile
    start = time.monotonic()
    assert equivalent("2^{-1}", "\\frac{1}{2}")  # a fresh worker answers after the killed ones
    assert time.monotonic() - start < 3.0


@pytest.mark.skipif(not MATH500.exists(), reason="needs shared/data/math500")
def test_math500_reference_solutions_grade_correct():
    task = get_task("math500", path=MATH500)
    examples = task.examples()
    assert len(examples) == 500 and {e.difficulty for e in examples} == {1, 2, 3, 4, 5}
    assert all(task.is_correct(e.solution, e.answer) for e in examples)
    wrong = sum(task.is_correct(f"\\boxed{{{e.answer}}}", examples[i - 1].answer) for i, e in enumerate(examples[:60]))
    assert wrong <= 2


def test_normalize_is_idempotent_on_math500_answers():
    answers = [case[0] for case in MATH_CASES] + [case[1] for case in MATH_CASES]
    assert all(normalize(normalize(a)) == normalize(a) for a in answers)


def test_pass_at_k_closed_form_and_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                subsets = list(itertools.combinations(range(n), k))  # the first c samples are the correct ones
                enumerated = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(enumerated, abs=1e-12)
    assert 0 < pass_at_k(10_000, 3, 1) == pytest.approx(3e-4)
    assert pass_at_k(2000, 1000, 1000) == pytest.approx(1.0)
    with pytest.raises(TaskError, match="k=5 with n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(TaskError):
        pass_at_k(4, 5, 1)


def test_majority_vote_and_summary():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie: the first seen
    assert majority_vote([None, None]) is None
    keys, correct = ["4", "5", "4", "4", "5", "5"], [True, False, True, True, False, False]
    assert maj_at_k(keys, correct, 1) == pytest.approx(0.5)
    assert maj_at_k(keys, correct, 3) == pytest.approx(0.5)  # groups (4,5,4) -> right, (4,5,5) -> wrong
    assert maj_at_k(keys, correct, 6) == pytest.approx(1.0)  # 4 and 5 tie, 4 seen first
    sample = lambda ok, tokens: {"correct": ok, "reward": float(ok), "key": "1" if ok else "2",  # noqa: E731
                                 "num_tokens": tokens, "truncated": tokens == 8}
    problems = [{"difficulty": 1, "samples": [sample(True, 2), sample(False, 8)]},
                {"difficulty": 2, "samples": [sample(False, 8), sample(False, 4)]}]
    table = summarize(problems, [1, 2])
    assert table["all"]["pass@1"] == pytest.approx(0.25) and table["all"]["pass@2"] == pytest.approx(0.5)
    assert table["levels"][1]["pass@2"] == 1.0 and table["levels"][2]["mean_tokens"] == 6
    assert table["all"]["truncated"] == pytest.approx(0.5) and table["all"]["mean_reward"] == pytest.approx(0.25)


def test_ladder_is_reproducible_and_traces_are_right():
    task = get_task("ladder", levels="1-20", per_level=500, seed=3)
    examples = task.examples()
    assert len(examples) == 10_000
    again = get_task("ladder", levels="1-20", per_level=500, seed=3).examples(limit=50)
    assert again == examples[:50]
    assert get_task("ladder", levels="1-20", per_level=1, seed=4).examples(limit=20) != examples[:20]
    assert get_task("ladder", seed=3).examples("train", limit=20) != examples[:20]
    for e in examples:
        steps = e.solution.splitlines()[:-1]
        assert len(steps) == e.difficulty and e.solution.endswith(f"#### {e.answer}")
        assert evaluate_problem(e.question) == int(e.answer) == int(steps[-1].rsplit("=", 1)[1])
        assert task.is_correct(e.solution, e.answer) and abs(int(e.answer)) <= 99
    assert len({e.question for e in examples}) > 9_500


def test_ladder_every_operation_feeds_the_answer():
    task = get_task("ladder", levels="1-20", per_level=20)
    for e in task.examples():
        lines = e.question.splitlines()
        deps = {line.split(" = ")[0]: line.split(" = ")[1].split()[::2] for line in lines[:-1]}
        needed, todo = set(), [lines[-1].split(": ")[1]]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo += [d for d in deps[name] if d in deps]
        operations = [name for name, operands in deps.items() if len(operands) == 2]
        assert len(operations) == e.difficulty and set(operations) <= needed


def test_ladder_grading_and_options():
    task = get_task("ladder", levels=[2])
    assert task.is_correct("x = 1 + 2 = 3\n#### 3\nq = 5\n#### 7", "3")
    assert task.is_correct("#### -12", "-12") and not task.is_correct("#### 12", "-12")
    assert not task.is_correct("no answer", "3") and task.extract("####  05") == "5"
    assert parse_levels("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(TaskError, match="1..20"):
        parse_levels("0-4")
    with pytest.raises(TaskError, match="levels must look like"):
        parse_levels("one")
    example = task.examples(limit=1)[0]
    assert task.sft_text(example) == task.prompt(example) + example.solution
    assert "\n\n" not in task.sft_text(example)


def test_ladder_export_skips_test_problems():
    task = get_task("ladder", levels="1", per_level=40)
    test_questions = {e.question for e in task.examples("test")}
    exported = list(task.export(200))
    assert len(exported) == 200 and not test_questions & {e.question for e in exported}


def naive_satisfiable(props, terms):
    """Every set of non-empty regions (a model up to the size of its regions), checked one by one."""
    regions = range(1 << len(terms))
    bit = {t: 1 << i for i, t in enumerate(terms)}

    def holds(prop, model):
        s, p = bit[prop.subject], bit[prop.predicate]
        witnesses = [r for r in regions if model >> r & 1]
        if prop.form == "A":
            return all(not r & s or r & p for r in witnesses)
        if prop.form == "E":
            return all(not (r & s and r & p) for r in witnesses)
        if prop.form == "I":
            return any(r & s and r & p for r in witnesses)
        return any(r & s and not r & p for r in witnesses)

    return any(all(holds(prop, model) for prop in props) for model in range(1 << len(regions)))


def test_region_checker_matches_model_enumeration():
    rng = random.Random(0)
    terms = ["xs", "ys", "zs"]
    for _ in range(150):
        props = [Prop(rng.choice("AEIO"), *rng.sample(terms, 2)) for _ in range(rng.randint(1, 4))]
        used = sorted({t for p in props for t in p[1:]})
        assert satisfiable(props) == naive_satisfiable(props, used), props
    assert not satisfiable([Prop("A", "xs", "ys"), Prop("O", "xs", "ys")])
    assert satisfiable([Prop("A", "xs", "ys"), Prop("E", "xs", "ys")])  # xs may be empty


def test_mused_small_problems_follow_by_model_enumeration():
    rng = random.Random(1)
    for depth in [1] * 40 + [2] * 4:
        problem = make_problem(rng, depth=depth)
        premises, conclusion = problem["premises"], problem["conclusion"]
        terms = sorted({t for p in premises for t in p[1:]})
        assert naive_satisfiable(premises, terms)
        assert not naive_satisfiable(premises + [conclusion.negated()], terms)


def test_mused_problems_are_valid_consistent_and_unambiguous():
    rng = random.Random(2)
    for i in range(240):
        problem = make_problem(rng, depth=1 + i % 6, distractors=i % 3)
        premises, chain, conclusion = problem["premises"], problem["chain"], problem["conclusion"]
        assert satisfiable(premises) and entails(chain, conclusion) and entails(premises, conclusion)
        s, p = conclusion.subject, conclusion.predicate
        about = [Prop(f, a, b) for f in "AEIO" for a, b in ((s, p), (p, s))]
        followed = {q.canonical() for q in about if entails(premises, q)}
        assert followed == {conclusion.canonical()}
        assert followed == {q.canonical() for q in about if entails(chain, q)}
        derived = set(chain)
        for first, second, result in problem["proof"]:
            assert first in derived and second in derived and entails([first, second], result)
            derived.add(result)
        assert conclusion in derived


def test_mused_task_grading_and_reproducibility():
    task = get_task("mused", levels="1-4", per_level=10, distractors=1)
    examples = task.examples()
    assert examples == get_task("mused", levels="1-4", per_level=10, distractors=1).examples()
    for e in examples:
        assert task.is_correct(e.solution, e.answer) and e.question.count("\n") == e.difficulty + 1 + 1 + 1 + 1
        assert not task.is_correct(f"#### {parse_prop(e.answer).negated().text()}", e.answer)
    e = next(e for e in examples if e.answer.startswith(("No", "Some")) and " not " not in e.answer)
    prop = parse_prop(e.answer)
    assert task.is_correct(f"#### {prop.text().split()[0]} {prop.predicate} are {prop.subject}.", e.answer)
    judge = get_task("mused", levels="1-5", per_level=20, mode="judge", distractors=2)
    answers = {e.answer for e in judge.examples()}
    assert answers == {"true", "false", "unknown"}
    for e in judge.examples():
        premises = [Prop(*p) for p in e.meta["premises"]]
        candidate = Prop(*e.meta["candidate"])
        truth = ("true" if entails(premises, candidate) else
                 "false" if entails(premises, candidate.negated()) else "unknown")
        assert truth == e.answer and judge.is_correct(f"#### {truth.title()}", e.answer)


def test_graders_import_no_torch():
    code = ("import sys; from nanokimi.tasks import get_task; "
            "t = get_task('ladder'); assert t.is_correct('#### 3', '3'); "
            "from nanokimi.tasks import math500, mused, gsm8k; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
