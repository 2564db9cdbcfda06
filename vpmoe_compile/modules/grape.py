"""GRAPE positional encoding modules (docs/design.md#grape).

* :class:`GrapeMRotaryEmbedding` — multiplicative GRAPE with canonical planes and learnable
  frequencies, one ``log_freq [d/2]`` fp32 vector per model shared by all local layers and heads
  (the fork's parametrisation, docs/design.md#grape): ``freq = exp(log_freq / log_freq_scale)``,
  initialised to RoPE with the config's base. It replaces the stock ``RotaryEmbedding`` at
  ``model.rotary_pos_emb`` and keeps its call signature, so ``GPTModel`` hands its output (the
  angle table ``[s, 1, 1, d]`` fp32, ``cat(angles, angles)`` like stock) to every layer. No
  cache: every forward rebuilds the angles, so the gradient reaches ``log_freq``.
* :func:`grape_m_cos_sin` / :func:`apply_grape_m` — fp32 tables and the rotation in Megatron's
  non-interleaved layout (planes ``(p, p + d/2)``; ``y1 = x1 cos - x2 sin``,
  ``y2 = x2 cos + x1 sin``), computed in fp32 and cast back.
* :class:`GrapeA` — the ALiBi special case of additive GRAPE for global layers: a
  non-persistent fp32 buffer of per-head slopes (not learnable, not in the state dict).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from vpmoe_compile.tensor_parallel import into_tp_region, tp_world


class GrapeMRotaryEmbedding(nn.Module):
    """Model-level GRAPE-M: learnable log-frequencies, drop-in for ``RotaryEmbedding``.

    Args:
        kv_channels: head dim ``d`` (even); ``d/2`` rotation planes.
        rotary_base: RoPE base used for the initialisation (10000).
        log_freq_scale: ``c`` in ``freq = exp(log_freq / c)`` (16; damps the effective lr).
        learnable: learnable frequencies (default). Frozen mode uses the RoPE inverse
            frequencies directly (bitwise equal to stock RoPE).
        share_across_heads: must be True (per-head frequencies cannot be fused with TPA's
            shared B factors, docs/design.md#grape).
        cp_group: context-parallel group (angles are sliced like stock RoPE).
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_base: float = 10000.0,
        log_freq_scale: float = 16.0,
        learnable: bool = True,
        share_across_heads: bool = True,
        cp_group=None,
        device=None,
    ):
        super().__init__()
        if not share_across_heads:
            raise ValueError(
                "per-head GRAPE-M frequencies (grapem_share_across_heads = false) are not "
                "supported: TPA rebuilds q/k from factors shared by all heads, which needs one "
                "rotation per position. Set [grape] grapem_share_across_heads = true."
            )
        if kv_channels % 2:
            raise ValueError(f"GRAPE-M needs an even head dim, got {kv_channels}")
        self.kv_channels = kv_channels
        self.rotary_base = float(rotary_base)
        self.log_freq_scale = float(log_freq_scale)
        self.learnable = learnable
        self.cp_group = cp_group
        inv_freq = self._rope_inv_freq(device)
        self.tp_size = tp_world()[0]  # > 1: the gradient of log_freq is summed over the TP group
        if learnable:
            self.log_freq = nn.Parameter(torch.log(inv_freq) * self.log_freq_scale)
            self.log_freq.grape_log_freq = True  # routed to AdamW, no weight decay
            self.register_buffer("inv_freq", None, persistent=False)
        else:
            self.log_freq = None
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def frequencies(self) -> Tensor:
        """``[d/2]`` fp32 frequencies (radians per token)."""
        if self.log_freq is None:
            return self.inv_freq.float()
        lf = self.log_freq
        if lf.dtype != torch.float64:  # fp32 math (float64 is kept for exact tests)
            lf = lf.float()
        if self.tp_size > 1:  # every TP rank rotates its own heads: the gradient sums the ranks'
            lf = into_tp_region(lf)
        return torch.exp(lf / self.log_freq_scale)

    def angles(self, seq_len: int, offset: int = 0) -> Tensor:
        """``[s, d/2]`` fp32 angles ``theta[t, p] = (t + offset) * freq_p`` (exact integer
        positions times fp32 frequencies, never accumulated)."""
        freq = self.frequencies()
        pos = torch.arange(seq_len, device=freq.device, dtype=freq.dtype) + offset
        return torch.outer(pos, freq)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        """``[s, 1, 1, d]`` fp32 angle table, ``cat(theta, theta)`` (stock RoPE's layout)."""
        if packed_seq:
            raise NotImplementedError("GRAPE-M with packed (THD) sequences is not supported yet")
        theta = self.angles(max_seq_len, offset)
        emb = torch.cat((theta, theta), dim=-1)[:, None, None, :]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb

    def get_rotary_seq_len(
        self, inference_context, transformer, transformer_input, transformer_config, packed_seq_params=None, *, inference_params=None
    ) -> int:
        """Same rule as stock ``RotaryEmbedding.get_rotary_seq_len``."""
        if packed_seq_params is not None:
            return max(packed_seq_params.max_seqlen_q, packed_seq_params.max_seqlen_kv)
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("GRAPE-M inference (KV cache) is not supported yet")
        if transformer is not None and getattr(transformer, "input_tensor", None) is not None:
            seq = transformer.input_tensor.size(0)
        else:
            seq = transformer_input.size(0)
        if transformer_config.sequence_parallel:
            seq *= transformer_config.tensor_model_parallel_size
        return seq * transformer_config.context_parallel_size

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """``torch_dist`` form: ``log_freq`` replicated across TP and DP (Megatron's default for a
        plain module) and, under pipeline parallelism, across the stages: every stage holds a
        copy (kept equal by the gradient all-reduce over the pipeline group, see
        :func:`share_across_pipeline_stages`), the first stage's is the main replica (the other
        stages' replica id is their pipeline rank, as Megatron marks the last stage's copy of a
        tied embedding)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        metadata = metadata or {}
        state = {"log_freq": self.log_freq} if self.log_freq is not None else {}
        groups = {}
        if ps.model_parallel_is_initialized():  # replicated over TP: TP rank 0 saves it
            groups = dict(tp_group=ps.get_tensor_model_parallel_group(),
                          dp_cp_group=metadata.get("dp_cp_group") or ps.get_data_parallel_group(with_context_parallel=True))
        out = make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets, **groups)
        pp_rank = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        if pp_rank:
            for sh in out.values():
                rid = sh.replica_id
                sh.replica_id = (pp_rank, *rid[1:]) if isinstance(rid, tuple) else pp_rank
        return out

    def _apply(self, fn, *args, **kwargs):
        # Overrides torch's private nn.Module._apply, the one method every module-wide cast and
        # move (.to(), .bfloat16(), Float16Module) goes through; an override has to be a method
        # here, so it cannot live in megatron_base.compat.
        # Module-wide casts such as model.bfloat16() / Float16Module must not round the
        # frequencies: keep exact fp32 copies across the cast and put them back on the new device.
        lf = self.log_freq.detach().clone() if self.log_freq is not None else None
        grad = self.log_freq.grad.detach().clone() if lf is not None and self.log_freq.grad is not None else None
        super()._apply(fn, *args, **kwargs)
        if lf is not None and self.log_freq.dtype not in (torch.float32, torch.float64):
            self.log_freq.data = lf.to(device=self.log_freq.device, dtype=torch.float32)
            if grad is not None:
                self.log_freq.grad = grad.to(device=self.log_freq.device, dtype=torch.float32)
        if self.inv_freq is not None and self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._rope_inv_freq(self.inv_freq.device)
        return self

    def _rope_inv_freq(self, device=None) -> Tensor:
        d = self.kv_channels
        return 1.0 / (self.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def extra_repr(self) -> str:
        return (
            f"kv_channels={self.kv_channels}, base={self.rotary_base:g}, "
            f"log_freq_scale={self.log_freq_scale:g}, learnable={self.learnable}"
        )


def grape_m_cos_sin(rotary_pos_emb: Tensor, seq_len: int) -> Tuple[Tensor, Tensor]:
    """fp32 ``cos, sin`` tables ``[s, d/2]`` from the ``[s', 1, 1, d]`` angle table (fp64 for an
    fp64 table)."""
    d = rotary_pos_emb.shape[-1]
    theta = rotary_pos_emb[:seq_len, 0, 0, : d // 2]
    theta = theta if theta.dtype == torch.float64 else theta.float()  # fp32 at least
    return torch.cos(theta), torch.sin(theta)


def apply_grape_m(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [s, b, h, d]`` by the per-position planes, in fp32 (fp64 for fp64 ``x``);
    returns ``x``'s dtype.

    ``cos``/``sin`` are ``[s, d/2]`` fp32. Plane ``p`` couples ``(p, p + d/2)`` (Megatron's
    non-interleaved "rotate-half" layout).
    """
    half = x.shape[-1] // 2
    xf = x if x.dtype == torch.float64 else x.float()  # fp32 at least
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos[:, None, None, :]
    s_ = sin[:, None, None, :]
    y = torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)
    return y.to(x.dtype)


