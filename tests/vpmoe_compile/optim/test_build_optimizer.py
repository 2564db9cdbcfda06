"""build_optimizer: plain (CPU) path semantics, refusals, Megatron scheduler, stock model training."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from vpmoe_compile.optim import NorMuon, NorMuonWithAuxAdamW, UnsupportedOptimizerSetup, build_optimizer

from ._fake import VOCAB, FakeVpMoE


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _snapshot(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _assert_same(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for part in ("normuon", "adamw"):
        for idx, st in sa[part]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[part]["state"][idx][k])), (part, idx, k)


def test_plain_path_trains_the_fake_model():
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(lr=0.05, normuon_aux_lr=1e-2, normuon_aux_min_lr=1e-2))
    assert isinstance(opt, NorMuonWithAuxAdamW) and opt.path == "plain"
    assert isinstance(opt.normuon, NorMuon) and isinstance(opt.adamw, torch.optim.AdamW)
    n_nm = sum(len(g["params"]) for g in opt.normuon.param_groups)
    assert n_nm == sum(1 for r in opt.routes if r.optimizer == "normuon")
    # dense and expert-parallel NorMuon params are separate groups (Megatron's split)
    assert [g["is_expert_parallel"] for g in opt.normuon.param_groups] == [False, True]
    tokens = torch.randint(0, VOCAB, (4, 12))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = _loss(model, tokens)
        loss.backward()
        ok, norm, _ = opt.step()
        assert ok and math.isfinite(norm)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert len(opt.routing_table()) == len(list(model.parameters()))


@pytest.mark.parametrize("key", ["direct_grads", "merge_launches"])
def test_gradient_access_settings_reach_normuon(key):
    """``[optimizer] direct_grads`` / ``merge_launches`` (default off) are NorMuon's arguments of
    the same name; a wrong type is refused by the config's own check."""
    from megatron_base.config import ConfigError

    assert getattr(build_optimizer(FakeVpMoE()).normuon, key) is False
    opt = build_optimizer(FakeVpMoE(), SimpleNamespace(**{key: True}))
    assert getattr(opt.normuon, key) is True and getattr(opt.settings, key) is True
    with pytest.raises(ConfigError, match=key):
        build_optimizer(FakeVpMoE(), SimpleNamespace(**{key: "yes"}))


def test_nan_grad_skips_step_with_state_untouched_and_raise_names_params():
    model = FakeVpMoE()
    opt = build_optimizer(model)
    tokens = torch.randint(0, VOCAB, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        _loss(model, tokens).backward()
        opt.step()
    opt.zero_grad()
    _loss(model, tokens).backward()
    model.decoder.layers[2].mlp.experts.local_experts[1].linear_fc1.weight.grad[0, 0] = float("nan")
    model.rotary_pos_emb.log_freq.grad[0] = float("inf")
    before = _snapshot(model, opt)
    ok, norm, zeros = opt.step()
    assert ok is False and not math.isfinite(norm) and zeros is None
    _assert_same(before, _snapshot(model, opt))

    raising = build_optimizer(model, SimpleNamespace(nan_policy="raise"))
    with pytest.raises(FloatingPointError, match=r"local_experts\.1\.linear_fc1\.weight.*log_freq"):
        raising.step()


def test_global_norm_clipping():
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(clip_grad=0.1, lr=0.0, normuon_aux_lr=0.0))
    tokens = torch.randint(0, VOCAB, (2, 8))
    _loss(model, tokens).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert norm > 0.1
    ok, got, _ = opt.step()
    assert ok and got == pytest.approx(norm, rel=1e-5)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert after == pytest.approx(0.1, rel=1e-4)


def test_state_round_trip_through_the_chain():
    torch.manual_seed(0)
    model_a = FakeVpMoE()
    model_b = FakeVpMoE()  # (deepcopy would drop the tpa_factor_rows parameter attribute)
    model_b.load_state_dict(model_a.state_dict())
    tokens = [torch.randint(0, VOCAB, (2, 8)) for _ in range(4)]
    opt_a = build_optimizer(model_a)
    for t in tokens:
        opt_a.zero_grad()
        _loss(model_a, t).backward()
        opt_a.step()
    opt_b = build_optimizer(model_b)
    for t in tokens[:2]:
        opt_b.zero_grad()
        _loss(model_b, t).backward()
        opt_b.step()
    saved = copy.deepcopy(opt_b.state_dict())
    model_c = FakeVpMoE()
    model_c.load_state_dict(model_b.state_dict())
    opt_c = build_optimizer(model_c)
    opt_c.load_state_dict(saved)
    for t in tokens[2:]:
        opt_c.zero_grad()
        _loss(model_c, t).backward()
        opt_c.step()
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


def test_megatron_scheduler_drives_both_optimizers():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = FakeVpMoE()
    opt = build_optimizer(model)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=10,
        wd_incr_style="constant",
    )
    sched.step(5)
    nm = opt.normuon.param_groups[0]
    assert 3e-4 < nm["lr"] < 3e-3 and nm["weight_decay"] == pytest.approx(0.01)
    for g in opt.adamw.param_groups:
        assert g["lr"] == pytest.approx(3e-4)  # aux lr == aux min lr by default
        assert g["weight_decay"] == pytest.approx(0.01 * g["wd_mult"])


