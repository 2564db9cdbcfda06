"""The stock side: ``VpMoEConfig`` -> stock ``TransformerConfig`` -> stock ``GPTModel``.

Everything built here is a stock Megatron-Core 0.16.1 class from the *local* (non-TE) spec;
the passes of :mod:`passes` then replace only what stock Megatron cannot do. What the stock
model already provides (and the tests assert): RMSNorm + QK-norm, GQA, the learnable softmax
offset (``softmax_type='learnable'``), window attention ``window_size=(W-1, 0)`` with
``window_attn_skip_freq``, MoE with a shared expert, the first layer dense, untied embeddings,
vocab 201088.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from megatron_base.config import VpMoEConfig, load_config


class UnsupportedConfigError(ValueError):
    """The config asks for something stock megatron-core 0.16.1 cannot build."""


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) ** 2`` (Primer). Same math as ``megatron.core.activations.squared_relu``
    without its ``@jit_fuser`` wrapper, which would invoke Inductor on CPU at the first call."""
    return torch.pow(F.relu(x), 2)


def _activation(name: str, on_gpu: bool):
    if name == "squaredrelu":
        if on_gpu:
            from megatron.core.activations import squared_relu as mcore_squared_relu

            return mcore_squared_relu
        return squared_relu
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "swiglu":
        return F.silu  # with gated_linear_unit=True
    raise UnsupportedConfigError(f"[model] activation {name!r} is not supported")


def check_stock_buildable(cfg: VpMoEConfig) -> None:
    """Raise a clear error for vpMoE options stock megatron-core 0.16.1 cannot build with the
    local spec (the linear biases and the value residual are not built here: vpmoe_compile's
    passes add them; see docs/design.md#linear-biases)."""
    m, moe = cfg.model, cfg.moe
    if moe.grouped_gemm or moe.permute_fusion or moe.router_fusion:
        raise UnsupportedConfigError(
            f"{cfg.source or 'config'}: [moe] grouped_gemm / permute_fusion / router_fusion need "
            "Transformer Engine or grouped_gemm; the local spec used here supports none of them. "
            "Set them to false."
        )
    if m.normalization != "RMSNorm":
        raise UnsupportedConfigError("[model] normalization must be 'RMSNorm'")


