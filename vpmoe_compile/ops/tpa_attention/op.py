"""Fused TPA local-attention op: packed factors -> attention output.

Public entry point: :func:`tpa_window_attention`. It computes, in the reference fork's
order of operations (``docs/design.md#tpa-attention``): per-token factor contraction, exact
``/R``, QKV bias (Megatron interleaved layout), QK RMSNorm with gains, GRAPE-M rotation from
fp32 cos/sin tables, and sliding-window attention with a learnable per-head sink and GQA.

Registered with ``torch.library`` as ``vpmoe::tpa_window_attention_fwd`` /
``vpmoe::tpa_window_attention_bwd`` (custom ops with a fake implementation and registered
autograd), so ``torch.compile(fullgraph=True)`` treats the op as one opaque node.

Backends:
* ``"reference"``: plain PyTorch (:mod:`.reference`); backward through autograd of the
  reference (recompute).
* ``"triton"``: the kernels of :mod:`.triton` (prologue kernel -> sliding-window sink flash
  attention, :func:`.triton.swa_fwd`; backward dq/dkv kernels -> prologue-backward kernel). On
  CPU this needs ``TRITON_INTERPRET=1``. The attention in between is the library's one
  sliding-window kernel family (also the Triton path of
  :func:`vpmoe_compile.ops.sink_attention.window_sink_attention`); the former choice of the
  sink-attention kernels there (``attention_middle="shared"``, ``[kernels]
  tpa_attention_middle``) was removed after the measured H100 comparison
  (``benchmarks/results/window_kernels.json``: the own kernels were faster inside the op).
* ``"auto"``: ``"triton"`` for CUDA tensors the kernels support, ``"reference"`` otherwise (the
  rule of :func:`vpmoe_compile.kernels.resolve_backend`).

The model's modules take the backend from the kernel policy (``[kernels] attention``;
:mod:`vpmoe_compile.kernels`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from vpmoe_compile.kernels import ATTENTION_BACKENDS, resolve_backend
from vpmoe_compile.ops.tpa_attention import reference as _ref
from vpmoe_compile.ops.tpa_attention.layout import factor_width
from vpmoe_compile.ops.value_mix import mix_values

__all__ = ["tpa_window_attention"]


def _triton_supports(shapes, dtype=None, device=None) -> bool:
    from vpmoe_compile.ops.tpa_attention import triton as tk

    return tk.supports(shapes, dtype, device)


def _validate(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, window, eps, v1=None, lam=None):
    if factors.dim() != 3:
        raise ValueError(f"factors must be [s, b, F], got shape {tuple(factors.shape)}")
    if not factors.is_floating_point():
        raise TypeError(f"factors must be a floating tensor, got {factors.dtype}")
    for name, val in (("num_heads", H), ("num_groups", G), ("head_dim", d), ("q_rank", Rq), ("kv_rank", R)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if H % G:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_groups ({G})")
    if d % 2:
        raise ValueError(f"head_dim must be even (rotation planes (p, p+d/2)), got {d}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (keys with 0 <= i-j <= W-1 are visible), got {window!r}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    s, b, Fw = factors.shape
    expect = factor_width(H, G, d, Rq, R)
    if Fw != expect:
        raise ValueError(
            f"factors last dim {Fw} != H*Rq + 2*G*R + (Rq + 2R)*d = {expect} "
            f"(H={H}, G={G}, d={d}, Rq={Rq}, R={R})"
        )
    hpg = H // G
    if qkv_bias is not None:
        if qkv_bias.shape != (G * (hpg + 2) * d,):
            raise ValueError(f"qkv_bias must be [G*(H/G+2)*d] = [{G * (hpg + 2) * d}], got {tuple(qkv_bias.shape)}")
    for name, gm in (("gamma_q", gamma_q), ("gamma_k", gamma_k)):
        if gm is not None and gm.shape != (d,):
            raise ValueError(f"{name} must be [head_dim] = [{d}], got {tuple(gm.shape)}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.shape != (s, d // 2):
            raise ValueError(f"{name} must be [s, d/2] = [{s}, {d // 2}], got {tuple(tab.shape)}")
        if tab.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be an fp32 (or fp64) table, got {tab.dtype}")
    if sink.shape != (H,):
        raise ValueError(f"sink must be [num_heads] = [{H}], got {tuple(sink.shape)}")
    if (v1 is None) != (lam is None):
        raise ValueError("the value residual needs both v1 and lam (or neither)")
    if v1 is not None:
        if v1.shape != (s, b, G, d):
            raise ValueError(f"v1 must be [s, b, G, d] = [{s}, {b}, {G}, {d}], got {tuple(v1.shape)}")
        if lam.dim() != 0:
            raise ValueError(f"lam must be a 0-d tensor, got shape {tuple(lam.shape)}")
    for name, t in (("qkv_bias", qkv_bias), ("gamma_q", gamma_q), ("gamma_k", gamma_k), ("cos", cos),
                    ("sin", sin), ("sink", sink), ("v1", v1), ("lam", lam)):
        if t is not None and t.device != factors.device:
            raise ValueError(f"{name} is on {t.device}, factors on {factors.device}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")


# ============================================================================ op bodies


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _fwd_triton(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, H, G, d, Rq, R, window, eps, scale,
                return_v):
    from vpmoe_compile.ops.tpa_attention import triton as tk

    bias = qkv_bias.contiguous() if qkv_bias is not None else None
    cos32 = cos.float().contiguous()
    sin32 = sin.float().contiguous()
    gq = gamma_q.contiguous() if gamma_q is not None else None
    gk = gamma_k.contiguous() if gamma_k is not None else None
    q, k, v, rs_q, rs_k = tk.prologue_fwd(
        factors, bias, gq, gk, cos32, sin32, H=H, G=G, d=d, Rq=Rq, R=R, eps=eps, act_dtype=factors.dtype,
    )
    if v1 is not None:  # the attention reads the mix; this layer's own v is kept (dlam, return_v)
        v_own, v = v, mix_values(v, v1, lam)
    else:
        v_own = v.clone() if return_v else _empty(factors)
    o, lse = tk.swa_fwd(q, k, v, sink.contiguous(), window, scale)
    s, b = factors.shape[:2]
    return o.view(s, b, H * d), lse, q, k, v, rs_q, rs_k, v_own


def _bwd_triton(dout, dv_own, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse, q, k, v,
                rs_q, rs_k, v_own, H, G, d, Rq, R, window, scale):
    from vpmoe_compile.ops.tpa_attention import triton as tk

    s, b = factors.shape[:2]
    do = dout.reshape(s, b, H, d).to(q.dtype).contiguous()
    o = out.view(s, b, H, d)
    dq, dk, dv, dsink = tk.swa_bwd(do, q, k, v, o, lse, sink.contiguous(), window, scale)
    dv1, dlam = _empty(factors), _empty(factors)
    if v1 is not None:  # through the mix: d(own v) = lam dv, dv1 = (1 - lam) dv, dlam = <dv, v_own - v1>
        dvf, lamf = dv.float(), lam.float()
        dlam = (dvf * (v_own.float() - v1.float())).sum().to(lam.dtype)
        dv1 = ((1.0 - lamf) * dvf).to(v1.dtype)
        dv = (lamf * dvf).to(dv.dtype)
    if dv_own is not None and dv_own.numel():
        dv = (dv.float() + dv_own.float()).to(dv.dtype)
    bias = qkv_bias.contiguous() if qkv_bias is not None else None
    gq = gamma_q.contiguous() if gamma_q is not None else None
    gk = gamma_k.contiguous() if gamma_k is not None else None
    dF, dbias, dgq, dgk, dcos, dsin = tk.prologue_bwd(
        dq, dk, dv, factors, bias, gq, gk, rs_q, rs_k,
        cos.float().contiguous(), sin.float().contiguous(), H=H, G=G, d=d, Rq=Rq, R=R,
    )
    dbias = dbias.to(qkv_bias.dtype) if qkv_bias is not None else _empty(factors)
    dgq = dgq.to(gamma_q.dtype) if gamma_q is not None else _empty(factors)
    dgk = dgk.to(gamma_k.dtype) if gamma_k is not None else _empty(factors)
    return dF, dbias, dgq, dgk, dcos.to(cos.dtype), dsin.to(sin.dtype), dsink.to(sink.dtype), dv1, dlam


def _ref_kwargs(H, G, d, Rq, R, window, eps, scale):
    return dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, window=window, eps=eps,
                softmax_scale=scale)


@torch.library.custom_op("vpmoe::tpa_window_attention_fwd", mutates_args=())
def _tpa_fwd_op(
    factors: Tensor, qkv_bias: Optional[Tensor], gamma_q: Optional[Tensor], gamma_k: Optional[Tensor],
    cos: Tensor, sin: Tensor, sink: Tensor, v1: Optional[Tensor], lam: Optional[Tensor],
    num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int, window: int,
    eps: float, softmax_scale: float, backend: str, return_v: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward op. Returns ``(out [s,b,H*d], lse [b,H,s] fp32, q, k, v, rstd_q, rstd_k, v_own)``.

    ``q, k, v, rstd_*`` are saved activations for the Triton backward (empty for the reference
    backend, which recomputes; ``v`` is what the attention read: the value-residual mix when
    ``v1`` is given). For a 16-bit ``out`` the backward takes an exact ``delta = rowsum(P * dP)``
    where it matters (:func:`vpmoe_compile.ops.tpa_attention.triton.swa_bwd`), so no rounding
    residual of ``out`` is saved. ``v_own [s,b,G,d]`` is this layer's own (unmixed) values, a
    differentiable output (the first layer's feed the value residual of the later ones), when
    ``return_v`` or ``v1`` is given; else empty.
    """
    args = (num_heads, num_groups, head_dim, q_rank, kv_rank, window)
    if backend == "triton":
        return _fwd_triton(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, *args, eps, softmax_scale,
                           return_v)
    out, lse, v_own = _ref.tpa_reference(
        factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, return_lse=True, v1=v1, lam=lam, return_v=True,
        **_ref_kwargs(*args, eps, softmax_scale),
    )
    e = _empty(factors)
    v_own = v_own.contiguous() if (return_v or v1 is not None) else e.clone()
    return out.contiguous(), lse.float().contiguous(), e, e.clone(), e.clone(), e.clone(), e.clone(), v_own


