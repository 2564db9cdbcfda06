"""``torch_dist`` form of the TPA factor weight at any tensor-parallel size.

The packed factor weight ``[F, h]`` mixes rows split over the TP ranks (the head factors
``A_q``, ``A_k``, ``A_v``) with rows every rank holds (the token factors ``B_q``, ``B_k``,
``B_v``), so it is not one Megatron-sharded tensor. :func:`factor_blocks_factory` saves it as
six tensors, ``<key>.a_q`` ... ``<key>.b_v``, each with its one-rank shape: the head-factor
blocks sharded over TP on their first axis (like a ``ColumnParallelLinear`` weight), the
token-factor blocks replicated (saved by TP rank 0). A checkpoint saved at one TP size therefore
loads at any other, in both directions. The same factory describes the parameter's optimizer
state (the AdamW / NorMuon tensors of the weight's local shape, and NorMuon's ``[F, 1]`` second
moment: the blocks are cut from the first axis, whatever the trailing ones), and, with
``whole=True``, the one-rank-layout state that NorMuon keeps for the whole matrix under TP
(replicated over the TP group, :mod:`vpmoe_compile.optim.tensor_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpmoe_compile.tensor_parallel import tp_layout

__all__ = ["FactorBlocksFactory", "factor_blocks_factory"]

try:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
except ImportError:  # pragma: no cover - Megatron is a dependency of every caller
    ShardedTensorFactory = object  # type: ignore


@dataclass
class FactorBlocksFactory(ShardedTensorFactory):
    """A ``ShardedTensorFactory`` marked as the factor-block split (its build function cuts any
    tensor whose first axis has the weight's local rows, so optimizer state of other trailing
    shapes goes through it too)."""


def factor_blocks_factory(base, param: torch.Tensor, *, whole: bool = False) -> FactorBlocksFactory:
    """The factory for ``param`` (a TPA factor weight with ``tpa_factor_rows``).

    Args:
        base: the weight's replicated ShardedTensor (``make_sharded_tensors_for_checkpoint``
            without a TP axis): its key, prepended axes and replica id are used.
        param: the weight (its ``tpa_factor_rows`` and TP layout give the blocks).
        whole: the data has the one-rank layout (every block whole) and is replicated over the TP
            group (NorMuon's whole-matrix state under TP).
    """
    rows = [(str(name), int(n)) for name, n in param.tpa_factor_rows]
    layout = None if whole else tp_layout(param)
    size, rank = (layout.size, layout.rank) if layout is not None else (1, 0)
    sharded_flags = [sh for _, _, sh in layout.segments] if layout is not None else [False] * len(rows)
    pre = base.prepend_axis_num
    prepended = tuple(
        (ax, base.global_offset[ax], base.axis_fragmentations[ax] if base.axis_fragmentations else base.global_shape[ax])
        for ax in range(pre)
    )

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError("flattened (distributed-optimizer) TPA factor state is not supported")
        out, start = {}, 0
        for (name, n_full), sharded in zip(rows, sharded_flags):
            n = n_full // size if sharded else n_full
            block = t.narrow(0, start, n)
            start += n
            rid = replica_id
            if sharded and isinstance(rid, tuple) and len(rid) == 3:
                rid = (rid[0], 0, rid[2])  # one replica per TP shard
            tp_axis = ((pre, rank, size),) if sharded else ()
            out[name] = ShardedTensor.from_rank_offsets(
                f"{key}.{name}", block, *prepended, *tp_axis, replica_id=rid, prepend_axis_num=pre
            )
        if start != t.shape[0]:
            raise ValueError(f"{key}: the factor blocks cover {start} rows, the tensor has {t.shape[0]}")
        return out

    def merge(sub):
        return torch.cat([sub[name] for name, _ in rows], dim=0)

    return FactorBlocksFactory(base.key, base.data, build, merge, base.replica_id)
