"""Supervised fine-tuning on chat data: `nanokimi sft --ckpt BASE --data FILE.jsonl`.

Each jsonl line is {"messages": [...], "tools": [...] (optional)} or {"prompt": "...", "completion": "..."}.
A conversation is rendered with the base checkpoint's chat template (Kimi's format by default), tokenized,
and learned on its assistant turns only (sft.train_on="assistant"; "all" learns every token). Conversations
are packed into rows of train.seq_len tokens (best fit, longest first); the model keeps them apart
(nanokimi.model.packing), so a packed batch gives the loss of the conversations run one by one. The loss is
the mean over all learned tokens of the step, whatever the accumulation and the number of GPUs.

The loop is the pretraining Trainer's (progress, checkpoints, resume, FSDP2, Muon); this module brings the
data, the base weights and its own defaults (a lower learning rate, a schedule counted in epochs).
"""
from __future__ import annotations

import bisect
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nanokimi.config import ConfigError, ModelConfig, from_dict, suggest
from nanokimi.data import DataError, load_tokenizer
from nanokimi.data.chat import ChatTemplate, encode_conversation
from nanokimi.data.corpus import hash_unit, read_jsonl
from nanokimi.data.tokenizer import HF_TOKENIZER, TOKENIZER_FILES, TokenizerBase
from nanokimi.model import Transformer
from nanokimi.model.packing import Documents
from nanokimi.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, parse_value
from nanokimi.train.trainer import Trainer, TrainingError

IGNORE = -100
TRAIN_DEFAULTS = dict(batch_size=8, seq_len=512, max_steps=0, log_every=5, eval_every=50, save_every=100,
                      eval_batches=8, sample_tokens=0)
OPTIM_DEFAULTS = dict(lr=3e-4, weight_decay=0.0, warmup_steps=10, min_lr_ratio=0.1)


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    epochs: float = 2.0  # passes over the training conversations; sets train.max_steps unless that is given
    pack: bool = True  # several conversations per row (False: one per row, padded; needed for MoBA layers)
    train_on: str = "assistant"  # "assistant": loss on assistant turns only; "all": on every token
    val_fraction: float = 0.05  # share of conversations held out (by hash of the line) for the validation loss


@dataclass(frozen=True, slots=True)
class Conversation:
    where: str  # "FILE line N", for errors
    text: str  # the jsonl line: its hash picks the split
    messages: list[dict]
    tools: list[dict] | None = None


@dataclass(slots=True)
class Example:
    inputs: list[int]  # [n]
    targets: list[int]  # [n], IGNORE where not learned


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every non-empty line of a chat jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT data {path} does not exist; give a .jsonl file of {{\"messages\": [...]}} lines.")
    out = []
    for line_no, line, record in read_jsonl(path):
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages, tools = record["messages"], record.get("tools")
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) \
                and isinstance(record.get("completion"), str):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            tools = None
        else:
            raise DataError(f"{path} line {line_no} must be {{\"messages\": [...]}} or {{\"prompt\": \"...\", "
                            f"\"completion\": \"...\"}}; got {line.strip()[:80]!r}.")
        out.append(Conversation(f"{path} line {line_no}", line, messages, tools))
    if not out:
        raise DataError(f"{path} holds no conversations.")
    return out


def build_examples(conversations: list[Conversation], tokenizer: TokenizerBase, template: ChatTemplate, seq_len: int,
                   train_on: str = "assistant") -> tuple[list[Example], dict]:
    """Tokenize and mask conversations -> (examples of at most seq_len tokens, counts of what was cut or dropped)."""
    examples, stats = [], {"conversations": 0, "truncated": 0, "no_target": 0}
    for c in conversations:
        try:
            ids, mask = encode_conversation(tokenizer, template, c.messages, tools=c.tools, train_on=train_on)
        except DataError as e:
            raise DataError(f"{c.where}: {e}") from e
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        stats["truncated"] += len(ids) == seq_len + 1
        targets = [t if learn else IGNORE for t, learn in zip(ids[1:], mask[1:])]
        if all(t == IGNORE for t in targets):
            stats["no_target"] += 1
            continue
        examples.append(Example(ids[:-1], targets))
        stats["conversations"] += 1
    return examples, stats


