"""The training loop: data -> model -> Muon/AdamW, with schedules, evaluation, checkpoints and resume.

One process or several (torchrun); the loop is the same and rank 0 does the talking and the writing.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from nanokimi.model import Transformer
from nanokimi.checkpoint import (CHECKPOINTS, CheckpointError, load_trainer_state, load_weights, rng_state,
                                 run_checkpoint, save_step, set_rng_state, write_checkpoint_files)
from nanokimi.train.config import RunConfig, to_toml
from nanokimi.train.schedule import lr_factor
from nanokimi.train.step import TrainStep, build_model_and_optimizer, choose_step, plan_loss


class TrainingError(RuntimeError):
    """The run cannot go on (bad loss, bad output folder); the message says what to do."""


def default_data_dir(run: RunConfig) -> Path:
    import hashlib

    if run.data.dir:
        return Path(run.data.dir)
    key = [run.data.source, os.path.abspath(run.data.source) if run.data.source != "stdlib" else "",
           run.data.text_field, run.data.vocab_size, run.data.tokenizer]
    key = json.dumps(key + [run.data.max_mb] if run.data.max_mb else key)
    slug = "stdlib" if run.data.source == "stdlib" else Path(run.data.source.split("*")[0].rstrip("/")).stem or "data"
    cache = Path(os.environ.get("NANOKIMI_CACHE", Path.home() / ".cache" / "nanokimi"))
    return cache / "data" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # the name itself was checked by RunConfig.validate
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name} but this torch build sees no CUDA GPU "
                            f"(torch {torch.__version__}); use train.device=cpu or train.device=auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"train.device={name} but there are only {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"train.device={name} but MPS is not available here; use train.device=cpu.")
    return device


def prepare_data(run: RunConfig, progress: bool = True):
    """Tokenise the run's source (once; again when its files changed) into the run's data folder."""
    from nanokimi.data import prepare

    data_dir = default_data_dir(run)
    manifest = prepare(run.data.source, data_dir, vocab_size=run.data.vocab_size,
                       tokenizer_path=run.data.tokenizer or None, text_field=run.data.text_field, progress=progress,
                       max_chars=int(run.data.max_mb * 1e6), refresh_changed_source=True)
    return data_dir, manifest


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGUSR1 (Slurm's warning before pre-emption, with --signal) only
    record that a stop was asked for, so the loop can finish its step, save and exit. A second Ctrl-C
    stops at once (KeyboardInterrupt). Handlers are installed only in the main thread."""

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


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
    fixed_batches = True  # every step's batches have one shape and the loss is model.loss (see choose_step)

    def __init__(self, run: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.run, self.out = run, Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.progress = progress and self.is_main
        self.device = pick_device(run.train.device)
        self.checkpoints = self.out / CHECKPOINTS
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
        self.last_good: Path | None = None
        if resume:
            self._resume()

    @property
    def checkpoint_dir(self) -> Path:
        """The newest checkpoint of this run (the step folder `latest` names), or where they go."""
        return self.last_good or self.checkpoints

    def _check_val_split(self) -> None:
        """Fail before any work when the validation split cannot hold one evaluation window."""
        t = self.run.train
        val = self.manifest.splits["val"].tokens
        if val < t.seq_len + 1:
            raise TrainingError(
                f"the validation split of {self.data_dir} has {val} tokens, fewer than one window of "
                f"train.seq_len + 1 = {t.seq_len + 1}: the source {self.run.data.source!r} is too small or is one "
                f"document ({self.manifest.splits['train'].documents + self.manifest.splits['val'].documents} "
                "document(s)). Give a bigger source (a folder of files, or a text with blank lines between parts), "
                "or a smaller train.seq_len.")

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
        self._check_val_split()
        self.stream = TokenStream(self.data_dir, "train", self.micro_batch, t.seq_len, seed=t.seed,
                                  rank=self.rank, world_size=self.world_size, device=self.device)

    def start_from(self, model: Transformer) -> None:
        """Set the weights the run starts from, before sharding: pretraining keeps build_model's random init;
        fine-tuning loads its base checkpoint here."""

    def _build_model_and_optimizer(self) -> None:
        """self.plan (how the step runs: nanokimi.train.step.choose_step), self.model (sharded across ranks,
        compiled as planned), self.loss_fn and self.optimizer from self.run."""
        self.plan = choose_step(self.run, self.device, self.world_size, fixed_batches=self.fixed_batches)
        self.model, self.optimizer = build_model_and_optimizer(self.run, self.device, self.plan, self.world_size,
                                                               start_from=self.start_from)
        self.loss_fn = plan_loss(self.model, self.plan)  # fine-tuning trainers set their own
        self._step: TrainStep | None = None

    @property
    def step_fn(self) -> TrainStep:
        """The step this run takes (built at the first step, after a subclass has set its loss_fn)."""
        if self._step is None:
            self._step = TrainStep(self.model, self.optimizer, self.run, self.plan, self.device, self.loss_fn,
                                   self.world_size)
        return self._step

    def _check_output_dir(self, resume: bool) -> None:
        found = run_checkpoint(self.out, warn=False)
        if found is not None and not resume:
            raise TrainingError(f"'{self.out}' already holds a training run (checkpoint {found}). Pass --resume to "
                                "continue it, or choose another --out.")
        if found is None and resume:
            raise TrainingError(f"--resume: '{self.out}' has no checkpoint to continue from (no complete "
                                f"{CHECKPOINTS}/step-N: the run stopped before its first save). Start it again "
                                "without --resume.")
        if self.is_main:
            metrics = self.out / "metrics.jsonl"
            if found is None and metrics.exists():
                warnings.warn(f"'{self.out}' holds a run that saved no checkpoint; starting it over.", stacklevel=3)
                metrics.unlink()
            self.out.mkdir(parents=True, exist_ok=True)

    def _resume(self) -> None:
        from nanokimi.train.sharded_checkpoint import is_sharded_checkpoint, load_into

        path = run_checkpoint(self.out)
        state = load_trainer_state(path)
        self._check_same_run(path, state.get("run", {}))
        try:
            if self.world_size > 1 or is_sharded_checkpoint(path):
                state = load_into(path, self.model, self.optimizer)
            else:
                load_weights(self.model, path, self.device, fix=f"delete {path} to resume from the step before it",
                             check=False)
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise TrainingError(f"cannot load {path} into this run ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                "resume with the run's own model and optim settings, or start a new --out.") from None
        self._resume_data(state["data"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.last_good = path
        if self.is_main:
            self._truncate_metrics()

    def _check_same_run(self, path: Path, saved: dict) -> None:
        """The model and the optimizer's kind cannot change on resume (lr, schedule and steps can)."""
        now = self.run.to_dict()
        model = saved.get("model", {})
        differ = [k for k in now["model"] if k in model and model[k] != now["model"][k]]
        if differ:
            what = ", ".join(f"model.{k}={model[k]!r} there, {now['model'][k]!r} now" for k in differ[:4])
            raise TrainingError(f"--resume: the checkpoint {path} holds another model ({what}). The model cannot "
                                "change on resume: drop those overrides, or start a new --out.")
        name = saved.get("optim", {}).get("name")
        if name is not None and name != self.run.optim.name:
            raise TrainingError(f"--resume: the checkpoint {path} was trained with optim.name={name}, this run asks "
                                f"for optim.name={self.run.optim.name}; resume with optim.name={name}, or start a new "
                                "--out.")

    def _resume_data(self, saved: dict) -> None:
        """Continue the data stream; if the source changed since the save, start the next epoch of the new data."""
        if saved.get("tokens") != len(self.stream.tokens) and all(
                saved.get(k) == self.stream.state_dict()[k] for k in ("seed", "seq_len", "split")):
            if self.is_main:
                warnings.warn(f"the data changed since the checkpoint ({saved.get('tokens')} training tokens then, "
                              f"{len(self.stream.tokens)} now: the source was edited); the run continues on the new "
                              "data from the start of a new epoch.", stacklevel=3)
            saved = {**saved, "tokens": len(self.stream.tokens), "epoch": int(saved["epoch"]) + 1, "index": 0}
        self.stream.load_state_dict(saved)

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint (and a torn last line, with a warning)."""
        from nanokimi.train.plot import read_metrics

        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            records = [r for r in read_metrics(self.out) if r.get("step", 0) <= self.step]
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, metrics)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> float:
        t = self.run.train
        batches = [next(self.stream) for _ in range(t.grad_accum)]
        total = self.step_fn(batches, lr_factor(self.step, t.max_steps, self.run.optim))
        value = total.item()  # read after the update is queued, so the GPU never idles while the host checks
        if not math.isfinite(value):
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was saved yet"
            raise TrainingError(f"loss became {value} at step {self.step + 1}; {where}. Lower optim.lr, raise "
                                "warmup, or check the data.")
        self.step += 1
        self.tokens += t.batch_size * t.seq_len
        return value

    def describe_step(self) -> str:
        """The step's path for the `paths:` line, e.g. `step=graph (compiled, whole step in one CUDA graph, ...)`."""
        return self.plan.describe()

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
        """Write RUN/checkpoints/step-N and point `latest` at it (see nanokimi.checkpoint)."""
        run = self.run.to_dict()
        run["train"]["stop_at"] = 0
        state = {"data": self.stream.state_dict(), "rng": rng_state(),
                 "step": self.step, "tokens": self.tokens, "run": run, "data_dir": str(self.data_dir)}
        keep = self.run.train.keep_checkpoints
        try:
            if self.world_size > 1:
                from nanokimi.train.sharded_checkpoint import save_sharded_checkpoint
                path = save_sharded_checkpoint(self.out, self.step, self.model, self.optimizer, state,
                                               self.tokenizer_file, keep=keep, extra_files=self.write_extra_files)
            else:
                state["optimizer"] = self.optimizer.state_dict()

                def write(tmp: Path) -> None:
                    write_checkpoint_files(tmp, self.model, state, self.tokenizer_file)
                    self.write_extra_files(tmp)

                path = save_step(self.out, self.step, write, keep=keep)
        except OSError as e:
            kept = f"the previous checkpoint {self.last_good} is kept" if self.last_good else "no checkpoint was kept"
            raise TrainingError(f"could not save step {self.step} to {self.checkpoints} ({e.strerror or e}"
                                f"{': ' + e.filename if e.filename else ''}); {kept}. Free space there and continue "
                                "with --resume.") from None
        self.last_good = path
        return path

    def write_extra_files(self, folder: Path) -> None:
        """Files a subclass adds to every checkpoint (fine-tuning: tokenizer files, chat template), written by
        rank 0 into the step's temporary folder before it is renamed into place."""

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _stop_requested(self, signals: StopSignals) -> bool:
        asked = signals.received is not None
        if self.world_size > 1:  # every rank stops at the same step, or the collectives would hang
            import torch.distributed as dist
            flag = torch.tensor([float(asked)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def fit(self) -> dict:
        t = self.run.train
        if self.is_main:
            saved = copy.deepcopy(self.run)
            saved.train.stop_at = 0  # stop_at belongs to one invocation, not to the run
            (self.out / "config.toml").write_text(to_toml(saved))
        with StopSignals() as signals:
            return self._fit(signals)

    def _fit(self, signals: StopSignals) -> dict:
        t = self.run.train
        start = self.step
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
                    paused = time.perf_counter()
                    last_eval = self.evaluate()
                    window_start += time.perf_counter() - paused  # tokens_per_s counts training time only
                    record = {**(record or {"step": self.step, "loss": loss, "tokens": self.tokens}), **last_eval}
                if record:
                    self.log(record)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    **({"val_bpb": f"{last_eval['val_bpb']:.3f}"} if last_eval else {}))
                bar.update(1)
                if self._stop_requested(signals):
                    bar.close()
                    path = self.save()
                    how = "interrupted" if signals.received in (None, "SIGINT") else f"stopped by {signals.received}"
                    raise TrainingError(f"{how} at step {self.step}; saved {path}. Continue with: nanokimi train "
                                        f"--out {self.out} --resume")
                if self.step % t.save_every == 0 and self.step < t.max_steps:
                    paused = time.perf_counter()
                    self.save()
                    window_start += time.perf_counter() - paused
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
            bar.close()
            where = f"the last checkpoint is {self.last_good}" if self.last_good else "no checkpoint was saved"
            raise TrainingError(f"interrupted twice at step {self.step}: stopped without saving; {where}.") from None
        bar.close()
        if self.step > start or self.last_good is None:
            self.save()
        if not last_eval and t.eval_batches > 0:
            last_eval = self.evaluate()
        return {"step": self.step, "tokens": self.tokens, "start_step": start, **last_eval}
