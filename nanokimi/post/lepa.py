"""LEPA (Learning to Plan before Answering, arXiv 2505.00031): self-training on plans and solutions.

    nanokimi lepa --ckpt BASE --task ladder --iterations 2 --trials 5 [--no-plan] [--templates FILE.toml]

Each iteration, for every training problem the model writes an anticipatory plan (general guidance for
problems of the kind) and a solution that follows it, in one reply. The task's grader checks the solution.
While it is wrong, and at most `trials` times in all, the model is shown the problem, its plan, its wrong
solution and the correct answer and writes a refined plan; a plan that states the answer is rejected
(`leaks_answer`), otherwise the model solves again from the refined plan. The (plan, solution) replies that
succeeded (with a non-empty plan) become chat data (prompt = the plan prompt, reply = plan + solution) for
nanokimi.post.sft, which fine-tunes the current model; the next iteration starts from the result.

--no-plan is the baseline (rejection-sampling self-training, ReST-EM / STaR without rationalisation): up to
`trials` independent samples of a plain solution per problem, the correct ones kept.

Prompts are rendered with the checkpoint's chat template; they are the fields of `Templates`, which a TOML
file can replace (`--templates FILE`, keys = field names, `{name}` placeholders).
"""
from __future__ import annotations

import gc
import json
import random
import re
import string
import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nanokimi.config import ConfigError
from nanokimi.tasks import Example, Task, get_task
from nanokimi.tasks.gsm8k import canonical_number


@dataclass
class Templates:
    """The prompts LEPA writes. Placeholders: {question} and {instruction} (the task's), {plan}, {solution},
    {answer}. `response` is how a reply lays out the plan and the solution; it must end with {solution}."""
    plan_prompt: str = ("{instruction}\n\n{question}\n\nFirst write a plan: general guidance for solving problems "
                        "of this kind, that does not depend on this problem's numbers. Then solve the problem "
                        "following your plan.")
    solve_prompt: str = "{instruction}\n\n{question}"
    response: str = "Plan:\n{plan}\n\nSolution:\n{solution}"
    reflect_prompt: str = ("{question}\n\nA plan for this problem:\n{plan}\n\nA solution that followed it:\n"
                           "{solution}\n\nThe solution is wrong; the correct answer is {answer}. Write a better plan: "
                           "general guidance that would lead to a correct solution of problems like this one. "
                           "Do not state the answer or any result of this problem in the plan. Reply with the plan "
                           "only.")

    PLACEHOLDERS = {"plan_prompt": {"question", "instruction"}, "solve_prompt": {"question", "instruction"},
                    "response": {"plan", "solution"},
                    "reflect_prompt": {"question", "instruction", "plan", "solution", "answer"}}

    def __post_init__(self):
        for name, allowed in self.PLACEHOLDERS.items():
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ConfigError(f"LEPA template {name} must be a string, got {type(text).__name__}.")
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:
                raise ConfigError(f"LEPA template {name}: {e} (write a literal brace as {{{{ or }}}}).") from None
            if used - allowed:
                raise ConfigError(f"LEPA template {name} uses {sorted(used - allowed)}; it may use "
                                  f"{sorted(allowed)}.")
        head, sep, _ = self.response.partition("{solution}")
        if "{plan}" not in head or not self.response.endswith("{solution}") or not head.split("{plan}", 1)[1]:
            raise ConfigError("LEPA template response must hold {plan}, then some text, then end with {solution} "
                              "(e.g. 'Plan:\\n{plan}\\n\\nSolution:\\n{solution}').")

    @classmethod
    def load(cls, path: str | Path) -> "Templates":
        """Fields from a TOML file (any subset; the rest keep their defaults)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"LEPA templates file {path} does not exist.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML ({e}).") from None
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown template keys {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)

    @property
    def plan_prefix(self) -> str:
        return self.response.split("{plan}", 1)[0]

    @property
    def separator(self) -> str:
        return self.response.split("{plan}", 1)[1].split("{solution}", 1)[0]

    def reply_start(self, plan: str) -> str:
        """The reply up to where its solution starts, with `plan` written in."""
        return self.plan_prefix + plan + self.separator

    def split_reply(self, reply: str) -> tuple[str, str]:
        """A reply -> (plan, solution). No separator: a reply that starts as a plan is all plan, any other
        is all solution (a model that skipped the plan is still graded)."""
        body = reply[len(self.plan_prefix):] if reply.startswith(self.plan_prefix) else None
        if body is not None and self.separator in body:
            plan, solution = body.split(self.separator, 1)
            return plan.strip(), solution
        prefix = self.plan_prefix.strip()
        if body is not None and prefix:
            return body.strip(), ""
        return "", reply

    def plan_of(self, reply: str) -> str:
        """A reflection's reply -> the refined plan (a leading plan prefix and anything after the separator cut)."""
        text = reply.strip()
        prefix = self.plan_prefix.strip()
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        sep = self.separator.strip()
        if sep and sep in text:
            text = text.split(sep, 1)[0]
        return text.strip()


NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w|\.\d)")


def leaks_answer(plan: str, answer: str, task: Task) -> bool:
    """Whether a plan gives the answer away: a number in it (whole numbers only: answer 15 does not match 150,
    3.15 or x15; sign ignored, so -15 matches) that the grader would accept, an answer line the grader accepts
    (#### 15), any part of the plan the grader accepts as a final answer, or the answer's own text."""
    if not plan.strip():
        return False

    def accepts(candidate: str) -> bool:
        try:
            return task.answers_match(candidate, answer)
        except Exception:  # a grader that cannot read the candidate does not accept it
            return False

    if task.is_correct(plan, answer):
        return True
    numeric = canonical_number(answer) is not None
    for match in NUMBER.finditer(plan):
        for text in {match.group(), match.group().lstrip("-")}:
            candidate = canonical_number(text)
            if candidate is not None and accepts(candidate):
                return True
    if numeric:
        return False
    norm = " ".join(answer.split())
    if norm and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", " ".join(plan.split()), re.IGNORECASE):
        return True
    segments = [s.strip() for s in re.split(r"[\n.;]", plan) if s.strip()]
    return any(task.is_correct(f"#### {s}", answer) for s in segments)


@dataclass
class LepaConfig:
    task: str = "ladder"
    task_options: dict = field(default_factory=dict)  # e.g. {"levels": "1-8"} or {"path": "data/gsm8k"}
    iterations: int = 2
    trials: int = 5  # attempts per problem and iteration (LEPA: the first + reflections; no-plan: samples)
    problems: int = 64  # training problems per iteration
    eval_problems: int = 100  # held-out (test split) problems for pass@1
    plan: bool = True  # False: the no-plan baseline
    temperature: float = 0.8
    plan_tokens: int = 96
    solution_tokens: int = 256
    seed: int = 0
    max_cache_tokens: int | None = None  # the engine's KV cache (None: room for 128 reflections at once)
    sft_overrides: list[str] = field(default_factory=list)  # section.key=value for nanokimi.post.sft

    def validate(self) -> None:
        checks = [(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
                  (self.trials >= 1, f"trials must be >= 1, got {self.trials}"),
                  (self.problems >= 1, f"problems must be >= 1, got {self.problems}"),
                  (self.eval_problems >= 0, f"eval_problems must be >= 0, got {self.eval_problems}"),
                  (self.temperature > 0, f"temperature must be > 0 to sample new attempts, got {self.temperature}"),
                  (self.plan_tokens >= 1 and self.solution_tokens >= 1, "plan_tokens and solution_tokens must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"lepa: {message}.")


class Chat:
    """Chat-template generation on a live LLM: (user message, start of the reply) -> (reply text, tokens)."""

    def __init__(self, llm, template, progress: bool = False):
        self.llm, self.template, self.tokenizer, self.progress = llm, template, llm.tokenizer, progress
        self.generated_tokens = 0
        self.calls = 0

    def ids(self, user: str, reply_start: str = "") -> list[int]:
        prompt = self.template.render([{"role": "user", "content": user}], add_generation_prompt=True)
        return self.tokenizer.encode_chat(prompt) + (self.tokenizer.encode(reply_start) if reply_start else [])

    def __call__(self, requests: list[tuple[str, str]], max_tokens: int, temperature: float,
                 seed: int | None) -> list[str]:
        from nanokimi.infer import SamplingParams

        if not requests:
            return []
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                 seed=None if seed is None else seed + i) for i in range(len(requests))]
        outs = self.llm.generate(prompt_token_ids=[self.ids(u, r) for u, r in requests], sampling_params=params,
                                 use_tqdm=self.progress)
        self.calls += len(requests)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return [o.outputs[0].text for o in outs]


def fill(template: str, task: Task, example: Example, **values) -> str:
    return template.format(question=task.format_question(example).strip(), instruction=task.instruction, **values)


@dataclass
class Attempt:
    example: Example
    plan: str = ""
    solution: str = ""
    solved: bool = False
    solved_at: int = 0  # the trial that succeeded (0: none)
    trials: int = 0
    leaks: int = 0


def collect(chat: Chat, task: Task, problems: list[Example], cfg: LepaConfig, templates: Templates,
            seed: int) -> tuple[list[dict], dict, list[Attempt]]:
    """One iteration's generation: (SFT records of the successful attempts, statistics, every attempt)."""
    attempts = [Attempt(e) for e in problems]
    plan_lengths: list[int] = []
    if cfg.plan:
        replies = chat([(fill(templates.plan_prompt, task, a.example), "") for a in attempts],
                       cfg.plan_tokens + cfg.solution_tokens, cfg.temperature, seed)
        for a, reply in zip(attempts, replies):
            a.plan, a.solution = templates.split_reply(reply)
            grade(a, task, 1)
        for trial in range(2, cfg.trials + 1):
            failed = [a for a in attempts if not a.solved]
            reflections = chat([(fill(templates.reflect_prompt, task, a.example, plan=a.plan, solution=a.solution,
                                      answer=a.example.answer), "") for a in failed],
                               cfg.plan_tokens, cfg.temperature, seed + 7919 * trial)
            retry = []
            for a, reply in zip(failed, reflections):
                plan = templates.plan_of(reply)
                a.trials = trial
                if leaks_answer(plan, a.example.answer, task):
                    a.leaks += 1  # rejected: the trial is spent, the next reflection starts from the old plan
                    continue
                a.plan = plan
                retry.append(a)
            solutions = chat([(fill(templates.plan_prompt, task, a.example), templates.reply_start(a.plan))
                              for a in retry], cfg.solution_tokens, cfg.temperature, seed + 7919 * trial + 1)
            for a, solution in zip(retry, solutions):
                a.solution = solution
                grade(a, task, trial)
        plan_lengths = [len(chat.tokenizer.encode(a.plan)) for a in attempts]
        records = [{"prompt": fill(templates.plan_prompt, task, a.example),
                    "completion": templates.response.format(plan=a.plan, solution=a.solution)}
                   for a in attempts if a.solved and a.plan]  # a solution without a plan is graded, not learned
    else:
        for trial in range(1, cfg.trials + 1):
            todo = [a for a in attempts if not a.solved]
            solutions = chat([(fill(templates.solve_prompt, task, a.example), "") for a in todo],
                             cfg.solution_tokens, cfg.temperature, seed + 7919 * trial)
            for a, solution in zip(todo, solutions):
                a.solution = solution
                grade(a, task, trial)
        records = [{"prompt": fill(templates.solve_prompt, task, a.example), "completion": a.solution}
                   for a in attempts if a.solved]
    n = len(attempts)
    stats = {"problems": n,
             "success_first": sum(a.solved_at == 1 for a in attempts) / n,
             "success_final": sum(a.solved for a in attempts) / n,
             "trials_mean": sum(a.trials for a in attempts) / n,
             "leak_rejections": sum(a.leaks for a in attempts),
             "plan_tokens_mean": sum(plan_lengths) / n if plan_lengths else 0.0,
             "sft_examples": len(records)}
    return records, stats, attempts


def grade(attempt: Attempt, task: Task, trial: int) -> None:
    attempt.trials = trial
    if task.is_correct(attempt.solution, attempt.example.answer):
        attempt.solved, attempt.solved_at = True, trial


def evaluate(chat: Chat, task: Task, examples: list[Example], cfg: LepaConfig, templates: Templates) -> dict:
    """Greedy pass@1 on held-out problems, overall and per difficulty level (the way the run generates)."""
    if not examples:
        return {}
    if cfg.plan:
        replies = chat([(fill(templates.plan_prompt, task, e), "") for e in examples],
                       cfg.plan_tokens + cfg.solution_tokens, 0.0, None)
        solutions = [templates.split_reply(r)[1] for r in replies]
    else:
        solutions = chat([(fill(templates.solve_prompt, task, e), "") for e in examples], cfg.solution_tokens, 0.0,
                         None)
    correct = [task.is_correct(s, e.answer) for s, e in zip(solutions, examples)]
    levels: dict[str, list[bool]] = {}
    for e, ok in zip(examples, correct):
        levels.setdefault(str(e.difficulty), []).append(ok)
    return {"pass@1": sum(correct) / len(correct),
            "by_level": {k: sum(v) / len(v) for k, v in sorted(levels.items(), key=lambda kv: str(kv[0]).zfill(4))}}


def open_llm(ckpt: Path, cfg: LepaConfig):
    from nanokimi.infer import LLM

    room = cfg.plan_tokens + 2 * cfg.solution_tokens + 512  # a reflection prompt holds a plan and a solution
    return LLM(ckpt, max_cache_tokens=cfg.max_cache_tokens or 128 * room, verbose=False)


def release() -> None:
    """Hand freed GPU memory back (the engine's cache and the trainer's states are large)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_lepa(ckpt: str, out: str, cfg: LepaConfig, templates: Templates | None = None,
             progress: bool = True) -> dict:
    """The whole loop; writes out/metrics.jsonl (one row per iteration), out/iter_N/{sft.jsonl, samples.jsonl},
    the SFT runs in out/iter_N/sft, and returns {"config", "iterations": [...], "checkpoint"}."""
    from nanokimi.checkpoint import load_model_config, resolve_checkpoint
    from nanokimi.data.chat import ChatTemplate
    from nanokimi.post.sft import load_sft_config, run_sft

    cfg.validate()
    current = resolve_checkpoint(ckpt)
    # a typo in the fine-tuning settings fails now, not after the first iteration's generation (or never)
    load_sft_config(load_model_config(current), "", cfg.sft_overrides)
    templates = templates or Templates()
    task = get_task(cfg.task, **cfg.task_options)
    held_out = task.examples("test", limit=cfg.eval_problems) if cfg.eval_problems else []
    test_questions = {e.question for e in task.examples("test")}
    pool = [e for e in task.examples("train") if e.question not in test_questions]
    if not pool:
        raise ConfigError(f"lepa: the {cfg.task} task has no training problems outside its test split.")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = ChatTemplate.load(current)
    rows = []
    (out_dir / "metrics.jsonl").write_text("")
    mode = "lepa" if cfg.plan else "no-plan"
    for iteration in range(1, cfg.iterations + 1):
        llm = open_llm(current, cfg)
        chat = Chat(llm, template, progress)
        before = evaluate(chat, task, held_out, cfg, templates)
        rng = random.Random(f"lepa:{cfg.seed}:{iteration}")
        problems = rng.sample(pool, min(cfg.problems, len(pool)))
        chat.generated_tokens = chat.calls = 0
        records, stats, attempts = collect(chat, task, problems, cfg, templates,
                                           seed=cfg.seed * 1_000_003 + iteration * 10_007)
        stats.update(generated_tokens=chat.generated_tokens, generations=chat.calls)
        del llm, chat
        release()
        it_dir = out_dir / f"iter_{iteration}"
        it_dir.mkdir(exist_ok=True)
        with open(it_dir / "samples.jsonl", "w", encoding="utf-8") as fh:
            for a in attempts:
                fh.write(json.dumps({"id": a.example.id, "answer": a.example.answer, "plan": a.plan,
                                     "solution": a.solution, "solved": a.solved, "trials": a.trials,
                                     "leaks": a.leaks}) + "\n")
        data = it_dir / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        row = {"iteration": iteration, "mode": mode, "eval_before": before, **stats}
        if records:
            result = run_sft(str(current), str(data), str(it_dir / "sft"),
                             ["sft.val_fraction=0", *cfg.sft_overrides], progress=progress)
            current = Path(result["checkpoint"])
            logged = [json.loads(line) for line in (it_dir / "sft" / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
            row.update(sft_steps=result["step"], sft_loss=logged[-1]["loss"] if logged else None)
            release()
        else:
            row.update(sft_steps=0, sft_loss=None)
        print(f"lepa [{mode}] iteration {iteration}: solved {stats['success_first']:.2f} at the first try, "
              f"{stats['success_final']:.2f} after {cfg.trials} trials (mean {stats['trials_mean']:.2f}); "
              f"{stats['leak_rejections']} leaking plans rejected; {len(records)} SFT examples; held-out pass@1 "
              f"before {before.get('pass@1', float('nan')):.3f}", file=sys.stderr)
        rows.append(row)
        with open(out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
    llm = open_llm(current, cfg)
    final = evaluate(Chat(llm, template, progress), task, held_out, cfg, templates)
    del llm
    release()
    for row, after in zip(rows, [r["eval_before"] for r in rows[1:]] + [final]):
        row["eval_after"] = after
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"config": asdict(cfg), "templates": asdict(templates), "iterations": rows, "final_eval": final,
               "checkpoint": str(current)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
