"""Public API: causal attention with a learnable sink, optional ALiBi and optional sliding window.

Two entry points for the vpMoE layers, plus the generic one they share:

* :func:`alibi_sink_attention` — global layers: full causal + ALiBi (GRAPE-A) + sink.
* :func:`window_sink_attention` — local layers: sliding window ``W`` (``window_size=(W-1, 0)``) + sink.
* :func:`sink_attention` — both switches; :func:`sink_attention_with_lse` also returns the LSE.

Shapes (Megatron, sequence first; arbitrary strides accepted):
``q [s, b, H, d]``, ``k, v [s, b, G, d]`` (``H % G == 0``, head ``h`` reads group ``h // (H/G)``),
``sink [H]`` (the ``softmax_offset`` parameter, may be bf16; math in fp32, gradient returned in its
dtype), ``slopes [H]`` fp32 (fixed, no gradient). Output ``[s, b, H, d]`` in ``q.dtype``.
No dropout (vpMoE uses ``attention_dropout = 0``; there is deliberately no argument for it).

The ops are registered with ``torch.library.custom_op`` (forward ``vpmoe::sink_attention_fwd``
returning ``(out, lse, out_lo)`` and backward ``vpmoe::sink_attention_bwd``) with fake implementations and
registered autograd, so ``torch.compile(fullgraph=True)`` sees them without graph breaks and
gradients reach ``q``, ``k``, ``v`` and ``sink`` (and also flow through the LSE when used).
In eager mode the same implementations run through a plain ``torch.autograd.Function`` (lower
host overhead); under ``torch.compile``, ``make_fx``/export, fake tensors or any dispatch/function
mode the custom op is used (one opaque node for every tracer).
Both are exercised by the tests. The ops can also be called directly:
``torch.ops.vpmoe.sink_attention_fwd(q, k, v, sink, slopes, window_or_0, scale, backend)``.
``out_lo`` is the bf16 rounding residual of a 16-bit ``out`` (an empty tensor for fp32 outputs,
the window flavour and the reference backend); the backward uses it for an fp32-accurate
``delta = rowsum(dO * O)`` (see :func:`vpmoe_compile.ops.sink_attention.triton.sink_attention_fwd_triton`).

Backends: ``"reference"`` (dense PyTorch, float64 math; small shapes only; :mod:`.reference`),
``"triton"`` (on CPU this needs ``TRITON_INTERPRET=1`` set before import), ``"auto"`` (triton on
CUDA tensors the kernels support, reference elsewhere: the rule of
:func:`vpmoe_compile.kernels.resolve_backend`). Math: ``docs/design.md#sink-attention``.

The Triton backend runs two kernel families, by flavour:

* full causal (no window; optional ALiBi): the kernels of :mod:`.triton` (PackGQA, autotuned);
* sliding window (``window=W``): the library's one sliding-window family,
  :func:`vpmoe_compile.ops.tpa_attention.triton.swa_fwd` / ``swa_bwd`` (the fused TPA op's
  attention middle; chosen over the former window path of :mod:`.triton` on a measured H100
  comparison, ``benchmarks/results/window_kernels.json``). Same arguments and results: ``o`` and
  the sink-inclusive fp32 ``lse`` forward; ``dq, dk, dv`` and an fp32 ``dsink`` (returned in the
  sink's dtype) backward, with a gradient into the LSE (``dlse``); fp32 / bf16 / fp16, any
  strides (copied contiguous), ``sink = -inf`` allowed. For a 16-bit output where rows see few
  keys its backward recomputes ``delta = rowsum(P * dP)`` instead of keeping ``out_lo``. ALiBi
  together with a window has no Triton kernel (the model never combines them): ``backend="triton"`` refuses it,
  ``"auto"`` takes the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from vpmoe_compile.kernels import ATTENTION_BACKENDS, resolve_backend

from .reference import sink_attention_reference, sink_attention_reference_backward

__all__ = [
    "alibi_sink_attention",
    "window_sink_attention",
    "sink_attention",
    "sink_attention_with_lse",
    "sink_attention_forward",
    "sink_attention_backward",
]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _triton_supports(shapes, dtype=None, device=None) -> bool:
    from . import triton as _tk  # imported on first use (it records TRITON_INTERPRET at import)

    return _tk.supports(shapes, dtype, device)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    slopes: Optional[torch.Tensor],
    window: Optional[int],
    softmax_scale: Optional[float],
    backend: str,
) -> Tuple[str, float]:
    for name, t in (("q", q), ("k", k), ("v", v), ("sink", sink)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sink attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "sink attention: expected q [s, b, H, d] and k, v [s, b, G, d]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    s, b, H, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"sink attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k.shape[0] != s or k.shape[1] != b or k.shape[3] != d:
        raise ValueError(
            f"sink attention: k/v {tuple(k.shape)} must be [s={s}, b={b}, G, d={d}] to match q "
            f"{tuple(q.shape)}"
        )
    G = k.shape[2]
    if s < 1 or b < 1 or H < 1 or G < 1 or d < 1:
        raise ValueError(f"sink attention: empty dimension in q {tuple(q.shape)} / k {tuple(k.shape)}")
    if H % G != 0:
        raise ValueError(f"sink attention: query heads H={H} must be a multiple of KV groups G={G}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sink attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"sink attention: q/k/v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device == sink.device):
        raise ValueError(
            f"sink attention: tensors on different devices: q {q.device}, k {k.device}, "
            f"v {v.device}, sink {sink.device}"
        )
    if sink.shape != (H,):
        raise ValueError(f"sink attention: sink must have shape [H]=[{H}], got {tuple(sink.shape)}")
    if not sink.dtype.is_floating_point:
        raise TypeError(f"sink attention: sink must be floating point, got {sink.dtype}")
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor) or slopes.shape != (H,):
            raise ValueError(
                f"sink attention: slopes must be a tensor of shape [H]=[{H}], got "
                f"{tuple(slopes.shape) if isinstance(slopes, torch.Tensor) else type(slopes)}"
            )
        if slopes.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"sink attention: slopes must be fp32 (ALiBi math is fp32), got {slopes.dtype}")
        if slopes.device != q.device:
            raise ValueError(f"sink attention: slopes on {slopes.device}, q on {q.device}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"sink attention: window must be an int (W, incl. current token), got {window!r}")
        if window < 1:
            raise ValueError(f"sink attention: window must be >= 1, got {window}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0.0:
            raise ValueError(f"sink attention: softmax_scale must be finite and > 0, got {softmax_scale}")
    shapes = {"head_dim": d}
    if slopes is not None and window is not None:
        shapes["alibi_with_window"] = True  # no Triton kernel: "auto" takes the reference
    be = resolve_backend(backend, allowed=ATTENTION_BACKENDS, supports=_triton_supports,
                         shapes=shapes, dtype=q.dtype, device=q.device, what="sink attention")
    if be == "triton":
        from . import triton as _tk

        _tk.check_supported(shapes, q.dtype, q.device)
        if slopes is not None and slopes.dtype != torch.float32:
            raise TypeError("sink attention (triton): slopes must be fp32")
    return be, scale


# ---------------------------------------------------------------------------------------------
# Raw forward / backward (no autograd); consume / produce the sink-inclusive LSE
# ---------------------------------------------------------------------------------------------


def _fwd_impl(q, k, v, sink, slopes, window, scale, backend):
    """``(out, lse, out_lo)``; ``out_lo`` is ``None`` where no residual is needed."""
    if backend == "reference":
        out, lse = sink_attention_reference(
            q, k, v, sink, slopes=slopes, window=window, softmax_scale=scale
        )
        return out, lse, None
    if window is not None:  # the one sliding-window family (no ALiBi: refused in _validate)
        from vpmoe_compile.ops.tpa_attention.triton import swa_fwd

        out, lse = swa_fwd(q, k, v, sink, window, scale)
        return out, lse, None
    from .triton import sink_attention_fwd_triton

    return sink_attention_fwd_triton(q, k, v, sink, slopes, scale, return_residual=True)


def _bwd_impl(dout, q, k, v, sink, slopes, out, lse, dlse, window, scale, backend, out_lo=None):
    if backend == "reference":
        return sink_attention_reference_backward(
            dout, q, k, v, sink, slopes=slopes, window=window, softmax_scale=scale, dlse=dlse
        )
    if window is not None:
        from vpmoe_compile.ops.tpa_attention.triton import swa_bwd

        dq, dk, dv, dsink = swa_bwd(dout, q, k, v, out, lse, sink, window, scale, dlse=dlse)
        return dq, dk, dv, dsink.to(sink.dtype)
    from .triton import sink_attention_bwd_triton

    return sink_attention_bwd_triton(dout, q, k, v, sink, slopes, out, lse, scale,
                                     dlse=dlse, out_lo=out_lo)


def sink_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw forward (no autograd graph): ``out [s, b, H, d]``, ``lse [b, H, s]`` fp32 (sink-inclusive).

    For the most accurate 16-bit backward use the autograd path (:func:`sink_attention_with_lse`),
    which also keeps the output's rounding residual; :func:`sink_attention_backward` then rounds
    ``delta = rowsum(dO * O)`` through the 16-bit ``out``."""
    be, scale = _validate(q, k, v, sink, slopes, window, softmax_scale, backend)
    with torch.no_grad():
        return _fwd_impl(q, k, v, sink, slopes, window, scale, be)[:2]


