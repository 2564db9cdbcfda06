"""The stock model built from our config has exactly the vpMoE semantics stock Megatron provides.

Covers the seed's verification items: learnable softmax offset = GPT-OSS sink (against a
formula written here), shared expert always on with intermediate size 512, layer 1 dense and
the rest MoE, 3:1 local:global schedule with a 128-token window, plus the parameter count of
the full config, stock classes only, and the clear errors for what stock 0.16.1 cannot build.
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_base import UnsupportedConfigError, build_stock_gpt, count_parameters, load_config
from megatron_base.model import transformer_config_from_vpmoe
from tests.conftest import make_batch


@pytest.fixture(scope="module")
def full_meta(megatron_env):
    """The full 80-layer vpMoE config built on the meta device (nothing allocated)."""
    return build_stock_gpt("vpmoe", device="meta")


def _small_cfg(name="vpmoe", **model):
    """A config with the preset's schedule/window but tiny widths (for exact numerics)."""
    cfg = load_config(name)
    m = dataclasses.replace(cfg.model, num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2, head_dim=16, **model)
    moe = dataclasses.replace(cfg.moe, num_experts=8, topk=2, shared_expert_size=64, router_num_groups=4, router_group_topk=2, expert_ffn_hidden_size=32)
    return dataclasses.replace(cfg, model=m, moe=moe)


def test_stock_classes_only(tiny_model):
    for name, mod in tiny_model.named_modules():
        top = type(mod).__module__.split(".")[0]
        assert top in ("megatron", "torch"), f"{name} is {type(mod).__module__}"


def test_structure_of_tiny(tiny_model, tiny_cfg):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    m = tiny_model
    assert m.vocab_size == 201088 and not m.share_embeddings_and_output_weights
    assert m.embedding.word_embeddings.weight.data_ptr() != m.output_layer.weight.data_ptr()
    layers = list(m.decoder.layers)
    assert isinstance(layers[0].mlp, MLP) and not isinstance(layers[0].mlp, MoELayer)
    assert all(isinstance(l.mlp, MoELayer) for l in layers[1:])
    attn = layers[0].self_attention
    assert isinstance(attn.q_layernorm, torch.nn.RMSNorm) and isinstance(layers[0].input_layernorm, torch.nn.RMSNorm)
    assert attn.linear_qkv.weight.shape == ((8 + 2 * 2) * 16, 64)  # GQA 8 heads / 2 groups
    off = attn.core_attention.softmax_offset
    assert isinstance(off, torch.nn.Parameter) and off.shape == (8,)  # one logit per head
    # squared-ReLU, non-gated: fc1 is [ffn, h] (not 2*ffn) and the activation is relu(x)^2
    fc1 = layers[0].mlp.linear_fc1.weight
    assert fc1.shape == (tiny_cfg.model.ffn_hidden_size, 64)
    x = torch.randn(100)
    assert torch.equal(layers[0].mlp.activation_func(x), torch.relu(x) ** 2)
    router = layers[1].mlp.router
    assert router.weight.shape == (8, 64) and router.weight.dtype == torch.float32
    assert hasattr(router, "expert_bias") and router.expert_bias.shape == (8,)
    cfg = m.config
    assert (cfg.moe_router_score_function, cfg.moe_router_load_balancing_type) == ("sigmoid", "seq_aux_loss")
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    assert cfg.moe_router_dtype == "fp32" and cfg.moe_router_enable_expert_bias


def test_forward_backward_on_cpu(tiny_model):
    ids, pos = make_batch()
    loss = tiny_model(ids, pos, None, labels=ids)
    assert loss.shape == (2, 32) and loss.dtype == torch.float32
    loss.mean().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert torch.isfinite(torch.stack([g.float().norm() for g in grads])).all()


def _sink_reference(q, k, v, offset, scale, window=None):
    """GPT-OSS attention with sinks, written from the formula (float64):
    p_ij = exp(s_ij) / (exp(sink_h) + sum_j' exp(s_ij')), o_i = sum_j p_ij v_j."""
    s, b, H, d = q.shape
    G = k.shape[2]
    out = torch.empty(s, b, H, d, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)
        scores = torch.einsum("ibd,jbd->bij", q[:, :, h].double(), k[:, :, g].double()) * scale
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        keep = j <= i
        if window is not None:
            keep &= (i - j) <= window - 1
        scores = scores.masked_fill(~keep, float("-inf"))
        m = torch.maximum(scores.amax(-1, keepdim=True), offset[h].double())
        e = torch.exp(scores - m)
        denom = e.sum(-1, keepdim=True) + torch.exp(offset[h].double() - m)
        p = e / denom
        out[:, :, h] = torch.einsum("bij,jbd->ibd", p, v[:, :, g].double())
    return out.reshape(s, b, H * d)


