"""transform()'s config check: a config that differs from the stock model in anything the model
encodes is refused, naming every mismatch (config vs model), before any pass runs."""

import dataclasses

import pytest
import torch

import vpmoe_compile
from vpmoe_compile.pipeline import TransformError, _check_cfg_matches, config_from_model


@pytest.fixture(scope="module")
def tiny_meta(megatron_env):
    """The stock tiny model on the meta device (its structure only; nothing allocated)."""
    from megatron_base import build_stock_gpt

    return build_stock_gpt("tiny", device="meta")


def _changed(cfg, **changes):
    """``cfg`` with ``section__key=value`` changes (no validation: the check must catch them)."""
    sections = {}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    )


# (changes to the tiny config, the mismatch the error must name: "<key>: config <c> vs model <m>")
MISMATCHES = [
    ({"moe__num_experts": 4}, "[moe] num_experts: config 4 vs model 8"),
    ({"attention__window_attn_skip_freq": 2}, "[attention] window_attn_skip_freq: config 2 vs model 4"),
    ({"attention__window_size": 32}, "[attention] window_size: config 32 vs model 16"),
    ({"model__num_layers": 8}, "[model] num_layers: config 8 vs model 4"),
    ({"model__hidden_size": 128}, "[model] hidden_size: config 128 vs model 64"),
    ({"model__num_attention_heads": 4}, "[model] num_attention_heads: config 4 vs model 8"),
    ({"model__num_query_groups": 4}, "[model] num_query_groups: config 4 vs model 2"),
    ({"model__head_dim": 32}, "[model] head_dim: config 32 vs model 16"),
    ({"model__ffn_hidden_size": 256}, "[model] ffn_hidden_size: config 256 vs model 128"),
    ({"moe__expert_ffn_hidden_size": 64}, "[moe] expert_ffn_hidden_size: config 64 vs model 32"),
    ({"moe__topk": 4}, "[moe] topk: config 4 vs model 2"),
    ({"moe__shared_expert_size": 128}, "[moe] shared_expert_size: config 128 vs model 64"),
    ({"moe__shared_expert": False}, "[moe] shared_expert: config False vs model True"),
    ({"moe__first_layer_dense": False}, "[moe] first_layer_dense: config False vs model True"),
    ({"model__qk_layernorm": False}, "[model] qk_layernorm: config False vs model True"),
    ({"model__softmax_type": "vanilla"}, "[model] softmax_type: config vanilla vs model learnable"),
    ({"model__add_qkv_bias": False}, "[model] add_qkv_bias: config False vs model True"),
    ({"model__gated_linear_unit": True}, "[model] gated_linear_unit: config True vs model False"),
    ({"model__activation": "gelu"}, "[model] activation: config gelu vs model squaredrelu"),
    ({"model__untied_embeddings": False}, "[model] untied_embeddings: config False vs model True"),
    ({"model__layernorm_epsilon": 1e-6}, "[model] layernorm_epsilon: config 1e-06 vs model 1e-05"),
    ({"tokenizer__vocab_size": 201216}, "[tokenizer] vocab_size: config 201216 vs model 201088"),
    ({"attention__position_embedding_type": "rope"}, "[attention] position_embedding_type: config rope vs model grapem"),
    ({"attention__rotary_base": 500000.0}, "[attention] rotary_base: config 500000.0 vs model 10000.0"),
    ({"moe__router_score_function": "softmax"}, "[moe] router_score_function: config softmax vs model sigmoid"),
    ({"moe__router_topk_scaling_factor": 1.0}, "[moe] router_topk_scaling_factor: config 1.0 vs model 2.5"),
    ({"moe__router_num_groups": 2}, "[moe] router_num_groups: config 2 vs model 4"),
    ({"moe__router_group_topk": 1}, "[moe] router_group_topk: config 1 vs model 2"),
    ({"moe__router_enable_expert_bias": False}, "[moe] router_enable_expert_bias: config False vs model True"),
    ({"moe__router_load_balancing_type": "aux_loss"}, "[moe] router_load_balancing_type: config aux_loss vs model seq_aux_loss"),
    ({"moe__router_dtype": "fp64"}, "[moe] router_dtype: config fp64 vs model fp32"),
]


@pytest.mark.parametrize("changes, expected", MISMATCHES, ids=[e.split(":")[0] for _, e in MISMATCHES])
def test_each_mismatch_is_named(tiny_meta, tiny_cfg, changes, expected):
    with pytest.raises(TransformError) as e:
        _check_cfg_matches(_changed(tiny_cfg, **changes), tiny_meta)
    msg = str(e.value)
    assert "does not describe this model" in msg and expected in msg, msg


