"""The moe pass: GroupedMoELayer == stock MoELayer (fp32, CPU), one graph, checkpoints."""

import os
import tempfile

import pytest
import torch

from passes.base import PassError
from tests._forward import forward as _forward


def _pair(megatron_env, overrides=None, tc_overrides=None, seed=0):
    """Two stock tiny models with identical weights; the second one's MoE layers grouped."""
    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("tiny")
    for section, key, value in overrides or ():
        setattr(getattr(cfg, section), key, value)
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        m = build_stock_gpt(cfg, device="cpu")
        for key, value in (tc_overrides or {}).items():
            setattr(m.config, key, value)
        models.append(m)
    import vpmoe_compile

    vpmoe_compile.transform(models[1], cfg, passes=["layer_plan", "moe"], progress=False)
    return cfg, models[0], models[1]


def _expert_grads_stock(layer):
    return {
        name: torch.stack([getattr(e, name).weight.grad for e in layer.experts.local_experts])
        for name in ("linear_fc1", "linear_fc2")
    }


VARIANTS = {
    # the vpMoE router: sigmoid, group-limited top-k, expert bias, sequence aux loss, scaling 2.5
    "vpmoe": ((), {}),
    # softmax top-k, switch aux loss, z-loss, no groups / bias / scaling
    "softmax_aux_zloss": (
        (("moe", "router_score_function", "softmax"), ("moe", "router_load_balancing_type", "aux_loss"),
         ("moe", "router_num_groups", 0), ("moe", "router_group_topk", 0),
         ("moe", "router_enable_expert_bias", False), ("moe", "router_topk_scaling_factor", 0.0)),
        {"moe_z_loss_coeff": 1e-3},
    ),
    # gated SwiGLU experts, global aux loss, top-1 (no normalisation of the single score)
    "swiglu_global_top1": (
        (("model", "gated_linear_unit", True), ("model", "activation", "swiglu"),
         ("moe", "router_load_balancing_type", "global_aux_loss"), ("moe", "topk", 1),
         ("moe", "router_num_groups", 0), ("moe", "router_group_topk", 0)),
        {},
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_grouped_layer_equals_stock_layer(megatron_env, variant):
    """Same weights, same input: output, input gradient, every weight gradient, routing, the
    expert-bias token counts and the logged aux losses equal the stock MoELayer's (fp32)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from vpmoe_compile.modules.moe import GroupedMoELayer

    overrides, tc = VARIANTS[variant]
    _, stock_model, ours_model = _pair(megatron_env, overrides, tc)
    stock, ours = stock_model.decoder.layers[1].mlp, ours_model.decoder.layers[1].mlp
    assert isinstance(ours, GroupedMoELayer) and type(stock).__name__ == "MoELayer"
    stock.train(), ours.train()
    x1 = torch.randn(24, 3, stock.config.hidden_size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    grad = torch.randn(24, 3, stock.config.hidden_size)
    results = []
    for layer, x in ((stock, x1), (ours, x2)):
        clear_aux_losses_tracker()
        get_moe_layer_wise_logging_tracker().clear()
        y, bias = layer(x)
        assert bias is None
        y.backward(grad)
        tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        results.append((y.detach(), tracker))
    (y1, t1), (y2, t2) = results
    tol = dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    assert set(t1) == set(t2) and t1, "aux losses must be logged under Megatron's names"
    for name in t1:
        torch.testing.assert_close(t2[name], t1[name], **tol)
    torch.testing.assert_close(ours.router.weight.grad, stock.router.weight.grad, **tol)
    for name, g in _expert_grads_stock(stock).items():
        torch.testing.assert_close(getattr(ours.experts, name).weight.grad, g, **tol)
    for (n1, p1), (n2, p2) in zip(stock.shared_experts.named_parameters(), ours.shared_experts.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **tol)
    if stock.router.enable_expert_bias:
        torch.testing.assert_close(ours.router.local_tokens_per_expert, stock.router.local_tokens_per_expert, rtol=0, atol=0)
        assert ours.router.local_tokens_per_expert.sum() == 24 * 3 * stock.router.topk


def test_sparse_routing_equals_stock_dense_routing(megatron_env):
    """route() returns the stock router's top-k: the same experts and the same probabilities."""
    _, stock_model, ours_model = _pair(megatron_env)
    stock, ours = stock_model.decoder.layers[2].mlp.router, ours_model.decoder.layers[2].mlp.router
    with torch.no_grad():
        stock.expert_bias.copy_(torch.randn_like(stock.expert_bias) * 0.05)
        ours.expert_bias.copy_(stock.expert_bias)
    x = torch.randn(16, 2, stock.config.hidden_size)
    dense, routing_map = stock(x)
    probs, idx = ours.route(x)
    sparse_map = torch.zeros_like(routing_map).scatter(1, idx, True)
    assert torch.equal(sparse_map, routing_map)
    torch.testing.assert_close(torch.gather(dense, 1, idx), probs, rtol=1e-6, atol=0)


def test_an_expert_without_tokens_gets_a_zero_gradient(megatron_env):
    _, stock_model, ours_model = _pair(megatron_env)
    stock, ours = stock_model.decoder.layers[1].mlp, ours_model.decoder.layers[1].mlp
    for layer in (stock, ours):
        with torch.no_grad():
            layer.router.expert_bias[3] = -1e4  # expert 3 is never chosen
    x = torch.randn(16, 2, stock.config.hidden_size)
    outs = []
    for layer in (stock, ours):
        y, _ = layer(x)
        y.sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-6, atol=1e-7)
    assert ours.router.local_tokens_per_expert[3] == 0
    for name in ("linear_fc1", "linear_fc2"):
        g = getattr(ours.experts, name).weight.grad
        assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g) > 0


