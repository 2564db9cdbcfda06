"""Value-residual pass: the reference fork's ``[model] value_residual`` (docs/design.md#value-residual).

Every layer's ``self_attention`` (the GRAPE pass's :class:`VpMoESelfAttention`, or the TPA
pass's :class:`TPASelfAttention` on local layers) shares one
:class:`~vpmoe_compile.modules.value_residual.ValueResidualState`: layer 1 keeps its values
``v_1 [s, b, G, d]``, every later layer ``l`` attends to ``lam_l * v_l + (1 - lam_l) * v_1`` with
``lam_l = sigmoid(value_residual_logit_l)``, one new fp32 scalar parameter per layer after the
first (``decoder.layers.<l>.self_attention.value_residual_logit``, initialised so that
``lam = value_residual_init`` clamped to ``[1e-4, 1 - 1e-4]``). Global layers mix before the sink
flash kernel; local TPA layers mix inside the fused op, between its Triton prologue and attention
kernels, and layer 1's op returns its values.

Refused before anything changes: pipeline parallelism > 1 (every stage would need layer 1's
values, as in the fork), a model without layer 1 (a later pipeline stage), ``value_residual_init``
outside ``[0, 1]``, attention modules the GRAPE pass has not installed.
"""

from __future__ import annotations

from typing import List

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.modules.attention import VpMoESelfAttention
from vpmoe_compile.modules.value_residual import ValueResidualState, initial_logit
from vpmoe_compile.tensor_parallel import tp_world


@register_pass
class ValueResidualPass(Pass):
    name = "value_residual"
    requires = ("layer_plan", "grape")
    after = ("tpa",)
    installs = ("ValueResidualState",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.model.value_residual)

    def check(self, ctx: PassContext) -> None:
        tc, plan = ctx.model.config, ctx.plan
        init = ctx.cfg.model.value_residual_init
        if not 0.0 <= float(init) <= 1.0:
            raise PassError(f"[model] value_residual_init = {init} must be within [0, 1] (the initial mixing weight)")
        if getattr(tc, "pipeline_model_parallel_size", 1) > 1:
            raise PassError(
                "the value residual needs layer 1's values in every layer: pipeline parallelism > 1 is not "
                "supported with [model] value_residual = true (as in the reference fork)"
            )
        numbers = [l.layer_number for l in plan.layers]
        if 1 not in numbers:
            raise PassError(f"the value residual needs layer 1 in the model; this one holds layers {numbers}")

    def sites(self, ctx: PassContext) -> List[str]:
        return [l.attention_path for l in ctx.plan.layers]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        init = float(ctx.cfg.model.value_residual_init)
        state = ValueResidualState()
        tp = tp_world()[0]
        mixed = []
        for layer in ctx.plan.layers:
            attn = ctx.model.get_submodule(layer.attention_path)
            if not isinstance(attn, VpMoESelfAttention):  # (the whole transform is rolled back)
                raise PassError(
                    f"{layer.attention_path} is {type(attn).__name__}: the value residual needs the grape pass's "
                    "attention modules (run 'grape' first)"
                )
            logit = attn.enable_value_residual(state, init, tp)
            if logit is not None:
                mixed.append(layer.layer_number)
            result.sites.append(layer.attention_path)
        result.summary = (
            f"value residual: layer 1 keeps its values; layers {mixed[:3] + ['...'] if len(mixed) > 3 else mixed} "
            f"({len(mixed)}) mix them in with a learnable lambda (init {init:g}, logit {initial_logit(init):.4f})"
        )
        result.data["mixing_layers"] = mixed
        result.data["initial_logit"] = initial_logit(init)
        result.notes.append(
            "global layers mix before the sink kernel; local TPA layers inside the fused op (between its "
            "prologue and attention kernels); layer 1's op returns its values"
        )
