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
  attention; backward dq/dkv kernels -> prologue-backward kernel). On CPU this needs
  ``TRITON_INTERPRET=1``. ``attention_middle`` picks the window + sink kernels in between:
  ``"own"`` (:func:`.triton.swa_fwd`) or ``"shared"`` (the ``sink_attention`` kernels).
* ``"auto"``: ``"triton"`` for CUDA tensors the kernels support, ``"reference"`` otherwise (the
  rule of :func:`vpmoe_compile.kernels.resolve_backend`).

The model's modules take both choices from the kernel policy (``[kernels] attention``,
``[kernels] tpa_attention_middle``; :mod:`vpmoe_compile.kernels`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from vpmoe_compile.kernels import ATTENTION_BACKENDS, TPA_ATTENTION_MIDDLES, resolve_backend
from vpmoe_compile.ops.tpa_attention import reference as _ref
from vpmoe_compile.ops.tpa_attention.layout import factor_width

__all__ = ["tpa_window_attention"]


def _triton_supports(shapes, dtype=None, device=None) -> bool:
    from vpmoe_compile.ops.tpa_attention import triton as tk

    return tk.supports(shapes, dtype, device)


def _validate(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, window, eps):
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
    for name, t in (("qkv_bias", qkv_bias), ("gamma_q", gamma_q), ("gamma_k", gamma_k), ("cos", cos),
                    ("sin", sin), ("sink", sink)):
        if t is not None and t.device != factors.device:
            raise ValueError(f"{name} is on {t.device}, factors on {factors.device}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")


# ============================================================================ op bodies


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _attention_middle(choice: str):
    """The sliding-window sink attention kernels used on the materialised q/k/v.

    ``choice`` (the op's ``attention_middle`` argument, ``[kernels] tpa_attention_middle``):
    ``"shared"`` = the project's :mod:`vpmoe_compile.ops.sink_attention.triton` launchers
    (PackGQA, autotuned), ``"own"`` (default) = the per-head kernels of
    :mod:`vpmoe_compile.ops.tpa_attention.triton`: on the H100 at the vpMoE shape they measured
    faster (attention fwd + bwd 122 + 337 us vs 122 + 416 us; whole op fwd+bwd 1687 vs 2030 us,
    ``benchmarks/results/tpa_bench_h100_run2.json``). Both give an fp32-accurate
    ``delta = rowsum(dO*O)`` for 16-bit outputs: the own kernels recompute it as
    ``rowsum(P*dP)``, the shared ones keep the output's bf16 rounding residual ``o_lo`` (saved by
    the op as ``out_lo``).

    Returns:
        ``(fwd(q, k, v, sink, window, scale) -> (o, lse, o_lo or None),
        bwd(do, q, k, v, o, lse, sink, window, scale, o_lo) -> (dq, dk, dv, dsink fp32))``.
    """
    from vpmoe_compile.ops.tpa_attention import triton as tk

    if choice not in TPA_ATTENTION_MIDDLES:
        raise ValueError(f"attention_middle must be one of {TPA_ATTENTION_MIDDLES}, got {choice!r}")
    if choice == "shared":
        from vpmoe_compile.ops.sink_attention import triton as sa

        def fwd(q, k, v, sink, window, scale):
            return sa.sink_attention_fwd_triton(q, k, v, sink, None, window, scale, return_residual=True)

        def bwd(do, q, k, v, o, lse, sink, window, scale, o_lo):
            dq, dk, dv, dsink = sa.sink_attention_bwd_triton(do, q, k, v, sink, None, o, lse, window, scale,
                                                             out_lo=o_lo)
            return dq, dk, dv, dsink.float()

        return fwd, bwd

    def own_fwd(q, k, v, sink, window, scale):
        return (*tk.swa_fwd(q, k, v, sink, window, scale), None)

    def own_bwd(do, q, k, v, o, lse, sink, window, scale, o_lo):
        return tk.swa_bwd(do, q, k, v, o, lse, sink, window, scale)

    return own_fwd, own_bwd


def _fwd_triton(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, window, eps, scale, middle):
    from vpmoe_compile.ops.tpa_attention import triton as tk

    bias = qkv_bias.contiguous() if qkv_bias is not None else None
    cos32 = cos.float().contiguous()
    sin32 = sin.float().contiguous()
    gq = gamma_q.contiguous() if gamma_q is not None else None
    gk = gamma_k.contiguous() if gamma_k is not None else None
    q, k, v, rs_q, rs_k = tk.prologue_fwd(
        factors, bias, gq, gk, cos32, sin32, H=H, G=G, d=d, Rq=Rq, R=R, eps=eps, act_dtype=factors.dtype,
    )
    attn_fwd, _ = _attention_middle(middle)
    o, lse, o_lo = attn_fwd(q, k, v, sink.contiguous(), window, scale)
    s, b = factors.shape[:2]
    o_lo = o_lo.view(s, b, H * d) if o_lo is not None else _empty(lse)
    return o.view(s, b, H * d), lse, q, k, v, rs_q, rs_k, o_lo


