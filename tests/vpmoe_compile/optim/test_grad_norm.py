"""Global grad norm without overflow, and NaN-policy errors that name the parameters.

* A finite gradient of 1e20 squares to 1e40, beyond fp32 (3.4e38): accumulated in fp32 the norm
  became inf and the step was skipped (or raised) as if a gradient were NaN. The norm now
  accumulates in fp64 (plain path: :func:`local_grad_norm`; Megatron path:
  ``NorMuonChainedOptimizer.get_grad_norm`` through :func:`global_grad_norm`).
* ``nan_policy="raise"`` names the non-finite parameters by their model names on both paths; on
  the Megatron path the fp32 main copies of bf16 parameters (which the wrappers optimise) are
  mapped back to the model names (:func:`megatron_param_names`).
"""

import math
from types import SimpleNamespace

import pytest
import torch

from vpmoe_compile.optim import build_optimizer

from ._fake import VOCAB, FakeVpMoE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _ref_norm(grads):
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def _backward(model):
    _loss(model, torch.randint(0, VOCAB, (2, 8))).backward()


def test_huge_finite_gradient_gives_finite_norm_and_clipped_step():
    """1e20 in a NorMuon and an AdamW gradient: a finite norm (the fp64 value), a step taken
    (with nan_policy="raise": no error), every gradient clipped to total norm clip_grad."""
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(lr=0.05, clip_grad=1.0, nan_policy="raise"))
    _backward(model)
    model.decoder.layers[1].self_attention.linear_proj.weight.grad[0, 0] = 1e20
    model.embedding.word_embeddings.weight.grad[1, 2] = -1e20
    ref = _ref_norm([p.grad for p in model.parameters()])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ok, norm, _ = opt.step()
    assert ok is True and math.isfinite(norm)
    assert norm == pytest.approx(ref, rel=1e-6) and norm == pytest.approx(math.sqrt(2) * 1e20, rel=1e-6)
    assert _ref_norm([p.grad for p in model.parameters()]) == pytest.approx(1.0, rel=1e-4)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "decoder.layers.1.self_attention.linear_proj.weight" in moved
    assert "embedding.word_embeddings.weight" in moved


def test_grad_norm_helpers_do_not_overflow(megatron_world):
    from megatron.core import parallel_state as ps

    from vpmoe_compile.optim.grad_norm import global_grad_norm, grad_sq_sum, local_grad_norm

    big32 = torch.full((4, 4), 1e20)
    big16 = torch.full((8,), -1e20, dtype=torch.bfloat16)
    small = torch.randn(5, 7)
    grads = [big32, big16, small]
    ref = _ref_norm(grads)
    sq = grad_sq_sum(grads)
    assert sq.dtype == torch.float64 and sq.shape == () and math.isfinite(float(sq))
    assert local_grad_norm(grads) == pytest.approx(ref, rel=1e-9)
    assert global_grad_norm(grads, ps.get_model_parallel_group()) == pytest.approx(ref, rel=1e-9)
    assert local_grad_norm([]) == 0.0 and global_grad_norm([], None) == 0.0
    # fp64 gradients whose fp64 squares overflow: rescaled by the largest |g|
    huge = torch.full((16,), 1e200, dtype=torch.float64)
    assert local_grad_norm([huge, small.double()]) == pytest.approx(4e200, rel=1e-9)
    # NaN / Inf stay non-finite
    assert math.isnan(local_grad_norm([small, torch.tensor([float("nan")])]))
    assert local_grad_norm([small, torch.tensor([float("inf")])]) == math.inf


