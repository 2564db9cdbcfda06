"""Plain-PyTorch references for the fused TPA local-attention op.

Three things live here (spec ``tpa_attention.md`` sections 2.3-2.5, 4.1, 5.1):

* :func:`tpa_reference` - the precision-agnostic reference of the whole op
  (factors -> contraction -> exact ``/R`` -> bias -> QK RMSNorm -> GRAPE-M
  rotation -> sliding-window attention with a learnable sink). Math runs in
  ``max(float32, input dtype)``: feed float64 tensors to get the float64
  oracle the tests compare every implementation against.
* :func:`tpa_fork_emulation` - the same function with the reference fork's
  rounding points (bf16 contraction output, bf16 bias add, bf16 cos/sin and
  rotation, bf16 logits, ``-10000`` mask fill, bf16 probabilities), used to
  size parity tolerances.
* The unpacked-weights form (:func:`pack_fork_factor_weights`,
  :func:`fork_mixed_qkv`, :func:`split_mixed_qkv`, :func:`split_qkv_bias`,
  :func:`merge_qkv_bias`): converts the fork's six factor linears and its
  interleaved 1536-wide bias to/from the packed factor layout the op consumes.

Packed factor layout (one GEMM output, last dim ``F``)::

    [ A_q (H*Rq) | A_k (G*R) | A_v (G*R) | B_q (Rq*d) | B_k (R*d) | B_v (R*d) ]

with ``A_q`` column ``h*Rq + r``, ``A_k``/``A_v`` column ``g*R + r`` and
``B_*`` column ``r*d + i``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "factor_width",
    "factor_offsets",
    "split_factors",
    "split_qkv_bias",
    "merge_qkv_bias",
    "pack_fork_factor_weights",
    "fork_mixed_qkv",
    "split_mixed_qkv",
    "fork_qkv",
    "window_mask",
    "sink_attention_dense",
    "tpa_prologue_reference",
    "tpa_reference",
    "tpa_fork_emulation",
]


# --------------------------------------------------------------------------- layout


def factor_width(num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int) -> int:
    """Width ``F`` of the packed factor vector of one token.

    ``F = H*Rq + G*R + G*R + Rq*d + R*d + R*d`` (1064 for vpMoE).
    """
    return (
        num_heads * q_rank
        + 2 * num_groups * kv_rank
        + q_rank * head_dim
        + 2 * kv_rank * head_dim
    )


def factor_offsets(num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int) -> dict:
    """Column offsets of the six factor blocks inside the packed vector.

    Returns:
        dict with keys ``a_q, a_k, a_v, b_q, b_k, b_v, end``.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    o = {}
    o["a_q"] = 0
    o["a_k"] = o["a_q"] + H * Rq
    o["a_v"] = o["a_k"] + G * R
    o["b_q"] = o["a_v"] + G * R
    o["b_k"] = o["b_q"] + Rq * d
    o["b_v"] = o["b_k"] + R * d
    o["end"] = o["b_v"] + R * d
    return o


def split_factors(factors: Tensor, num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int):
    """Split packed factors ``[s, b, F]`` into the six factor tensors.

    Returns:
        ``A_q [s,b,H,Rq]``, ``A_k [s,b,G,R]``, ``A_v [s,b,G,R]``,
        ``B_q [s,b,Rq,d]``, ``B_k [s,b,R,d]``, ``B_v [s,b,R,d]`` (views).
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    o = factor_offsets(H, G, d, Rq, R)
    s, b = factors.shape[:2]
    a_q = factors[..., o["a_q"]:o["a_k"]].unflatten(-1, (H, Rq))
    a_k = factors[..., o["a_k"]:o["a_v"]].unflatten(-1, (G, R))
    a_v = factors[..., o["a_v"]:o["b_q"]].unflatten(-1, (G, R))
    b_q = factors[..., o["b_q"]:o["b_k"]].unflatten(-1, (Rq, d))
    b_k = factors[..., o["b_k"]:o["b_v"]].unflatten(-1, (R, d))
    b_v = factors[..., o["b_v"]:o["end"]].unflatten(-1, (R, d))
    return a_q, a_k, a_v, b_q, b_k, b_v


def split_qkv_bias(qkv_bias: Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Split Megatron's interleaved mixed-QKV bias (spec 2.4).

    Args:
        qkv_bias: ``[G*(H/G+2)*d]``; per group ``[q_{g*hpg} .. q_{g*hpg+hpg-1} | k_g | v_g]``.

    Returns:
        ``c_q [H, d]``, ``c_k [G, d]``, ``c_v [G, d]`` (differentiable views).
    """
    H, G, d = num_heads, num_groups, head_dim
    hpg = H // G
    per = qkv_bias.view(G, hpg + 2, d)
    c_q = per[:, :hpg].reshape(H, d)
    c_k = per[:, hpg]
    c_v = per[:, hpg + 1]
    return c_q, c_k, c_v


