"""LEPA: the leak check on answers and their look-alikes, the templates, the bookkeeping of one iteration (trials,
rejected plans, only successful (plan, solution) pairs in the SFT data, metrics), the no-plan baseline, and the
whole loop through the engine and nanokimi sft on a tiny checkpoint."""
import json

import pytest
import torch

from nanokimi import ModelConfig, build_model
from nanokimi.config import ConfigError
from nanokimi.post.lepa import Chat, LepaConfig, Templates, collect, leaks_answer, run_lepa
from nanokimi.tasks import get_task

LADDER = get_task("ladder", levels="1-3", per_level=4)
GSM8K = get_task("gsm8k")


@pytest.mark.parametrize("plan, answer, leaks", [
    ("add the numbers, the result is 15.", "15", True),
    ("there are 150 ways", "15", False),
    ("multiply 3.15 by two", "15", False),
    ("subtract: a - 15", "15", True),
    ("the total is -15", "15", True),
    ("about 1,500 apples", "1500", True),
    ("15.0 is what you get", "15", True),
    ("take 3,15 and 7", "15", True),
    ("first step, then #### 15", "15", True),
    ("compute each step in order and check every sum", "15", False),
    ("", "15", False),
])
@pytest.mark.parametrize("task", [LADDER, GSM8K], ids=["ladder", "gsm8k"])
def test_leak_check_numbers(task, plan, answer, leaks):
    assert leaks_answer(plan, answer, task) is leaks


def test_leak_check_grader_forms_and_text_answers():
    assert not leaks_answer("keep x15 and y15 apart", "15", LADDER)  # not numbers
    assert leaks_answer("keep x15 and y15 apart", "15", GSM8K)  # ...but GSM8K's flexible grader reads 15 in y15
    assert leaks_answer("it costs $1,500.00 in all", "1500", GSM8K)  # a form the GSM8K grader accepts
    assert not leaks_answer("it costs $1,501.00 in all", "1500", GSM8K)
    mused = get_task("mused", levels="1-2", per_level=2)
    example = mused.examples("test", limit=1)[0]
    assert leaks_answer(f"Keep in mind that {example.answer}.", example.answer, mused)
    assert leaks_answer(f"#### {example.answer}", example.answer, mused)
    assert not leaks_answer("Chain the premises one at a time.", example.answer, mused)


def test_templates_split_and_errors(tmp_path):
    t = Templates()
    assert t.split_reply("Plan:\ngo step by step\n\nSolution:\na = 1\n#### 1") == ("go step by step", "a = 1\n#### 1")
    assert t.split_reply("a = 1\n#### 1") == ("", "a = 1\n#### 1")  # no plan: graded as a solution
    assert t.split_reply("Plan:\nonly a plan") == ("only a plan", "")
    assert t.plan_of("Plan:\nbetter plan\n\nSolution:\nignored") == "better plan"
    assert t.reply_start("P") == "Plan:\nP\n\nSolution:\n"
    with pytest.raises(ConfigError, match="response"):
        Templates(response="{solution} then {plan}")
    with pytest.raises(ConfigError, match="answer"):
        Templates(plan_prompt="{question} {answer}")
    path = tmp_path / "t.toml"
    path.write_text('response = "P: {plan} S: {solution}"\n')
    loaded = Templates.load(path)
    assert loaded.split_reply("P: a S: b") == ("a", "b") and loaded.solve_prompt == Templates().solve_prompt
    path.write_text('respons = "x"\n')
    with pytest.raises(ConfigError, match="unknown template keys"):
        Templates.load(path)


class ScriptedChat:
    """Stands in for Chat: replies chosen by a function of (prompt, reply start); counts calls."""

    def __init__(self, reply):
        self.reply, self.log = reply, []
        self.tokenizer = type("T", (), {"encode": staticmethod(lambda s: s.split())})()

    def __call__(self, requests, max_tokens, temperature, seed):
        self.log.append(requests)
        return [self.reply(user, start) for user, start in requests]


