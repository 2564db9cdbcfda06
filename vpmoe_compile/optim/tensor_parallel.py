"""NorMuon under tensor parallelism: every matrix orthogonalised whole (Megatron Muon's
``tp_mode="duplicated"``), on the plain (fp32) path.

A TP rank holds a shard of a ``ColumnParallelLinear`` / ``RowParallelLinear`` weight (or of the
TPA factor weight: its head-factor rows; :mod:`vpmoe_compile.tensor_parallel`). Polar Express of a
shard is not the shard of Polar Express, and NorMuon's row statistics and Frobenius rescale span
the whole matrix, so each such parameter gets a *whole* copy (``shadow``, the one-rank layout)
that NorMuon steps instead of the shard:

1. before the step, the shadow's weight and gradient are all-gathered from the shards (the
   gradient after clipping; the weight every step, so a checkpoint load or a user's edit of the
   model is seen);
2. NorMuon steps the shadows exactly as it steps the one-process model's parameters (same banks,
   same blocks), identically on every TP rank;
3. each rank copies its shard of the updated shadow back into its parameter.

Cost per TP rank: the whole matrices' weights, gradients and NorMuon state of the TP-split
attention / MLP weights (routed experts are never TP-split: expert tensor parallelism is 1), and
two all-gathers per parameter per step. The state is the same on every TP rank and is saved once,
in the one-rank layout, so a checkpoint loads at any TP size
(:func:`whole_sharded`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch

from vpmoe_compile.tensor_parallel import TPLayout, tp_group, tp_layout

__all__ = ["TPShadows", "whole_sharded"]


@dataclass
class _Entry:
    param: torch.nn.Parameter
    layout: TPLayout
    shadow: torch.nn.Parameter


class TPShadows:
    """The whole copies of this rank's TP-split NorMuon parameters (see the module docstring)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.entries: List[_Entry] = []
        self._by_shadow: Dict[int, _Entry] = {}
        self._by_param: Dict[int, _Entry] = {}
        for p in params:
            layout = tp_layout(p)
            if layout is None:
                continue
            with torch.no_grad():
                whole = layout.gather(p.detach(), tp_group())
            shadow = torch.nn.Parameter(whole, requires_grad=p.requires_grad)
            e = _Entry(p, layout, shadow)
            self.entries.append(e)
            self._by_shadow[id(shadow)] = e
            self._by_param[id(p)] = e

    def __len__(self) -> int:
        return len(self.entries)

    def shadow_of(self, p: torch.Tensor) -> Optional[torch.nn.Parameter]:
        e = self._by_param.get(id(p))
        return e.shadow if e is not None else None

    def param_of(self, t: torch.Tensor) -> torch.Tensor:
        """The model parameter a shadow stands for (any other tensor: itself)."""
        e = self._by_shadow.get(id(t))
        return e.param if e is not None else t

    @torch.no_grad()
    def gather(self) -> None:
        """Whole weights and gradients from every rank's shards (a shard without a gradient
        leaves its shadow without one: NorMuon then skips it, as it skips the parameter at TP 1)."""
        group = tp_group()
        for e in self.entries:
            e.shadow.copy_(e.layout.gather(e.param.detach(), group))
            g = e.param.grad
            e.shadow.grad = None if g is None else e.layout.gather(g, group).to(e.shadow.dtype)

    @torch.no_grad()
    def scatter(self) -> None:
        """Each rank's shard of the stepped shadows back into its parameters."""
        for e in self.entries:
            e.param.copy_(e.layout.shard(e.shadow))


def whole_sharded(sh, param: torch.Tensor, shadow: torch.Tensor):
    """The ``torch_dist`` description of a shadow (or of its optimizer state): the parameter's
    global tensor, whole on this rank, replicated over the TP group (saved by TP rank 0).

    Args:
        sh: the model's ShardedTensor of ``param`` (or the TPA factor-block factory).
        param: the TP-split parameter.
        shadow: its whole copy.
    """
    from vpmoe_compile.checkpoint_tp import FactorBlocksFactory, factor_blocks_factory

    if isinstance(sh, FactorBlocksFactory):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        base = ShardedTensor.from_rank_offsets(sh.key, shadow, replica_id=sh.replica_id)
        return replace(factor_blocks_factory(base, param, whole=True), data=shadow)
    pre = sh.prepend_axis_num
    layout = tp_layout(param)
    rid = sh.replica_id
    if isinstance(rid, tuple) and len(rid) == 3:
        rid = (rid[0], layout.rank, rid[2])
    frag = list(sh.axis_fragmentations) if sh.axis_fragmentations else None
    goff = list(sh.global_offset)
    goff[pre + layout.dim] = 0
    if frag is not None:
        frag[pre + layout.dim] = 1
    out = replace(
        sh, data=shadow, local_shape=tuple(shadow.shape), global_offset=tuple(goff),
        axis_fragmentations=tuple(frag) if frag is not None else None, replica_id=rid,
    )
    if tuple(out.global_shape[pre:]) != tuple(shadow.shape):
        raise ValueError(f"{sh.key}: whole shape {tuple(shadow.shape)} vs global {out.global_shape}")
    out.validate_metadata_integrity()
    return out
