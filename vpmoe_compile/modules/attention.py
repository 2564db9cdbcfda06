"""Drop-in attention modules installed by the passes.

Each class keeps the stock call signature of the module it replaces, adopts the stock child
modules it does not change (same objects, so parameter names and values are preserved), and
keeps its own forward small and traceable (kernels are ``torch.library`` custom ops).

* :class:`VpMoESelfAttention` replaces ``SelfAttention`` (``forward(hidden_states,
  attention_mask, ...) -> (out [s, b, h], bias)``): Megatron's fused QKV split, QK-norm, then
  GRAPE-M rotation in fp32 on local layers (from the model-level angle table it is handed as
  ``rotary_pos_emb``) or nothing on global layers (GRAPE-A lives in the core attention), then
  ``core_attention`` and ``linear_proj``.
* :class:`SinkCoreAttention` replaces ``DotProductAttention`` on global layers
  (``forward(query, key, value, attention_mask, ...) -> [s, b, H*d]``): causal attention with
  the learnable sink (the stock ``softmax_offset`` parameter, carried over) and, once the GRAPE
  pass has installed :class:`~vpmoe_compile.modules.grape.GrapeA`, ALiBi — through the Triton
  flash kernel ``vpmoe_compile.ops.sink_attention`` (or its reference, as the kernel policy
  says: :mod:`vpmoe_compile.kernels`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from vpmoe_compile.kernels import KernelPolicy
from vpmoe_compile.modules.grape import apply_grape_m, grape_m_cos_sin
from vpmoe_compile.modules.value_residual import ValueResidualState, initial_logit, mixing_weight
from vpmoe_compile.ops.value_mix import mix_values
from vpmoe_compile.tensor_parallel import mark_head_split


def effective_softmax_scale(stock_core) -> float:
    """The scale stock ``DotProductAttention`` really applies to ``q.k``: with
    ``apply_query_key_layer_scaling`` it stores ``1/(sqrt(d) * layer_number)`` and multiplies by
    ``layer_number`` again inside its softmax, so both factors are taken."""
    coeff = getattr(getattr(stock_core, "scale_mask_softmax", None), "scale", None)
    return float(stock_core.softmax_scale) * (float(coeff) if coeff is not None else 1.0)


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what} is not supported by the vpMoE attention modules yet (training forward only)"
    )


class VpMoESelfAttention(MegatronModule):
    """Self-attention with GRAPE-M rotation (local) or none (global); drop-in for SelfAttention.

    Args:
        stock: the ``SelfAttention`` it replaces; its ``linear_qkv``, ``q_layernorm``,
            ``k_layernorm``, ``core_attention`` and ``linear_proj`` are adopted as they are.
        rotate: apply GRAPE-M (local layers). Global layers pass False.

    Shapes: hidden_states ``[s, b, h]``; q ``[s, b, H, d]``, k/v ``[s, b, G, d]`` (per TP rank).
    """

    _vpmoe_attention = True

    def __init__(self, stock, *, rotate: bool):
        super().__init__(config=stock.config)
        for name in ("linear_qkv", "q_layernorm", "k_layernorm", "core_attention", "linear_proj"):
            setattr(self, name, getattr(stock, name))
        self.layer_number = stock.layer_number
        self.attn_mask_type = stock.attn_mask_type
        self.attention_type = "self"
        self.num_attention_heads_per_partition = stock.num_attention_heads_per_partition
        self.num_query_groups_per_partition = stock.num_query_groups_per_partition
        self.hidden_size_per_attention_head = stock.hidden_size_per_attention_head
        self.rotate = rotate
        # the value residual (installed by the value_residual pass): the model's shared state and,
        # on layers after the first, the learnable logit
        self.value_residual: Optional[ValueResidualState] = None
        self.value_residual_logit: Optional[torch.nn.Parameter] = None
        self.value_residual_tp = 1

    def enable_value_residual(self, state: ValueResidualState, init: float, tp_size: int = 1):
        """Share ``state`` (layer 1 writes its values there, the others read them) and, after the
        first layer, create the fp32 logit ``value_residual_logit`` (the fork's name and
        initialisation). Returns the new parameter, or None on layer 1."""
        self.value_residual, self.value_residual_tp = state, int(tp_size)
        if self.layer_number == 1:
            return None
        self.value_residual_logit = torch.nn.Parameter(
            torch.tensor(initial_logit(init), dtype=torch.float32, device=self.linear_proj.weight.device)
        )
        return self.value_residual_logit

    def value_residual_inputs(self):
        """``(v1, lam)`` for a layer after the first, ``(None, None)`` otherwise."""
        if self.value_residual is None or self.value_residual_logit is None:
            return None, None
        return (self.value_residual.read(self.layer_number),
                mixing_weight(self.value_residual_logit, self.value_residual_tp))

    # ---- pieces -------------------------------------------------------------------------
    def split_qkv(self, mixed: Tensor):
        """Megatron's interleaved per-group layout ``[s, b, G*(H/G+2)*d]`` -> q, k, v."""
        s, b, _ = mixed.shape
        G = self.num_query_groups_per_partition
        hpg = self.num_attention_heads_per_partition // G
        d = self.hidden_size_per_attention_head
        mixed = mixed.view(s, b, G, (hpg + 2) * d)
        q, k, v = torch.split(mixed, [hpg * d, d, d], dim=3)
        q = q.reshape(s, b, G * hpg, d)
        return q, k, v

    def get_query_key_value_tensors(self, hidden_states: Tensor):
        mixed, _ = self.linear_qkv(hidden_states)
        q, k, v = self.split_qkv(mixed)
        q = self.q_layernorm(q)
        k = self.k_layernorm(k)
        return q, k, v

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        key_value_states: Optional[Tensor] = None,
        inference_context=None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        """``hidden_states [s, b, h]`` -> ``(output [s, b, h], bias or None)``."""
        if inference_context is not None or inference_params is not None:
            raise _unsupported("inference (KV cache)")
        if packed_seq_params is not None:
            raise _unsupported("packed sequences (THD)")
        if key_value_states is not None:
            raise _unsupported("cross attention")
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        if self.value_residual is not None:  # [s, b, G, d] values: kept (layer 1) or mixed
            v1, lam = self.value_residual_inputs()
            if v1 is None:
                self.value_residual.value = v
            else:
                v = mix_values(v, v1, lam)
        if self.rotate:
            if rotary_pos_emb is None:
                raise RuntimeError(
                    f"layer {self.layer_number}: GRAPE-M needs the model-level angle table; the "
                    "model's position_embedding_type must be 'rope' so GPTModel passes it"
                )
            if isinstance(rotary_pos_emb, tuple):
                rotary_pos_emb = rotary_pos_emb[0]
            cos, sin = grape_m_cos_sin(rotary_pos_emb, q.shape[0])
            q = apply_grape_m(q, cos, sin)
            k = apply_grape_m(k, cos, sin)
        out = self.core_attention(q, k, v, attention_mask, attn_mask_type=self.attn_mask_type)
        return self.linear_proj(out)


