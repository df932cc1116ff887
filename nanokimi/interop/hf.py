"""Hugging Face checkpoints in and out: Kimi Linear (`kimi_linear`) and DeepSeek-V3 / Moonlight / Kimi K2
(`deepseek_v3`) config.json + safetensors, mapped to and from nanokimi's Transformer.

    model = load_hf("path/to/hf_dir")                         # config.json + model.safetensors[.index.json]
    save_hf(model, "out_dir", layout="deepseek_v3")           # transformers' from_pretrained loads it

Routed experts are read stacked (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]) or per
expert (`experts.{j}.gate_proj/up_proj/down_proj` or Kimi's `w1/w3/w2`), and written per expert, the layout
of the published checkpoints. Numerics follow transformers' KimiLinearForCausalLM / DeepseekV3ForCausalLM.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from nanokimi.config import ConfigError, ModelConfig
from nanokimi.model.moe import MoE
from nanokimi.model.rope import yarn_mscale
from nanokimi.model.transformer import Transformer, make_mixer

LAYOUTS = ("kimi_linear", "deepseek_v3")
ARCHITECTURES = {"kimi_linear": "KimiLinearForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}  # Kimi K2 ships a DeepSeek-V3 architecture under its own name
INDEX_FILE = "model.safetensors.index.json"

# transformers' defaults for keys a config.json may leave out (shapes are always required)
_DEFAULTS = {
    "kimi_linear": dict(rms_norm_eps=1e-5, routed_scaling_factor=2.446, n_group=1, topk_group=1, norm_topk_prob=True,
                        num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                        num_experts=256, max_position_embeddings=1048576),
    "deepseek_v3": dict(rms_norm_eps=1e-6, routed_scaling_factor=2.5, n_group=8, topk_group=4, norm_topk_prob=True,
                        num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=1536,
                        num_experts=256, max_position_embeddings=4096),
}
# every spelling a published config uses for the same field (HF canonical first)
_ALIASES = {
    "num_experts": ("n_routed_experts", "num_local_experts", "num_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "num_experts_per_token"),
    "n_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "norm_topk_prob": ("norm_topk_prob", "moe_renormalize"),
    "n_group": ("n_group", "num_expert_group"),
    "max_position_embeddings": ("max_position_embeddings", "model_max_length"),
}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _field(hf: dict, name: str, layout: str):
    """The value of `name` (under any alias), else transformers' default for the layout; shapes have no default."""
    for key in _ALIASES.get(name, (name,)):
        if key in hf:
            return hf[key]
    if name in _DEFAULTS[layout]:
        return _DEFAULTS[layout][name]
    raise ConfigError(f"config.json has no '{name}'; it is needed to build the model.")


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a transformers config.json dict (kimi_linear or deepseek_v3) to a ModelConfig."""
    layout = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
    _need(layout in LAYOUTS, f"config.json has model_type={layout!r}; nanokimi reads {' and '.join(LAYOUTS)}.")
    _need(not hf.get("quantization_config"), "quantized checkpoints (e.g. FP8 with weight_scale_inv) are not "
          "supported; dequantize to bf16 first.")
    _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}: only 'silu' is supported.")
    _need(not hf.get("attention_bias", False), "attention_bias=true is not supported (nanokimi projections have no bias).")
    _need(hf.get("moe_layer_freq", 1) == 1, f"moe_layer_freq={hf.get('moe_layer_freq')}: only 1 is supported.")
    scoring = hf.get("scoring_func", hf.get("moe_router_activation_func", "sigmoid"))
    _need(scoring == "sigmoid", f"router scoring {scoring!r}: only sigmoid routing is supported.")
    get = lambda name: _field(hf, name, layout)  # noqa: E731
    L, heads = get("num_hidden_layers"), get("num_attention_heads")
    _need(hf.get("num_key_value_heads") in (None, heads),
          f"num_key_value_heads={hf.get('num_key_value_heads')} must equal num_attention_heads={heads} for MLA.")
    n_experts = get("num_experts") or 0
    cfg = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=L, num_heads=heads,
        norm_eps=float(get("rms_norm_eps")), init_std=float(hf.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=get("max_position_embeddings"),
        q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"),
        intermediate_size=get("intermediate_size"), num_experts=n_experts,
        num_experts_per_tok=get("num_experts_per_tok"), moe_intermediate_size=get("moe_intermediate_size"),
        num_shared_experts=get("n_shared_experts") or 0, routed_scaling_factor=float(get("routed_scaling_factor")),
        norm_topk_prob=bool(get("norm_topk_prob")), n_group=get("n_group") or 1, topk_group=get("topk_group") or 1,
    )
    if layout == "kimi_linear":
        cfg.update(_kimi_layers(hf, L, get("first_k_dense_replace")), mla_rope=False)
    else:
        cfg.update(mixers="A", first_k_dense=min(get("first_k_dense_replace"), L), mla_rope=True,
                   rope_interleave=bool(hf.get("rope_interleave", True)), **_rope_from_hf(hf, cfg["max_position_embeddings"]))
    if cfg["first_k_dense"] >= L:
        cfg["num_experts"] = 0
    if cfg["num_experts"] == 0:
        cfg.update(num_experts_per_tok=1, n_group=1, topk_group=1)
    return ModelConfig.from_dict(cfg)


def _kimi_layers(hf: dict, L: int, first_k_dense_replace: int) -> dict:
    linear = hf.get("linear_attn_config") or {}
    types = hf.get("layer_types")
    if types is None and "full_attn_layers" in linear and "kda_layers" in linear:
        types = [None] * L
        for i in linear["full_attn_layers"]:  # 1-indexed in the published configs
            types[i - 1] = "full_attention"
        for i in linear["kda_layers"]:
            types[i - 1] = "linear_attention"
    if types is None:  # transformers' default pattern
        types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(L)]
    letters = {"full_attention": "A", "linear_attention": "K"}
    bad = [f"{i}:{t}" for i, t in enumerate(types) if t not in letters]
    _need(len(types) == L and not bad, f"layer_types must give one of {list(letters)} for each of the {L} layers; "
          f"got {len(types)} entries{', bad: ' + ', '.join(bad) if bad else ''}.")
    mlp = hf.get("mlp_layer_types") or ["dense" if i < first_k_dense_replace else "sparse" for i in range(L)]
    k = sum(1 for t in mlp if t == "dense")
    _need(list(mlp) == ["dense"] * k + ["sparse"] * (L - k),
          f"mlp_layer_types={mlp}: nanokimi supports dense layers first, then MoE layers (first_k_dense_replace).")
    return dict(
        mixers="".join(letters[t] for t in types), first_k_dense=k,
        kda_head_dim=hf.get("linear_head_dim", linear.get("head_dim", 128)),
        kda_num_heads=hf.get("linear_num_heads", linear.get("num_heads", 32)),
        kda_conv_size=hf.get("linear_conv_kernel_dim", linear.get("short_conv_kernel_size", 4)),
    )


def _rope_from_hf(hf: dict, max_pos: int) -> dict:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older) -> nanokimi's rope/YaRN fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    _need(not any(isinstance(v, dict) for v in params.values()), "per-layer-type rope parameters are not supported.")
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    kind = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    _need(partial == 1.0, f"partial_rotary_factor={partial} is not supported.")
    out = dict(rope_theta=float(theta))
    if kind == "default":
        return out
    _need(kind == "yarn", f"rope type {kind!r} is not supported; nanokimi has plain RoPE and YaRN.")
    _need(params.get("truncate", True), "YaRN with truncate=false is not supported.")
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = float(params.get("factor") or max_pos / original)
    _need(factor >= 1.0, f"YaRN factor={factor} must be >= 1.")
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    # transformers' cos/sin magnitude: attention_factor if given, else a ratio only when both mscales are set
    magnitude = params.get("attention_factor")
    if magnitude is None:
        magnitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim) if mscale and all_dim else yarn_mscale(factor, 1.0)
    all_dim = float(all_dim or 0.0)  # the softmax scale uses mscale_all_dim only when it is set, as nanokimi does
    # nanokimi's magnitude is yarn_mscale(factor, m) / yarn_mscale(factor, all_dim); pick m to reproduce it
    if mscale and math.isclose(yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim), magnitude, rel_tol=1e-12):
        m = float(mscale)
    elif factor == 1.0:
        _need(math.isclose(magnitude, 1.0), f"attention_factor={magnitude} with factor=1 is not supported.")
        m = 1.0
    else:
        m = (magnitude * yarn_mscale(factor, all_dim) - 1.0) / (0.1 * math.log(factor))
    return dict(out, yarn_factor=factor, yarn_original_max_position=int(original),
                yarn_beta_fast=float(params.get("beta_fast") or 32.0), yarn_beta_slow=float(params.get("beta_slow") or 1.0),
                yarn_mscale=m, yarn_mscale_all_dim=all_dim)


def config_to_hf(cfg: ModelConfig, layout: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json transformers needs to rebuild `cfg` as `layout`. Raises ConfigError for what it cannot express."""
    _need(layout in LAYOUTS, f"layout={layout!r}; choose one of {', '.join(LAYOUTS)}.")
    letters = cfg.layer_mixers
    _need(cfg.attn_res == "none", f"attn_res={cfg.attn_res!r}: transformers has no Attention Residuals; "
          "only attn_res='none' models can be exported.")
    _need("B" not in letters, "MoBA layers (letter B) have no transformers equivalent; export a model with plain MLA (A).")
    _need("G" not in letters, f"GQA layers (letter G) are not part of the {layout} layout.")
    if layout == "deepseek_v3":
        _need(set(letters) == {"A"}, f"deepseek_v3 is MLA in every layer; mixers={cfg.mixers!r} has KDA layers "
              "(use layout='kimi_linear').")
        _need(cfg.mla_rope, "deepseek_v3 rotates the MLA rope slice; a NoPE model (mla_rope=False) needs layout='kimi_linear'.")
    else:
        _need(not cfg.mla_rope or "A" not in letters, "kimi_linear MLA is NoPE; set mla_rope=False or use layout='deepseek_v3'.")
        _need(yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) == 1.0,
              "kimi_linear has no YaRN softmax-scale correction; use yarn_factor=1 or yarn_mscale_all_dim=0.")
    moe = cfg.num_experts > 0 and cfg.first_k_dense < cfg.num_layers
    if moe:
        _need(cfg.num_experts // cfg.n_group >= 2, f"transformers scores expert groups by their top-2 experts; "
              f"num_experts={cfg.num_experts} / n_group={cfg.n_group} leaves fewer than 2 per group.")
    first_dense = min(cfg.first_k_dense, cfg.num_layers) if moe else cfg.num_layers
    experts = dict(num_experts=cfg.num_experts if moe else 1, top_k=cfg.num_experts_per_tok if moe else 1,
                   n_group=cfg.n_group if moe else 1, topk_group=cfg.topk_group if moe else 1)
    out = {
        "architectures": [ARCHITECTURES[layout]], "model_type": layout,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "first_k_dense_replace": first_dense, "routed_scaling_factor": cfg.routed_scaling_factor,
        "topk_group": experts["topk_group"], "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False, "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if layout == "kimi_linear":
        full = [i for i, c in enumerate(letters) if c == "A"]
        kda = [i for i, c in enumerate(letters) if c == "K"]
        out.update({
            "num_experts": experts["num_experts"], "num_experts_per_token": experts["top_k"],
            "num_shared_experts": cfg.num_shared_experts, "moe_renormalize": cfg.norm_topk_prob,
            "num_expert_group": experts["n_group"], "model_max_length": cfg.max_position_embeddings,
            "layer_types": ["full_attention" if c == "A" else "linear_attention" for c in letters],
            "mlp_layer_types": ["dense" if i < first_dense else "sparse" for i in range(cfg.num_layers)],
            "linear_head_dim": cfg.kda_head_dim, "linear_num_heads": cfg.kda_num_heads,
            "linear_conv_kernel_dim": cfg.kda_conv_size, "mla_use_nope": True, "moe_router_activation_func": "sigmoid",
            "linear_attn_config": {"head_dim": cfg.kda_head_dim, "num_heads": cfg.kda_num_heads,
                                   "short_conv_kernel_size": cfg.kda_conv_size,
                                   "full_attn_layers": [i + 1 for i in full], "kda_layers": [i + 1 for i in kda]},
        })
    else:
        out.update({
            "n_routed_experts": experts["num_experts"], "num_experts_per_tok": experts["top_k"],
            "n_shared_experts": cfg.num_shared_experts, "norm_topk_prob": cfg.norm_topk_prob,
            "n_group": experts["n_group"], "max_position_embeddings": cfg.max_position_embeddings,
            "rope_interleave": cfg.rope_interleave, "rope_theta": cfg.rope_theta, "rope_scaling": _rope_to_hf(cfg),
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        })
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict | None:
    if cfg.yarn_factor <= 1.0:
        return None
    f, m, a = cfg.yarn_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim
    scaling = {"type": "yarn", "rope_type": "yarn", "factor": f, "original_max_position_embeddings": cfg.yarn_original_max_position,
               "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow, "mscale": m, "mscale_all_dim": a}
    ours = yarn_mscale(f, m) / yarn_mscale(f, a)
    theirs = yarn_mscale(f, m) / yarn_mscale(f, a) if m and a else yarn_mscale(f, 1.0)
    if not math.isclose(ours, theirs, rel_tol=1e-12):
        scaling["attention_factor"] = ours  # transformers would otherwise drop mscale when mscale_all_dim is 0
    return scaling


_FFN = r"(?:mlp|block_sparse_moe)"
_LAYER_RULES = [  # (pattern after "model.layers.{i}.", nanokimi name after "layers.{i}.")
    (r"input_layernorm\.weight", "mixer_norm.weight"),
    (r"post_attention_layernorm\.weight", "ffn_norm.weight"),
    (r"self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_b_proj|b_proj|g_a_proj|g_b_proj)\.weight", r"mixer.\1.weight"),
    (r"self_attn\.q_a_layernorm\.weight", "mixer.q_a_norm.weight"),
    (r"self_attn\.kv_a_proj_with_mqa\.weight", "mixer.kv_a_proj.weight"),
    (r"self_attn\.kv_a_layernorm\.weight", "mixer.kv_a_norm.weight"),
    (r"self_attn\.(?:forget_gate\.)?(f_a_proj|f_b_proj)\.weight", r"mixer.\1.weight"),
    (r"self_attn\.(?:forget_gate\.)?(dt_bias|A_log)", r"mixer.\1"),
    (r"self_attn\.o_norm\.weight", "mixer.o_norm_weight"),
    (r"self_attn\.conv1d\.weight", "mixer.conv.weight"),
    (_FFN + r"\.(gate_proj|up_proj|down_proj)\.weight", r"ffn.\1.weight"),
    (_FFN + r"\.gate\.weight", "ffn.router.weight"),
    (_FFN + r"\.gate\.e_score_correction_bias", "ffn.router.e_score_correction_bias"),
    (_FFN + r"\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight", r"ffn.shared.\1.weight"),
    (_FFN + r"\.experts\.gate_up_proj", "ffn.experts.gate_up"),
    (_FFN + r"\.experts\.down_proj", "ffn.experts.down"),
]
_TOP_RULES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_CONV_PART = re.compile(r"self_attn\.([qkv])_conv1d\.weight")
_EXPERT_PART = re.compile(_FFN + r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _route(name: str, num_layers: int):
    """HF tensor name -> ("tensor", nanokimi name) | ("conv", layer, q/k/v) | ("expert", layer, j, role)
    | ("skip",) for tensors transformers ignores too | None when unknown."""
    if name in _TOP_RULES:
        return ("tensor", _TOP_RULES[name])
    match = _LAYER.fullmatch(name)
    if match is None:
        return ("skip",) if name.endswith("rotary_emb.inv_freq") else None
    i, rest = int(match[1]), match[2]
    if i >= num_layers:
        return ("skip",)  # multi-token-prediction layers appended after the decoder (DeepSeek-V3)
    if rest.endswith("rotary_emb.inv_freq"):
        return ("skip",)
    for pattern, target in _LAYER_RULES:
        if re.fullmatch(pattern, rest):
            return ("tensor", f"layers.{i}." + re.sub(pattern, target, rest))
    if m := _CONV_PART.fullmatch(rest):
        return ("conv", i, m[1])
    if m := _EXPERT_PART.fullmatch(rest):
        return ("expert", i, int(m[1]), _EXPERT_ROLE[m[2]])
    return None


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    _need(bool(files), f"{path} has no safetensors weights (model.safetensors or {INDEX_FILE}).")
    missing = [str(f) for f in files if not f.exists()]
    _need(not missing, f"{INDEX_FILE} names shard files that do not exist: {', '.join(missing[:5])}.")
    return files


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fit(t: torch.Tensor, shape: torch.Size, name: str, errors: list) -> torch.Tensor | None:
    """Accept a tensor whose shape equals `shape` up to size-1 dims (A_log [1,1,H,1], conv [C,K] vs [C,1,K])."""
    if t.shape == shape:
        return t
    if [s for s in t.shape if s != 1] == [s for s in shape if s != 1]:
        return t.reshape(shape)
    errors.append(f"{name}: checkpoint {list(t.shape)} vs model {list(shape)}")
    return None


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Transformer:
    """Build a Transformer from a transformers checkpoint directory (kimi_linear or deepseek_v3).

    dtype: cast every parameter to it (default: the checkpoint's embedding dtype). The router correction bias
    stays fp32, as in transformers. The model is returned in eval mode; call .train() to fine-tune."""
    from safetensors import safe_open

    path = Path(path)
    _need((path / "config.json").exists(), f"{path} has no config.json; point at a Hugging Face checkpoint directory.")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg.replace(tie_word_embeddings=False)).state_dict().items()}

    tensors, unknown, errors = {}, [], []
    conv_parts, expert_parts = defaultdict(dict), defaultdict(dict)
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                route = _route(name, cfg.num_layers)
                if route is None:
                    unknown.append(name)
                elif route[0] == "tensor":
                    t = f.get_tensor(name)
                    if t.numel() or ".ffn.shared." not in route[1]:  # n_shared_experts=0 is stored as empty
                        tensors[route[1]] = t
                elif route[0] == "conv":
                    conv_parts[route[1]][route[2]] = f.get_tensor(name)
                elif route[0] == "expert":
                    parts = expert_parts[route[1]]
                    parts[route[2:]] = f.get_tensor(name)
                    if len(parts) == 3 * cfg.num_experts:
                        _stack_experts(route[1], parts, cfg.num_experts, tensors)
    for i, parts in conv_parts.items():
        if set(parts) == {"q", "k", "v"}:
            tensors[f"layers.{i}.mixer.conv.weight"] = torch.cat([parts[c] for c in "qkv"], dim=0)
        else:
            errors.append(f"layer {i}: conv parts {sorted(parts)} of q/k/v")
    for i, parts in expert_parts.items():
        if parts:  # an incomplete set never got stacked
            have = sorted({j for j, _ in parts})
            errors.append(f"layer {i}: {len(parts)} of {3 * cfg.num_experts} per-expert tensors (experts {have[:8]}...)")

    if "lm_head.weight" not in tensors and cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("embed.weight")
    elif cfg.tie_word_embeddings and not torch.equal(tensors["lm_head.weight"], tensors.get("embed.weight", torch.empty(0))):
        cfg = cfg.replace(tie_word_embeddings=False)  # transformers' kimi_linear never ties: trained heads diverge
    missing = [k for k in shapes if tensors.get(k) is None]
    extra = [k for k in tensors if k not in shapes]
    fitted = {k: _fit(tensors[k], shapes[k], k, errors) for k in shapes if tensors.get(k) is not None}
    problems = []
    if unknown or extra:
        problems.append(f"unknown tensors ({len(unknown) + len(extra)}): {_listing(unknown + extra)}")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if errors:
        problems.append(f"wrong shapes: {_listing(errors, 6)}")
    _need(not problems, f"{path} does not map onto the {cfg.layer_mixers!r} model its config.json describes; "
          + "; ".join(problems) + ".")

    dtype = dtype or fitted["embed.weight"].dtype
    state = {k: t.to(torch.float32 if k.endswith("e_score_correction_bias") else dtype) for k, t in fitted.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    _materialize_buffers(model, cfg, device)
    return model.eval()


def _stack_experts(layer: int, parts: dict, num_experts: int, tensors: dict) -> None:
    """Per-expert gate/up/down matrices -> gate_up [E, 2I, D] (gate rows first) and down [E, D, I]."""
    prefix = f"layers.{layer}.ffn.experts."
    tensors[prefix + "gate_up"] = torch.stack(
        [torch.cat([parts[(j, "gate")], parts[(j, "up")]], dim=0) for j in range(num_experts)])
    tensors[prefix + "down"] = torch.stack([parts[(j, "down")] for j in range(num_experts)])
    parts.clear()


def _materialize_buffers(model: Transformer, cfg: ModelConfig, device: torch.device) -> None:
    """Non-persistent buffers (RoPE frequencies, expert load counters) are not in checkpoints: the meta-built
    model gets them from a freshly built mixer of the same kind."""
    references = {}
    for block in model.layers:
        for name, buf in list(block.mixer.named_buffers()):
            if buf.is_meta:
                if block.mixer_kind not in references:
                    references[block.mixer_kind] = dict(make_mixer(block.mixer_kind, cfg).named_buffers())
                owner, _, leaf = name.rpartition(".")
                module = block.mixer.get_submodule(owner) if owner else block.mixer
                module.register_buffer(leaf, references[block.mixer_kind][name].to(device), persistent=False)
    for module in model.modules():
        if isinstance(module, MoE):
            module.register_buffer("expert_load", torch.zeros(cfg.num_experts, device=device), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"load_hf left tensors unset: {_listing(left)}")


def hf_tensors(model: Transformer, layout: str) -> list[tuple[str, Callable[[], torch.Tensor], torch.Size]]:
    """(HF name, function producing the tensor, shape) for every tensor of the exported checkpoint, in order."""
    cfg = model.config
    out = [("model.embed_tokens.weight", lambda: model.embed.weight, model.embed.weight.shape)]
    ffn_prefix = {"kimi_linear": "block_sparse_moe", "deepseek_v3": "mlp"}[layout]
    expert_names = {"kimi_linear": ("w1", "w3", "w2"), "deepseek_v3": ("gate_proj", "up_proj", "down_proj")}[layout]

    def add(name, tensor_fn, shape):
        out.append((name, tensor_fn, torch.Size(shape)))

    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", lambda b=block: b.mixer_norm.weight, block.mixer_norm.weight.shape)
        add(p + "post_attention_layernorm.weight", lambda b=block: b.ffn_norm.weight, block.ffn_norm.weight.shape)
        mixer = block.mixer
        if block.mixer_kind == "K":
            C = mixer.num_heads * mixer.head_dim
            for proj in ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj", "o_proj"):
                w = getattr(mixer, proj).weight
                add(p + f"self_attn.{proj}.weight", lambda w=w: w, w.shape)
            for c, letter in enumerate("qkv"):
                add(p + f"self_attn.{letter}_conv1d.weight", lambda m=mixer, c=c: m.conv.weight[c * C:(c + 1) * C],
                    (C, 1, mixer.conv_size))
            add(p + "self_attn.dt_bias", lambda m=mixer: m.dt_bias, mixer.dt_bias.shape)
            add(p + "self_attn.A_log", lambda m=mixer: m.A_log.view(1, 1, -1, 1), (1, 1, mixer.num_heads, 1))
            add(p + "self_attn.o_norm.weight", lambda m=mixer: m.o_norm_weight, mixer.o_norm_weight.shape)
        else:
            names = ([("q_proj", "q_proj")] if hasattr(mixer, "q_proj") else
                     [("q_a_proj", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b_proj", "q_b_proj")])
            names += [("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_a_norm", "kv_a_layernorm"), ("kv_b_proj", "kv_b_proj"),
                      ("o_proj", "o_proj")]
            for ours, theirs in names:
                w = getattr(mixer, ours).weight
                add(p + f"self_attn.{theirs}.weight", lambda w=w: w, w.shape)
        ffn = block.ffn
        if isinstance(ffn, MoE):
            f = p + ffn_prefix + "."
            add(f + "gate.weight", lambda r=ffn.router: r.weight, ffn.router.weight.shape)
            add(f + "gate.e_score_correction_bias", lambda r=ffn.router: r.e_score_correction_bias.float(),
                ffn.router.e_score_correction_bias.shape)
            E, two_i, D = ffn.experts.gate_up.shape
            I = two_i // 2
            gate_name, up_name, down_name = expert_names
            for j in range(E):
                e = f + f"experts.{j}."
                add(e + f"{gate_name}.weight", lambda x=ffn.experts, j=j: x.gate_up[j, :I], (I, D))
                add(e + f"{up_name}.weight", lambda x=ffn.experts, j=j: x.gate_up[j, I:], (I, D))
                add(e + f"{down_name}.weight", lambda x=ffn.experts, j=j: x.down[j], (D, I))
            shared = ffn.shared
            for proj, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
                if shared is not None:  # transformers always builds the shared expert; 0 of them -> empty matrices
                    w = getattr(shared, proj).weight
                    add(f + f"shared_experts.{proj}.weight", lambda w=w: w, w.shape)
                else:
                    add(f + f"shared_experts.{proj}.weight", lambda s=shape: torch.zeros(s), shape)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(ffn, proj).weight
                add(p + f"mlp.{proj}.weight", lambda w=w: w, w.shape)
    add("model.norm.weight", lambda: model.norm.weight, model.norm.weight.shape)
    if not (cfg.tie_word_embeddings and layout == "deepseek_v3"):  # kimi_linear in transformers never ties
        add("lm_head.weight", lambda: model.lm_head.weight, model.lm_head.weight.shape)
    return out


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", size, flags=re.IGNORECASE)
    _need(match is not None, f"cannot read size {size!r}; write e.g. '5GB', '500MB' or a byte count.")
    unit = (match[2] or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(match[1]) * scale)


def infer_layout(cfg: ModelConfig) -> str:
    """deepseek_v3 for all-MLA models with RoPE, kimi_linear otherwise."""
    return "deepseek_v3" if set(cfg.layer_mixers) == {"A"} and cfg.mla_rope else "kimi_linear"


def save_hf(model: Transformer, path: str | Path, layout: str | None = None, max_shard_bytes: int | str = "5GB",
            tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a transformers checkpoint: config.json, safetensors shards (+ index when more than one),
    and the tokenizer when `tokenizer_path` is given: a tokenizer.json, or a folder whose tokenizer files
    (tokenizer_files_of) are all copied. The directory appears complete or not at all.

    layout: "kimi_linear" or "deepseek_v3" (default: infer_layout(model.config)).
    dtype: of the written weights (default: the model's); the router correction bias is always fp32."""
    path = Path(path)
    layout = layout or infer_layout(model.config)
    dtype = dtype or model.embed.weight.dtype
    config = config_to_hf(model.config, layout, dtype)
    max_shard_bytes = parse_size(max_shard_bytes)
    _need(max_shard_bytes > 0, "max_shard_bytes must be positive.")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    tokenizer = {}
    if tokenizer_path is not None:
        tokenizer = tokenizer_files_of(tokenizer_path)

    entries = hf_tensors(model, layout)
    out_dtype = lambda name: torch.float32 if name.endswith("e_score_correction_bias") else dtype  # noqa: E731
    shards, current, size = [], [], 0
    for name, fn, shape in entries:
        nbytes = math.prod(shape) * torch.empty(0, dtype=out_dtype(name)).element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, fn))
        size += nbytes
    shards.append(current)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_shards(tmp, shards, out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
        write_tokenizer_files(tokenizer, tmp, for_transformers=True)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def tokenizer_files_of(path: str | Path) -> dict[str, Path]:
    """The tokenizer and chat-format files to carry along, by the name they get: a tokenizer.json file itself,
    or every file of TOKENIZER_FILES in a folder."""
    from nanokimi.data.tokenizer import TOKENIZER_FILES

    path = Path(path)
    if path.is_file():
        return {"tokenizer.json": path}
    files = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    if "tokenizer.json" not in files and "tiktoken.model" not in files:
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tiktoken.model + "
                                "tokenizer_config.json.")
    return files


def write_tokenizer_files(files: dict[str, Path], directory: Path, for_transformers: bool = False) -> None:
    """Copy tokenizer files into `directory`. for_transformers: nanokimi's own tokenizer.json (with the chat
    tokens) and no tokenizer_config.json gets one, and the default chat template, so that transformers'
    AutoTokenizer loads it and apply_chat_template renders Kimi's format."""
    from tokenizers import Tokenizer as HFTokenizer

    from nanokimi.data.chat import ChatTemplate
    from nanokimi.data.tokenizer import END_OF_TURN, EOT

    for name, source in files.items():
        shutil.copyfile(source, directory / name)
    if not for_transformers or "tokenizer.json" not in files or "tokenizer_config.json" in files:
        return
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    if hf.token_to_id(EOT) is None or hf.token_to_id(END_OF_TURN) is None:
        return  # not one of nanokimi's chat-ready tokenizers: leave it as it came
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": EOT,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if "chat_template.jinja" not in files:
        ChatTemplate().save(directory)


def _write_shards(directory: Path, shards: list, out_dtype) -> None:
    from safetensors.torch import save_file

    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        with torch.no_grad():  # clone: safetensors refuses views that share storage (stacked experts, tied head)
            tensors = {name: fn().detach().to(device="cpu", dtype=out_dtype(name)).clone() for name, fn in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished temp dir into place; an existing directory is moved aside first, then deleted."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
