"""NorMuon on the GPU (docs/design.md#optimizer-tests-and-benchmark): compiled vs eager, no recompilation on lr changes, CUDA-graph replay == eager,
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


def _static_grad_steps(opt, params, steps, none_at=None):
    """``steps`` steps with fresh gradients copied into fixed-address buffers (as Megatron's
    ``main_grad``) and the lr / wd schedule; at step ``none_at`` ``params[1]`` has no gradient.
    Returns the buffers."""
    static = [torch.empty_like(p) for p in params]
    for step in range(steps):
        for s_, gr in zip(static, _grads(params, step)):
            s_.copy_(gr)
        for p, s_ in zip(params, static):
            p.grad = s_
        if step == none_at:
            params[1].grad = None
        _set_hyper(opt, step)
        opt.step()
    return static


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


@pytest.mark.parametrize("fused_bank,form", [(True, "standard"), (False, "standard"), (True, "gram")])
def test_cuda_graph_replay_equals_eager(fused_bank, form):
    """Same kernels with and without capture: bitwise equal params and state, through lr / wd
    changes, a gradient-address change (eager gather) and a step with a ``None`` gradient."""
    init = _make()
    pa, opt_g = _optimizer(init, cuda_graph=True, compile=False, fused_bank=fused_bank, pe_form=form)
    pb, opt_e = _optimizer(init, cuda_graph=False, compile=False, fused_bank=fused_bank, pe_form=form)
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


@pytest.mark.parametrize("form", ["standard", "gram"])
def test_compiled_graph_fused_step_matches_eager_without_recompiling(form):
    """Inductor-compiled banks + fused PE + CUDA graph vs the eager PyTorch path within bf16
    tolerance; lr / wd changes after the first step compile nothing new (dynamo counters); the
    steady-state step syncs nothing and allocates nothing; one step vs the fp64 reference."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    init = _make()
    pa, opt_c = _optimizer(init, cuda_graph=True, compile=True, pe_form=form)
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
            # The accuracy bound on real kernels: first step vs fp64 REF (per logical matrix of
            # each param; docs/design.md#polar-express)
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


# ------------------------------------------------------------------------------------ expert stacks
# Grouped-expert weights: gated fc1 [E, 2F, h] (gate / up members [F, h], fused), fc2 [E, h, F]
# (tall, fused on the transpose) and a PyTorch-path stack ([E, 256, 256], min(m, n) > 128).
STACKS = [(8, 256, 512), (8, 512, 128), (4, 256, 256)]
STACK_BLOCKS = [(((0, 128),), ((128, 128),)), None, None]


def _stack_optimizer(init, **kw):
    params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    return params, NorMuon([{"params": params, "blocks": list(STACK_BLOCKS)}], lr=0.01,
                           weight_decay=0.1, compile=False, **kw)


