"""NorMuon + Polar Express optimizer for vpMoE (docs/design.md#the-optimizer).

Public API:

* :func:`polar_express_coefficients` -- the offline Polar Express table generator
  (docs/design.md#polar-express).
* :func:`polar_express` -- batched bf16 orthogonalisation of ``[..., m, n]`` matrices.
* :class:`NorMuon` -- a plain ``torch.optim.Optimizer`` over 2-D tensors and 3-D expert stacks
  ``[E, m, n]`` (each a bank in place), batched by shape banks (docs/design.md#the-normuon-update),
  with fused Triton kernels for short-wide banks (:mod:`.pe_triton`) and optional CUDA graphs.
* :func:`routing_table` -- every parameter's optimizer, role, lr and weight decay, as data
  (:mod:`.routing`).
* :func:`build_optimizer` -- NorMuon + AdamW for a model: Megatron wrappers for Megatron-DDP
  models on CUDA, a plain NorMuon + torch AdamW chain otherwise (see :mod:`.build`); settings
  from the ``[optimizer]`` section, overridden by a Megatron ``OptimizerConfig``
  (:mod:`.optimizer_config`); ``MegatronOptimizer``'s interface on both paths.

Modules: ``build`` (chooses the path) -> ``optimizer_config`` (``OptimizerConfig`` fields),
``plain`` (:class:`NorMuonWithAuxAdamW`) and ``megatron_wrappers`` (the Megatron path) ->
``param_groups`` / ``grad_norm`` / ``sharded_state`` (shared helpers) -> ``normuon`` /
``routing`` / ``state_check``. Importable without CUDA; Megatron-Core's optimizer is imported
lazily, only on the Megatron path (and ``dist_checkpointing`` by ``sharded_state_dict``).
"""

from .build import UnsupportedOptimizerSetup, build_optimizer
from .normuon import NorMuon
from .plain import NorMuonWithAuxAdamW
from .polar_express import (
    DEFAULT_COEFFICIENTS,
    PINNED_COEFFICIENTS,
    polar_express,
    polar_express_bounds,
    polar_express_coefficients,
)
from .routing import RoutingError, classify_parameters, routing_table
from .state_check import StateDictMismatch

__all__ = [
    "polar_express_coefficients",
    "polar_express_bounds",
    "polar_express",
    "PINNED_COEFFICIENTS",
    "DEFAULT_COEFFICIENTS",
    "NorMuon",
    "build_optimizer",
    "routing_table",
    "classify_parameters",
    "RoutingError",
    "NorMuonWithAuxAdamW",
    "UnsupportedOptimizerSetup",
    "StateDictMismatch",
]