def test_one_lepa_iteration_bookkeeping():
    a, b, c = LADDER.examples("train", limit=3)
    t = Templates()
    reflections = {b.id: iter([f"Plan:\nthe answer is {b.answer}", "work carefully"]), c.id: iter(["think", "more"])}

    def reply(user, start):
        ex = next(e for e in (a, b, c) if LADDER.format_question(e).strip() in user)
        if "correct answer is" in user:  # a reflection
            return next(reflections[ex.id])
        if start:  # a solution from a refined plan
            plan = start[len("Plan:\n"):-len("\n\nSolution:\n")]
            assert start == t.reply_start(plan) and (ex is not b or plan == "work carefully")
            assert ex is not a
            return f"#### {ex.answer}" if ex is b else "#### 99999"
        return f"Plan:\nfirst plan\n\nSolution:\n#### {a.answer if ex is a else 99999}"

    chat = ScriptedChat(reply)
    cfg = LepaConfig(trials=3)
    planless = ScriptedChat(lambda user, start: f"#### {a.answer}")  # correct, but no plan: graded, not learned
    records, stats, _ = collect(planless, LADDER, [a], cfg, t, seed=0)
    assert stats["success_first"] == 1 and records == []
    records, stats, attempts = collect(chat, LADDER, [a, b, c], cfg, t, seed=0)
    by_id = {x.example.id: x for x in attempts}
    assert (by_id[a.id].solved_at, by_id[a.id].trials) == (1, 1)
    assert (by_id[b.id].solved_at, by_id[b.id].trials, by_id[b.id].leaks) == (3, 3, 1)  # trial 2's plan leaked
    assert (by_id[c.id].solved, by_id[c.id].trials, by_id[c.id].leaks) == (False, 3, 0)
    assert stats["success_first"] == pytest.approx(1 / 3) and stats["success_final"] == pytest.approx(2 / 3)
    assert stats["leak_rejections"] == 1 and stats["trials_mean"] == pytest.approx(7 / 3)
    assert set(stats) >= {"problems", "success_first", "success_final", "trials_mean", "leak_rejections",
                          "plan_tokens_mean", "sft_examples"}
    assert [len(r) for r in chat.log] == [3, 2, 1, 2, 2]  # first try; per trial reflections, then solves
    assert records == [{"prompt": t.plan_prompt.format(question=LADDER.format_question(e).strip(),
                                                       instruction=LADDER.instruction),
                        "completion": t.response.format(plan=p, solution=f"#### {e.answer}")}
                       for e, p in ((a, "first plan"), (b, "work carefully"))]
    assert all(str(e.answer) not in r["completion"].split("Solution:")[0] for r, e in zip(records, (a, b)))


def test_no_plan_baseline_bookkeeping():
    a, b = LADDER.examples("train", limit=2)
    tries = {a.id: iter(["#### 99999", f"#### {a.answer}"]), b.id: iter(["nothing"] * 4)}

    def reply(user, start):
        assert not start and "plan" not in user.lower()
        return next(tries[next(e for e in (a, b) if LADDER.format_question(e).strip() in user).id])

    chat = ScriptedChat(reply)
    records, stats, _ = collect(chat, LADDER, [a, b], LepaConfig(plan=False, trials=4), Templates(), seed=0)
    assert [len(r) for r in chat.log] == [2, 2, 1, 1]
    assert records == [{"prompt": Templates().solve_prompt.format(question=LADDER.format_question(a).strip(),
                                                                  instruction=LADDER.instruction),
                        "completion": f"#### {a.answer}"}]
    assert stats["success_first"] == 0 and stats["success_final"] == 0.5 and stats["trials_mean"] == 3
    assert stats["leak_rejections"] == 0 and stats["plan_tokens_mean"] == 0


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    from nanokimi.checkpoint import save_checkpoint
    from nanokimi.data import Tokenizer

    root = tmp_path_factory.mktemp("lepa")
    task = get_task("ladder", levels="1-2", per_level=3)
    tok = Tokenizer.train([task.sft_text(e) for e in task.export(60)] + [Templates().plan_prompt] * 3, vocab_size=300)
    tok.save(root / "tokenizer.json")
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=32, intermediate_size=128)
    torch.manual_seed(0)
    save_checkpoint(root / "base", build_model(cfg), tokenizer_file=root / "tokenizer.json")
    return root / "base"


