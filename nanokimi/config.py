"""Typed configuration: ModelConfig, presets, and the dict/TOML loading every config shares.

Unknown keys get a "did you mean" hint; impossible shapes name the fields that disagree.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, fields
from typing import Any

MIXER_LETTERS = {"K": "KDA", "A": "MLA", "B": "MLA with MoBA", "G": "GQA"}


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says how to fix it."""


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert int->float) a value against a dataclass field annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are strings under __future__
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a text setting typed as a number on the command line, e.g. rl.task_levels=4
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where} must be {annotation.__name__}, got {type(value).__name__} {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}.")
        (inner, *_) = typing.get_args(annotation) or (Any,)
        return origin(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with a suggestion."""
    known = {f.name: f for f in fields(cls) if f.init}
    retired = getattr(cls, "RETIRED_KEYS", {})
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key in retired:
            warnings.warn(f"config key '{path}' is ignored: {retired[key]}", stacklevel=2)
            continue
        if key not in known:
            close = suggest(key, known)
            raise ConfigError(f"Unknown config key '{path}'." + (close.replace("'", f"'{where}", 1) if close else ""))
        f = known[key]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = from_dict(type(f.default_factory()), value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, f.type, path)
    return cls(**kwargs)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Every architecture nanokimi builds: Kimi Linear hybrids, Moonlight/K2 (DeepSeek-V3 layout), GQA baselines."""

    # keys of older saved configs that are no longer architecture: read and dropped with a warning saying where the
    # setting lives now, so their checkpoints still load
    RETIRED_KEYS: typing.ClassVar[dict[str, str]] = {
        key: "AttnRes kernel settings are runtime settings now, not architecture (nanokimi.runtime.attnres."
             f"AttnResKernels({field}=...), applied with nanokimi.model.attn_res.set_attnres_kernels)"
        for key, field in (("attn_res_storage", "storage"), ("attn_res_fuse_norm", "fuse_norm"))}

    vocab_size: int = 32768
    hidden_size: int = 256
    num_layers: int = 4
    mixers: str = "KKKA"  # per-layer token mixer, tiled over layers: K=KDA, A=MLA, B=MLA+MoBA, G=GQA
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    # full attention (GQA and MLA share num_heads)
    num_heads: int = 4
    num_kv_heads: int = 4  # GQA only
    head_dim: int = 64  # GQA only
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    mla_rope: bool = True  # False = NoPE (Kimi Linear): the rope slice exists but is not rotated

    # RoPE / YaRN
    rope_theta: float = 10000.0
    rope_interleave: bool = False  # DeepSeek-V3 checkpoints rotate interleaved pairs
    yarn_factor: float = 1.0  # 1.0 = plain RoPE
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0

    # KDA
    kda_num_heads: int = 4
    kda_head_dim: int = 64
    kda_conv_size: int = 4

    # FFN: dense SwiGLU for the first `first_k_dense` layers (all layers when num_experts == 0), MoE after
    intermediate_size: int = 704
    first_k_dense: int = 1
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    num_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1

    # MoBA (layers with letter B)
    moba_block_size: int = 512
    moba_topk: int = 3

    # Attention Residuals on the residual stream
    attn_res: str = "none"  # "none" | "full" | "block"
    attn_res_blocks: int = 8

    def __post_init__(self):
        self.validate()

    @property
    def layer_mixers(self) -> str:
        """The mixer letter of every layer: `mixers` tiled (or taken as is when it has one per layer)."""
        reps = -(-self.num_layers // len(self.mixers))
        return (self.mixers * reps)[: self.num_layers]

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(len(self.mixers) > 0, "mixers must name at least one layer type, e.g. 'KKKA'.")
        bad = sorted(set(self.mixers) - set(MIXER_LETTERS))
        need(not bad, f"mixers='{self.mixers}' has unknown letter(s) {bad}; use "
             + ", ".join(f"{k}={v}" for k, v in MIXER_LETTERS.items()) + ".")
        need(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}.")
        need(len(self.mixers) <= self.num_layers,
             f"mixers has {len(self.mixers)} letters but num_layers={self.num_layers}; shorten mixers or add layers.")
        for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}.")
        letters = set(self.layer_mixers)
        if "G" in letters:
            need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
                 f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA groups).")
            need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE.")
        if letters & {"A", "B"}:
            need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE.")
            need(self.kv_lora_rank >= 1 and self.qk_nope_head_dim >= 1 and self.v_head_dim >= 1,
                 "MLA needs kv_lora_rank, qk_nope_head_dim and v_head_dim >= 1.")
            need(self.q_lora_rank is None or self.q_lora_rank >= 1, "q_lora_rank must be None or >= 1.")
        if "B" in letters:
            need(self.moba_block_size >= 1 and self.moba_topk >= 1,
                 f"moba_block_size={self.moba_block_size} and moba_topk={self.moba_topk} must be >= 1.")
        if "K" in letters:
            need(self.kda_num_heads >= 1 and self.kda_head_dim >= 1 and self.kda_conv_size >= 1,
                 "KDA needs kda_num_heads, kda_head_dim and kda_conv_size >= 1.")
        if self.num_experts > 0:
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}.")
            need(self.n_group >= 1 and self.num_experts % self.n_group == 0,
                 f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}.")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}.")
            need(self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group),
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group} "
                 f"groups of {self.num_experts // self.n_group}.")
            need(self.moe_intermediate_size >= 1, "moe_intermediate_size must be >= 1.")
        need(self.first_k_dense >= 0, f"first_k_dense must be >= 0, got {self.first_k_dense}.")
        need(self.yarn_factor >= 1.0, f"yarn_factor={self.yarn_factor} must be >= 1 (1 disables YaRN).")
        need(self.attn_res in ("none", "full", "block"),
             f"attn_res='{self.attn_res}' must be 'none', 'full' or 'block'.{suggest(self.attn_res, ['none', 'full', 'block'])}")
        need(self.attn_res_blocks >= 1, f"attn_res_blocks must be >= 1, got {self.attn_res_blocks}.")

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "ModelConfig":
        return from_dict(type(self), {**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"Unknown preset '{name}'.{suggest(name, PRESETS)} Presets: {', '.join(PRESETS)}.")
        return from_dict(cls, {**PRESETS[name], **overrides})


_BENCH_900M = dict(
    vocab_size=32768, hidden_size=1024, num_layers=16, mixers="KKKA", norm_eps=1e-5,
    num_heads=8, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    mla_rope=False, kda_num_heads=8, kda_head_dim=128, intermediate_size=2816, first_k_dense=1,
    num_experts=64, num_experts_per_tok=6, moe_intermediate_size=256, num_shared_experts=1,
    routed_scaling_factor=2.446, max_position_embeddings=65536,
)

_DEEPSEEK_V3_STYLE = dict(
    vocab_size=163840, num_layers=61, mixers="A", norm_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mla_rope=True, rope_interleave=True,
    first_k_dense=1, norm_topk_prob=True,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=4096, hidden_size=256, num_layers=4, mixers="KKKA", num_heads=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, mla_rope=False,
        kda_num_heads=4, kda_head_dim=32, intermediate_size=704, first_k_dense=1,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_shared_experts=1,
        routed_scaling_factor=1.0, max_position_embeddings=2048,
    ),
    "tiny-dense": dict(
        vocab_size=4096, hidden_size=256, num_layers=4, mixers="G", num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=704, num_experts=0, max_position_embeddings=2048,
    ),
    "gpt-124m": dict(
        vocab_size=50304, hidden_size=768, num_layers=12, mixers="G", num_heads=12, num_kv_heads=12, head_dim=64,
        intermediate_size=2048, num_experts=0, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "bench-kl-900m": dict(_BENCH_900M),
    "bench-dsv3-900m": dict(_BENCH_900M, mixers="A", mla_rope=True),
    "kimi-linear-48b-a3b": dict(
        vocab_size=163840, hidden_size=2304, num_layers=27, mixers="KKKA" * 6 + "KKA", norm_eps=1e-5,
        num_heads=32, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, mla_rope=False, kda_num_heads=32, kda_head_dim=128, intermediate_size=9216,
        first_k_dense=1, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
        num_shared_experts=1, routed_scaling_factor=2.446, max_position_embeddings=1048576,
    ),
    "moonlight-16b-a3b": dict(
        _DEEPSEEK_V3_STYLE, hidden_size=2048, num_layers=27, num_heads=16, q_lora_rank=None,
        intermediate_size=11264, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
        num_shared_experts=2, routed_scaling_factor=2.446, rope_theta=50000.0, max_position_embeddings=8192,
        rope_interleave=False,
    ),
    "kimi-k2": dict(
        _DEEPSEEK_V3_STYLE, hidden_size=7168, num_heads=64, intermediate_size=18432, num_experts=384,
        num_experts_per_tok=8, moe_intermediate_size=2048, num_shared_experts=1, routed_scaling_factor=2.827,
        rope_theta=50000.0, yarn_factor=32.0, yarn_original_max_position=4096, yarn_beta_fast=1.0,
        yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0, max_position_embeddings=131072,
    ),
}
