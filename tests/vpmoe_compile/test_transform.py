"""The whole default transform on the tiny model: gradients, bf16, refusals, checkpoint keys."""



import pytest
import torch

import vpmoe_compile
from tests.conftest import make_batch
from vpmoe_compile.modules.attention import SinkCoreAttention
from vpmoe_compile.modules.tpa import TPASelfAttention
from tests.passes._attention import _rel


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
