"""Config loading: presets, the fork's TOML format, clear errors for unknown keys/values."""

import dataclasses
import math
import textwrap

import pytest

from megatron_base import config as config_mod
from megatron_base.config import (
    PRESET_DIR,
    PRESETS,
    ConfigError,
    VpMoEConfig,
    config_from_dict,
    load_config,
)


def _preset_data(name="tiny"):
    """The raw TOML data of a preset (a complete config: every model key stated)."""
    return config_mod.tomllib.loads((PRESET_DIR / f"{name}.toml").read_text())


def _with(name="tiny", **changes):
    """A preset's data with ``section__key=value`` changes (``None`` deletes the key)."""
    data = _preset_data(name)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if value is None:
            data[section].pop(key)
        else:
            data.setdefault(section, {})[key] = value
    return data


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
    # The reference fork's file layout, with its keys (values adjusted to what stock can build);
    # it states only part of the model, so it names the preset that fills the rest.
    text = textwrap.dedent(
        """
        [meta]
        base = "vpmoe"
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
    path.write_text(text.replace('base = "vpmoe"\n', ""))
    with pytest.raises(ConfigError, match=r"leaves out model keys: .*\[model\] num_attention_heads"):
        load_config(path)


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
        (_with(model__num_attention_heads=6, model__num_query_groups=4), "multiple of"),
        (_with(moe__num_experts=8, moe__topk=9, moe__router_num_groups=0, moe__router_group_topk=0), "topk"),
        (_with(moe__num_experts=10, moe__router_num_groups=4), "router_num_groups"),
        (_with(tokenizer__vocab_size=201088 + 64), "multiple of 128"),
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


# --------------------------------------------------------------------------------------------
# Every value has a domain: finite floats, usable ranges, named key and allowed range
# --------------------------------------------------------------------------------------------

FLOAT_KEYS = [
    (section, f.name)
    for section, cls in config_mod._SECTIONS.items()
    for f in dataclasses.fields(cls)
    if "float" in str(f.type)
]


def test_float_keys_cover_every_section_with_floats():
    assert ("optimizer", "lr") in FLOAT_KEYS and ("optimizer", "normuon_aux_lr") in FLOAT_KEYS
    assert {s for s, _ in FLOAT_KEYS} >= {"model", "attention", "grape", "moe", "optimizer"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("section, key", FLOAT_KEYS, ids=[f"{s}.{k}" for s, k in FLOAT_KEYS])
def test_non_finite_float_is_rejected_naming_the_key(section, key, value):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(**{f"{section}__{key}": value}))
    msg = str(e.value)
    assert f"[{section}] {key}" in msg and "finite" in msg


def test_nan_learning_rate_in_a_file_is_rejected(tmp_path):
    text = (PRESET_DIR / "tiny.toml").read_text()
    assert "\nlr = 1e-2\n" in text
    path = tmp_path / "nan_lr.toml"
    path.write_text(text.replace("\nlr = 1e-2\n", "\nlr = nan\n"))
    with pytest.raises(ConfigError, match=r"nan_lr\.toml: \[optimizer\] lr = nan is not a finite number"):
        load_config(path)


@pytest.mark.parametrize(
    "changes, expected",
    [
        # learning rates (the aux ones too) are >= 0, and min <= max as Megatron's scheduler asserts
        ({"optimizer__lr": -1e-3}, ["[optimizer] lr", "lr >= 0"]),
        ({"optimizer__min_lr": -1e-5}, ["[optimizer] min_lr", ">= 0"]),
        ({"optimizer__normuon_aux_lr": -3e-3}, ["[optimizer] normuon_aux_lr", "normuon_aux_lr >= 0"]),
        ({"optimizer__normuon_aux_min_lr": -1e-4}, ["[optimizer] normuon_aux_min_lr", ">= 0"]),
        ({"optimizer__min_lr": 0.1}, ["[optimizer] min_lr", "<= [optimizer] lr"]),
        ({"optimizer__normuon_aux_min_lr": 0.1}, ["[optimizer] normuon_aux_min_lr", "normuon_aux_lr"]),
        # betas / momenta in [0, 1): 1 never forgets
        ({"optimizer__adam_beta1": 1.0}, ["[optimizer] adam_beta1", "0 <= adam_beta1 < 1"]),
        ({"optimizer__adam_beta2": 1.0}, ["[optimizer] adam_beta2", "0 <= adam_beta2 < 1"]),
        ({"optimizer__adam_beta2": -0.1}, ["[optimizer] adam_beta2", "0 <= adam_beta2 < 1"]),
        ({"optimizer__normuon_momentum": 1.0}, ["[optimizer] normuon_momentum", "< 1"]),
        ({"optimizer__normuon_beta2": 1.0}, ["[optimizer] normuon_beta2", "< 1"]),
        # eps > 0
        ({"optimizer__adam_eps": 0.0}, ["[optimizer] adam_eps", "adam_eps > 0"]),
        ({"optimizer__normuon_eps": 0.0}, ["[optimizer] normuon_eps", "> 0"]),
        ({"model__layernorm_epsilon": 0.0}, ["[model] layernorm_epsilon", "> 0"]),
        ({"optimizer__weight_decay": -0.1}, ["[optimizer] weight_decay", ">= 0"]),
        ({"optimizer__clip_grad": -1.0}, ["[optimizer] clip_grad", ">= 0"]),
        ({"optimizer__polar_express_safety_factor": -0.01}, ["[optimizer] polar_express_safety_factor", ">= 0"]),
        ({"optimizer__polar_express_steps": 0}, ["[optimizer] polar_express_steps", ">= 1"]),
        # the vocabulary holds the tokenizer's ids and Megatron's padding
        ({"tokenizer__vocab_size": 256}, ["[tokenizer] vocab_size", ">= 201088"]),
        ({"tokenizer__vocab_size": 201088 - 128}, ["[tokenizer] vocab_size", "201088"]),
        # model / attention / grape / moe
        ({"model__init_method_std": 0.0}, ["[model] init_method_std", "> 0"]),
        ({"model__hidden_dropout": 1.0}, ["[model] hidden_dropout", "0 <= hidden_dropout < 1"]),
        ({"attention__attention_dropout": 1.0}, ["[attention] attention_dropout", "< 1"]),
        ({"attention__rotary_base": 1.0}, ["[attention] rotary_base", "> 1"]),
        ({"attention__window_size": 0}, ["[attention] window_size", ">= 1"]),
        ({"model__head_dim": 0}, ["[model] head_dim", ">= 1"]),
        ({"model__num_query_groups": 3}, ["[model] num_attention_heads", "multiple of"]),
        ({"model__activation": "swiglu"}, ["[model] activation", "gated_linear_unit"]),
        ({"grape__grapem_log_freq_scale": 0.0}, ["[grape] grapem_log_freq_scale", "> 0"]),
        ({"moe__router_topk_scaling_factor": 0.0}, ["[moe] router_topk_scaling_factor", "> 0"]),
        ({"moe__aux_loss_coeff": -1.0}, ["[moe] aux_loss_coeff", ">= 0"]),
        ({"moe__router_bias_update_rate": -1.0}, ["[moe] router_bias_update_rate", ">= 0"]),
        ({"moe__shared_expert_size": 0}, ["[moe] shared_expert_size", ">= 1"]),
        ({"moe__router_score_function": "softmax"}, ["[moe] router_enable_expert_bias", "sigmoid"]),
        ({"moe__router_num_groups": 0}, ["[moe] router_group_topk", "router_num_groups"]),
        # tiny: 8 experts in 4 groups of 2, 2 groups per token -> topk in 2..4
        ({"moe__topk": 1}, ["[moe] topk", "router_group_topk"]),
        ({"moe__topk": 5}, ["[moe] topk", "4"]),
    ],
)
def test_out_of_domain_values_name_key_and_range(changes, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(**changes))
    msg = str(e.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_vocab_minimum_is_the_tokenizers():
    from megatron_base.tokenizer import O200K_HARMONY_VOCAB_SIZE

    assert config_mod.O200K_PADDED_VOCAB == O200K_HARMONY_VOCAB_SIZE
    cfg = config_from_dict(_with(tokenizer__vocab_size=O200K_HARMONY_VOCAB_SIZE + 128))
    assert cfg.tokenizer.vocab_size == 201216


# --------------------------------------------------------------------------------------------
# A config states its model: every model key, or an explicit [meta] base preset
# --------------------------------------------------------------------------------------------


def test_empty_file_states_no_model(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "empty.toml" in msg and "states no model" in msg
    assert '[meta] base = "tiny"' in msg and "every section" in msg
    with pytest.raises(ConfigError, match="states no model"):
        config_from_dict({})
    with pytest.raises(ConfigError, match="states no model"):
        config_from_dict({"meta": {"name": "x"}, "optimizer": {"lr": 1e-3}})


def test_missing_section_is_named():
    data = _preset_data("tiny")
    del data["moe"]
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert "[moe]" in msg and "num_experts" in msg and "[meta] base" in msg


def test_missing_key_is_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(moe__num_experts=None, attention__window_attn_skip_freq=None))
    msg = str(e.value)
    assert "[moe] num_experts" in msg and "[attention] window_attn_skip_freq" in msg
    assert "[meta] base" in msg


def test_base_preset_fills_what_the_file_omits(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text('[meta]\nbase = "tiny"\nname = "small"\n[model]\nnum_layers = 8\n[optimizer]\nlr = 5e-3\n')
    cfg = load_config(path)
    tiny = load_config("tiny")
    assert cfg.model.num_layers == 8 and cfg.optimizer.lr == 5e-3
    assert cfg.meta.base == "tiny" and cfg.meta.name == "small"
    got, want = cfg.to_dict(), tiny.to_dict()
    got["model"]["num_layers"], got["optimizer"]["lr"] = 4, tiny.optimizer.lr
    del got["meta"], want["meta"]
    assert got == want
    # cross-field rules apply to the merged config
    path.write_text('[meta]\nbase = "tiny"\n[moe]\nnum_experts = 6\n')
    with pytest.raises(ConfigError, match="router_num_groups"):
        load_config(path)


@pytest.mark.parametrize("name", PRESETS)
def test_base_alone_is_the_preset(name):
    cfg = config_from_dict({"meta": {"base": name}})
    got, want = cfg.to_dict(), load_config(name).to_dict()
    del got["meta"], want["meta"]
    assert got == want


def test_unknown_base_lists_presets():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"meta": {"base": "huge"}})
    msg = str(e.value)
    assert "[meta] base" in msg and "'tiny'" in msg and "'vpmoe-8l'" in msg and "'vpmoe'" in msg


def test_vpmoe_preset_is_the_dataclass_defaults():
    got, want = load_config("vpmoe").to_dict(), VpMoEConfig().to_dict()
    del got["meta"], want["meta"]
    assert got == want
