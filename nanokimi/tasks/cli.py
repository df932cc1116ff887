"""`nanokimi eval --task NAME` and `nanokimi tasks export NAME`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nanokimi.tasks import TASKS, TaskError, get_task
from nanokimi.tasks.base import GeneratedTask


def parse_options(pairs: list[str]) -> dict:
    """['levels=1-8', 'per_level=20', 'temperature=0.5'] -> {'levels': '1-8', 'per_level': 20, ...}."""
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise TaskError(f"task options look like key=value (e.g. levels=1-8), got {pair!r}.")
        for convert in (int, float):
            try:
                value = convert(value)
                break
            except ValueError:
                continue
        options[key.replace("-", "_")] = value
    return options


def parse_ks(text: str | None, n: int) -> list[int]:
    if text is None:
        return sorted({1, n})
    try:
        return sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise TaskError(f"--k takes comma-separated integers such as 1,4,16, got {text!r}.") from None


def build_task(name: str, data: str | None, few_shot: int, options: list[str]):
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    kwargs = parse_options(options)
    if name in ("gsm8k", "math500"):
        if data is None:
            raise TaskError(f"--task {name} reads a local jsonl: pass --data PATH (a {name} test.jsonl or its folder).")
        kwargs["path"] = data
    elif data is not None:
        raise TaskError(f"--task {name} is generated; it takes no --data (options go as key=value, e.g. levels=1-8).")
    return get_task(name, few_shot=few_shot, **kwargs)


def load_chat_template(ckpt: str):
    try:
        from nanokimi.data.chat import ChatTemplate
    except ImportError:
        raise TaskError("--chat needs nanokimi.data.chat (the chat template), which this install lacks.") from None
    from nanokimi.checkpoint import resolve_checkpoint

    return ChatTemplate.load(resolve_checkpoint(ckpt))


def run_eval(args) -> int:
    from nanokimi.tasks.evaluate import evaluate_task, format_table, load_generate_fn

    task = build_task(args.task, args.data, args.few_shot, args.options)
    ks = parse_ks(args.k, args.n)
    if ks[-1] > args.n or ks[0] < 1:
        raise TaskError(f"every k must lie in 1..n; got --k {args.k} with --n {args.n}.")
    task.examples("test", args.limit)  # a missing or broken data file fails before the model loads
    chat_template = load_chat_template(args.ckpt) if args.chat else None
    generate_fn = load_generate_fn(args.ckpt)
    result = evaluate_task(task, generate_fn, n=args.n, ks=ks, temperature=args.temperature,
                           max_tokens=args.max_tokens, seed=args.seed, limit=args.limit, progress=not args.no_progress,
                           chat_template=chat_template)
    result["settings"].update(checkpoint=args.ckpt, data=args.data, options=parse_options(args.options))
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_export_args(parser):
    parser.add_argument("task", help="a generated task: ladder or mused")
    parser.add_argument("--out", required=True, help="jsonl file: one {'text', 'id', 'difficulty', 'answer'} per line")
    parser.add_argument("--count", type=int, default=10_000, help="problems to write (spread evenly over the levels)")
    parser.add_argument("--levels", default=None, help="e.g. 1-8 (ladder: operations; mused: depth)")
    parser.add_argument("options", nargs="*", metavar="key=value", help="task options, e.g. seed=1 distractors=2")
    return parser


def run_export(args) -> int:
    options = parse_options(args.options)
    if args.levels is not None:
        options["levels"] = args.levels
    task = get_task(args.task, **options)
    if not isinstance(task, GeneratedTask):
        raise TaskError(f"export writes generated tasks (ladder, mused); {args.task} reads its own data file.")
    if args.count < 1:
        raise TaskError(f"--count must be >= 1, got {args.count}.")
    from tqdm import tqdm

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for example in tqdm(task.export(args.count), total=args.count, desc=f"export {args.task}", file=sys.stderr):
            row = {"text": task.sft_text(example), "id": example.id, "difficulty": example.difficulty,
                   "answer": example.answer}
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.count} {args.task} problems (levels {','.join(map(str, task.levels))}) to {args.out}")
    return 0