class GrapeA(nn.Module):
    """ALiBi = GRAPE-A on global layers: fixed per-query-head slopes (non-persistent buffer).

    ``slopes [H_local]`` are the slice of the standard slopes of all ``H`` heads held by this
    tensor-parallel rank. The bias ``-slope_h * (i - j)`` is applied inside the attention kernel
    after the softmax scale, in fp32.
    """

    def __init__(self, num_heads: int, tp_rank: int = 0, tp_size: int = 1, device=None):
        super().__init__()
        from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes

        if num_heads % tp_size:
            raise ValueError(f"{num_heads} heads do not split over TP={tp_size}")
        per = num_heads // tp_size
        slopes = alibi_slopes(num_heads)[tp_rank * per : (tp_rank + 1) * per]
        self.num_heads, self.tp_rank, self.tp_size = num_heads, tp_rank, tp_size
        self.register_buffer("slopes", slopes.to(device=device, dtype=torch.float32), persistent=False)

    def _apply(self, fn, *args, **kwargs):  # torch's private cast hook, as in GrapeMRotaryEmbedding
        super()._apply(fn, *args, **kwargs)
        if self.slopes.dtype != torch.float32:  # recompute: a bf16 cast would have rounded them
            from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes

            per = self.num_heads // self.tp_size
            exact = alibi_slopes(self.num_heads)[self.tp_rank * per : (self.tp_rank + 1) * per]
            self.slopes = exact.to(device=self.slopes.device)
        return self

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, slopes={[round(float(s), 6) for s in self.slopes[:4]]}..."


def share_across_pipeline_stages(rope: GrapeMRotaryEmbedding, config) -> bool:
    """Keep a model's ``log_freq`` equal on every pipeline stage with Megatron's own mechanism:
    ``finalize_model_grads`` all-reduces the gradient of every parameter marked
    ``pipeline_parallel`` over the pipeline group when ``config.has_cond_embedder`` is set (the
    path Megatron has for embedders replicated on each stage). Each stage builds the same
    initial value (RoPE frequencies), so the copies stay bitwise equal. The copies after the
    first stage are marked ``shared`` (Megatron's attribute for a tied embedding's second copy),
    so grad norms count the parameter once. Returns whether anything was marked (pipeline size
    > 1 and a learnable ``log_freq``)."""
    if rope.log_freq is None or getattr(config, "pipeline_model_parallel_size", 1) <= 1:
        return False
    from megatron.core import parallel_state as ps

    rope.log_freq.pipeline_parallel = True
    config.has_cond_embedder = True
    # Megatron's mark of a copy held by another stage too: the grad norm (Megatron's
    # get_main_grads_for_grad_norm, and the plain optimizer's) counts it on the first stage only
    rope.log_freq.shared = ps.get_pipeline_model_parallel_rank() > 0
    return True