SFT = ["train.max_steps=2", "train.seq_len=384", "train.batch_size=2", "train.device=cpu", "optim.name=adamw",
       "train.log_every=1"]


@pytest.mark.parametrize("plan", [True, False], ids=["lepa", "no-plan"])
def test_loop_end_to_end_on_a_tiny_checkpoint(base_checkpoint, tmp_path, monkeypatch, plan):
    """The real engine generates; the first problem's reply is replaced by a correct one so that SFT runs."""
    generate = Chat.__call__
    answers = {}

    def patched(self, requests, max_tokens, temperature, seed):
        texts = generate(self, requests, max_tokens, temperature, seed)
        assert len(texts) == len(requests) and all(isinstance(x, str) for x in texts)
        for i, (user, start) in enumerate(requests):
            for question, answer in answers.items():
                if question in user and "correct answer" not in user and temperature > 0:
                    texts[i] = ("" if start or not plan else "Plan:\nstep by step\n\nSolution:\n") + f"#### {answer}"
        return texts

    monkeypatch.setattr(Chat, "__call__", patched)
    task = get_task("ladder", levels="1-2", per_level=3)
    first = task.examples("train")[0]
    answers[task.format_question(first).strip()] = first.answer
    cfg = LepaConfig(task="ladder", task_options={"levels": "1-2", "per_level": 3}, iterations=1, trials=2,
                     problems=6, eval_problems=4, plan=plan, plan_tokens=8, solution_tokens=8, sft_overrides=SFT)
    summary = run_lepa(str(base_checkpoint), str(tmp_path / "run"), cfg, progress=False)
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["mode"] == ("lepa" if plan else "no-plan") and row["problems"] == 6
    assert row["sft_examples"] >= 1 and row["sft_steps"] == 2 and row["generated_tokens"] > 0
    assert set(row["eval_before"]["by_level"]) == {"1", "2"} and "pass@1" in row["eval_after"]
    sft = [json.loads(line) for line in (tmp_path / "run" / "iter_1" / "sft.jsonl").read_text().splitlines()]
    assert all(task.is_correct(r["completion"], next(a for q, a in answers.items() if q in r["prompt"]))
               for r in sft if any(q in r["prompt"] for q in answers))
    assert summary["checkpoint"].startswith(str(tmp_path / "run" / "iter_1" / "sft"))


def test_bad_settings_one_line(base_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="trials"):
        run_lepa(str(base_checkpoint), str(tmp_path), LepaConfig(trials=0))
    with pytest.raises(ConfigError, match="Did you mean 'sft.epochs'"):  # before any generation
        run_lepa(str(base_checkpoint), str(tmp_path), LepaConfig(sft_overrides=["sft.epoch=1"]))
    from nanokimi.cli import main
    assert main(["lepa", "--ckpt", str(base_checkpoint), "--task", "ladder", "--templates", str(tmp_path / "no.toml"),
                 "--out", str(tmp_path / "x")]) == 2


def test_cli_runs_the_loop(base_checkpoint, tmp_path, capsys):
    from nanokimi.cli import main

    templates = tmp_path / "t.toml"
    templates.write_text('solve_prompt = "Solve:\\n{question}"\n')
    out = tmp_path / "run"
    assert main(["lepa", "--ckpt", str(base_checkpoint), "--task", "ladder", "--levels", "1-2", "--per-level", "3",
                 "--iterations", "1", "--trials", "2", "--problems", "2", "--eval-problems", "2", "--no-plan",
                 "--plan-tokens", "4", "--solution-tokens", "4", "--templates", str(templates), "--out", str(out),
                 "--no-progress", *SFT]) == 0
    assert "held-out pass@1 by iteration" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["plan"] is False and summary["config"]["task_options"] == {"levels": "1-2", "per_level": 3}
    assert summary["templates"]["solve_prompt"] == "Solve:\n{question}"
    assert len((out / "iter_1" / "samples.jsonl").read_text().splitlines()) == 2
    assert main(["plot", str(out), "--out", str(tmp_path / "p.png")]) == 2  # not a run with loss curves
    assert "is a LEPA run" in capsys.readouterr().err
