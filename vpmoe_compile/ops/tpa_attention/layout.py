"""The packed TPA factor layout: one owner for the order of the six factor blocks.

One GEMM ``factors = x @ W^T`` produces, per token, the six TPA factors side by side
(``docs/design.md#tpa-attention``)::

    [ A_q (H*Rq) | A_k (G*R) | A_v (G*R) | B_q (Rq*d) | B_k (R*d) | B_v (R*d) ]

with ``A_q`` column ``h*Rq + r``, ``A_k``/``A_v`` column ``g*R + r`` and ``B_*`` column ``r*d + i``.
:func:`tpa_factor_rows` is the one place that order is written; the factor projection's weight
rows (``vpmoe_compile.modules.tpa``, the ``tpa_factor_rows`` attribute the optimizer reads), the
reference's split and the Triton launchers' alignment check are all derived from it. (The Triton
prologue kernels compute the same offsets as compile-time constants inside ``@triton.jit`` code,
which cannot call Python; the kernel-vs-reference tests check they agree.)
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

__all__ = ["tpa_factor_rows", "factor_width", "factor_offsets", "split_factors"]


def tpa_factor_rows(num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int) -> Tuple[Tuple[str, int], ...]:
    """The six factor blocks in packed order, ``((name, width), ...)``: the rows of the packed
    factor weight and the columns of the packed factors."""
    return (
        ("a_q", num_heads * q_rank),
        ("a_k", num_groups * kv_rank),
        ("a_v", num_groups * kv_rank),
        ("b_q", q_rank * head_dim),
        ("b_k", kv_rank * head_dim),
        ("b_v", kv_rank * head_dim),
    )


def factor_width(num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int) -> int:
    """Width ``F = H*Rq + 2*G*R + (Rq + 2*R)*d`` of one token's packed factors (1064 for vpMoE)."""
    return sum(n for _, n in tpa_factor_rows(num_heads, num_groups, head_dim, q_rank, kv_rank))


def factor_offsets(num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int) -> Dict[str, int]:
    """Column offsets of the six factor blocks inside the packed vector.

    Returns:
        dict with keys ``a_q, a_k, a_v, b_q, b_k, b_v, end``.
    """
    offsets, col = {}, 0
    for name, width in tpa_factor_rows(num_heads, num_groups, head_dim, q_rank, kv_rank):
        offsets[name] = col
        col += width
    offsets["end"] = col
    return offsets


def split_factors(factors: Tensor, num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int):
    """Split packed factors ``[s, b, F]`` into the six factor tensors.

    Returns:
        ``A_q [s,b,H,Rq]``, ``A_k [s,b,G,R]``, ``A_v [s,b,G,R]``,
        ``B_q [s,b,Rq,d]``, ``B_k [s,b,R,d]``, ``B_v [s,b,R,d]`` (views).
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    o = factor_offsets(H, G, d, Rq, R)
    a_q = factors[..., o["a_q"]:o["a_k"]].unflatten(-1, (H, Rq))
    a_k = factors[..., o["a_k"]:o["a_v"]].unflatten(-1, (G, R))
    a_v = factors[..., o["a_v"]:o["b_q"]].unflatten(-1, (G, R))
    b_q = factors[..., o["b_q"]:o["b_k"]].unflatten(-1, (Rq, d))
    b_k = factors[..., o["b_k"]:o["b_v"]].unflatten(-1, (R, d))
    b_v = factors[..., o["b_v"]:o["end"]].unflatten(-1, (R, d))
    return a_q, a_k, a_v, b_q, b_k, b_v
