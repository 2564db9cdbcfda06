"""``transform(model)``: rewrite a stock Megatron-Core GPT model into vpMoE, in place.

The default pipeline (each pass in its own file under ``passes/``)::

    layer_plan        read-only: per layer local/global, dense/MoE, sites
    global_attention  global layers: DotProductAttention -> flash kernel (causal + sink)
    grape             GRAPE-M on local layers, GRAPE-A (ALiBi) on global layers
    tpa               local layers: TPA factor projection + fused window/sink kernel
    moe               MoE layers: stacked experts + grouped GEMM, sparse router, sort-based
                      dispatch (same function and checkpoint layout; a speed pass)
    optimizer_routing read-only: the NorMuon/AdamW routing table of every parameter

``transform`` must run before DDP / distributed-optimizer / Float16Module wrapping (parameters
created afterwards would never be reduced or updated) and refuses a wrapped model, a model that
is not a ``GPTModel`` and a model it already transformed. It is all-or-nothing: on any error the
model's modules, parameters and buffers are exactly as before.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from megatron_base.config import VpMoEConfig, load_config
from vpmoe_compile.kernels import KernelPolicy
from passes.base import Pass, PassContext, PassError, PassManager, PassRecord
from passes.registry import order_passes, registered_passes

DUMP_ENV = "VPMOE_DUMP_DIR"


class TransformError(PassError):
    """``transform`` refused the model; nothing was changed."""


@dataclass
class TransformRecord:
    """Attached to a transformed model as ``model.vpmoe_transform``."""

    passes: List[str]
    results: List[PassRecord]
    config_source: str
    time_s: float
    dump_dir: Optional[str] = None
    plan: Any = None
    kernels: Optional[KernelPolicy] = None  # the kernel policy the passes handed to the modules

    def summary(self) -> str:
        lines = [f"vpmoe_compile.transform: {len(self.passes)} passes in {self.time_s:.2f} s"]
        for r in self.results:
            delta = ""
            if r.params_added or r.params_removed:
                delta = f"  [+{r.params_added_count:,} / -{r.params_removed_count:,} params]"
            lines.append(f"  {r.name:<18} {r.summary}{delta}")
        if self.dump_dir:
            lines.append(f"  debug dump: {self.dump_dir}/index.md")
        return "\n".join(lines)


def available_passes() -> Dict[str, Pass]:
    """One instance of every registered pass, by name (registration order). Kernel choices are
    not a pass's: every pass reads the transform's :class:`~vpmoe_compile.kernels.KernelPolicy`
    from its context."""
    return {name: cls() for name, cls in registered_passes().items()}


def default_pipeline(cfg: VpMoEConfig, extra: Sequence[str] = ()) -> List[Pass]:
    """The registered passes the config enables (``Pass.enabled(cfg)``) plus ``extra`` ones, in
    the order their ``requires`` / ``after`` declarations give."""
    allp = available_passes()
    for name in extra:
        if name not in allp:
            raise TransformError(f"unknown pass {name!r}; registered: {', '.join(allp)}")
    chosen = [p for name, p in allp.items() if type(p).enabled(cfg) or name in extra]
    names = {p.name for p in chosen}
    for p in chosen:
        missing = [r for r in p.requires if r not in names]
        if missing:
            raise TransformError(
                f"the config enables pass {p.name!r}, which needs {missing}, which the config does "
                f"not enable ({_ENABLE_HINTS.get(p.name, 'see the pass docstring')})"
            )
    return order_passes(chosen)


#: What a config must say for a pass whose prerequisite it does not enable.
_ENABLE_HINTS = {
    "tpa": "[tpa] use_tpa = true needs [attention] position_embedding_type = 'grapem': the fused "
    "TPA kernel rotates q/k with GRAPE-M",
}


def _refuse(model) -> None:
    from megatron.core.models.gpt import GPTModel

    wrappers = ("DistributedDataParallel", "FullyShardedDataParallel", "Float16Module", "MegatronFSDP")
    cls_names = [c.__name__ for c in type(model).__mro__]
    if any(w in cls_names for w in wrappers) or any(n.startswith("FSDP") for n in cls_names):
        raise TransformError(
            f"transform() got a {type(model).__name__}: it must run on the bare GPTModel BEFORE "
            "DDP / FSDP / Float16Module wrapping and before the optimizer is built, because "
            "parameters created afterwards would never be reduced or updated. Call "
            "vpmoe_compile.transform(model) first, then wrap the model."
        )
    if isinstance(model, (list, tuple)):
        raise TransformError("transform() takes one model chunk; call it once per chunk")
    if not isinstance(model, GPTModel):
        raise TransformError(
            f"transform() needs a megatron.core.models.gpt.GPTModel, got {type(model).__name__}"
        )
    if any(hasattr(p, "main_grad") or hasattr(p, "grad_added_to_main_grad") for p in model.parameters()):
        raise TransformError(
            "the model's parameters are already registered with Megatron DDP (they have main_grad): "
            "transform() must run BEFORE DDP / optimizer construction, or the parameters it creates "
            "are never reduced or updated. Transform the bare model, then wrap it."
        )
    held = _optimizers_holding(model)
    if held:
        raise TransformError(
            f"an optimizer ({', '.join(sorted(held))}) already holds this model's parameters: "
            "transform() replaces parameters (TPA factors, GRAPE frequencies, stacked experts), which "
            "that optimizer would never update while it kept updating the removed ones. Call "
            "vpmoe_compile.transform(model) first, then build the optimizer "
            "(vpmoe_compile.build_optimizer(model))."
        )
    if getattr(model, "vpmoe_transform", None) is not None:
        raise TransformError(
            "this model was already transformed by vpmoe_compile (passes: "
            f"{model.vpmoe_transform.passes}); transform a freshly built stock model instead"
        )


def _optimizers_holding(model) -> List[str]:
    """Class names of live ``torch.optim.Optimizer`` objects that hold a parameter of ``model``."""
    import gc

    ids = {id(p) for p in model.parameters()}
    found = set()
    for obj in gc.get_objects():
        # type() rather than isinstance(): never calls into weak proxies or deprecated objects
        if issubclass(type(obj), torch.optim.Optimizer):
            if any(id(p) in ids for g in obj.param_groups for p in g["params"]):
                found.add(type(obj).__name__)
    return list(found)


def config_from_model(model) -> VpMoEConfig:
    """A :class:`VpMoEConfig` read off a stock model's ``TransformerConfig`` (for models not
    built by :func:`megatron_base.build_stock_gpt`); ``[tpa]``/``[grape]`` keep their defaults."""
    tc = model.config
    cfg = VpMoEConfig()
    m, a, moe = cfg.model, cfg.attention, cfg.moe
    m.num_layers, m.hidden_size = tc.num_layers, tc.hidden_size
    m.num_attention_heads = tc.num_attention_heads
    m.num_query_groups = tc.num_query_groups or tc.num_attention_heads
    m.head_dim, m.ffn_hidden_size = tc.kv_channels, tc.ffn_hidden_size
    m.qk_layernorm, m.softmax_type = tc.qk_layernorm, tc.softmax_type
    m.add_bias_linear, m.add_qkv_bias = tc.add_bias_linear, tc.add_qkv_bias
    m.layernorm_epsilon, m.init_method_std = tc.layernorm_epsilon, tc.init_method_std
    a.attention_dropout = tc.attention_dropout
    if tc.window_size is not None:
        a.window_size = tc.window_size[0] + 1
    if isinstance(tc.window_attn_skip_freq, int):
        a.window_attn_skip_freq = tc.window_attn_skip_freq
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None and getattr(rope, "inv_freq", None) is not None:
        inv = rope.inv_freq.float().cpu()
        if inv.numel() > 1:
            a.rotary_base = float(round(float(1.0 / inv[1]) ** (tc.kv_channels / 2.0)))
    moe.num_experts = tc.num_moe_experts or 0
    moe.topk = tc.moe_router_topk
    a.max_sequence_length = getattr(model, "max_sequence_length", a.max_sequence_length)
    cfg.tokenizer.vocab_size = model.vocab_size
    cfg.source = "<derived from model.config>"
    return cfg


#: ``VpMoEConfig.source`` of :func:`config_from_model`'s configs.
_DERIVED_SOURCE = "<derived from model.config>"
#: The keys :func:`config_from_model` reads off a model; the rest of such a config keeps the
#: dataclass defaults, so only these are compared for it.
_DERIVED_KEYS = frozenset(
    {
        "[model] num_layers", "[model] hidden_size", "[model] num_attention_heads",
        "[model] num_query_groups", "[model] head_dim", "[model] ffn_hidden_size",
        "[model] qk_layernorm", "[model] softmax_type", "[model] add_bias_linear",
        "[model] add_qkv_bias", "[model] layernorm_epsilon", "[model] init_method_std",
        "[attention] attention_dropout", "[attention] window_size", "[attention] window_attn_skip_freq",
        "[moe] num_experts", "[moe] topk", "[tokenizer] vocab_size",
    }
)


def _same(c, m) -> bool:
    import math

    if isinstance(c, float) or isinstance(m, float):
        try:
            return math.isclose(float(c), float(m), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return c == m


def _model_activation(tc) -> Optional[str]:
    """The config's ``[model] activation`` name of the model's ``activation_func``, or None when
    it is not one the config can name (then it is not compared)."""
    fn = tc.activation_func
    for _ in range(4):  # torch.compile / functools.wraps wrappers
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "_torchdynamo_orig_callable", None)
        if inner is None:
            break
        fn = inner
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None)
    return {"squared_relu": "squaredrelu", "gelu": "gelu", "relu": "relu", "silu": "swiglu"}.get(name)


def _layer_pattern(freq, num_layers: int) -> List[int]:
    """Megatron's ``moe_layer_freq`` (int or list) as a per-layer list (1 = MoE)."""
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return [int(x) for x in freq]