def test_expert_stacks_in_place_graph_direct_and_separate_matrices():
    """Stacks on the GPU: (1) eager, the banks compute on the parameter and the gradient
    themselves (no gradient buffer) and match E separate 2-D params (same kernels; only the
    final rounding of the split gate / up update differs); (2) CUDA graphs (the gradient copied
    once per stack into the bank) and (3) ``direct_grads`` + graphs (address table, no copy)
    are bitwise the eager steps, through lr / wd changes and a ``None``-gradient step; (4) the
    steady graph step syncs and allocates nothing."""
    g = torch.Generator(device="cpu").manual_seed(3)
    init = [torch.randn(*s, generator=g) * 0.02 for s in STACKS]
    runs = {}
    for name, kw in (("eager", {}), ("graph", dict(cuda_graph=True)),
                     ("direct", dict(cuda_graph=True, direct_grads=True))):
        params, opt = _stack_optimizer(init, **kw)
        ptrs = [p.data_ptr() for p in params]
        static = _static_grad_steps(opt, params, 6, none_at=4)
        assert [p.data_ptr() for p in params] == ptrs
        summary = opt.bank_summary()
        assert all(s["stack"] is not None and s["rehomed"] for s in summary)
        assert {s["fused"] for s in summary} == {True, False}
        if name == "eager":
            assert all(b.G_buf is None for b in opt._banks)
        runs[name] = [p.detach().clone() for p in params]  # before the extra step below
        if name == "direct":
            assert all(s["direct_grads"] == s["fused"] for s in summary)
            assert _steady_state_step(opt, params, static) == 0
    for name in ("graph", "direct"):
        for a, b in zip(runs[name], runs["eager"]):
            assert torch.equal(a, b), name
    # (1) vs separate 2-D parameters with the same gradients
    sep_init = [t[e] for t in init for e in range(t.shape[0])]
    sep_blocks = [blk for t, blk in zip(init, STACK_BLOCKS) for _ in range(t.shape[0])]
    sep = [torch.nn.Parameter(t.clone().cuda()) for t in sep_init]
    opt_s = NorMuon([{"params": sep, "blocks": sep_blocks}], lr=0.01, weight_decay=0.1, compile=False)
    stk, opt_k = _stack_optimizer(init)
    for step in range(3):
        grads = _grads(stk, step)
        for p, gr in zip(stk, grads):
            p.grad = gr
        for p, gr in zip(sep, [gr[e] for gr in grads for e in range(gr.shape[0])]):
            p.grad = gr.clone()
        for o in (opt_k, opt_s):
            _set_hyper(o, step)
        opt_k.step()
        opt_s.step()
    flat = [t[e] for t in stk for e in range(t.shape[0])]
    for i, (a, b) in enumerate(zip(flat, sep)):
        assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item() + 1e-9, i


