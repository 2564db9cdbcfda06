"""The value residual of the reference vpMoE fork (docs/design.md#value-residual).

Layer 1's attention values ``v_1 [s, b, G, d]`` (after the QKV projection and its bias; values are
never normalised or rotated) are kept for the forward; every later layer ``l`` attends to

    v_l' = lam_l * v_l + (1 - lam_l) * v_1,        lam_l = sigmoid(value_residual_logit_l)

with one learnable fp32 scalar logit per layer after the first (``value_residual_init`` is
``lam`` at initialisation, clamped to ``[1e-4, 1 - 1e-4]``), on local (TPA) and global layers
alike. The logit lives on the layer's ``self_attention`` (checkpoint key
``decoder.layers.<l>.self_attention.value_residual_logit``, the fork's name).

* :class:`ValueResidualState` — the one object every attention module of a model shares: layer 1
  writes ``value`` in its forward, the later layers read it (layer 1 always runs first in a
  forward pass, so each forward overwrites it before anyone reads it).
* :func:`initial_logit` — the fork's initialisation.
* :func:`mixing_weight` — ``lam`` in fp32 from the logit (under tensor parallelism the logit is
  copied into the TP region, so its gradient sums the ranks' heads).
The mix itself (fp32 math, rounded once) is :func:`vpmoe_compile.ops.value_mix.mix_values`, used
on ready values by the global layers and inside the TPA op between its prologue and attention
kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vpmoe_compile.tensor_parallel import into_tp_region

__all__ = ["ValueResidualState", "initial_logit", "mixing_weight", "LAMBDA_EPS"]

#: the fork's clamp of ``value_residual_init`` before the logit is taken
LAMBDA_EPS = 1e-4


class ValueResidualState:
    """Holder of layer 1's values for the current forward pass (``value``: ``[s, b, G, d]`` or
    None before layer 1 has run). Not a module: it holds no parameters and is not saved."""

    __slots__ = ("value",)

    def __init__(self):
        self.value: Optional[Tensor] = None

    def read(self, layer_number: int) -> Tensor:
        if self.value is None:
            raise RuntimeError(
                f"layer {layer_number}: the value residual needs layer 1's values, but layer 1 has not run in "
                "this forward pass (the model must run its first layer first: no pipeline parallelism)"
            )
        return self.value


def initial_logit(init: float) -> float:
    """``log(lam / (1 - lam))`` of ``lam = clamp(init, 1e-4, 1 - 1e-4)`` (the fork's rule)."""
    lam = min(max(float(init), LAMBDA_EPS), 1.0 - LAMBDA_EPS)
    return math.log(lam / (1.0 - lam))


def mixing_weight(logit: Tensor, tp_size: int = 1) -> Tensor:
    """``sigmoid(logit)`` in fp32 (0-d). With ``tp_size > 1`` the logit first enters the TP region
    (identity forward, gradient all-reduced over the TP group: every rank's heads use it)."""
    if tp_size > 1:
        logit = into_tp_region(logit)
    return torch.sigmoid(logit.float())