def sink_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    dlse: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw backward: ``(dq [s,b,H,d], dk [s,b,G,d], dv [s,b,G,d], dsink [H])`` from ``dout``
    ``[s, b, H, d]``, the forward's ``out`` and sink-inclusive ``lse [b, H, s]``; optional ``dlse``."""
    be, scale = _validate(q, k, v, sink, slopes, window, softmax_scale, backend)
    if dout.shape != q.shape:
        raise ValueError(f"sink attention: dout {tuple(dout.shape)} must match q {tuple(q.shape)}")
    with torch.no_grad():
        return _bwd_impl(dout, q, k, v, sink, slopes, out, lse, dlse, window, scale, be)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("vpmoe::sink_attention_fwd", mutates_args=())
def _sink_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    slopes: Optional[torch.Tensor],
    window: int,
    softmax_scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    win = window if window > 0 else None
    out, lse, out_lo = _fwd_impl(q, k, v, sink, slopes, win, softmax_scale, backend)
    out_lo = q.new_empty((0,)) if out_lo is None else out_lo.contiguous()
    return out.contiguous(), lse.contiguous(), out_lo


def _residual_dtype(q: torch.Tensor, window: int, backend: str) -> Optional[torch.dtype]:
    """dtype of the forward's ``out_lo`` (``None``: an empty tensor), the full-causal Triton
    launcher's own decision (:func:`~vpmoe_compile.ops.sink_attention.triton.planned_residual_dtype`);
    the reference and the sliding-window kernels keep none."""
    if backend == "reference" or window > 0:
        return None
    from .triton import planned_residual_dtype

    return planned_residual_dtype(q.dtype, q.shape[0])