def _fake_megatron_chain(model, names):
    """What ``build_megatron_optimizer`` chains for a bf16 model, without the CUDA-only wrapper
    ``__init__``: NorMuon and AdamW over fp32 *main copies* of the model parameters, in
    Megatron's ``NorMuonFloat16Optimizer`` (``float16_groups`` -> ``fp32_from_float16_groups``)."""
    from megatron.core.optimizer import OptimizerConfig

    from vpmoe_compile.optim import NorMuon
    from vpmoe_compile.optim.megatron_wrappers import NorMuonChainedOptimizer, NorMuonFloat16Optimizer
    from vpmoe_compile.optim.routing import classify_parameters

    routes = classify_parameters(model)
    config = OptimizerConfig(clip_grad=1.0)
    wrappers = []
    for kind in ("normuon", "adamw"):
        sel = [r for r in routes if r.optimizer == kind]
        mains = [torch.nn.Parameter(r.param.detach().clone().float()) for r in sel]
        if kind == "normuon":
            inner = NorMuon([{"params": mains, "blocks": [r.blocks for r in sel],
                              "layouts": [r.layout for r in sel]}], lr=0.01)
        else:
            inner = torch.optim.AdamW(mains, lr=1e-3)
        w = object.__new__(NorMuonFloat16Optimizer)
        w.optimizer, w.config, w.grad_scaler, w.is_stub_optimizer = inner, config, None, False
        w.float16_groups = [[r.param for r in sel]]
        w.fp32_from_float16_groups = [mains]
        w.fp32_from_fp32_groups = [[]]
        wrappers.append(w)
    return NorMuonChainedOptimizer(wrappers, nan_policy="raise", names=names)


def test_megatron_chain_grad_norm_does_not_overflow(megatron_world):
    model = FakeVpMoE()
    chain = _fake_megatron_chain(model, {id(p): n for n, p in model.named_parameters()})
    mains = [p for w in chain.chained_optimizers for g in w.fp32_from_float16_groups for p in g]
    for p in mains:
        p.grad = torch.randn_like(p) * 1e-3
    mains[0].grad[0, 0] = 1e20
    mains[-1].grad.view(-1)[0] = -1e20
    norm = chain.get_grad_norm()
    assert math.isfinite(norm)
    assert norm == pytest.approx(_ref_norm([p.grad for p in mains]), rel=1e-9)


def test_plain_nan_policy_raise_names_nonfinite_params_by_model_name():
    """Exactly the parameters with a NaN / Inf gradient, by model name, NorMuon and AdamW ones;
    not the finite 1e20 one. (A finite 1e20 gradient alone used to raise naming nobody.)"""
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(nan_policy="raise"))
    _backward(model)
    big = model.decoder.layers[0].mlp.linear_fc1.weight
    big.grad[0, 0] = 1e20
    ok, norm, _ = opt.step()  # finite: no error, a step
    assert ok and math.isfinite(norm)
    opt.zero_grad()
    _backward(model)
    big.grad[0, 0] = 1e20
    model.decoder.layers[2].self_attention.linear_proj.weight.grad[1, 1] = float("nan")
    model.decoder.layers[1].mlp.router.weight.grad[0, 3] = float("-inf")
    model.output_layer.weight.grad[4, 4] = float("inf")
    with pytest.raises(FloatingPointError) as err:
        opt.step()
    listed = str(err.value).split("parameters: ", 1)[1]
    assert listed == str([
        "decoder.layers.1.mlp.router.weight",
        "decoder.layers.2.self_attention.linear_proj.weight",
        "output_layer.weight",
    ])


def test_megatron_nan_names_map_fp32_main_params_to_model_names(megatron_world):
    """The wrappers optimise fp32 main copies; the NaN-policy error must still name the model
    parameters, of the NorMuon and of the Adam parts (the helper is pure Python)."""
    model = FakeVpMoE()
    names = {id(p): n for n, p in model.named_parameters()}
    chain = _fake_megatron_chain(model, names)
    mains = {}
    for w in chain.chained_optimizers:
        for model_group, main_group in zip(w.float16_groups, w.fp32_from_float16_groups):
            for mp, main in zip(model_group, main_group):
                assert main is not mp
                mains[names[id(mp)]] = main
    for main in mains.values():
        main.grad = torch.zeros_like(main)
    mains["decoder.layers.1.self_attention.linear_proj.weight"].grad[0, 0] = float("nan")
    mains["embedding.word_embeddings.weight"].grad[3, 1] = float("inf")
    assert chain._nonfinite_names() == [
        "decoder.layers.1.self_attention.linear_proj.weight",
        "embedding.word_embeddings.weight",
    ]
    from vpmoe_compile.optim.megatron_wrappers import megatron_param_names

    mapped = megatron_param_names(chain.chained_optimizers, names)
    assert {mapped[id(m)] for m in mains.values()} == set(mains)
