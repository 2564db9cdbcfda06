"""ALiBi slopes (GRAPE-A on global layers), the ``slopes`` input of :mod:`.op`; no kernel dependency.

Recipe of Press et al. ("Train Short, Test Long", 2022), ``docs/design.md#alibi-slopes``:

* ``n`` a power of two: ``m_h = 2^(-8 h / n)`` for ``h = 1 .. n`` (start = ratio = ``2^(-8/n)``).
* otherwise, with ``c`` the largest power of two ``<= n``: the ``c`` slopes of ``c``, then every
  other slope (indices 0, 2, 4, ...) of the ``2c``-head list, truncated to ``n - c`` entries.

Examples: ``H=8 -> [2^-1, ..., 2^-8]``; ``H=6 -> [2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3]``.

The slopes are computed in float64 and rounded once to fp32 (bitwise equal to the fork's fp32
computation for ``H`` in {1, 2, 4, 6, 8}; within 5e-7 relative for larger ``H``).
Indexing is by **query head** (global head index; a TP rank takes its slice
``slopes[rank*H_l:(rank+1)*H_l]``, see :func:`alibi_slopes_for_rank`).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

__all__ = ["alibi_slopes", "alibi_slopes_list", "alibi_slopes_for_rank"]


def _power_of_two_slopes(n: int) -> List[float]:
    # m_h = 2^(-8h/n), h = 1..n; exact powers of two when 8/n is an integer.
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]


def alibi_slopes_list(num_heads: int) -> List[float]:
    """Press-recipe ALiBi slopes as a list of Python floats (float64), length ``num_heads``."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")
    if num_heads & (num_heads - 1) == 0:
        return _power_of_two_slopes(num_heads)
    c = 2 ** int(math.floor(math.log2(num_heads)))
    extra = alibi_slopes_list(2 * c)[0::2][: num_heads - c]
    return _power_of_two_slopes(c) + extra


def alibi_slopes(num_heads: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """ALiBi slopes ``[num_heads]`` in fp32 (positive; bias ``-m_h * (i - j)`` for ``j <= i``)."""
    return torch.tensor(alibi_slopes_list(num_heads), dtype=torch.float64, device=device).to(
        torch.float32
    )


def alibi_slopes_for_rank(
    num_heads: int, tp_rank: int, tp_size: int, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """The slice of the global-head slopes held by tensor-parallel rank ``tp_rank``: ``[H / tp]``."""
    if tp_size < 1 or num_heads % tp_size != 0 or not 0 <= tp_rank < tp_size:
        raise ValueError(
            f"alibi_slopes_for_rank: need num_heads % tp_size == 0 and 0 <= tp_rank < tp_size, "
            f"got num_heads={num_heads}, tp_rank={tp_rank}, tp_size={tp_size}"
        )
    per = num_heads // tp_size
    return alibi_slopes(num_heads, device=device)[tp_rank * per : (tp_rank + 1) * per].clone()