@_sink_attention_fwd_op.register_fake
def _(q, k, v, sink, slopes, window, softmax_scale, backend):
    s, b, H, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    res_dtype = _residual_dtype(q, window, backend)
    out_lo = q.new_empty((0,)) if res_dtype is None else q.new_empty((s, b, H, d), dtype=res_dtype)
    return q.new_empty((s, b, H, d)), q.new_empty((b, H, s), dtype=lse_dtype), out_lo


@torch.library.custom_op("vpmoe::sink_attention_bwd", mutates_args=())
def _sink_attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    slopes: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    window: int,
    softmax_scale: float,
    backend: str,
    out_lo: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    win = window if window > 0 else None
    lo = out_lo if out_lo is not None and out_lo.numel() > 0 else None
    dq, dk, dv, dsink = _bwd_impl(dout, q, k, v, sink, slopes, out, lse, dlse, win, softmax_scale,
                                  backend, lo)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsink.contiguous()


@_sink_attention_bwd_op.register_fake
def _(dout, q, k, v, sink, slopes, out, lse, dlse, window, softmax_scale, backend, out_lo=None):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        sink.new_empty(sink.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, sink, slopes, window, softmax_scale, backend = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, sink, slopes, out, lse, out_lo)
    ctx.window = window
    ctx.softmax_scale = softmax_scale
    ctx.backend = backend