def test_linear_biases_fit_a_model_without_them_not_the_other_way(tiny_meta, tiny_cfg, monkeypatch):
    """A stock model cannot hold the fork's linear biases (the linear_bias pass adds them), so a
    config asking for them fits a model without them; a model built with them does not fit a
    config without them."""
    _check_cfg_matches(_changed(tiny_cfg, model__add_bias_linear=True), tiny_meta)
    monkeypatch.setattr(tiny_meta.config, "add_bias_linear", True)
    with pytest.raises(TransformError, match=r"\[model\] add_bias_linear: config False vs model True"):
        _check_cfg_matches(tiny_cfg, tiny_meta)


def test_all_mismatches_named_at_once(tiny_meta, tiny_cfg):
    bad = _changed(tiny_cfg, moe__num_experts=4, attention__window_attn_skip_freq=2, moe__shared_expert_size=128)
    with pytest.raises(TransformError) as e:
        _check_cfg_matches(bad, tiny_meta)
    msg = str(e.value)
    for part in ("[moe] num_experts: config 4 vs model 8", "[attention] window_attn_skip_freq: config 2 vs model 4",
                 "[moe] shared_expert_size: config 128 vs model 64"):
        assert part in msg


def test_matching_configs_pass(tiny_meta, tiny_cfg):
    _check_cfg_matches(tiny_cfg, tiny_meta)
    _check_cfg_matches(tiny_meta.vpmoe_config, tiny_meta)
    # optimizer settings and training-only keys are not part of the model
    _check_cfg_matches(_changed(tiny_cfg, optimizer__lr=1.0, meta__name="other", attention__max_sequence_length=64), tiny_meta)
    # the config read off a model (transform(model) of a model that build_stock_gpt did not build)
    _check_cfg_matches(config_from_model(tiny_meta), tiny_meta)


def test_vpmoe_8l_matches_its_model(megatron_env):
    from megatron_base import build_stock_gpt, load_config

    model = build_stock_gpt("vpmoe-8l", device="meta")
    _check_cfg_matches(load_config("vpmoe-8l"), model)
    with pytest.raises(TransformError, match=r"\[moe\] num_experts: config 128 vs model 256"):
        _check_cfg_matches(_changed(load_config("vpmoe-8l"), moe__num_experts=128), model)


def test_transform_refuses_and_changes_nothing(tiny_model, tiny_cfg, tmp_path):
    before = [(n, type(m).__name__) for n, m in tiny_model.named_modules()]
    params = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    bad = _changed(tiny_cfg, moe__num_experts=4)
    with pytest.raises(TransformError, match=r"\[moe\] num_experts: config 4 vs model 8"):
        vpmoe_compile.transform(tiny_model, bad, dump_dir=tmp_path / "dump")
    assert not (tmp_path / "dump").exists()
    assert [(n, type(m).__name__) for n, m in tiny_model.named_modules()] == before
    assert all(torch.equal(p, params[n]) for n, p in tiny_model.named_parameters())
    assert getattr(tiny_model, "vpmoe_transform", None) is None


def test_list_schedules_are_compared_layer_by_layer(tiny_meta, tiny_cfg):
    """Megatron also takes per-layer lists (window_attn_skip_freq: 1 = window, moe_layer_freq:
    1 = MoE); the same schedule as a list matches, a different one is named."""
    import copy
    import types

    def with_config(**changes):
        tc = copy.copy(tiny_meta.config)
        for k, v in changes.items():
            setattr(tc, k, v)
        return types.SimpleNamespace(
            config=tc, vocab_size=tiny_meta.vocab_size, position_embedding_type=tiny_meta.position_embedding_type,
            rotary_base=tiny_meta.rotary_base, share_embeddings_and_output_weights=False, max_sequence_length=128,
        )

    same = with_config(window_attn_skip_freq=[1, 1, 1, 0], moe_layer_freq=[0, 1, 1, 1])
    _check_cfg_matches(tiny_cfg, same)
    _check_cfg_matches(config_from_model(same), same)
    other = with_config(window_attn_skip_freq=[1, 0, 1, 0], moe_layer_freq=[1, 0, 1, 0])
    with pytest.raises(TransformError) as e:
        _check_cfg_matches(tiny_cfg, other)
    msg = str(e.value)
    assert "[attention] window_attn_skip_freq: config 4 vs model layers LGLG (L local, G global)" in msg
    assert "[moe] first_layer_dense: config True vs model MoE layer pattern MDMD (M MoE, D dense)" in msg
    # the config read off such a model keeps the default frequency: not compared (nor refused)
    _check_cfg_matches(config_from_model(other), other)
    with pytest.raises(TransformError, match=r"\[moe\] first_layer_dense: config True vs model False"):
        _check_cfg_matches(tiny_cfg, with_config(moe_layer_freq=1))
