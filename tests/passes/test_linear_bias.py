"""The linear-bias pass (the reference fork's ``[model] add_bias_linear``): every bias Megatron
would build, with its name, shape and initialisation, used in the forward with the fork's
semantics (expert fc2 bias scaled by the routing probability, the shared expert's fc2 bias added
to its output), gradients, checkpoints in the stock per-expert layout."""

import dataclasses

import pytest
import torch

import vpmoe_compile
from tests.conftest import make_batch


def _cfg(tiny_cfg, **model):
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, add_bias_linear=True, **model))


def _model(cfg, seed=0):
    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    model = build_stock_gpt(cfg, device="cpu")
    vpmoe_compile.transform(model, cfg, progress=False)
    return model


def test_biases_have_megatrons_names_shapes_and_init(megatron_env, tiny_cfg):
    m = _model(_cfg(tiny_cfg))
    p = dict(m.named_parameters())
    h, E, F, S, ffn = 64, 8, 32, 64, 128
    expect = {
        "decoder.layers.0.self_attention.linear_proj.bias": (h,),
        "decoder.layers.0.mlp.linear_fc1.bias": (ffn,),
        "decoder.layers.0.mlp.linear_fc2.bias": (h,),
        "decoder.layers.1.mlp.router.bias": (E,),
        "decoder.layers.1.mlp.experts.linear_fc1.bias": (E, F),
        "decoder.layers.1.mlp.experts.linear_fc2.bias": (E, h),
        "decoder.layers.1.mlp.shared_experts.linear_fc1.bias": (S,),
        "decoder.layers.1.mlp.shared_experts.linear_fc2.bias": (h,),
        "decoder.layers.3.self_attention.linear_proj.bias": (h,),
    }
    for name, shape in expect.items():
        assert tuple(p[name].shape) == shape, name
        if "router" in name:
            assert p[name].dtype == torch.float32 and p[name].abs().sum() > 0  # init_method, not zeros
        else:
            assert torch.count_nonzero(p[name]) == 0, name
    table = {r["name"]: r for r in m.vpmoe_optimizer_routing}
    assert all(table[n]["group"] == "adamw" and table[n]["wd"] == 0.0 for n in expect)
    assert p["decoder.layers.0.mlp.linear_fc1.bias"].tensor_model_parallel  # ColumnParallel: TP-split
    assert not p["decoder.layers.0.mlp.linear_fc2.bias"].tensor_model_parallel  # RowParallel: replicated


def test_moe_layer_with_biases_matches_a_float64_reference(megatron_env, tiny_cfg):
    """The grouped layer with biases equals, in float64, a per-token loop over the selected experts
    of ``p * (W2 act(W1 x + b1) + b2)`` plus the shared expert ``W2s act(W1s x + b1s) + b2s``
    (the same router decisions), in output and in the gradients of the input and every weight
    and bias."""
    m = _model(_cfg(tiny_cfg))
    layer = m.decoder.layers[1].mlp.double()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    with torch.no_grad():
        for n, prm in layer.named_parameters():
            if n.endswith("bias"):
                prm.copy_(torch.randn(prm.shape, generator=gen, dtype=prm.dtype) * 0.5)
    x = torch.randn(12, 2, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(12, 2, 64, generator=gen, dtype=torch.float64)
    layer.train()
    out = layer(x)[0]
    named = dict(layer.named_parameters())
    keys = ["experts.linear_fc1.weight", "experts.linear_fc1.bias", "experts.linear_fc2.weight",
            "experts.linear_fc2.bias", "shared_experts.linear_fc1.bias", "shared_experts.linear_fc2.bias"]
    g = torch.autograd.grad(out, [x] + [named[k] for k in keys], dout)

    act = layer.config.activation_func
    probs, idx = layer.router.route(x)
    probs, idx = probs.detach(), idx.detach()

    def reference(x_, W1, b1, W2, b2, sb1, sb2):
        flat = x_.reshape(-1, 64)
        rows = []
        for t in range(flat.shape[0]):
            y = torch.zeros(64, dtype=torch.float64)
            for j in range(idx.shape[1]):
                e, p = int(idx[t, j]), probs[t, j]
                y = y + p * (W2[e] @ act(W1[e] @ flat[t] + b1[e]) + b2[e])
            rows.append(y)
        routed = torch.stack(rows).view_as(x_)
        sh = layer.shared_experts
        shared = act(flat @ sh.linear_fc1.weight.T + sb1) @ sh.linear_fc2.weight.T + sb2
        return routed + shared.view_as(x_)

    leaves = [x.detach().clone().requires_grad_(True)] + [named[k].detach().clone().requires_grad_(True) for k in keys]
    ref = reference(*leaves)
    # the router's own gradient path (probs) is part of `out`, not of the reference: compare the
    # expert / shared-expert parameters exactly, the input through the non-router part
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_ref = torch.autograd.grad(ref, leaves, dout)
    for k, a, b in zip(keys, g[1:], g_ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=k)


def test_biases_get_gradients_and_change_the_output(megatron_env, tiny_cfg):
    m = _model(_cfg(tiny_cfg))
    ids, pos = make_batch(2, 32)
    m.train()
    loss = m(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    for n, p in m.named_parameters():
        if n.endswith(".bias") and "linear_qkv" not in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    # the shared expert's fc2 bias reaches the output (the fork drops it)
    b = m.decoder.layers[1].mlp.shared_experts.linear_fc2.bias
    m.eval()
    with torch.no_grad():
        before = m(ids, pos, None).clone()
        b.add_(0.5)
        after = m(ids, pos, None)
    assert (after - before).abs().max() > 1e-3


def test_checkpoint_keeps_the_stock_per_expert_layout(megatron_env, tiny_cfg, tmp_path):
    """torch_dist: the stacked expert biases are saved as Megatron's ``experts.linear_fcX.bias``
    global tensors and a fresh stock model (the transform replayed) restores every bias."""
    m = _model(_cfg(tiny_cfg))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn(p.shape))
    sd = m.sharded_state_dict()
    # stock SequentialMLP's key (its local_experts.<e>. prefix replaced by experts.)
    w = sd["decoder.layers.1.mlp.experts.linear_fc1.weight"]
    assert sd["decoder.layers.1.mlp.experts.linear_fc1.bias"].key == w.key.replace(".weight", ".bias")
    assert w.key == "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert sd["decoder.layers.1.mlp.experts.linear_fc2.bias"].global_shape == (8, 64)
    vpmoe_compile.save_checkpoint(tmp_path / "ck", m, iteration=1)
    from megatron_base import build_stock_gpt

    torch.manual_seed(3)
    stock = build_stock_gpt(_cfg(tiny_cfg), device="cpu")
    assert vpmoe_compile.load_checkpoint(tmp_path / "ck", stock)["restored"]
    got = dict(stock.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(got[n], p), n


def test_without_the_moe_pass_biased_experts_are_refused(megatron_env, tiny_cfg):
    from megatron_base import build_stock_gpt

    from passes.base import PassError

    torch.manual_seed(0)
    model = build_stock_gpt(_cfg(tiny_cfg), device="cpu")
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(PassError, match="moe pass's grouped experts"):
        vpmoe_compile.transform(model, _cfg(tiny_cfg), passes=["layer_plan", "linear_bias"], progress=False)
    assert names == [n for n, _ in model.named_parameters()]
