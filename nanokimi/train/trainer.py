"""The training loop: data -> model -> Muon/AdamW, with schedules, evaluation, checkpoints and resume.

One process or several (torchrun); the loop is the same and rank 0 does the talking and the writing.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanokimi.model import Transformer, build_model
from nanokimi.model.moe import update_router_bias
from nanokimi.checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
from nanokimi.train.config import RunConfig, to_toml
from nanokimi.train.distributed import clip_grad_norm_
from nanokimi.train.schedule import lr_factor


class TrainingError(RuntimeError):
    """The run cannot go on (bad loss, bad output folder); the message says what to do."""


def default_data_dir(run: RunConfig) -> Path:
    import hashlib

    if run.data.dir:
        return Path(run.data.dir)
    key = json.dumps([run.data.source, os.path.abspath(run.data.source) if run.data.source != "stdlib" else "",
                      run.data.text_field, run.data.vocab_size, run.data.tokenizer])
    slug = "stdlib" if run.data.source == "stdlib" else Path(run.data.source.split("*")[0].rstrip("/")).stem or "data"
    cache = Path(os.environ.get("NANOKIMI_CACHE", Path.home() / ".cache" / "nanokimi"))
    return cache / "data" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_data(run: RunConfig, progress: bool = True):
    from nanokimi.data import prepare

    data_dir = default_data_dir(run)
    manifest = prepare(run.data.source, data_dir, vocab_size=run.data.vocab_size,
                       tokenizer_path=run.data.tokenizer or None, text_field=run.data.text_field, progress=progress)
    return data_dir, manifest


@torch.no_grad()
def evaluate(model: Transformer, batches, bytes_per_token: float, autocast) -> dict:
    """Mean validation loss (nats/token) and bits per byte over the given batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        with autocast():
            total += model.loss(inputs, targets).item() * targets.numel()
        count += targets.numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}


