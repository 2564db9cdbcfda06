"""Triton kernels of the TPA local-attention op (bring-up design, spec 5.4 last paragraph).

Pipeline (forward): ``prologue`` (factors -> q, k, v rows, all heads of a token block:
contraction, exact ``/R``, bias, QK RMSNorm, fp32 GRAPE-M rotation; saves ``rstd``) ->
``attention`` (sliding-window flash attention with a learnable sink, GQA, on the
materialised q/k/v). Backward: ``attention dq`` (also ``D = rowsum(dO*O)`` and the sink
partials) -> ``attention dkv`` (the 4 heads of a group summed in registers) ->
``prologue backward`` (dq, dk, dv -> dfactors, and fixed-order partials of dbias, dgamma,
dcos, dsin). All parameter-gradient reductions are per-program partials summed in a fixed
order by PyTorch afterwards: deterministic, no atomics.

Layouts (Megatron, sequence first; token ``(t, bi)`` is row ``t*b + bi``):
``factors [s, b, F]`` (any strides), ``q [s, b, H, d]``, ``k``/``v`` ``[s, b, G, d]``,
``o [s, b, H, d]``, ``lse``/``delta`` ``[b, H, s]`` fp32 (natural log, sink-inclusive),
``cos``/``sin`` ``[s, d/2]`` fp32, ``rstd_q [s, b, H]``, ``rstd_k [s, b, G]`` fp32.

Precision: fp32 for contraction, RMS, rotation, logits, softmax state and accumulators;
``tl.dot`` operands in the activation dtype (bf16 on GPU; fp32 with IEEE precision for the
interpreter tests). Requires ``d/2`` to be a power of two >= 16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ============================================================================ prologue


@triton.jit
def _load_b3(row_ptr, tmask, sF_f, OFF: tl.constexpr, RANK: tl.constexpr, RANKP: tl.constexpr,
             D: tl.constexpr, P: tl.constexpr):
    """B factor halves of a token block as ``[BT, RANKP, P]`` fp32 (padding ranks are 0)."""
    r = tl.arange(0, RANKP)
    p = tl.arange(0, P)
    cols = OFF + r[None, :, None] * D + p[None, None, :]
    mask = tmask[:, None, None] & (r < RANK)[None, :, None]
    ptr = row_ptr[:, None, None] + cols.to(tl.int64) * sF_f
    b1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    b2 = tl.load(ptr + P * sF_f, mask=mask, other=0.0).to(tl.float32)
    return b1, b2


@triton.jit
def _load_a(row_ptr, tmask, sF_f, OFF: tl.constexpr, RANK: tl.constexpr, RANKP: tl.constexpr):
    """A factor entries ``[BT, RANKP]`` fp32 of one head/group (columns ``OFF + r``)."""
    r = tl.arange(0, RANKP)
    mask = tmask[:, None] & (r < RANK)[None, :]
    return tl.load(row_ptr[:, None] + (OFF + r[None, :]).to(tl.int64) * sF_f, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tpa_prologue_fwd_kernel(
    F_ptr, sF_s, sF_b, sF_f,
    BIAS_ptr, GQ_ptr, GK_ptr,
    COS_ptr, SIN_ptr,
    Q_ptr, K_ptr, V_ptr, RSQ_ptr, RSK_ptr,
    S, B, eps,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RQP: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr,
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
    row = F_ptr + t64 * sF_s + bi * sF_b
    tok = t64 * B + bi  # row index in [s*b]
    p = tl.arange(0, P)
    m2 = tmask[:, None]

    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)

    # ---------------- queries: all H heads share B_q
    b1, b2 = _load_b3(row, tmask, sF_f, OFF_BQ, RQ, RQP, D, P)
    if NORM_Q:
        gq1 = tl.load(GQ_ptr + p).to(tl.float32)
        gq2 = tl.load(GQ_ptr + P + p).to(tl.float32)
    for h in tl.static_range(H):
        a = _load_a(row, tmask, sF_f, h * RQ, RQ, RQP)
        x1 = tl.sum(a[:, :, None] * b1, axis=1) / RQ
        x2 = tl.sum(a[:, :, None] * b2, axis=1) / RQ
        if HAS_BIAS:
            cq = BIAS_ptr + (h // HPG) * GW + (h % HPG) * D
            x1 += tl.load(cq + p).to(tl.float32)[None, :]
            x2 += tl.load(cq + P + p).to(tl.float32)[None, :]
        if NORM_Q:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
            tl.store(RSQ_ptr + tok * H + h, rstd, mask=tmask)
            x1 = x1 * rstd[:, None] * gq1[None, :]
            x2 = x2 * rstd[:, None] * gq2[None, :]
        y1 = x1 * cs - x2 * sn
        y2 = x2 * cs + x1 * sn
        qp = Q_ptr + (tok * H + h)[:, None] * D + p[None, :]
        tl.store(qp, y1.to(Q_ptr.dtype.element_ty), mask=m2)
        tl.store(qp + P, y2.to(Q_ptr.dtype.element_ty), mask=m2)

    # ---------------- keys
    b1, b2 = _load_b3(row, tmask, sF_f, OFF_BK, RK, RKP, D, P)
    if NORM_K:
        gk1 = tl.load(GK_ptr + p).to(tl.float32)
        gk2 = tl.load(GK_ptr + P + p).to(tl.float32)
    for g in tl.static_range(G):
        a = _load_a(row, tmask, sF_f, OFF_AK + g * RK, RK, RKP)
        x1 = tl.sum(a[:, :, None] * b1, axis=1) / RK
        x2 = tl.sum(a[:, :, None] * b2, axis=1) / RK
        if HAS_BIAS:
            ck = BIAS_ptr + g * GW + HPG * D
            x1 += tl.load(ck + p).to(tl.float32)[None, :]
            x2 += tl.load(ck + P + p).to(tl.float32)[None, :]
        if NORM_K:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
            tl.store(RSK_ptr + tok * G + g, rstd, mask=tmask)
            x1 = x1 * rstd[:, None] * gk1[None, :]
            x2 = x2 * rstd[:, None] * gk2[None, :]
        y1 = x1 * cs - x2 * sn
        y2 = x2 * cs + x1 * sn
        kp = K_ptr + (tok * G + g)[:, None] * D + p[None, :]
        tl.store(kp, y1.to(K_ptr.dtype.element_ty), mask=m2)
        tl.store(kp + P, y2.to(K_ptr.dtype.element_ty), mask=m2)

    # ---------------- values (no norm, no rotation)
    b1, b2 = _load_b3(row, tmask, sF_f, OFF_BV, RK, RKP, D, P)
    for g in tl.static_range(G):
        a = _load_a(row, tmask, sF_f, OFF_AV + g * RK, RK, RKP)
        x1 = tl.sum(a[:, :, None] * b1, axis=1) / RK
        x2 = tl.sum(a[:, :, None] * b2, axis=1) / RK
        if HAS_BIAS:
            cv = BIAS_ptr + g * GW + (HPG + 1) * D
            x1 += tl.load(cv + p).to(tl.float32)[None, :]
            x2 += tl.load(cv + P + p).to(tl.float32)[None, :]
        vp = V_ptr + (tok * G + g)[:, None] * D + p[None, :]
        tl.store(vp, x1.to(V_ptr.dtype.element_ty), mask=m2)
        tl.store(vp + P, x2.to(V_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _prologue_bwd_side(
    row, tok, tmask, sF_f, dF_row, part_idx,
    DX_ptr, BIAS_ptr, GM_ptr, RS_ptr, PART_ptr,
    cs, sn, dcos, dsin,
    NH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr, RANKP: tl.constexpr,
    OFF_A: tl.constexpr, OFF_B: tl.constexpr,
    NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr, NPART: tl.constexpr, OFF_DG: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr, BT: tl.constexpr,
):
    """Backward of one side (q, k or v) of the prologue for a token block.

    Writes dA (per head) and dB (summed over heads) into dF, the per-program partials of the
    bias (at its interleaved offset ``(h // NPG)*GW + (h % NPG + SLOT)*D``) and gain (at
    ``OFF_DG``) gradients into row ``part_idx`` of ``PART [programs, NPART]``, and returns the
    updated per-token ``dcos``/``dsin`` accumulators.
    """
    p = tl.arange(0, P)
    r = tl.arange(0, RANKP)
    m2 = tmask[:, None]
    b1, b2 = _load_b3(row, tmask, sF_f, OFF_B, RANK, RANKP, D, P)
    db1 = tl.zeros([BT, RANKP, P], dtype=tl.float32)
    db2 = tl.zeros([BT, RANKP, P], dtype=tl.float32)
    if NORM:
        g1 = tl.load(GM_ptr + p).to(tl.float32)
        g2 = tl.load(GM_ptr + P + p).to(tl.float32)
        dg1 = tl.zeros([P], dtype=tl.float32)
        dg2 = tl.zeros([P], dtype=tl.float32)
    for h in tl.static_range(NH):
        a = _load_a(row, tmask, sF_f, OFF_A + h * RANK, RANK, RANKP)
        gp = DX_ptr + (tok * NH + h)[:, None] * D + p[None, :]
        u1 = tl.load(gp, mask=m2, other=0.0).to(tl.float32)
        u2 = tl.load(gp + P, mask=m2, other=0.0).to(tl.float32)
        if ROTATE or NORM:
            x1 = tl.sum(a[:, :, None] * b1, axis=1) / RANK
            x2 = tl.sum(a[:, :, None] * b2, axis=1) / RANK
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
            dg1 += tl.sum(u1 * n1, axis=0)
            dg2 += tl.sum(u2 * n2, axis=0)
            dn1 = u1 * g1[None, :]
            dn2 = u2 * g2[None, :]
            mdot = (tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / D
            u1 = (dn1 - n1 * mdot[:, None]) * rstd[:, None]
            u2 = (dn2 - n2 * mdot[:, None]) * rstd[:, None]
        u1 = tl.where(m2, u1, 0.0)
        u2 = tl.where(m2, u2, 0.0)
        if HAS_BIAS:
            dcp = PART_ptr + part_idx * NPART + (h // NPG) * GW + (h % NPG + SLOT) * D + p
            tl.store(dcp, tl.sum(u1, axis=0))
            tl.store(dcp + P, tl.sum(u2, axis=0))
        # contraction backward
        da = (tl.sum(u1[:, None, :] * b1, axis=2) + tl.sum(u2[:, None, :] * b2, axis=2)) / RANK
        tl.store(dF_row[:, None] + (OFF_A + h * RANK + r[None, :]), da.to(dF_row.dtype.element_ty),
                 mask=m2 & (r < RANK)[None, :])
        db1 += a[:, :, None] * u1[:, None, :]
        db2 += a[:, :, None] * u2[:, None, :]
    db1 = db1 / RANK
    db2 = db2 / RANK
    cols = OFF_B + r[None, :, None] * D + p[None, None, :]
    mask3 = tmask[:, None, None] & (r < RANK)[None, :, None]
    tl.store(dF_row[:, None, None] + cols, db1.to(dF_row.dtype.element_ty), mask=mask3)
    tl.store(dF_row[:, None, None] + cols + P, db2.to(dF_row.dtype.element_ty), mask=mask3)
    if NORM:
        tl.store(PART_ptr + part_idx * NPART + OFF_DG + p, dg1)
        tl.store(PART_ptr + part_idx * NPART + OFF_DG + P + p, dg2)
    return dcos, dsin


@triton.jit
def _tpa_prologue_bwd_kernel(
    F_ptr, sF_s, sF_b, sF_f, DF_ptr,
    DQ_ptr, DK_ptr, DV_ptr,
    BIAS_ptr, GQ_ptr, GK_ptr, RSQ_ptr, RSK_ptr,
    COS_ptr, SIN_ptr,
    PART_ptr, CS_tok,
    S, B,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RQP: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr,
    FW: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr,
):
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
    bi = tl.program_id(1)
    part_idx = pid_t * B + bi
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < S
    t64 = t.to(tl.int64)
    row = F_ptr + t64 * sF_s + bi * sF_b
    tok = t64 * B + bi
    dF_row = DF_ptr + tok * FW
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    dcos = tl.zeros([BT, P], dtype=tl.float32)
    dsin = tl.zeros([BT, P], dtype=tl.float32)

    dcos, dsin = _prologue_bwd_side(
        row, tok, tmask, sF_f, dF_row, part_idx, DQ_ptr, BIAS_ptr, GQ_ptr, RSQ_ptr, PART_ptr,
        cs, sn, dcos, dsin, H, D, P, RQ, RQP, 0, OFF_BQ, HPG, GW, 0, NPART, LB,
        HAS_BIAS, NORM_Q, True, BT)
    dcos, dsin = _prologue_bwd_side(
        row, tok, tmask, sF_f, dF_row, part_idx, DK_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
        cs, sn, dcos, dsin, G, D, P, RK, RKP, OFF_AK, OFF_BK, 1, GW, HPG, NPART, LB + D,
        HAS_BIAS, NORM_K, True, BT)
    dcos, dsin = _prologue_bwd_side(
        row, tok, tmask, sF_f, dF_row, part_idx, DV_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
        cs, sn, dcos, dsin, G, D, P, RK, RKP, OFF_AV, OFF_BV, 1, GW, HPG + 1, NPART, LB + D,
        HAS_BIAS, False, False, BT)
    dp = (tok[:, None] * (2 * P) + p[None, :])
    tl.store(CS_tok + dp, dcos, mask=m2)
    tl.store(CS_tok + dp + P, dsin, mask=m2)


# ---------------------------------------------------------------------------- 2-D prologue
# The default prologue kernels keep every tile 2-D ([tokens, d/2]); ranks (<= 4) are unrolled at
# compile time, so no 3-D tile and no layout conversion is needed (the 3-D kernels above spill on
# the GPU). A tile of an absent rank aliases rank 0 and is never used.


@triton.jit
def _ld_half(row, tmask, sF_f, col0, P: tl.constexpr):
    """``[BT, P]`` fp32 factor columns ``col0 .. col0+P-1`` of a token block."""
    p = tl.arange(0, P)
    return tl.load(row[:, None] + (col0 + p[None, :]).to(tl.int64) * sF_f, mask=tmask[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _ld_col(row, tmask, sF_f, col):
    """``[BT]`` fp32 factor column ``col`` of a token block."""
    return tl.load(row + col * sF_f, mask=tmask, other=0.0).to(tl.float32)


@triton.jit
def _ld_b(row, tmask, sF_f, OFFB: tl.constexpr, RANK: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
    """The two halves of each of the (<= 4) B rows of a token block."""
    b01 = _ld_half(row, tmask, sF_f, OFFB, P)
    b02 = _ld_half(row, tmask, sF_f, OFFB + P, P)
    b11 = b01
    b12 = b02
    b21 = b01
    b22 = b02
    b31 = b01
    b32 = b02
    if RANK > 1:
        b11 = _ld_half(row, tmask, sF_f, OFFB + D, P)
        b12 = _ld_half(row, tmask, sF_f, OFFB + D + P, P)
    if RANK > 2:
        b21 = _ld_half(row, tmask, sF_f, OFFB + 2 * D, P)
        b22 = _ld_half(row, tmask, sF_f, OFFB + 2 * D + P, P)
    if RANK > 3:
        b31 = _ld_half(row, tmask, sF_f, OFFB + 3 * D, P)
        b32 = _ld_half(row, tmask, sF_f, OFFB + 3 * D + P, P)
    return b01, b02, b11, b12, b21, b22, b31, b32


@triton.jit
def _ld_a(row, tmask, sF_f, COLA, RANK: tl.constexpr):
    """A entries ``[BT]`` of one head/group for ranks 0..3 (absent ranks alias rank 0)."""
    a0 = _ld_col(row, tmask, sF_f, COLA)
    a1 = a0
    a2 = a0
    a3 = a0
    if RANK > 1:
        a1 = _ld_col(row, tmask, sF_f, COLA + 1)
    if RANK > 2:
        a2 = _ld_col(row, tmask, sF_f, COLA + 2)
    if RANK > 3:
        a3 = _ld_col(row, tmask, sF_f, COLA + 3)
    return a0, a1, a2, a3


@triton.jit
def _contract2(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK: tl.constexpr):
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
def _prologue_fwd_side2(
    row, tok, tmask, sF_f, OUT_ptr, RS_ptr, BIAS_ptr, GM_ptr, eps, cs, sn,
    NH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr,
    OFF_A: tl.constexpr, OFF_B: tl.constexpr, NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
):
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    b01, b02, b11, b12, b21, b22, b31, b32 = _ld_b(row, tmask, sF_f, OFF_B, RANK, D, P)
    if NORM:
        g1 = tl.load(GM_ptr + p).to(tl.float32)
        g2 = tl.load(GM_ptr + P + p).to(tl.float32)
    for h in tl.static_range(NH):
        a0, a1, a2, a3 = _ld_a(row, tmask, sF_f, OFF_A + h * RANK, RANK)
        x1, x2 = _contract2(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK)
        if HAS_BIAS:
            cb = BIAS_ptr + (h // NPG) * GW + (h % NPG + SLOT) * D
            x1 += tl.load(cb + p).to(tl.float32)[None, :]
            x2 += tl.load(cb + P + p).to(tl.float32)[None, :]
        if NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
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
def _tpa_prologue_fwd2_kernel(
    F_ptr, sF_s, sF_b, sF_f,
    BIAS_ptr, GQ_ptr, GK_ptr,
    COS_ptr, SIN_ptr,
    Q_ptr, K_ptr, V_ptr, RSQ_ptr, RSK_ptr,
    S, B, eps,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RK: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr,
):
    OFF_AK: tl.constexpr = H * RQ
    OFF_AV: tl.constexpr = OFF_AK + G * RK
    OFF_BQ: tl.constexpr = OFF_AV + G * RK
    OFF_BK: tl.constexpr = OFF_BQ + RQ * D
    OFF_BV: tl.constexpr = OFF_BK + RK * D
    HPG: tl.constexpr = H // G
    GW: tl.constexpr = (HPG + 2) * D

    pid_t = tl.program_id(0)
    bi = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < S
    t64 = t.to(tl.int64)
    row = F_ptr + t64 * sF_s + bi * sF_b
    tok = t64 * B + bi
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    _prologue_fwd_side2(row, tok, tmask, sF_f, Q_ptr, RSQ_ptr, BIAS_ptr, GQ_ptr, eps, cs, sn,
                        H, D, P, RQ, 0, OFF_BQ, HPG, GW, 0, HAS_BIAS, NORM_Q, True)
    _prologue_fwd_side2(row, tok, tmask, sF_f, K_ptr, RSK_ptr, BIAS_ptr, GK_ptr, eps, cs, sn,
                        G, D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, HAS_BIAS, NORM_K, True)
    _prologue_fwd_side2(row, tok, tmask, sF_f, V_ptr, RSK_ptr, BIAS_ptr, GK_ptr, eps, cs, sn,
                        G, D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, HAS_BIAS, False, False)


@triton.jit
def _prologue_bwd_side2(
    row, tok, tmask, sF_f, dF_row, part_idx,
    DX_ptr, BIAS_ptr, GM_ptr, RS_ptr, PART_ptr,
    cs, sn, dcos, dsin,
    NH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr,
    OFF_A: tl.constexpr, OFF_B: tl.constexpr,
    NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr, NPART: tl.constexpr, OFF_DG: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr, BT: tl.constexpr,
):
    """2-D backward of one side (q, k or v); same contract as :func:`_prologue_bwd_side`."""
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    b01, b02, b11, b12, b21, b22, b31, b32 = _ld_b(row, tmask, sF_f, OFF_B, RANK, D, P)
    d01 = tl.zeros([BT, P], dtype=tl.float32)
    d02 = tl.zeros([BT, P], dtype=tl.float32)
    d11 = tl.zeros([BT, P], dtype=tl.float32)
    d12 = tl.zeros([BT, P], dtype=tl.float32)
    d21 = tl.zeros([BT, P], dtype=tl.float32)
    d22 = tl.zeros([BT, P], dtype=tl.float32)
    d31 = tl.zeros([BT, P], dtype=tl.float32)
    d32 = tl.zeros([BT, P], dtype=tl.float32)
    if NORM:
        g1 = tl.load(GM_ptr + p).to(tl.float32)
        g2 = tl.load(GM_ptr + P + p).to(tl.float32)
        dg1 = tl.zeros([P], dtype=tl.float32)
        dg2 = tl.zeros([P], dtype=tl.float32)
    for h in tl.static_range(NH):
        a0, a1, a2, a3 = _ld_a(row, tmask, sF_f, OFF_A + h * RANK, RANK)
        gp = DX_ptr + (tok * NH + h)[:, None] * D + p[None, :]
        u1 = tl.load(gp, mask=m2, other=0.0).to(tl.float32)
        u2 = tl.load(gp + P, mask=m2, other=0.0).to(tl.float32)
        if ROTATE or NORM:
            x1, x2 = _contract2(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK)
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
            dg1 += tl.sum(u1 * n1, axis=0)
            dg2 += tl.sum(u2 * n2, axis=0)
            dn1 = u1 * g1[None, :]
            dn2 = u2 * g2[None, :]
            mdot = (tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / D
            u1 = (dn1 - n1 * mdot[:, None]) * rstd[:, None]
            u2 = (dn2 - n2 * mdot[:, None]) * rstd[:, None]
        u1 = tl.where(m2, u1, 0.0)
        u2 = tl.where(m2, u2, 0.0)
        if HAS_BIAS:
            dcp = PART_ptr + part_idx * NPART + (h // NPG) * GW + (h % NPG + SLOT) * D + p
            tl.store(dcp, tl.sum(u1, axis=0))
            tl.store(dcp + P, tl.sum(u2, axis=0))
        # contraction backward: dA[h, r] = u . B_r / RANK ; dB_r += A[h, r] u / RANK
        col = OFF_A + h * RANK
        ty = dF_row.dtype.element_ty
        tl.store(dF_row + col, ((tl.sum(u1 * b01, axis=1) + tl.sum(u2 * b02, axis=1)) / RANK).to(ty), mask=tmask)
        d01 += a0[:, None] * u1
        d02 += a0[:, None] * u2
        if RANK > 1:
            tl.store(dF_row + col + 1, ((tl.sum(u1 * b11, axis=1) + tl.sum(u2 * b12, axis=1)) / RANK).to(ty),
                     mask=tmask)
            d11 += a1[:, None] * u1
            d12 += a1[:, None] * u2
        if RANK > 2:
            tl.store(dF_row + col + 2, ((tl.sum(u1 * b21, axis=1) + tl.sum(u2 * b22, axis=1)) / RANK).to(ty),
                     mask=tmask)
            d21 += a2[:, None] * u1
            d22 += a2[:, None] * u2
        if RANK > 3:
            tl.store(dF_row + col + 3, ((tl.sum(u1 * b31, axis=1) + tl.sum(u2 * b32, axis=1)) / RANK).to(ty),
                     mask=tmask)
            d31 += a3[:, None] * u1
            d32 += a3[:, None] * u2
    ty = dF_row.dtype.element_ty
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
        tl.store(PART_ptr + part_idx * NPART + OFF_DG + p, dg1)
        tl.store(PART_ptr + part_idx * NPART + OFF_DG + P + p, dg2)
    return dcos, dsin


@triton.jit
def _tpa_prologue_bwd2_kernel(
    F_ptr, sF_s, sF_b, sF_f, DF_ptr,
    DQ_ptr, DK_ptr, DV_ptr,
    BIAS_ptr, GQ_ptr, GK_ptr, RSQ_ptr, RSK_ptr,
    COS_ptr, SIN_ptr,
    PART_ptr, CS_tok,
    S, B,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RK: tl.constexpr, FW: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BT: tl.constexpr,
):
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
    bi = tl.program_id(1)
    part_idx = pid_t * B + bi
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < S
    t64 = t.to(tl.int64)
    row = F_ptr + t64 * sF_s + bi * sF_b
    tok = t64 * B + bi
    dF_row = DF_ptr + tok * FW
    p = tl.arange(0, P)
    m2 = tmask[:, None]
    cs = tl.load(COS_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    sn = tl.load(SIN_ptr + t64[:, None] * P + p[None, :], mask=m2, other=0.0)
    dcos = tl.zeros([BT, P], dtype=tl.float32)
    dsin = tl.zeros([BT, P], dtype=tl.float32)
    dcos, dsin = _prologue_bwd_side2(
        row, tok, tmask, sF_f, dF_row, part_idx, DQ_ptr, BIAS_ptr, GQ_ptr, RSQ_ptr, PART_ptr,
        cs, sn, dcos, dsin, H, D, P, RQ, 0, OFF_BQ, HPG, GW, 0, NPART, LB, HAS_BIAS, NORM_Q, True, BT)
    dcos, dsin = _prologue_bwd_side2(
        row, tok, tmask, sF_f, dF_row, part_idx, DK_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
        cs, sn, dcos, dsin, G, D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, NPART, LB + D, HAS_BIAS, NORM_K, True, BT)
    dcos, dsin = _prologue_bwd_side2(
        row, tok, tmask, sF_f, dF_row, part_idx, DV_ptr, BIAS_ptr, GK_ptr, RSK_ptr, PART_ptr,
        cs, sn, dcos, dsin, G, D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, NPART, LB + D, HAS_BIAS, False, False,
        BT)
    dp = (tok[:, None] * (2 * P) + p[None, :])
    tl.store(CS_tok + dp, dcos, mask=m2)
    tl.store(CS_tok + dp + P, dsin, mask=m2)


# ============================================================================ attention


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _swa_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, SINK_ptr, O_ptr, L_ptr,
    S, B, W, qk_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    HPG: tl.constexpr = H // G
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    h = pid_bh % H
    g = h // HPG
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mmask = offs_m < S
    qrow = (offs_m.to(tl.int64) * B + bi) * H + h
    q = tl.load(Q_ptr + qrow[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
    sink2 = tl.load(SINK_ptr + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BM], dtype=tl.float32) + sink2
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc = tl.zeros([BM, D], dtype=tl.float32)
    lo = tl.maximum(m0 - W + 1, 0) // BN * BN
    hi = tl.minimum(m0 + BM, S)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < S
        krow = (offs_n.to(tl.int64) * B + bi) * G + g
        k = tl.load(K_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(V_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        diff = offs_m[:, None] - offs_n[None, :]
        vis = (diff >= 0) & (diff < W) & nmask[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + _dot(pr.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O_ptr + qrow[:, None] * D + offs_d[None, :], out.to(O_ptr.dtype.element_ty), mask=mmask[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(L_ptr + pid_bh.to(tl.int64) * S + offs_m, lse, mask=mmask)


@triton.jit
def _swa_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, DO_ptr, L_ptr, SINK_ptr,
    DQ_ptr, DELTA_ptr, DSINK_part,
    S, B, W, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    HPG: tl.constexpr = H // G
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    h = pid_bh % H
    g = h // HPG
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mmask = offs_m < S
    qrow = (offs_m.to(tl.int64) * B + bi) * H + h
    qoff = qrow[:, None] * D + offs_d[None, :]
    q = tl.load(Q_ptr + qoff, mask=mmask[:, None], other=0.0)
    do = tl.load(DO_ptr + qoff, mask=mmask[:, None], other=0.0)
    o = tl.load(O_ptr + qoff, mask=mmask[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(L_ptr + pid_bh.to(tl.int64) * S + offs_m, mask=mmask, other=0.0)
    tl.store(DELTA_ptr + pid_bh.to(tl.int64) * S + offs_m, delta, mask=mmask)
    sink = tl.load(SINK_ptr + h).to(tl.float32)
    psink = tl.where(mmask, tl.exp(sink - lse), 0.0)
    tl.store(DSINK_part + pid_m * (B * H) + pid_bh, -tl.sum(psink * delta, axis=0))
    lse2 = lse * 1.4426950408889634
    dq = tl.zeros([BM, D], dtype=tl.float32)
    lo = tl.maximum(m0 - W + 1, 0) // BN * BN
    hi = tl.minimum(m0 + BM, S)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < S
        krow = (offs_n.to(tl.int64) * B + bi) * G + g
        k = tl.load(K_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(V_ptr + krow[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        diff = offs_m[:, None] - offs_n[None, :]
        vis = (diff >= 0) & (diff < W) & nmask[None, :] & mmask[:, None]
        pr = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = pr * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    tl.store(DQ_ptr + qoff, dq.to(DQ_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _swa_bwd_dkv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, L_ptr, DELTA_ptr,
    DK_ptr, DV_ptr,
    S, B, W, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
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
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    lo = n0 // BM * BM
    hi = tl.minimum(n0 + BN + W - 1, S)
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


# ---------------------------------------------------------------------------- fused forward
# Spec 5.3: the prologue folded into the attention forward. Each program rebuilds its query rows
# and every K/V tile it visits from the factors in registers (contraction, /R, bias, RMSNorm,
# fp32 rotation), so the forward reads the factors instead of materialised q/k/v. It still writes
# q, k, v and rstd once (q by every program for its rows, k/v by the first head of each group for
# its own token block) because the backward kernels consume them. q.k is computed as two dots
# over the rotation halves (q1.k1 + q2.k2), and the output as two halves (P v1, P v2).


@triton.jit
def _build_rows(row, tmask, sF_f, BIAS_ptr, GM_ptr, eps, cs, sn, idx,
                D: tl.constexpr, P: tl.constexpr, RANK: tl.constexpr, OFF_A: tl.constexpr,
                OFF_B: tl.constexpr, NPG: tl.constexpr, GW: tl.constexpr, SLOT: tl.constexpr,
                HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr):
    """Rows of head/group ``idx`` for a token block: returns the two halves (fp32) and rstd."""
    p = tl.arange(0, P)
    b01, b02, b11, b12, b21, b22, b31, b32 = _ld_b(row, tmask, sF_f, OFF_B, RANK, D, P)
    a0, a1, a2, a3 = _ld_a(row, tmask, sF_f, OFF_A + idx * RANK, RANK)
    x1, x2 = _contract2(a0, a1, a2, a3, b01, b02, b11, b12, b21, b22, b31, b32, RANK)
    if HAS_BIAS:
        cb = BIAS_ptr + (idx // NPG) * GW + (idx % NPG + SLOT) * D
        x1 += tl.load(cb + p).to(tl.float32)[None, :]
        x2 += tl.load(cb + P + p).to(tl.float32)[None, :]
    rstd = tl.sum(x1, axis=1) * 0.0 + 1.0
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        x1 = x1 * rstd[:, None] * tl.load(GM_ptr + p).to(tl.float32)[None, :]
        x2 = x2 * rstd[:, None] * tl.load(GM_ptr + P + p).to(tl.float32)[None, :]
    if ROTATE:
        y1 = x1 * cs - x2 * sn
        y2 = x2 * cs + x1 * sn
    else:
        y1 = x1
        y2 = x2
    return y1, y2, rstd


@triton.jit
def _tpa_fused_fwd_kernel(
    F_ptr, sF_s, sF_b, sF_f,
    BIAS_ptr, GQ_ptr, GK_ptr, COS_ptr, SIN_ptr, SINK_ptr,
    O_ptr, L_ptr, Q_ptr, K_ptr, V_ptr, RSQ_ptr, RSK_ptr,
    S, B, W, qk_scale, eps,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    RQ: tl.constexpr, RK: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    OFF_AK: tl.constexpr = H * RQ
    OFF_AV: tl.constexpr = OFF_AK + G * RK
    OFF_BQ: tl.constexpr = OFF_AV + G * RK
    OFF_BK: tl.constexpr = OFF_BQ + RQ * D
    OFF_BV: tl.constexpr = OFF_BK + RK * D
    HPG: tl.constexpr = H // G
    GW: tl.constexpr = (HPG + 2) * D
    act = Q_ptr.dtype.element_ty

    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    h = pid_bh % H
    g = h // HPG
    m0 = pid_m * BM
    p = tl.arange(0, P)
    offs_m = m0 + tl.arange(0, BM)
    mmask = offs_m < S
    tm = offs_m.to(tl.int64)
    rowq = F_ptr + tm * sF_s + bi * sF_b
    tokq = tm * B + bi
    csq = tl.load(COS_ptr + tm[:, None] * P + p[None, :], mask=mmask[:, None], other=0.0)
    snq = tl.load(SIN_ptr + tm[:, None] * P + p[None, :], mask=mmask[:, None], other=0.0)
    y1, y2, rsq = _build_rows(rowq, mmask, sF_f, BIAS_ptr, GQ_ptr, eps, csq, snq, h,
                              D, P, RQ, 0, OFF_BQ, HPG, GW, 0, HAS_BIAS, NORM_Q, True)
    q1 = y1.to(act)
    q2 = y2.to(act)
    qp = Q_ptr + (tokq * H + h)[:, None] * D + p[None, :]
    tl.store(qp, q1, mask=mmask[:, None])
    tl.store(qp + P, q2, mask=mmask[:, None])
    if NORM_Q:
        tl.store(RSQ_ptr + tokq * H + h, rsq, mask=mmask)

    sink2 = tl.load(SINK_ptr + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BM], dtype=tl.float32) + sink2
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc1 = tl.zeros([BM, P], dtype=tl.float32)
    acc2 = tl.zeros([BM, P], dtype=tl.float32)
    lo = tl.maximum(m0 - W + 1, 0) // BN * BN
    hi = tl.minimum(m0 + BM, S)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < S
        tn = offs_n.to(tl.int64)
        rowk = F_ptr + tn * sF_s + bi * sF_b
        csk = tl.load(COS_ptr + tn[:, None] * P + p[None, :], mask=nmask[:, None], other=0.0)
        snk = tl.load(SIN_ptr + tn[:, None] * P + p[None, :], mask=nmask[:, None], other=0.0)
        k1, k2, _r = _build_rows(rowk, nmask, sF_f, BIAS_ptr, GK_ptr, eps, csk, snk, g,
                                 D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, HAS_BIAS, NORM_K, True)
        sc = (_dot(q1, tl.trans(k1.to(act)), IEEE) + _dot(q2, tl.trans(k2.to(act)), IEEE)) * qk_scale
        diff = offs_m[:, None] - offs_n[None, :]
        vis = (diff >= 0) & (diff < W) & nmask[None, :]
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v1, v2, _r2 = _build_rows(rowk, nmask, sF_f, BIAS_ptr, GK_ptr, eps, csk, snk, g,
                                  D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, HAS_BIAS, False, False)
        pa = pr.to(act)
        acc1 = acc1 * alpha[:, None] + _dot(pa, v1.to(act), IEEE)
        acc2 = acc2 * alpha[:, None] + _dot(pa, v2.to(act), IEEE)
        m_i = m_new
    op = O_ptr + (tokq * H + h)[:, None] * D + p[None, :]
    tl.store(op, (acc1 / l_i[:, None]).to(O_ptr.dtype.element_ty), mask=mmask[:, None])
    tl.store(op + P, (acc2 / l_i[:, None]).to(O_ptr.dtype.element_ty), mask=mmask[:, None])
    tl.store(L_ptr + pid_bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mmask)

    # k, v (and rstd_k) of this token block, written once per group by its first head
    if h % HPG == 0:
        for n0 in range(m0, tl.minimum(m0 + BM, S), BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < S
            tn = offs_n.to(tl.int64)
            rowk = F_ptr + tn * sF_s + bi * sF_b
            tokk = tn * B + bi
            csk = tl.load(COS_ptr + tn[:, None] * P + p[None, :], mask=nmask[:, None], other=0.0)
            snk = tl.load(SIN_ptr + tn[:, None] * P + p[None, :], mask=nmask[:, None], other=0.0)
            k1, k2, rsk = _build_rows(rowk, nmask, sF_f, BIAS_ptr, GK_ptr, eps, csk, snk, g,
                                      D, P, RK, OFF_AK, OFF_BK, 1, GW, HPG, HAS_BIAS, NORM_K, True)
            kp = K_ptr + (tokk * G + g)[:, None] * D + p[None, :]
            tl.store(kp, k1.to(act), mask=nmask[:, None])
            tl.store(kp + P, k2.to(act), mask=nmask[:, None])
            if NORM_K:
                tl.store(RSK_ptr + tokk * G + g, rsk, mask=nmask)
            v1, v2, _r3 = _build_rows(rowk, nmask, sF_f, BIAS_ptr, GK_ptr, eps, csk, snk, g,
                                      D, P, RK, OFF_AV, OFF_BV, 1, GW, HPG + 1, HAS_BIAS, False, False)
            vp = V_ptr + (tokk * G + g)[:, None] * D + p[None, :]
            tl.store(vp, v1.to(act), mask=nmask[:, None])
            tl.store(vp + P, v2.to(act), mask=nmask[:, None])


# ============================================================================ launchers


# GPU tile choices (tokens per prologue program and its warps; attention tiles). Module-level so a
# benchmark can sweep them (benchmarks/tpa_check.py --tune); the interpreter always uses 16-wide
# tiles. Defaults = the choice of the H100 tuning run (benchmarks/results/tpa_bench_h100_run3.json):
# the fused forward measured slower there (642 us vs 204 us for prologue + attention), so it is off.
GPU_TILES = dict(BT_FWD=16, WARPS_FWD=8, BT_BWD=16, WARPS_BWD=4, PROLOGUE="2d",
                 BM=64, BN=32, WARPS_ATTN=4, STAGES_ATTN=2,
                 BM_BWD=64, BN_BWD=64, WARPS_ATTN_BWD=4, STAGES_ATTN_BWD=2,
                 FUSED_FWD=False, BM_FUSED=64, BN_FUSED=32, WARPS_FUSED=8, STAGES_FUSED=2)


def _blocks(kind: str = "attn"):
    """Tile sizes: small tiles under the interpreter (speed, edge coverage), ``GPU_TILES`` on GPU."""
    if _interpreting():
        return dict(BT=16, BM=16, BN=16, warps=1, stages=1, impl=GPU_TILES["PROLOGUE"])
    t = GPU_TILES
    if kind == "prologue_fwd":
        return dict(BT=t["BT_FWD"], warps=t["WARPS_FWD"], impl=t["PROLOGUE"])
    if kind == "prologue_bwd":
        return dict(BT=t["BT_BWD"], warps=t["WARPS_BWD"], impl=t["PROLOGUE"])
    if kind == "fused_fwd":
        return dict(BM=t["BM_FUSED"], BN=t["BN_FUSED"], warps=t["WARPS_FUSED"], stages=t["STAGES_FUSED"])
    if kind == "attn_bwd":
        return dict(BM=t["BM_BWD"], BN=t["BN_BWD"], warps=t["WARPS_ATTN_BWD"], stages=t["STAGES_ATTN_BWD"])
    return dict(BM=t["BM"], BN=t["BN"], warps=t["WARPS_ATTN"], stages=t["STAGES_ATTN"])


def _check_dims(head_dim: int, q_rank: int = 1, kv_rank: int = 1):
    P = head_dim // 2
    if head_dim % 2 or P < 16 or (P & (P - 1)):
        raise ValueError(f"triton TPA kernels need head_dim/2 to be a power of two >= 16, got head_dim={head_dim}")
    if max(q_rank, kv_rank) > 4:
        raise ValueError(f"triton TPA prologue supports ranks <= 4, got q_rank={q_rank}, kv_rank={kv_rank}")


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
    _check_dims(d)
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
    if blk["impl"] == "2d":
        _tpa_prologue_fwd2_kernel[grid](
            factors, factors.stride(0), factors.stride(1), factors.stride(2),
            qkv_bias if qkv_bias is not None else dummy,
            gamma_q if gamma_q is not None else dummy, gamma_k if gamma_k is not None else dummy,
            cos, sin, q, k, v, rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
            s, b, float(eps),
            H=H, G=G, D=d, P=d // 2, RQ=Rq, RK=R,
            HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
            BT=blk["BT"], num_warps=blk["warps"],
        )
        return q, k, v, rs_q, rs_k
    _tpa_prologue_fwd_kernel[grid](
        factors, factors.stride(0), factors.stride(1), factors.stride(2),
        qkv_bias if qkv_bias is not None else dummy,
        gamma_q if gamma_q is not None else dummy, gamma_k if gamma_k is not None else dummy,
        cos, sin, q, k, v, rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
        s, b, float(eps),
        H=H, G=G, D=d, P=d // 2, RQ=Rq, RQP=_next_pow2(Rq), RK=R, RKP=_next_pow2(R),
        HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
        BT=blk["BT"], num_warps=blk["warps"],
    )
    return q, k, v, rs_q, rs_k


def prologue_bwd(dq, dk, dv, factors, qkv_bias, gamma_q, gamma_k, rs_q, rs_k, cos, sin, *, H, G, d, Rq, R):
    """Backward of :func:`prologue_fwd`.

    The kernel writes ``dfactors`` completely, one row per program of fp32 partials
    ``[dqkv_bias (interleaved) | dgamma_q | dgamma_k]`` and per-token ``[dcos | dsin]``; PyTorch then
    sums them in a fixed order (deterministic, no atomics).

    Returns:
        ``dfactors [s,b,F]`` (factors dtype, contiguous), ``dqkv_bias [G*(H/G+2)*d]`` (None without
        bias), ``dgamma_q``, ``dgamma_k`` ``[d]`` (None without norm), ``dcos``, ``dsin``
        ``[s, d/2]``; parameter gradients in fp32.
    """
    s, b, Fw = factors.shape
    dev = factors.device
    blk = _blocks("prologue_bwd")
    BT = blk["BT"]
    nT = triton.cdiv(s, BT)
    P = d // 2
    LB = G * (H // G + 2) * d
    f32 = dict(device=dev, dtype=torch.float32)
    dF = torch.empty(s, b, Fw, device=dev, dtype=factors.dtype)
    part = torch.empty(nT * b, LB + 2 * d, **f32)
    cs_tok = torch.empty(s, b, 2 * P, **f32)
    dummy = cos

    def _or(x):
        return x if x is not None else dummy

    args = (factors, factors.stride(0), factors.stride(1), factors.stride(2), dF,
            dq, dk, dv,
            _or(qkv_bias), _or(gamma_q), _or(gamma_k),
            rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
            cos, sin, part, cs_tok,
            s, b)
    flags = dict(HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
                 BT=BT, num_warps=blk["warps"])
    if blk["impl"] == "2d":
        _tpa_prologue_bwd2_kernel[(nT, b)](*args, H=H, G=G, D=d, P=P, RQ=Rq, RK=R, FW=Fw, **flags)
    else:
        _tpa_prologue_bwd_kernel[(nT, b)](*args, H=H, G=G, D=d, P=P, RQ=Rq, RQP=_next_pow2(Rq), RK=R,
                                          RKP=_next_pow2(R), FW=Fw, **flags)
    # fixed-order reductions (separate outputs: the op may not return aliasing tensors)
    dbias = part[:, :LB].sum(0) if qkv_bias is not None else None
    dgq = part[:, LB:LB + d].sum(0) if gamma_q is not None else None
    dgk = part[:, LB + d:].sum(0) if gamma_k is not None else None
    return dF, dbias, dgq, dgk, cs_tok[..., :P].sum(1), cs_tok[..., P:].sum(1)


def use_fused_forward(dtype: torch.dtype) -> bool:
    """Whether :func:`fused_fwd` serves the forward (``GPU_TILES["FUSED_FWD"]``; under the
    interpreter only for fp32, whose ``tl.dot`` is exact there)."""
    if _interpreting():
        return GPU_TILES["FUSED_FWD"] and dtype == torch.float32
    return bool(GPU_TILES["FUSED_FWD"])


def fused_fwd(factors, qkv_bias, gamma_q, gamma_k, cos, sin, sink, *, H, G, d, Rq, R, eps, window,
              softmax_scale, act_dtype):
    """Factors -> attention output in one kernel (spec 5.3), also writing q/k/v/rstd for backward.

    Returns:
        ``o [s,b,H,d]``, ``lse [b,H,s]`` fp32, ``q``, ``k``, ``v``, ``rstd_q``, ``rstd_k`` (as
        :func:`prologue_fwd`).
    """
    _check_dims(d, Rq, R)
    s, b, _ = factors.shape
    dev = factors.device
    q = torch.empty(s, b, H, d, device=dev, dtype=act_dtype)
    k = torch.empty(s, b, G, d, device=dev, dtype=act_dtype)
    v = torch.empty(s, b, G, d, device=dev, dtype=act_dtype)
    o = torch.empty(s, b, H, d, device=dev, dtype=act_dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    lse = torch.empty(b, H, s, **f32)
    rs_q = torch.empty(s, b, H, **f32) if gamma_q is not None else torch.empty(0, **f32)
    rs_k = torch.empty(s, b, G, **f32) if gamma_k is not None else torch.empty(0, **f32)
    dummy = cos
    blk = _blocks("fused_fwd")
    grid = (triton.cdiv(s, blk["BM"]), b * H)
    _tpa_fused_fwd_kernel[grid](
        factors, factors.stride(0), factors.stride(1), factors.stride(2),
        qkv_bias if qkv_bias is not None else dummy,
        gamma_q if gamma_q is not None else dummy, gamma_k if gamma_k is not None else dummy,
        cos, sin, sink, o, lse, q, k, v,
        rs_q if gamma_q is not None else dummy, rs_k if gamma_k is not None else dummy,
        s, b, int(window), float(softmax_scale) * LOG2E, float(eps),
        H=H, G=G, D=d, P=d // 2, RQ=Rq, RK=R,
        HAS_BIAS=qkv_bias is not None, NORM_Q=gamma_q is not None, NORM_K=gamma_k is not None,
        BM=blk["BM"], BN=blk["BN"], IEEE=act_dtype == torch.float32,
        num_warps=blk["warps"], num_stages=blk["stages"],
    )
    return o, lse, q, k, v, rs_q, rs_k


def swa_fwd(q, k, v, sink, window: int, softmax_scale: float):
    """Sliding-window sink attention forward on materialised tensors.

    Args:
        q: ``[s,b,H,d]``, k, v: ``[s,b,G,d]`` contiguous; sink ``[H]``.

    Returns:
        ``o [s,b,H,d]`` (q dtype), ``lse [b,H,s]`` fp32 (natural log, sink-inclusive).
    """
    if _interpreting() and q.dtype != torch.float32:  # the interpreter's bf16 tl.dot is wrong
        o, lse = swa_fwd(q.float(), k.float(), v.float(), sink, window, softmax_scale)
        return o.to(q.dtype), lse
    s, b, H, d = q.shape
    G = k.shape[2]
    blk = _blocks()
    o = torch.empty_like(q)
    lse = torch.empty(b, H, s, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(s, blk["BM"]), b * H)
    _swa_fwd_kernel[grid](
        q, k, v, sink, o, lse, s, b, int(window), float(softmax_scale) * LOG2E,
        H=H, G=G, D=d, BM=blk["BM"], BN=blk["BN"], IEEE=q.dtype == torch.float32,
        num_warps=blk["warps"], num_stages=blk["stages"],
    )
    return o, lse


def swa_bwd(do, q, k, v, o, lse, sink, window: int, softmax_scale: float):
    """Backward of :func:`swa_fwd`.

    Returns:
        ``dq [s,b,H,d]``, ``dk``, ``dv`` ``[s,b,G,d]`` (q dtype) and ``dsink [H]`` fp32
        (fixed-order sum of per-program partials).
    """
    if _interpreting() and q.dtype != torch.float32:  # the interpreter's bf16 tl.dot is wrong
        dq, dk, dv, dsink = swa_bwd(do.float(), q.float(), k.float(), v.float(), o.float(), lse, sink, window,
                                    softmax_scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink
    s, b, H, d = q.shape
    G = k.shape[2]
    blk = _blocks("attn_bwd")
    BM, BN = blk["BM"], blk["BN"]
    ieee = q.dtype == torch.float32
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(b, H, s, device=q.device, dtype=torch.float32)
    nM = triton.cdiv(s, BM)
    dsink_part = torch.empty(nM, b, H, device=q.device, dtype=torch.float32)
    qk_scale = float(softmax_scale) * LOG2E
    _swa_bwd_dq_kernel[(nM, b * H)](
        q, k, v, o, do, lse, sink, dq, delta, dsink_part,
        s, b, int(window), qk_scale, float(softmax_scale),
        H=H, G=G, D=d, BM=BM, BN=BN, IEEE=ieee, num_warps=blk["warps"], num_stages=blk["stages"],
    )
    _swa_bwd_dkv_kernel[(triton.cdiv(s, BN), b * G)](
        q, k, v, do, lse, delta, dk, dv,
        s, b, int(window), qk_scale, float(softmax_scale),
        H=H, G=G, D=d, BM=BM, BN=BN, IEEE=ieee, num_warps=blk["warps"], num_stages=blk["stages"],
    )
    return dq, dk, dv, dsink_part.sum(dim=(0, 1))
