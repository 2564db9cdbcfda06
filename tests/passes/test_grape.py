"""The grape pass: GRAPE-M on local layers, GRAPE-A (ALiBi) on global layers."""


import dataclasses

import torch

import vpmoe_compile
from tests.conftest import make_batch
from vpmoe_compile.modules.attention import VpMoESelfAttention
from vpmoe_compile.modules.grape import GrapeA, GrapeMRotaryEmbedding
from tests.passes._attention import _logits, _rel


def test_grape_m_at_init_equals_stock_rope(tiny_model, tiny_cfg):
    """Without GRAPE-A, the GRAPE pass at init reproduces the stock model (RoPE local, NoPE global)."""
    ids, pos = make_batch()
    ref = _logits(tiny_model, ids, pos)
    cfg = dataclasses.replace(tiny_cfg, grape=dataclasses.replace(tiny_cfg.grape, grape_a=False))
    vpmoe_compile.transform(tiny_model, cfg, passes=["layer_plan", "global_attention", "grape"])
    assert isinstance(tiny_model.rotary_pos_emb, GrapeMRotaryEmbedding)
    assert _rel(_logits(tiny_model, ids, pos), ref) < 1e-4
    # and a changed frequency is live
    with torch.no_grad():
        tiny_model.rotary_pos_emb.log_freq.add_(3.0)
    assert _rel(_logits(tiny_model, ids, pos), ref) > 1e-4


def test_grape_pass_sites_and_untouched_layers(tiny_model):
    mlps = [l.mlp for l in tiny_model.decoder.layers]
    projs = [l.self_attention.linear_proj for l in tiny_model.decoder.layers]
    norms = [l.input_layernorm for l in tiny_model.decoder.layers]
    emb, out = tiny_model.embedding, tiny_model.output_layer
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention", "grape"])
    layers = tiny_model.decoder.layers
    for i, l in enumerate(layers):
        assert l.mlp is mlps[i] and l.self_attention.linear_proj is projs[i] and l.input_layernorm is norms[i]
        assert isinstance(l.self_attention, VpMoESelfAttention)
        assert l.self_attention.rotate == (i != 3)
    assert tiny_model.embedding is emb and tiny_model.output_layer is out
    grape_a = layers[3].self_attention.core_attention.grape_a
    assert isinstance(grape_a, GrapeA)
    assert torch.equal(grape_a.slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert "slopes" not in tiny_model.state_dict().keys().__str__()  # non-persistent buffer
    assert "rotary_pos_emb.log_freq" in tiny_model.state_dict()


def test_bf16_cast_does_not_round_grape_parameters():
    """model.bfloat16() / Float16Module must leave log_freq, frozen inv_freq and slopes exact."""
    g = GrapeMRotaryEmbedding(128)
    before = g.log_freq.detach().clone()
    g.bfloat16()
    assert g.log_freq.dtype == torch.float32 and torch.equal(g.log_freq.detach(), before)
    frozen = GrapeMRotaryEmbedding(128, learnable=False)
    ref = frozen.inv_freq.clone()
    frozen.bfloat16()
    assert frozen.inv_freq.dtype == torch.float32 and torch.equal(frozen.inv_freq, ref)
    from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes

    a = GrapeA(12).bfloat16()
    assert a.slopes.dtype == torch.float32 and torch.equal(a.slopes, alibi_slopes(12))
