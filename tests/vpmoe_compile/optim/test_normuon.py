"""NorMuon inner optimizer vs the literal per-matrix reference (docs/design.md#the-normuon-update;
the list of checks: docs/design.md#optimizer-tests-and-benchmark)."""

import copy
import math

import pytest
import torch

from vpmoe_compile.optim import NorMuon
from vpmoe_compile.optim.polar_express import PINNED_COEFFICIENTS
from vpmoe_compile.optim.reference import normuon_reference_update

from ._fake import D, GROUPS, HEADS, QKV_ROWS


def _random_step(opt, params):
    """Fresh random gradients on ``params``, one ``opt.step()``; returns the gradients."""
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return grads

# vpMoE matrix shapes at reduced size (out, in): expert fc1/fc2, shared, proj, router, TPA a/b.
SHAPES = [(16, 64), (64, 16), (32, 64), (64, 32), (64, 64), (24, 64), (2, 64), (4, 64)]


def _qkv_blocks(mode):
    rpg = (HEADS // GROUPS + 2) * D
    q = tuple((g * rpg, HEADS // GROUPS * D) for g in range(GROUPS))
    k = tuple((g * rpg + HEADS // GROUPS * D, D) for g in range(GROUPS))
    v = tuple((g * rpg + (HEADS // GROUPS + 1) * D, D) for g in range(GROUPS))
    if mode == "fused":
        return None
    if mode == "qkv":
        return (q, k, v)
    heads = []
    for g in range(GROUPS):
        for h in range(HEADS // GROUPS):
            heads.append(((g * rpg + h * D, D),))
        heads += [((g * rpg + HEADS // GROUPS * D, D),), ((g * rpg + (HEADS // GROUPS + 1) * D, D),)]
    return tuple(heads)


def _setup(dtype=torch.float64, qkv_mode="qkv", copies=2):
    shapes, blocks = [], []
    for s in SHAPES:
        for _ in range(copies):  # equal shapes -> one bank
            shapes.append(s)
            blocks.append(None)
    shapes.append((QKV_ROWS, 32))
    blocks.append(_qkv_blocks(qkv_mode))
    shapes.append((8 + 2 + 2 + 16 + 8 + 8, 32))  # packed TPA factors
    blocks.append((((0, 8),), ((8, 2),), ((10, 2),), ((12, 16),), ((28, 8),), ((36, 8),)))
    params = [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]
    return params, blocks


class _Ref:
    def __init__(self, params, blocks, **kw):
        self.W = [p.detach().clone() for p in params]
        self.M = [torch.zeros_like(w) for w in self.W]
        self.v = [torch.zeros(w.shape[0], 1, dtype=w.dtype) for w in self.W]
        self.blocks = blocks
        self.kw = kw

    def step(self, grads, lr, wd, skip=()):
        for i, g in enumerate(grads):
            if i in skip:
                continue
            normuon_reference_update(
                self.W[i], g, self.M[i], self.v[i], lr=lr, weight_decay=wd, blocks=self.blocks[i],
                compute_dtype=self.W[i].dtype, **self.kw,
            )


def _maxrel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("qkv_mode", ["qkv", "fused", "head"])
def test_one_step_matches_reference_fp64(qkv_mode):
    params, blocks = _setup(qkv_mode=qkv_mode)
    ref = _Ref(params, blocks)
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    ref.step(grads, 0.02, 0.1)
    for p, w in zip(params, ref.W):
        assert (p.detach() - w).abs().max().item() <= 1e-10
    # Megatron-style: grads are views of a buffer and must not be modified.
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def _fork_update(W, G, M, v, lr, wd):
    """The fork's formulas (its CPU path: fp32 PE), written independently of REF."""
    M.lerp_(G, 1 - 0.95)
    U = G.lerp(M, 0.95)
    X = U.T if U.shape[0] > U.shape[1] else U
    X = X / (X.norm() * 1.02 + 1e-6)
    for a, b, c in PINNED_COEFFICIENTS:
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    O = X.T if U.shape[0] > U.shape[1] else X
    v.lerp_(O.square().mean(dim=1, keepdim=True), 1 - 0.95)
    Oh = O / (v.sqrt() + 0.0) if False else O / torch.sqrt(v + 1e-10)
    Oh = Oh * (O.norm() / Oh.norm().clamp_min(1e-10))
    Oh = Oh * max(1, O.shape[0] / O.shape[1]) ** 0.5
    W.mul_(1 - lr * wd).add_(Oh, alpha=-lr)


def test_fork_parity_fp32():
    params, _ = _setup(dtype=torch.float32)
    params = params[:-2]  # unsplit matrices (the fork orthogonalises whole params)
    W = [p.detach().clone() for p in params]
    M = [torch.zeros_like(w) for w in W]
    v = [torch.zeros(w.shape[0], 1) for w in W]
    opt = NorMuon(params, lr=0.02, weight_decay=0.01, pe_dtype=torch.float32)
    for _ in range(3):
        grads = _random_step(opt, params)
        for i, g in enumerate(grads):
            _fork_update(W[i], g, M[i], v[i], 0.02, 0.01)
    for p, w in zip(params, W):
        assert ((p.detach() - w).norm() / w.norm()).item() <= 1e-5


# ------------------------------------------------------------------------------------ several steps
def test_multi_step_schedule_zero_grads_match_reference():
    params, blocks = _setup()
    ref = _Ref(params, blocks)
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.01, weight_decay=0.05)
    zero_expert = 1  # one member of the (16, 64) bank gets zero grads throughout
    for step in range(20):
        lr = 0.01 * (1 + math.cos(math.pi * step / 20)) / 2 + 1e-4
        wd = 0.05 if step < 10 else 0.0
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        grads = [torch.randn_like(p) for p in params]
        if step == 7:
            grads = [torch.zeros_like(p) for p in params]
        grads[zero_expert] = torch.zeros_like(params[zero_expert])
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads, lr, wd)
    sd = opt.state_dict()
    for i, p in enumerate(params):
        assert (p.detach() - ref.W[i]).abs().max().item() <= 1e-9
        assert (sd["state"][i]["momentum_buffer"] - ref.M[i]).abs().max().item() <= 1e-9
        assert (sd["state"][i]["second_moment"] - ref.v[i]).abs().max().item() <= 1e-9
    assert opt.param_groups[0]["normuon_step"] == 20


def test_multi_step_fp32_relative():
    params, blocks = _setup(dtype=torch.float32)
    ref = _Ref([p.double() for p in params], blocks)
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.01, weight_decay=0.05)
    for step in range(5):
        grads = _random_step(opt, params)
        ref.step([g.double() for g in grads], 0.01, 0.05)
    for p, w in zip(params, ref.W):
        assert _maxrel(p.detach().double(), w) <= 1e-4


def test_grad_none_is_skipped_like_the_fork():
    params, blocks = _setup()
    ref = _Ref(params, blocks)
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        skip = {0, len(params) - 1} if step == 1 else set()
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in skip else g
        opt.step()
        ref.step(grads, 0.02, 0.1, skip=skip)
    for p, w in zip(params, ref.W):
        assert (p.detach() - w).abs().max().item() <= 1e-10


# ------------------------------------------------------------------------------------ properties
def test_first_step_equal_row_rms_and_scale_invariance():
    W = torch.nn.Parameter(torch.zeros(48, 64, dtype=torch.float64))
    opt = NorMuon([W], lr=1.0)
    G = torch.randn(48, 64, dtype=torch.float64)
    W.grad = G
    opt.step()
    rms = W.detach().square().mean(dim=1).sqrt()
    assert (rms.max() / rms.min()).item() == pytest.approx(1.0, abs=1e-6)  # eps 1e-10 vs v ~ 1e-3
    # RMS(Delta) = ||O||_F / sqrt(mn) ~ 1/sqrt(n) for a wide matrix.
    assert rms.mean().item() == pytest.approx(1 / math.sqrt(64), rel=0.15)
    W2 = torch.nn.Parameter(torch.zeros(48, 64, dtype=torch.float64))
    opt2 = NorMuon([W2], lr=1.0, pe_eps=0.0)
    W3 = torch.nn.Parameter(torch.zeros(48, 64, dtype=torch.float64))
    opt3 = NorMuon([W3], lr=1.0, pe_eps=0.0)
    W2.grad, W3.grad = G, G * 1e3
    opt2.step()
    opt3.step()
    assert (W2.detach() - W3.detach()).abs().max().item() <= 1e-12


@pytest.mark.parametrize("neuron_axis,scale_mode", [("larger", "shape"), ("rows", "rms0.2")])
def test_options_match_reference(neuron_axis, scale_mode):
    shapes = [(16, 64), (16, 64), (64, 16), (32, 32)]
    params = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    W = [p.detach().clone() for p in params]
    M = [torch.zeros_like(w) for w in W]
    v = [
        torch.zeros(1, w.shape[1], dtype=w.dtype)
        if neuron_axis == "larger" and w.shape[0] < w.shape[1]
        else torch.zeros(w.shape[0], 1, dtype=w.dtype)
        for w in W
    ]
    opt = NorMuon(params, lr=0.03, weight_decay=0.1, neuron_axis=neuron_axis, scale_mode=scale_mode)
    for _ in range(3):
        grads = _random_step(opt, params)
        for i, g in enumerate(grads):
            normuon_reference_update(
                W[i], g, M[i], v[i], lr=0.03, weight_decay=0.1, neuron_axis=neuron_axis,
                scale_mode=scale_mode,
            )
    sd = opt.state_dict()
    for i, p in enumerate(params):
        assert (p.detach() - W[i]).abs().max().item() <= 1e-10
        assert sd["state"][i]["second_moment"].shape == v[i].shape
        assert (sd["state"][i]["second_moment"] - v[i]).abs().max().item() <= 1e-10
    if scale_mode == "rms0.2":  # paper rule: update RMS = 0.2 * lr
        P = torch.nn.Parameter(torch.zeros(16, 64, dtype=torch.float64))
        o = NorMuon([P], lr=1.0, scale_mode="rms0.2")
        P.grad = torch.randn(16, 64, dtype=torch.float64)
        o.step()
        assert P.detach().square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-9)


def test_rejects_non_matrices_and_bad_blocks():
    with pytest.raises(ValueError, match="2-D"):
        NorMuon([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="rows"):
        NorMuon([{"params": [torch.nn.Parameter(torch.randn(8, 4))], "blocks": [(((0, 3),),)]}])


# ------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_bitwise(dtype):
    params, blocks = _setup(dtype=dtype)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    init = [p.detach().clone() for p in params]

    def run(ps, opt, steps):
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()

    opt_a = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    run(params, opt_a, grads)

    params_b = [torch.nn.Parameter(w.clone()) for w in init]
    opt_b = NorMuon([{"params": params_b, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    run(params_b, opt_b, grads[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    params_c = [torch.nn.Parameter(p.detach().clone()) for p in params_b]
    opt_c = NorMuon([{"params": params_c, "blocks": blocks}], lr=0.5, weight_decay=0.0)
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[0]["lr"] == 0.02 and opt_c.param_groups[0]["normuon_step"] == 3
    run(params_c, opt_c, grads[3:])
    for pa, pc in zip(params, params_c):
        assert torch.equal(pa.detach(), pc.detach())
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    for i in sa["state"]:
        for k in ("momentum_buffer", "second_moment"):
            assert torch.equal(sa["state"][i][k], sc["state"][i][k])


# ------------------------------------------------------------------------------------ zero / NaN gradients
def test_zero_gradients_only_weight_decay_no_nan():
    params, blocks = _setup()
    before = [p.detach().clone() for p in params]
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        assert torch.allclose(p.detach(), b * (1 - 0.02 * 0.1), rtol=0, atol=1e-15)
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert torch.isfinite(st["momentum_buffer"]).all() and torch.isfinite(st["second_moment"]).all()


def test_nan_in_one_matrix_does_not_leak_into_its_bank():
    params = [torch.nn.Parameter(torch.randn(16, 64)) for _ in range(4)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = NorMuon(params, lr=0.02)
    ref_opt = NorMuon(ref_params, lr=0.02)
    grads = [torch.randn(16, 64) for _ in range(4)]
    for p, r, g in zip(params, ref_params, grads):
        p.grad, r.grad = g.clone(), g.clone()
    params[2].grad[3, 5] = float("nan")
    opt.step()
    ref_opt.step()
    assert torch.isnan(params[2]).all()
    for i in (0, 1, 3):
        assert torch.equal(params[i].detach(), ref_params[i].detach())


# ------------------------------------------------------------------------------------ compiled == eager (CPU part)
def test_compiled_step_matches_eager_without_recompiling():
    """The single CPU compile test: aot_eager backend (no Inductor), lr changes don't recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    shapes = [(8, 32), (8, 32), (32, 8)]
    p_c = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    p_e = [torch.nn.Parameter(p.detach().clone()) for p in p_c]
    opt_c = NorMuon(p_c, lr=0.02, weight_decay=0.1, compile="aot_eager")
    opt_e = NorMuon(p_e, lr=0.02, weight_decay=0.1, compile=False)
    for step in range(3):
        for o in (opt_c, opt_e):
            o.param_groups[0]["lr"] = 0.02 / (step + 1)
        for pc, pe in zip(p_c, p_e):
            g = torch.randn_like(pc)
            pc.grad, pe.grad = g.clone(), g.clone()
        opt_c.step()
        opt_e.step()
    for pc, pe in zip(p_c, p_e):
        assert torch.allclose(pc, pe, rtol=1e-5, atol=1e-6)
    # one graph per bank (2 banks), compiled once each; lr changes never recompile
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_table_parameters_recorded_in_state_dict():
    opt = NorMuon([torch.nn.Parameter(torch.randn(4, 8))], pe_steps=6, safety=1e-2)
    rec = opt.state_dict()["param_groups"][0]["polar_express"]
    assert rec["steps"] == 6 and rec["safety"] == 1e-2 and rec["ell"] == 1e-3
    assert len(opt.table) == 6


# ------------------------------------------------------------------------------------ CUDA-graph logic (CPU)
class _FakeGraph:
    """Stands in for a captured CUDA graph: capturing records the work without running it,
    ``replay`` runs it (as a real graph replays the recorded kernels)."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def test_cuda_graph_state_machine_on_cpu(monkeypatch):
    """Warm-up step eager, capture on the next, replay after; the gather graph only while the
    gradient addresses are stable; rebuilds drop the graphs. Same results as the eager path."""
    captured = []

    def fake_capture(self, fn):
        g = _FakeGraph(fn)
        captured.append(g)
        self._graphs.captures += 1
        return g

    monkeypatch.setattr(NorMuon, "_capture", fake_capture)
    monkeypatch.setattr(NorMuon, "_check_graph_device", lambda self: None)
    params, blocks = _setup()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1, cuda_graph=True)
    ref = NorMuon([{"params": ref_params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    static = [torch.empty_like(p) for p in params]
    for step in range(7):
        grads = [torch.randn_like(p) for p in params]
        if step == 4:
            static = [torch.empty_like(p) for p in params]  # new gradient addresses
        for s, g in zip(static, grads):
            s.copy_(g)
        for p, q, s, g in zip(params, ref_params, static, grads):
            p.grad, q.grad = s, g.clone()
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 0.02 / (step + 1)
            o.param_groups[0]["weight_decay"] = 0.0 if step == 2 else 0.1
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            assert (p.detach() - q.detach()).abs().max().item() <= 1e-12, step
        expected = {0: 0, 1: 2, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3}[step]
        assert opt.graph_captures == expected, step
    gather1, compute, gather2 = captured
    assert compute.replays == 6 and gather1.replays == 2 and gather2.replays == 1
    assert opt.param_groups[0]["normuon_step"] == 7
    opt.load_state_dict(opt.state_dict())  # banks rebuilt -> graphs dropped
    assert opt.graph_captures == 0


def test_zero_grad_set_to_none_releases_the_last_gradients():
    """The identity fast path of ``step`` keeps the last step's gradient list; after
    ``zero_grad(set_to_none=True)`` those tensors must be freed (no extra gradient copy held
    across the next backward), and later steps still match an optimizer without the cache."""
    import gc
    import weakref

    params, blocks = _setup()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    ref = NorMuon([{"params": ref_params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.clone()
        del grads, g
        refs = [weakref.ref(p.grad) for p in params]
        opt.step()
        ref.step()
        if step == 1:  # same gradient objects again: the fast path
            opt.step()
            ref._dense_grads = None  # the reference takes the full check
            ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs), step
        for p, q in zip(params, ref_params):
            assert torch.equal(p.detach(), q.detach()), step


def test_megatron_fp16_wrapper_zero_grad_frees_copied_grads_keeps_buffers():
    """``NorMuonFloat16Optimizer.zero_grad``: per-step fp32 copies of bf16 ``main_grad`` must not
    stay alive in NorMuon's identity fast path; the model's own fp32 ``main_grad`` buffers may."""
    import weakref

    pytest.importorskip("megatron.core")
    from vpmoe_compile.optim.megatron_wrappers import NorMuonFloat16Optimizer

    def wrapper(main_grad_dtype):
        model_p = torch.nn.Parameter(torch.randn(8, 16).bfloat16())
        model_p.main_grad = torch.randn(8, 16, dtype=main_grad_dtype)
        main_p = torch.nn.Parameter(model_p.detach().float())
        opt = NorMuon([main_p], lr=0.01)
        w = object.__new__(NorMuonFloat16Optimizer)  # only zero_grad's attributes are needed
        w.optimizer, w.is_stub_optimizer = opt, False
        w.float16_groups, w.fp32_from_float16_groups, w.fp32_from_fp32_groups = [[model_p]], [[main_p]], []
        main_p.grad = model_p.main_grad.float()  # what Megatron's wrapper does before the step
        opt.step()
        return w, opt, main_p

    w, opt, main_p = wrapper(torch.bfloat16)
    ref = weakref.ref(main_p.grad)
    w.zero_grad(set_to_none=True)
    assert main_p.grad is None and ref() is None and opt._dense_grads is None

    w, opt, main_p = wrapper(torch.float32)  # grad is the buffer itself: keep the fast path
    w.zero_grad(set_to_none=True)
    assert opt._dense_grads is not None and opt._dense_grads[0] is w.float16_groups[0][0].main_grad
