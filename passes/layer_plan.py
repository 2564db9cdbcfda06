"""Read-only analysis pass: the layer plan.

For every transformer layer: its 1-based global ``layer_number``, local (sliding-window) or
global attention, dense or MoE MLP, and the module paths of its attention and MLP sites.
Local/global comes from the model's own ``TransformerConfig`` through Megatron's
``is_layer_window_attention`` (the same helper stock attention uses), dense/MoE from
``moe_layer_freq``; both are cross-checked against the modules actually present. Every later
pass takes its sites from this plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.utils import is_layer_window_attention

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass


@dataclass
class LayerInfo:
    index: int  # position in decoder.layers
    layer_number: int  # 1-based, global (pipeline offset included)
    kind: str  # "local" | "global"
    mlp: str  # "dense" | "moe"
    attention_path: str
    mlp_path: str
    window: Optional[Tuple[int, int]]  # Megatron (left, right) on local layers

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


@dataclass
class LayerPlan:
    layers: List[LayerInfo]
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int
    tensor_model_parallel_size: int
    spec: str  # "local" (torch/Megatron local modules) — the TE spec is refused for now

    @property
    def local_layers(self) -> List[LayerInfo]:
        return [l for l in self.layers if l.kind == "local"]

    @property
    def global_layers(self) -> List[LayerInfo]:
        return [l for l in self.layers if l.kind == "global"]

    def table(self) -> List[dict]:
        return [asdict(l) for l in self.layers]


def _moe_flags(config, num_layers: int) -> List[bool]:
    freq = getattr(config, "moe_layer_freq", 1)
    if not getattr(config, "num_moe_experts", None):
        return [False] * num_layers
    if isinstance(freq, int):
        return [(i % freq) == 0 for i in range(num_layers)]
    return [bool(x) for x in freq]


def build_layer_plan(model) -> LayerPlan:
    """Derive the plan from ``model.config`` and cross-check it against the module tree."""

    config = model.config
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise PassError("model has no decoder.layers: not a Megatron GPTModel decoder")
    flags = _moe_flags(config, config.num_layers)
    layers = []
    for idx, layer in enumerate(decoder.layers):
        ln = int(layer.layer_number)
        attn = layer.self_attention
        cls_names = {type(m).__name__ for m in attn.modules()}
        if any(n.startswith("TE") for n in cls_names):
            raise PassError(
                f"decoder.layers.{idx} uses Transformer Engine modules ({sorted(n for n in cls_names if n.startswith('TE'))}); "
                "vpmoe-compile v1 supports the local (non-TE) spec only: build the model with "
                "get_gpt_decoder_block_spec(config, use_transformer_engine=False)"
            )
        if not isinstance(attn, SelfAttention) and not getattr(attn, "_vpmoe_attention", False):
            raise PassError(f"decoder.layers.{idx}.self_attention is {type(attn).__name__}, not SelfAttention")
        local = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, ln)
        is_moe = isinstance(layer.mlp, MoELayer)
        if ln - 1 >= len(flags) or flags[ln - 1] != is_moe:
            raise PassError(
                f"layer {ln}: config.moe_layer_freq says {'MoE' if ln - 1 < len(flags) and flags[ln - 1] else 'dense'} "
                f"but the module is {type(layer.mlp).__name__}; the model does not match its config"
            )
        if getattr(layer, "is_moe_layer", is_moe) != is_moe:
            raise PassError(f"layer {ln}: is_moe_layer disagrees with the MLP module")
        if local:
            core = attn.core_attention
            sms = getattr(core, "scale_mask_softmax", None)
            if sms is not None and getattr(sms, "window_size", None) is None:
                raise PassError(f"layer {ln} should be a window layer but its core attention has no window")
        layers.append(
            LayerInfo(
                index=idx,
                layer_number=ln,
                kind="local" if local else "global",
                mlp="moe" if is_moe else "dense",
                attention_path=f"decoder.layers.{idx}.self_attention",
                mlp_path=f"decoder.layers.{idx}.mlp",
                window=tuple(config.window_size) if local else None,
            )
        )
    return LayerPlan(
        layers=layers,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        hidden_size=config.hidden_size,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        spec="local",
    )


@register_pass
class LayerPlanPass(Pass):
    """Read-only: computes ``ctx.plan`` (see module docstring)."""

    name = "layer_plan"
    read_only = True

    def check(self, ctx: PassContext) -> None:
        # Computing the plan early lets every later pass's check() use it.
        ctx.plan = build_layer_plan(ctx.model)

    def run(self, ctx: PassContext, result: PassResult) -> None:
        plan = ctx.plan = ctx.plan or build_layer_plan(ctx.model)
        result.data["plan"] = plan.table()
        loc = [l.layer_number for l in plan.local_layers]
        glo = [l.layer_number for l in plan.global_layers]
        moe = [l.layer_number for l in plan.layers if l.mlp == "moe"]
        result.summary = (
            f"{len(plan.layers)} layers: {len(loc)} local (window), {len(glo)} global; "
            f"{len(moe)} MoE, {len(plan.layers) - len(moe)} dense"
        )
        result.notes.append(f"local layers: {loc}")
        result.notes.append(f"global layers: {glo}")
        result.notes.append(
            f"heads {plan.num_attention_heads}, query groups {plan.num_query_groups}, "
            f"head dim {plan.head_dim}, TP {plan.tensor_model_parallel_size}"
        )