def merge_qkv_bias(c_q: Tensor, c_k: Tensor, c_v: Tensor) -> Tensor:
    """Inverse of :func:`split_qkv_bias`: ``[H,d], [G,d], [G,d] -> [G*(H/G+2)*d]``."""
    H, d = c_q.shape
    G = c_k.shape[0]
    hpg = H // G
    return torch.cat([c_q.view(G, hpg, d), c_k.view(G, 1, d), c_v.view(G, 1, d)], dim=1).reshape(-1)


def pack_fork_factor_weights(
    linear_a_q: Tensor,
    linear_a_k: Tensor,
    linear_a_v: Tensor,
    linear_b_q: Tensor,
    linear_b_k: Tensor,
    linear_b_v: Tensor,
) -> Tensor:
    """Pack the fork's six factor weights into one ``[F, hidden]`` weight.

    Args:
        linear_a_q: ``[H*Rq, hidden]`` (row ``h*Rq + r``).
        linear_a_k, linear_a_v: ``[G*R, hidden]`` (row ``g*R + r``).
        linear_b_q: ``[Rq*d, hidden]`` (row ``r*d + i``).
        linear_b_k, linear_b_v: ``[R*d, hidden]``.

    Returns:
        ``W_packed [F, hidden]`` so that ``F.linear(x, W_packed)`` is the op's ``factors``.
    """
    return torch.cat([linear_a_q, linear_a_k, linear_a_v, linear_b_q, linear_b_k, linear_b_v], dim=0)


def fork_mixed_qkv(
    x: Tensor,
    linear_a_q: Tensor,
    linear_a_k: Tensor,
    linear_a_v: Tensor,
    linear_b_q: Tensor,
    linear_b_k: Tensor,
    linear_b_v: Tensor,
    qkv_bias: Optional[Tensor],
    *,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    q_rank: int,
    kv_rank: int,
) -> Tensor:
    """The fork's ``TPALinearQKV`` output, computed independently of the packed path.

    Six separate projections, per-token ``matmul`` contraction in the input dtype, exact
    ``/R``, packing into Megatron's interleaved mixed layout, then the bias add.

    Args:
        x: hidden states ``[s, b, hidden]``.

    Returns:
        ``mixed_qkv [s, b, G*(H/G+2)*d]`` in ``x.dtype``.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    hpg = H // G
    s, b = x.shape[:2]
    a_q = torch.nn.functional.linear(x, linear_a_q).view(s, b, H, Rq)
    a_k = torch.nn.functional.linear(x, linear_a_k).view(s, b, G, R)
    a_v = torch.nn.functional.linear(x, linear_a_v).view(s, b, G, R)
    b_q = torch.nn.functional.linear(x, linear_b_q).view(s, b, Rq, d)
    b_k = torch.nn.functional.linear(x, linear_b_k).view(s, b, R, d)
    b_v = torch.nn.functional.linear(x, linear_b_v).view(s, b, R, d)
    q = torch.matmul(a_q, b_q) / Rq  # [s, b, H, d]
    k = torch.matmul(a_k, b_k) / R  # [s, b, G, d]
    v = torch.matmul(a_v, b_v) / R
    mixed = torch.cat([q.view(s, b, G, hpg, d), k.view(s, b, G, 1, d), v.view(s, b, G, 1, d)], dim=3)
    mixed = mixed.reshape(s, b, G * (hpg + 2) * d)
    if qkv_bias is not None:
        mixed = mixed + qkv_bias
    return mixed


def split_mixed_qkv(mixed: Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Megatron's ``get_query_key_value_tensors`` split (TP = 1).

    Args:
        mixed: ``[s, b, G*(H/G+2)*d]``.

    Returns:
        ``q [s,b,H,d]``, ``k [s,b,G,d]``, ``v [s,b,G,d]``.
    """
    H, G, d = num_heads, num_groups, head_dim
    hpg = H // G
    s, b = mixed.shape[:2]
    per = mixed.view(s, b, G, hpg + 2, d)
    q = per[:, :, :, :hpg].reshape(s, b, H, d)
    k = per[:, :, :, hpg]
    v = per[:, :, :, hpg + 1]
    return q, k, v


