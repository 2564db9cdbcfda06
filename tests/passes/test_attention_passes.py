"""GRAPE, global-attention and TPA passes on the tiny model: semantics, parity, gradients."""

import dataclasses

import pytest
import torch

import vpmoe_compile
from passes.base import PassError
from tests.conftest import make_batch
from vpmoe_compile.modules.attention import SinkCoreAttention, VpMoESelfAttention
from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference
from vpmoe_compile.modules.grape import GrapeA, GrapeMRotaryEmbedding
from vpmoe_compile.modules.tpa import TPACoreAttention, TPAFactorProjection, TPASelfAttention


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(ids, pos, None).double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_global_attention_pass_alone_keeps_semantics(tiny_model):
    ids, pos = make_batch()
    with torch.no_grad():
        for l in tiny_model.decoder.layers:
            l.self_attention.core_attention.softmax_offset.normal_(0, 1.0)
    ref = _logits(tiny_model, ids, pos)
    sink = tiny_model.decoder.layers[3].self_attention.core_attention.softmax_offset
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    assert isinstance(core, SinkCoreAttention) and core.softmax_offset is sink
    assert type(tiny_model.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert _rel(_logits(tiny_model, ids, pos), ref) < 1e-5


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


def test_global_layer_uses_alibi_and_sink(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention", "grape"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    with torch.no_grad():
        core.softmax_offset.normal_(0, 1.0)
    q, k, v = torch.randn(20, 2, 8, 16), torch.randn(20, 2, 2, 16), torch.randn(20, 2, 2, 16)
    got = core(q, k, v, None)
    want, _ = sink_attention_reference(
        q.double(), k.double(), v.double(), core.softmax_offset.detach().double(),
        slopes=core.grape_a.slopes.double(), softmax_scale=core.softmax_scale,
    )
    assert _rel(got.double(), want.reshape(20, 2, -1)) < 1e-6


def test_full_transform_backward_reaches_every_new_parameter(tiny_model):
    vpmoe_compile.transform(tiny_model)
    ids, pos = make_batch()
    tiny_model(ids, pos, None, labels=ids).mean().backward()
    lf = tiny_model.rotary_pos_emb.log_freq
    assert lf.dtype == torch.float32 and lf.grad is not None and lf.grad.abs().sum() > 0
    for i in range(3):
        sa = tiny_model.decoder.layers[i].self_attention
        assert isinstance(sa, TPASelfAttention)
        for p in (sa.linear_qkv.weight, sa.linear_qkv.bias, sa.q_layernorm.weight, sa.k_layernorm.weight, sa.core_attention.softmax_offset):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    tiny_model.bfloat16()
    assert tiny_model.rotary_pos_emb.log_freq.dtype == torch.float32


def test_tpa_local_layer_matches_the_fork_order_of_operations(tiny_model, tiny_cfg):
    """Ours (packed factors + fused op) vs the fork's chain from the same parameters:
    six projections -> contraction /R -> bias -> RMSNorm -> rotate (Megatron's own rotary code)
    -> stock DotProductAttention (window + sink) -> linear_proj."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from vpmoe_compile.ops.tpa_attention.reference import fork_mixed_qkv, split_mixed_qkv

    vpmoe_compile.transform(tiny_model)
    sa = tiny_model.decoder.layers[1].self_attention
    with torch.no_grad():
        sa.linear_qkv.bias.normal_(0, 0.5)
        sa.q_layernorm.weight.normal_(1, 0.2)
        sa.k_layernorm.weight.normal_(1, 0.2)
        sa.core_attention.softmax_offset.normal_(0, 1.0)
        tiny_model.rotary_pos_emb.log_freq.add_(torch.randn(8))
    s, b = 40, 2
    x = torch.randn(s, b, 64)
    emb = tiny_model.rotary_pos_emb(s)
    with torch.no_grad():
        ours, _ = sa(x, None, rotary_pos_emb=emb)
        rows = dict(sa.linear_qkv.rows)
        w = torch.split(sa.linear_qkv.weight, [n for _, n in sa.linear_qkv.rows])
        mixed = fork_mixed_qkv(x, *w, sa.linear_qkv.bias, num_heads=8, num_groups=2, head_dim=16, q_rank=4, kv_rank=2)
        q, k, v = split_mixed_qkv(mixed, 8, 2, 16)
        q, k = sa.q_layernorm(q), sa.k_layernorm(k)
        q = _apply_rotary_pos_emb_bshd(q, emb)
        k = _apply_rotary_pos_emb_bshd(k, emb)
        dpa = DotProductAttention(tiny_model.config, layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self")
        dpa.softmax_offset.copy_(sa.core_attention.softmax_offset)
        fork, _ = sa.linear_proj(dpa(q, k, v, None, attn_mask_type=AttnMaskType.causal))
    assert rows["a_q"] == 32 and rows["b_q"] == 64
    assert _rel(ours.double(), fork.double()) < 1e-5


def test_tpa_refuses_tensor_parallel_before_touching(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "tensor_model_parallel_size", 2)
    classes = [type(m).__name__ for m in tiny_model.modules()]
    with pytest.raises(PassError, match=r"TP=2|tensor_model_parallel_size = 1"):
        vpmoe_compile.transform(tiny_model)
    assert classes == [type(m).__name__ for m in tiny_model.modules()]


def test_tpa_factor_init_options(tiny_model, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, tpa=dataclasses.replace(tiny_cfg.tpa, tpa_init="xavier"))
    vpmoe_compile.transform(tiny_model, cfg)
    proj = tiny_model.decoder.layers[0].self_attention.linear_qkv
    assert isinstance(proj, TPAFactorProjection)
    a_q = proj.weight[:32]
    bound = (6.0 / (32 + 64)) ** 0.5
    assert a_q.abs().max() <= bound and a_q.abs().max() > 0.5 * bound
    assert proj.weight.tpa_factor_rows[0] == ("a_q", 32)


def test_global_core_ignores_causal_mask_with_one_warning(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    q, k, v = torch.randn(12, 1, 8, 16), torch.randn(12, 1, 2, 16), torch.randn(12, 1, 2, 16)
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)[None, None]
    with pytest.warns(UserWarning, match="ignores the attention_mask"):
        a = core(q, k, v, causal)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        b = core(q, k, v, causal)  # warned once only
    assert torch.equal(a, core(q, k, v, None)) and torch.equal(a, b)


def test_bf16_transformed_model_forward_backward(megatron_env, tiny_cfg):
    """bf16 parameters (the GPU training dtype) through every new module; log_freq stays fp32."""
    from megatron_base import build_stock_gpt

    model = build_stock_gpt(tiny_cfg, device="cpu", params_dtype=torch.bfloat16)
    vpmoe_compile.transform(model)
    assert model.rotary_pos_emb.log_freq.dtype == torch.float32
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.dtype == torch.bfloat16
    ids, pos = make_batch(b=1, s=24)
    loss = model(ids, pos, None, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.rotary_pos_emb.log_freq.grad.dtype == torch.float32
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.grad.dtype == torch.bfloat16


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


def test_query_key_layer_scaling_scale_is_kept(megatron_env, tiny_cfg):
    """With apply_query_key_layer_scaling stock divides the scale by layer_number and multiplies
    it back in its softmax; the replacement must apply the same effective scale."""
    import dataclasses as dc

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_base.model import transformer_config_from_vpmoe

    tcfg = dc.replace(transformer_config_from_vpmoe(tiny_cfg), apply_query_key_layer_scaling=True, window_size=None)
    stock = DotProductAttention(tcfg, layer_number=4, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours = SinkCoreAttention(stock)
    q, k, v = torch.randn(20, 1, 8, 16) * 3, torch.randn(20, 1, 2, 16) * 3, torch.randn(20, 1, 2, 16)
    with torch.no_grad():
        assert _rel(ours(q, k, v, None).double(), stock(q, k, v, None, attn_mask_type=AttnMaskType.causal).double()) < 1e-5


def test_refuses_parameters_already_in_megatron_ddp(tiny_model):
    for p in tiny_model.parameters():
        p.main_grad = torch.zeros_like(p)
    with pytest.raises(vpmoe_compile.TransformError, match="main_grad"):
        vpmoe_compile.transform(tiny_model)


def test_checkpoint_keys_of_surviving_modules_are_kept(tiny_model):
    keys = set(tiny_model.state_dict())
    vpmoe_compile.transform(tiny_model)
    after = set(tiny_model.state_dict())
    # Nothing a stock checkpoint has disappears (incl. _extra_state), except the routed experts'
    # per-expert keys, which the moe pass stacks (and still loads: tests/passes/test_moe.py).
    per_expert = {k for k in keys if ".mlp.experts.local_experts." in k}
    stacked = {f"decoder.layers.{i}.mlp.experts.linear_fc{j}.weight" for i in (1, 2, 3) for j in (1, 2)}
    assert per_expert and keys - after == per_expert
    assert after - keys == {"rotary_pos_emb.log_freq"} | stacked
