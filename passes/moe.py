"""MoE pass: every MoE layer -> :class:`~vpmoe_compile.modules.moe.GroupedMoELayer`.

A speed pass, not an architecture change: the layer computes the same function as the stock
``MoELayer`` (same router parameters and buffers, same shared expert, same expert weights) with

* the routed experts' ``2·E`` weights (``SequentialMLP``: one ``MLP`` per expert) stacked into
  two tensors, ``experts.linear_fc1.weight [E, F1, h]`` and ``experts.linear_fc2.weight
  [E, h, F]`` (slice ``e`` = stock expert ``e``'s weight; at vpmoe-8l 3,584 tensors become 14),
  computed with two grouped GEMMs;
* a sparse router (``[T, k]`` top-k instead of dense ``[T, E]`` maps) and sort-based dispatch
  with static shapes and no host synchronisation, so a whole layer is one ``torch.compile``
  graph.

Checkpoints keep the stock per-expert layout (see :class:`~vpmoe_compile.modules.moe.GroupedExperts`).
Refused before anything changes: expert tensor parallelism, linear biases on experts, FP8/FP4,
token dropping (capacity factor), Sinkhorn routing, input jitter, router replay, forced load
balancing, MoE latent projections, probabilities applied on the input, experts other than the
local spec's ``SequentialMLP`` (Transformer Engine or legacy ``GroupedMLP``).
"""

from __future__ import annotations

from typing import List

from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.modules.moe import GroupedMoELayer


def _refusals(tc) -> List[str]:
    """What the grouped layer does not implement, as ``'setting (what to do)'`` strings."""
    bad = []
    if (getattr(tc, "expert_tensor_parallel_size", 1) or 1) > 1:
        bad.append(f"expert_tensor_parallel_size = {tc.expert_tensor_parallel_size} (use 1; scale experts with expert parallelism)")
    if tc.add_bias_linear:
        bad.append("add_bias_linear = True (expert biases; set it to False)")
    if getattr(tc, "fp8", None) or getattr(tc, "fp4", None):
        bad.append("fp8 / fp4 training (use bf16)")
    if tc.moe_expert_capacity_factor is not None:
        bad.append(f"moe_expert_capacity_factor = {tc.moe_expert_capacity_factor} (token dropping; use dropless, None)")
    if tc.moe_router_load_balancing_type == "sinkhorn":
        bad.append("moe_router_load_balancing_type = 'sinkhorn'")
    if tc.moe_input_jitter_eps is not None:
        bad.append("moe_input_jitter_eps (input jitter)")
    if getattr(tc, "moe_enable_routing_replay", False):
        bad.append("moe_enable_routing_replay")
    if getattr(tc, "moe_router_force_load_balancing", False):
        bad.append("moe_router_force_load_balancing (benchmark-only random routing)")
    if getattr(tc, "moe_latent_size", None):
        bad.append("moe_latent_size (latent projections need Transformer Engine)")
    if getattr(tc, "moe_apply_probs_on_input", False):
        bad.append("moe_apply_probs_on_input")
    if getattr(tc, "moe_router_fusion", False) or getattr(tc, "moe_permute_fusion", False):
        bad.append("moe_router_fusion / moe_permute_fusion (Transformer Engine kernels)")
    return bad


@register_pass
class MoEPass(Pass):
    """Stock ``MoELayer`` (local spec) -> ``GroupedMoELayer`` on every MoE layer of the plan."""

    name = "moe"
    requires = ("layer_plan",)
    installs = ("GroupedMoELayer",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.moe.num_experts > 0

    def _moe_layers(self, ctx: PassContext):
        return [layer for layer in ctx.plan.layers if layer.mlp == "moe"]

    def check(self, ctx: PassContext) -> None:
        layers = self._moe_layers(ctx)
        if not layers:
            return
        bad = _refusals(ctx.model.config)
        if bad:
            raise PassError(
                "the moe pass cannot rewrite this model's MoE layers: " + "; ".join(bad)
                + ". Change these settings, or leave 'moe' out of passes= to keep the stock MoE layers."
            )
        for layer in layers:
            mlp = ctx.model.get_submodule(layer.mlp_path)
            if isinstance(mlp, GroupedMoELayer) or type(mlp) is not MoELayer:
                raise PassError(f"{layer.mlp_path} is {type(mlp).__name__}; the moe pass rewrites a stock MoELayer")
            if type(mlp.experts) is not SequentialMLP:
                raise PassError(
                    f"{layer.mlp_path}.experts is {type(mlp.experts).__name__}; the moe pass stacks the "
                    "local spec's SequentialMLP experts (build with use_transformer_engine=False, "
                    "moe_grouped_gemm=False)"
                )

    def sites(self, ctx: PassContext) -> List[str]:
        return [layer.mlp_path for layer in self._moe_layers(ctx)]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        layers = self._moe_layers(ctx)
        kernels = ctx.kernel_policy()  # [kernels] grouped_gemm
        before = sum(1 for _ in ctx.model.parameters())
        for layer in layers:
            stock = ctx.model.get_submodule(layer.mlp_path)
            self.replace_module(ctx.model, layer.mlp_path, GroupedMoELayer.from_stock(stock, kernels), result)
            result.sites.append(layer.mlp_path)
        after = sum(1 for _ in ctx.model.parameters())
        if not layers:
            result.summary = "no MoE layers"
            return
        first = ctx.model.get_submodule(layers[0].mlp_path)
        E = first.experts.num_local_experts
        fast = "sort-based dispatch" if first.sort_dispatch else "Megatron's token dispatcher (expert/tensor parallel)"
        result.summary = (
            f"{len(layers)} MoE layers: SequentialMLP ({E} experts) -> 2 stacked weights + grouped GEMM, "
            f"sparse router, {fast}; {before:,} -> {after:,} parameter tensors"
        )
        result.data["parameter_tensors"] = {"before": before, "after": after}
        result.data["experts_per_layer"] = E
        result.data["grouped_mm_backend"] = kernels.grouped_gemm
        result.notes.append(
            "expert weights stacked (same values: slice e of experts.linear_fcX.weight is the stock "
            "local_experts.e.linear_fcX.weight); router and shared expert are the same tensors"
        )
        result.notes.append(
            "torch_dist checkpoints keep the stock per-expert layout (key …experts.experts.linear_fcX.weight, "
            "experts on axis 0); plain stock state dicts with per-expert keys load too"
        )