@pytest.mark.parametrize("layer_idx, window", [(0, 16), (3, None)])
def test_learnable_offset_is_the_gpt_oss_sink(tiny_model, layer_idx, window):
    core = tiny_model.decoder.layers[layer_idx].self_attention.core_attention
    with torch.no_grad():
        core.softmax_offset.copy_(torch.randn(8) * 2)  # make the sink matter
    s, b = 40, 2
    q = torch.randn(s, b, 8, 16)
    k = torch.randn(s, b, 2, 16)
    v = torch.randn(s, b, 2, 16)
    got = core(q, k, v, None, attn_mask_type=core.attn_mask_type)
    want = _sink_reference(q, k, v, core.softmax_offset.detach(), core.softmax_scale, window)
    assert got.shape == (s, b, 8 * 16)
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-6
    # The sink really is in the denominator: without it the result differs.
    plain = _sink_reference(q, k, v, torch.full((8,), -1e30), core.softmax_scale, window)
    assert (got.double() - plain).norm() / plain.norm() > 1e-3


def test_local_layer_window_is_127_keys_of_lookback(megatron_env):
    """With the vpmoe window (W = 128 -> (127, 0)) query i sees exactly keys i-127 ... i."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _small_cfg()
    tcfg = transformer_config_from_vpmoe(cfg)
    assert tcfg.window_size == (127, 0)
    core = DotProductAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s = 300
    q = torch.randn(s, 1, 8, 16)
    k = torch.randn(s, 1, 2, 16, requires_grad=True)
    v = torch.randn(s, 1, 2, 16)
    for i in (0, 5, 127, 128, 200, 299):
        k.grad = None
        out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        out.view(s, 1, 8, 16)[i].sum().backward()
        seen = (k.grad[:, 0].abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        assert seen == list(range(max(0, i - 127), i + 1)), f"query {i}"


def test_schedule_global_every_fourth_layer(full_meta):
    from passes.layer_plan import build_layer_plan

    plan = build_layer_plan(full_meta)
    assert [l.layer_number for l in plan.global_layers] == list(range(4, 81, 4))
    assert len(plan.local_layers) == 60
    assert [l.mlp for l in plan.layers] == ["dense"] + ["moe"] * 79
    assert all(l.window == (127, 0) for l in plan.local_layers)


def test_shared_expert_is_512_and_always_on(full_meta, tiny_model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in full_meta.decoder.layers[1:]:
        shared = layer.mlp.shared_experts
        assert shared.linear_fc1.weight.shape == (512, 1024) and shared.linear_fc2.weight.shape == (1024, 512)
        assert not shared.use_shared_expert_gate
    assert full_meta.config.moe_shared_expert_intermediate_size == 512
    # At run time every token goes through the shared expert of every MoE layer.
    seen = []
    hooks = [
        l.mlp.shared_experts.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[:-1].numel()))
        for l in tiny_model.decoder.layers
        if isinstance(l.mlp, MoELayer)
    ]
    ids, pos = make_batch(b=2, s=24)
    with torch.no_grad():
        tiny_model(ids, pos, None)
    for h in hooks:
        h.remove()
    assert seen == [48, 48, 48]


def test_full_config_parameter_count(full_meta):
    c = count_parameters(full_meta)
    assert c.embedding == 2 * 201088 * 1024
    expert = 128 * 1024 * 2
    assert c.routed_experts == 79 * 256 * expert
    assert c.routed_experts_active == 79 * 4 * expert
    assert c.total == 6_027_261_568 and c.active == 808_498_816


def test_stock_config_leaves_linear_biases_and_value_residual_to_the_passes():
    """Stock megatron-core 0.16.1 cannot build the linear biases with a shared expert nor train
    biased SequentialMLP experts: the stock config builds without them (the QKV bias, which
    add_bias_linear implies, stays stock's), the linear_bias pass adds them; the value residual
    is not part of the stock model either."""
    tc = transformer_config_from_vpmoe(_small_cfg(add_bias_linear=True, add_qkv_bias=False))
    assert (tc.add_bias_linear, tc.add_qkv_bias) == (False, True)
    tc = transformer_config_from_vpmoe(_small_cfg(value_residual=True))
    assert not hasattr(tc, "value_residual")


def test_build_without_init_process_says_to_call_it():
    """In a fresh process without init_process(), build_stock_gpt fails up front with a message
    naming megatron_base.init_process() (not Megatron's 'pipeline_model parallel group is not
    initialized' assertion from deep inside GPTModel)."""
    code = (
        "import torch\n"
        "from megatron_base import build_stock_gpt\n"
        "try:\n"
        "    build_stock_gpt('tiny', device='meta')\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR:', exc)\n"
        "    raise SystemExit(3)\n"
        "print('built without init_process')\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 3, run.stdout + run.stderr[-3000:]
    assert "ERROR:" in run.stdout and "megatron_base.init_process()" in run.stdout


def test_build_checks_the_parallel_state_before_megatron(megatron_env, monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"call megatron_base\.init_process\(\)"):
        build_stock_gpt("tiny", device="meta")


def test_compat_fixes(megatron_env):
    import megatron.core.transformer.moe.moe_utils as moe_utils

    from megatron_base import compat

    assert "te_general_gemm" in compat.applied() and moe_utils.te_general_gemm is None
    # CPU-only fixes are installed only on a machine without CUDA.
    assert ("cuda_current_device" in compat.applied()) == (not torch.cuda.is_available())
    import megatron.core.fusions.fused_softmax as fs

    m = fs.get_sliding_window_causal_mask(6, 6, (2, 0))
    assert m.device.type == "cpu" and m.sum(-1).tolist() == [5, 4, 3, 3, 3, 3]


def test_dynamo_config_guards_megatron_cuda_rng_setter(megatron_env, monkeypatch):
    """``cuda_rng_under_dynamo``: inside dynamo_config() Megatron's CUDA RNG setter runs with
    dynamo disabled (else compile deadlocks in torch.cuda._lazy_call on GPU); restored after, and
    untouched without CUDA."""
    from unittest import mock

    from megatron.core.tensor_parallel import random as mrandom

    from megatron_base import compat

    orig = mrandom._set_cuda_rng_state
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        with compat.dynamo_config():
            assert mrandom._set_cuda_rng_state is orig
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        with compat.dynamo_config():
            patched = mrandom._set_cuda_rng_state
            assert patched is not orig and getattr(patched, "_vpmoe_dynamo_disabled", False)
            with compat.dynamo_config():  # nested: no double wrapping
                assert mrandom._set_cuda_rng_state is patched
            assert mrandom._set_cuda_rng_state is patched
    assert mrandom._set_cuda_rng_state is orig


def test_moe_aux_loss_scale_set_by_a_schedule_after_an_eager_backward(megatron_env):
    """Megatron's MoE backward leaves a 0-d scale; its schedules then set_loss_scale(ones(1)):
    the compat fix copies it in place instead of raising a shape error."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale = torch.tensor(1.0)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) * 0.25)
        assert MoEAuxLossAutoScaler.main_loss_backward_scale is scale and float(scale) == 0.25
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def test_a_deeper_moe_model_after_a_shallower_one_logs_its_aux_losses(megatron_env):
    """Megatron's per-layer aux-loss tracker is sized by the first model that logs into it; the
    compat fix re-creates an entry sized for fewer layers instead of indexing past its end."""
    from megatron.core.transformer.moe import moe_utils, router

    from megatron_base import compat

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    saved = dict(tracker)
    try:
        tracker.clear()
        router.save_to_aux_losses_tracker("vpmoe_test_loss", torch.tensor(1.0), 2, 2)  # 2-layer model
        router.save_to_aux_losses_tracker("vpmoe_test_loss", torch.tensor(0.5), 4, 4)  # then a 4-layer one
        assert tracker["vpmoe_test_loss"]["values"].tolist() == [0.0, 0.0, 0.0, 0.5]
        router.save_to_aux_losses_tracker("vpmoe_test_loss", torch.tensor(0.25), 4, 4)  # same size: accumulates
        assert tracker["vpmoe_test_loss"]["values"].tolist() == [0.0, 0.0, 0.0, 0.75]
        compat.remove(only=["moe_logging_tracker_size"])
        try:  # Megatron's own function: the defect
            tracker.clear()
            router.save_to_aux_losses_tracker("vpmoe_test_loss", torch.tensor(1.0), 2, 2)
            with pytest.raises(IndexError):
                router.save_to_aux_losses_tracker("vpmoe_test_loss", torch.tensor(0.5), 4, 4)
        finally:
            compat.apply(only=["moe_logging_tracker_size"])
    finally:
        tracker.clear()
        tracker.update(saved)
