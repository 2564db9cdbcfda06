"""Batched-experts pass: every MoE layer's ``SequentialMLP`` -> :class:`BatchedSequentialMLP`.

A speed pass, not an architecture change: the routed experts keep their modules, parameters,
names and checkpoint layout, and compute the same function (up to floating-point summation
order); only the per-expert Python loop of the local spec is replaced by two batched GEMMs per
layer (see :mod:`vpmoe_compile.modules.experts`). Refused before anything changes: expert
tensor parallelism, linear biases on experts, gated (GLU) experts, FP8/FP4.
"""

from __future__ import annotations

from typing import List

from passes.base import Pass, PassContext, PassError, PassResult


class BatchedExpertsPass(Pass):
    name = "batched_experts"
    requires = ("layer_plan",)

    def __init__(self, max_padding_ratio: float = 4.0):
        self.max_padding_ratio = max_padding_ratio

    def check(self, ctx: PassContext) -> None:
        tc = ctx.model.config
        if getattr(tc, "expert_tensor_parallel_size", 1) not in (1, None):
            raise PassError(f"batched experts need expert_tensor_parallel_size = 1, got {tc.expert_tensor_parallel_size}")
        if tc.add_bias_linear:
            raise PassError("batched experts do not support linear biases on experts (add_bias_linear)")
        if tc.gated_linear_unit:
            raise PassError("batched experts do not support gated (GLU) experts yet")
        if getattr(tc, "fp8", None) or getattr(tc, "fp4", None):
            raise PassError("batched experts do not support FP8/FP4")

    def sites(self, ctx: PassContext) -> List[str]:
        return []  # the expert dispatch has data-dependent shapes; no graph is dumped

    def run(self, ctx: PassContext, result: PassResult) -> None:
        from megatron.core.transformer.moe.experts import SequentialMLP

        from vpmoe_compile.modules.experts import BatchedSequentialMLP

        for layer in ctx.plan.layers:
            if layer.mlp != "moe":
                continue
            path = layer.mlp_path + ".experts"
            stock = ctx.model.get_submodule(path)
            if type(stock) is not SequentialMLP:
                raise PassError(f"{path} is {type(stock).__name__}; the batched-experts pass rewrites SequentialMLP")
            new = BatchedSequentialMLP.from_stock(stock, self.max_padding_ratio)
            self.replace_module(ctx.model, path, new, result)
            result.sites.append(path)
        n = ctx.model.get_submodule(result.sites[0]).num_local_experts if result.sites else 0
        result.summary = f"{len(result.sites)} MoE layers: SequentialMLP -> BatchedSequentialMLP ({n} experts each, 2 bmm per layer)"
        result.notes.append("expert parameters unchanged (same tensors, names and checkpoint layout)")