def _cfg_model_pairs(cfg: VpMoEConfig, model) -> List[tuple]:
    """``(key, config value, model value)`` for everything a stock ``GPTModel`` encodes of the
    config (what :func:`megatron_base.model.transformer_config_from_vpmoe` and
    ``build_stock_gpt`` put into it). ``[tpa]``, ``[grape]``, ``[optimizer]`` and
    ``max_sequence_length`` are not part of a stock model."""
    from megatron.core.transformer.utils import is_layer_window_attention

    tc = model.config
    m, a, moe = cfg.model, cfg.attention, cfg.moe
    pairs = [
        ("[model] num_layers", m.num_layers, tc.num_layers),
        ("[model] hidden_size", m.hidden_size, tc.hidden_size),
        ("[model] num_attention_heads", m.num_attention_heads, tc.num_attention_heads),
        ("[model] num_query_groups", m.num_query_groups, tc.num_query_groups or tc.num_attention_heads),
        ("[model] head_dim", m.head_dim, tc.kv_channels),
        ("[model] ffn_hidden_size", m.ffn_hidden_size, tc.ffn_hidden_size),
        ("[model] normalization", m.normalization, tc.normalization),
        ("[model] layernorm_epsilon", m.layernorm_epsilon, tc.layernorm_epsilon),
        ("[model] qk_layernorm", m.qk_layernorm, bool(tc.qk_layernorm)),
        ("[model] softmax_type", m.softmax_type, tc.softmax_type),
        # the linear_bias pass adds the biases a stock model cannot have: a model without them
        # fits a config with them (not the other way round)
        ("[model] add_bias_linear", m.add_bias_linear, bool(tc.add_bias_linear) or m.add_bias_linear),
        ("[model] add_qkv_bias", m.add_qkv_bias or m.add_bias_linear, bool(tc.add_qkv_bias or tc.add_bias_linear)),
        ("[model] gated_linear_unit", m.gated_linear_unit, bool(tc.gated_linear_unit)),
        ("[model] untied_embeddings", m.untied_embeddings, not model.share_embeddings_and_output_weights),
        ("[model] init_method_std", m.init_method_std, tc.init_method_std),
        ("[model] hidden_dropout", m.hidden_dropout, tc.hidden_dropout),
        ("[attention] attention_dropout", a.attention_dropout, tc.attention_dropout),
        ("[tokenizer] vocab_size", cfg.tokenizer.vocab_size, model.vocab_size),
    ]
    act = _model_activation(tc)
    if act is not None:
        pairs.append(("[model] activation", m.activation, act))
    # window: W tokens including the current one = Megatron (W - 1, 0). A model without a window
    # is refused by the passes that need one.
    if tc.window_size is not None:
        win = tuple(tc.window_size)
        if win != cfg.megatron_window_size:
            shown = win[0] + 1 if win[1] == 0 else f"Megatron window_size {win}"
            pairs.append(("[attention] window_size", a.window_size, shown))
        freq = tc.window_attn_skip_freq
        n = min(m.num_layers, tc.num_layers)
        ours = [cfg.is_local_layer(i) for i in range(1, n + 1)]
        theirs = [is_layer_window_attention(tc.window_size, freq, i) for i in range(1, n + 1)]
        if isinstance(freq, int) and freq != a.window_attn_skip_freq:
            pairs.append(("[attention] window_attn_skip_freq", a.window_attn_skip_freq, freq))
        elif ours != theirs:
            local = "".join("L" if x else "G" for x in theirs)
            pairs.append(("[attention] window_attn_skip_freq", a.window_attn_skip_freq, f"layers {local} (L local, G global)"))
    # position encoding: the stock base of "grapem" is RoPE with the global layers NoPE
    pos = getattr(model, "position_embedding_type", None)
    if pos == "rope":
        pos = "grapem" if getattr(tc, "no_rope_freq", None) else "rope"
    pairs.append(("[attention] position_embedding_type", a.position_embedding_type, pos))
    if pos in ("rope", "grapem") and a.position_embedding_type != "none":
        pairs.append(("[attention] rotary_base", a.rotary_base, getattr(model, "rotary_base", a.rotary_base)))
    # MoE
    model_experts = tc.num_moe_experts or 0
    pairs.append(("[moe] num_experts", moe.num_experts, model_experts))
    if moe.num_experts and model_experts:
        shared = tc.moe_shared_expert_intermediate_size
        scaling = tc.moe_router_topk_scaling_factor
        pairs += [
            ("[moe] topk", moe.topk, tc.moe_router_topk),
            ("[moe] expert_ffn_hidden_size", cfg.expert_ffn_hidden_size, tc.moe_ffn_hidden_size),
            ("[moe] shared_expert", moe.shared_expert, bool(shared)),
            ("[moe] router_load_balancing_type", moe.router_load_balancing_type, tc.moe_router_load_balancing_type),
            ("[moe] router_score_function", moe.router_score_function, tc.moe_router_score_function),
            # Megatron scales only by a truthy factor: None is 1
            ("[moe] router_topk_scaling_factor", moe.router_topk_scaling_factor, 1.0 if scaling is None else scaling),
            ("[moe] router_num_groups", moe.router_num_groups, tc.moe_router_num_groups or 0),
            ("[moe] router_group_topk", moe.router_group_topk, tc.moe_router_group_topk or 0),
            ("[moe] router_enable_expert_bias", moe.router_enable_expert_bias, bool(tc.moe_router_enable_expert_bias)),
            ("[moe] router_bias_update_rate", moe.router_bias_update_rate, tc.moe_router_bias_update_rate),
            ("[moe] router_dtype", moe.router_dtype, tc.moe_router_dtype or "none"),
            ("[moe] grouped_gemm", moe.grouped_gemm, bool(tc.moe_grouped_gemm)),
            ("[moe] permute_fusion", moe.permute_fusion, bool(tc.moe_permute_fusion)),
            ("[moe] router_fusion", moe.router_fusion, bool(tc.moe_router_fusion)),
        ]
        if isinstance(tc.moe_aux_loss_coeff, (int, float)):
            pairs.append(("[moe] aux_loss_coeff", moe.aux_loss_coeff, float(tc.moe_aux_loss_coeff)))
        if moe.shared_expert and shared:
            pairs.append(("[moe] shared_expert_size", moe.shared_expert_size, shared))
        if m.num_layers == tc.num_layers:  # else the layer count is the mismatch
            pattern = _layer_pattern(tc.moe_layer_freq, tc.num_layers)
            if pattern != cfg.moe_layer_pattern:
                n = tc.num_layers
                if pattern in ([0] + [1] * (n - 1), [1] * n):
                    shown = pattern[0] == 0
                else:
                    shown = "MoE layer pattern " + "".join("M" if x else "D" for x in pattern) + " (M MoE, D dense)"
                pairs.append(("[moe] first_layer_dense", moe.first_layer_dense, shown))
    return pairs