def pack_rows(examples: list[Example], seq_len: int, pack: bool = True) -> list[list[Example]]:
    """Group examples into rows of at most seq_len tokens: best fit, longest first (pack=False: one per row)."""
    if not pack:
        return [[e] for e in examples]
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for e in sorted(examples, key=lambda e: -len(e.inputs)):
        at = bisect.bisect_left(free, (len(e.inputs), -1))
        if at == len(free):
            rows.append([e])
            bisect.insort(free, (seq_len - len(e.inputs), len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(e)
            bisect.insort(free, (room - len(e.inputs), row))
    return rows


def collate(rows: list[list[Example]], seq_len: int, pad_id: int, pack: bool, device=None):
    """Rows of examples -> (inputs [B, T], targets [B, T], Documents or None). The padding after a row's last
    example (no targets) joins that example's document: it comes after it, so it cannot change it, and KDA's
    per-document work on the CPU does not grow by a document per row."""
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    labels = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for d, e in enumerate(row):
            n = len(e.inputs)
            inputs[b, start:start + n] = torch.tensor(e.inputs)
            targets[b, start:start + n] = torch.tensor(e.targets)
            labels[b, start:start + n] = d
            start += n
        labels[b, start:] = len(row) - 1
    documents = Documents.from_ids(labels).to(device) if pack else None  # built on the host: no device syncs
    return inputs.to(device), targets.to(device), documents


class RowStream:
    """Micro batches of packed rows, epoch after epoch, each epoch in its own seeded order; resumable.

    Global batches take the next micro_batch * world_size rows of the sequence; rank r takes its slice
    [r * micro_batch, (r + 1) * micro_batch), like nanokimi.data.TokenStream. A micro batch is
    (inputs, targets, documents, weight): weight = micro batches per step (grad_accum * world_size) / learned
    tokens in the whole step, so that its loss sum times weight, averaged by the Trainer over micro batches and
    ranks, is the mean over every learned token of the step."""

    def __init__(self, rows, micro_batch: int, seq_len: int, pad_id: int, pack: bool, seed: int,
                 rank: int = 0, world_size: int = 1, device=None, grad_accum: int = 1):
        self.rows, self.micro_batch, self.seq_len, self.pad_id, self.pack = rows, micro_batch, seq_len, pad_id, pack
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.step_rows = micro_batch * world_size * grad_accum
        self.learned = [sum(t != IGNORE for e in row for t in e.targets) for row in rows]  # per row
        self.consumed = 0  # rows of all ranks taken so far
        self._orders: dict[int, list[int]] = {}

    def _index(self, position: int) -> int:
        epoch, index = divmod(position, len(self.rows))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {**{e: o for e, o in self._orders.items() if e == epoch - 1},
                            epoch: torch.randperm(len(self.rows), generator=generator).tolist()}
        return self._orders[epoch][index]

    def __iter__(self):
        return self

    def __next__(self):
        first = self.consumed + self.rank * self.micro_batch
        batch = [self.rows[self._index(first + i)] for i in range(self.micro_batch)]
        step_start = self.consumed - self.consumed % self.step_rows
        learned = sum(self.learned[self._index(step_start + i)] for i in range(self.step_rows))
        self.consumed += self.micro_batch * self.world_size
        weight = self.step_rows // self.micro_batch / learned
        return (*collate(batch, self.seq_len, self.pad_id, self.pack, self.device), weight)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state["rows"] != len(self.rows):
            raise TrainingError(f"--resume: the run packed {state['rows']} rows, this data gives {len(self.rows)}; "
                                "resume with the same --data, train.seq_len and sft settings.")
        self.consumed = state["consumed"]


def load_sft_config(model: ModelConfig, data: str, overrides: list[str]) -> tuple[RunConfig, SFTConfig]:
    """Run settings from the base model and `section.key=value` overrides (sections train, optim, sft) over
    SFT's defaults. train.max_steps stays 0 (= from sft.epochs) unless given."""
    tree: dict[str, dict] = {"train": dict(TRAIN_DEFAULTS), "optim": dict(OPTIM_DEFAULTS), "sft": {}}
    for item in overrides:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or section not in tree:
            raise ConfigError(f"Override '{item}' must be section.key=value with section one of train, optim, sft "
                              f"(e.g. optim.lr=1e-4 or sft.epochs=3).{suggest(section, tree) if dot else ''}")
        tree[section][name] = parse_value(value.strip())
    max_steps = tree["train"]["max_steps"]
    train = from_dict(TrainConfig, {**tree["train"], "max_steps": max(max_steps, 1)}, "train.")
    train.max_steps = max_steps
    run = RunConfig(preset="sft", model=model, data=DataConfig(source=str(data)), train=train,
                    optim=from_dict(OptimConfig, tree["optim"], "optim."))
    sft = from_dict(SFTConfig, tree["sft"], "sft.")
    if sft.train_on not in ("assistant", "all"):
        raise ConfigError(f"sft.train_on='{sft.train_on}' must be 'assistant' or 'all'.")
    if not 0 <= sft.val_fraction < 1 or sft.epochs <= 0:
        raise ConfigError("need 0 <= sft.val_fraction < 1 and sft.epochs > 0.")
    return run, sft


class SFTTrainer(Trainer):
    """The pretraining Trainer with chat data, the base checkpoint's weights, and its tokenizer files kept."""

    fixed_batches = False  # packed conversations: each batch brings its own document boundaries

    def __init__(self, base: Transformer, base_dir: str | Path, run: RunConfig, sft: SFTConfig, out_dir, **kwargs):
        self.base, self.base_dir, self.sft = base, Path(base_dir), sft
        self.tokenizer = load_tokenizer(self.base_dir)
        self.template = ChatTemplate.load(self.base_dir)
        super().__init__(run, out_dir, **kwargs)
        self.base = None  # its weights are in self.model now

    def _setup_data(self) -> None:
        t = self.run.train
        if "B" in self.run.model.layer_mixers and self.sft.pack:
            raise TrainingError("this model has MoBA layers ('B'), which cannot keep packed conversations apart; "
                                "set sft.pack=false (one conversation per row).")
        conversations = read_conversations(self.run.data.source)
        val = [c for c in conversations if hash_unit(c.text) < self.sft.val_fraction]
        train = [c for c in conversations if hash_unit(c.text) >= self.sft.val_fraction]
        if not train:
            raise DataError(f"all {len(conversations)} conversations fell into validation; lower sft.val_fraction.")
        examples, self.data_stats = build_examples(train, self.tokenizer, self.template, t.seq_len, self.sft.train_on)
        if not examples:
            raise DataError(f"no conversation in {self.run.data.source} has an assistant turn to learn; check the "
                            "roles, or set sft.train_on=all.")
        self.val_examples, _ = build_examples(val, self.tokenizer, self.template, t.seq_len, self.sft.train_on)
        rows = pack_rows(examples, t.seq_len, self.sft.pack)
        if t.max_steps == 0:
            t.max_steps = max(1, math.ceil(self.sft.epochs * len(rows) / t.batch_size))
        self.run.validate()
        self.data_stats.update(rows=len(rows), val_conversations=len(self.val_examples))
        self.data_dir = Path(self.run.data.source)
        self.manifest = None
        self.tokenizer_file = self.base_dir / HF_TOKENIZER if (self.base_dir / HF_TOKENIZER).is_file() else None
        if self.run.model.vocab_size < self.tokenizer.vocab_size:
            raise TrainingError(f"the base model's vocabulary ({self.run.model.vocab_size}) is smaller than its "
                                f"tokenizer's ({self.tokenizer.vocab_size}); is {self.base_dir} one checkpoint?")
        self.stream = RowStream(rows, self.micro_batch, t.seq_len, self.tokenizer.eot_id, self.sft.pack, t.seed,
                                self.rank, self.world_size, self.device, t.grad_accum)

    def start_from(self, model: Transformer) -> None:
        model.load_state_dict(self.base.state_dict())

    def _build_model_and_optimizer(self) -> None:
        super()._build_model_and_optimizer()
        model = self.model

        def loss_fn(inputs, targets, documents, weight):  # this micro batch's share of the step's token mean
            return model.loss(inputs, targets, documents=documents) * (targets.ne(IGNORE).sum() * weight)

        self.loss_fn = loss_fn

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the learned tokens of the held-out conversations (and bits per UTF-8 byte of them)."""
        if not self.val_examples:
            return {}
        t = self.run.train
        rows = pack_rows(self.val_examples, t.seq_len, self.sft.pack)
        size = self.micro_batch * t.grad_accum
        mine = rows[self.rank::self.world_size][:size * t.eval_batches]
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, learned tokens
        for start in range(0, len(mine), size):
            inputs, targets, documents = collate(mine[start:start + size], t.seq_len, self.tokenizer.eot_id,
                                                 self.sft.pack, self.device)
            with self.autocast():
                loss = self.model.loss(inputs, targets, documents=documents)
            count = targets.ne(IGNORE).sum()
            total += torch.stack([loss.double() * count, count.double()])
        self.model.train(was_training)
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        learned = [t for e in self.val_examples for t in e.targets if t != IGNORE]
        bytes_per_token = len(self.tokenizer.decode(learned).encode("utf-8")) / max(len(learned), 1)
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / max(bytes_per_token, 1e-9)}

    def write_extra_files(self, folder: Path) -> None:
        """The base's tokenizer files and the chat template trained with, beside the Trainer's files."""
        for name in TOKENIZER_FILES:
            if (self.base_dir / name).is_file() and not (folder / name).is_file():
                shutil.copyfile(self.base_dir / name, folder / name)
        if not (folder / "chat_template.jinja").is_file():
            self.template.save(folder)

    def _resume_data(self, saved: dict) -> None:
        self.stream.load_state_dict(saved)  # RowStream checks that the data gives the same rows


def run_sft(ckpt: str, data: str, out: str, overrides: list[str], resume: bool = False,
            progress: bool = True) -> dict:
    """Fine-tune the checkpoint `ckpt` on `data`, writing the run to `out`; returns the Trainer's summary."""
    import sys

    from nanokimi.checkpoint import load_model_checkpoint, resolve_checkpoint

    base_dir = resolve_checkpoint(ckpt)
    base = load_model_checkpoint(base_dir, "cpu")
    run, sft = load_sft_config(base.config, data, overrides)
    trainer = SFTTrainer(base, base_dir, run, sft, out, resume=resume, progress=progress)
    s = trainer.data_stats
    print(f"sft {base_dir} on {data}: {s['conversations']} conversations in {s['rows']} rows of {run.train.seq_len} "
          f"tokens ({'packed' if sft.pack else 'one per row'}), {s['truncated']} truncated, {s['no_target']} without "
          f"assistant tokens dropped, {s['val_conversations']} held out; {run.train.max_steps} steps; writing {out}",
          file=sys.stderr)
    result = trainer.fit()
    result["checkpoint"] = str(trainer.checkpoint_dir)
    return result