def test_refusals():
    model = FakeVpMoE()
    model.ddp_config = SimpleNamespace(use_distributed_optimizer=True, use_megatron_fsdp=False)
    with pytest.raises(UnsupportedOptimizerSetup, match="distributed optimizer"):
        build_optimizer(model)
    model = FakeVpMoE()
    for field, match in (("optimizer_cpu_offload", "CPU offload"), ("fp16", "fp16"),
                         ("use_precision_aware_optimizer", "precision-aware")):
        with pytest.raises(UnsupportedOptimizerSetup, match=match):
            build_optimizer(model, optimizer_config=SimpleNamespace(**{field: True}))
    with pytest.raises(ValueError, match="builds NorMuon"):
        build_optimizer(model, SimpleNamespace(name="adamw"))


def test_tensor_parallel_refused_on_the_megatron_path_and_expert_tp_everywhere(monkeypatch):
    """TP > 1 runs on the plain (fp32) path (whole-matrix copies, tests/parallel TP 2) and is
    refused on the Megatron bf16 path; expert-tensor parallelism > 1 is refused on both."""
    from megatron.core import parallel_state as ps

    from vpmoe_compile.optim.build import _check_parallel
    from vpmoe_compile.optim.routing import classify_parameters

    routes = classify_parameters(FakeVpMoE())
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(ps, "get_expert_tensor_parallel_world_size", lambda: 1)
    with pytest.raises(UnsupportedOptimizerSetup, match="tensor-model-parallel size 2 runs on the fp32 path only"):
        _check_parallel(routes, megatron_path=True)
    _check_parallel(routes, megatron_path=False)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_expert_tensor_parallel_world_size", lambda: 2)
    with pytest.raises(UnsupportedOptimizerSetup, match="expert-tensor-parallel"):
        build_optimizer(FakeVpMoE())


def test_stock_tiny_model_routes_and_trains(megatron_world):
    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_stock_gpt(cfg, device="cpu")
    opt = build_optimizer(model, cfg)
    table = {row["name"]: row for row in opt.routing_table()}
    assert set(table) == {n for n, p in model.named_parameters()}
    assert table["embedding.word_embeddings.weight"]["group"] == "adamw"
    assert table["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]["group"] == "normuon"
    assert table["decoder.layers.3.self_attention.linear_qkv.weight"]["matrices"][0][0] == "q"
    losses = _train_gpt(model, opt, steps=5)
    assert losses[-1] < losses[0] - 0.5


def test_transformed_tiny_model_routes_and_trains(megatron_world):
    """vpmoe_compile.transform output: packed TPA factors, GRAPE log_freq, sinks -> routed; trains."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = vpmoe_compile.transform(build_stock_gpt(cfg, device="cpu"))
    opt = build_optimizer(model, cfg)
    table = {row["name"]: row for row in opt.routing_table()}
    assert set(table) == {n for n, p in model.named_parameters()}
    local = table["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert local["role"] == "tpa_factors"
    assert [m[0] for m in local["matrices"]] == ["a_q", "a_k", "a_v", "b_q", "b_k", "b_v"]
    grape = [r for n, r in table.items() if n.endswith("log_freq")]
    assert grape and all(r["group"] == "adamw" and r["wd"] == 0.0 for r in grape)
    sinks = [r for n, r in table.items() if n.endswith("softmax_offset")]
    assert sinks and all(r["group"] == "adamw" and r["wd"] == 0.0 for r in sinks)
    losses = _train_gpt(model, opt, steps=4)
    assert losses[-1] < losses[0] - 0.3


def _train_gpt(model, opt, steps):
    """A few steps of next-token training on a fixed random batch; returns the losses."""
    tokens = torch.randint(0, 1000, (2, 17))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        ok, norm, _ = opt.step()
        assert ok and math.isfinite(norm)
        losses.append(loss.item())
    return losses


def test_build_optimizer_uses_the_config_the_model_was_transformed_with(megatron_env):
    """No cfg: the [optimizer] section of the config transform attached (tiny.toml: lr 1e-2,
    aux lr 3e-3), not built-in defaults."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, load_config

    model = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(model, progress=False)
    cfg = load_config("tiny")
    assert (cfg.optimizer.lr, cfg.optimizer.normuon_aux_lr) == (1e-2, 3e-3)
    opt = build_optimizer(model)
    assert {g["lr"] for g in opt.normuon.param_groups} == {1e-2}
    assert {g["lr"] for g in opt.adamw.param_groups} == {3e-3}
    other = build_optimizer(model, SimpleNamespace(lr=0.5))  # an explicit cfg still wins
    assert {g["lr"] for g in other.normuon.param_groups} == {0.5}


def test_plain_optimizer_refuses_params_later_registered_with_megatron_ddp():
    """Built on the bare model, then the model wrapped in Megatron DDP: gradients land in
    main_grad, so the step would silently change nothing; it raises instead."""
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(lr=0.05))
    tokens = torch.randint(0, VOCAB, (2, 9))
    _loss(model, tokens).backward()
    p = next(model.parameters())
    p.main_grad = torch.zeros_like(p)  # what Megatron DDP attaches to every parameter
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        opt.step()
    assert torch.equal(p.detach(), before)
