"""Fused Polar Express kernel (``vpmoe_compile.optim.pe_triton``): CPU under ``TRITON_INTERPRET=1``
in fp32 (set by ``tests/conftest.py``), bf16 / fp32 on a GPU."""

import pytest
import torch

from vpmoe_compile.optim import NorMuon
from vpmoe_compile.optim.polar_express import (
    PINNED_COEFFICIENTS,
    _pe_batched,
    _pe_gram_polynomial,
    polar_express_reference,
)

pe_triton = pytest.importorskip("vpmoe_compile.optim.pe_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    DEVICE == "cpu" and not pe_triton.interpreter_active(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
pytestmark = needs_kernel


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Under the interpreter every case is cheap; on a GPU each one is a Triton compile: keep one.
_ON_GPU = DEVICE == "cuda"


def _cpu_only(*values):
    return pytest.param(*values, marks=pytest.mark.skipif(_ON_GPU, reason="interpreter case"))


@pytest.mark.parametrize("N,S,L", [_cpu_only(3, 16, 64), _cpu_only(2, 5, 48), (2, 32, 96)])
def test_fused_equals_torch_path_fp32_and_stats(N, S, L):
    U = torch.randn(N, S, L, device=DEVICE)
    U[1] *= 1e3  # each matrix has its own normalisation
    norm2 = U.square().sum((-2, -1))
    ref = _pe_batched(U, PINNED_COEFFICIENTS, 0.02, 1e-6, torch.float32)
    for stat, column_major in ((0, False), (1, False), (2, False), (1, True), (2, True)):
        X = U.mT.contiguous().mT if column_major else U.clone()
        r = pe_triton.polar_express_fused_(
            X, norm2, PINNED_COEFFICIENTS, 0.02, 1e-6, stat=stat, block_l=32, ieee=True
        )
        assert _rel(X, ref) <= 1e-5
        if stat == 1:
            assert r.shape == (N, S) and _rel(r, ref.square().sum(-1)) <= 1e-5
        elif stat == 2:
            assert r.shape == (N, L) and _rel(r, ref.square().sum(-2)) <= 1e-5
        else:
            assert r is None


@pytest.mark.parametrize("steps", [5, 2, 1])  # restart after step 2; none (2 or 1 steps)
@pytest.mark.parametrize("N,S,L", [_cpu_only(3, 16, 64), _cpu_only(2, 5, 48), (2, 32, 96)])
def test_gram_form_equals_its_reference_fp32_and_stats(N, S, L, steps):
    """``form="gram"``: the fused kernel vs :func:`_pe_gram_polynomial` (its statement in
    PyTorch) and vs the fp64 standard-form reference, fp32 (IEEE products), both orientations."""
    table = PINNED_COEFFICIENTS[:steps]
    U = torch.randn(N, S, L, device=DEVICE)
    U[1] *= 1e3
    norm2 = U.square().sum((-2, -1))
    X0 = U / (1.02 * norm2.sqrt()[:, None, None] + 1e-6)
    ref = _pe_gram_polynomial(X0, table, torch.float32)
    ref64 = torch.stack([polar_express_reference(U[i].cpu(), table) for i in range(N)])
    for stat, column_major in ((0, False), (1, False), (2, True)):
        X = U.mT.contiguous().mT if column_major else U.clone()
        r = pe_triton.polar_express_fused_(
            X, norm2, table, 0.02, 1e-6, stat=stat, block_l=32, ieee=True, form="gram"
        )
        assert _rel(X, ref) <= 2e-5
        assert _rel(X.cpu(), ref64) <= 2e-5
        if stat:
            assert _rel(r, ref.square().sum(-1 if stat == 1 else -2)) <= 2e-5


def test_fused_rejects_unknown_form():
    X = torch.randn(1, 16, 64, device=DEVICE)
    with pytest.raises(ValueError, match="form must be one of"):
        pe_triton.polar_express_fused_(X, X.square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02,
                                       1e-6, form="newton")
    with pytest.raises(ValueError, match="pe_form must be one of"):
        NorMuon([torch.nn.Parameter(X[0])], pe_form="newton")


def test_fused_zero_and_nan_matrices_stay_local():
    U = torch.randn(3, 16, 64, device=DEVICE)
    U[0] = 0.0
    U[2, 3, 5] = float("nan")
    X = U.clone()
    pe_triton.polar_express_fused_(
        X, U.square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02, 1e-6, ieee=True
    )
    assert torch.equal(X[0], torch.zeros_like(X[0]))  # G = 0 -> O = 0 (eps_pe)
    assert torch.isfinite(X[1]).all() and torch.isnan(X[2]).all()


def test_fused_rejects_bad_inputs():
    X = torch.randn(2, 16, 64, device=DEVICE)
    n2 = X.square().sum((-2, -1))
    with pytest.raises(ValueError, match="densely"):
        pe_triton.polar_express_fused_(X[:, :, ::2], n2, PINNED_COEFFICIENTS, 0.02, 1e-6)
    with pytest.raises(ValueError, match="s <= min"):
        big = torch.randn(1, 200, 256, device=DEVICE)
        pe_triton.polar_express_fused_(big, big.square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02, 1e-6)


@pytest.mark.parametrize(
    "fused_bank,scale_mode,neuron_axis,form",
    [(True, "shape", "rows", "standard"), _cpu_only(False, "shape", "rows", "standard"),
     _cpu_only(True, "rms0.2", "larger", "standard"), (True, "shape", "rows", "gram"),
     _cpu_only(False, "rms0.2", "larger", "gram")],
)
def test_normuon_fused_backend_matches_torch_backend(fused_bank, scale_mode, neuron_axis, form):
    """Whole NorMuon steps through the fused kernels (the one-kernel bank step, or prologue +
    fused PE + epilogue; standard or Gram form) vs the PyTorch backend, fp32: wide, tall
    (per-column statistics of the oriented matrix), odd row counts, split rows, a zero-gradient
    member, a ``None`` gradient."""
    shapes = [(16, 64), (16, 64), (64, 16), (64, 16), (5, 40), (24, 64)]
    blocks = [None] * 5 + [(((0, 8),), ((8, 16),))]
    if neuron_axis == "larger":
        blocks[-1] = None
    dt = torch.float32
    pa = [torch.nn.Parameter(torch.randn(*s, device=DEVICE, dtype=dt)) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    kw = dict(lr=0.02, weight_decay=0.1, pe_dtype=torch.float32, scale_mode=scale_mode,
              neuron_axis=neuron_axis)
    oa = NorMuon([{"params": pa, "blocks": blocks}], pe_backend="triton", fused_bank=fused_bank,
                 direct_grads=True, pe_form=form, **kw)
    ob = NorMuon([{"params": pb, "blocks": blocks}], pe_backend="torch", **kw)
    for step in range(4):
        for i, (a, b) in enumerate(zip(pa, pb)):
            g = torch.randn_like(a)
            if i == 1 and step == 1:
                g.zero_()
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            pa[3].grad = pb[3].grad = None
        oa.param_groups[0]["lr"] = ob.param_groups[0]["lr"] = 0.02 / (step + 1)
        oa.step()
        ob.step()
    assert all(b["fused"] for b in oa.bank_summary())
    assert not any(b["fused"] for b in ob.bank_summary())
    # whole re-homed members of the one-kernel path read their gradients in place
    assert any(b["direct_grads"] for b in oa.bank_summary()) == fused_bank
    for a, b in zip(pa, pb):
        assert _rel(a.detach(), b.detach()) <= 1e-5  # fp32 (no tf32 on the GPU: ieee)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for i in sa:
        for k in ("momentum_buffer", "second_moment"):
            assert _rel(sa[i][k], sb[i][k]) <= 1e-4, (i, k)


def test_direct_gradients_follow_new_tensors_and_fall_back_when_strided():
    """The address table follows gradients that move; non-contiguous gradients make the bank
    gather again (same results as the PyTorch backend throughout)."""
    shapes = [(16, 64), (16, 64), (64, 16)]
    kw = dict(lr=0.02, weight_decay=0.1, pe_dtype=torch.float32)
    pa = [torch.nn.Parameter(torch.randn(*s, device=DEVICE)) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa = NorMuon(pa, pe_backend="triton", direct_grads=True, **kw)
    ob = NorMuon(pb, pe_backend="torch", **kw)
    for step in range(3):
        for a, b in zip(pa, pb):
            g = torch.randn_like(a)
            if step == 2:  # column-major gradients: not readable in place
                g = g.mT.contiguous().mT
            a.grad, b.grad = g, g.clone()
        oa.step()
        ob.step()
        assert all(b["direct_grads"] for b in oa.bank_summary()) == (step < 2)
        for a, b in zip(pa, pb):
            assert _rel(a.detach(), b.detach()) <= 1e-5, step


@pytest.mark.parametrize("form", ["standard", "gram"])
def test_bank_kernel_l2_hints_change_no_result(form):
    """The L2 eviction priorities (``l2_hints``) are cache placement only: the bank kernel's
    parameters, momentum and second moment are bitwise the same with and without them (wide
    and tall members, both statistics orientations)."""
    hyper = {k: torch.tensor(v, device=DEVICE) for k, v in
             dict(momentum=0.95, lr=0.01, decay=0.999, beta2=0.95, eps=1e-10).items()}
    dt = torch.bfloat16 if _ON_GPU else torch.float32
    for flip, stat_dim in ((False, -1), (True, -2), (False, -2)):
        shape = (3, 128, 32) if flip else (3, 32, 128)
        G = torch.randn(shape, device=DEVICE)
        M0 = torch.randn(shape, device=DEVICE) * 1e-3
        W0 = torch.randn(shape, device=DEVICE) * 0.02
        V0 = torch.rand(3, 32 if stat_dim == -1 else 128, device=DEVICE)
        out = []
        for hints in (False, True):
            M, W, V = M0.clone(), W0.clone(), V0.clone()
            X = torch.empty(shape, device=DEVICE, dtype=dt)
            pe_triton.normuon_bank_fused_(G, M, V, W, X, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6,
                                          flip, stat_dim, "shape", 1.0, 0.0, form=form,
                                          l2_hints=hints)
            out.append((W, M, V))
        for a, b, before in zip(*out, (W0, M0, V0)):
            assert torch.isfinite(a).all() and not torch.equal(a, before)
            assert torch.equal(a, b), (flip, stat_dim)


def test_bank_kernel_workspace_and_restart_store_change_no_result():
    """Where the bank kernel keeps its bf16 workspace changes no result: the per-SM workspace
    (GPU; ``sm_workspace``, reused by every member an SM runs) and the restart that stores
    nothing (``keep_x0``: the later sweeps form ``round(Q X)`` again) give bitwise the same
    parameters, momentum and second moment as one workspace matrix per member (wide and tall
    members, both statistics orientations). On the CPU a per-SM workspace is refused."""
    hyper = {k: torch.tensor(v, device=DEVICE) for k, v in
             dict(momentum=0.95, lr=0.01, decay=0.999, beta2=0.95, eps=1e-10).items()}
    dt = torch.bfloat16 if _ON_GPU else torch.float32
    for flip, stat_dim in ((False, -1), (True, -2), (False, -2)):
        N = 5
        shape = (N, 128, 32) if flip else (N, 32, 128)
        G = torch.randn(shape, device=DEVICE)
        M0 = torch.randn(shape, device=DEVICE) * 1e-3
        W0 = torch.randn(shape, device=DEVICE) * 0.02
        V0 = torch.rand(N, 32 if stat_dim == -1 else 128, device=DEVICE)
        runs = [("member", False), ("member", True)] + ([("slot", False), ("slot", True)] if _ON_GPU else [])
        out = []
        for where, keep in runs:
            M, W, V = M0.clone(), W0.clone(), V0.clone()
            X = (pe_triton.sm_workspace(shape[1:], dt, DEVICE) if where == "slot"
                 else torch.empty(shape, device=DEVICE, dtype=dt))
            pe_triton.normuon_bank_fused_(G, M, V, W, X, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6,
                                          flip, stat_dim, "shape", 1.0, 0.0, form="gram", keep_x0=keep,
                                          x_per_sm=where == "slot")
            out.append((W, M, V))
        for run, res in zip(runs[1:], out[1:]):
            for a, b, before in zip(res, out[0], (W0, M0, V0)):
                assert torch.isfinite(a).all() and not torch.equal(a, before)
                assert torch.equal(a, b), (flip, stat_dim, run)
    if not _ON_GPU:
        with pytest.raises(ValueError, match=r"per-SM workspace \(x_per_sm=True\) needs the GPU"):
            pe_triton.normuon_bank_fused_(G[:3], M0[:3], V0[:3], W0[:3], torch.empty(8, 32, 128), hyper,
                                          PINNED_COEFFICIENTS, 0.02, 1e-6, False, -2, "shape", 1.0, 0.0,
                                          form="gram", x_per_sm=True)
        with pytest.raises(ValueError, match=r"X must be a contiguous \[N, 32, 128\] tensor"):
            pe_triton.normuon_bank_fused_(G[:3], M0[:3], V0[:3], W0[:3], torch.empty(8, 32, 128), hyper,
                                          PINNED_COEFFICIENTS, 0.02, 1e-6, False, -2, "shape", 1.0, 0.0,
                                          form="gram")


@pytest.mark.parametrize("form", ["standard", "gram"])
def test_banks_in_one_launch_equal_one_launch_per_bank(form):
    """``normuon_banks_fused_``: the members of three banks (separate tensors, different sizes)
    run in one launch through the ``[4, N]`` address table give bitwise the parameters, momentum
    and second moment of one ``normuon_bank_fused_`` launch per bank (wide and tall members,
    both statistics orientations; on the GPU also with a per-SM workspace)."""
    hyper = {k: torch.tensor(v, device=DEVICE) for k, v in
             dict(momentum=0.9, lr=0.02, decay=0.99, beta2=0.9, eps=1e-10).items()}
    dt = torch.bfloat16 if _ON_GPU else torch.float32
    sizes = (2, 3, 1)
    for flip, stat_dim in ((False, -1), (True, -2), (False, -2)):
        mn = (128, 32) if flip else (32, 128)
        v_len = 32 if stat_dim == -1 else 128
        banks = [dict(G=torch.randn(N, *mn, device=DEVICE), M=torch.randn(N, *mn, device=DEVICE) * 1e-3,
                      W=torch.randn(N, *mn, device=DEVICE) * 0.02, V=torch.rand(N, v_len, device=DEVICE))
                 for N in sizes]
        args = (hyper, PINNED_COEFFICIENTS, 0.02, 1e-6, flip, stat_dim, "shape", 1.3, 0.0)
        ref = []
        for b in banks:
            M, W, V = b["M"].clone(), b["W"].clone(), b["V"].clone()
            X = torch.empty(b["G"].shape, device=DEVICE, dtype=dt)
            pe_triton.normuon_bank_fused_(b["G"], M, V, W, X, *args, form=form)
            ref.append((W, M, V))
        runs = ["member"] + (["slot"] if _ON_GPU else [])
        for where in runs:
            state = [(b["W"].clone(), b["M"].clone(), b["V"].clone()) for b in banks]
            table = torch.cat([pe_triton.member_addresses(b["G"], M, V, W)
                               for b, (W, M, V) in zip(banks, state)], dim=1).to(DEVICE)
            X = (pe_triton.sm_workspace(mn, dt, DEVICE) if where == "slot"
                 else torch.empty(sum(sizes), *mn, device=DEVICE, dtype=dt))
            pe_triton.normuon_banks_fused_(table, mn, X, *args, form=form, x_per_sm=where == "slot")
            for r, got, b in zip(ref, state, banks):
                for a, e, before in zip(got, r, (b["W"], b["M"], b["V"])):
                    assert not torch.equal(a, before)
                    assert torch.equal(a, e), (flip, stat_dim, where)


def test_banks_in_one_launch_reject_bad_tables():
    """``member_addresses`` / ``normuon_banks_fused_`` say what is wrong with their input."""
    hyper = {k: torch.tensor(v, device=DEVICE) for k, v in
             dict(momentum=0.9, lr=0.02, decay=0.99, beta2=0.9, eps=1e-10).items()}
    G, M, W = (torch.randn(2, 32, 128, device=DEVICE) for _ in range(3))
    V = torch.rand(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"W must be a contiguous fp32 \(2, 32, 128\) tensor"):
        pe_triton.member_addresses(G, M, V, W.mT.contiguous().mT[:1])
    with pytest.raises(ValueError, match="M's members must be 16-byte aligned"):
        odd = torch.randn(2 * 32 * 127 + 1, device=DEVICE)[1:].view(2, 32, 127)
        even = torch.randn(2, 32, 127, device=DEVICE)
        pe_triton.member_addresses(even, odd, V, even)
    with pytest.raises(ValueError, match=r"V must be a contiguous fp32 \[2, \.\.\.\] tensor"):
        pe_triton.member_addresses(G, M, V[:1], W)
    empty = torch.empty(0, 32, 128, device=DEVICE)
    assert pe_triton.member_addresses(empty, empty, V[:0], empty).shape == (4, 0)
    table = pe_triton.member_addresses(G, M, V, W).to(DEVICE)
    X = torch.empty(2, 32, 128, device=DEVICE)
    args = (hyper, PINNED_COEFFICIENTS, 0.02, 1e-6)
    with pytest.raises(ValueError, match=r"flip must be False for members of shape \(32, 128\)"):
        pe_triton.normuon_banks_fused_(table, (32, 128), X, *args, True, -1, "shape", 1.0, 0.0)
    with pytest.raises(ValueError, match=r"addresses must be a contiguous int64 \[4, N\] tensor"):
        pe_triton.normuon_banks_fused_(table[:3], (32, 128), X, *args, False, -1, "shape", 1.0, 0.0)
    with pytest.raises(ValueError, match=r"X must be a contiguous \[N, 32, 128\] tensor"):
        pe_triton.normuon_banks_fused_(table, (32, 128), X[:1], *args, False, -1, "shape", 1.0, 0.0)


def test_gram_f16_state_is_as_accurate_as_tf32_products():
    """``gram_f16``: the Gram-space state ``A``, ``P``, ``Q`` held in fp16 (each product
    accumulated in fp32, rounded once) keeps TF32's 10-bit significand: on fp32 input (the
    interpreter; the GPU runs it the same way with an explicit flag) its error against the fp64
    reference is within 2x that of the Gram form's PyTorch statement with TF32-rounded products
    (``product_bits=10``), on Gaussian and rank-1-spike matrices, wide and tall."""
    for kind in ("gauss", "spike"):
        for tall in (False, True):
            U = _conditioned(kind, 3, 32, 160, "cpu")
            X0 = U / (1.02 * U.flatten(1).norm(dim=1)[:, None, None] + 1e-6)
            model = _pe_gram_polynomial(X0, PINNED_COEFFICIENTS, torch.float32, product_bits=10)
            X = U.to(DEVICE).contiguous()
            if tall:  # the column-major oriented view of tall members
                X = X.mT.contiguous().mT
            pe_triton.polar_express_fused_(X, U.to(DEVICE).square().sum((-2, -1)), PINNED_COEFFICIENTS,
                                           0.02, 1e-6, form="gram", gram_f16=True)
            for i in range(3):
                ref = polar_express_reference(U[i].double())
                e_f16, e_model = _rel(X[i].float().cpu(), ref), _rel(model[i], ref)
                assert e_f16 <= 2 * e_model, (kind, tall, i, e_f16, e_model)


def test_stream_split_keeps_banks_that_fill_the_gpu_on_the_callers_stream(monkeypatch):
    """``overlap_banks``: the one-kernel bank steps with at least one member per SM stay on the
    caller's stream and every other bank (smaller fused banks, PyTorch banks) goes to the second
    stream; nothing is split when ``overlap_banks`` is off, when no bank fills the GPU or when
    the parameters are not on CUDA."""
    from types import SimpleNamespace

    shapes = [(16, 64)] * 4 + [(64, 16)] * 2 + [(5, 40), (160, 160)]
    params = [torch.nn.Parameter(torch.randn(*s, device=DEVICE)) for s in shapes]

    def split(sms, **kw):
        opt = NorMuon(params, pe_backend="triton", pe_dtype=torch.float32, **kw)
        if DEVICE == "cpu":
            assert opt.stream_split() == (opt._banks, [])  # CPU parameters: nothing to overlap
            opt._all_cuda = True
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(multi_processor_count=sms))
        main, side = opt.stream_split()
        monkeypatch.undo()
        return [b.shape for b in main], [b.shape for b in side], [b.shape for b in opt._banks]

    main, side, banks = split(4)
    assert main == [(16, 64)] and sorted(side) == sorted([(64, 16), (5, 40), (160, 160)])
    main, side, banks = split(2)  # the two tall members fill a 2-SM device too
    assert sorted(main) == [(16, 64), (64, 16)] and sorted(side) == [(5, 40), (160, 160)]
    for sms, kw in ((5, {}), (4, dict(overlap_banks=False)), (4, dict(fused_bank=False))):
        main, side, banks = split(sms, **kw)
        assert (main, side) == (banks, []), (sms, kw)


def test_stream_split_takes_a_launch_group_as_one_step(monkeypatch):
    """With ``merge_launches`` the banks of one launch group stay on the caller's stream when
    the group has at least one member per SM, though each bank alone has fewer (two expert
    stacks of 3 members on a 4-SM device); without merging both go to the second stream."""
    from types import SimpleNamespace

    params = [torch.nn.Parameter(torch.randn(3, 16, 64, device=DEVICE)) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.randn(5, 40, device=DEVICE)))
    for merge in (True, False):
        opt = NorMuon(params, pe_backend="triton", pe_dtype=torch.float32, direct_grads=True,
                      merge_launches=merge)
        opt._ensure_banks()
        opt._all_cuda = True
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(multi_processor_count=4))
        main, side = opt.stream_split()
        monkeypatch.undo()
        if merge:
            assert [b.size for b in main] == [3, 3] and [b.shape for b in side] == [(5, 40)]
            assert main[0].launch is main[1].launch is not None
        else:  # no bank fills the device: nothing to overlap
            assert (main, side) == (opt._banks, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel needs CUDA")
@pytest.mark.parametrize("shape", [(4, 1024), (32, 1024), (128, 1024), (1024, 128), (96, 512)])
def test_fused_bf16_within_t3_bounds(shape):
    """The accuracy bound on the GPU (docs/design.md#polar-express): bf16 fused PE vs the fp64 reference <= 0.04 (min(m, n) >= 32) / 0.08 below, and
    within bf16 noise of the PyTorch bf16 path."""
    N = 6
    G = torch.randn(N, *shape, device="cuda")
    flip = shape[0] > shape[1]
    U = G.mT if flip else G
    X = U.to(torch.bfloat16).contiguous()
    pe_triton.polar_express_fused_(X, U.float().square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02, 1e-6)
    torch_path = _pe_batched(U, PINNED_COEFFICIENTS, 0.02, 1e-6, torch.bfloat16)
    bound = 0.04 if min(shape) >= 32 else 0.08
    for i in range(N):
        ref = polar_express_reference(U[i].double().cpu())
        assert _rel(X[i].float().cpu(), ref) <= bound
        assert _rel(X[i].float(), torch_path[i].float()) <= 0.03


def _conditioned(kind, N, s, L, device):
    """Test matrices ``[N, s, L]``: Gaussian (well conditioned), geometric singular-value decay
    (``decay0.9``: sigma_i = 0.9^i), a rank-1 spike over small noise, rows scaled over 1e4."""
    g = torch.Generator(device="cpu").manual_seed(7)
    if kind == "gauss":
        U = torch.randn(N, s, L, generator=g)
    elif kind.startswith("decay"):
        u, _ = torch.linalg.qr(torch.randn(N, s, s, generator=g))
        v, _ = torch.linalg.qr(torch.randn(N, L, s, generator=g))
        sv = float(kind[5:]) ** torch.arange(s, dtype=torch.float32)
        U = u @ torch.diag_embed(sv.expand(N, s)) @ v.mT
    elif kind == "spike":
        U = torch.randn(N, s, L, generator=g) * 0.01 + torch.randn(N, s, 1, generator=g) @ torch.randn(
            N, 1, L, generator=g)
    else:
        U = torch.randn(N, s, L, generator=g) * torch.logspace(0, -4, s)[None, :, None]
    return U.to(device)


KINDS = ["gauss", "decay0.9", "decay0.98", "spike", "rows"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [None, 10])
def test_gram_form_bf16_statement_within_2x_standard_error(kind, bits):
    """The Gram form's rounding points in bf16 (:func:`_pe_gram_polynomial`, fp32 Gram-space
    products, or with TF32-rounded operands: ``bits = 10``) vs the fp64 reference, on well and ill
    conditioned matrices: within 2x the error of the standard bf16 form (the PyTorch path) and
    within the 4 % bound where that path is."""
    U = _conditioned(kind, 3, 64, 256, "cpu")
    ref = torch.stack([polar_express_reference(u) for u in U])
    X0 = U / (1.02 * U.flatten(1).norm(dim=1)[:, None, None] + 1e-6)
    std = _pe_batched(U, PINNED_COEFFICIENTS, 0.02, 1e-6, torch.bfloat16)
    gram = _pe_gram_polynomial(X0, PINNED_COEFFICIENTS, torch.bfloat16, product_bits=bits)
    for i in range(3):
        e_std, e_gram = _rel(std[i].float(), ref[i]), _rel(gram[i].float(), ref[i])
        assert e_gram <= 2 * e_std, (kind, i, e_gram, e_std)
        if e_std <= 0.04:
            assert e_gram <= 0.04


def test_gram_form_needs_its_restart():
    """Why the Gram form restarts: with TF32-rounded Gram-space products and no restart, a rank-1
    spike over noise loses the small singular directions (relative error > 1 against the fp64
    reference); with the restart after two steps it is within 2x the standard bf16 form."""
    U = _conditioned("spike", 2, 128, 1024, "cpu")
    ref = torch.stack([polar_express_reference(u) for u in U])
    X0 = U / (1.02 * U.flatten(1).norm(dim=1)[:, None, None] + 1e-6)
    std = _pe_batched(U, PINNED_COEFFICIENTS, 0.02, 1e-6, torch.bfloat16)
    plain = _pe_gram_polynomial(X0, PINNED_COEFFICIENTS, torch.bfloat16, restart=0, product_bits=10)
    restarted = _pe_gram_polynomial(X0, PINNED_COEFFICIENTS, torch.bfloat16, product_bits=10)
    for i in range(2):
        assert _rel(plain[i].float(), ref[i]) > 1.0
        assert _rel(restarted[i].float(), ref[i]) <= 2 * _rel(std[i].float(), ref[i])


def test_round_mantissa_is_tf32_rounding():
    from vpmoe_compile.optim.polar_express import _round_mantissa

    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-12, -(1.0 + 3 * 2**-11), 3.0, 0.0])
    assert torch.equal(_round_mantissa(x, 10), torch.tensor([1.0 + 2**-10, 1.0, -(1.0 + 2**-9), 3.0, 0.0]))
    assert _round_mantissa(x, None) is x


