"""``grouped_mm``: one matrix product per group of consecutive rows (the routed experts' GEMM).

``out[r] = x[r] @ b[g(r)]`` for ``x [M, K]``, ``b [G, K, N]`` and ``offs [G]`` int32 on the
device (cumulative row ends: group ``g`` owns rows ``offs[g-1] .. offs[g]-1``; groups may be
empty). The MoE layer calls it with ``b = weight.mT`` of a stacked ``[E, N, K]`` expert weight.

Two implementations, chosen per call from tensor metadata only (never from values, so no host
synchronisation and nothing dynamo must guard on besides dtype/device), by the kernel policy's
rule (:func:`vpmoe_compile.kernels.resolve_backend`; ``[kernels] grouped_gemm``):

* **fused** — ``torch._grouped_mm`` (CUTLASS, sm90+, bf16 in/out, offsets read on the device,
  no host sync; autograd and the Inductor lowering are PyTorch's own). Used when
  :func:`supports` says so. It is PyTorch's kernel, not ours: there is no ``triton.py`` here,
  and :func:`supports` stays in this file beside the one line that calls it.
* **reference** — ``vpmoe::grouped_mm``: a ``torch.library`` custom op (fake impl + autograd)
  over the plain-PyTorch loop of :mod:`.reference`. It reads ``offs`` on the host, so it is the
  path for the CPU, fp32/fp64 and GPUs without the fused kernel (where ``torch._grouped_mm``
  would itself loop on the host); the custom op keeps it opaque to ``torch.compile``
  (no graph break, static output shape ``[M, N]``).

Rows past ``offs[-1]`` are unspecified (zero in the reference); callers pass ``offs[-1] == M``.
"""

from __future__ import annotations

import torch

from vpmoe_compile.kernels import GROUPED_GEMM_BACKENDS, resolve_backend

from .reference import grouped_mm_reference, grouped_mm_wgrad_reference

__all__ = ["grouped_mm", "supports"]


def supports(shapes, dtype=None, device=None) -> bool:
    """Whether the fused ``torch._grouped_mm`` path runs ``x [M, K] @ b[g] [K, N]`` without a host
    sync: ``shapes = {"k": K, "n": N}`` with K and N multiples of 8 (16-byte aligned rows),
    bf16, a CUDA device of compute capability 9.0+. ``None`` is not judged."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(shapes.get(key, 0) % 8 for key in ("k", "n")):
        return False
    if dtype is not None and dtype != torch.bfloat16:
        return False
    if device is not None:
        device = device if isinstance(device, torch.device) else torch.device(device)
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
            return False
    return True


@torch.library.custom_op("vpmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return grouped_mm_reference(x, b, offs)


@_grouped_mm_op.register_fake
def _(x, b, offs):
    return x.new_empty(x.shape[0], b.shape[-1])


@torch.library.custom_op("vpmoe::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return grouped_mm_wgrad_reference(x, dy, offs)


@_grouped_mm_wgrad_op.register_fake
def _(x, dy, offs):
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output):
    x, b, offs = inputs
    ctx.save_for_backward(x, b, offs)


def _backward(ctx, dy):
    x, b, offs = ctx.saved_tensors
    dx = db = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_mm_op(dy.contiguous(), b.mT, offs)
    if ctx.needs_input_grad[1]:
        db = _grouped_mm_wgrad_op(x, dy.contiguous(), offs)
    return dx, db, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
    if x.ndim != 2 or b.ndim != 3 or offs.ndim != 1:
        raise ValueError(
            f"grouped_mm: expected x [M, K], b [G, K, N], offs [G]; got x {tuple(x.shape)}, "
            f"b {tuple(b.shape)}, offs {tuple(offs.shape)}"
        )
    if x.shape[1] != b.shape[1] or offs.shape[0] != b.shape[0]:
        raise ValueError(
            f"grouped_mm: x [M, K] = {tuple(x.shape)} and b [G, K, N] = {tuple(b.shape)} must share K, "
            f"and offs must have one entry per group (got {offs.shape[0]} for {b.shape[0]} groups)"
        )
    if offs.dtype != torch.int32:
        raise TypeError(f"grouped_mm: offs must be int32 (cumulative row ends), got {offs.dtype}")
    if x.dtype != b.dtype:
        raise TypeError(f"grouped_mm: x and b must share a dtype, got {x.dtype} and {b.dtype}")


def grouped_mm(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Grouped matrix product ``out[r] = x[r] @ b[g(r)]`` (see module docstring).

    Args:
        x: ``[M, K]`` rows sorted by group.
        b: ``[G, K, N]``, any strides (``weight.mT`` of a stacked ``[G, N, K]`` weight is fine).
        offs: ``[G]`` int32 cumulative row ends, on ``x``'s device.
        backend: ``"auto"`` (fused where :func:`supports`, else the reference op) or
            ``"reference"`` (always the reference op).

    Returns:
        ``[M, N]`` in ``x.dtype``; differentiable in ``x`` and ``b``.
    """
    _check(x, b, offs)
    be = resolve_backend(backend, allowed=GROUPED_GEMM_BACKENDS, supports=supports,
                         shapes={"k": x.shape[1], "n": b.shape[-1]}, dtype=x.dtype, device=x.device,
                         fast="fused", what="grouped_mm")
    if be == "fused" and b.device == x.device:
        return torch._grouped_mm(x, b, offs=offs)
    return _grouped_mm_op(x, b, offs)
