"""Model-rewriting passes over a stock Megatron-Core GPT model (one pass per file)."""

from passes.base import Pass, PassContext, PassError, PassManager, PassResult
from passes.fused_head import FusedHeadPass
from passes.global_attention import GlobalAttentionPass
from passes.grape import GrapePass
from passes.layer_plan import LayerInfo, LayerPlan, LayerPlanPass, build_layer_plan
from passes.moe import MoEPass
from passes.optimizer_routing import OptimizerRoutingPass
from passes.tpa import TPAPass

__all__ = [
    "FusedHeadPass",
    "GlobalAttentionPass",
    "GrapePass",
    "LayerInfo",
    "LayerPlan",
    "LayerPlanPass",
    "MoEPass",
    "OptimizerRoutingPass",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "TPAPass",
    "build_layer_plan",
]
