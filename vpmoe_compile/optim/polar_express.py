"""Polar Express orthogonalisation (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932).

Two stages, as in the paper:

* **offline** (:func:`polar_express_coefficients`): for a singular-value interval ``[ell, 1]``
  compute, iteration by iteration, the minimax-optimal odd quintic ``p_t(x) = a x + b x^3 + c x^5``
  approximating 1 on the interval that holds the singular values after ``t - 1`` steps
  (docs/design.md#polar-express). Pure float64 / numpy; the default arguments reproduce the
  5-step table used by the vpMoE fork and modded-nanogpt to ~1e-14.
* **online** (:func:`polar_express`): apply the composed polynomial to a matrix or a batch of
  matrices ``[..., m, n]`` with ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, in bf16 with fp32
  accumulation (or fp32 / fp64 for reference runs), working on the wide orientation
  (``min(m, n)`` rows) so that ``A`` is the small Gram matrix.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

Coefficients = Tuple[Tuple[float, float, float], ...]

__all__ = [
    "PE_FORMS",
    "PINNED_COEFFICIENTS",
    "DEFAULT_COEFFICIENTS",
    "polar_express_coefficients",
    "polar_express_bounds",
    "polar_express",
    "polar_express_reference",
    "resolve_coefficients",
]

#: The 5-step table for safety 2e-2 as published by the vpMoE fork
#: (``DEFAULT_POLAR_EXPRESS_COEFFS``) and modded-nanogpt (``polar_express_coeffs``).
PINNED_COEFFICIENTS: Coefficients = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

#: The forms of the online stage: the Gram form (:func:`_pe_gram_polynomial`; the fused
#: kernels' default) and the standard form (:func:`_pe_polynomial`).
PE_FORMS = ("gram", "standard")

#: Normalisation epsilon of the online stage (fork and modded-nanogpt value).
PE_EPS = 1e-6


def _poly(x: float, coeffs: Tuple[float, float, float]) -> float:
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def _minimax_odd_quintic(lo: float, hi: float) -> Tuple[float, float, float]:
    """Best odd quintic approximation of 1 on ``[lo, hi]`` (4-point equioscillation / Remez).

    Solves ``p(lo) = 1 - E, p(q) = 1 + E, p(r) = 1 - E, p(hi) = 1 + E`` for ``(a, b, c, E)`` and
    moves ``q, r`` to the critical points of ``p`` until ``E`` is stationary.
    """
    if lo / hi >= 1.0 - 5e-6:
        # Interval collapsed to a point: the Newton-Schulz quintic centred on `hi`.
        return (15.0 / 8.0) / hi, (-10.0 / 8.0) / hi**3, (3.0 / 8.0) / hi**5
    q, r = (3.0 * lo + hi) / 4.0, (lo + 3.0 * hi) / 4.0
    err_prev = math.inf
    a = b = c = 0.0
    for _ in range(1000):
        system = np.array(
            [[x, x**3, x**5, sign] for x, sign in ((lo, 1.0), (q, -1.0), (r, 1.0), (hi, -1.0))],
            dtype=np.float64,
        )
        a, b, c, err = np.linalg.solve(system, np.ones(4, dtype=np.float64))
        disc = math.sqrt(9.0 * b * b - 20.0 * a * c)
        x2 = sorted(((-3.0 * b - disc) / (10.0 * c), (-3.0 * b + disc) / (10.0 * c)))
        q, r = math.sqrt(x2[0]), math.sqrt(x2[1])
        if abs(err - err_prev) <= 1e-15:
            break
        err_prev = err
    return float(a), float(b), float(c)


@functools.lru_cache(maxsize=64)
def _generate(
    steps: int, safety: float, ell: float, cushion: float
) -> Tuple[Coefficients, Tuple[float, ...]]:
    if steps < 1:
        raise ValueError(f"polar_express steps must be >= 1, got {steps}")
    if not 0.0 < ell < 1.0:
        raise ValueError(f"ell must be in (0, 1), got {ell}")
    lo, hi = float(ell), 1.0
    table: List[Tuple[float, float, float]] = []
    bounds = [lo]
    for t in range(1, steps + 1):
        lo_fit = max(lo, cushion * hi)
        coeffs = _minimax_odd_quintic(lo_fit, hi)
        if cushion * hi > lo:
            # The fit ignored [lo, cushion*hi): re-centre on the true interval.
            k = 2.0 / (_poly(lo, coeffs) + _poly(hi, coeffs))
            coeffs = tuple(k * v for v in coeffs)
        if t < steps:
            s = 1.0 + safety  # p(x) -> p(x / s): room for bf16 round-off
            coeffs = (coeffs[0] / s, coeffs[1] / s**3, coeffs[2] / s**5)
        table.append(tuple(float(v) for v in coeffs))
        lo = _poly(lo, coeffs)
        hi = 2.0 - lo
        lo = min(lo, hi)
        bounds.append(lo)
    return tuple(table), tuple(bounds)


def polar_express_coefficients(
    steps: int = 5, safety: float = 2e-2, ell: float = 1e-3, cushion: float = 2e-2
) -> List[Tuple[float, float, float]]:
    """Polar Express coefficient table by the paper's offline procedure
    (docs/design.md#polar-express).

    Args:
        steps: number of iterations ``T``.
        safety: ``safety_eps``; iterations ``1..T-1`` are evaluated at ``x / (1 + safety)``.
            The online normalisation must divide by ``(1 + safety) * ||X||_F`` with the same value.
        ell: lower end of the singular-value interval ``[ell, 1]`` the table is built for.
        cushion: the fit interval never starts below ``cushion * u_t``.

    Returns:
        ``steps`` triples ``(a_t, b_t, c_t)`` (python floats). The defaults reproduce
        :data:`PINNED_COEFFICIENTS` to ~1e-14.
    """
    return [tuple(t) for t in _generate(int(steps), float(safety), float(ell), float(cushion))[0]]


def polar_express_bounds(
    steps: int = 5, safety: float = 2e-2, ell: float = 1e-3, cushion: float = 2e-2
) -> List[float]:
    """Lower interval bounds ``ell_0 .. ell_T`` (upper bounds are ``2 - ell_t``)."""
    return list(_generate(int(steps), float(safety), float(ell), float(cushion))[1])


DEFAULT_COEFFICIENTS: Coefficients = _generate(5, 2e-2, 1e-3, 2e-2)[0]
# The generated default table must be the published one (docs/design.md#polar-express).
assert max(
    abs(x - y) for row, ref in zip(DEFAULT_COEFFICIENTS, PINNED_COEFFICIENTS) for x, y in zip(row, ref)
) <= 1e-12, "Polar Express generator drifted from the pinned table"


def resolve_coefficients(
    coefficients: Optional[Sequence[Sequence[float]]] = None,
    steps: int = 5,
    safety: float = 2e-2,
) -> Coefficients:
    """Explicit table (validated) or the generated table for ``(steps, safety)``."""
    if coefficients is None:
        if steps == 5 and safety == 2e-2:
            return PINNED_COEFFICIENTS
        return tuple(polar_express_coefficients(steps=steps, safety=safety))
    table = tuple(tuple(float(v) for v in row) for row in coefficients)
    if not table or any(len(row) != 3 for row in table):
        raise ValueError("a Polar Express table is a non-empty list of (a, b, c) triples")
    return table


def polar_express(
    G: torch.Tensor,
    coefficients: Optional[Sequence[Sequence[float]]] = None,
    safety: float = 2e-2,
    eps: float = PE_EPS,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximate polar factor ``U V^T`` of ``G = U S V^T`` (docs/design.md#polar-express).

    Args:
        G: ``[m, n]`` or a batch ``[..., m, n]``; each trailing matrix is orthogonalised alone
            (its own Frobenius normalisation).
        coefficients: table of ``(a, b, c)`` triples; ``None`` -> the pinned 5-step table.
        safety: the safety factor the table was built with; the input is normalised by
            ``(1 + safety) * ||G||_F + eps`` so that ``sigma_max <= 1 / (1 + safety)``.
        eps: normalisation epsilon (1e-6, as the fork).
        compute_dtype: bf16 (default; fp32 accumulation in the matmuls), fp32 or fp64.

    Returns:
        Tensor of ``G``'s shape in ``compute_dtype``. Tall matrices (``m > n``) are processed
        transposed, so the Gram matrices are ``min(m, n)`` square.
    """
    table = resolve_coefficients(coefficients)
    if G.ndim < 2:
        raise ValueError(f"polar_express needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    flip = G.shape[-2] > G.shape[-1]
    X = G.mT if flip else G
    lead = X.shape[:-2]
    X = X.reshape(-1, X.shape[-2], X.shape[-1])
    X = _pe_batched(X, table, safety, eps, compute_dtype)
    X = X.reshape(*lead, X.shape[-2], X.shape[-1])
    return X.mT if flip else X


def _pe_batched(
    X: torch.Tensor, table: Coefficients, safety: float, eps: float, compute_dtype: torch.dtype
) -> torch.Tensor:
    """PE on a wide batch ``[N, s, L]`` (``s <= L``); normalisation in fp32 (fp64 for fp64)."""
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    Xa = X.to(acc)
    norm = torch.linalg.vector_norm(Xa, dim=(-2, -1), keepdim=True)
    X = (Xa / ((1.0 + safety) * norm + eps)).to(compute_dtype)
    return _pe_polynomial(X, table, compute_dtype)


def _pe_polynomial(X: torch.Tensor, table: Coefficients, compute_dtype: torch.dtype) -> torch.Tensor:
    """The Polar Express steps on a normalised wide batch ``[N, s, L]`` in ``compute_dtype``."""
    X = X.to(compute_dtype)
    for a, b, c in table:
        A = torch.bmm(X, X.mT)  # [N, s, s]
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        # a X + B X with fp32 accumulation of both terms. (Folding a I into B first, X <- (B + a I) X,
        # saves baddbmm's copy of X but rounds the diagonal a + B_ii to bf16: measured 2x the
        # error vs the fp64 reference, over the 4 % bound of docs/design.md#polar-express.)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def _round_mantissa(x: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """fp32 ``x`` rounded to ``bits`` explicit mantissa bits (nearest, ties away from zero, as the
    GPU's fp32 -> TF32 conversion for ``bits = 10``); ``None``: unchanged."""
    if bits is None or x.dtype != torch.float32:
        return x
    shift = 23 - int(bits)
    i = x.contiguous().view(torch.int32)
    mag = (i & 0x7FFFFFFF) + (1 << (shift - 1))
    return ((mag >> shift << shift) | (i & -0x80000000)).view(torch.float32)


def _pe_gram_polynomial(
    X: torch.Tensor, table: Coefficients, compute_dtype: torch.dtype, restart: int = 2,
    product_bits: Optional[int] = None,
) -> torch.Tensor:
    """The Polar Express steps in the Gram form (docs/design.md#gram-form) on a normalised wide
    batch ``[N, s, L]``: the PyTorch statement of the fused kernels' ``form="gram"`` (their
    rounding points; the test reference of those kernels).

    Per phase (steps ``0 .. restart-1``, then the rest): ``A = X X^T`` (``compute_dtype``
    inputs, fp32 accumulation), then per step ``P = a I + b A + c A^2``, ``A <- P A P``,
    ``Q <- P Q`` in fp32 (fp64 for fp64), and ``X <- round(round(Q) X)``. In exact arithmetic
    this equals :func:`_pe_polynomial`; the restart recomputes ``A`` from ``X`` so that the
    rounding errors of the Gram iteration (spurious negative eigenvalues) cannot grow.
    ``product_bits = 10`` rounds the operands of the ``s x s`` products like the GPU kernels' TF32
    (``restart = 0``: no restart)."""
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    X = X.to(compute_dtype)
    bounds = [0, restart, len(table)] if 0 < restart < len(table) else [0, len(table)]
    eye = torch.eye(X.shape[-2], dtype=acc, device=X.device)
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        Xa = X.to(acc)  # compute_dtype values, products and sums in acc
        A = torch.bmm(Xa, Xa.mT)
        Q = None
        def mm(u, v):
            return torch.bmm(_round_mantissa(u, product_bits), _round_mantissa(v, product_bits))

        for t in range(t0, t1):
            a, b, c = table[t]
            P = a * eye + b * A + c * mm(A, A)
            if t + 1 < t1:
                A = mm(mm(P, A), P)
            Q = P if Q is None else mm(P, Q)
        X = torch.bmm(Q.to(compute_dtype).to(acc), Xa).to(compute_dtype)
    return X


def polar_express_reference(
    G: torch.Tensor,
    coefficients: Optional[Sequence[Sequence[float]]] = None,
    safety: float = 2e-2,
    eps: float = PE_EPS,
) -> torch.Tensor:
    """Literal per-matrix float64 implementation of :func:`polar_express` (the test reference
    "REF")."""
    table = resolve_coefficients(coefficients)
    X = G.detach().to(torch.float64)
    flip = X.shape[-2] > X.shape[-1]
    if flip:
        X = X.T
    X = X / ((1.0 + safety) * torch.linalg.norm(X) + eps)
    for a, b, c in table:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if flip else X
