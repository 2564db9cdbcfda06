"""Linear-bias pass: the reference fork's ``[model] add_bias_linear`` on the transformed model
(docs/design.md#linear-biases).

Stock megatron-core 0.16.1 cannot build these biases together with a shared expert
(``SharedExpertMLP`` asserts) nor train biased ``SequentialMLP`` experts (an in-place add on a
custom autograd output), so ``build_stock_gpt`` builds the stock model without them (the QKV bias
stays: ``add_qkv_bias`` or ``add_bias_linear``) and this pass adds, with Megatron's names, shapes,
parallel attributes and initialisation:

* ``self_attention.linear_proj.bias [h]`` (``RowParallelLinear``: replicated, returned for the
  layer's bias-dropout-add), zeros;
* dense MLP ``linear_fc1.bias [ffn / tp]`` (TP-split, added before the activation) and
  ``linear_fc2.bias [h]``, zeros;
* MoE layers (after the ``moe`` pass): ``router.bias [E]`` (fp32 logits bias, ``init_method`` as
  Megatron's ``TopKRouter``); the grouped experts' ``linear_fc1.bias [E, F]`` (before the
  activation) and ``linear_fc2.bias [E, h]`` (scaled by the routing probability, as Megatron's
  expert MLP), zeros, saved in the stock per-expert layout ``experts.linear_fcX.bias``; the shared
  expert's ``linear_fc1.bias`` / ``linear_fc2.bias``, zeros. The shared expert adds its ``fc2``
  bias to its output (the fork keeps the parameter but drops it in ``SharedExpertMLP.forward``).

A bias that already exists is left as it is. Refused before anything changes: MoE layers the
``moe`` pass has not rewritten (stock biased experts cannot train).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.modules.moe import BiasedSharedExpertMLP, GroupedMoELayer


def _bias(n: int, like: torch.Tensor, *, tp_split: bool, dtype: Optional[torch.dtype] = None) -> torch.nn.Parameter:
    """A zero bias ``[n]`` beside weight ``like`` with Megatron's attributes (TP-split on axis 0 for
    a ``ColumnParallelLinear``, replicated for a ``RowParallelLinear``; reduced like the weight)."""
    b = torch.nn.Parameter(torch.zeros(n, dtype=dtype or like.dtype, device=like.device))
    b.tensor_model_parallel = bool(tp_split)
    b.partition_dim = 0 if tp_split else -1
    b.partition_stride = 1
    b.allreduce = getattr(like, "allreduce", True)
    if getattr(like, "sequence_parallel", False) and not tp_split:
        b.sequence_parallel = True
    return b


@register_pass
class LinearBiasPass(Pass):
    name = "linear_bias"
    requires = ("layer_plan",)
    after = ("moe", "tpa", "grape", "global_attention", "value_residual")
    installs = ("BiasedSharedExpertMLP",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.model.add_bias_linear)

    def sites(self, ctx: PassContext) -> List[str]:
        return [l.attention_path for l in ctx.plan.layers] + [l.mlp_path for l in ctx.plan.layers]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        model = ctx.model
        added = {"linear_proj": 0, "dense_mlp": 0, "router": 0, "experts": 0, "shared_expert": 0}
        for layer in ctx.plan.layers:
            proj = model.get_submodule(layer.attention_path + ".linear_proj")
            if proj.bias is None:
                proj.bias = _bias(proj.weight.shape[0], proj.weight, tp_split=False)
                added["linear_proj"] += 1
            mlp = model.get_submodule(layer.mlp_path)
            if isinstance(mlp, MoELayer):
                if not isinstance(mlp, GroupedMoELayer):  # (the whole transform is rolled back)
                    raise PassError(
                        f"{layer.mlp_path}: expert biases need the moe pass's grouped experts (stock SequentialMLP "
                        "experts with biases cannot train in megatron-core 0.16.1); keep 'moe' in the pipeline"
                    )
                added["router"] += self._router_bias(mlp.router)
                added["experts"] += mlp.experts.add_biases()
                shared = getattr(mlp, "shared_experts", None)
                if shared is not None:
                    if not isinstance(shared, SharedExpertMLP):
                        raise PassError(f"{layer.mlp_path}.shared_experts is {type(shared).__name__}, not SharedExpertMLP")
                    if getattr(shared, "use_shared_expert_gate", False):
                        raise PassError(f"{layer.mlp_path}: a gated shared expert with biases is not supported")
                    added["shared_expert"] += self._mlp_biases(shared)
                    shared.__class__ = BiasedSharedExpertMLP
            else:
                added["dense_mlp"] += self._mlp_biases(mlp)
            result.sites.append(layer.attention_path)
            result.sites.append(layer.mlp_path)
        result.summary = (
            "linear biases (add_bias_linear): "
            + ", ".join(f"{k} {v}" for k, v in added.items() if v)
            + " (zeros; the router's from its init_method)"
        )
        result.data["added"] = added

    @staticmethod
    def _mlp_biases(mlp) -> int:
        n = 0
        if mlp.linear_fc1.bias is None:
            w = mlp.linear_fc1.weight
            mlp.linear_fc1.bias = _bias(w.shape[0], w, tp_split=True)
            n += 1
        if mlp.linear_fc2.bias is None:
            w = mlp.linear_fc2.weight
            mlp.linear_fc2.bias = _bias(w.shape[0], w, tp_split=False)
            n += 1
        return n

    @staticmethod
    def _router_bias(router) -> int:
        if getattr(router, "bias", None) is not None:
            return 0
        w = router.weight
        b = torch.nn.Parameter(torch.empty(w.shape[0], dtype=torch.float32, device=w.device))
        if b.device.type != "meta" and router.config.perform_initialization:
            with torch.no_grad():
                router.config.init_method(b)  # Megatron's TopKRouter.reset_parameters
        b.data = b.data.to(dtype=w.dtype)
        for key in ("sequence_parallel", "allreduce"):
            if hasattr(w, key):
                setattr(b, key, getattr(w, key))
        router.bias = b
        return 1
