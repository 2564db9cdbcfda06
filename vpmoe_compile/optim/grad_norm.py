"""The global gradient norm and the NaN-policy names, shared by both optimizer paths.

* :func:`grad_sq_sum` / :func:`local_grad_norm` / :func:`global_grad_norm`: the L2 norm of all
  gradients accumulated in fp64, so a finite gradient never overflows it (fp32 squares overflow
  from ``|g| ~ 1.8e19`` on, and an overflowing norm reads as a NaN step). The plain path uses
  :func:`local_grad_norm`, the Megatron path :func:`global_grad_norm` (one all-reduce).
* :func:`nonfinite_param_names`: the model names that ``nan_policy="raise"`` reports.

Pure torch: nothing here imports Megatron.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

__all__ = ["grad_sq_sum", "local_grad_norm", "global_grad_norm", "nonfinite_param_names"]


def grad_sq_sum(grads: Sequence[torch.Tensor], device: Any = None) -> torch.Tensor:
    """Sum of squares of all gradients as a 0-d fp64 tensor, without a host sync.

    One ``_foreach_norm`` with an fp64 output, which accumulates in fp64 while reading the
    gradients in their own dtype (no fp32 / fp64 copies): a finite fp32 / bf16 / fp16 gradient
    cannot overflow it (``(3.4e38)^2 * 1e12`` elements is ~1e89 << 1.8e308), whereas the
    squares of fp32 accumulation overflow from |g| ~ 1.8e19 on (a finite 1e20 gradient read as
    an inf norm, i.e. a NaN skip). Only fp64 gradients beyond ~1e150 can overflow; see
    :func:`local_grad_norm`.
    """
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            buckets.setdefault((g.device, g.dtype), []).append(g)
    if not buckets:
        return torch.zeros((), dtype=torch.float64, device=device)
    # one multi-tensor kernel per (device, dtype): foreach's fast path needs them uniform
    norms = [n for gs in buckets.values() for n in torch._foreach_norm(gs, 2.0, dtype=torch.float64)]
    dev = norms[0].device
    return torch.stack([n if n.device == dev else n.to(dev) for n in norms]).square().sum()


def local_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of ``grads``: :func:`grad_sq_sum` and one host sync. Only for fp64
    gradients whose fp64 squares overflow (beyond ~1e150) while every value is finite, the norm
    is recomputed rescaled by the largest ``|g|`` (extra syncs on that path only; a non-finite
    norm of fp32 / bf16 / fp16 gradients always means a NaN / Inf gradient)."""
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if not grads:
        return 0.0
    total = math.sqrt(float(grad_sq_sum(grads).item()))
    if math.isfinite(total) or not any(g.dtype == torch.float64 for g in grads):
        return total
    amax = torch.stack(
        [n.to(device=grads[0].device, dtype=torch.float64) for n in torch._foreach_norm(grads, math.inf)]
    ).max()
    amax = float(amax.item())
    if not math.isfinite(amax) or amax == 0.0:
        return total  # a NaN / Inf gradient: the norm is not finite
    acc = 0.0
    for g in grads:
        acc += float(torch.linalg.vector_norm(g / amax, dtype=torch.float64).item()) ** 2
    return amax * math.sqrt(acc)


def global_grad_norm(grads: Sequence[torch.Tensor], group: Any = None, device: Any = None) -> float:
    """L2 norm of ``grads`` summed over the ranks of ``group`` (one all-reduce of an fp64 scalar,
    one host sync), overflow-free for fp32 / bf16 / fp16 gradients (:func:`grad_sq_sum`); the
    Megatron path's replacement of ``get_grad_norm_fp32``, whose fp32 ``norm ** 2`` overflows
    for a finite gradient of 1e20. Without an initialised process group it is the local norm."""
    import torch.distributed as dist

    if device is None and not any(g is not None for g in grads) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    sq = grad_sq_sum(grads, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return math.sqrt(float(sq.item()))


# --------------------------------------------------------------------------- NaN policy names
def nonfinite_param_names(params: Sequence[torch.Tensor], names: Dict[int, str]) -> List[str]:
    """Model names of the parameters whose gradient holds a NaN / Inf (``names``: ``{id: name}``;
    unknown ones as ``<param (shape)>``). If no gradient does (a norm that overflowed), the
    parameter with the largest ``|grad|``, marked as such, so the error always names one."""

    def label(p):
        return names.get(id(p), f"<param {tuple(p.shape)}>")

    with_grad = [p for p in params if p.grad is not None and p.grad.numel() > 0]
    bad = [label(p) for p in with_grad if not bool(torch.isfinite(p.grad).all())]
    if bad or not with_grad:
        return bad
    biggest = max(with_grad, key=lambda p: float(p.grad.abs().max()))
    return [f"{label(biggest)} (all gradients finite; largest |grad| "
            f"{float(biggest.grad.abs().max()):.3e})"]