def _grads(bwd, ctx, dout, dlse):
    """Shared by the custom op's autograd and the eager autograd.Function."""
    q, k, v, sink, slopes, out, lse, out_lo = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsink = bwd(dout, q, k, v, sink, slopes, out, lse, dlse, ctx.window,
                            ctx.softmax_scale, ctx.backend, out_lo)
    return dq, dk, dv, dsink, None, None, None, None


def _backward(ctx, dout, dlse, dout_lo=None):
    return _grads(_sink_attention_bwd_op, ctx, dout, dlse)


_sink_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _plain_eager(q: torch.Tensor) -> bool:
    """True for ordinary eager execution: no torch.compile / export, no fake or subclass tensors, no
    active dispatch or function modes (make_fx, FakeTensorMode, ...). Anything else takes the
    registered custom op, which every tracer sees as one opaque node."""
    return (
        not torch.compiler.is_compiling()
        and type(q) is torch.Tensor
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


class _SinkAttentionFunction(torch.autograd.Function):
    """Eager fast path: same forward/backward implementations as the custom op, without the
    ``torch.library`` dispatch overhead (about 2x less host time per fwd+bwd, which matters when
    the kernels are short, e.g. the W=128 window). ``torch.compile`` always takes the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, sink, slopes, window, softmax_scale, backend):
        win = window if window > 0 else None
        out, lse, out_lo = _fwd_impl(q, k, v, sink, slopes, win, softmax_scale, backend)
        ctx.save_for_backward(q, k, v, sink, slopes, out, lse, out_lo)
        ctx.window, ctx.softmax_scale, ctx.backend = win, softmax_scale, backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(_bwd_impl, ctx, dout, dlse)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def sink_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out [s, b, H, d], lse [b, H, s])``; lse is fp32, natural log, sink-inclusive."""
    be, scale = _validate(q, k, v, sink, slopes, window, softmax_scale, backend)
    win = 0 if window is None else window
    if _plain_eager(q):
        return _SinkAttentionFunction.apply(q, k, v, sink, slopes, win, scale, be)
    out, lse, _ = _sink_attention_fwd_op(q, k, v, sink, slopes, win, scale, be)
    return out, lse


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    slopes: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention with a learnable sink; optional ALiBi ``slopes [H]`` and window ``W``.

    ``q [s, b, H, d]``, ``k, v [s, b, G, d]``, ``sink [H]`` -> ``[s, b, H, d]``.
    """
    return sink_attention_with_lse(
        q, k, v, sink, slopes=slopes, window=window, softmax_scale=softmax_scale, backend=backend
    )[0]


def alibi_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Global-layer attention: full causal + ALiBi (bias ``-slopes[h] * (i - j)`` after the scale)
    + learnable sink. ``q [s,b,H,d]``, ``k, v [s,b,G,d]``, ``slopes [H]`` fp32, ``sink [H]`` ->
    ``[s, b, H, d]``."""
    if slopes is None:
        raise ValueError("alibi_sink_attention: slopes [H] are required (use sink_attention without ALiBi)")
    return sink_attention(q, k, v, sink, slopes=slopes, softmax_scale=softmax_scale, backend=backend)


def window_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    window: int,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local-layer attention: key ``j`` visible to query ``i`` iff ``0 <= i - j <= window - 1``
    (Megatron ``window_size=(window-1, 0)``) + learnable sink. ``q [s,b,H,d]``, ``k, v [s,b,G,d]``,
    ``sink [H]`` -> ``[s, b, H, d]``. The Triton backend runs the library's one sliding-window
    kernel family (:func:`vpmoe_compile.ops.tpa_attention.triton.swa_fwd` / ``swa_bwd``)."""
    if window is None:
        raise ValueError("window_sink_attention: window is required (use sink_attention for full causal)")
    return sink_attention(q, k, v, sink, window=window, softmax_scale=softmax_scale, backend=backend)