def test_sort_by_expert_groups_pairs_stably_and_counts_them():
    from vpmoe_compile.modules.moe import sort_by_expert

    E, T, k = 6, 40, 3
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    order, inv, counts, offs = sort_by_expert(idx, E)
    flat = idx.reshape(-1)
    experts_sorted = flat[order]
    assert torch.all(experts_sorted[1:] >= experts_sorted[:-1])
    for e in range(E):  # within an expert, (token, slot) pairs keep their original order
        rows = order[experts_sorted == e]
        assert torch.all(rows[1:] > rows[:-1])
    assert torch.equal(order[inv], torch.arange(T * k))
    assert torch.equal(counts.long(), torch.bincount(flat, minlength=E))
    assert offs.dtype == torch.int32 and torch.equal(offs.long(), torch.cumsum(counts.long(), 0))


def test_pass_stacks_experts_and_keeps_every_value(megatron_env, tiny_model):
    import vpmoe_compile
    from vpmoe_compile.modules.moe import GroupedExperts, GroupedMoELayer, SparseTopKRouter

    stock_layers = [l.mlp for l in tiny_model.decoder.layers[1:]]
    stacked = [torch.stack([e.linear_fc1.weight.detach() for e in m.experts.local_experts]) for m in stock_layers]
    n_before = sum(1 for _ in tiny_model.parameters())
    numel_before = sum(p.numel() for p in tiny_model.parameters())
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "moe"], progress=False)
    rec = next(r for r in tiny_model.vpmoe_transform.results if r.name == "moe")
    E = tiny_model.config.num_moe_experts
    assert rec.data["parameter_tensors"] == {"before": n_before, "after": n_before - 3 * (2 * E - 2)}
    assert sum(p.numel() for p in tiny_model.parameters()) == numel_before
    for layer, ref in zip(tiny_model.decoder.layers[1:], stacked):
        assert isinstance(layer.mlp, GroupedMoELayer) and layer.mlp.sort_dispatch
        assert isinstance(layer.mlp.router, SparseTopKRouter) and isinstance(layer.mlp.experts, GroupedExperts)
        w = layer.mlp.experts.linear_fc1.weight
        assert torch.equal(w.detach(), ref) and w.expert_stack and w.shape == (E, 32, 64)
    assert rec.sites == tuple(f"decoder.layers.{i}.mlp" for i in (1, 2, 3))


def test_pass_refuses_token_dropping_and_changes_nothing(megatron_env, tiny_model):
    import vpmoe_compile

    tiny_model.config.moe_expert_capacity_factor = 1.0
    before = {n: p for n, p in tiny_model.named_parameters()}
    with pytest.raises(PassError, match="moe_expert_capacity_factor"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "moe"], progress=False)
    assert type(tiny_model.decoder.layers[1].mlp).__name__ == "MoELayer"
    assert {n: p for n, p in tiny_model.named_parameters()} == before


def test_grouped_layer_is_one_graph_without_host_sync_ops(megatron_env):
    """TorchDynamo captures the training forward (aux losses, expert-bias counts) in one graph:
    no .item()/.tolist()/.cpu()/nonzero (each would break the graph)."""
    from megatron_base.compat import dynamo_config

    _, _, model = _pair(megatron_env)
    layer = model.decoder.layers[2].mlp
    layer.train()
    x = torch.randn(16, 2, layer.config.hidden_size, requires_grad=True)
    layer.router.prime_for_compile()
    with dynamo_config():
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------




