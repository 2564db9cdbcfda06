"""Triton kernels for the two elementwise passes of :mod:`.op` over one chunk's fp32 logits.

Each reads the fp32 chunk exactly once (the GEMM that produced it is cuBLAS):

* :func:`chunk_loss` — per row of ``logits [c, V]``: online max / ``Σ exp`` over the row, the
  target logit, the loss with Megatron's arithmetic and ``lse``.
* :func:`chunk_dlogits` — per element of ``logits [N, c]`` (a vocabulary slice starting at
  ``v0``): ``d = (exp(l − lse) − [col == label − v0]) · g`` stored in the gradient dtype, and
  for each row whose label falls in the slice the rounding residual ``d − round(d)`` of its
  target element (fp32), which the caller adds back to ``d_hidden`` / ``d_weight`` exactly.

They are registered as ``torch.library`` custom ops (fake impls give the output shapes), so
``torch.compile`` keeps them as opaque calls: Inductor cannot fuse the chunks' elementwise work
horizontally into one kernel, which would keep every chunk's fp32 logits alive at once.
Run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["chunk_dlogits", "chunk_loss"]

_FWD_BLOCK = 4096
_BWD_BLOCK_M = 16
_BWD_BLOCK_N = 512


@triton.jit
def _chunk_loss_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, lse_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        new_m = tl.maximum(m, x)
        # lanes that have seen only -inf keep s = 0 (avoid exp(-inf - -inf) = nan)
        scale = tl.where(new_m == float("-inf"), 0.0, tl.exp(m - new_m))
        s = s * scale + tl.where(new_m == float("-inf"), 0.0, tl.exp(x - new_m))
        m = new_m
    row_max = tl.max(m, 0)
    s = tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max))
    log_sum = tl.log(tl.sum(s, 0))
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < V)
    target = tl.load(base + tl.where(valid, label, 0))
    loss = log_sum - tl.where(valid, target - row_max, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, row_max + log_sum)


@triton.jit
def _chunk_dlogits_kernel(
    logits_ptr, stride_l, lse_ptr, g_ptr, labels_ptr, dlog_ptr, stride_d, resid_ptr, N, C, v0,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < C)
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    local = tl.load(labels_ptr + rows, mask=rmask, other=-1) - v0
    is_t = cols[None, :] == local[:, None]
    d = (tl.exp(x - lse[:, None]) - is_t.to(tl.float32)) * g[:, None]
    db = d.to(dlog_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(dlog_ptr + rows64[:, None] * stride_d + cols[None, :], db, mask=mask)
    resid = tl.sum(tl.where(is_t & mask, d - db.to(tl.float32), 0.0), axis=1)
    hit = rmask & (local >= pid_n * BLOCK_N) & (local < pid_n * BLOCK_N + BLOCK_N) & (local < C)
    tl.store(resid_ptr + rows, resid, mask=hit)


@torch.library.custom_op("vpmoe::lce_chunk_loss", mutates_args=())
def chunk_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [c, V]`` fp32 (rows contiguous), ``labels [c]`` int64 -> ``(loss [c], lse [c])``
    fp32. Labels outside ``[0, V)`` drop the target term (Megatron's rule)."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _chunk_loss_kernel[(c,)](logits, logits.stride(0), labels, loss, lse, v, BLOCK=_FWD_BLOCK, num_warps=8)
    return loss, lse


@chunk_loss.register_fake
def _(logits, labels):
    c = logits.shape[0]
    return logits.new_empty(c, dtype=torch.float32), logits.new_empty(c, dtype=torch.float32)


@torch.library.custom_op("vpmoe::lce_chunk_dlogits", mutates_args=())
def chunk_dlogits(
    logits: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, v0: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [N, c]`` fp32 of the vocabulary slice ``[v0, v0 + c)``; ``lse``, ``grad`` fp32
    ``[N]``; ``labels [N]`` int64 -> ``(d_logits [N, c] in dtype, residual [N] fp32)``; the
    residual is 0 for rows whose label is not in the slice."""
    n, c = logits.shape
    dlog = torch.empty((n, c), dtype=dtype, device=logits.device)
    resid = torch.zeros(n, dtype=torch.float32, device=logits.device)
    if n and c:
        grid = (triton.cdiv(n, _BWD_BLOCK_M), triton.cdiv(c, _BWD_BLOCK_N))
        _chunk_dlogits_kernel[grid](
            logits, logits.stride(0), lse, grad, labels, dlog, dlog.stride(0), resid, n, c, v0,
            BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, num_warps=8,
        )
    return dlog, resid


@chunk_dlogits.register_fake
def _(logits, lse, grad, labels, v0, dtype):
    n, c = logits.shape
    return logits.new_empty((n, c), dtype=dtype), logits.new_empty(n, dtype=torch.float32)
