"""T11 (GPU): compiled vs eager, no recompilation on lr changes, CUDA-graph replay == eager,
no host synchronisation and no allocation in the steady-state step. Skipped without CUDA."""

import math

import pytest
import torch

from vpmoe_compile.optim import NorMuon
from vpmoe_compile.optim.reference import normuon_reference_update

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Fused banks (min(m, n) <= 128: wide, tall, small), PyTorch banks (s = 256), a fused-QKV-like
# split parameter and a TPA-like packed one; two groups (dense / expert-parallel).
DENSE = [(256, 512), (256, 512), (64, 512), (512, 64)]
EXPERT = [(128, 512)] * 3 + [(512, 128)] * 3
QKV_BLOCKS = ((((0, 128), (192, 128)), ((128, 32), (320, 32)), ((160, 32), (352, 32))),)


def _make(seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dense = [torch.randn(*s, generator=g) * 0.02 for s in DENSE] + [torch.randn(384, 256, generator=g) * 0.02]
    expert = [torch.randn(*s, generator=g) * 0.02 for s in EXPERT]
    return dense, expert


def _optimizer(init, **kw):
    dense, expert = init
    pd = [torch.nn.Parameter(t.clone().cuda()) for t in dense]
    pe = [torch.nn.Parameter(t.clone().cuda()) for t in expert]
    groups = [
        {"params": pd, "blocks": [None] * len(DENSE) + list(QKV_BLOCKS)},
        {"params": pe},
    ]
    return pd + pe, NorMuon(groups, lr=0.01, weight_decay=0.1, **kw)


def _grads(params, seed):
    g = torch.Generator(device="cpu").manual_seed(1000 + seed)
    return [(torch.randn(*p.shape, generator=g) * 1e-3).cuda() for p in params]


def _schedule(step):
    lr = 0.01 * (0.5 + 0.5 * math.cos(step))
    wd = 0.0 if step % 3 == 2 else 0.1  # wd = 0 exercises the graph's "decay by 1.0"
    return lr, wd


def _set_hyper(opt, step):
    lr, wd = _schedule(step)
    for grp in opt.param_groups:
        grp["lr"], grp["weight_decay"] = lr, wd


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _steady_state_step(opt, params, grads):
    """One step under sync-debug "error"; returns the allocator calls it made."""
    for p, g in zip(params, grads):
        p.grad = g
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


@pytest.mark.parametrize("fused_bank", [True, False])
def test_cuda_graph_replay_equals_eager(fused_bank):
    """Same kernels with and without capture: bitwise equal params and state, through lr / wd
    changes, a gradient-address change (eager gather) and a step with a ``None`` gradient."""
    init = _make()
    pa, opt_g = _optimizer(init, cuda_graph=True, compile=False, fused_bank=fused_bank)
    pb, opt_e = _optimizer(init, cuda_graph=False, compile=False, fused_bank=fused_bank)
    static = [torch.empty_like(p) for p in pa]  # gradient buffers at fixed addresses
    for step in range(8):
        grads = _grads(pa, step)
        if step == 5:  # new addresses: gather runs eagerly, compute graph still replays
            static = [g.clone() for g in grads]
        for s, g in zip(static, grads):
            s.copy_(g)
        for i, (p, q) in enumerate(zip(pa, pb)):
            p.grad, q.grad = static[i], grads[i].clone()
        if step == 6:  # one gradient missing: eager (masked) step for both
            pa[1].grad = pb[1].grad = None
        for o in (opt_g, opt_e):
            _set_hyper(o, step)
        opt_g.step()
        opt_e.step()
        for p, q in zip(pa, pb):
            assert torch.equal(p.detach(), q.detach()), (step, (p - q).abs().max().item())
    # gather + compute at step 1; the gather again at step 7 (addresses changed at 5, stable since)
    assert opt_g.graph_captures == 3
    sg, se = opt_g.state_dict()["state"], opt_e.state_dict()["state"]
    for i in sg:
        for k in ("momentum_buffer", "second_moment"):
            assert torch.equal(sg[i][k], se[i][k])
    # steady state: replay only -- no host sync, no allocation
    assert _steady_state_step(opt_g, pa, static) == 0
    # load_state_dict rebuilds the banks: graphs are dropped and re-captured
    opt_g.load_state_dict(opt_g.state_dict())
    assert opt_g.graph_captures == 0
    opt_g.step()
    opt_g.step()
    opt_g.step()
    assert opt_g.graph_captures == 2


def test_compiled_graph_fused_step_matches_eager_without_recompiling():
    """T11: Inductor-compiled banks + fused PE + CUDA graph vs the eager PyTorch path within bf16
    tolerance; lr / wd changes after the first step compile nothing new (dynamo counters); the
    steady-state step syncs nothing and allocates nothing; one step vs the fp64 reference."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    init = _make()
    pa, opt_c = _optimizer(init, cuda_graph=True, compile=True)
    pb, opt_e = _optimizer(init, cuda_graph=False, compile=False, pe_backend="torch")
    pr = [p.detach().double().cpu() for p in pa]
    assert {b["fused"] for b in opt_c.bank_summary()} == {True, False}
    graphs_after_first = None
    for step in range(6):
        grads = _grads(pa, step)
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g, g.clone()
        for o in (opt_c, opt_e):
            _set_hyper(o, step)
        opt_c.step()
        opt_e.step()
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
            assert graphs_after_first > 0
            # T3 on real kernels: first step vs fp64 REF (per logical matrix of each param)
            lr, wd = _schedule(0)
            for p, w0, g, blk in zip(pa, pr, grads, [None] * 4 + list(QKV_BLOCKS) + [None] * 6):
                W, M = w0.clone(), torch.zeros_like(w0)
                v = torch.zeros(W.shape[0], 1, dtype=torch.float64)
                normuon_reference_update(W, g.double().cpu(), M, v, lr=lr, weight_decay=wd, blocks=blk)
                assert _rel(p.detach().cpu() - w0, W - w0) <= 0.04
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # no recompilation
    init_b = [t.cuda() for t in init[0] + init[1]]
    for p, q, w0 in zip(pa, pb, init_b):
        assert _rel(p.detach() - w0, q.detach() - w0) <= 0.03
    assert opt_c.graph_captures == 1  # new gradient tensors every step: the gather stays eager
    opt_c.step()  # same gradients again: the gather is captured too
    assert opt_c.graph_captures == 2
    assert _steady_state_step(opt_c, pa, [p.grad for p in pa]) == 0
    # the eager compiled path (no graph) syncs nothing either
    opt_c.cuda_graph = False
    _steady_state_step(opt_c, pa, [p.grad for p in pa])
    assert counters["stats"]["unique_graphs"] == graphs_after_first
    torch._dynamo.reset()


def test_direct_gradients_equal_gathered():
    """``direct_grads=True`` (the bank kernel reads each gradient in place through an address
    table) gives bitwise the same steps as gathering, eager and under CUDA graphs, also when the
    gradient tensors move between steps."""
    init = _make()
    runs = {}
    for name, kw in (("gather", dict(direct_grads=False)), ("direct", dict(direct_grads=True)),
                     ("direct_graph", dict(direct_grads=True, cuda_graph=True))):
        params, opt = _optimizer(init, compile=False, **kw)
        static = [torch.empty_like(p) for p in params]
        for step in range(5):
            grads = _grads(params, step)
            if step == 3:
                static = [torch.empty_like(g) for g in grads]  # the gradients move
            for s_, g in zip(static, grads):
                s_.copy_(g)
            for p, s_ in zip(params, static):
                p.grad = s_
            _set_hyper(opt, step)
            opt.step()
        if kw["direct_grads"]:
            assert any(b["direct_grads"] for b in opt.bank_summary())
        runs[name] = [p.detach().clone() for p in params]
    for name in ("direct", "direct_graph"):
        for a, b in zip(runs[name], runs["gather"]):
            assert torch.equal(a, b), name
