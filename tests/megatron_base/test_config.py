"""Config loading: presets, the fork's TOML format, clear errors for unknown keys/values."""

import textwrap

import pytest

from megatron_base.config import PRESETS, ConfigError, VpMoEConfig, config_from_dict, load_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_share_structure(name):
    cfg = load_config(name)
    assert isinstance(cfg, VpMoEConfig)
    assert cfg.tokenizer.vocab_size == 201088
    assert cfg.model.num_attention_heads % cfg.model.num_query_groups == 0
    assert cfg.attention.window_attn_skip_freq == 4
    assert cfg.moe.first_layer_dense and cfg.moe.shared_expert
    assert cfg.model.activation == "squaredrelu" and not cfg.model.gated_linear_unit
    assert cfg.model.softmax_type == "learnable" and cfg.model.qk_layernorm
    assert cfg.megatron_window_size == (cfg.attention.window_size - 1, 0)


def test_full_config_is_the_locked_architecture():
    cfg = load_config("vpmoe")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim) == (80, 1024, 8, 2, 128)
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.moe.shared_expert_size) == (256, 4, 512)
    assert cfg.megatron_window_size == (127, 0)
    assert (cfg.tpa.tpa_q_rank, cfg.tpa.tpa_rank) == (4, 2)
    assert cfg.grape.grapem_log_freq_scale == 16.0
    assert load_config("vpmoe-8l").model.num_layers == 8


def test_fork_toml_sections_and_keys_parse(tmp_path):
    # The reference fork's file layout, with its keys (values adjusted to what stock can build).
    text = textwrap.dedent(
        """
        [meta]
        [tokenizer]
        vocab_size = 201088
        [model]
        num_layers = 80
        hidden_size = 1024
        ffn_hidden_size = 128
        add_bias_linear = false
        activation = "squaredrelu"
        [attention]
        position_embedding_type = "grapem"
        window_size = 128
        window_attn_skip_freq = 4
        [tpa]
        use_tpa = true
        tpa_rank = 2
        tpa_q_rank = 4
        [grape]
        grape_a = true
        grapem_log_freq_scale = 16
        [moe]
        num_experts = 256
        router_dtype = "fp32"
        [optimizer]
        name = "normuon"
        polar_express_safety_factor = 2e-2
        """
    )
    path = tmp_path / "fork.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.grape.grapem_log_freq_scale == 16.0 and isinstance(cfg.grape.grapem_log_freq_scale, float)
    assert cfg.source == str(path)


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"num_layer": 4}})
    msg = str(e.value)
    assert "num_layer" in msg and "did you mean 'num_layers'" in msg and "allowed keys" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section \[modle\].*did you mean \[model\]"):
        config_from_dict({"modle": {}})


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"activation": "tanh"}})
    assert "activation" in str(e.value) and "'squaredrelu'" in str(e.value)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"model": {"num_layers": "4"}}, "wrong type; expected int"),
        ({"model": {"num_layers": 0}}, "too small"),
        ({"model": {"qk_layernorm": 1}}, "wrong type; expected bool"),
        ({"model": {"num_attention_heads": 6, "num_query_groups": 4}}, "multiple of"),
        ({"moe": {"num_experts": 8, "topk": 9, "router_num_groups": 0}}, "topk"),
        ({"moe": {"num_experts": 10, "router_num_groups": 4}}, "router_num_groups"),
        ({"tokenizer": {"vocab_size": 201000}}, "multiple of 128"),
    ],
)
def test_invalid_values(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(data)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
