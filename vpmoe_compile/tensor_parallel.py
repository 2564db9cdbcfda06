"""How a tensor-parallel shard of a parameter maps to the whole parameter: the one owner of that
fact for the optimizer (NorMuon orthogonalises whole matrices, the grad norm counts every element
once) and the checkpoints (a ``torch_dist`` checkpoint saved at one TP size loads at another).

A parameter's :class:`TPLayout` is a list of *segments* along one axis (``dim``) of the local
shard, each ``sharded`` (every TP rank holds its own slice, in rank order) or replicated (every
rank holds the same values):

* a Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` weight (``tensor_model_parallel``,
  ``partition_dim``) is one sharded segment along ``partition_dim`` — Megatron's own layout, so
  a fused QKV weight's shards concatenate to the one-rank interleaved ``[G*(H/G+2)*d, h]``;
* the TPA factor weight (:class:`~vpmoe_compile.modules.tpa.TPAFactorProjection`) has six row
  segments: the head factors ``A_q``, ``A_k``, ``A_v`` sharded with the heads, the token factors
  ``B_q``, ``B_k``, ``B_v`` replicated (every rank's heads contract with them); its ``tp_segments``
  attribute lists them.

Routed experts (expert stacks, or any parameter Megatron reduces over the expert-data-parallel
group) are never tensor-parallel here: expert tensor parallelism is 1 (their shards are over the
expert-parallel group, which the optimizer handles as whole ``[E, m, n]`` stacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["TPLayout", "tp_layout", "tp_group", "tp_world", "is_tp_partitioned", "mark_head_split", "into_tp_region"]

Segment = Tuple[int, int, bool]  # (local start, local length, sharded)


@dataclass(frozen=True)
class TPLayout:
    """A parameter's shard layout over ``size`` tensor-parallel ranks (this rank: ``rank``).

    Shapes: ``local`` is the parameter as this rank holds it; ``full`` the one-rank parameter,
    whose segments along ``dim`` are, in order, each sharded segment's ``size`` slices (rank 0
    first) or the replicated segment once.
    """

    dim: int
    segments: Tuple[Segment, ...]
    size: int
    rank: int

    # ---- shapes --------------------------------------------------------------------------
    def full_length(self) -> int:
        return sum(n * self.size if sharded else n for _, n, sharded in self.segments)

    def full_shape(self, local_shape: Sequence[int]) -> Tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.full_length()
        return tuple(shape)

    def full_segments(self) -> List[Tuple[int, int, bool]]:
        """``(full start, full length, sharded)`` of each segment in the full tensor."""
        out, start = [], 0
        for _, n, sharded in self.segments:
            length = n * self.size if sharded else n
            out.append((start, length, sharded))
            start += length
        return out

    # ---- data ----------------------------------------------------------------------------
    def gather(self, local: torch.Tensor, group) -> torch.Tensor:
        """The full tensor from every rank's shard (one ``all_gather`` over ``group``)."""
        import torch.distributed as dist

        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=group)
        pieces = []
        for start, n, sharded in self.segments:
            if sharded:
                pieces.extend(p.narrow(self.dim, start, n) for p in parts)
            else:
                pieces.append(local.narrow(self.dim, start, n))
        return torch.cat(pieces, dim=self.dim)

    def shard(self, full: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        """Rank ``rank``'s (default: this rank's) shard of ``full`` (a new tensor)."""
        rank = self.rank if rank is None else rank
        pieces = []
        for (_, n, sharded), (fstart, _, _) in zip(self.segments, self.full_segments()):
            pieces.append(full.narrow(self.dim, fstart + (rank * n if sharded else 0), n))
        return torch.cat(pieces, dim=self.dim)

    def split_sharded(self, t: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Views of a local tensor: its sharded segments and its replicated segments."""
        sharded, replicated = [], []
        for start, n, is_sharded in self.segments:
            (sharded if is_sharded else replicated).append(t.narrow(self.dim, start, n))
        return sharded, replicated


def tp_world() -> Tuple[int, int]:
    """``(size, rank)`` of Megatron's tensor-parallel group; ``(1, 0)`` without one."""
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return 1, 0
    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return 1, 0
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def tp_group():
    """Megatron's tensor-parallel process group (its size must be > 1 where this is called)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def is_tp_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is split (wholly or partly) over the tensor-parallel ranks: Megatron's
    ``tensor_model_parallel`` attribute or a ``tp_segments`` list, and not a routed expert."""
    if getattr(p, "expert_stack", False) or not getattr(p, "allreduce", True):
        return False
    return bool(getattr(p, "tp_segments", None)) or bool(getattr(p, "tensor_model_parallel", False))


def tp_layout(p: torch.Tensor, size: Optional[int] = None, rank: Optional[int] = None) -> Optional[TPLayout]:
    """``p``'s :class:`TPLayout` at tensor-parallel ``size`` (default: Megatron's), or ``None``
    when it is whole on every rank (TP size 1, replicated parameters, routed experts)."""
    if size is None or rank is None:
        size, rank = tp_world()
    if size <= 1 or not is_tp_partitioned(p):
        return None
    segments = getattr(p, "tp_segments", None)
    if segments:
        return TPLayout(0, tuple((int(s), int(n), bool(sh)) for s, n, sh in segments), size, rank)
    dim = int(getattr(p, "partition_dim", 0))
    if dim < 0:
        return None
    return TPLayout(dim, ((0, int(p.shape[dim]), True),), size, rank)


def mark_head_split(p: Optional[torch.Tensor]) -> None:
    """Mark a per-head parameter that Megatron splits over TP with the heads but does not mark
    (``DotProductAttention.softmax_offset``, the sink: ``[H / tp]``) as TP-split on axis 0, so the
    grad norm sums it over the TP ranks (at TP 1 nothing changes)."""
    if p is None or tp_world()[0] <= 1:
        return
    p.tensor_model_parallel = True
    p.partition_dim = 0
    p.partition_stride = 1


def into_tp_region(t: torch.Tensor) -> torch.Tensor:
    """A replicated tensor that every TP rank uses for its own heads (an input, GRAPE-M's
    ``log_freq``, a value-residual logit): identity forward, gradient summed over the TP group in
    backward (Megatron's ``copy_to_tensor_model_parallel_region``)."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(t, group=tp_group())
