"""Triton flash attention with a learnable sink: full causal + optional ALiBi (the global layers).

These kernels serve the full-causal flavour (global layers: causal + ALiBi (GRAPE-A) + sink,
``HAS_ALIBI=True``; also causal + sink without ALiBi). The sliding-window flavour
(:func:`~vpmoe_compile.ops.sink_attention.window_sink_attention`, ``window=`` of the op) runs on
the library's one sliding-window kernel family, :func:`vpmoe_compile.ops.tpa_attention.triton.swa_fwd`
/ ``swa_bwd`` (also the fused TPA op's attention middle): these kernels' own window path was
deleted after a measured H100 comparison (``benchmarks/results/window_kernels.json``), and they
have no ALiBi + window combination.

Layout (Megatron, sequence first, arbitrary strides): ``q [s, b, H, d]``, ``k, v [s, b, G, d]``,
``sink [H]``, ``slopes [H]`` fp32. Outputs: ``o [s, b, H, d]`` (contiguous, input dtype) and
``lse [b, H, s]`` fp32 (natural log, **sink-inclusive**). Semantics are those of
:func:`vpmoe_compile.ops.sink_attention.reference.sink_attention_reference`
(``docs/design.md#sink-attention``). :func:`supports` / :func:`check_supported` say what the
kernels can run (asked by :mod:`vpmoe_compile.kernels` and by the op's argument checks).

Algorithm notes (our own code; ideas learned from public sources, nothing copied):

* FlashAttention-2 (Dao, 2023) forward with online softmax in the exp2 domain (``log2 e`` folded
  into the score scale, the ALiBi slope and the sink), as in Triton's fused-attention tutorial;
  backward as two kernels (``dq`` over KV tiles, ``dk/dv`` over query tiles) as in that tutorial
  and flash-linear-attention's ``fla/ops/attn/parallel.py``. The ``dq`` kernel (which owns whole
  query rows) forms ``dS`` with ``delta = rowsum(dO * O)`` (no pre-pass kernel) and accumulates the
  exact ``sum_j P_ij dP_ij`` over the same tiles in fp32; that exact ``delta`` is what it stores
  for the ``dk/dv`` kernel and the sink gradient (16-bit accuracy: see :func:`residual_helps`).
* Sink (``docs/design.md#sink-attention``): the running state starts at ``m = sink``, ``l = 1``, acc 0
  (a virtual first key with value 0), so the state is finite from the start; the stored LSE
  includes the sink (GPT-OSS's inference kernel stores one without it; we do not).
  ``dsink_h = -sum_{b,i} exp(sink_h - L_{b,h,i}) * delta_{b,h,i}`` is reduced deterministically:
  the ``dq`` kernel writes the per-row fp32 terms ``[b, H, s]``, then one fixed-shape sum (no atomics).
* GQA, FlashAttention-3 "PackGQA" style: one program owns ``PACK`` query heads of one KV group
  (``PACK`` divides ``H/G``), packed into the M dimension (row ``r`` = token ``r // PACK``, head
  ``r % PACK``), so each K/V tile is loaded once for all packed heads. The ``dk/dv`` program of a
  KV block loops over the group's heads and accumulates their sum in registers: no per-query-head
  fp32 ``dK/dV`` is ever written.
* ALiBi bias ``slope_h * (j - i)`` is computed per tile in fp32 from absolute positions (never an
  ``[s, s]`` tensor); no shortcut "add ``m_h j`` per row" (not shift-invariant with a sink).
* Causal tiles strictly below the diagonal skip the mask.
* Scheduling: the causal work of a program grows with its query tile (forward, ``dq``) or shrinks
  with its key tile (``dk/dv``). A 2-D grid ``(tile, batch x head)`` is dispatched one
  ``batch x head`` after another, so the last ones' heaviest tiles start last and run alone at
  the end (a greedy-schedule model of the ``dk/dv`` kernel, 1024 programs at ``s = 4096``,
  ``b * G = 16``, 264 slots: 1.28x the ideal makespan). The kernels therefore take one grid
  dimension ordered longest-processing-time first (:func:`_heavy_first`: the heaviest tile of
  every ``batch x head`` before any lighter one; the model: 1.01x). Measured on the H100 at that
  shape (``benchmarks/attention_schedule.py``, each order autotuned, one run): ``dk/dv``
  1302 vs 1634 us, fwd+bwd 2917 vs 3212 us, bitwise the same results. :data:`HEAVY_FIRST`
  ``= False`` gives the 2-D grid back (the benchmark's baseline).
* Fully-masked rows (only possible with ``sink = -inf``) are guarded: the exponent base is 0 when the
  running max is still ``-inf``, so no ``-inf - -inf`` NaN.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.dot`` on bf16 is wrong, so the launcher upcasts bf16 /
fp16 inputs to fp32 there. On the GPU the fp32 accumulators and fp32 softmax state are kept, the
``tl.dot`` operands are the input dtype (bf16 in training).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from vpmoe_compile._triton import default_pack, dot as _dot, ieee_fp32, mean_keys_per_row, needs_exact_delta

__all__ = [
    "check_supported",
    "supports",
    "KernelTiles",
    "SinkAttentionConfig",
    "interpreter_active",
    "use_config",
    "sink_attention_fwd_triton",
    "sink_attention_bwd_triton",
    "output_residual_dtype",
    "residual_helps",
    "planned_residual_dtype",
    "mean_keys_per_row",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def interpreter_active() -> bool:
    """True when the kernels of this module were created in Triton interpreter mode."""
    return bool(triton.knobs.runtime.interpret)


_INTERPRET_AT_IMPORT = interpreter_active()


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores(
    q, k, tok, offs_n, slope2, qk_scale,
    HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    """Base-2 logits ``[BLOCK_M, BLOCK_N]`` of one tile: ``log2e * (scale q.k + bias)``, masked -inf."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    rel = tok[:, None] - offs_n[None, :]  # i - j
    if HAS_ALIBI:
        s = s - slope2[:, None] * rel.to(tl.float32)
    if MASKED:
        s = tl.where(rel >= 0, s, float("-inf"))
    return s


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    tok, slope2, qk_scale, seqlen, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    dd = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seqlen
        k = tl.load(k_base + offs_n[:, None] * stride_ks + dd[None, :] * stride_kd,
                    mask=kv_ok[:, None], other=0.0)
        s = _scores(q, k, tok, offs_n, slope2, qk_scale, HAS_ALIBI, MASKED, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Guard: m_new is -inf only if the sink is -inf and no key has been visible yet.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_base)
        p = tl.math.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + dd[None, :] * stride_vd,
                    mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


