"""3-D expert stacks ``[E, m, n]`` (grouped experts, ``expert_stack = True``) in NorMuon.

A stack must give exactly the updates of ``E`` separate 2-D parameters (gate / up halves as two
matrices), run as a bank *in place* (the bank's ``W`` is the parameter's storage, its ``G`` the
gradient itself, nothing copied per expert), keep its state as ``[E, m, n]`` / ``[E, m, 1]``,
skip exactly when its gradient is ``None``, and work through ``build_optimizer``'s plain path.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vpmoe_compile.optim import NorMuon, build_optimizer
from vpmoe_compile.optim.reference import normuon_reference_update

from ._fake import EXPERTS, FFN, HIDDEN, VOCAB, FakeVpMoE, copy_experts

E, H, F = 4, 24, 8


def _gate_up(F1):
    return (((0, F1 // 2),), ((F1 // 2, F1 // 2),))


def _pair(gated, dtype=torch.float64, E=E, extra=()):
    """``(stacked params, per-expert 2-D params, stack blocks, 2-D blocks)`` with equal values:
    fc1 ``[E, F1, H]`` (gate / up when ``gated``), fc2 ``[E, H, F]`` (tall: PE on the transpose)
    and any ``extra`` 2-D shapes (present in both)."""
    F1 = 2 * F if gated else F
    w1 = torch.randn(E, F1, H, dtype=dtype)
    w2 = torch.randn(E, H, F, dtype=dtype)
    others = [torch.randn(*s, dtype=dtype) for s in extra]
    stacked = [torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())]
    stacked += [torch.nn.Parameter(t.clone()) for t in others]
    separate = [torch.nn.Parameter(w1[e].clone()) for e in range(E)]
    separate += [torch.nn.Parameter(w2[e].clone()) for e in range(E)]
    separate += [torch.nn.Parameter(t.clone()) for t in others]
    blk1 = _gate_up(F1) if gated else None
    return stacked, separate, [blk1, None] + [None] * len(extra), [blk1] * E + [None] * (E + len(extra))


def _to_separate(tensors, n_extra=0):
    """Stack-shaped tensors (params / grads / states) -> the per-expert list of ``_pair``."""
    out = list(tensors[0].unbind(0)) + list(tensors[1].unbind(0))
    return out + list(tensors[2 : 2 + n_extra])


# ------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize(
    "gated,neuron_axis,scale_mode",
    [(False, "rows", "shape"), (True, "rows", "shape"), (False, "larger", "shape"), (True, "rows", "rms0.2")],
)
def test_stack_equals_separate_matrices_fp64(gated, neuron_axis, scale_mode):
    """Same updates, momenta and second moments as E separate 2-D params (and as the literal
    per-matrix reference) over several steps with an lr / wd schedule, an expert with zero
    gradients throughout and a step with all-zero gradients."""
    stacked, separate, sblk, pblk = _pair(gated)
    idle = stacked[0][1].detach().clone()
    kw = dict(neuron_axis=neuron_axis, scale_mode=scale_mode)
    opt_s = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1, **kw)
    opt_p = NorMuon([{"params": separate, "blocks": pblk}], lr=0.02, weight_decay=0.1, **kw)
    ref_w = [p.detach().clone() for p in separate]
    ref_m = [torch.zeros_like(w) for w in ref_w]
    ref_v = [
        torch.zeros(1, w.shape[1], dtype=w.dtype)
        if neuron_axis == "larger" and w.shape[0] < w.shape[1]
        else torch.zeros(w.shape[0], 1, dtype=w.dtype)
        for w in ref_w
    ]
    for step in range(5):
        lr, wd = 0.02 / (1 + step), (0.0 if step == 3 else 0.1)
        for o in (opt_s, opt_p):
            o.param_groups[0]["lr"], o.param_groups[0]["weight_decay"] = lr, wd
        grads = [torch.randn_like(p) for p in stacked]
        grads[0][1].zero_()  # expert 1's fc1 gets no gradient, ever
        if step == 2:
            grads = [torch.zeros_like(g) for g in grads]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        for p, g in zip(separate, _to_separate(grads)):
            p.grad = g.clone()
        opt_s.step()
        opt_p.step()
        for i, g in enumerate(_to_separate(grads)):
            normuon_reference_update(ref_w[i], g, ref_m[i], ref_v[i], lr=lr, weight_decay=wd,
                                     blocks=pblk[i], compute_dtype=torch.float64, **kw)
    for a, b, r in zip(_to_separate(stacked), separate, ref_w):
        assert (a.detach() - b.detach()).abs().max().item() <= 1e-12
        assert (a.detach() - r).abs().max().item() <= 1e-10
    ss, sp = opt_s.state_dict()["state"], opt_p.state_dict()["state"]
    for key in ("momentum_buffer", "second_moment"):
        stack_states = [ss[0][key], ss[1][key]]
        for i, (a, b) in enumerate(zip(_to_separate(stack_states), [sp[j][key] for j in range(2 * E)])):
            assert a.shape == b.shape, (key, i)
            assert (a - b).abs().max().item() <= 1e-12, (key, i)
    # the expert without gradients was only decayed (no NaN from its all-zero matrix)
    decay = math.prod(1 - 0.02 / (1 + s) * (0.0 if s == 3 else 0.1) for s in range(5))
    assert (stacked[0][1].detach() - idle * decay).abs().max().item() <= 1e-12


def test_stack_split_over_banks_equals_one_bank():
    """``max_bank_size`` below a stack's member count: banks of whole experts (slices of one
    momentum / second-moment tensor each), same results and state as one bank."""
    stacked, _, sblk, _ = _pair(True)
    chunked = [torch.nn.Parameter(p.detach().clone()) for p in stacked]
    opt = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    opt_c = NorMuon([{"params": chunked, "blocks": sblk}], lr=0.02, weight_decay=0.1, max_bank_size=3)
    for _ in range(3):
        for p, q in zip(stacked, chunked):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_c.step()
    # fc1: 2 members per expert -> 1 expert (2 members) per bank; fc2: 3 experts, then 1
    assert sorted(b["members"] for b in opt_c.bank_summary()) == [1, 2, 2, 2, 2, 3]
    assert all(b.W.data_ptr() == b.stack.members_of(b.stack.param).data_ptr() for b in opt_c._banks)
    for p, q in zip(stacked, chunked):
        assert (p - q).abs().max().item() <= 1e-12
        for k in ("momentum_buffer", "second_moment"):
            assert (opt.state[p][k] - opt_c.state[q][k]).abs().max().item() <= 1e-12


def test_bf16_stack_equals_separate_bf16_matrices():
    """Low-precision stacks: one cast-copy in, one add back; bitwise the separate bf16 result."""
    stacked, separate, sblk, pblk = _pair(True, dtype=torch.bfloat16)
    opt_s = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.05, weight_decay=0.1)
    opt_p = NorMuon([{"params": separate, "blocks": pblk}], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        for p, g in zip(separate, _to_separate(grads)):
            p.grad = g.clone()
        opt_s.step()
        opt_p.step()
    for a, b in zip(_to_separate(stacked), separate):
        assert a.dtype == torch.bfloat16 and torch.equal(a.detach(), b.detach())
    assert all(not b["rehomed"] and b["stack"] is not None for b in opt_s.bank_summary())
    assert opt_s.state[stacked[0]]["momentum_buffer"].dtype == torch.float32


# ------------------------------------------------------------------------------------ (c)
def test_state_shapes_and_round_trip_bitwise():
    stacked, _, sblk, _ = _pair(True, dtype=torch.float32, extra=[(16, 32)])
    init = [p.detach().clone() for p in stacked]
    grads = [[torch.randn_like(p) for p in stacked] for _ in range(5)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    opt_a = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    run(stacked, opt_a, grads)
    params_b = [torch.nn.Parameter(w.clone()) for w in init]
    opt_b = NorMuon([{"params": params_b, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    run(params_b, opt_b, grads[:2])
    saved = copy.deepcopy(opt_b.state_dict())
    st = saved["state"]
    assert st[0]["momentum_buffer"].shape == (E, 2 * F, H)
    assert st[0]["second_moment"].shape == (E, 2 * F, 1)
    assert st[1]["momentum_buffer"].shape == (E, H, F) and st[1]["second_moment"].shape == (E, H, 1)
    assert st[2]["second_moment"].shape == (16, 1)
    params_c = [torch.nn.Parameter(p.detach().clone()) for p in params_b]
    opt_c = NorMuon([{"params": params_c, "blocks": sblk}], lr=0.5)
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[0]["normuon_step"] == 2
    run(params_c, opt_c, grads[2:])
    for a, c in zip(stacked, params_c):
        assert torch.equal(a.detach(), c.detach())
    sa, sc = opt_a.state_dict()["state"], opt_c.state_dict()["state"]
    for i in sa:
        for k in ("momentum_buffer", "second_moment"):
            assert torch.equal(sa[i][k], sc[i][k]), (i, k)
    # the state is the bank's: views, current without any export
    bank = [b for b in opt_a._banks if b.stack is not None and b.stack.param is stacked[0]][0]
    assert opt_a.state[stacked[0]]["momentum_buffer"].data_ptr() == bank.M.data_ptr()


def test_stack_refusals():
    p = torch.nn.Parameter(torch.randn(E, 2 * F, H))
    with pytest.raises(ValueError, match="equal row blocks"):  # unequal / out-of-order blocks
        NorMuon([{"params": [p], "blocks": [(((0, 6),), ((6, 2 * F - 6),))]}])
    with pytest.raises(ValueError, match="equal row blocks"):
        NorMuon([{"params": [p], "blocks": [(((F, F),), ((0, F),))]}])
    with pytest.raises(ValueError, match="contiguous"):
        NorMuon([torch.nn.Parameter(torch.randn(H, 2 * F, E).transpose(0, 2))])
    with pytest.raises(ValueError, match="layout"):
        NorMuon([{"params": [p], "layouts": [(E, H, 2 * F)]}])
    with pytest.raises(NotImplementedError, match="gate-up expert stack"):
        NorMuon([{"params": [p], "blocks": [_gate_up(2 * F)]}], neuron_axis="larger")
    with pytest.raises(ValueError, match="3-D expert stacks"):
        NorMuon([torch.nn.Parameter(torch.randn(2, E, F, H))])
    # one block covering the whole expert is the default (one matrix per expert)
    o = NorMuon([{"params": [p], "blocks": [(((0, 2 * F),),)]}])
    assert o.param_groups[0]["blocks"] == [None] and o.bank_summary()[0]["members"] == E


# ------------------------------------------------------------------------------------ (d)
class _CountTensors(TorchDispatchMode):
    """Counts the ops dispatched and every tensor they take (lists of ``_foreach`` ops too)."""

    def __init__(self):
        super().__init__()
        self.ops = self.tensors = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.tensors += sum(isinstance(t, torch.Tensor) for t in tree_leaves((args, kwargs or {})))
        return func(*args, **(kwargs or {}))


def _touched_per_step(params, blocks, monkeypatch):
    """``(ops, tensors, optimizer, G seen by each stack bank's compute)`` of a steady step."""
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # bank building, first-step state
    for p in params:
        p.grad = torch.randn_like(p)
    seen = []
    compute = NorMuon._compute_bank

    def spy(self, bank, present, main=True):
        if bank.stack is not None:
            seen.append((bank, bank.G.data_ptr(), bank.stack.param.grad.data_ptr()))
        return compute(self, bank, present, main)

    monkeypatch.setattr(NorMuon, "_compute_bank", spy)
    with _CountTensors() as count:
        opt.step()
    monkeypatch.setattr(NorMuon, "_compute_bank", compute)
    return count.ops, count.tensors, opt, seen


def test_stack_is_a_bank_in_place_and_step_work_does_not_grow_with_experts(monkeypatch):
    """The bank's W is the parameter's storage and its G the gradient (no copy); the number of
    ops and of tensors they touch per step is the same for 4 and 32 experts. A per-expert gather
    (e.g. one ``_foreach_copy_`` over E views) fails this: the 2-D control grows with E."""
    counts = {}
    for n_exp in (4, 32):
        stacked, separate, sblk, pblk = _pair(True, dtype=torch.float32, E=n_exp)
        ptrs = [p.data_ptr() for p in stacked]
        ops, tensors, opt, seen = _touched_per_step(stacked, sblk, monkeypatch)
        counts[n_exp] = (ops, tensors)
        assert [p.data_ptr() for p in stacked] == ptrs  # never re-bound / re-homed
        banks = [b for b in opt._banks if b.stack is not None]
        assert len(banks) == 2 and sum(b.size for b in banks) == 3 * n_exp
        assert [b for b, _, _ in seen] == banks
        for b, g_ptr, grad_ptr in seen:
            p = b.stack.param
            assert b.W.data_ptr() == p.data_ptr()
            assert b.W.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            assert g_ptr == grad_ptr  # the bank computed on the gradient itself
            assert b.G_buf is None  # no gradient buffer was ever allocated
        summary = opt.bank_summary()
        assert {tuple(s["stack"]["shape"]) for s in summary} == {(n_exp, 2 * F, H), (n_exp, H, F)}
        assert all(s["rehomed"] for s in summary)
        counts[("2d", n_exp)] = _touched_per_step(separate, pblk, monkeypatch)[:2]
    assert counts[4] == counts[32]
    assert counts[("2d", 32)][1] > counts[("2d", 4)][1]  # the counter sees per-expert tensors


def test_gradient_read_in_place_is_left_unchanged_released_and_strided_grads_copied_once():
    import gc
    import weakref

    stacked, _, sblk, _ = _pair(False, dtype=torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in stacked]
    opt = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    opt_r = NorMuon([{"params": ref, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) for p in stacked]
        if step == 1:  # non-contiguous gradients: one whole-tensor copy into the bank buffer
            grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
        for p, q, g in zip(stacked, ref, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_r.step()
        for p, q in zip(stacked, ref):
            assert torch.equal(p.grad, q.grad)  # the step does not write the gradient
            assert torch.equal(p.detach(), q.detach())
        banks = [b for b in opt._banks if b.stack is not None]
        assert all((b.G_buf is None) == (step == 0) for b in banks)  # allocated at the copy
        refs = [weakref.ref(p.grad) for p in stacked]
        del grads, g
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs), step  # the optimizer kept no gradient alive


# ------------------------------------------------------------------------------------ (e)
def test_grad_none_leaves_the_stack_and_its_state_untouched():
    stacked, _, sblk, _ = _pair(True, dtype=torch.float64, extra=[(16, 32), (16, 32)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in stacked[2:]]
    opt = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    opt_r = NorMuon(ref, lr=0.02, weight_decay=0.1)
    for p in stacked:
        p.grad = torch.randn_like(p)
    opt.step()  # every param has state now
    for q, p in zip(ref, stacked[2:]):
        q.data.copy_(p.detach())
        opt_r.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    opt_r._banks = None
    opt_r._build_banks()
    snap = [p.detach().clone() for p in stacked[:2]]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(stacked[:2])}
    for step in range(2):
        stacked[0].grad = None  # the whole fc1 stack has no gradient
        stacked[1].grad = torch.randn_like(stacked[1]) if step else None
        for p, q in zip(stacked[2:], ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_r.step()
        assert torch.equal(stacked[0].detach(), snap[0])
        for k, v in state[0].items():
            assert torch.equal(opt.state[stacked[0]][k], v)
        if step == 0:
            assert torch.equal(stacked[1].detach(), snap[1])
            for k, v in state[1].items():
                assert torch.equal(opt.state[stacked[1]][k], v)
        for p, q in zip(stacked[2:], ref):
            assert torch.equal(p.detach(), q.detach())
    assert not torch.equal(stacked[1].detach(), snap[1])  # updated once its gradient came back


# ------------------------------------------------------------------------ graphs / compile / kernel
class _FakeGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def test_cuda_graph_logic_with_stacks_on_cpu(monkeypatch):
    """Under ``cuda_graph`` the captured kernels must read fixed addresses: the stack's G is its
    own buffer (one copy per stack, in the gather graph), results bitwise the eager ones."""

    def fake_capture(self, fn):
        self._graphs.captures += 1
        return _FakeGraph(fn)

    monkeypatch.setattr(NorMuon, "_capture", fake_capture)
    monkeypatch.setattr(NorMuon, "_check_graph_device", lambda self: None)
    stacked, _, sblk, _ = _pair(True, dtype=torch.float32, extra=[(16, 32)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in stacked]
    opt = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, weight_decay=0.1, cuda_graph=True)
    opt_r = NorMuon([{"params": ref, "blocks": sblk}], lr=0.02, weight_decay=0.1)
    static = [torch.empty_like(p) for p in stacked]
    for step in range(5):
        grads = [torch.randn_like(p) for p in stacked]
        for s, g in zip(static, grads):
            s.copy_(g)
        for p, q, s, g in zip(stacked, ref, static, grads):
            p.grad, q.grad = s, g.clone()
        if step == 3:
            stacked[0].grad = ref[0].grad = None  # masked step: eager, stack skipped
        for o in (opt, opt_r):
            o.param_groups[0]["lr"] = 0.02 / (step + 1)
        opt.step()
        opt_r.step()
        for p, q in zip(stacked, ref):
            assert torch.equal(p.detach(), q.detach()), step
    assert opt.graph_captures == 2  # compute + gather (gradient addresses stable)
    for b in opt._banks:
        if b.stack is not None:
            assert b.G is b.G_buf and b.W.data_ptr() == b.stack.param.data_ptr()


def test_compiled_stack_banks_match_eager():
    """``compile`` (aot_eager on the CPU): same results as eager, stacks still in place."""
    import torch._dynamo

    torch._dynamo.reset()
    stacked, _, sblk, _ = _pair(True, dtype=torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in stacked]
    opt = NorMuon([{"params": stacked, "blocks": sblk}], lr=0.02, compile="aot_eager")
    opt_r = NorMuon([{"params": ref, "blocks": sblk}], lr=0.02)
    for _ in range(2):
        for p, q in zip(stacked, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_r.step()
    for p, q in zip(stacked, ref):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert all(b.W.data_ptr() == b.stack.param.data_ptr() for b in opt._banks)
    torch._dynamo.reset()


@pytest.mark.parametrize("direct,form", [(False, "standard"), (True, "standard"), (True, "gram")])
def test_fused_bank_kernel_on_stacks_matches_torch_path(direct, form):
    """The one-kernel bank step (Triton interpreter on the CPU) on stack banks, gradients read
    as the bank's G or through the address table (``direct_grads``), vs the PyTorch path."""
    pe_triton = pytest.importorskip("vpmoe_compile.optim.pe_triton")
    if not pe_triton.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    w1, w2 = torch.randn(3, 32, 64), torch.randn(3, 64, 16)  # gate / up [16, 64]; tall fc2
    pa = [torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())]
    pb = [torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())]
    blk = [_gate_up(32), None]
    kw = dict(lr=0.02, weight_decay=0.1, pe_dtype=torch.float32)
    oa = NorMuon([{"params": pa, "blocks": blk}], pe_backend="triton", direct_grads=direct,
                 pe_form=form, **kw)
    ob = NorMuon([{"params": pb, "blocks": blk}], pe_backend="torch", **kw)
    for step in range(3):
        for a, b in zip(pa, pb):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        oa.step()
        ob.step()
    summary = oa.bank_summary()
    assert all(s["fused"] and s["stack"] is not None for s in summary)
    assert all(s["direct_grads"] == direct for s in summary)
    for a, b in zip(pa, pb):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_merged_launches_equal_one_launch_per_bank(monkeypatch):
    """``merge_launches``: the stacks of three "layers" (gated fc1, tall fc2; banks of at most 4
    members, so each fc1 stack is two banks) run as one launch per member shape and give bitwise
    the parameters and state of one launch per bank, through a step with a stack's gradient
    missing (each bank on its own), one with a strided gradient (that stack's banks gather and
    leave the group, the others stay merged), gradients that move and a ``load_state_dict``
    (the groups are formed again)."""
    pe_triton = pytest.importorskip("vpmoe_compile.optim.pe_triton")
    if not pe_triton.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    layers = 3
    w = [t for _ in range(layers) for t in (torch.randn(3, 32, 64), torch.randn(3, 64, 16))]
    blk = [_gate_up(32), None] * layers
    kw = dict(lr=0.02, weight_decay=0.1, pe_dtype=torch.float32, pe_backend="triton",
              direct_grads=True, max_bank_size=4, pe_form="gram")
    opts, params = [], []
    for merge in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in w]
        opts.append(NorMuon([{"params": ps, "blocks": blk}], merge_launches=merge, **kw))
        params.append(ps)
    summary = opts[0].bank_summary()
    assert len(summary) == 3 * layers and all(s["direct_grads"] for s in summary)
    by_shape = {}
    for s in summary:
        by_shape.setdefault(tuple(s["shape"]), set()).add(s["launch_group"])
    assert by_shape == {(16, 64): {0}, (64, 16): {1}}
    assert all(s["launch_group"] is None for s in opts[1].bank_summary())
    launches = []
    real = pe_triton.normuon_banks_fused_

    def spy(addresses, *args, **kwargs):
        launches.append(addresses.shape[1])
        return real(addresses, *args, **kwargs)

    monkeypatch.setattr(pe_triton, "normuon_banks_fused_", spy)
    # members per launch; after the checkpoint round trip every bank reads in place again
    expect = {0: [18, 9], 1: [18, 9], 2: [], 3: [12, 9], 4: [12, 9], 5: [18, 9]}
    for step in range(6):
        grads = [torch.randn_like(t) for t in w]
        if step == 2:
            grads[2] = None  # layer 1's fc1: every bank steps on its own
        if step == 3:
            grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)  # not readable in place
        if step == 5:  # a checkpoint round trip re-forms the groups
            for opt in opts:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for ps in params:
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
        launches.clear()
        for opt in opts:
            opt.step()
        assert launches == expect[step], step
        for a, b in zip(*params):
            assert torch.equal(a, b), step
        if step == 4:
            summary = opts[0].bank_summary()
            fell_back = [s for s in summary if not s["direct_grads"]]
            assert len(fell_back) == 2 and all(s["launch_group"] is None for s in fell_back)
            assert all(s["stack"]["shape"] == [3, 32, 64] for s in fell_back)
            merged = {s["launch_group"] for s in summary if s["direct_grads"]}
            assert len(merged) == 2 and None not in merged
    assert len(opts[0]._groups) == 2 and all(g.X is not None for g in opts[0]._groups)
    sa, sb = (o.state_dict()["state"] for o in opts)
    for i in sa:
        for k in ("momentum_buffer", "second_moment"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_merged_launches_leave_unaligned_banks_on_their_own():
    """Members whose size is not a multiple of 16 bytes (``[3, 17]`` fp32) cannot be read
    through the address table: their banks launch on their own (same steps as without merging),
    while the aligned stacks beside them are merged."""
    pe_triton = pytest.importorskip("vpmoe_compile.optim.pe_triton")
    if not pe_triton.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    w = [torch.randn(2, 3, 17), torch.randn(2, 3, 17), torch.randn(2, 16, 32), torch.randn(2, 16, 32)]
    kw = dict(lr=0.02, weight_decay=0.1, pe_dtype=torch.float32, pe_backend="triton", direct_grads=True)
    grads = [[torch.randn_like(t) for t in w] for _ in range(2)]
    runs = []
    for merge in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in w]
        opt = NorMuon(ps, merge_launches=merge, **kw)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append((ps, opt.bank_summary()))
    groups = {tuple(s["shape"]): s["launch_group"] for s in runs[0][1]}
    assert groups == {(3, 17): None, (16, 32): 0}
    assert all(s["direct_grads"] for s in runs[0][1] if s["shape"] == [16, 32])
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ (f)
def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def test_build_optimizer_plain_path_stacked_equals_sequential_experts():
    """The same model with SequentialMLP experts and with expert stacks (gated): the plain path
    routes the stacks as expert NorMuon params and trains both to the same parameters; NaN skip
    leaves a stack and its state untouched; the chain's state round-trips."""
    cfg = SimpleNamespace(lr=0.05, normuon_aux_lr=1e-2, normuon_aux_min_lr=1e-2)
    torch.manual_seed(0)
    seq = FakeVpMoE(gated=True)
    stk = FakeVpMoE(stacked=True, gated=True)
    copy_experts(seq, stk)
    opt_q, opt_k = build_optimizer(seq, cfg), build_optimizer(stk, cfg)
    routes = {r.name: r for r in opt_k.routes}
    fc1 = routes["decoder.layers.1.mlp.experts.linear_fc1.weight"]
    assert (fc1.optimizer, fc1.role, fc1.is_expert_parallel) == ("normuon", "expert", True)
    expert_group = [g for g in opt_k.normuon.param_groups if g["is_expert_parallel"]][0]
    assert fc1.param in expert_group["params"] and len(expert_group["params"]) == 4
    tokens = torch.randint(0, VOCAB, (4, 12))
    losses = []
    for _ in range(6):
        for model, opt in ((seq, opt_q), (stk, opt_k)):
            opt.zero_grad()
            loss = _loss(model, tokens)
            loss.backward()
            ok, norm, _ = opt.step()
            assert ok and math.isfinite(norm)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for layer_q, layer_k in zip(seq.decoder.layers[1:], stk.decoder.layers[1:]):
        for e, ex in enumerate(layer_q.mlp.experts.local_experts):
            for name in ("linear_fc1", "linear_fc2"):
                a = getattr(ex, name).weight.detach()
                b = getattr(layer_k.mlp.experts, name).weight.detach()[e]
                assert ((a - b).norm() / a.norm()).item() <= 1e-4, (e, name)
    table = {row["name"]: row for row in opt_k.routing_table()}
    row = table["decoder.layers.2.mlp.experts.linear_fc1.weight"]
    assert row["matrices"][:2] == [["e0.gate", FFN, HIDDEN], ["e0.up", FFN, HIDDEN]]
    assert len(row["matrices"]) == 2 * EXPERTS

    # NaN in a stack's gradient: the step is skipped, the stack and its state untouched
    opt_k.zero_grad()
    _loss(stk, tokens).backward()
    stk.decoder.layers[2].mlp.experts.linear_fc2.weight.grad[1, 0, 0] = float("nan")
    w = stk.decoder.layers[2].mlp.experts.linear_fc2.weight
    before_w = w.detach().clone()
    before_s = {k: v.clone() for k, v in opt_k.normuon.state[w].items()}
    ok, norm, _ = opt_k.step()
    assert ok is False and not math.isfinite(norm)
    assert torch.equal(w.detach(), before_w)
    assert all(torch.equal(opt_k.normuon.state[w][k], v) for k, v in before_s.items())

    # state round trip through the chain: the next step is identical
    saved = copy.deepcopy(opt_k.state_dict())
    stk2 = FakeVpMoE(stacked=True, gated=True)
    stk2.load_state_dict(stk.state_dict())
    opt_k2 = build_optimizer(stk2, cfg)
    opt_k2.load_state_dict(saved)
    for model, opt in ((stk, opt_k), (stk2, opt_k2)):
        opt.zero_grad()
        _loss(model, tokens).backward()
        opt.step()
    for a, b in zip(stk.parameters(), stk2.parameters()):
        assert torch.equal(a, b)
