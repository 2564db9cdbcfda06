"""The ownership rule of the layer-wise distributed optimizer, pure Python.

One owner for the decision "which data-parallel rank keeps the optimizer state of which whole
parameter": :mod:`vpmoe_compile.optim.layer_wise` shards the optimizer with it and
:mod:`vpmoe_compile.plan` plans per-rank memory with it.
"""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["deal"]


def deal(numels: Sequence[int], size: int) -> List[int]:
    """The owner rank of each item: items sorted by size (stable: ties keep their order), dealt
    ping-pong ``0, 1, …, size-1, size-1, …, 0`` (Megatron-Core's
    ``LayerWiseDistributedOptimizer.shard_params`` order), so memory is balanced and rank 0 owns
    the smallest item.

    >>> deal([5, 3, 9, 3, 7, 1], 2)
    [0, 1, 1, 1, 0, 0]
    """
    loop = list(range(size)) + list(range(size))[::-1]
    owners = [0] * len(numels)
    for k, i in enumerate(sorted(range(len(numels)), key=lambda j: numels[j])):
        owners[i] = loop[k % len(loop)]
    return owners
