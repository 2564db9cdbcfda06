"""Plain-PyTorch references for the fused TPA local-attention op (``docs/design.md#tpa-attention``).

Three things live here:

* :func:`tpa_reference` - the precision-agnostic reference of the whole op
  (factors -> contraction -> exact ``/R`` -> bias -> QK RMSNorm -> GRAPE-M
  rotation -> sliding-window attention with a learnable sink). Math runs in
  ``max(float32, input dtype)``: feed float64 tensors to get the float64
  oracle the tests compare every implementation against. The attention step is the
  sink-attention reference (:func:`vpmoe_compile.ops.sink_attention.reference.sink_attention_reference`).
* :func:`tpa_fork_emulation` - the same function with the reference fork's
  rounding points (bf16 contraction output, bf16 bias add, bf16 cos/sin and
  rotation, bf16 logits, ``-10000`` mask fill, bf16 probabilities), used to
  size parity tolerances.
* The unpacked-weights form (:func:`pack_fork_factor_weights`,
  :func:`fork_mixed_qkv`, :func:`split_mixed_qkv`, :func:`split_qkv_bias`,
  :func:`merge_qkv_bias`): converts the fork's six factor linears and its
  interleaved 1536-wide bias to/from the packed factor layout the op consumes
  (:mod:`.layout`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference, visibility_mask
from vpmoe_compile.ops.tpa_attention.layout import split_factors

__all__ = [
    "split_qkv_bias",
    "merge_qkv_bias",
    "merge_mixed_qkv",
    "pack_fork_factor_weights",
    "fork_mixed_qkv",
    "split_mixed_qkv",
    "fork_qkv",
    "tpa_prologue_reference",
    "tpa_reference",
    "tpa_fork_emulation",
]


# --------------------------------------------------------------------------- Megatron / fork layouts


def split_qkv_bias(qkv_bias: Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Split Megatron's interleaved mixed-QKV bias.

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
    return merge_mixed_qkv(c_q, c_k, c_v)


def merge_mixed_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Megatron's interleaved mixed-QKV layout, the inverse of :func:`split_mixed_qkv`:
    ``q [..., H, d]``, ``k``, ``v`` ``[..., G, d]`` -> ``[..., G*(H/G+2)*d]`` (per group the
    group's ``H/G`` query heads, then its key, then its value)."""
    *lead, H, d = q.shape
    G = k.shape[-2]
    parts = [q.reshape(*lead, G, H // G, d), k.reshape(*lead, G, 1, d), v.reshape(*lead, G, 1, d)]
    return torch.cat(parts, dim=-2).reshape(*lead, G * (H // G + 2) * d)


def _contract(a_q: Tensor, a_k: Tensor, a_v: Tensor, b_q: Tensor, b_k: Tensor, b_v: Tensor):
    """The per-token factor contraction with the exact ``1/R``: ``A [..., n, R]`` times
    ``B [..., R, d]`` -> ``q [..., H, d]``, ``k``, ``v`` ``[..., G, d]``."""
    return tuple(torch.matmul(a, b) / a.shape[-1] for a, b in ((a_q, b_q), (a_k, b_k), (a_v, b_v)))


def pack_fork_factor_weights(
    linear_a_q: Tensor,
    linear_a_k: Tensor,
    linear_a_v: Tensor,
    linear_b_q: Tensor,
    linear_b_k: Tensor,
    linear_b_v: Tensor,
) -> Tensor:
    """Pack the fork's six factor weights into one ``[F, hidden]`` weight (the arguments in the
    order of :func:`~vpmoe_compile.ops.tpa_attention.layout.tpa_factor_rows`).

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
    s, b = x.shape[:2]
    a_q = torch.nn.functional.linear(x, linear_a_q).view(s, b, H, Rq)
    a_k = torch.nn.functional.linear(x, linear_a_k).view(s, b, G, R)
    a_v = torch.nn.functional.linear(x, linear_a_v).view(s, b, G, R)
    b_q = torch.nn.functional.linear(x, linear_b_q).view(s, b, Rq, d)
    b_k = torch.nn.functional.linear(x, linear_b_k).view(s, b, R, d)
    b_v = torch.nn.functional.linear(x, linear_b_v).view(s, b, R, d)
    mixed = merge_mixed_qkv(*_contract(a_q, a_k, a_v, b_q, b_k, b_v))
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
    """The fork's q/k/v from its six unpacked factor weights (contraction, bias, QK RMSNorm, rotation).

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
    """Factors -> normalised, rotated ``q``, ``k`` and ``v`` (the fork's order of operations).

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
    q, k, v = _contract(*(t.to(dt) for t in split_factors(factors, H, G, d, Rq, R)))
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
    v1: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
    return_v: bool = False,
):
    """Reference of the whole fused op (differentiable with plain autograd).

    Args: as :func:`tpa_prologue_reference`, plus ``sink [H]`` and ``window`` W; the value
    residual: ``v1 [s, b, G, d]`` (the first layer's values) and ``lam`` (0-d mixing weight),
    both or neither: the attention reads ``lam * v + (1 - lam) * v1``.

    Returns:
        ``out [s, b, H*d]`` in ``factors.dtype``, then ``lse [b, H, s]`` in the compute dtype when
        ``return_lse``, then this layer's own (unmixed) ``v [s, b, G, d]`` in ``factors.dtype``
        when ``return_v`` (a tuple when either is asked for).
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    q, k, v = tpa_prologue_reference(
        factors, qkv_bias, gamma_q, gamma_k, cos, sin,
        num_heads=num_heads, num_groups=num_groups, head_dim=head_dim,
        q_rank=q_rank, kv_rank=kv_rank, eps=eps,
    )
    v_own = v
    if v1 is not None:
        lam_c = lam.to(v.dtype)
        v = lam_c * v + (1 - lam_c) * v1.to(v.dtype)
    out, lse = sink_attention_reference(q, k, v, sink, window=window, softmax_scale=softmax_scale,
                                        compute_dtype=q.dtype)
    s, b = factors.shape[:2]
    out = out.reshape(s, b, num_heads * head_dim).to(factors.dtype)
    extra = ((lse,) if return_lse else ()) + ((v_own.to(factors.dtype),) if return_v else ())
    return (out, *extra) if extra else out


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
    v1: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
) -> Tensor:
    """The fork's local-layer chain with its rounding points.

    Contraction output, ``/R`` and bias add in ``dtype``; RMSNorm with fp32 internals and
    ``dtype`` output; cos/sin rounded to ``dtype`` and the rotation done in ``dtype``; logits
    from a ``dtype`` ``baddbmm`` (rounded), softmax in fp32 with ``-10000`` fill for masked
    entries and the sink as an extra column; probabilities rounded to ``dtype`` before
    ``P @ V``. The value residual (``v1 [s, b, G, d]`` and the 0-d ``lam``, both or neither) is
    mixed with the fork's expression on its bf16 values, ``lam * v + (1 - lam) * v1`` (``lam`` a
    0-d fp32 tensor: PyTorch's type promotion casts it, and ``1 - lam``, to ``dtype`` inside each
    product; each product and the sum are rounded to ``dtype``).

    Returns:
        ``out [s, b, H*d]`` in ``dtype``.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    hpg = H // G
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    s, b = factors.shape[:2]
    mixed = merge_mixed_qkv(*_contract(*(t.to(dtype) for t in split_factors(factors, H, G, d, Rq, R))))
    if qkv_bias is not None:
        mixed = mixed + qkv_bias.to(dtype)
    q, k, v = split_mixed_qkv(mixed, H, G, d)
    if v1 is not None:  # the fork's expression; a 0-d fp32 lam is cast to dtype in each product
        v = lam * v + (1 - lam) * v1.to(dtype)

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
    vis = visibility_mask(s, window, q.device)
    scores = scores.masked_fill(~vis, -10000.0)
    full = torch.cat([scores, sink.float().view(1, H, 1, 1).expand(b, H, s, 1)], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :s].to(dtype).view(b * H, s, s)
    out = torch.bmm(probs, vh).view(b, H, s, d).permute(2, 0, 1, 3).reshape(s, b, H * d)
    return out
