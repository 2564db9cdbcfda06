"""Fused Triton kernels for NorMuon banks of short-wide matrices (``min(m, n) <= 128``).

The PyTorch path (:func:`.polar_express._pe_batched`) runs every Polar Express step as three
batched GEMMs (``A = X X^T``, ``B = b A + c A^2``, ``X <- a X + B X``). For the vpMoE expert
banks (``[N, 128, 1024]``) those GEMMs are memory bound (``K = 128``) and ``baddbmm`` first copies
``X`` into its output: about 12 bytes per element and step move through HBM, six passes over ``X``.

Here one program owns one matrix ``X`` (oriented ``[s, L]``, ``s <= 128``, stored in place, row-
or column-major so tall members need no transpose) and runs the whole iteration itself,
sweeping ``X`` in column tiles ``[s, BLOCK_L]``:

* sweep 0 accumulates the Gram matrix ``G = X X^T`` (fp32, in registers) of the normalised input
  ``round(round(U) * gamma)``, ``gamma = 1 / ((1 + safety) ||U||_F + eps)``;
* step ``t`` forms ``A = round(G)``, ``B = round(b_t A + c_t A A)`` (an ``s x s`` product in the
  same program), then sweeps the tiles: ``X' = round(a_t X + B X)`` (fp32 accumulation, as
  ``baddbmm``), stores ``X'`` over ``X`` (each tile depends only on its own columns) and
  accumulates the next Gram matrix from the rounded ``X'``;
* the last sweep accumulates the per-neuron sums of squares of the output.

Two kernels:

* :func:`polar_express_fused_` -- Polar Express alone (input ``round(U)`` and ``||U||_F^2`` from
  a compiled prologue; the per-neuron sums go to a compiled epilogue);
* :func:`normuon_bank_fused_` -- the whole NorMuon step of a bank (steps 1-10 of
  docs/design.md#the-normuon-update): its
  sweep 0 also does the momentum / Nesterov update (reading the gradient from the bank, or in
  place through a table of addresses), writes ``round(U)`` to a workspace and accumulates
  ``||U||_F^2`` and ``round(U) round(U)^T`` (the normalisation is folded into the Gram matrix);
  its last sweep also updates the second moment, and a final sweep writes
  ``W * (1 - lr wd) - lr k O`` (or ``-lr k O`` for the caller to scatter);
  :func:`normuon_banks_fused_` runs the members of several banks in one launch, each program
  reading its matrices' addresses from a ``[4, N]`` table (:func:`member_addresses`).

**Gram form** (``form="gram"``, NorMuon's default ``pe_form``; docs/design.md#gram-form): the
steps run on the ``s x s`` Gram matrix (state in fp16 on the GPU, :data:`GRAM_F16`: each product
accumulated in fp32 and rounded once; fp32 with IEEE products in exact runs) and their product
``Q`` is applied to ``X`` once, with one restart: after sweep 0, a restart sweep ``X <- round(Q X)``
(with its Gram matrix anew), then the last sweep; the bank kernel takes per-row statistics from
the output's Gram matrix, sweeps per-column ones without storing the output, and forms the
output inside its update pass. Its rounding points are
:func:`.polar_express._pe_gram_polynomial`'s.

In the standard form every rounding point is the PyTorch path's (bf16 Gram, bf16 ``B``, bf16 ``X`` after every step,
fp32 accumulation inside each product), except that the normalisation rounds twice
(``round(round(U) * gamma)`` instead of ``round(U * gamma)``; the bank kernel also scales the
Gram matrix instead of the input of sweep 0); results are validated against the fp64 reference
like every fast path (the bound of docs/design.md#polar-express). Between sweeps the program's
own global stores are re-read by other threads of the same program: a CTA barrier separates the sweeps. With ~132 matrices in
flight (33 MB at ``[128, 1024]`` bf16) the repeated sweeps are mostly served by the 50 MB L2.

**Workspace.** The bank kernel's bf16 ``X`` is either one matrix per member or, on the GPU, one
per SM (:func:`sm_workspace`, ``x_per_sm=True``, opt-in; the program finds its slot by
``%smid``): every member that SM runs reuses the same 256 KB, which can stay in L2, instead of
``N`` fresh matrices whose dirty lines are written back to HBM (docs/design.md#banks).

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels run in fp32 (the interpreter's bf16
``tl.dot`` is not reliable); on the GPU in bf16 (fp32 with ``input_precision="ieee"`` for
exactness checks). Hyper-parameters are read from 0-d device tensors: no host synchronisation,
CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vpmoe_compile._triton import dot as _dot

from .polar_express import PE_FORMS

__all__ = [
    "fused_pe_supported", "polar_express_fused_", "normuon_bank_fused_", "MAX_ROWS", "FORMS",
    "GRAM_RESTART", "L2_HINTS", "coefficient_tensor", "GRAM_F16", "KEEP_X0", "sm_slots",
    "sm_workspace", "SharedWorkspaceError", "normuon_banks_fused_", "member_addresses",
]

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
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in the matrix unit (fp32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_hint(ptr, mask, EVICT: tl.constexpr, EVEN: tl.constexpr = False):
    """``tl.load`` with the L2 eviction priority ``EVICT`` (``""``: none); ``EVEN``: the tile is
    whole (``s == BS`` and ``BL`` divides ``L``), so ``mask`` is not applied (a pipelined loop
    then carries no mask tensors in registers)."""
    if EVEN:
        if EVICT == "":
            return tl.load(ptr)
        else:
            return tl.load(ptr, eviction_policy=EVICT)
    else:
        if EVICT == "":
            return tl.load(ptr, mask=mask, other=0.0)
        else:
            return tl.load(ptr, mask=mask, other=0.0, eviction_policy=EVICT)


@triton.jit
def _store_hint(ptr, value, mask, EVICT: tl.constexpr, EVEN: tl.constexpr = False):
    """``tl.store`` with the L2 eviction priority ``EVICT`` (``""``: none), unmasked when ``EVEN``."""
    if EVEN:
        if EVICT == "":
            tl.store(ptr, value)
        else:
            tl.store(ptr, value, eviction_policy=EVICT)
    else:
        if EVICT == "":
            tl.store(ptr, value, mask=mask)
        else:
            tl.store(ptr, value, mask=mask, eviction_policy=EVICT)


@triton.jit
def _step_matrix(gram, COEF, t: tl.constexpr, X, IEEE: tl.constexpr):
    """``B = round(b_t A + c_t A A)`` with ``A = round(gram)`` (rounding to ``X``'s dtype);
    returns ``(B, a_t)``."""
    dt = X.dtype.element_ty
    a = tl.load(COEF + 3 * t)
    b = tl.load(COEF + 3 * t + 1)
    c = tl.load(COEF + 3 * t + 2)
    A = gram.to(dt)
    Bm = (b * A.to(tl.float32) + c * _dot(A, A, IEEE)).to(dt)
    return Bm, a


@triton.jit
def _pe_leading_steps(
    X, base, rs, row_ok, SI, SL, L, gram, gamma, COEF,
    T: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr, EV_WORK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Polar Express steps ``0 .. T-2`` on the matrix at ``X + base`` (oriented element
    ``(i, l)`` at ``i * SI + l * SL``), in place; ``gram`` is the Gram matrix of the normalised
    input, ``gamma`` the normalisation applied when step 0 loads the unnormalised input
    (``EV_WORK``: L2 eviction priority of ``X``). Returns ``(B, a)`` of the last step."""
    dt = X.dtype.element_ty
    for t in tl.static_range(T - 1):
        Bm, a = _step_matrix(gram, COEF, t, X, IEEE)
        gram = tl.zeros((BS, BS), dtype=tl.float32)
        tl.debug_barrier()  # the previous sweep's stores are visible to the whole program
        for l0 in range(0, L, BL):
            cols = l0 + tl.arange(0, BL)
            mask = row_ok[:, None] & (cols < L)[None, :]
            ptr = X + base + rs[:, None] * SI + cols[None, :] * SL
            x = _load_hint(ptr, mask, EV_WORK)
            if t == 0:
                x = (x.to(tl.float32) * gamma).to(dt)
            y = _dot_acc(Bm, x, a * x.to(tl.float32), IEEE).to(dt)
            _store_hint(ptr, y, mask, EV_WORK)
            gram = _dot_acc(y, tl.trans(y), gram, IEEE)
    Bm, a = _step_matrix(gram, COEF, T - 1, X, IEEE)
    tl.debug_barrier()
    return Bm, a


@triton.jit
def _gdot(a, b, IEEE: tl.constexpr):
    """An ``s x s`` product of the Gram phase, fp32 result: fp16 operands as they are (the
    :data:`GRAM_F16` state), fp32 ones by ``tl.dot`` (TF32 on the GPU, IEEE under ``IEEE``)."""
    if a.dtype == tl.float16:
        return tl.dot(a, b)
    else:
        return _dot(a, b, IEEE)


@triton.jit
def _gram_phase(gram, COEF, T0: tl.constexpr, T1: tl.constexpr, rs, LAST_A: tl.constexpr,
                IEEE: tl.constexpr, F16: tl.constexpr):
    """Steps ``T0 .. T1-1`` in Gram space: ``P_t = a_t I + b_t A + c_t A^2``, ``A <- P_t A P_t``,
    ``Q = P_{T1-1} ... P_{T0}`` from ``A = gram``. The state ``A``, ``P``, ``Q`` is fp32 (the
    ``s x s`` products TF32 on the GPU, IEEE under ``IEEE``), or fp16 when ``F16`` (each product
    accumulated in fp32 and rounded once: the operands keep TF32's 10-bit significand, the
    products run at the half-precision rate and the state takes half the registers).

    Returns ``(Q, D)``: with ``LAST_A``, ``D`` is the diagonal of the phase output's Gram matrix
    ``P A P`` (``rowsum(PA * P)``: ``P`` and ``A`` are symmetric), else zeros."""
    sdt = tl.float16 if F16 else tl.float32
    diag = rs[:, None] == rs[None, :]
    A = gram.to(sdt)
    Q = A  # replaced at the first step
    D = tl.zeros((rs.shape[0],), dtype=tl.float32)
    for t in tl.static_range(T0, T1):
        a = tl.load(COEF + 3 * t)
        b = tl.load(COEF + 3 * t + 1)
        c = tl.load(COEF + 3 * t + 2)
        P = b * A.to(tl.float32) + c * _gdot(A, A, IEEE)
        P = tl.where(diag, P + a, P).to(sdt)
        if t + 1 < T1:  # A of the next step (P commutes with A: both are polynomials in gram)
            A = _gdot(_gdot(P, A, IEEE).to(sdt), P, IEEE).to(sdt)
        elif LAST_A:
            D = tl.sum(_gdot(P, A, IEEE).to(sdt).to(tl.float32) * P.to(tl.float32), axis=1)
        if t == T0:
            Q = P
        else:
            Q = _gdot(P, Q, IEEE).to(sdt)
    return Q.to(tl.float32), D


@triton.jit
def _pe_gram_leading(
    X, base, rs, row_ok, SI, SL, L, gram, gamma, COEF,
    T: tl.constexpr, RESTART: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr,
    LAST_A: tl.constexpr, EV_WORK: tl.constexpr, IEEE: tl.constexpr, F16: tl.constexpr,
    EVEN: tl.constexpr = False, KEEP_X0: tl.constexpr = False,
):
    """Gram Newton-Schulz form of the Polar Express steps (docs/design.md#gram-form): the steps
    run on the ``s x s`` Gram matrix and their product ``Q`` is applied to ``X`` in one sweep.
    ``gram`` is the Gram matrix of the normalised input ``gamma * X`` (``X`` holds the
    unnormalised input). With ``0 < RESTART < T`` steps ``0 .. RESTART-1`` end in a restart
    sweep that forms ``X <- round(Q X)`` in place and its Gram matrix anew (the restart keeps
    the Gram iteration stable: without it, rounding errors of the small eigenvalues grow
    step after step). Returns ``(Q, D, scale)``: the last phase's ``Q`` (fp32), the factor of
    the stored input (``gamma`` when no restart ran, else 1): the output is
    ``round(round(scale Q) X)``; with ``LAST_A`` ``D`` is the diagonal of its Gram matrix
    ``Q R Q^T`` (:func:`_gram_phase`). ``KEEP_X0``: the restart sweep leaves ``X`` as it is
    (no store): the caller forms the restarted tiles ``round(Qm x)`` again from the 4th return
    value ``Qm`` (bf16), bit for bit the tiles the restart used."""
    dt = X.dtype.element_ty
    loc = rs[:, None] * SI + tl.arange(0, BL)[None, :] * SL
    if RESTART > 0 and RESTART < T:
        Qm, _ = _gram_phase(gram, COEF, 0, RESTART, rs, False, IEEE, F16)
        Qm = (Qm * gamma).to(dt)
        gram = tl.zeros((BS, BS), dtype=tl.float32)
        tl.debug_barrier()
        for l0 in range(0, L, BL):
            cols = l0 + tl.arange(0, BL)
            mask = row_ok[:, None] & (cols < L)[None, :]
            ptr = X + base + l0 * SL + loc
            x = _load_hint(ptr, mask, EV_WORK, EVEN)
            y = _dot(Qm, x, IEEE).to(dt)
            if not KEEP_X0:
                _store_hint(ptr, y, mask, EV_WORK, EVEN)
            gram = _dot_acc(y, tl.trans(y), gram, IEEE)
        Q, D = _gram_phase(gram, COEF, RESTART, T, rs, LAST_A, IEEE, F16)
        scale = 1.0
    else:
        Q, D = _gram_phase(gram, COEF, 0, T, rs, LAST_A, IEEE, F16)
        Qm = Q.to(dt)  # (unused: no restart)
        scale = gamma
    tl.debug_barrier()
    return Q, D, scale, Qm


@triton.jit
def _last_step(Bm, a, x, gamma, T: tl.constexpr, GRAM: tl.constexpr, IEEE: tl.constexpr):
    """The last Polar Express step on one tile ``x`` of ``X``, rounded to ``X``'s dtype: ``Q x``
    (Gram form; ``Bm`` holds ``Q``) or ``a x + B x`` (standard; with one step, ``x`` is the
    unnormalised input and ``gamma`` normalises it)."""
    dt = x.dtype
    if GRAM:
        y = _dot(Bm, x, IEEE)
    else:
        if T == 1:
            x = (x.to(tl.float32) * gamma).to(dt)
        y = _dot_acc(Bm, x, a * x.to(tl.float32), IEEE)
    return y.to(dt)


@triton.jit
def _pe_fused_kernel(
    X,  # [N, S, L] oriented view (element (n, i, l) at n * SN + i * SI + l * SL), in place
    NORM2,  # [N] fp32: squared Frobenius norm of the (fp32) input
    COEF,  # [T, 3] fp32: (a, b, c) per step
    R,  # [N, S] or [N, L] fp32: sum of squares of the output (STAT != 0), else unused
    S,
    L,
    SN,
    SI,
    SL,
    safety,
    eps,
    T: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    STAT: tl.constexpr,
    GRAM: tl.constexpr,
    RESTART: tl.constexpr,
    IEEE: tl.constexpr,
    F16: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, BS)
    row_ok = rs < S
    base = n * SN
    dt = X.dtype.element_ty
    gamma = 1.0 / ((1.0 + safety) * tl.sqrt(tl.load(NORM2 + n)) + eps)

    # sweep 0: Gram matrix of the normalised input (nothing stored)
    gram = tl.zeros((BS, BS), dtype=tl.float32)
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        mask = row_ok[:, None] & (cols < L)[None, :]
        ptr = X + base + rs[:, None] * SI + cols[None, :] * SL
        x = (tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * gamma).to(dt)
        gram = _dot_acc(x, tl.trans(x), gram, IEEE)

    if GRAM:
        Q, _, qscale, _ = _pe_gram_leading(X, base, rs, row_ok, SI, SL, L, gram, gamma, COEF, T,
                                           RESTART, BS, BL, False, "", IEEE, F16)
        Bm = (Q * qscale).to(dt)
        a = 0.0
    else:
        Bm, a = _pe_leading_steps(X, base, rs, row_ok, SI, SL, L, gram, gamma, COEF, T, BS, BL,
                                  "", IEEE)
    # last step, with the per-neuron statistics
    rrow = tl.zeros((BS,), dtype=tl.float32)
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        col_ok = cols < L
        mask = row_ok[:, None] & col_ok[None, :]
        ptr = X + base + rs[:, None] * SI + cols[None, :] * SL
        y = _last_step(Bm, a, tl.load(ptr, mask=mask, other=0.0), gamma, T, GRAM, IEEE)
        tl.store(ptr, y, mask=mask)
        if STAT == 1:
            yf = y.to(tl.float32)
            rrow += tl.sum(yf * yf, axis=1)
        if STAT == 2:
            yf = y.to(tl.float32)
            tl.store(R + n * L + cols, tl.sum(yf * yf, axis=0), mask=col_ok)
    if STAT == 1:
        tl.store(R + n * S + rs, rrow, mask=row_ok)


@triton.jit
def _smid():
    """The id of the SM running this program (PTX ``%smid``; GPU only)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _lerp(start, end, w):
    """``torch.lerp`` (both branches, as ATen, for ``w`` of either size)."""
    return tl.where(w < 0.5, start + w * (end - start), end - (end - start) * (1.0 - w))


@triton.jit(do_not_specialize=["NT"])  # (one compiled kernel for every member count)
def _normuon_bank_kernel(
    G,  # [N, m, n] fp32 gradients; receives -lr * Delta when HAS_W is False
    GP,  # [N] int64 addresses of the N gradients (G_PTRS), read instead of G; with TABLE the
    # [4, NT] member address table (rows: gradient, momentum, second moment, parameter)
    M,  # [N, m, n] fp32 momentum (in / out)
    V,  # [N, S] (STAT 1) or [N, L] (STAT 2) fp32 second moment (in / out)
    W,  # [N, m, n] fp32 parameters (HAS_W), W <- W * decay - lr * Delta
    X,  # [N, m, n] workspace in the Polar Express dtype
    COEF,
    MU,  # 0-d hyper-parameter tensors
    LR,
    DECAY,
    BETA2,
    EPS,
    S,
    L,
    SI,
    SL,
    safety,
    pe_eps,
    scale,  # shape_scale ("shape") or rms_scale ("rms0.2")
    NT,  # members of the launch (TABLE: the address table's row length)
    T: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
    STAT: tl.constexpr,
    SHAPE_MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    G_PTRS: tl.constexpr,
    GRAM: tl.constexpr,
    RESTART: tl.constexpr,
    GRAM_STATS: tl.constexpr,  # GRAM with per-row statistics: taken from the Gram matrix
    EV_ONCE: tl.constexpr,  # L2 eviction priority of data touched once (G, M, W; X's last read)
    EV_WORK: tl.constexpr,  # and of the workspace X between its sweeps
    IEEE: tl.constexpr,
    F16: tl.constexpr,  # Gram-phase products with fp16 operands (_gdot)
    EVEN: tl.constexpr,  # S == BS and BL divides L: whole tiles, no masks
    SLOT_X: tl.constexpr,  # X is a workspace per SM ([slots, m, n], indexed by %smid)
    KEEP_X0: tl.constexpr,  # Gram form: the restart does not store X (formed again when read)
    TABLE: tl.constexpr,  # G, M, V, W of each member through GP's address table (HAS_W)
):
    _normuon_bank_member(
        tl.program_id(0).to(tl.int64), G, GP, M, V, W, X, COEF, tl.load(MU), tl.load(LR),
        tl.load(DECAY), tl.load(BETA2), tl.load(EPS), S, L, SI, SL, safety, pe_eps, scale, NT, T,
        BS, BL, STAT, SHAPE_MODE, HAS_W, G_PTRS, GRAM, RESTART, GRAM_STATS, EV_ONCE, EV_WORK, IEEE,
        F16, EVEN, SLOT_X, KEEP_X0, TABLE,
    )


@triton.jit
def _normuon_bank_member(
    n, G, GP, M, V, W, X, COEF, mu, lr, decay, beta2, eps, S, L, SI, SL, safety, pe_eps, scale,
    NT, T: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr, STAT: tl.constexpr,
    SHAPE_MODE: tl.constexpr, HAS_W: tl.constexpr, G_PTRS: tl.constexpr, GRAM: tl.constexpr,
    RESTART: tl.constexpr, GRAM_STATS: tl.constexpr, EV_ONCE: tl.constexpr,
    EV_WORK: tl.constexpr, IEEE: tl.constexpr, F16: tl.constexpr, EVEN: tl.constexpr,
    SLOT_X: tl.constexpr, KEEP_X0: tl.constexpr, TABLE: tl.constexpr,
):
    """The whole NorMuon step of member ``n`` (int64) of a bank (see :func:`_normuon_bank_kernel`)."""
    rs = tl.arange(0, BS)
    row_ok = rs < S
    base = n * S * L
    dt = X.dtype.element_ty
    # the member's own matrices as scalar base pointers; tile l0 of each is the scalar pointer
    # ``base + l0 * SL`` plus the loop-invariant int32 offsets ``loc`` (no per-tile pointer or
    # offset tensors for the software pipeliner to carry between iterations)
    if TABLE:
        # members of several banks in one launch: their matrices' addresses (gradient, momentum
        # and parameter 16-byte aligned: checked by the caller)
        gsrc = tl.multiple_of(tl.load(GP + n).to(tl.pointer_type(tl.float32)), 16)
        Mb = tl.multiple_of(tl.load(GP + NT + n).to(tl.pointer_type(tl.float32)), 16)
        Vb = tl.load(GP + 2 * NT + n).to(tl.pointer_type(tl.float32))
        Wb = tl.multiple_of(tl.load(GP + 3 * NT + n).to(tl.pointer_type(tl.float32)), 16)
        Gb = gsrc
    else:
        if G_PTRS:
            # this matrix's own gradient (16-byte aligned: checked by the caller)
            gsrc = tl.multiple_of(tl.load(GP + n).to(tl.pointer_type(tl.float32)), 16)
        else:
            gsrc = G + base
        Mb = M + base
        if STAT == 1:
            Vb = V + n * S
        else:
            Vb = V + n * L
        Wb = W + base
        Gb = G + base
    if SLOT_X:  # the workspace of this SM (one program per SM at a time; see normuon_bank_fused_)
        xbase = _smid().to(tl.int64) * S * L
    else:
        xbase = base
    Xb = X + xbase
    loc = rs[:, None] * SI + tl.arange(0, BL)[None, :] * SL

    # sweep 0: momentum, Nesterov, rounded Polar Express input, its norm and Gram matrix
    gram = tl.zeros((BS, BS), dtype=tl.float32)
    sq = tl.zeros((BS,), dtype=tl.float32)
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        mask = row_ok[:, None] & (cols < L)[None, :]
        t0 = l0 * SL
        g = _load_hint(gsrc + t0 + loc, mask, EV_ONCE, EVEN)
        m = _lerp(_load_hint(Mb + t0 + loc, mask, EV_ONCE, EVEN), g, 1.0 - mu)  # 1
        _store_hint(Mb + (loc + t0), m, mask, EV_ONCE, EVEN)  # (not the load's pointer tensor:
        # the pipeliner would carry that one between iterations, in registers)
        u = _lerp(g, m, mu)  # 2
        sq += tl.sum(u * u, axis=1)
        x = u.to(dt)
        _store_hint(Xb + (loc + t0), x, mask, EV_WORK, EVEN)
        gram = _dot_acc(x, tl.trans(x), gram, IEEE)
    gamma = 1.0 / ((1.0 + safety) * tl.sqrt(tl.sum(sq, axis=0)) + pe_eps)
    gram = gram * (gamma * gamma)

    # KEEP_X0 (Gram form with a restart): X keeps the input; each sweep below forms round(Qm x)
    REFORM: tl.constexpr = GRAM and KEEP_X0 and RESTART > 0 and RESTART < T
    if GRAM:
        Q, D_out, qscale, Qm = _pe_gram_leading(X, xbase, rs, row_ok, SI, SL, L, gram, gamma,
                                                COEF, T, RESTART, BS, BL, GRAM_STATS, EV_WORK,
                                                IEEE, F16, EVEN, KEEP_X0)
        Bm = (Q * qscale).to(dt)
        a = 0.0
    else:
        Bm, a = _pe_leading_steps(X, xbase, rs, row_ok, SI, SL, L, gram, gamma, COEF, T, BS, BL,
                                  EV_WORK, IEEE)
        Qm = Bm

    # last step: O, per-neuron mean squares, second moment (4-5), norms of O and s * O
    rrow = tl.zeros((BS,), dtype=tl.float32)
    racc = tl.zeros((BL,), dtype=tl.float32)
    sacc = tl.zeros((BL,), dtype=tl.float32)
    if GRAM_STATS:
        # Gram form, per-row statistics: ||O_i||^2 is the diagonal of the output's Gram matrix
        # (one more Gram-space step), so no sweep is needed here; the update pass forms O itself.
        rrow = D_out
    else:
        for l0 in range(0, L, BL):
            cols = l0 + tl.arange(0, BL)
            col_ok = cols < L
            mask = row_ok[:, None] & col_ok[None, :]
            t0 = l0 * SL
            xt = _load_hint(Xb + t0 + loc, mask, EV_WORK, EVEN)
            if REFORM:
                xt = _dot(Qm, xt, IEEE).to(dt)
            y = _last_step(Bm, a, xt, gamma, T, GRAM, IEEE)
            if not GRAM:  # (the Gram form's update pass forms O again from X and Q)
                _store_hint(Xb + t0 + loc, y, mask, EV_WORK, EVEN)
            yf = y.to(tl.float32)
            if STAT == 1:
                rrow += tl.sum(yf * yf, axis=1)
            else:
                rcol = tl.sum(yf * yf, axis=0)
                v = _lerp(tl.load(Vb + cols, mask=col_ok, other=0.0), rcol / S, 1.0 - beta2)
                tl.store(Vb + cols, v, mask=col_ok)
                sl = tl.where(col_ok, tl.rsqrt(v + eps), 0.0)
                racc += rcol
                sacc += rcol * sl * sl
    if STAT == 1:
        v = _lerp(tl.load(Vb + rs, mask=row_ok, other=0.0), rrow / L, 1.0 - beta2)
        tl.store(Vb + rs, v, mask=row_ok)
        si = tl.where(row_ok, tl.rsqrt(v + eps), 0.0)
        R = tl.sum(rrow, axis=0)
        Ssum = tl.sum(rrow * si * si, axis=0)
    else:
        R = tl.sum(racc, axis=0)
        Ssum = tl.sum(sacc, axis=0)
    # 6-9: k = s * sqrt(R) / max(sqrt(S), eps) * shape_scale, or s * rms_scale / max(sqrt(S), eps)
    if SHAPE_MODE:
        c = tl.sqrt(R) / tl.maximum(tl.sqrt(Ssum), eps) * scale
    else:
        c = scale / tl.maximum(tl.sqrt(Ssum), eps)
    tl.debug_barrier()
    # 10: update pass
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        col_ok = cols < L
        mask = row_ok[:, None] & col_ok[None, :]
        t0 = l0 * SL
        if GRAM:
            xt = _load_hint(Xb + t0 + loc, mask, EV_ONCE, EVEN)
            if REFORM:
                xt = _dot(Qm, xt, IEEE).to(dt)
            o = _dot(Bm, xt, IEEE).to(dt).to(tl.float32)
        else:
            o = _load_hint(Xb + t0 + loc, mask, EV_ONCE, EVEN).to(tl.float32)
        if STAT == 1:
            k = (si * c)[:, None]
        else:
            v = tl.load(Vb + cols, mask=col_ok, other=0.0)
            k = (tl.rsqrt(v + eps) * c)[None, :]
        delta = (k * o) * (-lr)
        if HAS_W:
            w = _load_hint(Wb + t0 + loc, mask, EV_ONCE, EVEN)
            _store_hint(Wb + t0 + loc, w * decay + delta, mask, EV_ONCE, EVEN)
        else:
            _store_hint(Gb + t0 + loc, delta, mask, EV_ONCE, EVEN)


def coefficient_tensor(table: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """The ``[T, 3]`` fp32 table on ``device``, made once per table and device (cached)."""
    key = (tuple(tuple(float(v) for v in row) for row in table), device)
    coef = _coef_cache.get(key)
    if coef is None:
        coef = torch.tensor(key[0], dtype=torch.float32, device=device).contiguous()
        _coef_cache[key] = coef
    return coef


#: Launch configuration ``(BLOCK_L, num_warps, num_stages)`` for 128-row matrices (the expert
#: banks), per kernel and form; from ``benchmarks/optimizer.py --pe-tune`` on an H100
#: (``kernel_sweep`` of ``benchmarks/results/optimizer_vpmoe-8l_launch_sweep.json`` and
#: ``optimizer_vpmoe-8l_gram.json``): 3 stages beat 2 for every kernel (standard bank kernel 4.03
#: vs 4.80 ms on 1792 x [128, 1024]); 16 warps and ``BLOCK_L`` 32 were slower.
LAUNCH_128 = {"pe": (64, 8, 3), "bank": (64, 8, 3), "pe_gram": (64, 8, 3), "bank_gram": (64, 8, 3)}

#: L2 eviction priorities of the bank kernels, per form (``normuon_bank_fused_(l2_hints=None)``):
#: the gradient, momentum and parameters are touched once per step and loaded / stored
#: ``evict_first``; the bf16 workspace ``X``, re-read by the program's later sweeps, is kept
#: ``evict_last`` until its last read. With one program per SM, ~132 workspaces of 256 KB
#: (33 MB at ``[128, 1024]``) are live at once, within the H100's 50 MB L2. Measured on an H200
#: (``benchmarks/results/optimizer_vpmoe-8l_overlap.json``): the Gram form's bank step on
#: 1792 x [128, 1024] 2.33 vs 2.39 ms without (per-row statistics), 2.79 vs 2.78 ms (per-column).
L2_HINTS = {"bank": True, "bank_gram": True}


def _launch_config(
    S: int, L: int, block_l, num_warps, num_stages, kind: str = "pe"
) -> Tuple[int, int, int, int]:
    BS = _block_rows(S)
    if BS >= 128:
        d_bl, d_nw, d_ns = LAUNCH_128[kind]
    else:
        d_bl, d_nw, d_ns = (64 if BS >= 64 else 128), 4, 2
    block_l = d_bl if block_l is None else block_l
    block_l = max(16, min(block_l, 1 << (int(L) - 1).bit_length()))
    return BS, block_l, num_warps or d_nw, num_stages or d_ns


#: Gram-form products (the ``s x s`` steps) with fp16 operands instead of TF32 (both keep a
#: 10-bit significand; fp16 runs at twice the TF32 matrix rate). Off under ``IEEE`` (fp32 checks).
GRAM_F16 = True


def _gram_f16(flag: Optional[bool], gram: bool, ieee: bool) -> bool:
    """The kernels' ``F16``: an explicit ``flag`` wins (tests run the fp16 state in fp32 kernels),
    else :data:`GRAM_F16` outside exact (``ieee``) runs; the Gram form only."""
    if flag is not None:
        return bool(gram and flag)
    return bool(gram and GRAM_F16 and not ieee)


#: Gram form: the restart sweep of the bank kernel does not store the restarted matrix; the
#: later sweeps form it again from the stored input (``normuon_bank_fused_(keep_x0=...)``).
KEEP_X0 = False

_slots: Dict[Tuple[str, int], int] = {}
_exclusive: Dict[Tuple, bool] = {}


@triton.jit
def _nsmid_kernel(OUT):
    tl.store(OUT, tl.inline_asm_elementwise("mov.u32 $0, %nsmid;", "=r", [], dtype=tl.int32,
                                            is_pure=True, pack=1))


def sm_slots(device: torch.device) -> int:
    """Upper bound of the SM ids (``%smid``) on ``device``: PTX ``%nsmid`` (ids need not be
    contiguous, so this can exceed the SM count). Measured once per device (one tiny kernel and
    a host synchronisation: call it before any CUDA-graph capture, as NorMuon's warm-up step does)."""
    device = torch.device(device)
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _slots:
        out = torch.zeros(1, dtype=torch.int32, device=device)
        _nsmid_kernel[(1,)](out)
        _slots[key] = max(int(out.item()), torch.cuda.get_device_properties(device).multi_processor_count)
    return _slots[key]


def sm_workspace(shape: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-SM workspace ``[sm_slots, m, n]`` for :func:`normuon_bank_fused_` (GPU)."""
    return torch.empty((sm_slots(device), *shape), dtype=dtype, device=device)


def _check_one_program_per_sm(args, consts, num_warps, num_stages, grid, device) -> None:
    """A per-SM workspace is only safe if no SM runs two programs of the kernel at once: the
    compiled kernel's registers or shared memory must exceed half of the SM's (checked once per
    configuration, before its first launch)."""
    key = (tuple(sorted((k, str(v)) for k, v in consts.items())), num_warps, num_stages, str(device))
    ok = _exclusive.get(key)
    if ok is None:
        k = _normuon_bank_kernel.warmup(*args, grid=(grid,), num_warps=num_warps,
                                        num_stages=num_stages, **consts)
        k._init_handles()
        props = torch.cuda.get_device_properties(device)
        regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
        regs = int(k.n_regs) * 32 * num_warps
        ok = 2 * regs > regs_sm or 2 * int(k.metadata.shared) > smem_sm
        _exclusive[key] = ok
    if not ok:
        raise SharedWorkspaceError(
            "this bank-kernel configuration can run two programs per SM, so it cannot share a "
            "per-SM workspace: pass an [N, m, n] workspace (one matrix per member)"
        )


class SharedWorkspaceError(ValueError):
    """A per-SM workspace was passed for a kernel configuration that can run two programs on
    one SM (the caller falls back to a workspace per member)."""


#: Steps before the Gram form's restart (docs/design.md#gram-form): steps ``0, 1`` on the Gram
#: matrix of the input, then ``X <- Q X`` and the remaining steps on the Gram matrix of that.
GRAM_RESTART = 2

#: The Polar Express forms of the fused kernels.
FORMS = PE_FORMS


def _check_form(form: str) -> bool:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form == "gram"


def _check_rows(S: int, L: int) -> None:
    if S > MAX_ROWS or S > L:
        raise ValueError(f"fused Polar Express needs s <= min(L, {MAX_ROWS}), got [{S}, {L}]")


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
    form: str = "standard",
    gram_f16: Optional[bool] = None,
) -> Optional[torch.Tensor]:
    """Polar Express of every ``X[i]`` (``[N, s, L]``, ``s <= L``, ``s <= 128``), in place.

    Args:
        X: ``[N, s, L]`` bf16 (GPU) or fp32 tensor holding the *unnormalised* Polar Express
            input, rounded to the compute dtype; overwritten with the output. Each ``X[i]`` is
            stored densely, row- or column-major (the transposed view of a contiguous tall
            ``[N, L, s]`` tensor works without a copy).
        norm2: ``[N]`` fp32, ``||U_i||_F^2`` of the input before rounding.
        table: ``(a, b, c)`` per step; ``safety`` / ``eps``: normalisation
            ``X / ((1 + safety) ||U||_F + eps)`` (docs/design.md#polar-express).
        stat: 0 none; 1 return ``[N, s]`` row sums of the output squared; 2 ``[N, L]`` column sums.
        r_out: optional preallocated fp32 output for ``stat`` (CUDA-graph friendly).
        block_l, num_warps, num_stages: tile width and launch configuration (defaults by ``s``).
        ieee: fp32 products with ``input_precision="ieee"`` (exactness checks on the GPU).
        form: ``"standard"`` (every step sweeps ``X``) or ``"gram"`` (the steps run on the
            Gram matrix, restarted after :data:`GRAM_RESTART` steps; :func:`_check_form`).
        gram_f16: Gram-form products with fp16 operands (``None``: :data:`GRAM_F16`).

    Returns:
        The ``stat`` sums (fp32) or ``None``. Issues one kernel launch, no host synchronisation.
    """
    if X.ndim != 3:
        raise ValueError(f"X must be [N, s, L], got {tuple(X.shape)}")
    N, S, L = X.shape
    SN, SI, SL = X.stride()
    if N > 1 and SN != S * L or not ((SL == 1 and SI == L) or (SI == 1 and SL == S)):
        raise ValueError(
            f"X must store each [s, L] matrix densely (row- or column-major), strides {X.stride()}"
        )
    _check_rows(S, L)
    if norm2.shape != (N,) or norm2.dtype != torch.float32:
        raise ValueError("norm2 must be an fp32 [N] tensor")
    interp = interpreter_active()
    if interp and X.dtype != torch.float32:
        raise ValueError("under TRITON_INTERPRET=1 the fused Polar Express runs in fp32 only")
    gram = _check_form(form)
    BS, BL, nw, ns = _launch_config(S, L, block_l, num_warps, num_stages, "pe_gram" if gram else "pe")
    r = None
    if stat:
        size = S if stat == 1 else L
        r = r_out if r_out is not None else torch.empty((N, size), dtype=torch.float32, device=X.device)
    if N == 0:
        return r
    coef = coefficient_tensor(table, X.device)
    kwargs = {} if interp else dict(num_warps=nw, num_stages=ns)
    ieee_ = bool(ieee or X.dtype == torch.float32)
    _pe_fused_kernel[(N,)](
        X, norm2, coef, r if r is not None else norm2,
        S, L, S * L, SI, SL, float(safety), float(eps),
        T=len(coef), BS=BS, BL=BL, STAT=int(stat), GRAM=gram, RESTART=GRAM_RESTART,
        IEEE=ieee_, F16=_gram_f16(gram_f16, gram, ieee_),
        **kwargs,
    )
    return r


def normuon_bank_fused_(
    G: torch.Tensor,
    M: torch.Tensor,
    V: torch.Tensor,
    W: Optional[torch.Tensor],
    X: torch.Tensor,
    hyper: Dict[str, torch.Tensor],
    table: Sequence[Sequence[float]],
    safety: float,
    pe_eps: float,
    flip: bool,
    stat_dim: int,
    scale_mode: str,
    shape_scale: float,
    rms_scale: float,
    block_l: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    ieee: bool = False,
    grad_ptrs: Optional[torch.Tensor] = None,
    form: str = "standard",
    l2_hints: Optional[bool] = None,
    gram_f16: Optional[bool] = None,
    keep_x0: Optional[bool] = None,
    x_per_sm: bool = False,
) -> None:
    """One whole NorMuon step of a bank (steps 1-10 of docs/design.md#the-normuon-update) in one
    kernel, in place.

    One program per matrix: momentum and Nesterov (sweep 0, which also writes the rounded
    Polar Express input to ``X`` and accumulates its norm and Gram matrix), the Polar Express
    steps (in place in ``X``), the per-neuron statistics and second moment during the last step,
    then an update pass ``W <- W * decay - lr * k * O`` (or ``G <- -lr * k * O`` when ``W`` is
    None). Same arguments and semantics as ``bank_prologue`` + Polar Express + ``bank_epilogue``
    (:mod:`.banks`), except that the normalisation is folded into the Gram matrix of sweep 0
    (``gamma^2 round(U) round(U)^T``) and applied to ``round(U)`` in step 1.

    Args:
        G, M, W: ``[N, m, n]`` contiguous fp32 (original ``[out, in]`` orientation).
        V: oriented second moment ``[N, s, 1]`` / ``[N, 1, L]`` (contiguous) fp32.
        X: contiguous workspace in the Polar Express dtype (bf16 on the GPU): ``[N, m, n]``, one
            matrix per member, or with ``x_per_sm`` (GPU) :func:`sm_workspace`'s
            ``[sm_slots, m, n]``, one per SM, reused by the members that SM runs (it can stay in
            L2; before the first launch of a configuration the compiled kernel is checked to run
            one program per SM). Launches sharing a per-SM workspace must not run concurrently
            (one stream).
        hyper: 0-d tensors ``momentum, lr, decay, beta2, eps`` (fp32, on the device).
        flip: members are tall (``m > n``); ``stat_dim``: -1 per oriented row, -2 per column.
        grad_ptrs: optional ``[N]`` int64 device tensor with the addresses of the members'
            own contiguous fp32 ``[m, n]`` gradients, read instead of ``G`` (no gather copy;
            the caller keeps those tensors alive and the addresses current).
        form: ``"standard"`` or ``"gram"`` (as :func:`polar_express_fused_`).
        l2_hints: L2 eviction priorities (:data:`L2_HINTS`; ``None``: its entry for the form).
        gram_f16: Gram-form products with fp16 operands (``None``: :data:`GRAM_F16`).
        keep_x0: Gram form: the restart sweep does not store ``round(Q X)`` but the later
            sweeps form it again from ``X`` (bitwise the same values, one store of ``X`` less;
            ``None``: :data:`KEEP_X0`).
        x_per_sm: ``X`` is a per-SM workspace (above).
    """
    N, m, n = G.shape
    S, L = (n, m) if flip else (m, n)
    _check_rows(S, L)
    for name, t in (("G", G), ("M", M)) + ((("W", W),) if W is not None else ()):
        if t.shape != G.shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {tuple(G.shape)} tensor")
    if G.dtype != torch.float32 or M.dtype != torch.float32 or V.dtype != torch.float32:
        raise ValueError("the fused NorMuon bank kernel keeps its state in fp32")
    if not V.is_contiguous() or V.numel() != N * (S if stat_dim == -1 else L):
        raise ValueError(f"V {tuple(V.shape)} does not match stat_dim {stat_dim}")
    if grad_ptrs is not None and (grad_ptrs.shape != (N,) or grad_ptrs.dtype != torch.int64):
        raise ValueError("grad_ptrs must be an int64 [N] tensor")
    _launch_bank(
        N, (m, n), (G, grad_ptrs if grad_ptrs is not None else G, M, V, W if W is not None else G),
        X, hyper, table, safety, pe_eps, flip, stat_dim, scale_mode, shape_scale, rms_scale,
        block_l, num_warps, num_stages, ieee, form, l2_hints, gram_f16, keep_x0, x_per_sm,
        has_w=W is not None, g_ptrs=grad_ptrs is not None, table_mode=False,
    )


def member_addresses(
    G: torch.Tensor, M: torch.Tensor, V: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """The ``[4, N]`` int64 host address table of one bank's members for
    :func:`normuon_banks_fused_`: rows gradient, momentum, second moment and parameter of each
    member (``G``, ``M``, ``W`` contiguous ``[N, m, n]`` fp32 and ``V`` contiguous ``[N, ...]``
    fp32 on one device, as :func:`normuon_bank_fused_` takes them; ``G`` may be a placeholder
    of that shape whose row the caller overwrites with the live gradients' addresses).
    Concatenate the tables of several banks along dim 1 to launch them together."""
    N = M.shape[0]
    for name, t in (("G", G), ("M", M), ("W", W)):
        if t.dim() != 3 or t.shape != M.shape or not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a contiguous fp32 {tuple(M.shape)} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.data_ptr() % 16 or (t.stride(0) * 4) % 16:
            raise ValueError(f"{name}'s members must be 16-byte aligned (member size "
                             f"{tuple(t.shape[1:])} fp32 at address {t.data_ptr():#x})")
    if V.shape[0] != N or not V.is_contiguous() or V.dtype != torch.float32:
        raise ValueError(f"V must be a contiguous fp32 [{N}, ...] tensor, got {tuple(V.shape)}")
    devices = {t.device for t in (G, M, V, W)}
    if len(devices) != 1:
        raise ValueError(f"a bank's tensors must be on one device, got {sorted(map(str, devices))}")
    idx = torch.arange(N, dtype=torch.int64)
    return torch.stack([t.data_ptr() + idx * (t.stride(0) * t.element_size()) for t in (G, M, V, W)])


def normuon_banks_fused_(
    addresses: torch.Tensor,
    shape: Tuple[int, int],
    X: torch.Tensor,
    hyper: Dict[str, torch.Tensor],
    table: Sequence[Sequence[float]],
    safety: float,
    pe_eps: float,
    flip: bool,
    stat_dim: int,
    scale_mode: str,
    shape_scale: float,
    rms_scale: float,
    block_l: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    ieee: bool = False,
    form: str = "standard",
    l2_hints: Optional[bool] = None,
    gram_f16: Optional[bool] = None,
    keep_x0: Optional[bool] = None,
    x_per_sm: bool = False,
) -> None:
    """:func:`normuon_bank_fused_` for the members of several banks in one launch: member ``i``'s
    gradient, momentum, second moment and parameter are at ``addresses[:, i]`` (a ``[4, N]``
    int64 device table, :func:`member_addresses` of each bank concatenated along dim 1, its
    gradient row kept current by the caller), so ``N`` programs run as one grid instead of one
    launch per bank (no drain at each bank's end). Every member has the shape ``shape``
    ``[m, n]`` and the arguments ``flip`` ... ``rms_scale`` and ``hyper``; parameters are
    updated in place (there is no ``W is None`` form). ``X`` as for :func:`normuon_bank_fused_`
    (``[N, m, n]`` or, with ``x_per_sm``, a per-SM workspace). The addresses are not checked
    here (that would read the table back to the host): build them with :func:`member_addresses`.
    """
    m, n = (int(v) for v in shape)
    flip_ = m > n
    if bool(flip) != flip_:
        raise ValueError(f"flip must be {flip_} for members of shape {(m, n)}")
    S, L = (n, m) if flip else (m, n)
    _check_rows(S, L)
    if (addresses.dim() != 2 or addresses.shape[0] != 4 or addresses.dtype != torch.int64
            or not addresses.is_contiguous() or addresses.device != X.device):
        raise ValueError(f"addresses must be a contiguous int64 [4, N] tensor on {X.device}, got "
                         f"{addresses.dtype} {tuple(addresses.shape)} on {addresses.device}")
    N = addresses.shape[1]
    dummy = hyper["lr"]  # the kernel reads every matrix through the table
    _launch_bank(
        N, (m, n), (dummy, addresses, dummy, dummy, dummy), X, hyper, table, safety, pe_eps, flip,
        stat_dim, scale_mode, shape_scale, rms_scale, block_l, num_warps, num_stages, ieee, form,
        l2_hints, gram_f16, keep_x0, x_per_sm, has_w=True, g_ptrs=False, table_mode=True,
    )


def _launch_bank(
    N, shape, ptrs, X, hyper, table, safety, pe_eps, flip, stat_dim, scale_mode, shape_scale,
    rms_scale, block_l, num_warps, num_stages, ieee, form, l2_hints, gram_f16, keep_x0, x_per_sm,
    *, has_w: bool, g_ptrs: bool, table_mode: bool,
) -> None:
    """The launch shared by :func:`normuon_bank_fused_` and :func:`normuon_banks_fused_`:
    ``ptrs`` = (G, GP, M, V, W) kernel arguments; checks ``X`` and launches ``N`` programs."""
    m, n = shape
    S, L = (n, m) if flip else (m, n)
    slot_x = bool(x_per_sm)
    if (tuple(X.shape[1:]) != (m, n) or not X.is_contiguous()
            or (not slot_x and X.shape[0] != N)):
        rows = "sm_slots" if slot_x else "N"
        raise ValueError(f"X must be a contiguous [{rows}, {m}, {n}] tensor, got {tuple(X.shape)}")
    interp = interpreter_active()
    if interp and X.dtype != torch.float32:
        raise ValueError("under TRITON_INTERPRET=1 the fused NorMuon bank kernel runs in fp32 only")
    if N == 0:
        return
    gram = _check_form(form)
    kind = "bank_gram" if gram else "bank"
    BS, BL, nw, ns = _launch_config(S, L, block_l, num_warps, num_stages, kind)
    hints = L2_HINTS[kind] if l2_hints is None else bool(l2_hints)
    SI, SL = (1, S) if flip else (L, 1)
    coef = coefficient_tensor(table, X.device)
    kwargs = {} if interp else dict(num_warps=nw, num_stages=ns)
    shape_mode = scale_mode == "shape"
    ieee_ = bool(ieee or X.dtype == torch.float32)
    keep = bool(gram and (KEEP_X0 if keep_x0 is None else keep_x0))
    args = (
        *ptrs, X, coef,
        hyper["momentum"], hyper["lr"], hyper["decay"], hyper["beta2"], hyper["eps"],
        S, L, SI, SL, float(safety), float(pe_eps), float(shape_scale if shape_mode else rms_scale),
        N,
    )
    consts = dict(
        T=len(coef), BS=BS, BL=BL, STAT=1 if stat_dim == -1 else 2, SHAPE_MODE=shape_mode,
        HAS_W=has_w, G_PTRS=g_ptrs, GRAM=gram, RESTART=GRAM_RESTART,
        GRAM_STATS=gram and stat_dim == -1,
        EV_ONCE="evict_first" if hints else "", EV_WORK="evict_last" if hints else "",
        IEEE=ieee_, F16=_gram_f16(gram_f16, gram, ieee_),
        EVEN=S == BS and L % BL == 0, SLOT_X=slot_x, KEEP_X0=keep, TABLE=table_mode,
    )
    if slot_x:
        if interp:
            raise ValueError("a per-SM workspace (x_per_sm=True) needs the GPU")
        if X.shape[0] < sm_slots(X.device):
            raise ValueError(f"a per-SM workspace needs {sm_slots(X.device)} slots, X has {X.shape[0]}")
        _check_one_program_per_sm(args, consts, nw, ns, N, X.device)
    _normuon_bank_kernel[(N,)](*args, **consts, **kwargs)