@pytest.mark.parametrize("form", ["standard", "gram"])
def test_overlapped_banks_equal_one_stream_and_eager(form):
    """``overlap_banks`` (the default): an expert stack with one member per SM (its bank kernel
    fills the GPU: the caller's stream) beside smaller fused banks and PyTorch banks (the second
    stream). Graph steps with the two streams equal the one-stream graph steps and the eager
    steps bitwise, through lr / wd changes; the steady step syncs and allocates nothing."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cpu").manual_seed(5)
    init = [torch.randn(sms, 64, 256, generator=g) * 0.02] + [
        torch.randn(*s, generator=g) * 0.02 for s in DENSE]
    runs = {}
    for name, kw in (("eager", {}), ("overlap", dict(cuda_graph=True)),
                     ("serial", dict(cuda_graph=True, overlap_banks=False))):
        params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
        opt = NorMuon(params, lr=0.01, weight_decay=0.1, compile=False, pe_form=form, **kw)
        static = _static_grad_steps(opt, params, 6)
        main, side = opt.stream_split()
        if name == "serial":
            assert side == []
        else:
            assert [b.shape for b in main] == [(64, 256)] and main[0].size == sms
            assert {b.fused for b in side} == {True, False}
        runs[name] = [p.detach().clone() for p in params]
        if name == "overlap":
            assert opt._graphs is not None and opt._graphs.compute is not None
            assert _steady_state_step(opt, params, static) == 0
    for name in ("overlap", "serial"):
        for a, b in zip(runs[name], runs["eager"]):
            assert torch.equal(a, b), name


def test_megatron_path_expert_stacks(megatron_world, tmp_path):
    """Megatron path with expert stacks: DDP-wrapped bf16 toy model (a dense matrix, a norm, a
    gated fc1 stack and an fc2 stack), ``Float16OptimizerWithFloat16Params``: the fp32 main param
    of each stack is its bank's ``W`` and its ``main_grad`` is read in place; the step equals
    NorMuon over the per-expert fp32 matrices; ``torch_dist`` state round-trips (one
    ShardedTensor per stack, ``[E, m, 1]`` second moments) and the next step is identical."""
    from types import SimpleNamespace

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from vpmoe_compile.optim import build_optimizer

    E, F, H = 4, 64, 256
    tcfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=F,
                             gated_linear_unit=True, bf16=True, params_dtype=torch.bfloat16)

    def build(seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        m = torch.nn.Module()
        m.config = tcfg
        for name, shape, attrs in (
            ("dense", (F, H), {}), ("norm", (H,), {}),
            ("fc1", (E, 2 * F, H), dict(allreduce=False, expert_stack=True)),
            ("fc2", (E, H, F), dict(allreduce=False, expert_stack=True)),
        ):
            sub = torch.nn.Module()
            sub.weight = torch.nn.Parameter((torch.randn(*shape, generator=gen) * 0.02).cuda().bfloat16())
            for k, v in attrs.items():
                setattr(sub.weight, k, v)
            setattr(m, {"dense": "linear_fc1", "norm": "layernorm"}.get(name, name), sub)
        m.experts = torch.nn.Module()
        m.experts.linear_fc1, m.experts.linear_fc2 = m.fc1, m.fc2
        del m.fc1, m.fc2
        ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), m)
        return m, ddp

    def set_grads(ddp, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ddp.zero_grad_buffer()
        for p in ddp.module.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen) * 1e-2)

    def model_sharded(m):
        out = {}
        for name, p in m.named_parameters():
            off = ((0, 0, 1),) if p.ndim == 3 else ()  # expert axis 0, ep_rank 0 of 1
            out[name] = ShardedTensor.from_rank_offsets(name, p, *off, replica_id=0)
        return out

    def normuon_of(opt):
        return [o.optimizer for o in opt.chained_optimizers if isinstance(o.optimizer, NorMuon)]

    cfg = SimpleNamespace(clip_grad=0.0, lr=0.02, weight_decay=0.1, compile=False)
    model, ddp = build(0)
    opt = build_optimizer(ddp, cfg)
    assert opt.path == "megatron"
    stacks = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    main_init = {n: p.detach().float().clone() for n, p in stacks.items()}
    set_grads(ddp, 1)
    grads = {n: p.main_grad.clone() for n, p in stacks.items()}
    ok, _, _ = opt.step()
    assert ok
    (expert_nm,) = [o for o in normuon_of(opt) if o.param_groups[0]["is_expert_parallel"]]
    banks = [b for b in expert_nm._banks if b.stack is not None]
    assert len(banks) == 2 and all(b.G_buf is None for b in banks)  # gradients read in place
    for b in banks:
        assert b.W.data_ptr() == b.stack.param.data_ptr() and b.stack.param.dtype == torch.float32
    # reference: NorMuon over the per-expert fp32 matrices (gate / up halves of fc1)
    ref, blocks, src = [], [], []
    for n, w0 in main_init.items():
        for e in range(E):
            ref.append(torch.nn.Parameter(w0[e].clone()))
            ref[-1].grad = grads[n][e].clone()
            blocks.append((((0, F),), ((F, F),)) if n.endswith("linear_fc1.weight") else None)
            src.append((n, e))
    NorMuon([{"params": ref, "blocks": blocks}], lr=0.02, weight_decay=0.1).step()
    mains = {id(b.stack.param): b.stack.param for b in banks}
    main_of = {n: [m for m in mains.values() if m.shape == p.shape][0] for n, p in stacks.items()}
    for r, (n, e) in zip(ref, src):
        assert (main_of[n][e] - r).abs().max().item() <= 1e-6, (n, e)
        assert torch.equal(stacks[n][e], main_of[n][e].bfloat16())
    # torch_dist round trip
    set_grads(ddp, 2)
    opt.step()
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    ckdir = str(ckdir)
    sharded = {"optimizer": opt.sharded_state_dict(model_sharded(model))}
    dist_checkpointing.save(sharded, ckdir)
    model2, ddp2 = build(5)
    model2.load_state_dict(model.state_dict())
    opt2 = build_optimizer(ddp2, cfg)
    loaded = dist_checkpointing.load(
        {"optimizer": opt2.sharded_state_dict(model_sharded(model2), is_loading=True)}, ckdir
    )
    opt2.load_state_dict(loaded["optimizer"])
    v_shapes = set()
    for a, b in zip(normuon_of(opt), normuon_of(opt2)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        for i in sa:
            for k in ("momentum_buffer", "second_moment"):
                assert sa[i][k].shape == sb[i][k].shape and torch.equal(sa[i][k], sb[i][k]), (i, k)
            v_shapes.add(tuple(sa[i]["second_moment"].shape))
    assert {(E, 2 * F, 1), (E, H, 1)} <= v_shapes
    for d, o in ((ddp, opt), (ddp2, opt2)):
        set_grads(d, 3)
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_sm_workspace_equals_member_workspace(monkeypatch):
    """The one-kernel bank steps on the caller's stream share one per-SM workspace
    (``pe_triton.sm_workspace``) instead of a workspace matrix per member: an expert stack of
    128-row members (one per SM: the caller's stream) runs on it and allocates no workspace of
    its own, a small fused bank (the second stream) keeps its own; the graph steps are bitwise
    those with a workspace per member everywhere (``normuon.SM_WORKSPACE = False``) and the
    eager steps, through lr / wd changes."""
    import vpmoe_compile.optim.normuon as normuon_mod

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cpu").manual_seed(11)
    init = [torch.randn(sms, 128, 512, generator=g) * 0.02, torch.randn(96, 384, generator=g) * 0.02]
    runs = {}
    for name, slot, kw in (("eager", True, {}), ("slot", True, dict(cuda_graph=True)),
                           ("member", False, dict(cuda_graph=True))):
        monkeypatch.setattr(normuon_mod, "SM_WORKSPACE", slot)
        params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
        opt = NorMuon(params, lr=0.01, weight_decay=0.1, compile=False, **kw)
        _static_grad_steps(opt, params, 5)
        stack = [b for b in opt._banks if b.stack is not None]
        assert len(stack) == 1 and stack[0].shape == (128, 512)
        assert stack[0].slot_x is (True if slot else None)
        assert (stack[0].X is None) == slot
        if name == "slot":
            main, side = opt.stream_split()
            assert [id(b) for b in main] == [id(stack[0])] and side
            assert [b.slot_x for b in side] == [None] * len(side)
        runs[name] = [p.detach().clone() for p in params]
    for name in ("slot", "member"):
        for a, b in zip(runs[name], runs["eager"]):
            assert torch.equal(a, b), name


def test_merged_launches_equal_one_launch_per_bank(monkeypatch):
    """``merge_launches``: the expert stacks of three "layers" (gated fc1 ``[48, 256, 512]`` as
    gate / up members, tall fc2 ``[48, 512, 128]``) run as one launch per member shape through
    the address table; eager, graph and graph + per-SM workspace steps are bitwise the steps
    with one launch per bank, through lr / wd changes and a step with a missing gradient; the
    steady merged graph step syncs and allocates nothing."""
    import vpmoe_compile.optim.normuon as normuon_mod

    g = torch.Generator(device="cpu").manual_seed(13)
    init = [torch.randn(*s, generator=g) * 0.02 for _ in range(3)
            for s in ((48, 256, 512), (48, 512, 128))]
    blocks = [(((0, 128),), ((128, 128),)), None] * 3
    runs = {}
    for name, slot, kw in (
        ("per_bank", False, dict(cuda_graph=True, direct_grads=True)),
        ("eager", False, dict(direct_grads=True, merge_launches=True)),
        ("graph", False, dict(cuda_graph=True, direct_grads=True, merge_launches=True)),
        ("graph_slot", True, dict(cuda_graph=True, direct_grads=True, merge_launches=True)),
    ):
        monkeypatch.setattr(normuon_mod, "SM_WORKSPACE", slot)
        params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
        opt = NorMuon([{"params": params, "blocks": list(blocks)}], lr=0.01, weight_decay=0.1,
                      compile=False, **kw)
        static = _static_grad_steps(opt, params, 6, none_at=3)
        groups = {tuple(s["shape"]): s["launch_group"] for s in opt.bank_summary()}
        if name == "per_bank":
            assert set(groups.values()) == {None}
        else:
            assert sorted(groups.values()) == [0, 1] and len(opt._groups) == 2
            assert [gr.size for gr in opt._groups] == [3 * 96, 3 * 48]
        if name == "graph_slot":
            assert all(gr.slot_x is True and gr.X is None for gr in opt._groups)
        runs[name] = [p.detach().clone() for p in params]
        if name == "graph":
            assert _steady_state_step(opt, params, static) == 0
    for name in ("eager", "graph", "graph_slot"):
        for a, b in zip(runs[name], runs["per_bank"]):
            assert torch.equal(a, b), name
