"""Triton helpers shared by the kernels of :mod:`vpmoe_compile.ops` and :mod:`vpmoe_compile.optim`."""

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["dot", "ieee_fp32", "EXACT_DELTA_MAX_MEAN_KEYS", "mean_keys_per_row", "needs_exact_delta",
           "MAX_PACK", "default_pack"]


def ieee_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` on operands of ``dtype`` must use full fp32 products: fp32 operands do,
    unless the user allowed TF32 for fp32 matmuls (``torch.set_float32_matmul_precision("high")``
    or ``"medium"``, i.e. ``torch.backends.cuda.matmul.allow_tf32``) — the kernels follow torch's
    own fp32 matmul setting, IEEE by default. Read by the launchers at call time."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


# The attention backward's ``delta = rowsum(dO * O)`` enters ``dS = P (dP - delta)``. Where a row
# sees few keys, one ``P_ij ~ 1 - p_sink`` dominates and ``dP - delta`` cancels, so ``delta`` taken
# from a 16-bit ``O`` loses the gradients' accuracy; with many keys the rounding averages out.
# Rows that see at most this many keys on average need an exact ``delta`` (the interpreter sweep of
# the sink-attention tests: from the 16-bit ``O`` the dq error ratio vs the fp32-math reference is
# 2.0-2.4 at 1 key, 1.5-1.8 at 2, <= 1.4 from 4 on). Both attention kernel families follow it: there
# the full-causal kernels keep ``O``'s rounding residual, the sliding-window kernels recompute
# ``delta = rowsum(P * dP)``.
EXACT_DELTA_MAX_MEAN_KEYS = 8.0


def mean_keys_per_row(seqlen: int, window: Optional[int] = None) -> float:
    """Average number of keys a causal query row sees: ``(s + 1) / 2`` without a window; with a
    window ``W`` (key ``j`` visible to ``i`` iff ``0 <= i - j <= W - 1``) row ``i`` sees
    ``min(i + 1, W)``, averaged over the ``s`` rows."""
    s = int(seqlen)
    if window is None or int(window) >= s:
        return (s + 1) / 2
    w = int(window)
    return (w * (w + 1) / 2 + (s - w) * w) / s


def needs_exact_delta(seqlen: int, window: Optional[int] = None) -> bool:
    """Whether the attention backward of a 16-bit output needs ``delta`` more exact than
    ``rowsum(dO * O)`` from the rounded ``O`` (:data:`EXACT_DELTA_MAX_MEAN_KEYS`)."""
    return mean_keys_per_row(seqlen, window) <= EXACT_DELTA_MAX_MEAN_KEYS


#: Most query heads one attention program packs into its rows (FlashAttention-3's "PackGQA").
MAX_PACK = 8


def default_pack(heads_per_group: int, rows: Optional[int] = None) -> int:
    """Query heads of one KV group that an attention program packs into its M dimension (row
    ``r`` = token ``r // pack``, head ``r % pack``): the largest divisor of ``heads_per_group``
    that is at most :data:`MAX_PACK` (and at most ``rows``, the program's packed rows, when
    given), so each K/V tile a program loads serves ``pack`` heads. Both attention kernel
    families take their packing from here."""
    cap = MAX_PACK if rows is None else min(MAX_PACK, int(rows))
    hpg = int(heads_per_group)
    return max(p for p in range(1, min(hpg, cap) + 1) if hpg % p == 0)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``IEEE`` forces full-fp32 products (``input_precision
    "ieee"``, no TF32) for fp32 operands (the interpreter tests and fp32 checks)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
