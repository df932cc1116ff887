"""A small chat model pretrained from scratch on ladder problems, for the LEPA demonstration.

The model learns three kinds of chat turns from generated problems (nanokimi.tasks.ladder):
  plain       user: the problem                      assistant: the trace (one operation per line, '#### N')
  planned     user: the problem + 'plan first'       assistant: 'plan:' operation skeleton 'solution:' trace
  reflection  user: problem, a wrong plan and trace, the answer    assistant: the right skeleton
The skeleton is the trace without its values ("w = k + p" per step): the order in which to compute. Training
runs nanokimi.post.sft (loss on the assistant turns) from random weights.
"""
import json
import random
import time
from pathlib import Path

import torch
from perf_common import finish_training, train_for_seconds

from nanokimi import ModelConfig, build_model
from nanokimi.post.lepa import Templates
from nanokimi.tasks import get_task

TEMPLATES = Templates(plan_prompt="{question}\nplan first", solve_prompt="{question}",
                      response="plan:\n{plan}\nsolution:\n{solution}",
                      reflect_prompt="{question}\nplan:\n{plan}\nsolution:\n{solution}\nanswer: {answer}\nbetter plan")


def skeleton(example) -> str:
    """The trace's operations without their values: 'w = k + p' per line."""
    return "\n".join(line.rsplit(" = ", 1)[0] for line in example.solution.splitlines() if not line.startswith("####"))


def wrong_attempt(example, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong (plan, solution): a step dropped or two swapped, and a trace ending in a wrong answer."""
    steps = skeleton(example).splitlines()
    if len(steps) > 1 and rng.random() < 0.5:
        i = rng.randrange(len(steps) - 1)
        steps[i], steps[i + 1] = steps[i + 1], steps[i]
    elif len(steps) > 1:
        del steps[rng.randrange(len(steps))]
    wrong = int(example.answer) + rng.choice([-3, -2, -1, 1, 2, 3])
    trace = example.solution.rsplit("####", 1)[0] + f"#### {wrong}"
    return "\n".join(steps) or "think", trace


def pretraining_conversations(levels: str, count: int, seed: int = 0) -> list[dict]:
    """`count` chat records (nanokimi sft's prompt/completion lines) over the levels, held-out test problems
    excluded: 40% plain, 40% planned, 20% reflections."""
    task = get_task("ladder", levels=levels, per_level=50, seed=seed)
    rng = random.Random(seed)
    t = TEMPLATES
    records = []
    for example in task.export(count, split="pretrain", exclude_split="test"):
        question = task.format_question(example).strip()
        kind = rng.random()
        if kind < 0.4:
            records.append({"prompt": t.solve_prompt.format(question=question), "completion": example.solution})
        elif kind < 0.8:
            records.append({"prompt": t.plan_prompt.format(question=question),
                            "completion": t.response.format(plan=skeleton(example), solution=example.solution)})
        else:
            plan, trace = wrong_attempt(example, rng)
            records.append({"prompt": t.reflect_prompt.format(question=question, plan=plan, solution=trace,
                                                              answer=example.answer),
                            "completion": skeleton(example)})
    return records


def build_ladder_model(out: Path, levels: str, docs: int, seconds: float, batch_size: int, device: str,
                       seed: int = 0, size: dict | None = None, max_steps: int = 1_000_000) -> tuple[Path, dict]:
    """Tokenizer + random model saved to out/init, then trained with nanokimi's SFTTrainer (loss on the replies)
    for `seconds` (the schedule sized from the measured step time) or max_steps; returns (checkpoint, facts)."""
    from nanokimi.checkpoint import load_model_checkpoint, save_checkpoint
    from nanokimi.data import Tokenizer
    from nanokimi.post.sft import SFTTrainer, load_sft_config

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    records = pretraining_conversations(levels, docs, seed)
    data = out / "pretrain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.train([r["prompt"] + "\n" + r["completion"] for r in records[:4000]], vocab_size=384)
    tok.save(out / "tokenizer.json")
    shape = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64, intermediate_size=1152,
                 max_position_embeddings=1024)
    shape.update(size or {})
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, **shape)
    torch.manual_seed(seed)
    save_checkpoint(out / "init", build_model(cfg), tokenizer_file=out / "tokenizer.json")
    base = load_model_checkpoint(out / "init", "cpu")
    run, sft = load_sft_config(base.config, str(data), [
        "train.max_steps=1000000", f"train.batch_size={batch_size}", "train.seq_len=512", f"train.device={device}",
        "optim.name=adamw", "optim.lr=2e-3", "optim.warmup_steps=50", "optim.weight_decay=0.0",
        "optim.min_lr_ratio=0.05", "sft.val_fraction=0"])
    trainer = SFTTrainer(base, out / "init", run, sft, out / "pretrain", progress=False)
    prepared = time.perf_counter()
    probe = min(10, max_steps)
    losses, per_step = train_for_seconds(trainer, seconds, started, warm=probe // 3, probe=probe, margin=0.95,
                                         max_steps=max_steps)
    print(f"ladder model: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M params, "
          f"{trainer.data_stats['conversations']} conversations ready in {prepared - started:.0f} s, "
          f"{per_step * 1e3:.0f} ms/step -> {trainer.run.train.max_steps} steps", flush=True)
    finish_training(trainer, losses, log_every=250)
    path = trainer.save()
    facts = {"params": sum(p.numel() for p in trainer.model.parameters()), "steps": trainer.step,
             "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.perf_counter() - started, 1),
             "conversations": trainer.data_stats["conversations"], "shape": shape}
    del trainer
    return path, facts