def fork_qkv(
    x: Tensor,
    linear_a_q: Tensor,
    linear_a_k: Tensor,
    linear_a_v: Tensor,
    linear_b_q: Tensor,
    linear_b_k: Tensor,
    linear_b_v: Tensor,
    qkv_bias: Optional[Tensor],
    gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    *,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    q_rank: int,
    kv_rank: int,
    eps: float = 1e-5,
):
    """The fork's q/k/v from its six unpacked factor weights (spec 2.3 steps 1-6).

    :func:`fork_mixed_qkv`, Megatron's split, QK RMSNorm and the GRAPE-M rotation, in
    ``max(float32, x.dtype)`` math. Equals :func:`tpa_prologue_reference` applied to
    ``F.linear(x, pack_fork_factor_weights(...))``.

    Args:
        x: hidden states ``[s, b, hidden]``; weights as in :func:`pack_fork_factor_weights`.
        cos, sin: ``[s, d/2]`` GRAPE-M tables.

    Returns:
        ``q [s,b,H,d]``, ``k [s,b,G,d]``, ``v [s,b,G,d]`` in the compute dtype.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    ws = [w.to(dt) for w in (linear_a_q, linear_a_k, linear_a_v, linear_b_q, linear_b_k, linear_b_v)]
    mixed = fork_mixed_qkv(
        x.to(dt), *ws, None if qkv_bias is None else qkv_bias.to(dt),
        num_heads=num_heads, num_groups=num_groups, head_dim=head_dim, q_rank=q_rank, kv_rank=kv_rank,
    )
    q, k, v = split_mixed_qkv(mixed, num_heads, num_groups, head_dim)
    q, _ = _rms_norm(q, None if gamma_q is None else gamma_q.to(dt), eps)
    k, _ = _rms_norm(k, None if gamma_k is None else gamma_k.to(dt), eps)
    return _rotate(q, cos.to(dt), sin.to(dt)), _rotate(k, cos.to(dt), sin.to(dt)), v


# --------------------------------------------------------------------------- attention


def window_mask(sq: int, window: int, device=None) -> Tensor:
    """Boolean visibility ``[s, s]``: key ``j`` visible to query ``i`` iff ``0 <= i-j <= W-1``."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sq, device=device)[None, :]
    return (i >= j) & (i - j < window)