@_tpa_fwd_op.register_fake
def _tpa_fwd_fake(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, num_heads, num_groups, head_dim,
                  q_rank, kv_rank, window, eps, softmax_scale, backend, return_v):
    s, b, _ = factors.shape
    H, G, d = num_heads, num_groups, head_dim
    out = factors.new_empty(s, b, H * d)
    lse = factors.new_empty(b, H, s, dtype=torch.float32)
    v_own = factors.new_empty(s, b, G, d) if (return_v or v1 is not None) else factors.new_empty(0)
    if backend == "triton":
        q = factors.new_empty(s, b, H, d)
        k = factors.new_empty(s, b, G, d)
        v = factors.new_empty(s, b, G, d)
        rq = factors.new_empty((s, b, H) if gamma_q is not None else (0,), dtype=torch.float32)
        rk = factors.new_empty((s, b, G) if gamma_k is not None else (0,), dtype=torch.float32)
        return out, lse, q, k, v, rq, rk, v_own
    return out, lse, *(factors.new_empty(0) for _ in range(5)), v_own


def _autograd_inside_op():
    """Re-enable the autograd dispatch keys that a custom op's body runs without.

    The reference backward recomputes the reference forward with autograd (the op body is
    opaque to the outer graph, so this is invisible to torch.compile).
    """
    K = torch._C.DispatchKey
    exc = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradCPU, K.AutogradCUDA, K.AutogradOther, K.AutogradNestedTensor, K.ADInplaceOrView):
        exc = exc - torch._C.DispatchKeySet(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exc)


