"""Polar Express (docs/design.md#polar-express): coefficient generator, orthogonality band,
batched == per-matrix and the bf16 accuracy bound."""


import numpy as np
import pytest
import torch

from vpmoe_compile.optim import (
    PINNED_COEFFICIENTS,
    polar_express,
    polar_express_bounds,
    polar_express_coefficients,
)
from vpmoe_compile.optim.polar_express import polar_express_reference


def _rel(a, b):
    return (torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double())).item()


# ------------------------------------------------------------------------------------ generator
def test_generator_reproduces_published_table():
    table = polar_express_coefficients(steps=5, safety=2e-2)
    assert len(table) == 5
    diff = max(abs(x - y) for r, p in zip(table, PINNED_COEFFICIENTS) for x, y in zip(r, p))
    assert diff <= 1e-12


def test_interval_bounds_sequence():
    ls = polar_express_bounds()
    expected = [1e-3, 0.0081565, 0.032975, 0.12823, 0.41635, 0.858873]
    for got, want in zip(ls, expected):
        assert got == pytest.approx(want, rel=2e-4)


def test_composite_polynomial_stays_in_band():
    x = np.linspace(1e-3, 1.0, 100_000)
    for a, b, c in PINNED_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    assert x.min() >= 0.85887 and x.max() <= 1.14113


def test_longer_tables_share_prefix_and_other_safety():
    t5 = polar_express_coefficients(steps=5)
    t8 = polar_express_coefficients(steps=8)
    for r5, r8 in zip(t5[:4], t8[:4]):
        assert r5 == pytest.approx(r8, rel=1e-12)
    assert t5[4] != pytest.approx(t8[4])  # the last triple carries no safety factor
    t_other = polar_express_coefficients(steps=5, safety=1e-2)
    assert t_other[0] != pytest.approx(t5[0])


# ------------------------------------------------------------------------------------ band
def _conditioned(m, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, s, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64))
    sigma = torch.ones(s, dtype=torch.float64)
    rest = torch.logspace(-3, -1.5, max(s - 1, 1), dtype=torch.float64)[: s - 1]
    scale = 1.0
    for _ in range(20):  # normalised sigma_min = 1.05e-3 after the (1 + sf) ||.||_F division
        sigma[1:] = rest * scale
        norm = 1.02 * torch.linalg.norm(sigma)
        scale = scale * 1.05e-3 / (sigma[1:].min() / norm).item() if s > 1 else 1.0
    sigma[1:] = rest * scale
    assert (sigma / (1.02 * torch.linalg.norm(sigma))).min() >= 1e-3
    return ((U * sigma) @ V.T).to(dtype)


@pytest.mark.parametrize(
    "shape",
    [(4, 1024), (32, 1024), (128, 1024), (1024, 128), (256, 1024), (512, 1024), (1024, 1024),
     (1536, 1024), (64, 64)],
)
def test_singular_values_in_guaranteed_band(shape):
    dtype = torch.float32 if max(shape) >= 512 else torch.float64
    G = _conditioned(*shape, dtype, seed=sum(shape))
    O = polar_express(G, compute_dtype=dtype)
    assert O.shape == G.shape and O.dtype == dtype
    sv = torch.linalg.svdvals(O.double())
    assert sv.min().item() >= 0.855 and sv.max().item() <= 1.145


def test_gaussian_nonsquare_in_band_and_square_finite():
    G = torch.randn(96, 512, dtype=torch.float64)
    sv = torch.linalg.svdvals(polar_express(G, compute_dtype=torch.float64))
    assert sv.min() >= 0.855 and sv.max() <= 1.145
    O = polar_express(torch.randn(128, 128), compute_dtype=torch.float32)
    assert torch.isfinite(O).all()


# ------------------------------------------------------------------------------------ batched == reference
@pytest.mark.parametrize("shape", [(6, 3, 40), (5, 40, 3), (4, 16, 16), (3, 24, 64)])
def test_batched_equals_per_matrix_reference(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    ref = torch.stack([polar_express_reference(g) for g in G])
    out64 = polar_express(G, compute_dtype=torch.float64)
    assert _rel(out64, ref) <= 1e-12
    out32 = polar_express(G.float(), compute_dtype=torch.float32)
    assert _rel(out32, ref) <= 1e-5
    for i in range(shape[0]):  # each matrix normalised on its own
        assert _rel(polar_express(G[i], compute_dtype=torch.float64), ref[i]) <= 1e-12


def test_bf16_default_close_to_reference():
    G = torch.randn(3, 32, 128)
    out = polar_express(G)
    assert out.dtype == torch.bfloat16
    ref = torch.stack([polar_express_reference(g) for g in G])
    assert _rel(out.float(), ref) <= 0.04


def test_extra_leading_dims_and_scale_invariance():
    G = torch.randn(2, 3, 8, 20, dtype=torch.float64)
    out = polar_express(G, compute_dtype=torch.float64, eps=0.0)
    assert out.shape == G.shape
    out2 = polar_express(G * 37.0, compute_dtype=torch.float64, eps=0.0)
    assert _rel(out2, out) <= 1e-10


def test_nan_stays_in_its_matrix():
    G = torch.randn(4, 8, 32)
    G[2, 1, 3] = float("nan")
    out = polar_express(G, compute_dtype=torch.float32)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3]]).all()
