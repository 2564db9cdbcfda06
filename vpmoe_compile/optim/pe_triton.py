"""Fused Polar Express for banks of short-wide matrices: one Triton program per matrix, all steps.

The PyTorch path (:func:`.polar_express._pe_batched`) runs every Polar Express step as three
batched GEMMs (``A = X X^T``, ``B = b A + c A^2``, ``X <- a X + B X``). For the vpMoE expert
banks (``[N, 128, 1024]``) those GEMMs are memory bound (``K = 128``) and ``baddbmm`` first copies
``X`` into its output: about 12 bytes per element and step move through HBM, six passes over ``X``.

Here one program owns one matrix ``X`` (``[s, L]``, ``s <= 128``, stored in place) and runs the
whole iteration itself, sweeping ``X`` in column tiles ``[s, BLOCK_L]``:

* sweep 0 reads the *unnormalised* bf16 input, scales it by
  ``gamma = 1 / ((1 + safety) ||U||_F + eps)`` (``||U||_F^2`` comes from the prologue), rounds to
  the compute dtype and accumulates the Gram matrix ``G = X X^T`` (fp32, in registers);
* step ``t`` forms ``A = round(G)``, ``B = round(b_t A + c_t A A)`` (an ``s x s`` product in the
  same program), then sweeps the tiles: ``X' = round(a_t X + B X)`` (fp32 accumulation, as
  ``baddbmm``), stores ``X'`` over ``X`` (each tile depends only on its own columns) and
  accumulates the next Gram matrix from the rounded ``X'``;
* the last sweep optionally accumulates the per-neuron sum of squares of the output
  (``stat = 1``: per row of ``X``, ``[N, s]``; ``stat = 2``: per column, ``[N, L]``) so that the
  NorMuon epilogue reads the output only once.

Every rounding point is the PyTorch path's (bf16 Gram, bf16 ``B``, bf16 ``X`` after every step,
fp32 accumulation inside each product), except that the normalisation rounds twice
(``round(round(U) * gamma)`` instead of ``round(U * gamma)``); the result is validated against
the fp64 reference like every fast path (spec §6.3 / T3). Between sweeps the program's own
global stores are re-read by other threads of the same program: a CTA barrier separates the
sweeps. With ~132 matrices in flight (33 MB at ``[128, 1024]`` bf16) the repeated sweeps are
mostly served by the 50 MB L2 cache.

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernel runs in fp32 (the interpreter's bf16
``tl.dot`` is not reliable); on the GPU it runs in bf16 (fp32 with ``input_precision="ieee"``
for exactness checks).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["fused_pe_supported", "polar_express_fused_", "MAX_ROWS"]

#: Largest ``s = min(m, n)`` handled by the fused kernel (the Gram matrix lives in registers).
MAX_ROWS = 128

_coef_cache: Dict[Tuple, torch.Tensor] = {}


def _block_rows(s: int) -> int:
    return max(16, 1 << (int(s) - 1).bit_length())


def interpreter_active() -> bool:
    return bool(triton.knobs.runtime.interpret)


def fused_pe_supported(shape: Tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    """True when :func:`polar_express_fused_` handles a bank of ``[m, n]`` members."""
    s = min(shape)
    if s > MAX_ROWS or max(shape) < 16:
        return False
    if device.type == "cuda":
        return dtype in (torch.bfloat16, torch.float32)
    return device.type == "cpu" and dtype == torch.float32 and interpreter_active()


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _pe_fused_kernel(
    X,  # [N, S, L] contiguous, compute dtype; unnormalised input, output in place
    NORM2,  # [N] fp32: squared Frobenius norm of the (fp32) input
    COEF,  # [T, 3] fp32: (a, b, c) per step
    R,  # [N, S] or [N, L] fp32: sum of squares of the output (STAT != 0), else unused
    S,
    L,
    safety,
    eps,
    T: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    STAT: tl.constexpr,
    IEEE: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, BS)
    row_ok = rs < S
    base = X + n * S * L
    dt = X.dtype.element_ty
    gamma = 1.0 / ((1.0 + safety) * tl.sqrt(tl.load(NORM2 + n)) + eps)

    # sweep 0: Gram matrix of the normalised input (nothing stored)
    gram = tl.zeros((BS, BS), dtype=tl.float32)
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        mask = row_ok[:, None] & (cols < L)[None, :]
        ptr = base + rs[:, None] * L + cols[None, :]
        x = (tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * gamma).to(dt)
        gram += _dot(x, tl.trans(x), IEEE)

    for t in tl.static_range(T):
        a = tl.load(COEF + 3 * t)
        b = tl.load(COEF + 3 * t + 1)
        c = tl.load(COEF + 3 * t + 2)
        A = gram.to(dt)
        Bm = (b * A.to(tl.float32) + c * _dot(A, A, IEEE)).to(dt)
        if t + 1 < T:
            gram = tl.zeros((BS, BS), dtype=tl.float32)
        if STAT == 1:
            rrow = tl.zeros((BS,), dtype=tl.float32)
        tl.debug_barrier()  # the previous sweep's stores are visible to the whole program
        for l0 in range(0, L, BL):
            cols = l0 + tl.arange(0, BL)
            col_ok = cols < L
            mask = row_ok[:, None] & col_ok[None, :]
            ptr = base + rs[:, None] * L + cols[None, :]
            x = tl.load(ptr, mask=mask, other=0.0)
            if t == 0:
                x = (x.to(tl.float32) * gamma).to(dt)
            y = (_dot(Bm, x, IEEE) + a * x.to(tl.float32)).to(dt)
            tl.store(ptr, y, mask=mask)
            if t + 1 < T:
                gram += _dot(y, tl.trans(y), IEEE)
            else:
                if STAT == 1:
                    yf = y.to(tl.float32)
                    rrow += tl.sum(yf * yf, axis=1)
                if STAT == 2:
                    yf = y.to(tl.float32)
                    tl.store(R + n * L + cols, tl.sum(yf * yf, axis=0), mask=col_ok)
        if t + 1 == T:
            if STAT == 1:
                tl.store(R + n * S + rs, rrow, mask=row_ok)


def _get_kernel():
    return _pe_fused_kernel


def _coefficients(table: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    key = (tuple(tuple(float(v) for v in row) for row in table), device)
    coef = _coef_cache.get(key)
    if coef is None:
        coef = torch.tensor(key[0], dtype=torch.float32, device=device).contiguous()
        _coef_cache[key] = coef
    return coef


def polar_express_fused_(
    X: torch.Tensor,
    norm2: torch.Tensor,
    table: Sequence[Sequence[float]],
    safety: float,
    eps: float,
    stat: int = 0,
    r_out: Optional[torch.Tensor] = None,
    block_l: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    ieee: bool = False,
) -> Optional[torch.Tensor]:
    """Polar Express of every ``X[i]`` (``[N, s, L]``, ``s <= L``, ``s <= 128``), in place.

    Args:
        X: contiguous ``[N, s, L]`` bf16 (GPU) or fp32 tensor holding the *unnormalised*
            Polar Express input, rounded to the compute dtype; overwritten with the output.
        norm2: ``[N]`` fp32, ``||U_i||_F^2`` of the input before rounding.
        table: ``(a, b, c)`` per step; ``safety`` / ``eps``: normalisation
            ``X / ((1 + safety) ||U||_F + eps)`` (spec §1.2).
        stat: 0 none; 1 return ``[N, s]`` row sums of the output squared; 2 ``[N, L]`` column sums.
        r_out: optional preallocated fp32 output for ``stat`` (CUDA-graph friendly).
        block_l, num_warps, num_stages: tile width and launch configuration (defaults by ``s``).
        ieee: fp32 products with ``input_precision="ieee"`` (exactness checks on the GPU).

    Returns:
        The ``stat`` sums (fp32) or ``None``. Issues one kernel launch, no host synchronisation.
    """
    if X.ndim != 3 or not X.is_contiguous():
        raise ValueError(f"X must be a contiguous [N, s, L] tensor, got {tuple(X.shape)}")
    N, S, L = X.shape
    if S > MAX_ROWS or S > L:
        raise ValueError(f"fused Polar Express needs s <= min(L, {MAX_ROWS}), got [{S}, {L}]")
    if norm2.shape != (N,) or norm2.dtype != torch.float32:
        raise ValueError("norm2 must be an fp32 [N] tensor")
    interp = interpreter_active()
    if interp and X.dtype != torch.float32:
        raise ValueError("under TRITON_INTERPRET=1 the fused Polar Express runs in fp32 only")
    BS = _block_rows(S)
    if block_l is None:
        block_l = 64 if BS >= 64 else 128
    block_l = max(16, min(block_l, 1 << (int(L) - 1).bit_length()))
    if num_warps is None:
        num_warps = 8 if BS >= 128 else 4
    if num_stages is None:
        num_stages = 2
    r = None
    if stat:
        size = S if stat == 1 else L
        r = r_out if r_out is not None else torch.empty((N, size), dtype=torch.float32, device=X.device)
    if N == 0:
        return r
    coef = _coefficients(table, X.device)
    kernel = _get_kernel()
    kwargs = {} if interp else dict(num_warps=num_warps, num_stages=num_stages)
    kernel[(N,)](
        X,
        norm2,
        coef,
        r if r is not None else norm2,
        S,
        L,
        float(safety),
        float(eps),
        T=len(coef),
        BS=BS,
        BL=block_l,
        STAT=int(stat),
        IEEE=bool(ieee or X.dtype == torch.float32),
        **kwargs,
    )
    return r