def transformer_config_from_vpmoe(
    cfg: VpMoEConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    on_gpu: Optional[bool] = None,
    perform_initialization: bool = True,
    sequence_parallel: bool = False,
):
    """The stock ``TransformerConfig`` for a vpMoE config (no library-specific fields).

    ``sequence_parallel`` is Megatron's flag (``--sequence-parallel``): it needs a tensor-parallel
    size > 1 in the initialised parallel state, and Megatron requires it when tensor and expert
    parallelism are combined.

    ``no_rope_freq`` is set to the global-layer schedule so that global layers are NoPE in the
    stock base (where GRAPE-A goes), local layers get RoPE (docs/design.md#decisions).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_stock_buildable(cfg)
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    m, a, moe = cfg.model, cfg.attention, cfg.moe
    use_moe = moe.num_experts > 0
    kwargs: Dict[str, object] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        qk_layernorm=m.qk_layernorm,
        softmax_type=m.softmax_type,
        # The linear biases (attention output, MLPs, router, experts) are added by vpmoe_compile's
        # linear_bias pass: stock megatron-core 0.16.1 cannot build them with a shared expert
        # (SharedExpertMLP asserts) nor train biased SequentialMLP experts (an in-place add on a
        # custom autograd output). The QKV bias, which add_bias_linear implies, is stock's.
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias or m.add_bias_linear,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=_activation(m.activation, on_gpu),
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=a.attention_dropout,
        window_size=cfg.megatron_window_size,
        window_attn_skip_freq=a.window_attn_skip_freq,
        # global layers NoPE (where GRAPE-A goes); the list form mirrors is_layer_window_attention
        # and has no divisibility constraint on num_layers (the int form has)
        no_rope_freq=(
            [int(not cfg.is_local_layer(i + 1)) for i in range(m.num_layers)]
            if a.position_embedding_type == "grapem"
            else None
        ),
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    if use_moe:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_ffn_hidden_size=cfg.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_size if moe.shared_expert else None,
            moe_shared_expert_overlap=False,
            moe_layer_freq=cfg.moe_layer_pattern,
            moe_router_load_balancing_type=moe.router_load_balancing_type,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_score_function=moe.router_score_function,
            moe_router_topk_scaling_factor=moe.router_topk_scaling_factor,
            moe_router_num_groups=moe.router_num_groups or None,
            moe_router_group_topk=moe.router_group_topk or None,
            moe_router_enable_expert_bias=moe.router_enable_expert_bias,
            moe_router_bias_update_rate=moe.router_bias_update_rate,
            moe_router_dtype=None if moe.router_dtype == "none" else moe.router_dtype,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    kwargs.update(_parallel_sizes())
    if sequence_parallel:
        if kwargs.get("tensor_model_parallel_size", 1) <= 1:
            raise UnsupportedConfigError(
                "sequence_parallel=True needs tensor parallelism > 1 (it splits the sequence over the "
                "tensor-parallel ranks); initialise the parallel state with tensor_model_parallel_size > 1 "
                "or leave sequence parallelism off"
            )
        kwargs["sequence_parallel"] = True
    if kwargs.get("pipeline_model_parallel_size", 1) > 1:
        kwargs["pipeline_dtype"] = params_dtype  # the dtype of the activations sent between stages
    return TransformerConfig(**kwargs)


def _parallel_sizes() -> dict:
    """The model-parallel sizes of Megatron's initialised parallel state, as ``TransformerConfig``
    fields (Megatron-LM sets them from its arguments). The layers read them at construction: an
    expert linear marks its weight ``allreduce=False`` only when the config's
    ``expert_model_parallel_size`` > 1, and Megatron's DDP then reduces it over the
    expert-data-parallel group instead of mixing other ranks' experts into it."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    out = {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
    }
    if out["pipeline_model_parallel_size"] > 1:
        # the activations sent between stages; batched p2p ends in torch.cuda.synchronize(), so
        # without CUDA the schedules send and receive one by one (gloo has no coalesced p2p)
        out["batch_p2p_comm"] = torch.cuda.is_available()
    return out


