"""The value-residual pass (the reference fork's ``[model] value_residual``): parameters with the
fork's names and initialisation, layer 1's values handed to every later layer, the mix on global
layers (before the sink kernel) and local TPA layers (inside the fused op), gradients to the
logits and through ``v1``, refusals before anything changes."""

import dataclasses
import math

import pytest
import torch

import vpmoe_compile
from passes.base import PassError
from tests.conftest import make_batch


def _cfg(tiny_cfg, init=0.3, on=True):
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, value_residual=on,
                                                                   value_residual_init=init))


def _model(cfg, seed=0):
    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    model = build_stock_gpt(cfg, device="cpu")
    vpmoe_compile.transform(model, cfg, progress=False)
    return model


@pytest.mark.parametrize("init", [0.3, 1.0, 0.0])
def test_logits_have_the_forks_names_and_initialisation(megatron_env, tiny_cfg, init):
    model = _model(_cfg(tiny_cfg, init))
    logits = {n: p for n, p in model.named_parameters() if "value_residual" in n}
    # layers 2..4 (1-based) get a logit, layer 1 keeps its values
    assert sorted(logits) == [f"decoder.layers.{i}.self_attention.value_residual_logit" for i in (1, 2, 3)]
    lam = min(max(init, 1e-4), 1 - 1e-4)
    for p in logits.values():
        assert p.dtype == torch.float32 and p.shape == ()
        assert p.item() == pytest.approx(math.log(lam / (1 - lam)), rel=1e-6)
    states = {id(model.decoder.layers[i].self_attention.value_residual) for i in range(4)}
    assert len(states) == 1  # one shared state
    table = {r["name"]: r for r in model.vpmoe_optimizer_routing}
    row = table["decoder.layers.1.self_attention.value_residual_logit"]
    assert (row["group"], row["wd"]) == ("adamw", 0.0)


def test_layers_mix_the_first_layers_values(megatron_env, tiny_cfg):
    """Layer 1 (local, TPA) hands on its values; the global layer 4 attends to
    ``lam v_4 + (1 - lam) v_1`` (recomputed here from its own modules); the local layers' mix is
    the op's (tests/vpmoe_compile/ops: value residual against a float64 oracle)."""
    model = _model(_cfg(tiny_cfg, 0.3))
    model.eval()
    layers = model.decoder.layers
    seen = {}

    def pre(name):
        def fn(mod, args, kwargs):
            seen[name] = ((args[0].clone(),), kwargs)
        return fn

    def post(name):
        def fn(mod, args, kwargs, out):
            seen[name + ".out"] = (out[0].clone(),)  # (Megatron's inference bias-dropout-add works in place)
        return fn

    attn4 = layers[3].self_attention
    h = [attn4.register_forward_pre_hook(pre("a4"), with_kwargs=True),
         attn4.register_forward_hook(post("a4"), with_kwargs=True)]
    ids, pos = make_batch(2, 32)
    with torch.no_grad():
        model(ids, pos, None)
    for x in h:
        x.remove()
    state = attn4.value_residual
    v1 = state.value
    assert v1 is not None and v1.shape == (32, 2, 2, 16)

    (args, kwargs) = seen["a4"]
    with torch.no_grad():
        hidden = args[0]
        q, k, v = attn4.get_query_key_value_tensors(hidden)
        lam = torch.sigmoid(attn4.value_residual_logit)
        mixed = lam * v + (1 - lam) * v1
        out = attn4.core_attention(q, k, mixed, None)
        expect, _ = attn4.linear_proj(out)
        unmixed, _ = attn4.linear_proj(attn4.core_attention(q, k, v, None))
    got = seen["a4.out"][0]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert (got - unmixed).abs().max() > 1e-4  # the mix matters at lam = 0.3


def test_gradients_reach_the_logits_and_flow_through_v1(megatron_env, tiny_cfg):
    """Every logit gets a gradient; layer 1's factor weight gets gradient from the later layers
    through v1 (it differs from the gradient without the value residual, same weights)."""
    on, off = _model(_cfg(tiny_cfg, 0.3)), _model(_cfg(tiny_cfg, 0.3, on=False))
    with torch.no_grad():  # same weights (the logits exist only in `on`)
        params_off = dict(off.named_parameters())
        for n, p in on.named_parameters():
            if n in params_off:
                p.copy_(params_off[n])
    ids, pos = make_batch(2, 32)
    for m in (on, off):
        m.train()
        m(ids, pos, None, labels=ids).float().mean().backward()
    for n, p in on.named_parameters():
        if "value_residual_logit" in n:
            assert p.grad is not None and p.grad.abs() > 0, n
    w = "decoder.layers.0.self_attention.linear_qkv.weight"
    g_on, g_off = dict(on.named_parameters())[w].grad, params_off[w].grad
    assert (g_on - g_off).abs().max() > 1e-3 * g_off.abs().max()


def test_refusals_before_anything_changes(megatron_env, tiny_cfg, monkeypatch):
    from megatron_base import build_stock_gpt

    torch.manual_seed(0)
    model = build_stock_gpt(tiny_cfg, device="cpu")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(PassError, match="value_residual_init = 1.5"):
        vpmoe_compile.transform(model, _cfg(tiny_cfg, 1.5), progress=False)
    with monkeypatch.context() as m:
        m.setattr(model.config, "pipeline_model_parallel_size", 2)
        with pytest.raises(PassError, match="pipeline parallelism"):
            vpmoe_compile.transform(model, _cfg(tiny_cfg), progress=False)
    assert classes == [type(m) for m in model.modules()]
    assert not any("value_residual" in n for n, _ in model.named_parameters())


def test_checkpoint_carries_the_value_residual(megatron_env, tiny_cfg, tmp_path):
    """A torch_dist checkpoint of a value-residual model loads into a fresh stock model: the
    transform is replayed from the checkpoint's config (logits created) and every tensor,
    trained logits included, is restored."""
    from megatron_base import build_stock_gpt

    m = _model(_cfg(tiny_cfg, 0.3))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "value_residual_logit" in n:
                p.add_(torch.randn(()))
    vpmoe_compile.save_checkpoint(tmp_path / "ck", m, iteration=1)
    torch.manual_seed(5)
    stock = build_stock_gpt(tiny_cfg, device="cpu")
    info = vpmoe_compile.load_checkpoint(tmp_path / "ck", stock)
    assert info["restored"]
    got = dict(stock.named_parameters())
    assert sum("value_residual_logit" in n for n in got) == 3
    for n, p in m.named_parameters():
        assert torch.equal(got[n], p), n