def _bwd_triton(dout, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse, q, k, v, rs_q, rs_k, o_lo,
                H, G, d, Rq, R, window, scale, middle):
    from vpmoe_compile.ops.tpa_attention import triton as tk

    s, b = factors.shape[:2]
    do = dout.reshape(s, b, H, d).to(q.dtype).contiguous()
    o = out.view(s, b, H, d)
    _, attn_bwd = _attention_middle(middle)
    o_lo = o_lo.view(s, b, H, d) if o_lo.numel() else None
    dq, dk, dv, dsink = attn_bwd(do, q, k, v, o, lse, sink.contiguous(), window, scale, o_lo)
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
    return dF, dbias, dgq, dgk, dcos.to(cos.dtype), dsin.to(sin.dtype), dsink.to(sink.dtype)


def _ref_kwargs(H, G, d, Rq, R, window, eps, scale):
    return dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, window=window, eps=eps,
                softmax_scale=scale)


@torch.library.custom_op("vpmoe::tpa_window_attention_fwd", mutates_args=())
def _tpa_fwd_op(
    factors: Tensor, qkv_bias: Optional[Tensor], gamma_q: Optional[Tensor], gamma_k: Optional[Tensor],
    cos: Tensor, sin: Tensor, sink: Tensor,
    num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int, window: int,
    eps: float, softmax_scale: float, backend: str, attention_middle: str = "own",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward op. Returns ``(out [s,b,H*d], lse [b,H,s] fp32, q, k, v, rstd_q, rstd_k, out_lo)``.

    ``q, k, v, rstd_*`` and ``out_lo`` are saved activations for the Triton backward (empty for
    the reference backend, which recomputes). ``out_lo`` is the bf16 rounding residual of a 16-bit
    ``out`` when the shared attention middle serves the op (``attention_middle="shared"``) and its
    launcher keeps one (:func:`vpmoe_compile.ops.sink_attention.triton.residual_helps`), else empty:
    the own middle recomputes ``delta`` instead (:func:`vpmoe_compile.ops.tpa_attention.triton.swa_bwd`).
    """
    args = (num_heads, num_groups, head_dim, q_rank, kv_rank, window)
    if backend == "triton":
        return _fwd_triton(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, *args, eps, softmax_scale,
                           attention_middle)
    out, lse = _ref.tpa_reference(
        factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, return_lse=True,
        **_ref_kwargs(*args, eps, softmax_scale),
    )
    e = _empty(factors)
    return out.contiguous(), lse.float().contiguous(), e, e.clone(), e.clone(), e.clone(), e.clone(), e.clone()


@_tpa_fwd_op.register_fake
def _tpa_fwd_fake(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, num_heads, num_groups, head_dim,
                  q_rank, kv_rank, window, eps, softmax_scale, backend, attention_middle="own"):
    s, b, _ = factors.shape
    H, G, d = num_heads, num_groups, head_dim
    out = factors.new_empty(s, b, H * d)
    lse = factors.new_empty(b, H, s, dtype=torch.float32)
    if backend == "triton":
        q = factors.new_empty(s, b, H, d)
        k = factors.new_empty(s, b, G, d)
        v = factors.new_empty(s, b, G, d)
        rq = factors.new_empty((s, b, H) if gamma_q is not None else (0,), dtype=torch.float32)
        rk = factors.new_empty((s, b, G) if gamma_k is not None else (0,), dtype=torch.float32)
        has_lo = False
        if attention_middle == "shared":
            from vpmoe_compile.ops.sink_attention import triton as sa  # the launcher's own decision

            has_lo = sa.planned_residual_dtype(factors.dtype, s, window) is not None
        lo = factors.new_empty((s, b, H * d) if has_lo else (0,), dtype=torch.bfloat16 if has_lo else torch.float32)
        return out, lse, q, k, v, rq, rk, lo
    return out, lse, *(factors.new_empty(0) for _ in range(6))


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
    dout: Tensor, factors: Tensor, qkv_bias: Optional[Tensor], gamma_q: Optional[Tensor],
    gamma_k: Optional[Tensor], cos: Tensor, sin: Tensor, sink: Tensor,
    out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, rstd_q: Tensor, rstd_k: Tensor, out_lo: Tensor,
    num_heads: int, num_groups: int, head_dim: int, q_rank: int, kv_rank: int, window: int,
    eps: float, softmax_scale: float, backend: str, attention_middle: str = "own",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward op. Returns ``(dfactors, dqkv_bias, dgamma_q, dgamma_k, dcos, dsin, dsink)``;
    the gradient of an absent optional input is an empty tensor."""
    args = (num_heads, num_groups, head_dim, q_rank, kv_rank, window)
    if backend == "triton":
        return _bwd_triton(dout, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse, q, k, v,
                           rstd_q, rstd_k, out_lo, *args, softmax_scale, attention_middle)
    inputs = [factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink]
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        o = _ref.tpa_reference(*leaves, **_ref_kwargs(*args, eps, softmax_scale))
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(o, present, dout.to(o.dtype))
    it = iter(grads)
    res = []
    for t in leaves:
        res.append(next(it).contiguous() if t is not None else _empty(factors))
    return tuple(res)


@_tpa_bwd_op.register_fake
def _tpa_bwd_fake(dout, factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse, q, k, v, rstd_q, rstd_k,
                  out_lo, num_heads, num_groups, head_dim, q_rank, kv_rank, window, eps, softmax_scale, backend,
                  attention_middle="own"):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else factors.new_empty(0)

    return (like(factors), like(qkv_bias), like(gamma_q), like(gamma_k), like(cos), like(sin), like(sink))


_CONST_NAMES = ("num_heads", "num_groups", "head_dim", "q_rank", "kv_rank", "window", "eps", "softmax_scale",
                "backend", "attention_middle")


def _setup_context(ctx, inputs, output):
    factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink = inputs[:7]
    consts = inputs[7:]
    out, lse, q, k, v, rq, rk, lo = output
    # lse and the saved activations are internal outputs: no zero-filled gradients for them
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, q, k, v, rq, rk, lo)
    ctx.consts = consts
    ctx.present = [t is not None for t in (qkv_bias, gamma_q, gamma_k)]
    ctx.save_for_backward(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse, q, k, v, rq, rk, lo)