class Trainer:
    def __init__(self, run: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.run, self.out = run, Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.progress = progress and self.is_main
        self.device = pick_device(run.train.device)
        self.checkpoint_dir = self.out / "checkpoint"
        self._check_output_dir(resume)

        torch.manual_seed(run.train.seed)
        t = run.train
        self.micro_batch = t.batch_size // t.grad_accum // world_size
        if self.micro_batch * t.grad_accum * world_size != t.batch_size:
            raise TrainingError(f"train.batch_size={t.batch_size} must be divisible by grad_accum={t.grad_accum} "
                                f"times the number of processes ({world_size}).")
        self._setup_data()
        self._build_model_and_optimizer()
        self.step, self.tokens = 0, 0
        self.last_good = None
        if resume:
            from nanokimi.train.sharded_checkpoint import is_sharded_checkpoint
            if not ((self.checkpoint_dir / "trainer.pt").is_file() or is_sharded_checkpoint(self.checkpoint_dir)):
                raise TrainingError(f"--resume: '{self.out}' has no checkpoint to continue from "
                                    f"({self.checkpoint_dir} is missing). Start it without --resume.")
            self._resume()

    def _setup_data(self) -> None:
        """self.data_dir, self.manifest, self.tokenizer_file and self.stream, whose next() is a micro batch: the
        arguments of self.loss_fn, here (inputs, targets). Post-training (nanokimi.post) brings its own."""
        from nanokimi.data import TokenStream

        t = self.run.train
        self.data_dir, self.manifest = prepare_data(self.run, progress=self.progress)
        self.tokenizer_file = self.data_dir / self.manifest.tokenizer["file"]
        vocab = self.manifest.tokenizer["vocab_size"]
        if self.run.model.vocab_size < vocab:
            self.run.model = self.run.model.replace(vocab_size=vocab)
        self.stream = TokenStream(self.data_dir, "train", self.micro_batch, t.seq_len, seed=t.seed,
                                  rank=self.rank, world_size=self.world_size, device=self.device)

    def start_from(self, model: Transformer) -> None:
        """Set the weights the run starts from, before sharding: pretraining keeps build_model's random init;
        fine-tuning loads its base checkpoint here."""

    def _build_model_and_optimizer(self) -> None:
        """self.model (sharded across ranks, compiled if asked), self.loss_fn and self.optimizer from self.run."""
        from nanokimi.optim import build_optimizer
        from nanokimi.optim.qk_clip import enable_qk_clip_recording

        t, o = self.run.train, self.run.optim
        self.model = build_model(self.run.model, device=self.device)
        self.start_from(self.model)
        if self.world_size > 1:
            from nanokimi.train.distributed import shard_model
            shard_model(self.model, self.device, reshard_after_forward=t.fsdp_reshard,
                        reduce_dtype=torch.bfloat16 if t.fsdp_reduce_dtype == "bf16" else torch.float32)
        self.model.train()
        if t.compile:
            from nanokimi.train.fast import compile_model
            compile_model(self.model, fullgraph=self.device.type == "cuda")  # CPU fp32 MoE has a graph break
        self.loss_fn = self.model.loss
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         betas=(o.beta1, o.beta2), momentum=o.momentum)
        if o.cuda_graph:
            if self.world_size > 1:
                raise TrainingError("optim.cuda_graph=true works in a single process only (the sharded step talks "
                                    "to the other ranks); set optim.cuda_graph=false for multi-GPU runs.")
            from nanokimi.optim import CapturedStep
            self.optimizer = CapturedStep(self.optimizer)  # QK-Clip and router-bias updates stay in place, outside
        if o.qk_clip:
            enable_qk_clip_recording(self.model)

    def _check_output_dir(self, resume: bool) -> None:
        holds_run = (self.out / "metrics.jsonl").exists() or self.checkpoint_dir.exists()
        if holds_run and not resume:
            raise TrainingError(f"'{self.out}' already holds a training run. Pass --resume to continue it, "
                                "or choose another --out.")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def _resume(self) -> None:
        from safetensors.torch import load_model

        from nanokimi.train.sharded_checkpoint import is_sharded_checkpoint, load_into

        if self.world_size > 1 or is_sharded_checkpoint(self.checkpoint_dir):
            state = load_into(self.checkpoint_dir, self.model, self.optimizer)
        else:
            load_model(self.model, str(self.checkpoint_dir / "model.safetensors"), strict=False, device=str(self.device))
            state = load_trainer_state(self.checkpoint_dir)
            self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.last_good = self.checkpoint_dir
        metrics = self.out / "metrics.jsonl"
        if self.is_main and metrics.exists():  # drop lines logged after the checkpoint
            lines = [l for l in metrics.read_text().splitlines() if l and json.loads(l)["step"] <= self.step]
            metrics.write_text("".join(l + "\n" for l in lines))

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> float:
        t, o = self.run.train, self.run.optim
        factor = lr_factor(self.step, t.max_steps, o)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            batch = next(self.stream)
            with self.autocast():
                loss = self.loss_fn(*batch)
            (loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        total = self._all_reduce_mean(total)
        if self.world_size > 1:
            from nanokimi.train.distributed import sync_step_statistics
            sync_step_statistics(self.model)
        if t.grad_clip > 0:
            clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if o.router_bias_rate > 0:
            update_router_bias(self.model, o.router_bias_rate)
        if o.qk_clip:
            from nanokimi.optim.qk_clip import apply_qk_clip
            apply_qk_clip(self.model, o.qk_clip_tau)
        value = total.item()  # read after the update is queued, so the GPU never idles while the host checks
        if not math.isfinite(value):
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was saved yet"
            raise TrainingError(f"loss became {value} at step {self.step + 1}; {where}. Lower optim.lr, raise "
                                "warmup, or check the data.")
        self.step += 1
        self.tokens += t.batch_size * t.seq_len
        return value

    def _all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    def evaluate(self) -> dict:
        from nanokimi.data import iter_eval

        batches = iter_eval(self.data_dir, "val", self.micro_batch * self.run.train.grad_accum,
                            self.run.train.seq_len, self.run.train.eval_batches, rank=self.rank,
                            world_size=self.world_size, device=self.device)
        result = evaluate(self.model, batches, self.manifest.bytes_per_token("val"), self.autocast)
        if self.world_size > 1:
            stacked = self._all_reduce_mean(torch.tensor([result["val_loss"], result["val_bpb"]], device=self.device))
            result = {"val_loss": stacked[0].item(), "val_bpb": stacked[1].item()}
        return result

    def save(self) -> Path:
        state = {"data": self.stream.state_dict(), "rng": rng_state(),
                 "step": self.step, "tokens": self.tokens, "run": self.run.to_dict(), "data_dir": str(self.data_dir)}
        if self.world_size > 1:
            from nanokimi.train.sharded_checkpoint import save_sharded_checkpoint
            save_sharded_checkpoint(self.checkpoint_dir, self.model, self.optimizer, state, self.tokenizer_file)
        elif self.is_main:
            state["optimizer"] = self.optimizer.state_dict()
            save_checkpoint(self.checkpoint_dir, self.model, state, self.tokenizer_file)
        self.last_good = self.checkpoint_dir
        return self.checkpoint_dir

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        t = self.run.train
        if self.is_main:
            (self.out / "config.toml").write_text(to_toml(self.run))
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        last_eval: dict = {}
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < (min(t.stop_at, t.max_steps) if t.stop_at else t.max_steps):
                loss = self.train_step()
                window_tokens += t.batch_size * t.seq_len
                record = None
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                              "tokens": self.tokens, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    last_eval = self.evaluate()
                    record = {**(record or {"step": self.step, "loss": loss, "tokens": self.tokens}), **last_eval}
                if record:
                    self.log(record)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    **({"val_bpb": f"{last_eval['val_bpb']:.3f}"} if last_eval else {}))
                bar.update(1)
                if self.step % t.save_every == 0 and self.step < t.max_steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            raise TrainingError(f"interrupted at step {self.step}; saved {path}. Continue with --resume.") from None
        bar.close()
        self.save()
        return {"step": self.step, "tokens": self.tokens, **last_eval}