#: Grid order of the three kernels (module docstring, "Scheduling"): True (default), one grid
#: dimension ordered longest processing time first; False, the 2-D grid ``(tile, batch x head)``,
#: kept as the baseline of ``benchmarks/attention_schedule.py`` (bitwise the same results).
HEAVY_FIRST = True


def _grid(n_tiles: int, n_rows: int):
    return (n_tiles * n_rows,) if HEAVY_FIRST else (n_tiles, n_rows)


@triton.jit
def _heavy_first(n_tiles, HEAVY_LAST_TILE: tl.constexpr, LPT: tl.constexpr):
    """``(tile, row)`` of this program. ``LPT``: a 1-D grid of ``n_tiles x n_rows`` programs,
    ordered longest-processing-time first: program ``p`` takes tile ``p // n_rows`` counted from
    the heaviest end (the last tile when ``HEAVY_LAST_TILE``, else the first) and row
    ``p % n_rows``. Else the 2-D grid ``(n_tiles, n_rows)``, heaviest tile first within a row."""
    if LPT:
        pid = tl.program_id(0)
        n_rows = tl.num_programs(0) // n_tiles
        i = pid // n_rows
        row = pid % n_rows
    else:
        i = tl.program_id(0)
        row = tl.program_id(1)
    if HEAVY_LAST_TILE:
        i = n_tiles - 1 - i
    return i, row