@torch.library.custom_op("vpmoe::tpa_window_attention_bwd", mutates_args=())
def _tpa_bwd_op(
    dout: Tensor, dv_own: Optional[Tensor], factors: Tensor, qkv_bias: Optional[Tensor], gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor], cos: Tensor, sin: Tensor, sink: Tensor, v1: Optional[Tensor], lam: Optional[Tensor],
    out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, rstd_q: Tensor, rstd_k: Tensor, v_own: Tensor,
    num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int, window: int,
    eps: float, softmax_scale: float, backend: str, return_v: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward op. Returns ``(dfactors, dqkv_bias, dgamma_q, dgamma_k, dcos, dsin, dsink, dv1,
    dlam)``; the gradient of an absent optional input is an empty tensor. ``dv_own``: the
    gradient of the ``v_own`` output (None when it has none)."""
    args = (num_heads, num_groups, head_dim, q_rank, kv_rank, window)
    if backend == "triton":
        return _bwd_triton(dout, dv_own, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse,
                           q, k, v, rstd_q, rstd_k, v_own, *args, softmax_scale)
    inputs = [factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam]
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        o, v_ref = _ref.tpa_reference(*leaves[:7], v1=leaves[7], lam=leaves[8], return_v=True,
                                      **_ref_kwargs(*args, eps, softmax_scale))
        present = [t for t in leaves if t is not None]
        outs, douts = [o], [dout.to(o.dtype)]
        if dv_own is not None and dv_own.numel():
            outs.append(v_ref)
            douts.append(dv_own.to(v_ref.dtype))
        grads = torch.autograd.grad(outs, present, douts, allow_unused=True)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(_empty(factors))
            continue
        g = next(it)
        res.append(g.contiguous() if g is not None else torch.zeros_like(t))
    return tuple(res)


@_tpa_bwd_op.register_fake
def _tpa_bwd_fake(dout, dv_own, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse, q, k, v,
                  rstd_q, rstd_k, v_own, num_heads, num_groups, head_dim, q_rank, kv_rank, window, eps,
                  softmax_scale, backend, return_v):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else factors.new_empty(0)

    return (like(factors), like(qkv_bias), like(gamma_q), like(gamma_k), like(cos), like(sin), like(sink),
            like(v1), like(lam))


_CONST_NAMES = ("num_heads", "num_groups", "head_dim", "q_rank", "kv_rank", "window", "eps", "softmax_scale",
                "backend", "return_v")
_N_TENSOR_INPUTS = 9  # factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam


def _setup_context(ctx, inputs, output):
    factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam = inputs[:_N_TENSOR_INPUTS]
    consts = inputs[_N_TENSOR_INPUTS:]
    out, lse, q, k, v, rq, rk, v_own = output
    # lse and the saved activations are internal outputs: no zero-filled gradients for them
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, q, k, v, rq, rk)
    ctx.consts = consts
    ctx.present = [t is not None for t in (qkv_bias, gamma_q, gamma_k, v1, lam)]
    ctx.save_for_backward(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse, q, k, v, rq, rk,
                          v_own)


def _backward(ctx, dout, _dlse, _dq, _dk, _dv, _drq, _drk, dv_own):
    if dout is None and dv_own is None:  # no output has a gradient: nothing flows back
        return (None,) * (_N_TENSOR_INPUTS + len(_CONST_NAMES))
    factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse, q, k, v, rq, rk, v_own = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = _tpa_bwd_op(dout.contiguous(), None if dv_own is None else dv_own.contiguous(), factors, qkv_bias,
                        gamma_q, gamma_k, cos, sin, sink, v1, lam, out, lse, q, k, v, rq, rk, v_own, *ctx.consts)
    dF, dbias, dgq, dgk, dcos, dsin, dsink, dv1, dlam = grads
    has_b, has_gq, has_gk, has_v1, has_lam = ctx.present
    return (dF, dbias if has_b else None, dgq if has_gq else None, dgk if has_gk else None, dcos, dsin, dsink,
            dv1 if has_v1 else None, dlam if has_lam else None, *([None] * len(_CONST_NAMES)))


torch.library.register_autograd("vpmoe::tpa_window_attention_fwd", _backward, setup_context=_setup_context)


# ============================================================================ public API


def tpa_window_attention(
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
    backend: str = "auto",
    v1: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
    return_v: bool = False,
):
    """TPA + QK-norm + GRAPE-M + sliding-window sink attention from packed factors.

    Computes, per token ``t`` and head ``h`` (group ``g = h // (H/G)``)::

        q_h = RMSNorm_q((1/Rq) sum_r A_q[h,r] B_q[r] + c_q[h]) ; k_g likewise with R ; v_g no norm
        q, k <- rotation by theta[t] on planes (p, p + d/2)
        O = SWA_sink(q, k, v; W, scale, sink)

    Args:
        factors: ``[s, b, F]`` output of the packed factor GEMM,
            ``F = H*Rq + 2*G*R + (Rq + 2*R)*d``, column order ``A_q | A_k | A_v | B_q | B_k | B_v``
            (may be a non-contiguous view).
        qkv_bias: ``[G*(H/G+2)*d]`` in Megatron's interleaved mixed-QKV layout, or None.
        gamma_q: ``[d]`` query RMSNorm gain, or None (no query norm).
        gamma_k: ``[d]`` key RMSNorm gain, or None (no key norm).
        cos: ``[s, d/2]`` fp32 ``cos(theta[t, p])`` (gradient returned).
        sin: ``[s, d/2]`` fp32 ``sin(theta[t, p])`` (gradient returned).
        sink: ``[H]`` unscaled sink logit per query head.
        num_heads, num_groups, head_dim, q_rank, kv_rank: ``H, G, d, Rq, R``.
        window: ``W >= 1``; key ``j`` visible to query ``i`` iff ``0 <= i - j <= W - 1``.
        eps: RMSNorm epsilon.
        softmax_scale: defaults to ``1/sqrt(d)``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        v1: the value residual's first-layer values ``[s, b, G, d]`` (the reference fork's
            ``value_residual``): the attention reads ``lam * v + (1 - lam) * v1`` (computed in
            fp32, rounded once), with gradients to ``v1`` and ``lam``.
        lam: 0-d mixing weight (``sigmoid`` of the layer's logit), with ``v1``.
        return_v: also return this layer's own values ``v [s, b, G, d]`` (contraction + bias,
            unmixed; differentiable), what the first layer hands to the later ones.

    Returns:
        ``out [s, b, H*d]`` in ``factors.dtype``; ``(out, v)`` with ``return_v``.
    """
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    _validate(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, window, eps, v1, lam)
    shapes = {"head_dim": d, "q_rank": Rq, "kv_rank": R}
    be = resolve_backend(backend, allowed=ATTENTION_BACKENDS, supports=_triton_supports, shapes=shapes,
                         dtype=factors.dtype, device=factors.device, what="tpa_window_attention")
    if be == "triton":
        from vpmoe_compile.ops.tpa_attention import triton as tk

        tk.check_supported(shapes, factors.dtype, factors.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    res = _tpa_fwd_op(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, v1, lam, H, G, d, Rq, R, int(window),
                      float(eps), scale, be, bool(return_v))
    return (res[0], res[7]) if return_v else res[0]
