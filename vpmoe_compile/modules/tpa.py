"""Tensor Product Attention modules for local (sliding-window) layers.

* :class:`TPAFactorProjection` replaces ``linear_qkv``: ONE packed GEMM
  ``factors = x @ W^T`` with ``W [F, h]``, ``F = H*Rq + 2*G*R + (Rq + 2R)*d``, rows in the order
  of :func:`~vpmoe_compile.ops.tpa_attention.layout.tpa_factor_rows` (the fork's six factor
  projections fused into one; ``docs/design.md#tpa-attention``). The QKV bias (Megatron's
  interleaved ``[G*(H/G+2)*d]`` layout) is the stock ``linear_qkv.bias`` parameter, carried over.
  The weight carries ``tpa_factor_rows`` (the one-rank rows) so the optimizer orthogonalises each
  factor matrix on its own. Under tensor parallelism (``docs/design.md#tensor-parallelism``) each
  rank holds its heads' rows of the head factors ``A_q``, ``A_k``, ``A_v`` and all rows of the
  token factors ``B_q``, ``B_k``, ``B_v`` (every head contracts with them): the weight's
  ``tp_segments`` say which rows are which (:mod:`vpmoe_compile.tensor_parallel`), the input is
  copied to the TP region as Megatron's ``ColumnParallelLinear`` does (its gradient summed over
  the TP group), and so is the ``B`` rows' gradient.
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
from vpmoe_compile.tensor_parallel import mark_head_split, tp_world


class _SumGradOverTP(torch.autograd.Function):
    """Identity on the weight; in backward the gradient rows ``[start:]`` (the replicated token
    factors, to which every TP rank's heads contribute) are summed over the TP group."""

    @staticmethod
    def forward(ctx, weight, start: int, group):
        ctx.start, ctx.group = start, group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad[ctx.start :], group=ctx.group)
        return grad, None, None


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
        tp_size, tp_rank: the tensor-parallel world (default: Megatron's). ``num_heads`` and
            ``num_groups`` are the model's totals; this rank holds ``H / tp`` heads and
            ``G / tp`` groups. The weight is initialised whole (the same values as at TP 1 for
            the same generator state, made equal over the TP group by a broadcast from its
            first rank) and this rank keeps its rows.
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
        tp_size: Optional[int] = None,
        tp_rank: Optional[int] = None,
    ):
        super().__init__(config=config)
        if tp_size is None or tp_rank is None:
            tp_size, tp_rank = tp_world()
        if num_heads % tp_size or num_groups % tp_size:
            raise ValueError(
                f"[tpa] {num_heads} heads / {num_groups} query groups do not split over tensor-parallel "
                f"size {tp_size}; use a TP size that divides the number of query groups"
            )
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.num_heads, self.num_groups, self.head_dim = num_heads // tp_size, num_groups // tp_size, head_dim
        self.q_rank, self.kv_rank = q_rank, kv_rank
        full_rows = tpa_factor_rows(num_heads, num_groups, head_dim, q_rank, kv_rank)
        self.rows = tpa_factor_rows(self.num_heads, self.num_groups, head_dim, q_rank, kv_rank)
        segments, start = [], 0
        for name, n in self.rows:
            segments.append((start, n, name.startswith("a_")))  # head factors split, token factors replicated
            start += n
        self.out_features, self.in_features = start, config.hidden_size
        #: first row of the replicated token factors (B_q, B_k, B_v): their gradient is summed over TP
        self.replicated_start = next(s for s, _, sharded in segments if not sharded)
        weight = torch.empty(
            sum(n for _, n in full_rows), config.hidden_size, dtype=dtype or config.params_dtype, device=device
        )
        if weight.device.type != "meta" and config.perform_initialization:
            with torch.no_grad():
                start = 0
                for _, n in full_rows:
                    block = weight[start : start + n]
                    if init == "normal":
                        block.normal_(0.0, config.init_method_std)
                    elif init == "xavier":
                        bound = math.sqrt(6.0 / (n + config.hidden_size))
                        block.uniform_(-bound, bound)
                    else:
                        raise ValueError(f"[tpa] tpa_init must be 'normal' or 'xavier', got {init!r}")
                    start += n
        if tp_size > 1:
            from vpmoe_compile.tensor_parallel import TPLayout, tp_group

            if weight.device.type != "meta":
                torch.distributed.broadcast(
                    weight, torch.distributed.get_global_rank(tp_group(), 0), group=tp_group()
                )
            weight = TPLayout(0, tuple(segments), tp_size, tp_rank).shard(weight)
        self.weight = nn.Parameter(weight)
        # Megatron attributes: reduced by DDP; not one Megatron partition (the head-factor rows
        # are split over TP, the token-factor rows replicated: ``tp_segments``).
        self.weight.tensor_model_parallel = False
        self.weight.partition_dim = -1
        self.weight.partition_stride = 1
        self.weight.allreduce = True
        self.weight.tpa_factor_rows = full_rows
        if tp_size > 1:
            self.weight.tp_segments = tuple(segments)
        self.bias = bias

    # Keep the ``linear_qkv._extra_state`` checkpoint key of the ColumnParallelLinear it replaces.
    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        return None

    def forward(self, hidden_states: Tensor):
        """``[s, b, h]`` -> ``(factors [s, b, F'], bias)``; ``F'`` = this rank's rows. Under
        sequence parallelism the input is this rank's ``[s / tp, b, h]`` and the factors cover
        the whole sequence."""
        if self.tp_size == 1:
            return F.linear(hidden_states, self.weight), self.bias
        from vpmoe_compile.tensor_parallel import into_tp_region, tp_group

        if self.config.sequence_parallel:
            # this rank's [s / tp, b, h] slice: all-gather the sequence (backward: reduce-scatter,
            # which also sums the TP ranks' input gradients), as ColumnParallelLinear does
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            x = gather_from_sequence_parallel_region(hidden_states, group=tp_group())
        else:
            x = into_tp_region(hidden_states)
        weight = _SumGradOverTP.apply(self.weight, self.replicated_start, tp_group())
        return F.linear(x, weight), self.bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """``torch_dist`` form: the weight as one tensor per factor block
        (``<prefix>weight.a_q`` ... ``.b_v``, one-rank shapes), the head-factor blocks sharded
        over TP, the token-factor blocks replicated, so a checkpoint loads at any TP size; the
        bias as Megatron's ``ColumnParallelLinear`` saves it."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from vpmoe_compile.checkpoint_tp import factor_blocks_factory

        metadata = metadata or {}
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)  # weight, bias, _extra_state
        groups = dict(tp_group=ps.get_tensor_model_parallel_group(),
                      dp_cp_group=metadata.get("dp_cp_group") or ps.get_data_parallel_group(with_context_parallel=True))
        out = make_sharded_tensors_for_checkpoint(state, prefix, {"bias": 0}, sharded_offsets, **groups)
        base = out[f"{prefix}weight"]
        out[f"{prefix}weight"] = factor_blocks_factory(base, self.weight)
        return out

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
            mark_head_split(self.softmax_offset)  # [H / tp] under tensor parallelism
        elif self.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", stock_core.softmax_offset, persistent=False)
        else:
            self.softmax_offset = None

    def forward(self, factors, qkv_bias, gamma_q, gamma_k, cos, sin, v1=None, lam=None, return_v: bool = False):
        """``-> out [s, b, H*d]``, or ``(out, v [s, b, G, d])`` with ``return_v`` (value residual:
        ``v1`` / ``lam`` mix the first layer's values in, ``return_v`` hands this layer's on)."""
        from vpmoe_compile.ops.tpa_attention import tpa_window_attention

        sink = self.softmax_offset
        if sink is None:
            sink = torch.full((self.num_heads,), float("-inf"), device=factors.device, dtype=torch.float32)
        return tpa_window_attention(
            factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink,
            num_heads=self.num_heads, num_groups=self.num_groups, head_dim=self.head_dim,
            q_rank=self.q_rank, kv_rank=self.kv_rank, window=self.window, eps=self.eps,
            softmax_scale=self.softmax_scale, backend=self.backend, v1=v1, lam=lam, return_v=return_v,
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
        factors, qkv_bias = self.linear_qkv(hidden_states)  # [s, b, F']
        cos, sin = grape_m_cos_sin(rotary_pos_emb, factors.shape[0])
        gains = (self._gain(self.q_layernorm), self._gain(self.k_layernorm))
        if self.value_residual is None:
            out = self.core_attention(factors, qkv_bias, *gains, cos, sin)
        else:  # the value residual inside the fused op: layer 1 hands its values on, the others mix
            v1, lam = self.value_residual_inputs()
            if v1 is None:
                out, self.value_residual.value = self.core_attention(factors, qkv_bias, *gains, cos, sin, return_v=True)
            else:
                out = self.core_attention(factors, qkv_bias, *gains, cos, sin, v1=v1, lam=lam)
        return self.linear_proj(out)
