"""Plain-PyTorch reference of window + sink attention: the one dense masked softmax with a sink.

Used by the ``sink_attention`` op (its ``"reference"`` backend), by the ``tpa_attention``
reference for its attention step, and by the tests of both ops.

Megatron layout (sequence first):

* ``q``  ``[s, b, H, d]``; ``k``, ``v`` ``[s, b, G, d]`` with ``H % G == 0``; query head ``h`` reads
  KV group ``h // (H // G)`` (Megatron's ``repeat_interleave``).
* ``sink`` ``[H]``: learnable softmax offset (Megatron ``softmax_type='learnable'``, GPT-OSS
  ``sinks``): an unscaled logit per query head that joins the softmax denominator with no value.
* ``slopes`` ``[H]`` fp32 (optional): ALiBi bias ``-m_h * (i - j)`` added **after** the softmax scale.
* ``window`` ``W`` (optional): key ``j`` is visible to query ``i`` iff ``0 <= i - j <= W - 1``;
  without a window plain causal (``j <= i``).

Math (``docs/design.md#sink-attention``)::

    z_ij = scale * q_i . k_j + bias_ij            (j visible, else -inf)
    L_i  = log( exp(sink_h) + sum_j exp(z_ij) )   (natural log, sink-inclusive)
    o_i  = sum_j exp(z_ij - L_i) v_j

The reference materialises the ``[b, H, s, s]`` score matrix: it is for tests and CPU runs at small
shapes only.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "sink_attention_reference",
    "sink_attention_reference_backward",
    "visibility_mask",
]


def visibility_mask(
    s: int, window: Optional[int] = None, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """Boolean ``[s, s]`` mask, ``True`` where key ``j`` (column) is visible to query ``i`` (row).

    Causal, and with a window ``W``: ``0 <= i - j <= W - 1`` (``W`` includes the current token;
    Megatron / FlashAttention ``window_size = (W - 1, 0)``).
    """
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    rel = i - j
    vis = rel >= 0
    if window is not None:
        vis = vis & (rel < window)
    return vis


def _probabilities(q, k, v, sink, slopes, window, scale, cd):
    """The masked softmax with the sink column, in ``cd``: ``(qf, kf, vf, probs, lse)`` with
    ``qf``, ``kf``, ``vf`` ``[b, H, s, d]`` (K/V expanded to the query heads), ``probs``
    ``[b, H, s, s]`` (the sink's share left out) and ``lse`` ``[b, H, s]``."""
    s, b, H, d = q.shape
    hpg = H // k.shape[2]
    qf = q.to(cd).permute(1, 2, 0, 3)  # [b, H, s, d]
    kf = k.to(cd).permute(1, 2, 0, 3).repeat_interleave(hpg, dim=1)  # [b, H, s, d]
    vf = v.to(cd).permute(1, 2, 0, 3).repeat_interleave(hpg, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [b, H, s, s]
    if slopes is not None:
        idx = torch.arange(s, device=q.device, dtype=cd)
        rel = idx[:, None] - idx[None, :]  # i - j
        scores = scores - slopes.to(cd).view(1, H, 1, 1) * rel
    vis = visibility_mask(s, window, device=q.device)
    scores = scores.masked_fill(~vis, float("-inf"))
    sink_col = sink.to(cd).view(1, H, 1, 1).expand(b, H, s, 1)
    lse = torch.logsumexp(torch.cat([scores, sink_col], dim=-1), dim=-1)  # [b, H, s]
    probs = torch.exp(scores - lse[..., None])
    return qf, kf, vf, probs, lse


def sink_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense reference of causal (+ window) (+ ALiBi) attention with a learnable sink.

    Args:
        q: ``[s, b, H, d]``.
        k, v: ``[s, b, G, d]``.
        sink: ``[H]`` (any float dtype; used in ``compute_dtype``).
        slopes: optional ``[H]`` ALiBi slopes.
        window: optional window length ``W >= 1`` (including the current token).
        softmax_scale: defaults to ``1 / sqrt(d)``.
        compute_dtype: float64 (exact reference, default) or float32 ("fp32 math" baseline).

    Returns:
        ``out`` ``[s, b, H, d]`` in ``q.dtype`` and ``lse`` ``[b, H, s]`` (natural log, includes the
        sink) in float32, or float64 when ``q`` is float64. Differentiable w.r.t. q, k, v, sink.
    """
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    _, _, vf, probs, lse = _probabilities(q, k, v, sink, slopes, window, scale, compute_dtype)
    out = torch.matmul(probs, vf).permute(2, 0, 1, 3)  # [s, b, H, d]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)


def sink_attention_reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    dlse: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense closed-form gradients ``(dq, dk, dv, dsink)`` (``docs/design.md#sink-attention``).

    ``dout`` ``[s, b, H, d]``; optional ``dlse`` ``[b, H, s]`` (gradient flowing into the LSE)::

        P_ij = exp(z_ij - L_i),  delta_i = sum_e dO_ie O_ie - dL_i,  dS_ij = P_ij (dO_i . v_j - delta_i)
        dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dO_i
        dsink_h = -sum_{b,i} exp(sink_h - L_{b,h,i}) delta_{b,h,i}

    ``dk``/``dv`` of group ``g`` sum over its ``H/G`` heads. Recomputes everything in
    ``compute_dtype`` (no autograd, so it also runs inside a custom op). Each gradient is returned
    in the dtype of its input.
    """
    s, b, H, d = q.shape
    G = k.shape[2]
    hpg = H // G
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    cd = compute_dtype
    qf, kf, vf, probs, lse = _probabilities(q, k, v, sink, slopes, window, scale, cd)
    dof = dout.to(cd).permute(1, 2, 0, 3)
    out = torch.matmul(probs, vf)
    delta = (dof * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = probs * (dp - delta[..., None])
    dq = scale * torch.matmul(ds, kf)
    dk = scale * torch.matmul(ds.transpose(-1, -2), qf)
    dv = torch.matmul(probs.transpose(-1, -2), dof)
    dk = dk.view(b, G, hpg, s, d).sum(2)
    dv = dv.view(b, G, hpg, s, d).sum(2)
    dsink = -(torch.exp(sink.to(cd).view(1, H, 1) - lse) * delta).sum(dim=(0, 2))
    return (
        dq.permute(2, 0, 1, 3).to(q.dtype),
        dk.permute(2, 0, 1, 3).to(k.dtype),
        dv.permute(2, 0, 1, 3).to(v.dtype),
        dsink.to(sink.dtype),
    )