def build_stock_gpt(
    cfg: Union[VpMoEConfig, str, None] = None,
    device: Union[str, torch.device, None] = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    max_sequence_length: Optional[int] = None,
    sequence_parallel: bool = False,
):
    """Build a **stock** Megatron-Core ``GPTModel`` (stock classes only) for a vpMoE config.

    Args:
        cfg: a :class:`VpMoEConfig`, a preset name or a TOML path (default ``tiny``).
        device: ``"cpu"``, ``"cuda"`` or ``"meta"`` (parameter counting: nothing is allocated
            or initialised). Default: CUDA when available, else CPU.
        params_dtype: parameter dtype (``torch.bfloat16`` for GPU training).
        max_sequence_length: defaults to ``[attention] max_sequence_length``.
        sequence_parallel: Megatron's sequence parallelism (tensor-parallel size > 1; required
            with tensor x expert parallelism). The local spec's torch norms refuse it, so the
            spec's ``WrappedTorchNorm`` becomes :class:`megatron_base.norm.SequenceParallelTorchNorm`,
            the same ``torch.nn.RMSNorm`` with its weight marked ``sequence_parallel``, as
            Transformer Engine's norm marks it.

    Requires :func:`megatron_base.parallel.init_process` (Megatron modules read their process
    groups from the parallel state); without it a ``RuntimeError`` says so before Megatron is
    touched. The model uses the local spec (no Transformer Engine),
    RoPE on local layers and NoPE on global ones (``no_rope_freq``), untied embeddings and the
    unpadded-by-Megatron vocabulary ``[tokenizer] vocab_size`` (201088 is already a multiple
    of 128).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_base import compat
    from megatron_base.parallel import require_initialized

    require_initialized("build_stock_gpt()")
    cfg = load_config(cfg)
    compat.apply()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu" and torch.cuda.is_available():
        raise UnsupportedConfigError(
            "build_stock_gpt(device='cpu') on a machine with a visible CUDA device: stock "
            "megatron-core 0.16.1 moves tensors to torch.cuda.current_device() inside forward "
            "(rotary tables, router, attention masks), so a CPU model there fails mid-forward. Use "
            "device='cuda', or hide the GPUs with CUDA_VISIBLE_DEVICES='' for a CPU run."
        )
    meta = device.type == "meta"
    tcfg = transformer_config_from_vpmoe(
        cfg,
        params_dtype=params_dtype,
        on_gpu=device.type == "cuda",
        perform_initialization=not meta,
        sequence_parallel=sequence_parallel,
    )
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    # under pipeline parallelism each stage builds its own layers (global layer numbers) and only
    # the first / last stage the embedding / output layer, as Megatron-LM's model provider does
    spec = get_gpt_decoder_block_spec(
        tcfg, use_transformer_engine=False, normalization="RMSNorm",
        pp_rank=ps.get_pipeline_model_parallel_rank() if pp > 1 else None,
    )
    if tcfg.sequence_parallel:
        from megatron_base.norm import allow_sequence_parallel_norms

        spec = allow_sequence_parallel_norms(spec)
    pos = "none" if cfg.attention.position_embedding_type == "none" else "rope"
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=cfg.tokenizer.vocab_size,
            max_sequence_length=max_sequence_length or cfg.attention.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage() if pp > 1 else True,
            post_process=ps.is_pipeline_last_stage() if pp > 1 else True,
            share_embeddings_and_output_weights=not cfg.model.untied_embeddings,
            position_embedding_type=pos,
            rotary_base=cfg.attention.rotary_base,
        )
    # Megatron allocates a few tensors on an explicit device (softmax_offset, router buffers):
    # move everything, so a meta model is entirely meta.
    model = model.to(device)
    model.vpmoe_config = cfg  # the config it was built from (read by transform())
    return model


# --------------------------------------------------------------------------------------------
# Parameter counting
# --------------------------------------------------------------------------------------------


@dataclass
class ParamCount:
    """Total and active (per-token) parameter counts of a model.

    ``active`` counts every parameter a token touches: everything except the routed experts,
    plus ``topk`` routed experts per MoE layer. Embedding and output layer are included in
    both (``*_no_embedding`` exclude them).
    """

    total: int
    active: int
    embedding: int
    routed_experts: int
    routed_experts_active: int

    @property
    def total_no_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_no_embedding(self) -> int:
        return self.active - self.embedding

    def as_dict(self) -> Dict[str, int]:
        return {
            "total": self.total,
            "active": self.active,
            "embedding_and_output": self.embedding,
            "routed_experts": self.routed_experts,
            "routed_experts_active": self.routed_experts_active,
            "total_no_embedding": self.total_no_embedding,
            "active_no_embedding": self.active_no_embedding,
        }


def count_parameters(model, topk: Optional[int] = None) -> ParamCount:
    """Count total and active parameters (works on meta-device models)."""
    cfg = getattr(model, "config", None)
    if topk is None:
        topk = getattr(cfg, "moe_router_topk", 0) or 0
    num_experts = getattr(cfg, "num_moe_experts", 0) or 0
    total = embedding = routed = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if getattr(p, "is_embedding_or_output_parameter", False):
            embedding += n
        if ".experts.local_experts." in name or ".experts.linear_fc" in name:
            routed += n
    routed_active = routed * topk // num_experts if num_experts else 0
    return ParamCount(total, total - routed + routed_active, embedding, routed, routed_active)
