"""Plain-PyTorch reference of the grouped matrix product (one ``mm`` per group).

Row ``r`` of ``x`` belongs to group ``g`` when ``offs[g-1] <= r < offs[g]`` (``offs[-1]`` is the
end of group 0's predecessor, i.e. 0). Reading ``offs`` on the host is a synchronisation on a
GPU: this is the obviously-right version for tests, the CPU and devices without the fused path.
"""

from __future__ import annotations

from typing import List

import torch


def group_bounds(offs: torch.Tensor, rows: int) -> List[int]:
    """``[0, offs[0], ..., offs[-1]]`` as host integers, checked against ``rows``."""
    ends = [int(v) for v in offs.tolist()]
    bounds = [0] + ends
    if any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] > rows:
        raise ValueError(f"grouped_mm: offs must be non-decreasing and <= {rows} rows, got {ends}")
    return bounds


def grouped_mm_reference(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r] @ b[g(r)]``.

    Args:
        x: ``[M, K]``.
        b: ``[G, K, N]`` (any strides).
        offs: ``[G]`` int32 cumulative row ends.

    Returns:
        ``[M, N]`` in ``x.dtype`` (fp32 accumulation for 16-bit inputs, as cuBLAS); rows past
        ``offs[-1]`` are zero.
    """
    bounds = group_bounds(offs, x.shape[0])
    out = x.new_zeros(x.shape[0], b.shape[-1])
    for g in range(b.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            out[lo:hi] = torch.mm(x[lo:hi], b[g])
    return out


def grouped_mm_wgrad_reference(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``db[g] = x_gᵀ @ dy_g`` (the weight gradient of :func:`grouped_mm_reference`).

    Args:
        x: ``[M, K]``; dy: ``[M, N]``; offs: ``[G]`` int32.

    Returns:
        ``[G, K, N]`` in ``x.dtype``; a group with no rows gets zeros.
    """
    bounds = group_bounds(offs, x.shape[0])
    G = offs.shape[0]
    out = x.new_zeros(G, x.shape[1], dy.shape[1])
    for g in range(G):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            out[g] = torch.mm(x[lo:hi].t(), dy[lo:hi])
    return out
