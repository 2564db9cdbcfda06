"""Model-rewriting passes over a stock Megatron-Core GPT model (one pass per file).

Importing this package registers the library's passes (:mod:`passes.registry`), in this order,
which is also the tie-break order of the pipeline.
"""

from passes.base import AFTER_ALL, Pass, PassContext, PassError, PassManager, PassRecord, PassResult
from passes.layer_plan import LayerInfo, LayerPlan, LayerPlanPass, build_layer_plan
from passes.global_attention import GlobalAttentionPass
from passes.grape import GrapePass
from passes.tpa import TPAPass
from passes.value_residual import ValueResidualPass
from passes.moe import MoEPass
from passes.fused_head import FusedHeadPass
from passes.linear_bias import LinearBiasPass
from passes.optimizer_routing import OptimizerRoutingPass
from passes.registry import order_passes, register_pass, registered_passes, unregister_pass

__all__ = [
    "AFTER_ALL",
    "PassRecord",
    "order_passes",
    "register_pass",
    "registered_passes",
    "unregister_pass",
    "FusedHeadPass",
    "GlobalAttentionPass",
    "GrapePass",
    "LayerInfo",
    "LayerPlan",
    "LayerPlanPass",
    "MoEPass",
    "LinearBiasPass",
    "ValueResidualPass",
    "OptimizerRoutingPass",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "TPAPass",
    "build_layer_plan",
]
