"""Hugging Face interop against transformers' own KimiLinearForCausalLM / DeepseekV3ForCausalLM (CPU, fp32).

Each case is a tiny random HF config; both directions must give the same logits and the same greedy tokens."""
import argparse
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import rel_err  # noqa: E402
from nanokimi import ConfigError, ModelConfig, build_model  # noqa: E402
from nanokimi.interop import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from nanokimi.interop.cli import add_convert_args, run_convert  # noqa: E402
from nanokimi.model.moe import MoE, update_router_bias  # noqa: E402

V = 97
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
            qk_nope_head_dim=16, num_experts_per_tok=2, routed_scaling_factor=1.7, initializer_range=0.1,
            pad_token_id=None, bos_token_id=None, eos_token_id=None)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.8, "mscale_all_dim": 0.6}

CASES = {
    "kl-nope-dense-first": ("kimi_linear", dict(
        q_lora_rank=None, num_local_experts=6, linear_head_dim=16, linear_num_heads=2,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"])),
    "kl-qlora-groups-tied": ("kimi_linear", dict(
        q_lora_rank=20, num_local_experts=6, n_group=3, topk_group=2, linear_head_dim=8, linear_num_heads=3,
        linear_conv_kernel_dim=3, layer_types=["full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["sparse"] * 3, tie_word_embeddings=True, norm_topk_prob=False, n_shared_experts=2)),
    "ds-interleave-yarn-groups": ("deepseek_v3", dict(
        q_lora_rank=20, n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1, rope_interleave=True,
        rope_scaling=YARN, rope_theta=50000.0, max_position_embeddings=64)),
    "ds-plain-tied-2shared": ("deepseek_v3", dict(
        q_lora_rank=None, n_routed_experts=6, n_group=1, topk_group=1, first_k_dense_replace=2, rope_interleave=False,
        tie_word_embeddings=True, n_shared_experts=2, norm_topk_prob=False, max_position_embeddings=64)),
}


def hf_model(layout, overrides):
    config_cls, model_cls = {"kimi_linear": (transformers.KimiLinearConfig, transformers.KimiLinearForCausalLM),
                             "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[layout]
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.1)  # exercise the biased expert choice
    return model


def hf_from_dir(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def nk_greedy(model, ids, steps):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits, out = model(ids, cache=cache), []
    for _ in range(steps):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(out[-1], cache=cache)
    return torch.cat(out, 1)


def hf_greedy(model, ids, steps):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def assert_same_model(hf, nk, ids, steps=20):
    with torch.no_grad():
        assert rel_err(nk(ids), hf(ids).logits) <= 1e-4
        assert torch.equal(nk_greedy(nk, ids[:, :6], steps), hf_greedy(hf, ids[:, :6], steps))


def hand_written(hf, src, dst, per_expert):
    """transformers' in-memory names (stacked experts, one conv1d, forget_gate.*), optionally with the
    experts split per expert as `mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr():
        state.pop("lm_head.weight")
    if per_expert:
        for name in [k for k in state if k.endswith("experts.gate_up_proj")]:
            prefix = name.removesuffix("gate_up_proj")
            gate_up, down = state.pop(name), state.pop(prefix + "down_proj")
            for j, (gate, up) in enumerate(zip(*gate_up.chunk(2, dim=1))):
                state[f"{prefix}{j}.gate_proj.weight"] = gate.clone()
                state[f"{prefix}{j}.up_proj.weight"] = up.clone()
                state[f"{prefix}{j}.down_proj.weight"] = down[j].clone()
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("case", CASES)
def test_hf_checkpoint_loads_with_identical_numerics(case, tmp_path):
    hf = hf_model(*CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 19))
    nk = load_hf(tmp_path / "hf")
    assert nk.config.tie_word_embeddings == (nk.lm_head.weight is nk.embed.weight)
    assert_same_model(hf, nk, ids)
    for per_expert in (False, True):
        path = hand_written(hf, tmp_path / "hf", tmp_path / f"hand-{per_expert}", per_expert)
        with torch.no_grad():
            assert rel_err(load_hf(path)(ids), hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_nanokimi_export_loads_in_transformers(case, tmp_path):
    layout, overrides = CASES[case]
    cfg = config_from_hf(hf_model(layout, overrides).config.to_dict())
    nk = build_model(cfg.replace(init_std=0.1)).eval()
    with torch.no_grad():
        for module in nk.modules():
            if isinstance(module, MoE):
                module.router.e_score_correction_bias.normal_(std=0.1)
    save_hf(nk, tmp_path / "out", layout=layout, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = hf_from_dir(tmp_path / "out")
    assert type(hf).__name__ == {"kimi_linear": "KimiLinearForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[layout]
    assert_same_model(hf, nk, torch.randint(0, V, (2, 23)))
    back = load_hf(tmp_path / "out")
    assert back.config == nk.config
    for (name, a), b in zip(nk.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_config_round_trip_and_yarn_mscale_without_all_dim(tmp_path):
    """transformers ignores mscale unless mscale_all_dim is set too; the export spells out attention_factor."""
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, mixers="A", num_heads=4, kv_lora_rank=24,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, rope_interleave=True, yarn_factor=8.0,
                      yarn_original_max_position=8, yarn_mscale=0.7, yarn_mscale_all_dim=0.0, yarn_beta_fast=16.0,
                      max_position_embeddings=64, init_std=0.1)
    exported = config_to_hf(cfg, "deepseek_v3")
    assert "attention_factor" in exported["rope_scaling"]
    assert config_from_hf(exported) == cfg
    nk = build_model(cfg).eval()
    save_hf(nk, tmp_path / "out", layout="deepseek_v3")
    ids = torch.randint(0, V, (1, 40))
    with torch.no_grad():
        assert rel_err(nk(ids), hf_from_dir(tmp_path / "out")(ids).logits) <= 1e-4


@pytest.mark.parametrize("case", ["kl-nope-dense-first", "ds-interleave-yarn-groups"])
def test_training_step_then_export(case, tmp_path):
    hf = hf_model(*CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    nk = load_hf(tmp_path / "hf").train()
    before = {k: v.clone() for k, v in nk.state_dict().items()}
    optimizer = torch.optim.AdamW(nk.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (2, 17))
    nk.loss(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    update_router_bias(nk, rate=0.05)
    changed = [k for k, v in nk.state_dict().items() if not torch.equal(v, before[k])]
    assert "embed.weight" in changed and any("experts.gate_up" in k for k in changed)
    assert any("e_score_correction_bias" in k for k in changed)
    save_hf(nk.eval(), tmp_path / "trained", layout=CASES[case][0])
    with torch.no_grad():
        assert rel_err(nk(ids), hf_from_dir(tmp_path / "trained")(ids).logits) <= 1e-4
        assert rel_err(nk(ids), hf(ids).logits) > 1e-3  # the step really moved the model


def test_unmappable_checkpoint_names_the_tensors(tmp_path):
    hf = hf_model(*CASES["kl-nope-dense-first"])
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["model.layers.0.self_attn.q_projection.weight"] = state.pop("model.layers.0.self_attn.q_proj.weight")
    state.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        load_hf(tmp_path / "hf")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_projection.weight" in message  # unknown
    assert "layers.0.mixer.q_proj.weight" in message  # missing
    assert "layer 1: 17 of 18 per-expert tensors" in message

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        load_hf(tmp_path / "hf")


@pytest.mark.parametrize("overrides, layout, match", [
    (dict(mixers="G"), "kimi_linear", "GQA layers"),
    (dict(mixers="KA"), "deepseek_v3", "layout='kimi_linear'"),
    (dict(mixers="KA", mla_rope=True), "kimi_linear", "NoPE"),
    (dict(mixers="A", attn_res="full"), "deepseek_v3", "Attention Residuals"),
])
def test_export_refuses_what_transformers_cannot_express(overrides, layout, match, tmp_path):
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, kv_lora_rank=24, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, kda_num_heads=2, kda_head_dim=16, num_experts=0, **overrides)
    with pytest.raises(ConfigError, match=match):
        config_to_hf(cfg, layout)
    if overrides["mixers"] == "G":
        with pytest.raises(ConfigError, match=match):
            save_hf(build_model(cfg), tmp_path / "out", layout=layout)
        assert not (tmp_path / "out").exists()


def test_cli_round_trip_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    hf = hf_model(*CASES["ds-plain-tied-2shared"])
    hf.save_pretrained(tmp_path / "hf")
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    parser = add_convert_args(argparse.ArgumentParser())
    assert run_convert(parser.parse_args(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nk")])) == 0
    assert run_convert(parser.parse_args(["--to-hf", str(tmp_path / "nk"), "--out", str(tmp_path / "back"),
                                          "--tokenizer", str(tmp_path / "tokenizer.json")])) == 0
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    ids = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        assert rel_err(hf_from_dir(tmp_path / "back")(ids).logits, hf(ids).logits) <= 1e-4
    again = parser.parse_args(["--to-hf", str(tmp_path / "nk"), "--out", str(tmp_path / "back")])
    assert run_convert(again) == 2  # exists: refuses without --overwrite


def test_load_casts_to_bf16_but_keeps_router_bias_fp32(tmp_path):
    hf = hf_model(*CASES["ds-interleave-yarn-groups"])
    hf.save_pretrained(tmp_path / "hf")
    nk = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in nk.parameters()} == {torch.bfloat16}
    assert all(m.router.e_score_correction_bias.dtype == torch.float32 for m in nk.modules() if isinstance(m, MoE))
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        assert rel_err(nk(ids).float(), hf(ids).logits) < 0.15  # bf16 flips a few expert choices