def _check_cfg_matches(cfg: VpMoEConfig, model) -> None:
    """Refuse a config that does not describe ``model``: every key the stock model encodes is
    compared (geometry, norms, biases, softmax, activation, window and local/global schedule,
    position encoding, vocabulary, experts, expert and shared-expert sizes, dense/MoE layer
    pattern, router), and each mismatch is named as ``[section] key: config X vs model Y``.
    A config read off the model by :func:`config_from_model` is compared on the keys it read."""
    pairs = _cfg_model_pairs(cfg, model)
    if cfg.source == _DERIVED_SOURCE:
        derived = set(_DERIVED_KEYS)
        if not isinstance(model.config.window_attn_skip_freq, int):  # config_from_model reads ints only
            derived.discard("[attention] window_attn_skip_freq")
        pairs = [p for p in pairs if p[0] in derived]
    bad = [f"{k}: config {c} vs model {m}" for k, c, m in pairs if not _same(c, m)]
    if bad:
        raise TransformError(
            "the config does not describe this model (" + "; ".join(bad) + "); pass the config the "
            "model was built from, or cfg=None to read it off the model"
        )


def _resolve_passes(passes, cfg) -> List[Pass]:
    if passes is None:
        return default_pipeline(cfg)
    if isinstance(passes, (str, Pass)):
        raise TransformError(
            f"passes must be a list of pass names or Pass objects, got the single {type(passes).__name__} "
            f"{passes if isinstance(passes, str) else passes.name!r}; write passes=[...] (e.g. "
            "passes=['layer_plan', 'tpa'])"
        )
    allp = available_passes()
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            if p not in allp:
                raise TransformError(f"unknown pass {p!r}; available: {', '.join(allp)}")
            out.append(allp[p])
        else:
            raise TransformError(f"passes must be names or Pass instances, got {type(p).__name__}")
    return order_passes(out)  # the given order where the declarations leave it free


