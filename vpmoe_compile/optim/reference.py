"""Literal per-matrix NorMuon step (docs/design.md#the-normuon-update, steps numbered as there):
the test reference "REF" and the fork-style loop.

One Python iteration per logical matrix, no batching, no fusion: this is the semantics the banked
:class:`~vpmoe_compile.optim.NorMuon` must reproduce, and (with ``compute_dtype=torch.bfloat16``
on CUDA) the shape of the reference fork's ``NormuonWithAuxAdam`` loop used by the benchmark.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .polar_express import PE_EPS, resolve_coefficients


def _pe(U: torch.Tensor, table, safety: float, pe_eps: float, dtype: torch.dtype) -> torch.Tensor:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flip = U.shape[0] > U.shape[1]
    X = U.T if flip else U
    X = (X.to(acc) / ((1.0 + safety) * torch.linalg.norm(X.to(acc)) + pe_eps)).to(dtype)
    for a, b, c in table:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if flip else X


@torch.no_grad()
def normuon_reference_update(
    W: torch.Tensor,
    G: torch.Tensor,
    M: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    beta2: float = 0.95,
    eps: float = 1e-10,
    blocks: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
    coefficients=None,
    safety: float = 2e-2,
    pe_eps: float = PE_EPS,
    compute_dtype: torch.dtype = torch.float64,
    scale_mode: str = "shape",
    neuron_axis: str = "rows",
) -> None:
    """Update ``W`` (``[m, n]``), momentum ``M`` (``[m, n]``) and second moment ``v`` in place.

    ``v`` is ``[m, 1]`` (per row) or ``[1, n]`` (``neuron_axis="larger"`` on a wide unsplit
    matrix). ``blocks``: logical matrices as lists of ``(row_start, num_rows)`` segments.
    """
    table = resolve_coefficients(coefficients)
    M.add_((1.0 - momentum) * (G.to(M.dtype) - M))  # 1
    U = G.to(M.dtype) + momentum * (M - G.to(M.dtype))  # 2
    if blocks is None:
        blocks = (((0, W.shape[0]),),)
    W.mul_(1.0 - lr * weight_decay)
    for segs in blocks:
        rows = torch.cat([torch.arange(s, s + n) for s, n in segs]).to(W.device)
        Ub = U[rows]
        m, n = Ub.shape
        O = _pe(Ub, table, safety, pe_eps, compute_dtype).to(M.dtype)  # 3
        on_rows = neuron_axis == "rows" or m >= n
        if on_rows:
            r = O.square().mean(dim=1, keepdim=True)  # 4
            vb = v[rows]
            vb = vb + (1.0 - beta2) * (r - vb)  # 5
            v[rows] = vb
            s = 1.0 / torch.sqrt(vb + eps)  # 6
        else:
            r = O.square().mean(dim=0, keepdim=True)
            v.add_((1.0 - beta2) * (r - v))
            s = 1.0 / torch.sqrt(v + eps)
        Oh = s * O  # 7
        if scale_mode == "shape":
            Oh = Oh * (torch.linalg.norm(O) / torch.clamp_min(torch.linalg.norm(Oh), eps))  # 8
            delta = Oh * math.sqrt(max(1.0, m / n))  # 9
        else:
            delta = Oh * (0.2 * math.sqrt(m * n) / torch.clamp_min(torch.linalg.norm(Oh), eps))
        W[rows] = W[rows] - lr * delta.to(W.dtype)  # 10