def sink_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sink: Tensor,
    window: int,
    softmax_scale: float,
) -> Tuple[Tensor, Tensor]:
    """Dense sliding-window attention with a learnable sink column (spec 4.1).

    Math in ``max(float32, q.dtype)``; the sink is an extra softmax column with value 0,
    not multiplied by the scale. GQA: query head ``h`` reads KV group ``h // (H/G)``.

    Args:
        q: ``[s, b, H, d]``; k, v: ``[s, b, G, d]``; sink: ``[H]``.

    Returns:
        ``out [s, b, H, d]`` (compute dtype), ``lse [b, H, s]`` (natural log, sink-inclusive).
    """
    dt = torch.promote_types(q.dtype, torch.float32)
    s, b, H, d = q.shape
    G = k.shape[2]
    hpg = H // G
    qf = q.to(dt).permute(1, 2, 0, 3)  # [b, H, s, d]
    kf = k.to(dt).repeat_interleave(hpg, dim=2).permute(1, 2, 0, 3)
    vf = v.to(dt).repeat_interleave(hpg, dim=2).permute(1, 2, 0, 3)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale  # [b, H, s, s]
    vis = window_mask(s, window, q.device)
    scores = scores.masked_fill(~vis, float("-inf"))
    sink_col = sink.to(dt).view(1, H, 1, 1).expand(b, H, s, 1)
    full = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(full, dim=-1)  # [b, H, s]
    p = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(p, vf).permute(2, 0, 1, 3)  # [s, b, H, d]
    return out, lse


# --------------------------------------------------------------------------- prologue


