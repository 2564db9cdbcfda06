"""Fused Polar Express kernel (``vpmoe_compile.optim.pe_triton``): CPU under ``TRITON_INTERPRET=1``
in fp32 (set by ``tests/conftest.py``), bf16 / fp32 on a GPU."""

import pytest
import torch

from vpmoe_compile.optim import NorMuon
from vpmoe_compile.optim.polar_express import (
    PINNED_COEFFICIENTS,
    _pe_batched,
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
    "fused_bank,scale_mode,neuron_axis",
    [(True, "shape", "rows"), _cpu_only(False, "shape", "rows"), _cpu_only(True, "rms0.2", "larger")],
)
def test_normuon_fused_backend_matches_torch_backend(fused_bank, scale_mode, neuron_axis):
    """Whole NorMuon steps through the fused kernels (the one-kernel bank step, or prologue +
    fused PE + epilogue) vs the PyTorch backend, fp32: wide, tall (per-column statistics of the
    oriented matrix), odd row counts, split rows, a zero-gradient member, a ``None`` gradient."""
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
                 direct_grads=True, **kw)
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
