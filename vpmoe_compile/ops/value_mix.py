"""The value-residual mix on ready values, shared by the TPA op (between its prologue and
attention kernels) and the global layers' attention module: ``lam * v + (1 - lam) * v1`` in fp32,
rounded once to ``v``'s dtype (the reference fork rounds after each bf16 op; this is the
fp32-math form the project's numerics rule compares against)."""

from torch import Tensor

__all__ = ["mix_values"]


def mix_values(v: Tensor, v1: Tensor, lam: Tensor) -> Tensor:
    """``lam * v + (1 - lam) * v1``; ``v, v1 [s, b, G, d]``, ``lam`` 0-d."""
    lamf = lam.float()
    return (lamf * v.float() + (1.0 - lamf) * v1.float()).to(v.dtype)
