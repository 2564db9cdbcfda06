"""The tpa pass: TPA factors and the fused window op on local layers."""


import dataclasses

import pytest
import torch

import vpmoe_compile
from passes.base import PassError
from vpmoe_compile.modules.tpa import TPAFactorProjection
from tests.passes._attention import _rel


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


def test_tpa_refuses_tensor_parallel_that_splits_a_group_before_touching(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "tensor_model_parallel_size", 4)  # 2 query groups
    classes = [type(m).__name__ for m in tiny_model.modules()]
    with pytest.raises(PassError, match=r"tensor parallelism 4 does not divide the 2 query groups"):
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
