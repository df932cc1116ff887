import pytest

from nanokimi import ConfigError, ModelConfig
from nanokimi.model.info import model_info


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match="Did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 128})


def test_wrong_type_names_field_and_type():
    with pytest.raises(ConfigError, match="hidden_size must be int"):
        ModelConfig.from_dict({"hidden_size": "128"})


def test_impossible_shapes_name_the_fields():
    with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig(mixers="G", num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="num_experts_per_tok=9"):
        ModelConfig(num_experts=8, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="unknown letter"):
        ModelConfig(mixers="KKXA")
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig(num_experts=8, n_group=3)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'kimi-k2'"):
        ModelConfig.preset("kimi-k3")


def test_mixer_pattern_tiles_over_layers():
    assert ModelConfig(num_layers=6, mixers="KKA").layer_mixers == "KKAKKA"
    assert ModelConfig(num_layers=5, mixers="KKKA").layer_mixers == "KKKAK"
    assert ModelConfig(num_layers=3, mixers="GAK").layer_mixers == "GAK"


# Published sizes: Kimi Linear 48B total / 3B activated; Moonlight 16B / 3B; Kimi K2 1.04T / 32B.
# The published "activated" figures do not share one convention: Moonlight's 3B counts the embedding
# table (2.58B without it), Kimi Linear's 3B does not (3.48B with it). Each is checked on its own convention.
@pytest.mark.parametrize("preset, total, activated, key", [
    ("kimi-linear-48b-a3b", 48e9, 3e9, "activated_params"),
    ("moonlight-16b-a3b", 16e9, 3e9, "activated_with_embedding"),
    ("kimi-k2", 1.04e12, 32e9, "activated_params"),
])
def test_full_size_presets_match_published_parameter_counts(preset, total, activated, key):
    info = model_info(ModelConfig.preset(preset))
    assert abs(info["total_params"] / total - 1) < 0.05
    assert abs(info[key] / activated - 1) < 0.05


def test_cache_sizes_of_mla_and_kda():
    info = model_info(ModelConfig.preset("bench-kl-900m"))
    assert info["kv_cache_bytes_per_token"] == 4 * (256 + 64) * 2  # 4 MLA layers, latent + rope, bf16
    assert info["recurrent_state_bytes_per_sequence"] == 12 * (8 * 128 * 128 * 4 + 3 * 3 * 1024 * 2)