def test_gram_form_fp64_equals_standard_form():
    U = torch.randn(2, 24, 80, dtype=torch.float64)
    X0 = U / (1.02 * U.flatten(1).norm(dim=1)[:, None, None] + 1e-6)
    ref = torch.stack([polar_express_reference(u) for u in U])
    for restart in (0, 1, 2, 4):
        assert _rel(_pe_gram_polynomial(X0, PINNED_COEFFICIENTS, torch.float64, restart), ref) <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(128, 1024), (1024, 128), (64, 512)])
def test_gram_form_bf16_kernels_within_2x_standard_error(kind, shape):
    """The bf16 kernels' Gram form (TF32 Gram-space products) on the GPU vs the fp64 reference:
    within 2x the error of the standard bf16 PyTorch path on every matrix family, within the 4 %
    bound where that path is; the one-kernel bank step's Polar Express output likewise."""
    N = 4
    s, L = min(shape), max(shape)
    U = _conditioned(kind, N, s, L, "cuda")
    X = U.to(torch.bfloat16).contiguous()
    if shape[0] > shape[1]:  # tall members: the column-major oriented view
        X = X.mT.contiguous().mT
    pe_triton.polar_express_fused_(X, U.square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02, 1e-6,
                                   form="gram")
    std = _pe_batched(U, PINNED_COEFFICIENTS, 0.02, 1e-6, torch.bfloat16)
    for i in range(N):
        ref = polar_express_reference(U[i].double().cpu())
        e_std, e_gram = _rel(std[i].float().cpu(), ref), _rel(X[i].float().cpu(), ref)
        assert e_gram <= 2 * e_std, (kind, i, e_gram, e_std)
        if e_std <= 0.04:
            assert e_gram <= 0.04


def test_config_pe_form_choices_are_the_optimizers():
    """``[optimizer] pe_form`` offers exactly the optimizer's forms, with NorMuon's default, and
    reaches NorMuon through the config's constructor arguments."""
    import dataclasses
    import inspect
    import types

    from megatron_base.config import OptimizerSection
    from vpmoe_compile.optim.param_groups import normuon_kwargs, optimizer_settings
    from vpmoe_compile.optim.polar_express import PE_FORMS

    field = {f.name: f for f in dataclasses.fields(OptimizerSection)}["pe_form"]
    assert set(field.metadata["choices"]) == set(PE_FORMS)
    assert field.default == inspect.signature(NorMuon).parameters["pe_form"].default == PE_FORMS[0]
    section = types.SimpleNamespace(pe_form="standard")
    assert normuon_kwargs(optimizer_settings(section))["pe_form"] == "standard"
