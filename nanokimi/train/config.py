"""The run configuration: model, data, training and optimizer sections, loaded from a preset, a TOML
file and dotted `key=value` overrides, in that order."""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nanokimi.config import ConfigError, ModelConfig, from_dict, suggest
from nanokimi.runtime.attnres import STORAGES as ATTNRES_STORAGES

MAX_VOCAB = 1 << 21

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib", a text file, a folder, a glob, or a .jsonl file
    text_field: str = "text"  # jsonl only
    vocab_size: int = 4096  # BPE trained on the corpus, unless `tokenizer` names a tokenizer.json
    tokenizer: str = ""
    max_mb: float = 8.0  # tokenise a fixed sample of whole documents of about this many million characters; 0 = all
    dir: str = ""  # where token shards live; default: a cache folder keyed by source and settings


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    batch_size: int = 16  # sequences per optimizer step (global, over all ranks and accumulation steps)
    seq_len: int = 128
    grad_accum: int = 1
    max_steps: int = 120  # length of the schedule
    stop_at: int = 0  # this invocation stops and saves after this step (0 = run to max_steps); never saved with the run
    seed: int = 1337
    device: str = "auto"  # "auto" = cuda when available
    # how the step runs (nanokimi.train.step.choose_step): "auto" takes the fastest path valid for the run;
    # true / false force one. `nanokimi train` prints the choice in its `paths:` line.
    compile: bool | str = "auto"  # the model through torch.compile (auto: on CUDA, for fixed-shape batches)
    cuda_graph: bool | str = "auto"  # the whole step as one CUDA graph (auto: CUDA, one process, fixed-shape batches)
    fsdp_reshard: bool = False  # several processes: free each unit's gathered weights after its forward (less memory, one more all-gather per step)
    fsdp_reduce_dtype: str = "fp32"  # several processes on CUDA: gradient reduce-scatter in "fp32" or "bf16" (half the bytes)
    grad_clip: float = 1.0
    log_every: int = 5
    eval_every: int = 40
    eval_batches: int = 8
    save_every: int = 40
    keep_checkpoints: int = 2  # newest complete checkpoints/step-N folders kept
    sample_tokens: int = 120
    # AttnRes kernel settings (nanokimi.runtime.attnres.AttnResKernels; speed and memory only, same model)
    attn_res_storage: str = "auto"  # dtype of the stored residual sources: "auto", "auto-all" or "fp32"
    attn_res_fuse_norm: bool = True  # the sublayers' pre-norms fused into the kernels that make their inputs


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: str = "muon"  # "muon" (Muon for matrices + AdamW for the rest) or "adamw"
    lr: float = 6e-3  # the first command's 120 steps: val 2.015 bits/byte (3e-3: 2.107, 1.2e-2: 2.011)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.95
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    min_lr_ratio: float = 0.1
    qk_clip: bool = True
    qk_clip_tau: float = 100.0
    router_bias_rate: float = 1e-3
    cuda_graph: bool | str = "auto"  # the optimizer step alone as one CUDA graph (nanokimi.optim.CapturedStep;
    # auto: on CUDA in one process when the whole step is not one graph already)
    # how Muon's step executes on CUDA (nanokimi.optim.muon_fast; same results; the defaults are the fastest measured)
    muon_combo_kernels: bool = True  # inductor's horizontal fusion of the compiled momentum and update passes
    muon_side_stream: bool = True  # params that run classic Newton-Schulz take their step on a second stream
    muon_overlap_passes: bool = True  # momentum/update passes per pass group on a stream beside the products
    muon_stream_priorities: bool = True  # CUDA priorities: products and passes before the side stream

    def muon_execution(self) -> dict:
        """The muon_* fields as build_optimizer's `muon_execution` (Muon's constructor options)."""
        return {"combo_kernels": self.muon_combo_kernels, "side_stream": self.muon_side_stream,
                "overlap_passes": self.muon_overlap_passes, "stream_priorities": self.muon_stream_priorities}


