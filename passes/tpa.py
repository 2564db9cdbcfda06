"""TPA pass: Tensor Product Attention on every local layer of the layer plan.

For each local layer, ``self_attention`` (the GRAPE pass's :class:`VpMoESelfAttention`) becomes
:class:`TPASelfAttention` with

* ``linear_qkv``: ``ColumnParallelLinear [(H+2G)*d, h]`` -> :class:`TPAFactorProjection`, one
  packed factor weight ``[H*Rq + 2*G*R + (Rq+2R)*d, h]`` (ranks and init from ``[tpa]``); the
  stock QKV bias is carried over (same parameter, same name);
* ``core_attention``: ``DotProductAttention`` -> :class:`TPACoreAttention`, the fused op from
  factors to output (bias, QK RMSNorm, GRAPE-M, window, sink), the stock sink carried over.

Global layers are untouched. Refused before anything changes (TP / PP > 1 and per-head GRAPE by
the grape pass, a prerequisite): ranks that are not powers of two (``/R`` must be exact in bf16),
attention dropout, no window, an unsupported QK norm, and ``[kernels] attention = "triton"`` where the Triton kernels
cannot run the shapes (the kernel policy asks the kernels' own ``supports``; with ``"auto"`` the
local layers then run the op's PyTorch reference, and the pass notes it).
"""

from __future__ import annotations

from typing import List

import torch

from passes.base import Pass, PassContext, PassError, PassResult
from passes.registry import register_pass
from vpmoe_compile.kernels import KernelPolicyError
from vpmoe_compile.modules.attention import VpMoESelfAttention
from vpmoe_compile.modules.tpa import TPACoreAttention, TPAFactorProjection, TPASelfAttention


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _kernel_shapes(head_dim: int, tpa_cfg) -> dict:
    """The named sizes the TPA kernels' ``supports`` judges."""
    return {"head_dim": head_dim, "q_rank": tpa_cfg.tpa_q_rank, "kv_rank": tpa_cfg.tpa_rank}


@register_pass
class TPAPass(Pass):
    name = "tpa"
    requires = ("layer_plan", "grape")
    installs = ("TPASelfAttention", "TPAFactorProjection", "TPACoreAttention")

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.tpa.use_tpa)

    def check(self, ctx: PassContext) -> None:
        # TP = PP = 1 and head-shared GRAPE-M frequencies are the grape pass's preconditions
        # (a prerequisite of this pass), checked there once.
        t, tcfg = ctx.cfg.tpa, ctx.model.config
        for key, r in (("tpa_q_rank", t.tpa_q_rank), ("tpa_rank", t.tpa_rank)):
            if not _pow2(r):
                raise PassError(
                    f"[tpa] {key} = {r}: the kernel needs a power-of-two rank (1, 2, 4, 8, ...) so "
                    "the 1/R scaling is exact in bf16"
                )
        if tcfg.attention_dropout:
            raise PassError("the fused TPA kernel has no attention dropout; set attention_dropout = 0.0")
        for layer in ctx.plan.local_layers:
            if layer.window is None or layer.window[1] != 0:
                raise PassError(
                    f"TPA local layers need a causal window (W-1, 0); layer {layer.layer_number} has {layer.window}"
                )
        d = ctx.plan.head_dim
        if not _pow2(d):
            raise PassError(f"the TPA op needs a power-of-two head dim, got {d}")

        try:
            ctx.kernel_policy().backend("tpa_attention", _kernel_shapes(d, t))
        except KernelPolicyError as exc:
            raise PassError(f"TPA: {exc}") from None
        if tcfg.qk_layernorm and tcfg.normalization != "RMSNorm":
            raise PassError("TPA's fused QK-norm is RMSNorm; the model uses " + tcfg.normalization)
        if getattr(tcfg, "qk_l2_norm", False):
            raise PassError("qk_l2_norm is not supported by the fused TPA kernel")

    def sites(self, ctx: PassContext) -> List[str]:
        return [l.attention_path for l in ctx.plan.local_layers]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        model, cfg, plan = ctx.model, ctx.cfg, ctx.plan
        tcfg = model.config
        windows = {layer.window[0] + 1 for layer in plan.local_layers}  # W tokens incl. the current one
        if len(windows) > 1:
            raise PassError(f"TPA needs one window for all local layers, the plan has {sorted(windows)}")
        (window,) = windows or {0}
        kernels = ctx.kernel_policy()
        backend = kernels.backend("tpa_attention", _kernel_shapes(plan.head_dim, cfg.tpa))
        if backend != kernels.attention:  # "auto" where the kernels cannot run these shapes
            result.notes.append(
                f"head_dim {plan.head_dim} / ranks ({cfg.tpa.tpa_q_rank}, {cfg.tpa.tpa_rank}) are outside the "
                "Triton kernels' tiles: the local layers use the PyTorch reference of the fused op"
            )
        for layer in plan.local_layers:
            prev = model.get_submodule(layer.attention_path)
            if not isinstance(prev, VpMoESelfAttention) or not prev.rotate:
                raise PassError(f"{layer.attention_path} is {type(prev).__name__}; run the grape pass first")
            qn, kn = prev.q_layernorm, prev.k_layernorm
            eps = getattr(qn, "eps", None) or tcfg.layernorm_epsilon
            if getattr(kn, "eps", eps) not in (eps, None):
                raise PassError(f"{layer.attention_path}: q and k RMSNorm eps differ ({eps} vs {kn.eps})")
            for norm in (qn, kn):
                w = getattr(norm, "weight", None)
                if w is not None and not isinstance(norm, torch.nn.RMSNorm):
                    raise PassError(f"{layer.attention_path}: QK norm {type(norm).__name__} is not RMSNorm")
            new_sa = TPASelfAttention(prev)
            self.replace_module(model, layer.attention_path, new_sa, result)
            proj = TPAFactorProjection(
                tcfg,
                num_heads=plan.num_attention_heads,
                num_groups=plan.num_query_groups,
                head_dim=plan.head_dim,
                q_rank=cfg.tpa.tpa_q_rank,
                kv_rank=cfg.tpa.tpa_rank,
                bias=getattr(prev.linear_qkv, "bias", None),
                init=cfg.tpa.tpa_init,
                device=prev.linear_qkv.weight.device,
                dtype=prev.linear_qkv.weight.dtype,
            )
            # a frozen QKV projection gives a frozen factor projection (the user froze attention)
            proj.weight.requires_grad_(prev.linear_qkv.weight.requires_grad)
            self.replace_module(model, layer.attention_path + ".linear_qkv", proj, result)
            core = TPACoreAttention(
                prev.core_attention, window=window, q_rank=cfg.tpa.tpa_q_rank, kv_rank=cfg.tpa.tpa_rank,
                eps=eps, kernels=kernels,
            )
            self.replace_module(model, layer.attention_path + ".core_attention", core, result)
            result.sites.append(layer.attention_path)
        rows = proj.rows if plan.local_layers else ()
        result.summary = (
            f"TPA (q rank {cfg.tpa.tpa_q_rank}, kv rank {cfg.tpa.tpa_rank}, window {window}) on "
            f"{len(result.sites)} local layers {[l.layer_number for l in plan.local_layers]}"
        )
        result.data["factor_rows"] = [list(r) for r in rows]
        result.data["kernels"] = {"backend": backend}
        result.notes.append(
            "linear_qkv.weight is one packed factor weight per layer (rows: "
            + ", ".join(f"{n} {r}" for n, r in rows) + "); the QKV bias and the sink are carried over"
        )