def transform(
    model: nn.Module,
    cfg: Union[VpMoEConfig, str, os.PathLike, None] = None,
    *,
    passes: Optional[Sequence[Union[str, Pass]]] = None,
    dump_dir: Union[str, os.PathLike, None] = None,
    verify: str = "auto",
    backend: Optional[str] = None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Rewrite a stock Megatron-Core ``GPTModel`` into the vpMoE architecture, in place.

    Args:
        model: a bare (unwrapped) stock ``GPTModel``.
        cfg: the :class:`VpMoEConfig` (or preset name / TOML path) the model was built from.
            Default: the config ``build_stock_gpt`` attached, else one read off ``model.config``.
        passes: pass names or :class:`passes.base.Pass` objects, in order. Default: the
            pipeline the config asks for (:func:`default_pipeline`).
        dump_dir: write the debug dump here (also taken from ``$VPMOE_DUMP_DIR``).
        verify: ``"auto"`` | ``"forward"`` | ``"params"`` (see :class:`PassManager`).
        backend: overrides the config's ``[kernels] attention`` (the backend of both attention
            ops): ``"auto"`` (Triton on CUDA where the kernels support the shapes, the PyTorch
            reference elsewhere), ``"triton"`` or ``"reference"``. Default (``None``): the
            config's value. The other ``[kernels]`` key (``grouped_gemm``) comes from the
            config only. The resolved
            :class:`~vpmoe_compile.kernels.KernelPolicy` is ``model.vpmoe_transform.kernels``.
        progress: print one line per pass (default: when stderr is a terminal).

    Returns:
        the same ``model`` object, transformed; ``model.vpmoe_transform`` holds the record.

    Raises:
        TransformError / PassError: the model or config is refused; nothing was changed.
    """
    t0 = time.perf_counter()
    _refuse(model)
    if cfg is None:
        cfg = getattr(model, "vpmoe_config", None) or config_from_model(model)
    else:
        cfg = load_config(cfg)
    _check_cfg_matches(cfg, model)
    try:
        kernels = KernelPolicy.from_config(cfg, attention=backend)
    except ValueError as exc:
        raise TransformError(f"transform(backend={backend!r}): {exc}") from None
    pipeline = _resolve_passes(passes, cfg)
    if dump_dir is None and os.environ.get(DUMP_ENV) is not None:
        dump_dir = os.environ[DUMP_ENV]
    if dump_dir is not None:
        from vpmoe_compile.dump import check_dump_dir

        check_dump_dir(dump_dir)  # before any pass runs: a bad folder changes nothing
    if progress is None:
        progress = sys.stderr.isatty()
    show = (lambda name, i, n: print(f"[vpmoe_compile] pass {i + 1}/{n}: {name}", file=sys.stderr)) if progress else None
    mgr = PassManager(pipeline, verify=verify, capture_graphs=dump_dir is not None, progress=show)
    ctx = PassContext(model=model, cfg=cfg, kernels=kernels)

    def finish(ctx: PassContext) -> None:
        record = TransformRecord(
            passes=[p.name for p in pipeline],
            results=ctx.results,
            config_source=cfg.source,
            time_s=time.perf_counter() - t0,
            dump_dir=str(dump_dir) if dump_dir is not None else None,
            plan=ctx.plan,
            kernels=kernels,
        )
        if dump_dir is not None:
            from vpmoe_compile.dump import write_dump

            write_dump(dump_dir, model, cfg, record)
        model.vpmoe_transform = record
        model.vpmoe_config = cfg
        # the layers now differ (local TPA vs global attention): Megatron must key each layer of
        # the sharded state dict by its own number instead of one stacked "layers." entry
        for tc in {id(c): c for c in (model.config, getattr(model.decoder, "config", model.config))}.values():
            tc.hetereogenous_dist_checkpoint = True
        if "optimizer_routing" in ctx.options:
            model.vpmoe_optimizer_routing = ctx.options["optimizer_routing"]

    mgr.run(ctx, on_success=finish)
    return model