def _rms_norm(x: Tensor, gamma: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
    if gamma is None:
        return x, None
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd * gamma.to(x.dtype), rstd.squeeze(-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GRAPE-M/RoPE rotation on non-interleaved planes ``(p, p+P)``.

    ``x [s, b, n, d]``, ``cos``/``sin`` ``[s, d/2]``; ``y1 = x1 cos - x2 sin``,
    ``y2 = x2 cos + x1 sin``.
    """
    P = x.shape[-1] // 2
    c = cos.to(x.dtype)[:, None, None, :]
    sn = sin.to(x.dtype)[:, None, None, :]
    x1, x2 = x[..., :P], x[..., P:]
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1)


def tpa_prologue_reference(
    factors: Tensor,
    qkv_bias: Optional[Tensor],
    gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    *,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    q_rank: int,
    kv_rank: int,
    eps: float = 1e-5,
):
    """Factors -> normalised, rotated ``q``, ``k`` and ``v`` (fork order, spec 2.3 steps 2-6).

    Math in ``max(float32, factors.dtype)``.

    Args:
        factors: ``[s, b, F]`` packed factors.
        qkv_bias: ``[G*(H/G+2)*d]`` interleaved, or None.
        gamma_q, gamma_k: ``[d]`` RMSNorm gains or None (no norm on that side).
        cos, sin: ``[s, d/2]`` GRAPE-M tables.

    Returns:
        ``q [s,b,H,d]``, ``k [s,b,G,d]``, ``v [s,b,G,d]`` in the compute dtype.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    dt = torch.promote_types(factors.dtype, torch.float32)
    a_q, a_k, a_v, b_q, b_k, b_v = (t.to(dt) for t in split_factors(factors, H, G, d, Rq, R))
    q = torch.matmul(a_q, b_q) / Rq
    k = torch.matmul(a_k, b_k) / R
    v = torch.matmul(a_v, b_v) / R
    if qkv_bias is not None:
        c_q, c_k, c_v = split_qkv_bias(qkv_bias.to(dt), H, G, d)
        q = q + c_q
        k = k + c_k
        v = v + c_v
    q, _ = _rms_norm(q, None if gamma_q is None else gamma_q.to(dt), eps)
    k, _ = _rms_norm(k, None if gamma_k is None else gamma_k.to(dt), eps)
    cos_c, sin_c = cos.to(dt), sin.to(dt)
    q = _rotate(q, cos_c, sin_c)
    k = _rotate(k, cos_c, sin_c)
    return q, k, v


def tpa_reference(
    factors: Tensor,
    qkv_bias: Optional[Tensor],
    gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    sink: Tensor,
    *,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    q_rank: int,
    kv_rank: int,
    window: int,
    eps: float = 1e-5,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Reference of the whole fused op (differentiable with plain autograd).

    Args: as :func:`tpa_prologue_reference`, plus ``sink [H]`` and ``window`` W.

    Returns:
        ``out [s, b, H*d]`` in ``factors.dtype`` (and ``lse [b, H, s]`` in the compute dtype when
        ``return_lse``).
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    q, k, v = tpa_prologue_reference(
        factors, qkv_bias, gamma_q, gamma_k, cos, sin,
        num_heads=num_heads, num_groups=num_groups, head_dim=head_dim,
        q_rank=q_rank, kv_rank=kv_rank, eps=eps,
    )
    out, lse = sink_attention_dense(q, k, v, sink, window, softmax_scale)
    s, b = factors.shape[:2]
    out = out.reshape(s, b, num_heads * head_dim).to(factors.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- fork emulation


def tpa_fork_emulation(
    factors: Tensor,
    qkv_bias: Optional[Tensor],
    gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    sink: Tensor,
    *,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    q_rank: int,
    kv_rank: int,
    window: int,
    eps: float = 1e-5,
    softmax_scale: Optional[float] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """The fork's local-layer chain with its rounding points (spec 2.5).

    Contraction output, ``/R`` and bias add in ``dtype``; RMSNorm with fp32 internals and
    ``dtype`` output; cos/sin rounded to ``dtype`` and the rotation done in ``dtype``; logits
    from a ``dtype`` ``baddbmm`` (rounded), softmax in fp32 with ``-10000`` fill for masked
    entries and the sink as an extra column; probabilities rounded to ``dtype`` before
    ``P @ V``.

    Returns:
        ``out [s, b, H*d]`` in ``dtype``.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    hpg = H // G
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    s, b = factors.shape[:2]
    a_q, a_k, a_v, b_q, b_k, b_v = (t.to(dtype) for t in split_factors(factors, H, G, d, Rq, R))
    q = torch.matmul(a_q, b_q) / Rq
    k = torch.matmul(a_k, b_k) / R
    v = torch.matmul(a_v, b_v) / R
    mixed = torch.cat([q.view(s, b, G, hpg, d), k.view(s, b, G, 1, d), v.view(s, b, G, 1, d)], dim=3)
    mixed = mixed.reshape(s, b, -1)
    if qkv_bias is not None:
        mixed = mixed + qkv_bias.to(dtype)
    q, k, v = split_mixed_qkv(mixed, H, G, d)

    def norm(x, g):
        if g is None:
            return x
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * g.float()
        return y.to(dtype)

    q, k = norm(q, gamma_q), norm(k, gamma_k)
    c = torch.cat([cos, cos], dim=-1).to(dtype)[:, None, None, :]
    sn = torch.cat([sin, sin], dim=-1).to(dtype)[:, None, None, :]

    def rot(x):
        P = d // 2
        x1, x2 = x[..., :P], x[..., P:]
        return x * c + torch.cat([-x2, x1], dim=-1) * sn

    q, k = rot(q), rot(k)
    # [b*H, s, d] layouts as in Megatron's DotProductAttention
    qh = q.permute(1, 2, 0, 3).reshape(b * H, s, d)
    kh = k.repeat_interleave(hpg, dim=2).permute(1, 2, 0, 3).reshape(b * H, s, d)
    vh = v.repeat_interleave(hpg, dim=2).permute(1, 2, 0, 3).reshape(b * H, s, d)
    scores = torch.baddbmm(
        torch.empty(b * H, s, s, dtype=dtype, device=q.device), qh, kh.transpose(1, 2),
        beta=0.0, alpha=softmax_scale,
    ).float().view(b, H, s, s)
    vis = window_mask(s, window, q.device)
    scores = scores.masked_fill(~vis, -10000.0)
    full = torch.cat([scores, sink.float().view(1, H, 1, 1).expand(b, H, s, 1)], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :s].to(dtype).view(b * H, s, s)
    out = torch.bmm(probs, vh).view(b, H, s, d).permute(2, 0, 1, 3).reshape(s, b, H * d)
    return out
