"""Tensor Product Attention modules for local (sliding-window) layers.

* :class:`TPAFactorProjection` replaces ``linear_qkv``: ONE packed GEMM
  ``factors = x @ W^T`` with ``W [F, h]``, ``F = H*Rq + 2*G*R + (Rq + 2R)*d``, rows in the order
  of :func:`~vpmoe_compile.ops.tpa_attention.layout.tpa_factor_rows` (the fork's six factor
  projections fused into one; ``docs/design.md#tpa-attention``). The QKV bias (Megatron's
  interleaved ``[G*(H/G+2)*d]`` layout) is the stock ``linear_qkv.bias`` parameter, carried over.
  The weight carries ``tpa_factor_rows`` so the optimizer orthogonalises each factor matrix on
  its own.
* :class:`TPACoreAttention` replaces ``core_attention``: the fused op
  :func:`vpmoe_compile.ops.tpa_attention.tpa_window_attention` (contract, /R, bias, QK RMSNorm,
  GRAPE-M rotation, sliding window with sink), with the kernels the kernel policy picks
  (:mod:`vpmoe_compile.kernels`). The stock ``softmax_offset`` is carried over as the sink.
* :class:`TPASelfAttention` replaces the local ``self_attention`` and wires them together.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core.transformer.module import MegatronModule

from vpmoe_compile.kernels import KernelPolicy
from vpmoe_compile.modules.attention import VpMoESelfAttention, _unsupported, effective_softmax_scale
from vpmoe_compile.modules.grape import grape_m_cos_sin
from vpmoe_compile.ops.tpa_attention.layout import tpa_factor_rows


class TPAFactorProjection(MegatronModule):
    """Packed TPA factor projection ``[s, b, h] -> ([s, b, F], bias)`` (drop-in position of
    ``linear_qkv``; returns the factors, not a mixed QKV tensor).

    Args:
        config: the model's TransformerConfig (params dtype, init std).
        num_heads, num_groups, head_dim: H, G, d.
        q_rank, kv_rank: Rq, R.
        bias: the stock ``linear_qkv.bias`` to carry over (or None).
        init: ``"normal"`` (Normal(0, init_method_std), the fork) or ``"xavier"`` (2-D Xavier
            uniform per factor matrix, the TPA paper's text).
        device: where to allocate (``"meta"`` allocates nothing).
    """

    def __init__(
        self,
        config,
        *,
        num_heads: int,
        num_groups: int,
        head_dim: int,
        q_rank: int,
        kv_rank: int,
        bias: Optional[nn.Parameter],
        init: str = "normal",
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(config=config)
        self.num_heads, self.num_groups, self.head_dim = num_heads, num_groups, head_dim
        self.q_rank, self.kv_rank = q_rank, kv_rank
        self.rows = tpa_factor_rows(num_heads, num_groups, head_dim, q_rank, kv_rank)
        out_features = sum(n for _, n in self.rows)
        self.out_features, self.in_features = out_features, config.hidden_size
        weight = torch.empty(out_features, config.hidden_size, dtype=dtype or config.params_dtype, device=device)
        if weight.device.type != "meta" and config.perform_initialization:
            with torch.no_grad():
                start = 0
                for _, n in self.rows:
                    block = weight[start : start + n]
                    if init == "normal":
                        block.normal_(0.0, config.init_method_std)
                    elif init == "xavier":
                        bound = math.sqrt(6.0 / (n + config.hidden_size))
                        block.uniform_(-bound, bound)
                    else:
                        raise ValueError(f"[tpa] tpa_init must be 'normal' or 'xavier', got {init!r}")
                    start += n
        self.weight = nn.Parameter(weight)
        # Megatron attributes: replicated across TP (TP must be 1 here), reduced by DDP.
        self.weight.tensor_model_parallel = False
        self.weight.partition_dim = -1
        self.weight.partition_stride = 1
        self.weight.allreduce = True
        self.weight.tpa_factor_rows = self.rows
        self.bias = bias

    # Keep the ``linear_qkv._extra_state`` checkpoint key of the ColumnParallelLinear it replaces.
    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        return None

    def forward(self, hidden_states: Tensor):
        """``[s, b, h]`` -> ``(factors [s, b, F], bias)``."""
        return F.linear(hidden_states, self.weight), self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} "
            f"({', '.join(f'{n}:{r}' for n, r in self.rows)}), bias={self.bias is not None}"
        )


class TPACoreAttention(MegatronModule):
    """Fused TPA sliding-window attention with sink (replaces ``core_attention`` on local layers).

    ``forward(factors [s, b, F], qkv_bias, gamma_q [d], gamma_k [d], cos [s, d/2], sin [s, d/2])
    -> [s, b, H*d]``. The stock ``softmax_offset`` is carried over as the sink. ``kernels``: the
    model's :class:`~vpmoe_compile.kernels.KernelPolicy` (``[kernels] attention`` picks the op's
    backend; default: the default policy).
    """

    def __init__(self, stock_core, *, window: int, q_rank: int, kv_rank: int, eps: float,
                 kernels: Optional[KernelPolicy] = None):
        super().__init__(config=stock_core.config)
        self.layer_number = stock_core.layer_number
        self.num_heads = stock_core.num_attention_heads_per_partition
        self.num_groups = stock_core.num_query_groups_per_partition
        self.head_dim = stock_core.hidden_size_per_attention_head
        self.softmax_scale = effective_softmax_scale(stock_core)
        self.tp_group = getattr(stock_core, "tp_group", None)
        self.window = int(window)
        self.q_rank, self.kv_rank, self.eps = q_rank, kv_rank, float(eps)
        self.kernels = kernels if kernels is not None else KernelPolicy()
        self.backend = self.kernels.backend(
            "tpa_attention", {"head_dim": self.head_dim, "q_rank": q_rank, "kv_rank": kv_rank}
        )
        self.softmax_type = stock_core.config.softmax_type
        if self.softmax_type == "learnable":
            self.softmax_offset = stock_core.softmax_offset
        elif self.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", stock_core.softmax_offset, persistent=False)
        else:
            self.softmax_offset = None

    def forward(self, factors, qkv_bias, gamma_q, gamma_k, cos, sin) -> Tensor:
        from vpmoe_compile.ops.tpa_attention import tpa_window_attention

        sink = self.softmax_offset
        if sink is None:
            sink = torch.full((self.num_heads,), float("-inf"), device=factors.device, dtype=torch.float32)
        return tpa_window_attention(
            factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink,
            num_heads=self.num_heads, num_groups=self.num_groups, head_dim=self.head_dim,
            q_rank=self.q_rank, kv_rank=self.kv_rank, window=self.window, eps=self.eps,
            softmax_scale=self.softmax_scale, backend=self.backend,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = {"softmax_offset": self.softmax_offset} if self.softmax_type == "learnable" else {}
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"softmax_offset": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, groups={self.num_groups}, head_dim={self.head_dim}, "
            f"q_rank={self.q_rank}, kv_rank={self.kv_rank}, window={self.window}, backend={self.backend}"
        )


class TPASelfAttention(VpMoESelfAttention):
    """Local-layer self-attention: TPA factors -> fused core -> ``linear_proj``.

    Same call signature as ``SelfAttention``; ``rotary_pos_emb`` must be the GRAPE-M angle table.
    """

    def __init__(self, prev: VpMoESelfAttention):
        super().__init__(prev, rotate=True)

    @staticmethod
    def _gain(norm) -> Optional[Tensor]:
        return getattr(norm, "weight", None)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        """``hidden_states [s, b, h]`` -> ``(output [s, b, h], bias or None)``."""
        if inference_context is not None or inference_params is not None:
            raise _unsupported("inference (KV cache)")
        if packed_seq_params is not None or key_value_states is not None or attention_bias is not None:
            raise _unsupported("packed sequences / cross attention / attention_bias")
        if rotary_pos_emb is None:
            raise RuntimeError(f"layer {self.layer_number}: TPA attention needs the GRAPE-M angle table")
        if isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = rotary_pos_emb[0]
        factors, qkv_bias = self.linear_qkv(hidden_states)
        cos, sin = grape_m_cos_sin(rotary_pos_emb, hidden_states.shape[0])
        out = self.core_attention(
            factors, qkv_bias, self._gain(self.q_layernorm), self._gain(self.k_layernorm), cos, sin
        )
        return self.linear_proj(out)
