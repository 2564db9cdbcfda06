"""Layer-wise distributed optimizer: whole parameters sharded over the data-parallel ranks.

NorMuon orthogonalises whole matrices, so Megatron's distributed optimizer, which gives each
data-parallel rank a slice of the *flattened* parameter buffer, cannot run it. Megatron-Core
0.16.1 answers this for its own Muon with ``LayerWiseDistributedOptimizer``
(``megatron/core/optimizer/layer_wise_optimizer.py``), and this module follows the same scheme:

1. Megatron DDP all-reduces the gradients as usual: every rank holds every gradient;
2. each rank's optimizer holds state only for the parameters it **owns** (whole tensors: a 2-D
   matrix, or a 3-D expert stack ``[E, m, n]`` whole), so optimizer memory per rank is about
   ``1 / D`` of the replicated optimizer's;
3. the global grad norm is taken over every gradient (each rank has them all, so it is the
   one-process norm without a collective), clipping and the NaN policy are unchanged;
4. each rank steps its own parameters, then every owner broadcasts its updated parameters to the
   other ranks of its group (one flat buffer per owner and dtype).

Ownership (:func:`assign_owners`): within each optimizer part (NorMuon / AdamW) and each group
(dense parameters over the data-parallel group, routed experts over the expert-data-parallel
group), parameters sorted by size are dealt to the ranks ping-pong (0, 1, …, D-1, D-1, …, 0),
as Megatron does, so memory is balanced and rank 0 owns a parameter of every non-empty part
(the part's common hyper-parameters are saved from rank 0). The deal depends only on the
parameters' sizes and order, so it is the same on every rank and at every run.

Checkpoints: each state tensor is saved once, by its owner (the ShardedTensor's data-parallel
replica id is 0 there) under the model parameter's key, so a checkpoint saved at one
data-parallel size loads at another (each rank reads the parameters it owns there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from vpmoe_compile.ownership import deal as _deal

from .routing import ParamRoute

__all__ = ["ParamSharding", "assign_owners", "build_sharding", "sharded_state_numel"]


def assign_owners(routes: Sequence[ParamRoute], dense_size: int, expert_size: int) -> List[int]:
    """Owner rank (in the parameter's data-parallel group) of each route, in route order.

    Args:
        routes: every trained parameter with its optimizer route, in the same order on all ranks.
        dense_size: data-parallel size (the group of replicated parameters).
        expert_size: expert-data-parallel size (the group of routed-expert parameters).
    """
    owners = [0] * len(routes)
    for opt in ("normuon", "adamw"):
        for expert, size in ((False, dense_size), (True, expert_size)):
            idx = [i for i, r in enumerate(routes) if r.optimizer == opt and bool(r.is_expert_parallel) == expert]
            for i, o in zip(idx, _deal([routes[i].param.numel() for i in idx], size)):
                owners[i] = o
    return owners


def sharded_state_numel(numels: Sequence[int], size: int) -> List[int]:
    """Elements owned by each of ``size`` ranks when parameters of these sizes are dealt
    (the planner's per-rank figure for one part and group)."""
    out = [0] * size
    for n, o in zip(numels, _deal(list(numels), size)):
        out[o] += n
    return out


@dataclass
class ParamSharding:
    """Which rank owns which parameter, and the broadcast of updated parameters.

    ``per_rank[kind][r]`` lists the parameters rank ``r`` of group ``kind`` ("dense": the
    data-parallel group, "expert": the expert-data-parallel group) owns, in route order.
    """

    groups: Dict[str, object]
    ranks: Dict[str, int]
    per_rank: Dict[str, List[List[torch.Tensor]]]
    owned: set = field(default_factory=set)  # ids of the parameters this rank owns

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self.owned

    @property
    def sizes(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.per_rank.items()}

    @torch.no_grad()
    def broadcast_updated(self) -> None:
        """Every owner sends its updated parameters to the other ranks of its group: one
        broadcast of a flat buffer per owner and dtype (``_flatten_dense_tensors``)."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for kind, per_rank in self.per_rank.items():
            group, me = self.groups[kind], self.ranks[kind]
            for r, params in enumerate(per_rank):
                by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
                for p in params:
                    by_dtype.setdefault(p.dtype, []).append(p)
                src = dist.get_global_rank(group, r)
                for dtype, ps in by_dtype.items():
                    if r == me:
                        flat = _flatten_dense_tensors([p.data for p in ps])
                    else:
                        flat = torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
                    dist.broadcast(flat, src, group=group)
                    if r != me:
                        for p, new in zip(ps, _unflatten_dense_tensors(flat, [p.data for p in ps])):
                            p.data.copy_(new)


def build_sharding(routes: Sequence[ParamRoute]) -> Optional[ParamSharding]:
    """The sharding of ``routes`` over Megatron's data-parallel groups (parallel state must be
    initialised); ``None`` when both the data-parallel and the expert-data-parallel size are 1."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "the layer-wise distributed optimizer shards over Megatron's data-parallel group: "
            "initialise parallel state first (megatron_base.init_process or "
            "parallel_state.initialize_model_parallel)"
        )
    groups = {"dense": ps.get_data_parallel_group(), "expert": ps.get_expert_data_parallel_group()}
    ranks = {"dense": ps.get_data_parallel_rank(), "expert": ps.get_expert_data_parallel_rank()}
    sizes = {"dense": ps.get_data_parallel_world_size(), "expert": ps.get_expert_data_parallel_world_size()}
    if sizes["dense"] == 1 and sizes["expert"] == 1:
        return None
    owners = assign_owners(routes, sizes["dense"], sizes["expert"])
    per_rank = {k: [[] for _ in range(n)] for k, n in sizes.items()}
    owned = set()
    for r, o in zip(routes, owners):
        kind = "expert" if r.is_expert_parallel else "dense"
        per_rank[kind][o].append(r.param)
        if o == ranks[kind]:
            owned.add(id(r.param))
    return ParamSharding(groups=groups, ranks=ranks, per_rank=per_rank, owned=owned)
