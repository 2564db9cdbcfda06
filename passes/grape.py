"""GRAPE pass: GRAPE-M on local layers, GRAPE-A (ALiBi) on global layers (docs/design.md#grape).

* ``model.rotary_pos_emb``: stock ``RotaryEmbedding`` -> :class:`GrapeMRotaryEmbedding`, one
  learnable fp32 ``log_freq [d/2]`` for the whole model (state-dict key
  ``rotary_pos_emb.log_freq``), initialised to RoPE with the config's base.
* local layers: ``self_attention`` -> :class:`VpMoESelfAttention` (rotate=True): QK-norm, then
  the GRAPE-M rotation in fp32 (Megatron's non-interleaved planes) from the model-level angles.
* global layers: ``self_attention`` -> :class:`VpMoESelfAttention` (rotate=False: no rotary) and
  :class:`GrapeA` (fixed ALiBi slopes) installed in the global core attention, which the
  ``global_attention`` pass has made the sink flash kernel (prerequisite).

Under pipeline parallelism every stage has its own ``rotary_pos_emb``: ``log_freq`` is marked
``pipeline_parallel`` and ``config.has_cond_embedder`` is set, so Megatron's
``finalize_model_grads`` all-reduces its gradient over the pipeline group and the copies stay
equal (like tied embeddings); the first stage's copy is the checkpoint's main replica.

Under tensor parallelism each rank holds whole query groups (Megatron's head split): ALiBi slopes
per local head, the sinks as Megatron shards them, and ``log_freq`` replicated with its gradient
summed over the TP group inside autograd (docs/design.md#tensor-parallelism).

Refused before anything changes: per-head frequencies, a model without a rotary table
(``position_embedding_type`` other than ``'rope'``), a TP size that does not divide the query
groups, the virtual pipeline schedule, MLA.
"""

from __future__ import annotations

from typing import List

from megatron.core import parallel_state

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.modules.attention import SinkCoreAttention, VpMoESelfAttention
from vpmoe_compile.modules.grape import GrapeA, GrapeMRotaryEmbedding, share_across_pipeline_stages