@triton.jit
def _sink_attn_fwd_kernel(
    Q, K, V, SINK, SLOPES, O, O_LO, LSE,
    stride_qs, stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kb, stride_kh, stride_kd,
    stride_vs, stride_vb, stride_vh, stride_vd,
    stride_os, stride_ob, stride_oh, stride_od,
    seqlen, num_heads, qk_scale,
    HPG: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, STORE_LO: tl.constexpr, IEEE: tl.constexpr, LPT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // PACK  # tokens per program
    pid_t, pid_bh = _heavy_first(tl.cdiv(seqlen, BLOCK_T), True, LPT)  # longest (causal) rows first
    n_hchunks = num_heads // PACK
    bb = pid_bh // n_hchunks
    h0 = (pid_bh % n_hchunks) * PACK
    g = h0 // HPG
    t0 = pid_t * BLOCK_T

    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // PACK
    head = h0 + r % PACK
    row_ok = (r < BLOCK_T * PACK) & (tok < seqlen)
    dd = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + bb * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh
                + dd[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    # Online-softmax state starts with the sink counted: m = sink (base 2), l = 1, acc = 0.
    m_i = tl.load(SINK + head).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_base = K + bb * stride_kb + g * stride_kh
    v_base = V + bb * stride_vb + g * stride_vh
    t_end = tl.minimum(t0 + BLOCK_T, seqlen)
    mid = (t0 // BLOCK_N) * BLOCK_N  # keys < t0 are visible to every row: no mask
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd,
                               stride_vs, stride_vd, tok, slope2, qk_scale, seqlen,
                               0, mid, HEAD_DIM, BLOCK_N, HAS_ALIBI, False, IEEE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd,
                               stride_vs, stride_vd, tok, slope2, qk_scale, seqlen,
                               mid, t_end, HEAD_DIM, BLOCK_N, HAS_ALIBI, True, IEEE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows with a -inf sink can reach 0
    o = acc / l_safe[:, None]
    o_hi = o.to(O.dtype.element_ty)
    o_off = bb * stride_ob + tok[:, None] * stride_os + head[:, None] * stride_oh + dd[None, :] * stride_od
    tl.store(O + o_off, o_hi, mask=row_ok[:, None])
    if STORE_LO:
        # Rounding residual of the 16-bit output (O_LO has O's strides): hi + lo carries ~16 more
        # mantissa bits, so the backward's delta = rowsum(dO * O) is fp32-accurate.
        tl.store(O_LO + o_off, (o - o_hi.to(tl.float32)).to(O_LO.dtype.element_ty),
                 mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + (bb * num_heads + head) * seqlen + tok, lse, mask=row_ok)


@triton.jit
def _dq_tiles(
    dq, dsum, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    tok, slope2, qk_scale, seqlen, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    dd = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seqlen
        k = tl.load(k_base + offs_n[:, None] * stride_ks + dd[None, :] * stride_kd,
                    mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + dd[None, :] * stride_vd,
                    mask=kv_ok[:, None], other=0.0)
        s = _scores(q, k, tok, offs_n, slope2, qk_scale, HAS_ALIBI, MASKED, IEEE)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), IEEE)
        pdp = p * dp
        dsum += tl.sum(pdp, 1)  # exact delta = sum_j P_ij dP_ij (fp32 P, not the rounded O)
        ds = pdp - p * delta[:, None]
        dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq, dsum


@triton.jit
def _sink_attn_bwd_dq_kernel(
    Q, K, V, O, O_LO, DO, LSE, DLSE, SINK, SLOPES, DQ, DELTA, PSINK,
    stride_qs, stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kb, stride_kh, stride_kd,
    stride_vs, stride_vb, stride_vh, stride_vd,
    stride_os, stride_ob, stride_oh, stride_od,
    stride_dos, stride_dob, stride_doh, stride_dod,
    stride_dqs, stride_dqb, stride_dqh, stride_dqd,
    seqlen, num_heads, sm_scale, qk_scale,
    HPG: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DLSE: tl.constexpr,
    HAS_LO: tl.constexpr, IEEE: tl.constexpr, LPT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq for a packed query block; also the exact ``delta = sum_j P_ij dP_ij - dLSE`` of its rows
    (stored for the dk/dv kernel, which runs after this one) and the per-row sink terms
    ``exp(sink - L) * delta`` (summed later in a fixed order: deterministic dsink)."""
    BLOCK_T: tl.constexpr = BLOCK_M // PACK
    pid_t, pid_bh = _heavy_first(tl.cdiv(seqlen, BLOCK_T), True, LPT)
    n_hchunks = num_heads // PACK
    bb = pid_bh // n_hchunks
    h0 = (pid_bh % n_hchunks) * PACK
    g = h0 // HPG
    t0 = pid_t * BLOCK_T

    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // PACK
    head = h0 + r % PACK
    row_ok = (r < BLOCK_T * PACK) & (tok < seqlen)
    dd = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + bb * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh
                + dd[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + bb * stride_dob + tok[:, None] * stride_dos + head[:, None] * stride_doh
                 + dd[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    o_off = bb * stride_ob + tok[:, None] * stride_os + head[:, None] * stride_oh + dd[None, :] * stride_od
    o = tl.load(O + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_LO:
        o += tl.load(O_LO + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    row = (bb * num_heads + head) * seqlen + tok
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    lse2 = lse * 1.4426950408889634
    delta = tl.sum(o * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlse = tl.load(DLSE + row, mask=row_ok, other=0.0).to(tl.float32)
    else:
        dlse = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = delta - dlse
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = K + bb * stride_kb + g * stride_kh
    v_base = V + bb * stride_vb + g * stride_vh
    t_end = tl.minimum(t0 + BLOCK_T, seqlen)
    mid = (t0 // BLOCK_N) * BLOCK_N
    dq, dsum = _dq_tiles(dq, dsum, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                         stride_vd, tok, slope2, qk_scale, seqlen, 0, mid,
                         HEAD_DIM, BLOCK_N, HAS_ALIBI, False, IEEE)
    dq, dsum = _dq_tiles(dq, dsum, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                         stride_vd, tok, slope2, qk_scale, seqlen, mid, t_end,
                         HEAD_DIM, BLOCK_N, HAS_ALIBI, True, IEEE)
    # The dk/dv kernel and the sink gradient take delta from sum_j P_ij dP_ij, accumulated above
    # in fp32 over the very tiles (fp32 P) of this row: rowsum(dO * O) through the 16-bit O carries
    # O's rounding (and P's bf16 rounding inside P @ V), which dsink = -sum_i p_sink,i delta_i
    # accumulates over all rows (measured 3-6x the fp32-math reference's error on the H100).
    delta_x = dsum - dlse
    tl.store(DELTA + row, delta_x, mask=row_ok)
    sink = tl.load(SINK + head).to(tl.float32)
    tl.store(PSINK + row, tl.exp(sink - lse) * delta_x, mask=row_ok)
    dq = dq * sm_scale
    tl.store(DQ + bb * stride_dqb + tok[:, None] * stride_dqs + head[:, None] * stride_dqh
             + dd[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qs, stride_qh, stride_qd, stride_dos, stride_doh, stride_dod,
    h0, offs_n, slope2, qk_scale, seqlen, lo, hi,
    PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // PACK
    r = tl.arange(0, BLOCK_M)
    head = h0 + r % PACK
    dd = tl.arange(0, HEAD_DIM)
    for t0 in range(lo, hi, BLOCK_T):
        tok = t0 + r // PACK
        row_ok = (r < BLOCK_T * PACK) & (tok < seqlen)
        q = tl.load(q_base + tok[:, None] * stride_qs + head[:, None] * stride_qh
                    + dd[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + tok[:, None] * stride_dos + head[:, None] * stride_doh
                     + dd[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
        row = head * seqlen + tok
        # Padding rows get lse = +inf, hence p = 0 and no contribution.
        lse2 = tl.load(lse_base + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + row, mask=row_ok, other=0.0)
        # Transposed tile: rows = keys [BLOCK_N], columns = packed query rows [BLOCK_M].
        sT = _dot(k, tl.trans(q), IEEE) * qk_scale
        rel = tok[None, :] - offs_n[:, None]  # i - j
        if HAS_ALIBI:
            sT = sT - slope2[None, :] * rel.to(tl.float32)
        if MASKED:
            sT = tl.where(rel >= 0, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _sink_attn_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, SLOPES, DK, DV,
    stride_qs, stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kb, stride_kh, stride_kd,
    stride_vs, stride_vb, stride_vh, stride_vd,
    stride_dos, stride_dob, stride_doh, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvd,
    seqlen, num_heads, num_groups, sm_scale, qk_scale,
    HPG: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr, LPT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // PACK
    pid_n, pid_bg = _heavy_first(tl.cdiv(seqlen, BLOCK_N), False, LPT)  # most query tiles first
    bb = pid_bg // num_groups
    g = pid_bg % num_groups
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < seqlen
    dd = tl.arange(0, HEAD_DIM)
    k = tl.load(K + bb * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks
                + dd[None, :] * stride_kd, mask=kv_ok[:, None], other=0.0)
    v = tl.load(V + bb * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs
                + dd[None, :] * stride_vd, mask=kv_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    q_base = Q + bb * stride_qb
    do_base = DO + bb * stride_dob
    lse_base = LSE + bb * num_heads * seqlen
    delta_base = DELTA + bb * num_heads * seqlen
    r = tl.arange(0, BLOCK_M)
    t_lo = (n0 // BLOCK_T) * BLOCK_T
    # Query tiles starting at or after n0 + BLOCK_N - 1 see the whole key block: no mask.
    t_mid = t_lo + tl.cdiv(n0 + BLOCK_N - 1 - t_lo, BLOCK_T) * BLOCK_T
    # The group's heads, PACK at a time; their dk/dv sum stays in registers.
    for hc in range(HPG // PACK):
        h0 = g * HPG + hc * PACK
        head = h0 + r % PACK
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634
        else:
            slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dk, dv = _dkv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                            stride_qs, stride_qh, stride_qd, stride_dos, stride_doh, stride_dod,
                            h0, offs_n, slope2, qk_scale, seqlen, t_lo, t_mid,
                            PACK, HEAD_DIM, BLOCK_M, HAS_ALIBI, True, IEEE)
        dk, dv = _dkv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                            stride_qs, stride_qh, stride_qd, stride_dos, stride_doh, stride_dod,
                            h0, offs_n, slope2, qk_scale, seqlen, t_mid, seqlen,
                            PACK, HEAD_DIM, BLOCK_M, HAS_ALIBI, False, IEEE)
    dk = dk * sm_scale
    tl.store(DK + bb * stride_dkb + g * stride_dkh + offs_n[:, None] * stride_dks
             + dd[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DV + bb * stride_dvb + g * stride_dvh + offs_n[:, None] * stride_dvs
             + dd[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelTiles:
    """Tile shape of one kernel. ``block_m`` counts packed query rows (tokens x packed heads)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class SinkAttentionConfig:
    """Fixed tiles for the three kernels (``None`` everywhere = autotune on GPU / heuristic on CPU).

    ``pack``: query heads packed per program (must divide ``H / G``); ``None`` = largest divisor
    of ``H / G`` that is ``<= 8`` (:func:`vpmoe_compile._triton.default_pack`).
    """

    fwd: Optional[KernelTiles] = None
    dq: Optional[KernelTiles] = None
    dkv: Optional[KernelTiles] = None
    pack: Optional[int] = None


_CONFIG_OVERRIDE: Optional[SinkAttentionConfig] = None


@contextlib.contextmanager
def use_config(config: Optional[SinkAttentionConfig]) -> Iterator[None]:
    """Temporarily force tile sizes for every call (tests use it to exercise many small blocks)."""
    global _CONFIG_OVERRIDE
    old = _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = config
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _interpreter_tiles(seqlen: int, pack: int) -> KernelTiles:
    # Interpreter cost ~ (#programs x #loop iterations x #ops): biggest tiles the shape allows,
    # but >= 16 everywhere so the same code also compiles for the GPU.
    tokens = min(64, max(16, _next_pow2(seqlen)))
    rows = _next_pow2(tokens * pack)
    return KernelTiles(block_m=rows, block_n=min(64, max(16, _next_pow2(seqlen))))


_AUTOTUNE_KEY = ["seqlen", "HEAD_DIM", "HPG", "PACK", "HAS_ALIBI", "LPT"]


def _cfgs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for (m, n, w, st) in rows]


# H100 candidates for d = 128, first chosen from the sm_90 resource report with Triton 3.9 (no
# local-memory spills with ALiBi on; 255 registers/thread at most). fwd: 128 packed rows = 32 tokens
# x 4 heads. Picked on the H100 (b=8, s=4096, H=8, G=2, bf16; benchmarks/results/attention_global.json):
# causal+ALiBi fwd (128, 64, 8w), dq (128, 64, 8w), dkv (32, 64, 4w). (The candidates also covered
# the former window path, which picked fwd (64, 64, 4w), dq (64, 32, 4w), dkv (32, 64, 4w).)
# dkv (32, 64, 8w) and (16, 128, 8w): 197 and 230 registers, no spills (Triton 3.9), against 252
# for the (32, 64, 4w) choice. The GPU machine's Triton 3.6 spills in most of these
# (benchmarks/tpa_static.py --family global, benchmarks/results/tpa_static_triton36.json: the
# chosen dkv (32, 64, 4w) 171 spill stores, fwd / dq (128, 64, 8w) 2 / 7), so the lists also hold
# the configurations it compiles without spills: fwd and dq (128, 32, 8w, 3 stages), dkv
# (16, 64, 8w) and (16, 128, 8w). The autotuner times them all at the first call of a shape.
_FWD_CONFIGS = _cfgs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3)])
_DQ_CONFIGS = _cfgs([(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (64, 128, 8, 2), (128, 32, 8, 3)])
_DKV_CONFIGS = _cfgs([(32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1),
                      (16, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2),
                      (32, 64, 8, 2), (16, 128, 8, 2), (16, 64, 8, 2)])

_fwd_autotuned = None
_dq_autotuned = None
_dkv_autotuned = None


def _autotuned():
    global _fwd_autotuned, _dq_autotuned, _dkv_autotuned
    if _fwd_autotuned is None:
        _fwd_autotuned = triton.autotune(_FWD_CONFIGS, key=_AUTOTUNE_KEY)(_sink_attn_fwd_kernel)
        _dq_autotuned = triton.autotune(_DQ_CONFIGS, key=_AUTOTUNE_KEY)(_sink_attn_bwd_dq_kernel)
        _dkv_autotuned = triton.autotune(_DKV_CONFIGS, key=_AUTOTUNE_KEY)(_sink_attn_bwd_dkv_kernel)
    return _fwd_autotuned, _dq_autotuned, _dkv_autotuned


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def output_residual_dtype(out_dtype: torch.dtype) -> Optional[torch.dtype]:
    """dtype of the forward's output rounding residual: bf16 for 16-bit outputs (bf16's exponent
    range also holds fp16's residuals), ``None`` (no residual needed) for fp32 outputs."""
    return torch.bfloat16 if out_dtype in (torch.bfloat16, torch.float16) else None


def residual_helps(seqlen: int) -> bool:
    """Whether the forward should keep O's rounding residual for the backward's ``dq``.

    The ``dq`` kernel forms ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)`` taken before
    it sees the row's tiles (dk/dv and dsink use the exact ``sum_j P_ij dP_ij`` it accumulates
    along the way). Where a row has few keys, one ``P_ij ~ 1 - p_sink`` dominates and ``dP - delta``
    cancels, so ``delta`` needs O to better than 16 bits. With many keys the rounding averages out
    and the residual's extra write + read of O's size buys nothing measurable. Full causal rows
    see ``(s + 1) / 2`` keys on average: the residual is kept for ``s <= 15``
    (:func:`vpmoe_compile._triton.needs_exact_delta`, the rule shared with the window kernels)."""
    return needs_exact_delta(seqlen)


def planned_residual_dtype(out_dtype: torch.dtype, seqlen: int,
                           store: Optional[bool] = None) -> Optional[torch.dtype]:
    """dtype of the ``out_lo`` the forward returns (``None``: none), the one decision shared by the
    launcher and the fake implementation of the op that calls it. ``store``: force on/off;
    default :func:`residual_helps`."""
    if not (store if store is not None else residual_helps(seqlen)):
        return None
    return output_residual_dtype(out_dtype)


def _check_runnable(t) -> None:
    """Raise unless the kernels can run on the device of ``t`` (a tensor or a device)."""
    device = t.device if isinstance(t, torch.Tensor) else t if isinstance(t, torch.device) else torch.device(t)
    if device.type == "cuda":
        if _INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "sink attention (triton): the kernels were created in TRITON_INTERPRET=1 mode; "
                "unset TRITON_INTERPRET to run them on CUDA tensors."
            )
        return
    if device.type == "cpu":
        if not _INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "sink attention backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before vpmoe_compile.ops is imported (or use "
                "backend='reference' / 'auto' on CPU)."
            )
        return
    raise RuntimeError(f"sink attention (triton): unsupported device {device}")


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_supported(shapes, dtype: Optional[torch.dtype] = None, device=None) -> None:
    """Raise (``TypeError`` / ``ValueError`` / ``RuntimeError``, naming the limit) unless the
    kernels run ``shapes = {"head_dim": d}`` in ``dtype`` on ``device``: bf16 / fp16 / fp32,
    ``d`` a power of two in [16, 256], a CUDA device (kernels built without the interpreter) or
    the CPU under ``TRITON_INTERPRET=1``. ``None`` is not judged. The op also passes
    ``"alibi_with_window": True`` for ALiBi slopes together with a window, which no Triton kernel
    runs (the window flavour runs on the sliding-window family, which has no ALiBi)."""
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"sink attention (triton): dtype {dtype} unsupported; use bf16/fp16/fp32 "
            "(float64 only with backend='reference')"
        )
    d = shapes.get("head_dim")
    if d is not None and (d < 16 or d > 256 or d & (d - 1)):
        raise ValueError(f"sink attention (triton): head dim d={d} must be a power of two in [16, 256]")
    if shapes.get("alibi_with_window"):
        raise ValueError(
            "sink attention (triton): ALiBi slopes together with a sliding window have no Triton kernel: "
            "the window runs on the one sliding-window kernel family "
            "(vpmoe_compile.ops.tpa_attention.triton.swa_fwd / swa_bwd), which has no ALiBi, and the "
            "vpMoE model never combines them (ALiBi on the global full-causal layers, the window on the "
            "local layers); use backend='reference' for ALiBi + window"
        )
    if device is not None:
        _check_runnable(device)


