"""Batched-experts pass: same function, same parameters, gradients to every expert."""

import pytest
import torch

import vpmoe_compile
from passes.base import PassError
from tests.conftest import make_batch
from vpmoe_compile.modules.experts import BatchedSequentialMLP


def _expert_inputs(T=300, h=64, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E)
    x = torch.randn(T, h, generator=g)
    probs = torch.rand(T, generator=g)
    return x, counts, probs


def test_matches_sequential_mlp_outputs_and_grads(tiny_model):
    stock = tiny_model.decoder.layers[1].mlp.experts
    batched = BatchedSequentialMLP.from_stock(stock)  # shares the experts
    x, counts, probs = _expert_inputs()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    g = torch.randn(x.shape)
    ref, _ = SequentialMLPForward(stock, x1, counts, p1)
    ref.backward(g)
    ref_w = [p.grad.clone() for p in stock.parameters()]
    stock.zero_grad(set_to_none=True)
    out, bias = batched(x2, counts, p2)
    out.backward(g)
    assert bias is None and batched.batched_calls == 1
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref_w, batched.parameters()):
        assert b.grad is not None and torch.allclose(a, b.grad, rtol=1e-5, atol=1e-6)


def test_empty_experts_and_unbalanced_fallback(tiny_model):
    stock = tiny_model.decoder.layers[1].mlp.experts
    batched = BatchedSequentialMLP.from_stock(stock)
    x = torch.randn(40, 64)
    probs = torch.rand(40)
    counts = torch.tensor([0, 10, 0, 0, 30, 0, 0, 0])  # E*M = 240 > 4*T = 160: falls back
    out, _ = batched(x, counts, probs)
    ref, _ = SequentialMLPForward(stock, x, counts, probs)
    assert batched.fallback_calls == 1 and torch.allclose(out, ref)
    counts = torch.tensor([5, 5, 0, 5, 5, 10, 5, 5])  # balanced enough, with an empty expert
    out, _ = batched(x, counts, probs)
    ref, _ = SequentialMLPForward(stock, x, counts, probs)
    assert batched.batched_calls == 1 and torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def SequentialMLPForward(stock, x, counts, probs):
    from megatron.core.transformer.moe.experts import SequentialMLP

    return SequentialMLP.forward(stock, x, counts, probs)


def test_pass_keeps_parameters_and_model_function(tiny_model):
    ids, pos = make_batch()
    with torch.no_grad():
        ref = tiny_model(ids, pos, None)
    params = {n: id(p) for n, p in tiny_model.named_parameters()}
    keys = set(tiny_model.state_dict())
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "batched_experts"])
    assert {n: id(p) for n, p in tiny_model.named_parameters()} == params
    assert set(tiny_model.state_dict()) == keys
    assert all(isinstance(l.mlp.experts, BatchedSequentialMLP) for l in tiny_model.decoder.layers[1:])
    rec = tiny_model.vpmoe_transform.results[-1]
    assert len(rec.replaced) == 3 and not rec.params_added and not rec.params_removed
    with torch.no_grad():
        out = tiny_model(ids, pos, None)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    tiny_model(ids, pos, None, labels=ids).mean().backward()
    assert all(p.grad is not None for n, p in tiny_model.named_parameters() if "local_experts" in n)


def test_pass_refuses_gated_experts(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "gated_linear_unit", True)
    with pytest.raises(PassError, match="gated"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "batched_experts"])