@register_pass
class GrapePass(Pass):
    name = "grape"
    requires = ("layer_plan", "global_attention")
    installs = ("GrapeMRotaryEmbedding", "VpMoESelfAttention", "GrapeA")

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.attention.position_embedding_type == "grapem"

    def check(self, ctx: PassContext) -> None:
        model, g = ctx.model, ctx.cfg.grape
        tcfg = model.config
        if not g.grapem_share_across_heads:
            raise PassError(
                "per-head GRAPE-M frequencies ([grape] grapem_share_across_heads = false) are not "
                "supported: TPA's B factors are shared by all heads, so one rotation per position "
                "is required. Set grapem_share_across_heads = true."
            )
        if getattr(model, "position_embedding_type", None) != "rope":
            raise PassError(
                f"the model was built with position_embedding_type={getattr(model, 'position_embedding_type', None)!r}; "
                "GRAPE-M replaces the rotary table GPTModel hands to every layer, so build the "
                "base with position_embedding_type='rope' (build_stock_gpt does)"
            )
        if getattr(tcfg, "multi_latent_attention", False):
            raise PassError("multi-latent attention models are not supported by the GRAPE pass")
        tp = tcfg.tensor_model_parallel_size
        groups = tcfg.num_query_groups or tcfg.num_attention_heads
        if tp > 1 and groups % tp:
            raise PassError(
                f"tensor parallelism {tp} does not divide the {groups} query groups: each TP rank "
                "must hold whole groups (their heads, ALiBi slopes and sinks); pick a TP size that "
                "divides num_query_groups"
            )
        if getattr(tcfg, "virtual_pipeline_model_parallel_size", None):
            raise PassError("the virtual (interleaved) pipeline schedule is not supported; use PP without VPP")
        if tcfg.kv_channels % 2:
            raise PassError(f"GRAPE-M needs an even head dim, got {tcfg.kv_channels}")
        if getattr(tcfg, "attention_output_gate", False):
            raise PassError("attention_output_gate is not supported by the vpMoE attention modules")
        if getattr(tcfg, "recompute_granularity", None) == "selective" and "core_attn" in (
            getattr(tcfg, "recompute_modules", None) or []
        ):
            raise PassError(
                "selective recompute of core_attn is not supported by the vpMoE attention modules "
                "(the flash kernels already avoid storing [s, s] scores); remove 'core_attn' from "
                "recompute_modules"
            )

    def sites(self, ctx: PassContext) -> List[str]:
        return ["rotary_pos_emb"] + [l.attention_path for l in ctx.plan.layers]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        model, cfg, plan = ctx.model, ctx.cfg, ctx.plan
        device = next(model.parameters()).device
        old_rope = getattr(model, "rotary_pos_emb", None)
        grape_m = GrapeMRotaryEmbedding(
            kv_channels=plan.head_dim,
            rotary_base=cfg.attention.rotary_base,
            log_freq_scale=cfg.grape.grapem_log_freq_scale,
            learnable=cfg.grape.grapem_learnable_freq,
            share_across_heads=True,
            cp_group=getattr(old_rope, "cp_group", None),
            device=device,
        )
        if getattr(grape_m, "log_freq", None) is not None:
            # follow the parameters it serves: frozen if every local layer's attention is frozen
            local_params = [
                p for l in plan.local_layers for p in model.get_submodule(l.attention_path).parameters()
            ]
            if local_params and not any(p.requires_grad for p in local_params):
                grape_m.log_freq.requires_grad_(False)
        self.replace_module(model, "rotary_pos_emb", grape_m, result)
        result.sites.append("rotary_pos_emb")
        if share_across_pipeline_stages(grape_m, model.config):
            result.notes.append(
                "pipeline parallel: every stage holds log_freq; finalize_model_grads all-reduces its "
                "gradient over the pipeline group (pipeline_parallel + config.has_cond_embedder)"
            )

        tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.is_initialized() else 0
        for layer in plan.layers:
            stock = model.get_submodule(layer.attention_path)
            new = VpMoESelfAttention(stock, rotate=layer.is_local)
            self.replace_module(model, layer.attention_path, new, result)
            result.sites.append(layer.attention_path)
            if not layer.is_local and cfg.grape.grape_a:
                core = new.core_attention
                if not isinstance(core, SinkCoreAttention):
                    raise PassError(
                        f"{layer.attention_path}.core_attention is {type(core).__name__}; GRAPE-A "
                        "needs the global_attention pass's SinkCoreAttention"
                    )
                core.grape_a = GrapeA(
                    plan.num_attention_heads, tp_rank=tp_rank, tp_size=plan.tensor_model_parallel_size, device=device
                )
        loc = [l.layer_number for l in plan.local_layers]
        glo = [l.layer_number for l in plan.global_layers]
        result.summary = (
            f"GRAPE-M (learnable={cfg.grape.grapem_learnable_freq}, log_freq_scale="
            f"{cfg.grape.grapem_log_freq_scale:g}) on local layers {loc}; "
            + (f"GRAPE-A (ALiBi) on global layers {glo}" if cfg.grape.grape_a else f"no GRAPE-A: global layers {glo} are NoPE")
        )
        result.data["grape_m_layers"] = loc
        result.data["grape_a_layers"] = glo if cfg.grape.grape_a else []
        if cfg.grape.grape_a and plan.global_layers:
            slopes = model.get_submodule(plan.global_layers[0].attention_path + ".core_attention").grape_a.slopes
            result.data["alibi_slopes"] = [float(s) for s in slopes.float().cpu()] if slopes.device.type != "meta" else []
        result.notes.append(
            "log_freq is one fp32 [d/2] parameter shared by all local layers and heads "
            "(rotary_pos_emb.log_freq); angles and cos/sin are fp32, no cache across steps"
        )