class SinkCoreAttention(MegatronModule):
    """Causal attention + learnable sink (+ ALiBi once installed); drop-in for DotProductAttention.

    Args:
        stock: the ``DotProductAttention`` it replaces: its ``softmax_offset`` parameter is
            carried over as the sink (same object, same name), its scale is kept.
        kernels: the model's :class:`~vpmoe_compile.kernels.KernelPolicy` (default: the
            default policy); ``[kernels] attention`` picks the op's backend.

    ``forward(query [s, b, H, d], key [s, b, G, d], value [s, b, G, d], attention_mask, ...)``
    returns ``[s, b, H*d]``. The kernel is causal by construction (no ``[s, s]`` mask or bias is
    ever materialised); a given ``attention_mask`` (Megatron-LM passes the causal one) is ignored
    with a one-time warning, so padding / document masks are not supported.
    """

    def __init__(self, stock, kernels: Optional[KernelPolicy] = None):
        super().__init__(config=stock.config)
        if stock.config.attention_dropout and stock.config.attention_dropout > 0:
            raise ValueError(
                f"attention_dropout={stock.config.attention_dropout}: the sink attention kernel "
                "has no dropout; set [attention] attention_dropout = 0.0"
            )
        self.layer_number = stock.layer_number
        self.num_attention_heads_per_partition = stock.num_attention_heads_per_partition
        self.num_query_groups_per_partition = stock.num_query_groups_per_partition
        self.hidden_size_per_attention_head = stock.hidden_size_per_attention_head
        self.softmax_scale = effective_softmax_scale(stock)
        self.tp_group = getattr(stock, "tp_group", None)
        self.kernels = kernels if kernels is not None else KernelPolicy()
        self.backend = self.kernels.backend("sink_attention", {"head_dim": self.hidden_size_per_attention_head})
        self.softmax_type = stock.config.softmax_type
        if stock.config.softmax_type == "learnable":
            self.softmax_offset = stock.softmax_offset
            mark_head_split(self.softmax_offset)  # [H / tp] under tensor parallelism
        elif stock.config.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", stock.softmax_offset, persistent=False)
        else:
            self.softmax_offset = None
        self.grape_a = None  # set by the GRAPE pass on global layers
        self._mask_warned = False

    def sink(self, like: Tensor) -> Tensor:
        if self.softmax_offset is None:
            return torch.full(
                (self.num_attention_heads_per_partition,), float("-inf"), device=like.device, dtype=torch.float32
            )
        return self.softmax_offset

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        from vpmoe_compile.ops.sink_attention import sink_attention

        if attention_bias is not None or packed_seq_params is not None:
            raise _unsupported("attention_bias / packed sequences")
        if attention_mask is not None and not self._mask_warned and not torch.compiler.is_compiling():
            # Megatron-LM's GPT data path passes the standard causal mask; the kernel is causal
            # by construction, so it is not needed. Padding / document masks are not supported
            # (stock Megatron ignores them on window layers too): say so once.
            warnings.warn(
                f"layer {self.layer_number}: SinkCoreAttention ignores the attention_mask argument "
                "and applies causal masking in the kernel (document/padding masks are not "
                "supported; pass attention_mask=None to silence this)",
                stacklevel=2,
            )
            self._mask_warned = True
        slopes = self.grape_a.slopes if self.grape_a is not None else None
        out = sink_attention(
            query, key, value, self.sink(query), slopes=slopes, softmax_scale=self.softmax_scale, backend=self.backend
        )
        s, b = out.shape[:2]
        return out.reshape(s, b, -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Checkpoint the sink exactly like stock DotProductAttention (sharded on dim 0)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = {"softmax_offset": self.softmax_offset} if self.softmax_type == "learnable" else {}
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"softmax_offset": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