def test_plain_state_dicts_round_trip_and_stock_ones_load(megatron_env):
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    _, stock, ours = _pair(megatron_env)
    torch.manual_seed(7)
    other = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(other, passes=["layer_plan", "moe"], progress=False)
    assert not torch.equal(other.decoder.layers[1].mlp.experts.linear_fc1.weight, ours.decoder.layers[1].mlp.experts.linear_fc1.weight)
    other.load_state_dict(ours.state_dict())  # transformed -> transformed
    torch.testing.assert_close(_forward(other), _forward(ours), rtol=0, atol=0)
    torch.manual_seed(8)
    fresh = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(fresh, passes=["layer_plan", "moe"], progress=False)
    fresh.load_state_dict(stock.state_dict())  # stock (per-expert keys) -> transformed
    torch.testing.assert_close(_forward(fresh), _forward(stock), rtol=2e-6, atol=1e-6)
    bad = {k: v for k, v in stock.state_dict().items() if "local_experts.3." not in k}
    with pytest.raises(RuntimeError, match="experts"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("singleton", [False, True])
def test_sharded_state_dict_has_the_stock_layout(megatron_env, singleton):
    """Same global keys and shapes as stock; our one tensor per projection covers exactly the
    stock per-expert chunks; the per-expert _extra_state objects are the stock ones."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    _, stock, ours = _pair(megatron_env)
    meta = {"singleton_local_shards": singleton}

    def layout(model):
        sd = model.sharded_state_dict(metadata=dict(meta))
        tensors, objects = {}, set()
        for v in sd.values():
            if isinstance(v, ShardedTensor) and ".experts." in v.key and "shared" not in v.key:
                region = tuple((off, off + n) for off, n in zip(v.global_offset, v.local_shape if v.prepend_axis_num == 0 else (1,) * v.prepend_axis_num + tuple(v.local_shape)))
                tensors.setdefault(v.key, (tuple(v.global_shape), []))[1].append(region)
            elif isinstance(v, ShardedObject) and ".experts." in v.key and "shared" not in v.key:
                objects.add((v.key, tuple(v.global_shape), tuple(v.global_offset)))
        return tensors, objects

    t_stock, o_stock = layout(stock)
    t_ours, o_ours = layout(ours)
    assert o_ours == o_stock and o_stock
    assert set(t_ours) == set(t_stock) and t_stock
    E = stock.config.num_moe_experts
    for key, (shape, regions) in t_stock.items():
        shape2, regions2 = t_ours[key]
        assert shape2 == shape
        covered = lambda rs: {(e, r[1:]) for r in rs for e in range(*r[0])}
        assert covered(regions2) == covered(regions)
        assert len(regions) == (1 if singleton else E) and len(regions2) == 1


def test_torch_dist_checkpoint_moves_between_stock_and_transformed(megatron_env):
    """A torch_dist checkpoint of the stock model loads into the transformed one (same forward)
    and a checkpoint of the transformed model loads back into a fresh stock model."""
    import vpmoe_compile
    from megatron.core import dist_checkpointing

    from megatron_base import build_stock_gpt

    _, stock, _ = _pair(megatron_env)
    ref = _forward(stock)
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        dist_checkpointing.save(stock.sharded_state_dict(), d1)
        torch.manual_seed(11)
        ours = build_stock_gpt("tiny", device="cpu")
        vpmoe_compile.transform(ours, passes=["layer_plan", "moe"], progress=False)
        ours.load_state_dict(dist_checkpointing.load(ours.sharded_state_dict(), d1))
        torch.testing.assert_close(_forward(ours), ref, rtol=2e-6, atol=1e-6)
        dist_checkpointing.save(ours.sharded_state_dict(), d2)
        torch.manual_seed(12)
        back = build_stock_gpt("tiny", device="cpu")
        back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), d2))
        for (n, p), (_, q) in zip(stock.named_parameters(), back.named_parameters()):
            assert torch.equal(p, q), n


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_layer_has_no_host_sync_and_matches_stock(megatron_env):
    """vpmoe-8l width, bf16: the grouped layer's forward and backward run under
    ``torch.cuda.set_sync_debug_mode("error")`` and match the stock layer within bf16 tolerance."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("vpmoe-8l")
    cfg.model.num_layers = 2
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_stock_gpt(cfg, device="cuda", params_dtype=torch.bfloat16, max_sequence_length=512))
    vpmoe_compile.transform(models[1], cfg, passes=["layer_plan", "moe"], progress=False)
    stock, ours = models[0].decoder.layers[1].mlp, models[1].decoder.layers[1].mlp
    x = torch.randn(512, 2, 1024, device="cuda", dtype=torch.bfloat16)
    ys = []
    for layer in (stock, ours):
        xx = x.clone().requires_grad_()
        if layer is ours:
            ours(xx)  # warm-up (lazy CUDA init, aux-loss scale)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            y, _ = layer(xx)
            y.float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ys.append((y.detach().float(), xx.grad.float()))
    (y1, g1), (y2, g2) = ys
    assert ((y2 - y1).norm() / y1.norm()).item() < 2e-2
    assert ((g2 - g1).norm() / g1.norm()).item() < 5e-2


def test_grouped_experts_behind_megatrons_dispatcher_equal_stock(megatron_env):
    """The path expert parallelism takes: Megatron's own token dispatcher in front of the grouped
    experts (tokens_per_expert on the host, Megatron's permutation) equals the stock layer."""
    _, stock_model, ours_model = _pair(megatron_env)
    stock, ours = stock_model.decoder.layers[3].mlp, ours_model.decoder.layers[3].mlp
    ours.sort_dispatch = False  # as at expert-parallel size > 1
    x1 = torch.randn(16, 2, stock.config.hidden_size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, _ = stock(x1)
    y2, _ = ours(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y2, y1, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2e-6, atol=1e-7)
    for name, grad in _expert_grads_stock(stock).items():
        torch.testing.assert_close(getattr(ours.experts, name).weight.grad, grad, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours.router.local_tokens_per_expert, stock.router.local_tokens_per_expert)