def supports(shapes, dtype: Optional[torch.dtype] = None, device=None) -> bool:
    """Whether :func:`check_supported` accepts the arguments (the kernel policy asks this)."""
    try:
        check_supported(shapes, dtype, device)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def _kernel_dtype(x: torch.Tensor) -> torch.Tensor:
    # The interpreter multiplies bf16 bit patterns in tl.dot: compute in fp32 there.
    if _INTERPRET_AT_IMPORT and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


def _resolve(config: Optional[SinkAttentionConfig], hpg: int):
    cfg = config if config is not None else _CONFIG_OVERRIDE
    if cfg is None:
        cfg = SinkAttentionConfig()
    pack = cfg.pack if cfg.pack is not None else default_pack(hpg)
    if hpg % pack != 0:
        raise ValueError(f"sink attention: pack={pack} must divide heads per group {hpg}")
    return cfg, pack


def _tiles_for(tiles: Optional[KernelTiles], seqlen: int, pack: int, kind: str):
    if tiles is not None:
        if tiles.block_m // pack < 1:
            raise ValueError(f"sink attention: block_m={tiles.block_m} < pack={pack}")
        return tiles
    if _INTERPRET_AT_IMPORT:
        t = _interpreter_tiles(seqlen, pack)
        if kind == "dkv":  # keys in N, packed query rows in M
            return KernelTiles(block_m=t.block_m, block_n=t.block_n)
        return t
    return None  # autotune


