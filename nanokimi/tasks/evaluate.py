"""Sample from a model on a task, grade every sample, and summarise (pass@k, maj@k, reward, length).

    generate_fn = load_generate_fn("runs/ladder")
    result = evaluate_task(get_task("ladder"), generate_fn, n=16, ks=[1, 4, 16], limit=100)
    print(format_table(result))

Generation goes through one function, `generate_fn(prompts, n, temperature, max_tokens, seed, stop)
-> list[list[Completion]]`: n completions per prompt, each cut before the first stop string. With a chat
template, evaluate_task also passes `chat=True`: the prompts are rendered chat templates, to be encoded with
the tokenizer's `encode_chat` (special-token strings become their ids). The default
one is built from a checkpoint: `nanokimi.infer.LLM` (the batching engine) when it is importable,
otherwise `nanokimi.infer.generate` over batches of equal-length prompts.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from nanokimi.tasks.base import Task, TaskError
from nanokimi.tasks.metrics import summarize


class Completion(NamedTuple):
    text: str
    truncated: bool  # stopped by max_tokens (no end-of-text token, no stop string)
    num_tokens: int


GenerateFn = Callable[[list[str], int, float, int, int, Sequence[str]], list[list[Completion]]]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def model_generate_fn(model, tokenizer, max_batch_rows: int = 256) -> GenerateFn:
    """A generate_fn over `nanokimi.infer.generate`: prompts of equal token length share a batch (the
    model's cache has no padding), each prompt repeated n times, up to max_batch_rows rows per batch.
    generate() knows no stop strings: rows run to end-of-text or max_tokens, then the text is cut."""
    import torch

    from nanokimi.infer.generate import generate

    device = next(model.parameters()).device
    eos = tokenizer.eot_id
    end_ids = set(getattr(tokenizer, "stop_ids", ())) | {eos}  # end of text, and of a chat turn where known
    limit = model.config.max_position_embeddings

    def generate_fn(prompts, n, temperature, max_tokens, seed, stop, chat=False):
        encode = tokenizer.encode_chat if chat else tokenizer.encode
        encoded = [encode(p) or [eos] for p in prompts]
        longest = max(len(ids) for ids in encoded)
        if longest + max_tokens > limit:
            raise TaskError(f"a prompt of {longest} tokens plus max_tokens={max_tokens} exceeds the model's "
                            f"{limit} positions; lower --max-tokens or --few-shot.")
        results: list[list[Completion]] = [[] for _ in prompts]
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        rows = [(i, ids_len) for ids_len, group in sorted(by_length.items()) for i in group for _ in range(n)]
        batch_id = 0
        start = 0
        while start < len(rows):
            length = rows[start][1]
            end = start
            while end < len(rows) and end - start < max_batch_rows and rows[end][1] == length:
                end += 1
            members = [i for i, _ in rows[start:end]]
            ids = torch.tensor([encoded[i] for i in members], device=device)  # [B, T]
            out = generate(model, ids, max_tokens, temperature=temperature, seed=seed * 1_000_003 + batch_id,
                           eos_id=eos)
            for i, new in zip(members, out[:, length:].tolist()):
                first_end = next((j for j, token in enumerate(new) if token in end_ids), None)
                ended = first_end is not None
                new = new[:first_end] if ended else new
                text, stopped = cut_at_stop(tokenizer.decode(new), stop)
                length_used = len(tokenizer.encode(text)) if stopped else len(new)  # tokens up to the stop string
                results[i].append(Completion(text, not (ended or stopped), length_used))
            batch_id += 1
            start = end
        return results

    return generate_fn


def llm_generate_fn(llm, sampling_params_cls) -> GenerateFn:
    """A generate_fn over the batching engine: `llm.generate(prompts, SamplingParams(n=...))`."""

    def generate_fn(prompts, n, temperature, max_tokens, seed, stop, chat=False):
        params = sampling_params_cls(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed,
                                     stop=list(stop) or None)
        if chat:
            ids = [llm.tokenizer.encode_chat(p) for p in prompts]
            outputs = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        results = []
        for output in outputs:
            completions = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                text, _ = cut_at_stop(completion.text, stop)
                completions.append(Completion(text, completion.finish_reason == "length", len(completion.token_ids)))
            results.append(completions)
        return results

    return generate_fn


def load_generate_fn(ckpt: str, device: str | None = None) -> GenerateFn:
    """The default generate_fn for a checkpoint: the engine when `nanokimi.infer.LLM` exists, else generate."""
    try:
        from nanokimi.infer import LLM, SamplingParams
    except ImportError:
        LLM = SamplingParams = None
    if LLM is not None:
        return llm_generate_fn(LLM(ckpt, device=device or "auto"), SamplingParams)
    from nanokimi.infer.sample import load_for_sampling

    return model_generate_fn(*load_for_sampling(ckpt, device))


def evaluate_task(task: Task, generate_fn: GenerateFn, n: int = 1, ks: Sequence[int] = (1,),
                  temperature: float = 1.0, max_tokens: int = 256, seed: int = 0, limit: int | None = None,
                  split: str = "test", prompts_per_call: int = 64, progress: bool = True, chat_template=None) -> dict:
    """Generate n samples per problem, grade them, summarise: {"task", "settings", "summary", "problems"}.
    summary = {"all": row, "levels": {level: row}} with pass@k and maj@k for each k, mean reward, mean
    tokens and the truncated share; "problems" holds every sample with its grade. With a chat_template
    (`nanokimi.data.chat.ChatTemplate`) prompts are `task.messages(example)` rendered with the generation
    prompt, and responses end at the end of the turn (no stop strings)."""
    ks = sorted(set(ks))
    if n < 1 or not ks or ks[0] < 1 or ks[-1] > n:
        raise TaskError(f"need 1 <= k <= n for every k; got k={','.join(map(str, ks))} with n={n}. "
                        "Lower --k or raise --n.")
    if temperature < 0 or max_tokens < 1:
        raise TaskError(f"need temperature >= 0 and max_tokens >= 1, got {temperature} and {max_tokens}.")
    examples = task.examples(split, limit)
    if chat_template is None:
        prompt_of, stop = task.prompt, tuple(task.stop)
    else:
        prompt_of, stop = (lambda e: chat_template.render(task.messages(e), add_generation_prompt=True)), ()
    from tqdm import tqdm

    bar = tqdm(total=len(examples), desc=f"{task.name} n={n}", unit="problem", disable=not progress,
               file=sys.stderr)
    problems = []
    started = time.perf_counter()
    for start in range(0, len(examples), prompts_per_call):
        chunk = examples[start:start + prompts_per_call]
        prompts = [prompt_of(e) for e in chunk]
        chat = {"chat": True} if chat_template is not None else {}  # generate_fns without chat support still work
        completions = generate_fn(prompts, n, temperature, max_tokens, seed + start, stop, **chat)
        if len(completions) != len(chunk) or any(len(c) != n for c in completions):
            raise TaskError(f"generate_fn returned {len(completions)} prompts x {[len(c) for c in completions][:4]} "
                            f"samples; expected {len(chunk)} x {n}.")
        for example, prompt, samples in zip(chunk, prompts, completions):
            graded = []
            for sample in samples:
                text, stopped = cut_at_stop(sample.text, stop)
                key, correct, reward = task.grade(text, example.answer)
                graded.append({"text": text, "key": key, "correct": correct, "reward": reward,
                               "num_tokens": sample.num_tokens, "truncated": sample.truncated and not stopped})
            problems.append({"id": example.id, "difficulty": example.difficulty, "answer": example.answer,
                             "prompt": prompt, "samples": graded})
        bar.update(len(chunk))
    bar.close()
    settings = {"task": task.name, "split": split, "n": n, "k": ks, "temperature": temperature,
                "max_tokens": max_tokens, "seed": seed, "limit": limit, "few_shot": task.few_shot,
                "chat": chat_template is not None, "stop": list(stop), "seconds": round(time.perf_counter() - started, 3)}
    return {"task": task.name, "settings": settings, "summary": summarize(problems, ks), "problems": problems}


def format_table(result: dict) -> str:
    """One line per difficulty level (when the task has levels) and one for all problems."""
    ks = result["settings"]["k"]
    columns = ["problems"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks] + \
        ["mean_reward", "mean_tokens", "truncated"]
    header = f"{'level':>6} " + " ".join(f"{c:>11}" for c in columns)
    lines = [header]
    rows = [(str(level), row) for level, row in result["summary"]["levels"].items()]
    for name, row in rows + [("all", result["summary"]["all"])]:
        cells = [f"{row[c]:>11d}" if c == "problems" else f"{row[c]:>11.1f}" if c == "mean_tokens"
                 else f"{row[c]:>11.3f}" for c in columns]
        lines.append(f"{name:>6} " + " ".join(cells))
    return "\n".join(lines)
