"""Triton kernels of the TPA local-attention op (two-kernel design, ``docs/design.md#tpa-attention``).

Pipeline (forward): ``prologue`` (factors -> q, k, v rows, all heads of a token block:
contraction, exact ``/R``, bias, QK RMSNorm, fp32 GRAPE-M rotation; saves ``rstd``) ->
``attention`` (sliding-window flash attention with a learnable sink, GQA, on the
materialised q/k/v). Backward: ``attention dq`` (also ``D = rowsum(dO*O)``, recomputed as
``rowsum(P*dP)`` for 16-bit outputs where rows see few keys, and the sink partials) ->
``attention dkv`` (the heads of a group summed in registers) -> ``prologue backward``
(dq, dk, dv -> dfactors, and fixed-order partials of dbias, dgamma, dcos, dsin). All
parameter-gradient reductions are per-program partials summed in a fixed order by PyTorch
afterwards: deterministic, no atomics.

The attention kernels (``swa_fwd`` / ``swa_bwd``, the ``_swa_*`` kernels) are the library's one
sliding-window + sink kernel family: :func:`vpmoe_compile.ops.sink_attention.window_sink_attention`
runs on them too. They were kept over the sink-attention kernels' former window path on a
measured H100 comparison inside the fused op (``benchmarks/results/window_kernels.json``).

Layouts (Megatron, sequence first; token ``(t, bi)`` is row ``t*b + bi``):
``factors [s, b, F]`` (any strides), ``q [s, b, H, d]``, ``k``/``v`` ``[s, b, G, d]``,
``o [s, b, H, d]``, ``lse``/``delta`` ``[b, H, s]`` fp32 (natural log,
sink-inclusive), ``cos``/``sin`` ``[s, d/2]`` fp32, ``rstd_q [s, b, H]``, ``rstd_k [s, b, G]`` fp32.

Precision: fp32 for contraction, RMS, rotation, logits, softmax state and accumulators;
``tl.dot`` operands in the activation dtype (bf16 on GPU); fp32 operands with IEEE products
unless torch's fp32 matmul precision allows TF32 (:func:`vpmoe_compile._triton.ieee_fp32`). Requires ``d/2`` to be a power of two >= 16 and ranks <= 4
(:func:`supports` / :func:`check_supported`, asked by :mod:`vpmoe_compile.kernels` and by the op's
argument checks). The packed factor layout is :mod:`.layout`'s.

Prologue kernels (one program = ``BT`` tokens of one sample, all heads): every tile is 2-D
``[BT, d/2]`` (the two rotation halves are separate tiles, so the planes ``(p, p + d/2)`` need
no gather); ranks are unrolled at compile time, heads run in a dynamic (not unrolled) loop.
When the factor rows are 16-byte aligned (``ALIGN``: unit column stride, row strides and
block offsets multiples of 16 bytes) the loads carry that alignment, so Triton vectorises
them and lays a tile out with whole rows inside one warp: the per-token row reductions of the
backward (``dA = u . B_r``, the RMSNorm dot) are then warp shuffles instead of cross-warp
shared-memory round trips (``benchmarks/results/tpa_notes.md``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vpmoe_compile._triton import default_pack, dot as _dot, ieee_fp32, needs_exact_delta
from vpmoe_compile.ops.tpa_attention.layout import factor_offsets

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================ prologue


@triton.jit
def _row_offsets(t64, bi, sF_s, sF_b, ALIGN: tl.constexpr):
    """Element offset of each token's factor row (``[BT]`` int64), with its alignment hint
    (``ALIGN`` elements = 16 bytes when the launcher checked it, else 1 = no hint)."""
    roff = t64 * sF_s + bi * sF_b
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    return roff


@triton.jit
def _ld_half(F_ptr, roff, tmask, sF_f, col0, P: tl.constexpr, ALIGN: tl.constexpr):
    """``[BT, P]`` fp32 factor columns ``col0 .. col0+P-1`` of a token block."""
    p = tl.arange(0, P)
    if ALIGN > 1:  # unit column stride, 16-byte aligned rows and column offsets
        ptr = F_ptr + (roff[:, None] + col0) + p[None, :]
    else:
        ptr = F_ptr + roff[:, None] + (col0 + p[None, :]).to(tl.int64) * sF_f
    return tl.load(ptr, mask=tmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _ld_col(F_ptr, roff, tmask, sF_f, col):
    """``[BT]`` fp32 factor column ``col`` of a token block."""
    return tl.load(F_ptr + roff + col * sF_f, mask=tmask, other=0.0).to(tl.float32)


@triton.jit
def _ld_b(F_ptr, roff, tmask, sF_f, OFFB: tl.constexpr, RANK: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
          ALIGN: tl.constexpr):
    """The two halves of each of the (<= 4) B rows of a token block (absent ranks alias rank 0
    and are never used)."""
    b01 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB, P, ALIGN)
    b02 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + P, P, ALIGN)
    b11 = b01
    b12 = b02
    b21 = b01
    b22 = b02
    b31 = b01
    b32 = b02
    if RANK > 1:
        b11 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + D, P, ALIGN)
        b12 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + D + P, P, ALIGN)
    if RANK > 2:
        b21 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + 2 * D, P, ALIGN)
        b22 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + 2 * D + P, P, ALIGN)
    if RANK > 3:
        b31 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + 3 * D, P, ALIGN)
        b32 = _ld_half(F_ptr, roff, tmask, sF_f, OFFB + 3 * D + P, P, ALIGN)
    return b01, b02, b11, b12, b21, b22, b31, b32


@triton.jit
def _ld_a(F_ptr, roff, tmask, sF_f, COLA, RANK: tl.constexpr):
    """A entries ``[BT]`` of one head/group for ranks 0..3 (absent ranks alias rank 0)."""
    a0 = _ld_col(F_ptr, roff, tmask, sF_f, COLA)
    a1 = a0
    a2 = a0
    a3 = a0
    if RANK > 1:
        a1 = _ld_col(F_ptr, roff, tmask, sF_f, COLA + 1)
    if RANK > 2:
        a2 = _ld_col(F_ptr, roff, tmask, sF_f, COLA + 2)
    if RANK > 3:
        a3 = _ld_col(F_ptr, roff, tmask, sF_f, COLA + 3)
    return a0, a1, a2, a3


@triton.jit
def _contract(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK: tl.constexpr):
    """``x = (1/RANK) sum_r a_r B_r`` as two ``[BT, P]`` halves (fp32)."""
    x1 = a0[:, None] * b01
    x2 = a0[:, None] * b02
    if RANK > 1:
        x1 += a1[:, None] * b11
        x2 += a1[:, None] * b12
    if RANK > 2:
        x1 += a2[:, None] * b21
        x2 += a2[:, None] * b22
    if RANK > 3:
        x1 += a3[:, None] * b31
        x2 += a3[:, None] * b32
    return x1 / RANK, x2 / RANK


@triton.jit
def _prologue_fwd_side(
    F_ptr, roff, tok, tmask, sF_f, OUT_ptr, RS_ptr, BIAS_ptr, GM_ptr, eps, cs, sn,
    NH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr,
    OFF_A: tl.constexpr, OFF_B: tl.constexpr, NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr, ALIGN: tl.constexpr,
):
    """Rows of one side (q: NH = H heads; k or v: NH = G groups) for a token block.

    Head ``h`` of the side reads ``A`` columns ``OFF_A + h*RANK + r`` and its bias at the
    interleaved offset ``(h // NPG)*GW + (h % NPG + SLOT)*D``.
    """
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    b01, b02, b11, b12, b21, b22, b31, b32 = _ld_b(F_ptr, roff, tmask, sF_f, OFF_B, RANK, D, P, ALIGN)
    if NORM:
        g1 = tl.load(GM_ptr + p).to(tl.float32)
        g2 = tl.load(GM_ptr + P + p).to(tl.float32)
    for h in range(NH):
        a0, a1, a2, a3 = _ld_a(F_ptr, roff, tmask, sF_f, OFF_A + h * RANK, RANK)
        x1, x2 = _contract(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK)
        if HAS_BIAS:
            cb = BIAS_ptr + (h // NPG) * GW + (h % NPG + SLOT) * D
            x1 += tl.load(cb + p).to(tl.float32)[None, :]
            x2 += tl.load(cb + P + p).to(tl.float32)[None, :]
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / D + eps)
            tl.store(RS_ptr + tok * NH + h, rstd, mask=tmask)
            x1 = x1 * rstd[:, None] * g1[None, :]
            x2 = x2 * rstd[:, None] * g2[None, :]
        if ROTATE:
            y1 = x1 * cs - x2 * sn
            y2 = x2 * cs + x1 * sn
        else:
            y1 = x1
            y2 = x2
        op = OUT_ptr + (tok * NH + h)[:, None] * D + p[None, :]
        tl.store(op, y1.to(OUT_ptr.dtype.element_ty), mask=m2)
        tl.store(op + P, y2.to(OUT_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _tpa_prologue_fwd_kernel(
    F_ptr, sF_s, sF_b, sF_f,
    BIAS_ptr, GQ_ptr, GK_ptr,
    COS_ptr, SIN_ptr,
    Q_ptr, K_ptr, V_ptr, RSQ_ptr, RSK_ptr,
    S, B, eps,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RK: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr, ALIGN: tl.constexpr,
):
    OFF_AK: tl.constexpr = H * RQ
    OFF_AV: tl.constexpr = OFF_AK + G * RK
    OFF_BQ: tl.constexpr = OFF_AV + G * RK
    OFF_BK: tl.constexpr = OFF_BQ + RQ * D
    OFF_BV: tl.constexpr = OFF_BK + RK * D
    HPG: tl.constexpr = H // G
    GW: tl.constexpr = (HPG + 2) * D  # width of one group in the interleaved bias

    pid_t = tl.program_id(0)
    bi = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < S
    t64 = t.to(tl.int64)
    roff = _row_offsets(t64, bi, sF_s, sF_b, ALIGN)
    tok = t64 * B + bi  # row index in [s*b]
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    _prologue_fwd_side(F_ptr, roff, tok, tmask, sF_f, Q_ptr, RSQ_ptr, BIAS_ptr, GQ_ptr, eps, cs, sn,
                       H, D, P, RQ, 0, OFF_BQ, HPG, GW, 0, HAS_BIAS, NORM_Q, True, ALIGN)
    _prologue_fwd_side(F_ptr, roff, tok, tmask, sF_f, K_ptr, RSK_ptr, BIAS_ptr, GK_ptr, eps, cs, sn,
                       G, D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, HAS_BIAS, NORM_K, True, ALIGN)
    _prologue_fwd_side(F_ptr, roff, tok, tmask, sF_f, V_ptr, RSK_ptr, BIAS_ptr, GK_ptr, eps, cs, sn,
                       G, D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, HAS_BIAS, False, False, ALIGN)


@triton.jit
def _acc_store(ptr, val, j, BPP: tl.constexpr):
    """Store a program's partial; from its second batch iteration on, add to the stored value."""
    if BPP > 1:
        val += tl.load(ptr, mask=(tl.zeros(val.shape, dtype=tl.int32) + j) > 0, other=0.0)
    tl.store(ptr, val)


@triton.jit
def _prologue_bwd_side(
    F_ptr, roff, tok, tmask, sF_f, dF_row, part_idx, j,
    DX_ptr, BIAS_ptr, GM_ptr, RS_ptr, PART_ptr,
    cs, sn, dcos, dsin,
    NH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr,
    OFF_A: tl.constexpr, OFF_B: tl.constexpr,
    NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr, NPART: tl.constexpr, OFF_DG: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr, BT: tl.constexpr, ALIGN: tl.constexpr,
    BPP: tl.constexpr,
):
    """Backward of one side (q, k or v) of the prologue for a token block.

    Per head (dynamic loop), with ``u`` the incoming gradient of the head's output row:
    rotation backward (``dcos += u1 z1 + u2 z2``, ``dsin += u2 z1 - u1 z2`` with ``z`` the
    normalised, scaled row), RMSNorm backward (``dn = u*gamma``,
    ``u = (dn - n*mean(dn*n)) * rstd``), the bias partial (column sum of ``u``), and the
    contraction backward ``dA[h, r] = (u . B_r)/RANK`` (written) and ``dB_r += A[h, r] u/RANK``
    (summed over heads in registers, written after the loop). ``dgamma`` is accumulated as a
    ``[BT, d]`` tile over heads and reduced over tokens once. Partials go to row ``part_idx`` of
    ``PART [programs, NPART]`` (bias at its interleaved offset, gain at ``OFF_DG``); for the
    program's batch iteration ``j > 0`` they are added to what the earlier iterations stored there
    (the caller separates iterations with a barrier). Returns the updated per-token
    ``dcos``/``dsin`` accumulators.
    """
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    ty = dF_row.dtype.element_ty
    b01, b02, b11, b12, b21, b22, b31, b32 = _ld_b(F_ptr, roff, tmask, sF_f, OFF_B, RANK, D, P, ALIGN)
    d01 = tl.zeros([BT, P], dtype=tl.float32)
    d02 = tl.zeros([BT, P], dtype=tl.float32)
    d11 = tl.zeros([BT, P], dtype=tl.float32)
    d12 = tl.zeros([BT, P], dtype=tl.float32)
    d21 = tl.zeros([BT, P], dtype=tl.float32)
    d22 = tl.zeros([BT, P], dtype=tl.float32)
    d31 = tl.zeros([BT, P], dtype=tl.float32)
    d32 = tl.zeros([BT, P], dtype=tl.float32)
    dg1 = tl.zeros([BT, P], dtype=tl.float32)
    dg2 = tl.zeros([BT, P], dtype=tl.float32)
    if NORM:
        g1 = tl.load(GM_ptr + p).to(tl.float32)
        g2 = tl.load(GM_ptr + P + p).to(tl.float32)
    for h in range(NH):
        a0, a1, a2, a3 = _ld_a(F_ptr, roff, tmask, sF_f, OFF_A + h * RANK, RANK)
        gp = DX_ptr + (tok * NH + h)[:, None] * D + p[None, :]
        u1 = tl.load(gp, mask=m2, other=0.0).to(tl.float32)
        u2 = tl.load(gp + P, mask=m2, other=0.0).to(tl.float32)
        if ROTATE or NORM:
            x1, x2 = _contract(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK)
            if HAS_BIAS:
                cb = BIAS_ptr + (h // NPG) * GW + (h % NPG + SLOT) * D
                x1 += tl.load(cb + p).to(tl.float32)[None, :]
                x2 += tl.load(cb + P + p).to(tl.float32)[None, :]
            if NORM:
                rstd = tl.load(RS_ptr + tok * NH + h, mask=tmask, other=0.0)
                n1 = x1 * rstd[:, None]
                n2 = x2 * rstd[:, None]
                z1 = n1 * g1[None, :]
                z2 = n2 * g2[None, :]
            else:
                z1 = x1
                z2 = x2
        if ROTATE:
            dcos += u1 * z1 + u2 * z2
            dsin += u2 * z1 - u1 * z2
            w1 = u1 * cs + u2 * sn
            w2 = u2 * cs - u1 * sn
            u1 = w1
            u2 = w2
        if NORM:
            dg1 += u1 * n1
            dg2 += u2 * n2
            dn1 = u1 * g1[None, :]
            dn2 = u2 * g2[None, :]
            mdot = tl.sum(dn1 * n1 + dn2 * n2, axis=1) / D
            u1 = (dn1 - n1 * mdot[:, None]) * rstd[:, None]
            u2 = (dn2 - n2 * mdot[:, None]) * rstd[:, None]
        u1 = tl.where(m2, u1, 0.0)
        u2 = tl.where(m2, u2, 0.0)
        if HAS_BIAS:
            dcp = PART_ptr + part_idx * NPART + (h // NPG) * GW + (h % NPG + SLOT) * D + p
            _acc_store(dcp, tl.sum(u1, axis=0), j, BPP)
            _acc_store(dcp + P, tl.sum(u2, axis=0), j, BPP)
        # contraction backward: dA[h, r] = u . B_r / RANK ; dB_r += A[h, r] u / RANK
        col = OFF_A + h * RANK
        tl.store(dF_row + col, (tl.sum(u1 * b01 + u2 * b02, axis=1) / RANK).to(ty), mask=tmask)
        d01 += a0[:, None] * u1
        d02 += a0[:, None] * u2
        if RANK > 1:
            tl.store(dF_row + col + 1, (tl.sum(u1 * b11 + u2 * b12, axis=1) / RANK).to(ty),
                     mask=tmask)
            d11 += a1[:, None] * u1
            d12 += a1[:, None] * u2
        if RANK > 2:
            tl.store(dF_row + col + 2, (tl.sum(u1 * b21 + u2 * b22, axis=1) / RANK).to(ty),
                     mask=tmask)
            d21 += a2[:, None] * u1
            d22 += a2[:, None] * u2
        if RANK > 3:
            tl.store(dF_row + col + 3, (tl.sum(u1 * b31 + u2 * b32, axis=1) / RANK).to(ty),
                     mask=tmask)
            d31 += a3[:, None] * u1
            d32 += a3[:, None] * u2
    dp = dF_row[:, None] + (OFF_B + p)[None, :]
    tl.store(dp, (d01 / RANK).to(ty), mask=m2)
    tl.store(dp + P, (d02 / RANK).to(ty), mask=m2)
    if RANK > 1:
        tl.store(dp + D, (d11 / RANK).to(ty), mask=m2)
        tl.store(dp + D + P, (d12 / RANK).to(ty), mask=m2)
    if RANK > 2:
        tl.store(dp + 2 * D, (d21 / RANK).to(ty), mask=m2)
        tl.store(dp + 2 * D + P, (d22 / RANK).to(ty), mask=m2)
    if RANK > 3:
        tl.store(dp + 3 * D, (d31 / RANK).to(ty), mask=m2)
        tl.store(dp + 3 * D + P, (d32 / RANK).to(ty), mask=m2)
    if NORM:
        _acc_store(PART_ptr + part_idx * NPART + OFF_DG + p, tl.sum(dg1, axis=0), j, BPP)
        _acc_store(PART_ptr + part_idx * NPART + OFF_DG + P + p, tl.sum(dg2, axis=0), j, BPP)
    return dcos, dsin


@triton.jit
def _tpa_prologue_bwd_kernel(
    F_ptr, sF_s, sF_b, sF_f, DF_ptr,
    DQ_ptr, DK_ptr, DV_ptr,
    BIAS_ptr, GQ_ptr, GK_ptr, RSQ_ptr, RSK_ptr,
    COS_ptr, SIN_ptr,
    PART_ptr, CS_ptr,
    S, B,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RK: tl.constexpr, FW: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr, BPP: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program = ``BT`` tokens x ``BPP`` consecutive samples (a dynamic loop), all heads.

    Per-program partials (one ``PART`` row: bias and gains, summed over the program's samples)
    and per-(token, sample chunk) ``[dcos | dsin]`` rows of ``CS [chunks, s, d]`` are reduced by
    the launcher in a fixed order.
    """
    OFF_AK: tl.constexpr = H * RQ
    OFF_AV: tl.constexpr = OFF_AK + G * RK
    OFF_BQ: tl.constexpr = OFF_AV + G * RK
    OFF_BK: tl.constexpr = OFF_BQ + RQ * D
    OFF_BV: tl.constexpr = OFF_BK + RK * D
    HPG: tl.constexpr = H // G
    GW: tl.constexpr = (HPG + 2) * D
    LB: tl.constexpr = G * GW
    NPART: tl.constexpr = LB + 2 * D

    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    part_idx = pid_t * tl.num_programs(1) + pid_c
    t = pid_t * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    p = tl.arange(0, P)
    m2s = (t < S)[:, None]
    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2s, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2s, other=0.0)
    dcos = tl.zeros([BT, P], dtype=tl.float32)
    dsin = tl.zeros([BT, P], dtype=tl.float32)
    for j in range(BPP):
        bi = pid_c * BPP + j
        tmask = (t < S) & ((t * 0 + bi) < B)
        roff = _row_offsets(t64, bi, sF_s, sF_b, ALIGN)
        tok = t64 * B + bi
        dF_row = DF_ptr + tok * FW
        dcos, dsin = _prologue_bwd_side(
            F_ptr, roff, tok, tmask, sF_f, dF_row, part_idx, j, DQ_ptr, BIAS_ptr, GQ_ptr, RSQ_ptr, PART_ptr,
            cs, sn, dcos, dsin, H, D, P, RQ, 0, OFF_BQ, HPG, GW, 0, NPART, LB, HAS_BIAS, NORM_Q, True, BT, ALIGN,
            BPP)
        dcos, dsin = _prologue_bwd_side(
            F_ptr, roff, tok, tmask, sF_f, dF_row, part_idx, j, DK_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
            cs, sn, dcos, dsin, G, D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, NPART, LB + D, HAS_BIAS, NORM_K, True, BT,
            ALIGN, BPP)
        dcos, dsin = _prologue_bwd_side(
            F_ptr, roff, tok, tmask, sF_f, dF_row, part_idx, j, DV_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
            cs, sn, dcos, dsin, G, D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, NPART, LB + D, HAS_BIAS, False, False,
            BT, ALIGN, BPP)
        if BPP > 1:
            tl.debug_barrier()  # this iteration's partial stores before the next one's loads
    dp = (pid_c * S + t64)[:, None] * (2 * P) + p[None, :]
    tl.store(CS_ptr + dp, dcos, mask=m2s)
    tl.store(CS_ptr + dp + P, dsin, mask=m2s)


# ============================================================================ attention


@triton.jit
def _swa_tile_scores(q, K_ptr, V_ptr, n0, offs_m, offs_d, S, B, G, W, bi, g, qk_scale,
                     D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Key tile ``[n0, n0 + BN)`` of group ``g``, sample ``bi``: ``k, v [BN, D]``, the base-2
    scores ``s = qk_scale * q k^T [BM, BN]`` and the band mask ``0 <= i - j < W`` (keys < S)."""
    offs_n = n0 + tl.arange(0, BN)
    nmask = offs_n < S
    krow = (offs_n.to(tl.int64) * B + bi) * G + g
    k = tl.load(K_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(V_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    diff = offs_m[:, None] - offs_n[None, :]
    vis = (diff >= 0) & (diff < W) & nmask[None, :]
    return k, v, s, vis


@triton.jit
def _packed_rows(t0, h0, S, BM: tl.constexpr, PACK: tl.constexpr):
    """The packed row layout of the window family: row ``r`` of a ``BM``-row tile is token
    ``t0 + r // PACK`` of head ``h0 + r % PACK`` (``PACK = 1``: ``BM`` tokens of head ``h0``, a
    scalar). Returns ``(tok, head, rmask)``; ``rmask`` drops tokens ``>= S`` and, when ``PACK`` does
    not divide ``BM``, the padding rows past ``(BM // PACK) * PACK`` (their token belongs to the
    next tile)."""
    r = tl.arange(0, BM)
    if PACK == 1:
        tok = t0 + r
        head = h0
        rmask = tok < S
    else:
        tok = t0 + r // PACK
        head = h0 + r % PACK
        rmask = (r < (BM // PACK) * PACK) & (tok < S)
    return tok, head, rmask


@triton.jit
def _swa_rows(pid_m, pid_bh, S, H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, PACK: tl.constexpr):
    """The query rows of a forward / dq program: ``PACK`` heads of one KV group packed into ``BM``
    rows (:func:`_packed_rows`; ``PACK = 1``: ``BM`` tokens of one head). Returns
    ``(bi, g, h0, head, t0, tok, rmask)``: sample, group, first head, the per-row head (a scalar
    when ``PACK = 1``), first token, per-row token and valid rows."""
    HPG: tl.constexpr = H // G
    BT: tl.constexpr = BM // PACK  # tokens per program
    NHB: tl.constexpr = H // PACK  # head blocks per sample
    bi = pid_bh // NHB
    h0 = (pid_bh % NHB) * PACK
    g = h0 // HPG
    t0 = pid_m * BT
    tok, head, rmask = _packed_rows(t0, h0, S, BM, PACK)
    return bi, g, h0, head, t0, tok, rmask


@triton.jit
def _swa_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, SINK_ptr, O_ptr, L_ptr,
    S, B, W, qk_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, PACK: tl.constexpr,
):
    """One program = ``BM`` query rows (``BM / PACK`` tokens x ``PACK`` heads of one group, see
    :func:`_swa_rows`) of one sample; visits only the KV tiles of the band. The online-softmax
    state starts with the sink counted (``m = sink``, ``l = 1``, acc 0: a virtual first key of
    value 0), so the stored LSE includes the sink."""
    BT: tl.constexpr = BM // PACK
    bi, g, h0, head, t0, tok, rmask = _swa_rows(tl.program_id(0), tl.program_id(1), S, H, G, BM, PACK)
    offs_d = tl.arange(0, D)
    qrow = (tok.to(tl.int64) * B + bi) * H + head
    q = tl.load(Q_ptr + qrow[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0)
    sink2 = tl.load(SINK_ptr + head).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BM], dtype=tl.float32) + sink2
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc = tl.zeros([BM, D], dtype=tl.float32)
    lo = tl.maximum(t0 - W + 1, 0) // BN * BN
    hi = tl.minimum(t0 + BT, S)
    for n0 in range(lo, hi, BN):
        k, v, s, vis = _swa_tile_scores(q, K_ptr, V_ptr, n0, tok, offs_d, S, B, G, W, bi, g,
                                        qk_scale, D, BN, IEEE)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # m_new is -inf only for a sink of -inf (no sink) before the row's first visible key: take
        # the exponents from 0 there (alpha = p = 0), not -inf - -inf = NaN
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        pr = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + _dot(pr.to(v.dtype), v, IEEE)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows with a sink of -inf reach 0
    out = acc / l_i[:, None]
    tl.store(O_ptr + qrow[:, None] * D + offs_d[None, :], out.to(O_ptr.dtype.element_ty), mask=rmask[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(L_ptr + (bi * H + head).to(tl.int64) * S + tok, lse, mask=rmask)


@triton.jit
def _swa_bwd_tile(q, do, lse2, K_ptr, V_ptr, n0, offs_m, mmask, offs_d, S, B, G, W, bi, g, qk_scale,
                  D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """One key tile ``[n0, n0 + BN)`` of a dq program: ``(k, P, dP)`` with ``P [BM, BN]`` fp32
    (0 outside the band ``0 <= i - j < W``) and ``dP = dO V^T``."""
    k, v, s, vis = _swa_tile_scores(q, K_ptr, V_ptr, n0, offs_m, offs_d, S, B, G, W, bi, g,
                                    qk_scale, D, BN, IEEE)
    pr = tl.where(vis & mmask[:, None], tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    return k, pr, dp


@triton.jit
def _swa_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, DO_ptr, L_ptr, DLSE_ptr, SINK_ptr,
    DQ_ptr, DELTA_ptr, DSINK_part,
    S, B, W, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, RECOMPUTE_DELTA: tl.constexpr,
    HAS_DLSE: tl.constexpr, PACK: tl.constexpr,
):
    """dq of ``BM`` query rows (``BM / PACK`` tokens x ``PACK`` heads of one group, see
    :func:`_swa_rows`) of one sample; also ``delta`` (stored for the dkv kernel) and the program's
    partial of ``dsink_h = -sum_i exp(sink_h - L_i) * delta_i`` for each of its heads.

    ``RECOMPUTE_DELTA``: ``delta = rowsum(P * dP)`` over the band in a first pass (exactly the
    quantity ``dS`` needs, from the same fp32 ``P`` and ``dP`` as the second pass; ``O`` is not
    read). Otherwise ``dq``'s ``dS`` takes ``rowsum(dO * O)`` from the stored ``O`` (the
    FlashAttention-2 way, enough where rows see many keys: see :func:`swa_bwd`), and the loop
    accumulates the exact ``rowsum(P * dP)`` along the way for what it stores: the ``delta`` of
    the dkv kernel and the sink term (``dsink`` sums ``delta``'s error over all rows; from a 16-bit
    ``O`` it was 1.7-4.4x the fp32-math reference's error in the interpreter). ``HAS_DLSE``: a
    gradient ``dL`` flowing into the LSE enters as ``delta - dL`` (``dS = P (dP - delta + dL)``;
    also in the stored ``delta`` and the sink term).
    """
    BT: tl.constexpr = BM // PACK
    pid_m = tl.program_id(0)
    bi, g, h0, head, t0, tok, rmask = _swa_rows(pid_m, tl.program_id(1), S, H, G, BM, PACK)
    offs_d = tl.arange(0, D)
    qrow = (tok.to(tl.int64) * B + bi) * H + head
    qoff = qrow[:, None] * D + offs_d[None, :]
    q = tl.load(Q_ptr + qoff, mask=rmask[:, None], other=0.0)
    do = tl.load(DO_ptr + qoff, mask=rmask[:, None], other=0.0)
    lrow = (bi * H + head).to(tl.int64) * S + tok
    lse = tl.load(L_ptr + lrow, mask=rmask, other=0.0)
    lse2 = lse * 1.4426950408889634
    lo = tl.maximum(t0 - W + 1, 0) // BN * BN
    hi = tl.minimum(t0 + BT, S)
    if RECOMPUTE_DELTA:
        delta = tl.zeros([BM], dtype=tl.float32)
        for n0 in range(lo, hi, BN):
            k, pr, dp = _swa_bwd_tile(q, do, lse2, K_ptr, V_ptr, n0, tok, rmask, offs_d, S, B, G,
                                      W, bi, g, qk_scale, D, BN, IEEE)
            delta += tl.sum(pr * dp, axis=1)
    else:
        o = tl.load(O_ptr + qoff, mask=rmask[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)
    dl = tl.zeros([BM], dtype=tl.float32)
    if HAS_DLSE:
        dl = tl.load(DLSE_ptr + lrow, mask=rmask, other=0.0)
    delta -= dl
    exact = tl.zeros([BM], dtype=tl.float32)
    dq = tl.zeros([BM, D], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        k, pr, dp = _swa_bwd_tile(q, do, lse2, K_ptr, V_ptr, n0, tok, rmask, offs_d, S, B, G,
                                  W, bi, g, qk_scale, D, BN, IEEE)
        ds = pr * (dp - delta[:, None])
        if not RECOMPUTE_DELTA:
            exact += tl.sum(pr * dp, axis=1)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    if not RECOMPUTE_DELTA:
        delta = exact - dl
    tl.store(DELTA_ptr + lrow, delta, mask=rmask)
    sink = tl.load(SINK_ptr + head).to(tl.float32)
    psink = tl.where(rmask, tl.exp(sink - lse), 0.0) * delta
    # DSINK_part [programs along s, b, H]: one fixed-order partial per (program, head)
    prow = DSINK_part + (pid_m * B + bi) * H + h0
    if PACK == 1:
        tl.store(prow, -tl.sum(psink, axis=0))
    else:
        for hp in tl.static_range(PACK):
            tl.store(prow + hp, -tl.sum(tl.where(head == h0 + hp, psink, 0.0), axis=0))
    dq = dq * sm_scale
    tl.store(DQ_ptr + qoff, dq.to(DQ_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _swa_bwd_dkv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, L_ptr, DELTA_ptr,
    DK_ptr, DV_ptr,
    S, B, W, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, PACK: tl.constexpr,
):
    """dk, dv of ``BN`` keys of one (sample, group): loops over the group's heads and the query
    tiles ``[n0, n1 + W - 1)``, summing the heads in registers (no per-head fp32 dK/dV).

    ``PACK = 1``: query tiles of ``BM`` tokens of one head, ``dk``/``dv`` accumulated as
    ``[BN, D]`` (keys in the matrix unit's M dimension). ``PACK > 1``: query tiles of
    ``BM / PACK`` tokens x ``PACK`` heads (:func:`_packed_rows`) and the transposed
    accumulators ``dk^T = q^T dS``, ``dv^T = dO^T P`` ``[D, BN]``: M is the head dim, so a key
    tile of 16 or 32 still fills the M of a Hopper warpgroup MMA, and a short key tile wastes
    less of the band (keys ``[n0, n0 + BN)`` are seen by ``BN + W - 1`` query tokens)."""
    HPG: tl.constexpr = H // G
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    bi = pid_bg // G
    g = pid_bg % G
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    nmask = offs_n < S
    krow = (offs_n.to(tl.int64) * B + bi) * G + g
    koff = krow[:, None] * D + offs_d[None, :]
    k = tl.load(K_ptr + koff, mask=nmask[:, None], other=0.0)
    v = tl.load(V_ptr + koff, mask=nmask[:, None], other=0.0)
    hi = tl.minimum(n0 + BN + W - 1, S)
    if PACK == 1:
        dk = tl.zeros([BN, D], dtype=tl.float32)
        dv = tl.zeros([BN, D], dtype=tl.float32)
        lo = n0 // BM * BM
        for hh in range(HPG):
            h = g * HPG + hh
            bh = bi * H + h
            for m0 in range(lo, hi, BM):
                offs_m = m0 + tl.arange(0, BM)
                mmask = offs_m < S
                qrow = (offs_m.to(tl.int64) * B + bi) * H + h
                qoff = qrow[:, None] * D + offs_d[None, :]
                q = tl.load(Q_ptr + qoff, mask=mmask[:, None], other=0.0)
                do = tl.load(DO_ptr + qoff, mask=mmask[:, None], other=0.0)
                lse2 = tl.load(L_ptr + bh.to(tl.int64) * S + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA_ptr + bh.to(tl.int64) * S + offs_m, mask=mmask, other=0.0)
                st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BN, BM]
                diff = offs_m[None, :] - offs_n[:, None]
                vis = (diff >= 0) & (diff < W) & mmask[None, :] & nmask[:, None]
                pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
                dv += _dot(pt.to(do.dtype), do, IEEE)
                dpt = _dot(v, tl.trans(do), IEEE)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, IEEE)
        dk = dk * sm_scale
        tl.store(DK_ptr + koff, dk.to(DK_ptr.dtype.element_ty), mask=nmask[:, None])
        tl.store(DV_ptr + koff, dv.to(DV_ptr.dtype.element_ty), mask=nmask[:, None])
    else:
        BT: tl.constexpr = BM // PACK  # tokens per query tile
        dkt = tl.zeros([D, BN], dtype=tl.float32)
        dvt = tl.zeros([D, BN], dtype=tl.float32)
        lo = n0 // BT * BT
        for hc in range(HPG // PACK):
            for t0 in range(lo, hi, BT):
                tok, head, rmask = _packed_rows(t0, g * HPG + hc * PACK, S, BM, PACK)
                lbase = (bi * H + head).to(tl.int64) * S
                qoff = ((tok.to(tl.int64) * B + bi) * H + head)[:, None] * D + offs_d[None, :]
                q = tl.load(Q_ptr + qoff, mask=rmask[:, None], other=0.0)
                do = tl.load(DO_ptr + qoff, mask=rmask[:, None], other=0.0)
                lse2 = tl.load(L_ptr + lbase + tok, mask=rmask, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA_ptr + lbase + tok, mask=rmask, other=0.0)
                sc = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN]
                diff = tok[:, None] - offs_n[None, :]
                vis = (diff >= 0) & (diff < W) & rmask[:, None] & nmask[None, :]
                pr = tl.where(vis, tl.exp2(sc - lse2[:, None]), 0.0)
                dvt += _dot(tl.trans(do), pr.to(do.dtype), IEEE)  # [D, BN]
                dp = _dot(do, tl.trans(v), IEEE)
                ds = pr * (dp - delta[:, None])
                dkt += _dot(tl.trans(q), ds.to(q.dtype), IEEE)
        dkt = dkt * sm_scale
        kofft = krow[None, :] * D + offs_d[:, None]  # [D, BN]
        tl.store(DK_ptr + kofft, dkt.to(DK_ptr.dtype.element_ty), mask=nmask[None, :])
        tl.store(DV_ptr + kofft, dvt.to(DV_ptr.dtype.element_ty), mask=nmask[None, :])


# ============================================================================ launchers


# GPU tile choices (tokens per prologue program and its warps; attention tiles). Module-level so a
# benchmark can sweep them (benchmarks/tpa.py --tune); the interpreter always uses 16-wide
# tiles. Defaults = the choice of the H100 tuning runs recorded in benchmarks/results/tpa_notes.md
# (the attention forward's 64 x 32 tile: 116.9 / 116.3 vs 121.2 / 121.4 us for 64 x 64 in two
# runs, tpa_bench_h100_run5.json, tpa_bench_h100_run7_tune.json). The two backward kernels take
# their own tiles (``*_DQ``: ``BM`` query rows per program, ``BN`` keys per loop step; ``*_DKV``:
# ``BN`` keys per program, ``BM`` query rows per loop step).
# ``DELTA`` picks how the attention backward gets ``delta = rowsum(dO * O)`` (see swa_bwd);
# ``PACK_FWD`` / ``PACK_DQ`` / ``PACK_DKV`` pack the query heads of a KV group into the forward's /
# dq kernel's rows / the dk/dv kernel's query tiles (see swa_fwd). They apply under the
# interpreter too.
GPU_TILES = dict(BT_FWD=8, WARPS_FWD=4, BT_BWD=4, WARPS_BWD=1, BPP_BWD=1,
                 BM=64, BN=32, WARPS_ATTN=4, STAGES_ATTN=2, PACK_FWD=False,
                 BM_DQ=64, BN_DQ=64, WARPS_DQ=4, STAGES_DQ=2, PACK_DQ=False,
                 BM_DKV=64, BN_DKV=64, WARPS_DKV=4, STAGES_DKV=2, PACK_DKV=False, DELTA="auto")


def _blocks(kind: str = "attn"):
    """Tile sizes: small tiles under the interpreter (speed, edge coverage), ``GPU_TILES`` on GPU.
    ``kind``: ``prologue_fwd``, ``prologue_bwd``, ``attn`` (forward), ``attn_dq``, ``attn_dkv``."""
    t = GPU_TILES
    if _interpreting():
        blk = dict(BT=16, BM=16, BN=16, warps=1, stages=1, BPP=2)
    elif kind == "prologue_fwd":
        return dict(BT=t["BT_FWD"], warps=t["WARPS_FWD"])
    elif kind == "prologue_bwd":
        return dict(BT=t["BT_BWD"], warps=t["WARPS_BWD"], BPP=t["BPP_BWD"])
    elif kind == "attn":
        blk = dict(BM=t["BM"], BN=t["BN"], warps=t["WARPS_ATTN"], stages=t["STAGES_ATTN"])
    else:
        sfx = {"attn_dq": "DQ", "attn_dkv": "DKV"}[kind]
        blk = dict(BM=t["BM_" + sfx], BN=t["BN_" + sfx], warps=t["WARPS_" + sfx], stages=t["STAGES_" + sfx])
    pack_key = {"attn": "PACK_FWD", "attn_dq": "PACK_DQ", "attn_dkv": "PACK_DKV"}.get(kind)
    if pack_key is not None:
        blk["pack"] = bool(t[pack_key])
    return blk


def _pack(blk: dict, H: int, G: int) -> int:
    """Query heads per forward / dq program, or per query tile of a dk/dv program:
    :func:`vpmoe_compile._triton.default_pack` of the group when ``blk["pack"]`` (at most ``BM``
    rows), else 1."""
    return default_pack(H // G, blk["BM"]) if blk.get("pack") else 1


# The attention kernels' shared memory grows with (BM + BN) * d * element size. At most the
# footprint of 64 x 64 tiles at d = 256 in bf16 (~197 KB of the H100's 227 KB per block, sm_90
# compile as in benchmarks/tpa_static.py) is allowed; above it (fp32 at d = 256: ~279 KB) the tiles
# are halved (fp32 at d = 256: 32 x 32, ~135 KB). The vpMoE shape (bf16, d = 128) is not affected.
_ATTN_TILE_BUDGET = (64 + 64) * 256 * 2


def _fit_attention_tiles(blk: dict, head_dim: int, elem_bytes: int) -> dict:
    """``blk`` with ``BM``/``BN`` halved until the tiles fit :data:`_ATTN_TILE_BUDGET` (GPU only)."""
    if _interpreting():
        return blk
    bm, bn = blk["BM"], blk["BN"]
    while (bm + bn) * head_dim * elem_bytes > _ATTN_TILE_BUDGET and max(bm, bn) > 16:
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    return dict(blk, BM=bm, BN=bn)


def _check_dims(head_dim: int, q_rank: int = 1, kv_rank: int = 1):
    P = head_dim // 2
    if head_dim % 2 or P < 16 or (P & (P - 1)):
        raise ValueError(f"triton TPA kernels need head_dim/2 to be a power of two >= 16, got head_dim={head_dim}")
    if max(q_rank, kv_rank) > 4:
        raise ValueError(f"triton TPA prologue supports ranks <= 4, got q_rank={q_rank}, kv_rank={kv_rank}")


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_supported(shapes, dtype=None, device=None) -> None:
    """Raise (``RuntimeError`` / ``TypeError`` / ``ValueError``, naming the limit) unless the
    kernels run ``shapes = {"head_dim": d, "q_rank": Rq, "kv_rank": R}`` in ``dtype`` on
    ``device``: a CUDA device or the CPU under ``TRITON_INTERPRET=1``, fp32 / bf16 / fp16,
    ``d/2`` a power of two >= 16, ranks <= 4. ``None`` is not judged."""
    dev = device if device is None or isinstance(device, torch.device) else torch.device(device)
    if dev is not None and dev.type != "cuda" and not _interpreting():
        raise RuntimeError(
            "backend='triton' on a non-CUDA device needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton kernels, or use backend='reference'"
        )
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes fp32/bf16/fp16 factors, got {dtype}; use backend='reference' "
                        "for float64")
    if "head_dim" in shapes:
        _check_dims(shapes["head_dim"], shapes.get("q_rank", 1), shapes.get("kv_rank", 1))


def supports(shapes, dtype=None, device=None) -> bool:
    """Whether :func:`check_supported` accepts the arguments (the kernel policy asks this)."""
    try:
        check_supported(shapes, dtype, device)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def factors_aligned(factors: torch.Tensor, H: int, G: int, Rq: int, R: int) -> bool:
    """Whether every B-factor row segment of ``factors [s, b, F]`` starts 16-byte aligned with unit
    column stride (the prologue kernels then use vectorised loads; ``ALIGN``)."""
    e = factors.element_size()
    n = max(1, 16 // e)  # elements per 16 bytes
    off_bq = factor_offsets(H, G, 0, Rq, R)["b_q"]  # after the A blocks: independent of head_dim
    # (B_k and B_v follow at multiples of d >= 32 elements, so they are aligned when B_q is)
    return (factors.stride(2) == 1 and factors.stride(0) % n == 0 and factors.stride(1) % n == 0
            and factors.data_ptr() % 16 == 0 and off_bq % n == 0)


def _align(factors, H, G, Rq, R) -> int:
    """The prologue kernels' ``ALIGN``: elements per 16 bytes if :func:`factors_aligned`, else 1."""
    return max(1, 16 // factors.element_size()) if factors_aligned(factors, H, G, Rq, R) else 1


def prologue_fwd(factors, qkv_bias, gamma_q, gamma_k, cos, sin, *, H, G, d, Rq, R, eps, act_dtype):
    """Factors -> (q, k, v, rstd_q, rstd_k).

    Args:
        factors: ``[s, b, F]`` (any strides).
        qkv_bias: ``[G*(H/G+2)*d]`` contiguous, Megatron's interleaved layout, or None.
        gamma_q, gamma_k: ``[d]`` contiguous or None (no norm on that side).
        cos, sin: ``[s, d/2]`` fp32 contiguous.

    Returns:
        ``q [s,b,H,d]``, ``k``/``v`` ``[s,b,G,d]`` in ``act_dtype``; ``rstd_q [s,b,H]``,
        ``rstd_k [s,b,G]`` fp32 (empty when that side has no norm).
    """
    _check_dims(d, Rq, R)
    s, b, _ = factors.shape
    dev = factors.device
    q = torch.empty(s, b, H, d, device=dev, dtype=act_dtype)
    k = torch.empty(s, b, G, d, device=dev, dtype=act_dtype)
    v = torch.empty(s, b, G, d, device=dev, dtype=act_dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    rs_q = torch.empty(s, b, H, **f32) if gamma_q is not None else torch.empty(0, **f32)
    rs_k = torch.empty(s, b, G, **f32) if gamma_k is not None else torch.empty(0, **f32)
    dummy = cos
    blk = _blocks("prologue_fwd")
    grid = (triton.cdiv(s, blk["BT"]), b)
    _tpa_prologue_fwd_kernel[grid](
        factors, factors.stride(0), factors.stride(1), factors.stride(2),
        qkv_bias if qkv_bias is not None else dummy,
        gamma_q if gamma_q is not None else dummy, gamma_k if gamma_k is not None else dummy,
        cos, sin, q, k, v, rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
        s, b, float(eps),
        H=H, G=G, D=d, P=d // 2, RQ=Rq, RK=R,
        HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
        BT=blk["BT"], ALIGN=_align(factors, H, G, Rq, R), num_warps=blk["warps"],
    )
    return q, k, v, rs_q, rs_k


def prologue_bwd(dq, dk, dv, factors, qkv_bias, gamma_q, gamma_k, rs_q, rs_k, cos, sin, *, H, G, d, Rq, R):
    """Backward of :func:`prologue_fwd`.

    The kernel writes ``dfactors`` completely, one row per program (``BT`` tokens x ``BPP``
    samples) of fp32 partials ``[dqkv_bias (interleaved) | dgamma_q | dgamma_k]`` and
    ``[dcos | dsin]`` per token and sample chunk; PyTorch then sums them in a fixed order
    (deterministic, no atomics).

    Args:
        dq: ``[s,b,H,d]``, dk, dv: ``[s,b,G,d]`` contiguous (gradients of the prologue outputs);
        the other arguments as for :func:`prologue_fwd`, plus its ``rstd_q``/``rstd_k``.

    Returns:
        ``dfactors [s,b,F]`` (factors dtype, contiguous), ``dqkv_bias [G*(H/G+2)*d]`` (None without
        bias), ``dgamma_q``, ``dgamma_k`` ``[d]`` (None without norm), ``dcos``, ``dsin``
        ``[s, d/2]``; parameter gradients in fp32.
    """
    s, b, Fw = factors.shape
    dev = factors.device
    blk = _blocks("prologue_bwd")
    BT, BPP = blk["BT"], min(blk["BPP"], b)
    nT = triton.cdiv(s, BT)
    nC = triton.cdiv(b, BPP)
    P = d // 2
    LB = G * (H // G + 2) * d
    f32 = dict(device=dev, dtype=torch.float32)
    dF = torch.empty(s, b, Fw, device=dev, dtype=factors.dtype)
    part = torch.empty(nT * nC, LB + 2 * d, **f32)
    cs_part = torch.empty(nC, s, 2 * P, **f32)
    dummy = cos

    def _or(x):
        return x if x is not None else dummy

    _tpa_prologue_bwd_kernel[(nT, nC)](
        factors, factors.stride(0), factors.stride(1), factors.stride(2), dF,
        dq, dk, dv,
        _or(qkv_bias), _or(gamma_q), _or(gamma_k),
        rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
        cos, sin, part, cs_part,
        s, b,
        H=H, G=G, D=d, P=P, RQ=Rq, RK=R, FW=Fw,
        HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
        BT=BT, BPP=BPP, ALIGN=_align(factors, H, G, Rq, R), num_warps=blk["warps"],
    )
    # fixed-order reductions, one launch per buffer over its full contiguous rows; the pieces are
    # copied apart (the op may not return aliasing tensors)
    tot = part.sum(0)
    dbias = tot[:LB] if qkv_bias is not None else None
    dgq = tot[LB:LB + d].clone() if gamma_q is not None else None
    dgk = tot[LB + d:].clone() if gamma_k is not None else None
    cs = cs_part.sum(0)
    return dF, dbias, dgq, dgk, cs[:, :P].contiguous(), cs[:, P:].clone(memory_format=torch.contiguous_format)


def _band(window: int, s: int) -> int:
    """The window the kernels take: ``min(window, s)`` (a window of ``s`` or more is plain causal
    within the sequence), so their int32 band bounds (``n0 + BN + W - 1``) cannot overflow for a
    huge ``window``."""
    return max(1, min(int(window), int(s)))


def swa_fwd(q, k, v, sink, window: int, softmax_scale: float):
    """Sliding-window sink attention forward on materialised tensors: the library's one
    sliding-window kernel family (the fused TPA op's attention middle and the Triton path of
    :func:`vpmoe_compile.ops.sink_attention.window_sink_attention`). Key ``j`` is visible to query
    ``i`` iff ``0 <= i - j <= window - 1``; no ALiBi. ``sink`` may be ``-inf`` (no sink).

    A program owns ``BM`` query rows and loops over the KV tiles of their band. Without packing
    they are ``BM`` tokens of one head: at ``W = 128`` a 64-token block spans 191 keys, six
    32-key tiles, of which two thirds are inside the band. With ``GPU_TILES["PACK_FWD"]`` (for the
    dq kernel ``PACK_DQ``) the rows are ``BM / pack`` tokens x ``pack`` heads of one KV group
    (FlashAttention-3's PackGQA, as the full-causal kernels do; ``pack`` from
    :func:`vpmoe_compile._triton.default_pack`): 16 tokens x 4 heads span 143 keys, five 32-key
    tiles (80 % inside the band), and each K/V tile is loaded once for the group's heads.

    Args:
        q: ``[s,b,H,d]``, k, v: ``[s,b,G,d]`` (made contiguous); sink ``[H]``.

    Returns:
        ``o [s,b,H,d]`` (q dtype), ``lse [b,H,s]`` fp32 (natural log, sink-inclusive).
    """
    out_dtype = q.dtype
    # The interpreter's 16-bit tl.dot is wrong and its fp32 -> 16-bit stores truncate (the GPU
    # rounds to nearest even): there the kernel computes and stores in fp32 and torch rounds o, so
    # the backward sees a 16-bit o rounded as on the GPU.
    emulate_store = _interpreting() and q.dtype != torch.float32
    if emulate_store:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s, b, H, d = q.shape
    G = k.shape[2]
    blk = _fit_attention_tiles(_blocks(), d, q.element_size())
    pack = _pack(blk, H, G)
    o = torch.empty(s, b, H, d, device=q.device, dtype=torch.float32 if emulate_store else out_dtype)
    lse = torch.empty(b, H, s, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(s, blk["BM"] // pack), b * (H // pack))
    _swa_fwd_kernel[grid](
        q, k, v, sink.contiguous(), o, lse, s, b, _band(window, s), float(softmax_scale) * LOG2E,
        H=H, G=G, D=d, BM=blk["BM"], BN=blk["BN"], IEEE=ieee_fp32(q.dtype), PACK=pack,
        num_warps=blk["warps"], num_stages=blk["stages"],
    )
    return (o.to(out_dtype) if emulate_store else o), lse


def swa_bwd(do, q, k, v, o, lse, sink, window: int, softmax_scale: float, dlse=None):
    """Backward of :func:`swa_fwd`.

    ``delta = rowsum(dO * O)`` enters ``dS = P (dP - delta)``. From a 16-bit ``o`` this cancels
    catastrophically where one key holds almost all of a row's mass (window 1, the first row,
    peaked attention): at W = 1 dq/dk were 2.5-2.7x less accurate than a PyTorch implementation
    with bf16 inputs and fp32 math (H100). So where rows see few keys
    (:func:`vpmoe_compile._triton.needs_exact_delta`: at most 8 on average, the rule the
    full-causal kernels follow with their output residual) the dq kernel recomputes
    ``delta = rowsum(P * dP)`` over the band in a first pass: the exact quantity ``dS`` needs, from
    the same fp32 ``P``, ``dP``; two extra dots per KV tile, ``o`` is not read and the forward
    saves nothing extra. With more keys per row the rounding averages out and ``delta`` comes from
    ``o``: at the vpMoE shape (``W = 128``) the recomputation cost 53 us of a 385 us backward on
    the H100 (``benchmarks/tpa.py --tune``, ``attn_bwd_delta``). An fp32 ``o`` always gives
    ``delta`` from ``o``. ``GPU_TILES["DELTA"]``: ``"auto"`` (that rule), ``"recompute"`` or
    ``"output"`` (force one; tests, benchmarks).

    Args:
        do: ``[s,b,H,d]``; q, k, v, o, lse, sink as for/from :func:`swa_fwd`.
        dlse: optional ``[b,H,s]``, a gradient flowing into the (sink-inclusive) LSE; it enters
            as ``delta - dlse``.

    Returns:
        ``dq [s,b,H,d]``, ``dk``, ``dv`` ``[s,b,G,d]`` (q dtype) and ``dsink [H]`` fp32
        (fixed-order sum of per-program partials).
    """
    dtypes = (q.dtype, k.dtype, v.dtype)
    if _interpreting() and q.dtype != torch.float32:  # the interpreter's 16-bit tl.dot is wrong
        q, k, v, do = q.float(), k.float(), v.float(), do.float()
    q, k, v, do, o = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), o.contiguous()
    lse = lse.contiguous().float()
    dlse_t = dlse.contiguous().float() if dlse is not None else lse  # a dummy pointer when absent
    s, b, H, d = q.shape
    G = k.shape[2]
    bq = _fit_attention_tiles(_blocks("attn_dq"), d, q.element_size())
    bkv = _fit_attention_tiles(_blocks("attn_dkv"), d, q.element_size())
    pack = _pack(bq, H, G)
    ieee = ieee_fp32(q.dtype)
    mode = GPU_TILES["DELTA"]
    if mode not in ("auto", "recompute", "output"):
        raise ValueError(f"GPU_TILES['DELTA'] must be auto|recompute|output, got {mode!r}")
    recompute = mode == "recompute" or (mode == "auto" and o.dtype != torch.float32
                                        and needs_exact_delta(s, window))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(b, H, s, device=q.device, dtype=torch.float32)
    nM = triton.cdiv(s, bq["BM"] // pack)
    dsink_part = torch.empty(nM, b, H, device=q.device, dtype=torch.float32)
    qk_scale = float(softmax_scale) * LOG2E
    _swa_bwd_dq_kernel[(nM, b * (H // pack))](
        q, k, v, o, do, lse, dlse_t, sink.contiguous(), dq, delta, dsink_part,
        s, b, _band(window, s), qk_scale, float(softmax_scale),
        H=H, G=G, D=d, BM=bq["BM"], BN=bq["BN"], IEEE=ieee, RECOMPUTE_DELTA=recompute,
        HAS_DLSE=dlse is not None, PACK=pack, num_warps=bq["warps"], num_stages=bq["stages"],
    )
    _swa_bwd_dkv_kernel[(triton.cdiv(s, bkv["BN"]), b * G)](
        q, k, v, do, lse, delta, dk, dv,
        s, b, _band(window, s), qk_scale, float(softmax_scale),
        H=H, G=G, D=d, BM=bkv["BM"], BN=bkv["BN"], IEEE=ieee, PACK=_pack(bkv, H, G),
        num_warps=bkv["warps"], num_stages=bkv["stages"],
    )
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dsink_part.sum(dim=(0, 1))