def sink_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    slopes: Optional[torch.Tensor],
    softmax_scale: float,
    config: Optional[SinkAttentionConfig] = None,
    return_residual: bool = False,
    store_residual: Optional[bool] = None,
):
    """Full causal forward (optional ALiBi ``slopes``). Returns ``out [s, b, H, d]`` (contiguous,
    ``q.dtype``) and ``lse [b, H, s]`` fp32; with ``return_residual=True`` also ``out_lo``
    (``None`` where not stored).

    ``out_lo [s, b, H, d]`` bf16 is the rounding residual ``o_fp32 - float(out)`` of a 16-bit
    output, stored when ``store_residual`` (default: :func:`residual_helps`) and the output is
    16-bit. Passed back to :func:`sink_attention_bwd_triton`, it makes the ``dq`` kernel's
    ``delta = rowsum(dO * O)`` fp32-accurate: without it ``dP - delta`` cancels where one key holds
    almost all of a row's mass (short sequences, s = 1; the former window path measured it on the
    H100 in bf16 at window 1 as dq 2.2-2.5x the error of an fp32-math reference). It costs one
    extra bf16 write (forward) and read (backward) of ``O``'s size.

    Inputs are assumed validated (see :mod:`vpmoe_compile.ops.sink_attention.op`).
    """
    _check_runnable(q)
    s, b, H, d = q.shape
    G = k.shape[2]
    hpg = H // G
    out_dtype = q.dtype
    q, k, v = _kernel_dtype(q), _kernel_dtype(k), _kernel_dtype(v)
    cfg, pack = _resolve(config, hpg)
    res_dtype = None
    if return_residual:
        res_dtype = planned_residual_dtype(out_dtype, s, store_residual)
    # The interpreter's fp32 -> 16-bit casts truncate (the GPU rounds to nearest even), so there the
    # kernel writes fp32 and the launcher rounds and forms the residual with torch (RNE, as on GPU).
    emulate_store = _INTERPRET_AT_IMPORT and out_dtype != q.dtype
    out = torch.empty((s, b, H, d), dtype=q.dtype if emulate_store else out_dtype, device=q.device)
    out_lo = None
    if res_dtype is not None and not emulate_store:
        out_lo = torch.empty_like(out, dtype=res_dtype)
    lse = torch.empty((b, H, s), dtype=torch.float32, device=q.device)
    has_alibi = slopes is not None
    slopes_t = slopes.contiguous() if has_alibi else sink  # dummy pointer when unused
    sink_c = sink.contiguous()
    args = (
        q, k, v, sink_c, slopes_t, out, out_lo if out_lo is not None else out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        s, H, float(softmax_scale) * _LOG2E,
    )
    consts = dict(HPG=hpg, PACK=pack, HEAD_DIM=d, HAS_ALIBI=has_alibi,
                  STORE_LO=out_lo is not None, IEEE=ieee_fp32(q.dtype), LPT=HEAVY_FIRST)
    tiles = _tiles_for(cfg.fwd, s, pack, "fwd")
    if tiles is None:
        kern = _autotuned()[0]
        grid = lambda meta: _grid(triton.cdiv(s, meta["BLOCK_M"] // pack), b * (H // pack))  # noqa: E731
        kern[grid](*args, **consts)
    else:
        grid = _grid(triton.cdiv(s, tiles.block_m // pack), b * (H // pack))
        _sink_attn_fwd_kernel[grid](*args, **consts, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                                    num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if emulate_store:
        out32, out = out, out.to(out_dtype)
        if res_dtype is not None:
            out_lo = (out32 - out.float()).to(res_dtype)
    if return_residual:
        return out, lse, out_lo
    return out, lse


def sink_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    slopes: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    dlse: Optional[torch.Tensor] = None,
    config: Optional[SinkAttentionConfig] = None,
    out_lo: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full causal backward. Returns ``dq [s,b,H,d]``, ``dk, dv [s,b,G,d]`` (input dtypes) and ``dsink [H]``
    (``sink.dtype``; computed in fp32 and reduced in a fixed order).

    ``lse`` is the sink-inclusive LSE of the forward; ``dlse`` (optional ``[b, H, s]``) is a
    gradient flowing into that LSE (it enters as ``delta - dlse``). ``out_lo`` (optional, same
    shape as ``out``) is the forward's output rounding residual; pass it for 16-bit outputs.
    """
    _check_runnable(q)
    s, b, H, d = q.shape
    G = k.shape[2]
    hpg = H // G
    dtypes = (q.dtype, k.dtype, v.dtype)
    if out_lo is not None and out_lo.stride() != out.stride():
        out, out_lo = out.contiguous(), out_lo.contiguous()
    q, k, v = _kernel_dtype(q), _kernel_dtype(k), _kernel_dtype(v)
    dout = _kernel_dtype(dout)
    if out_lo is not None and out_lo.shape != out.shape:
        raise ValueError(f"sink attention: out_lo {tuple(out_lo.shape)} must match out {tuple(out.shape)}")
    cfg, pack = _resolve(config, hpg)
    lse = lse.contiguous().float()
    sink_c = sink.contiguous()
    has_alibi = slopes is not None
    slopes_t = slopes.contiguous() if has_alibi else sink_c
    qk_scale = float(softmax_scale) * _LOG2E

    consts = dict(HPG=hpg, PACK=pack, HEAD_DIM=d, HAS_ALIBI=has_alibi, IEEE=ieee_fp32(q.dtype),
                  LPT=HEAVY_FIRST)
    # 1) dq, delta = rowsum(dO * O) - dlse, per-row sink terms exp(sink - L) * delta.
    delta = torch.empty((b, H, s), dtype=torch.float32, device=q.device)
    psink = torch.empty((b, H, s), dtype=torch.float32, device=q.device)
    dlse_t = dlse.contiguous().float() if dlse is not None else lse
    dq = torch.empty((s, b, H, d), dtype=q.dtype, device=q.device)
    dq_args = (
        q, k, v, out, out_lo if out_lo is not None else out, dout, lse, dlse_t, sink_c, slopes_t,
        dq, delta, psink,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        s, H, float(softmax_scale), qk_scale,
    )
    consts_dq = dict(consts, HAS_DLSE=dlse is not None, HAS_LO=out_lo is not None)
    tiles = _tiles_for(cfg.dq, s, pack, "dq")
    if tiles is None:
        kern = _autotuned()[1]
        grid = lambda meta: _grid(triton.cdiv(s, meta["BLOCK_M"] // pack), b * (H // pack))  # noqa: E731
        kern[grid](*dq_args, **consts_dq)
    else:
        grid = _grid(triton.cdiv(s, tiles.block_m // pack), b * (H // pack))
        _sink_attn_bwd_dq_kernel[grid](*dq_args, **consts_dq, BLOCK_M=tiles.block_m,
                                       BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
                                       num_stages=tiles.num_stages)
    # Fixed shape, fixed order reduction (no atomics): deterministic.
    dsink = (-psink.sum(dim=(0, 2))).to(sink.dtype)
    # 2) dk, dv (GQA sum over the group's heads inside each program).
    dk = torch.empty((s, b, G, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((s, b, G, d), dtype=v.dtype, device=q.device)
    dkv_args = (
        q, k, v, dout, lse, delta, slopes_t, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        s, H, G, float(softmax_scale), qk_scale,
    )
    tiles = _tiles_for(cfg.dkv, s, pack, "dkv")
    if tiles is None:
        kern = _autotuned()[2]
        grid = lambda meta: _grid(triton.cdiv(s, meta["BLOCK_N"]), b * G)  # noqa: E731
        kern[grid](*dkv_args, **consts)
    else:
        grid = _grid(triton.cdiv(s, tiles.block_n), b * G)
        _sink_attn_bwd_dkv_kernel[grid](*dkv_args, **consts, BLOCK_M=tiles.block_m,
                                        BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
                                        num_stages=tiles.num_stages)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dsink