def _backward(ctx, dout, *_aux_grads):
    if dout is None:  # the output's gradient is undefined: nothing flows back
        return (None,) * (7 + len(_CONST_NAMES))
    factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse, q, k, v, rq, rk, lo = ctx.saved_tensors
    grads = _tpa_bwd_op(dout.contiguous(), factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, out, lse,
                        q, k, v, rq, rk, lo, *ctx.consts)
    dF, dbias, dgq, dgk, dcos, dsin, dsink = grads
    has_b, has_gq, has_gk = ctx.present
    return (dF, dbias if has_b else None, dgq if has_gq else None, dgk if has_gk else None, dcos, dsin, dsink,
            *([None] * len(_CONST_NAMES)))


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
    attention_middle: str = "own",
    v1: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
) -> Tensor:
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
        attention_middle: ``"own"`` or ``"shared"``: the window + sink kernels of the Triton
            path (see :func:`_attention_middle`); ignored by the reference.
        v1: reserved for the fork's value residual (``v = lam*v + (1-lam)*v1``, ``[s, b, G, d]``);
            not implemented yet, must be None.
        lam: reserved (scalar mixing weight of the value residual); must be None.

    Returns:
        ``out [s, b, H*d]`` in ``factors.dtype``.
    """
    if v1 is not None or lam is not None:
        raise NotImplementedError("value residual (v1, lam) is not implemented in tpa_window_attention yet")
    H, G, d, Rq, R = num_heads, num_groups, head_dim, q_rank, kv_rank
    _validate(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, window, eps)
    if attention_middle not in TPA_ATTENTION_MIDDLES:
        raise ValueError(f"attention_middle must be one of {TPA_ATTENTION_MIDDLES}, got {attention_middle!r}")
    shapes = {"head_dim": d, "q_rank": Rq, "kv_rank": R}
    be = resolve_backend(backend, allowed=ATTENTION_BACKENDS, supports=_triton_supports, shapes=shapes,
                         dtype=factors.dtype, device=factors.device, what="tpa_window_attention")
    if be == "triton":
        from vpmoe_compile.ops.tpa_attention import triton as tk

        tk.check_supported(shapes, factors.dtype, factors.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = _tpa_fwd_op(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, H, G, d, Rq, R, int(window),
                      float(eps), scale, be, attention_middle)[0]
    return out
