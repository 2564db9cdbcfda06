"""The layer-wise distributed optimizer's ownership rule (whole parameters dealt to the
data-parallel ranks) and its refusals; the training parity and checkpoint resharding runs are in
tests/parallel/test_data_parallel.py."""

from types import SimpleNamespace

import pytest
import torch

from vpmoe_compile.optim.layer_wise import assign_owners, sharded_state_numel


def _route(numel, optimizer="normuon", expert=False):
    return SimpleNamespace(param=torch.empty(numel), optimizer=optimizer, is_expert_parallel=expert)


def test_every_parameter_has_one_owner_and_memory_is_balanced():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 10_000, (57,), generator=g).tolist()
    routes = [_route(n, "normuon" if i % 3 else "adamw", expert=i % 5 == 0) for i, n in enumerate(sizes)]
    for dense, expert in ((2, 2), (4, 2), (8, 1), (3, 3)):
        owners = assign_owners(routes, dense, expert)
        assert len(owners) == len(routes)
        for r, o in zip(routes, owners):
            assert 0 <= o < (expert if r.is_expert_parallel else dense)
        # per part and group: ping-pong over the size order -> within each full round of 2 x size
        # parameters every rank gets one smaller and one larger one, so the largest and smallest
        # rank differ by at most the part's size range plus one (partial) last round
        for opt in ("normuon", "adamw"):
            for ex, size in ((False, dense), (True, expert)):
                part = [(r.param.numel(), o) for r, o in zip(routes, owners)
                        if r.optimizer == opt and r.is_expert_parallel == ex]
                if not part:
                    continue
                load = [sum(n for n, o in part if o == k) for k in range(size)]
                assert max(load) - min(load) <= 2 * max(n for n, _ in part)
                # rank 0 owns the part's smallest parameter: it saves the part's common state
                assert min(part)[1] == 0


def test_assignment_depends_only_on_sizes_and_order():
    routes = [_route(n) for n in (5, 3, 9, 3, 7, 1)]
    assert assign_owners(routes, 2, 1) == assign_owners([_route(r.param.numel()) for r in routes], 2, 1)
    # sorted sizes 1, 3, 3, 5, 7, 9 dealt 0, 1, 1, 0, 0, 1 (ties keep route order)
    assert assign_owners(routes, 2, 1) == [0, 1, 1, 1, 0, 0]
    assert sharded_state_numel([5, 3, 9, 3, 7, 1], 2) == [1 + 5 + 7, 3 + 3 + 9]
    assert assign_owners(routes, 1, 1) == [0] * 6


def test_refused_without_megatron_ddp(megatron_env):
    from megatron_base import build_stock_gpt

    import vpmoe_compile
    from vpmoe_compile.optim import UnsupportedOptimizerSetup

    model = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(model, progress=False)
    with pytest.raises(UnsupportedOptimizerSetup, match="DistributedDataParallel"):
        vpmoe_compile.build_optimizer(model, layer_wise_distributed_optimizer=True)


def test_one_rank_is_the_replicated_optimizer(megatron_env):
    """At data-parallel size 1 nothing is sharded: the optimizer is the plain one."""
    from megatron_base import build_stock_gpt

    import vpmoe_compile
    from vpmoe_compile.training import wrap_megatron

    model = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(model, progress=False)
    opt = vpmoe_compile.build_optimizer(wrap_megatron(model), layer_wise_distributed_optimizer=True)
    assert opt.sharding is None
    assert len(opt.get_parameters()) == sum(1 for p in model.parameters() if p.requires_grad)
