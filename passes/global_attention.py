"""Global attention pass: global layers' ``core_attention`` becomes :class:`SinkCoreAttention`.

The stock ``DotProductAttention`` of every global (full causal) layer is replaced by a module
calling the Triton flash kernel ``vpmoe_compile.ops.sink_attention`` (causal, GQA without
expanding K/V, learnable sink; ALiBi once the GRAPE pass installs GRAPE-A), or its PyTorch
reference, as the transform's kernel policy says (``[kernels] attention``). The stock learnable
offset parameter is carried over as the sink: the same ``nn.Parameter`` object under the same
name (``...core_attention.softmax_offset``), so values, optimizer routing and checkpoints are
unchanged. On its own this pass changes no semantics (stock masks with -10000, the kernel with
-inf: identical for any finite logits).
"""

from __future__ import annotations

from typing import List

from megatron.core.transformer.dot_product_attention import DotProductAttention

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.kernels import KernelPolicyError
from vpmoe_compile.modules.attention import SinkCoreAttention


@register_pass
class GlobalAttentionPass(Pass):
    name = "global_attention"
    requires = ("layer_plan",)
    installs = ("SinkCoreAttention",)

    def check(self, ctx: PassContext) -> None:
        cfg = ctx.model.config
        if cfg.attention_dropout:
            raise PassError(
                f"attention_dropout = {cfg.attention_dropout}: the sink attention kernel has no "
                "dropout; build the model with [attention] attention_dropout = 0.0"
            )
        if cfg.softmax_type not in ("learnable", "vanilla", "off-by-one"):
            raise PassError(f"softmax_type {cfg.softmax_type!r} is not supported")

        try:
            ctx.kernel_policy().backend("sink_attention", {"head_dim": cfg.kv_channels})
        except KernelPolicyError as exc:
            raise PassError(f"global attention: {exc}") from None

    def sites(self, ctx: PassContext) -> List[str]:
        return [l.attention_path + ".core_attention" for l in ctx.plan.global_layers]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        kernels = ctx.kernel_policy()
        backend = None
        for layer in ctx.plan.global_layers:
            path = layer.attention_path + ".core_attention"
            stock = ctx.model.get_submodule(path)
            if not isinstance(stock, DotProductAttention):
                raise PassError(f"{path} is {type(stock).__name__}, expected the stock DotProductAttention")
            core = SinkCoreAttention(stock, kernels)
            backend = core.backend
            self.replace_module(ctx.model, path, core, result)
            result.sites.append(path)
        result.summary = (
            f"{len(result.sites)} global layers: DotProductAttention -> SinkCoreAttention "
            f"(flash kernel, causal + sink, backend={backend or kernels.attention})"
        )
        result.notes.append("softmax_offset carried over as the sink (same parameter, same name)")