@dataclass(kw_only=True, slots=True)
class RunConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.optim.name not in ("muon", "adamw"):
            raise ConfigError(f"optim.name='{self.optim.name}' must be 'muon' or 'adamw'.")
        if self.optim.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"optim.schedule='{self.optim.schedule}' must be 'cosine' or 'wsd'.")
        if self.train.attn_res_storage not in ATTNRES_STORAGES:
            raise ConfigError(f"train.attn_res_storage='{self.train.attn_res_storage}' must be one of "
                              f"{', '.join(ATTNRES_STORAGES)}.")
        for name, value in (("train.compile", self.train.compile), ("train.cuda_graph", self.train.cuda_graph),
                            ("optim.cuda_graph", self.optim.cuda_graph)):
            if value not in (True, False, "auto"):
                raise ConfigError(f"{name}={value!r} must be true, false or auto.")
        if self.train.fsdp_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.fsdp_reduce_dtype='{self.train.fsdp_reduce_dtype}' must be 'fp32' or 'bf16'.")
        t, o = self.train, self.optim
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches",
                     "save_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1.")
        for name in ("stop_at", "sample_tokens", "seed"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0.")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
            raise ConfigError(f"train.device='{t.device}' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise ConfigError(f"optim.lr={o.lr} must be a positive number, e.g. optim.lr=6e-3.")
        for name in ("weight_decay", "warmup_steps", "qk_clip_tau", "router_bias_rate", "min_lr_ratio"):
            if not getattr(o, name) >= 0:
                raise ConfigError(f"optim.{name}={getattr(o, name)} must be >= 0.")
        for name in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(o, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(o, name)} must be in [0, 1), e.g. 0.95.")
        if not 0 <= o.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in [0, 1].")
        if not self.data.max_mb >= 0:
            raise ConfigError(f"data.max_mb={self.data.max_mb} must be >= 0 (0 = the whole source).")
        if t.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 turns clipping off).")
        for name, value in (("data.vocab_size", self.data.vocab_size), ("model.vocab_size", self.model.vocab_size)):
            if not 1 <= value <= MAX_VOCAB:
                raise ConfigError(f"{name}={value} is out of range: it must be at most {MAX_VOCAB:,} "
                                  "(Kimi K2 has 163,840), e.g. data.vocab_size=4096.")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.batch_size={self.train.batch_size} must be divisible by "
                              f"train.grad_accum={self.train.grad_accum}.")

    def to_dict(self) -> dict:
        return {"preset": self.preset, **{s: _section_dict(getattr(self, s)) for s in ("model", "data", "train", "optim")}}


def _section_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def parse_value(text: str):
    """A command-line value: int, float, bool, none, or the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _apply_overrides(tree: dict, overrides: list[str]) -> None:
    sections = {"model", "data", "train", "optim"}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like section.key=value, e.g. train.max_steps=200.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in sections:
            section = parts[0] if parts else key
            hint = suggest(section, sections) if len(parts) == 2 else " Use section.key, e.g. optim.lr=0.01."
            raise ConfigError(f"Override key '{key}' must be section.key with section one of "
                              f"{', '.join(sorted(sections))}.{hint}")
        tree.setdefault(parts[0], {})[parts[1]] = parse_value(value.strip())


MOVED_TO_TRAIN = ("attn_res_storage", "attn_res_fuse_norm")  # [model] keys of older run configs


def _move_retired_model_keys(tree: dict) -> None:
    """Older run configs kept the AttnRes kernel settings in [model]; they are train.* settings now (an explicit
    train.* value wins)."""
    model = tree.get("model", {})
    for key in MOVED_TO_TRAIN:
        if key in model:
            value = model.pop(key)
            warnings.warn(f"config key 'model.{key}' is 'train.{key}' now; read as train.{key}={value!r}.",
                          stacklevel=3)
            tree.setdefault("train", {}).setdefault(key, value)


def read_config_file(config_file: str | None) -> dict:
    """The TOML tree of a run config file ({} for None); a missing or malformed file is a one-line ConfigError."""
    if not config_file:
        return {}
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"Config file '{config_file}' does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file '{config_file}' is not valid TOML: {e}") from None


def load_run_config(preset: str | None = None, config_file: str | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    tree = read_config_file(config_file)
    _apply_overrides(tree, overrides or [])
    _move_retired_model_keys(tree)
    unknown = set(tree) - {"preset", "model", "data", "train", "optim"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"Unknown config section '{name}'.{suggest(name, ['model', 'data', 'train', 'optim'])}")
    preset_name = preset or tree.get("preset") or "tiny"
    from nanokimi.config import PRESETS
    if preset_name not in PRESETS:
        raise ConfigError(f"Unknown preset '{preset_name}'.{suggest(preset_name, PRESETS)} Presets: {', '.join(PRESETS)}.")
    model = from_dict(ModelConfig, {**PRESETS[preset_name], **tree.get("model", {})}, "model.")
    run = RunConfig(
        preset=preset_name,
        model=model,
        data=from_dict(DataConfig, tree.get("data", {}), "data."),
        train=from_dict(TrainConfig, tree.get("train", {}), "train."),
        optim=from_dict(OptimConfig, tree.get("optim", {}), "optim."),
    )
    run.validate()
    return run


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(run: RunConfig) -> str:
    tree = run.to_dict()
    lines = [f"preset = {_toml_value(tree.pop('preset'))}"]
    for section, values in tree.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
