"""bf16 accuracy of the fused TPA local-attention op on the GPU (docs/design.md#benchmarks-and-checks).

* The whole op (``tpa_window_attention``, ``backend="triton"``) in bf16 against the float64
  reference, for the output and the gradient of every input (factors, qkv bias, both gains, cos,
  sin, sink): the kernel's relative error is at most 2x that of the fork's own bf16 chain
  (``tpa_fork_emulation``, its rounding points) + 1e-3. Every implementation sees the same
  bf16-representable values, so the errors measure the compute only. Against a PyTorch reference
  with fp32 math the op is not held to 2x: it rounds q/k/v and their gradients to bf16 between its
  kernels, as the fork does (the README's TPA accuracy note). In fp32 (IEEE dots)
  every error is below 1e-4. The same two rules hold with the value residual (``v1``, ``lam``),
  including the gradients to ``v1`` and to the mixing logit (one number, a sum of zero-mean
  terms: its error is taken relative to the root-sum-square of the terms, not to the sum, and
  averaged over 8 upstream gradients).
* The attention middle alone (``tpa_attention.triton.swa_fwd`` / ``swa_bwd`` on ready bf16 q/k/v;
  its backward recomputes ``delta = rowsum(P*dP)`` where rows see few keys): the rule of
  ``test_sink_attention_gpu.py``, error <= 2x that of the dense PyTorch reference on the same bf16 inputs with fp32 math (its
  results rounded to the caller's dtypes) + 1e-5, for out, lse, dq, dk, dv and dsink.

Freed GPU memory is filled with NaN before each kernel call, so an output element the kernels
never write shows up. Formerly the check part of ``benchmarks/tpa_check.py`` (the timing part is
``benchmarks/tpa.py``). Skipped without CUDA; the CPU tests (Triton interpreter) are in
``test_tpa_attention.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from vpmoe_compile.ops.sink_attention import triton as sa
from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference
from vpmoe_compile.ops.tpa_attention import reference as ref
from vpmoe_compile.ops.tpa_attention import triton as tk
from vpmoe_compile.ops.tpa_attention.layout import factor_width
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(sa.interpreter_active(), reason="kernels built for the Triton interpreter"),
]

NAMES = ("out", "factors", "qkv_bias", "gamma_q", "gamma_k", "cos", "sin", "sink")
H, G, D, RQ, R = 8, 2, 128, 4, 2  # the vpMoE local layer

# (b, s, W): the vpMoE shape at s = 1024, an odd length with W not a tile multiple, W = 1, s = 1,
# and W = 40 (with an fp32 twin for the shapes with s % 16 == 0 and s <= 128)
OP_SHAPES = {"b2_s1024_W128": (2, 1024, 128), "b1_s777_W100": (1, 777, 100), "b2_s64_W1": (2, 64, 1),
             "b3_s1_W128": (3, 1, 128), "b2_s128_W40": (2, 128, 40)}
FP32_SHAPES = ("b2_s64_W1", "b2_s128_W40")
# (b, s, H, G, d, W) of the attention middle alone: vpMoE W = 128, W = 1, s = 1, MQA at W = 1,
# 3 heads per group (packed tiles with padding rows)
MIDDLE_CASES = {"b2_s1024_W128": (2, 1024, 8, 2, 128, 128), "b3_s77_W1": (3, 77, 8, 2, 128, 1),
                "b2_s1_W128": (2, 1, 8, 2, 128, 128), "mqa_b1_s300_W1": (1, 300, 8, 1, 128, 1),
                "gqa3_b1_s300_W64": (1, 300, 6, 2, 128, 64)}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 kernels take IEEE dots only at torch's default matmul precision "highest"."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def rel(a, b):
    """Relative Frobenius error ``||a - b|| / ||b||`` in float64 (inf if ``a`` is not finite)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def poison():
    """Fill 1 GiB of the caching allocator's memory with NaN and free it, so outputs the next call
    allocates from it and never writes show up as NaN."""
    torch.full((1 << 28,), float("nan"), device="cuda")


def make_inputs(b, s, seed):
    """One local layer's inputs on the GPU, fp32 holding bf16-representable values (cos/sin exact
    fp32): ``factors [s,b,F]`` ~ N(0,1) (a packed GEMM of RMS-normalised hidden states), qkv bias,
    gains 1 +- 0.1, base-10000 GRAPE-M angles at exact positions, sink ``[H]``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = torch.randn(s, b, factor_width(H, G, D, RQ, R), generator=gen)
    bias = 0.1 * torch.randn(G * (H // G + 2) * D, generator=gen)
    gq = 1 + 0.1 * torch.randn(D, generator=gen)
    gk = 1 + 0.1 * torch.randn(D, generator=gen)
    log_freq = 16.0 * torch.log(10000.0 ** (-torch.arange(D // 2, dtype=torch.float32) * 2 / D))
    theta = torch.arange(s, dtype=torch.float32)[:, None] * torch.exp(log_freq / 16.0)[None, :]
    sink = 0.5 * torch.randn(H, generator=gen)
    dout = torch.randn(s, b, H * D, generator=gen)
    inputs = [t.bfloat16().float() for t in (factors, bias, gq, gk)] + [theta.cos(), theta.sin(),
                                                                         sink.bfloat16().float()]
    return [t.cuda() for t in inputs], dout.bfloat16().float().cuda()


def run_grads(fn, inputs, dtype, dout):
    """``fn(*inputs)`` and the gradients of every input; inputs in ``dtype`` except cos/sin and the
    value-residual logit, which stay fp32 as in the model (fp64 for the float64 reference)."""
    xs = [t.detach().to(dtype if (i not in (4, 5, 8) or dtype == torch.float64) else torch.float32)
          .requires_grad_(True) for i, t in enumerate(inputs)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    torch.cuda.synchronize()
    return (out,) + tuple(grads)


def op_errors(shape, dtype, value_residual=False, draws=1):
    """Relative errors vs float64 of (the op in ``dtype``, the fork emulation in bf16) per quantity.

    With ``value_residual`` the inputs gain the first layer's ``v1 [s, b, G, d]`` and a mixing
    logit (``lam = sigmoid(logit)``), and their gradients are compared too. The logit's gradient
    is one number, ``lam (1 - lam) <dv, v - v1>``: a sum of ``s*b*G*d`` zero-mean terms, which can
    be near 0, so its error is taken relative to the root-sum-square of those terms (float64), the
    scale its rounding errors add up to; that is still one random draw per upstream gradient, so
    it is the root-mean-square over ``draws`` upstream gradients ``dout``."""
    b, s, W = OP_SHAPES[shape]
    cfg = dict(num_heads=H, num_groups=G, head_dim=D, q_rank=RQ, kv_rank=R, window=W)
    inputs, dout = make_inputs(b, s, seed=s + b + W)
    names = NAMES
    if value_residual:
        gen = torch.Generator(device="cpu").manual_seed(3 * s + W)
        inputs += [torch.randn(s, b, G, D, generator=gen).bfloat16().float().cuda(),
                   torch.randn((), generator=gen).bfloat16().float().cuda()]
        names = NAMES + ("v1", "logit")

    def with_vr(fn):
        if not value_residual:
            return fn
        return lambda *a: fn(*a[:7], v1=a[7], lam=torch.sigmoid(a[8]))

    impls = (
        (lambda *a, **k: ref.tpa_reference(*a, **cfg, **k), torch.float64),
        (lambda *a, **k: ref.tpa_fork_emulation(*a, **cfg, **k), torch.bfloat16),
        (lambda *a, **k: tpa_window_attention(*a, backend="triton", **cfg, **k), dtype),
    )
    logit_sq, errs = [0.0, 0.0], None
    if value_residual:  # the float64 values and lam, for the scale of the logit's sum (dout-independent)
        _, _, v64 = ref.tpa_prologue_reference(*[t.double() for t in inputs[:6]], num_heads=H,
                                                num_groups=G, head_dim=D, q_rank=RQ, kv_rank=R)
        lam = torch.sigmoid(inputs[8].double())
    for draw in range(draws if value_residual else 1):
        if draw:
            gen = torch.Generator(device="cpu").manual_seed(1000 + draw)
            dout = torch.randn(s, b, H * D, generator=gen).bfloat16().float().cuda()
        runs = []
        for fn, dt in impls:
            if fn is impls[2][0]:
                poison()
            runs.append(run_grads(with_vr(fn), inputs, dt, dout.to(torch.float64 if dt == torch.float64 else dt)))
        exact, emul, got = runs
        assert got[0].dtype == dtype and got[0].shape == (s, b, H * D)
        if errs is None:
            errs = {n: (rel(g, e), rel(m, e)) for n, g, m, e in zip(names, got, emul, exact)}
        if value_residual:
            terms = lam * exact[8] * (v64 - inputs[7].double())  # lam (1 - lam) dv (v - v1); dv1 = (1 - lam) dv
            scale = terms.norm().item()
            for i, x in enumerate((got[9], emul[9])):
                logit_sq[i] += ((x.double() - exact[9]).abs().item() / scale) ** 2
    if value_residual:
        errs["logit"] = tuple(math.sqrt(q / draws) for q in logit_sq)
    return errs


@pytest.mark.parametrize("shape", list(OP_SHAPES))
def test_op_bf16_within_2x_of_fork_bf16_chain(shape):
    errs = op_errors(shape, torch.bfloat16)
    # at s = 1 the float64 gradient of sin is ~0 (the shared angle cancels between q and k): both
    # errors are then noise over a ~0 norm, and the rule compares the two noise levels
    bad = {n: e for n, e in errs.items() if not (math.isfinite(e[0]) and e[0] <= 2 * e[1] + 1e-3)}
    assert not bad, f"{shape}: (kernel, fork bf16 chain) errors vs float64 above 2x + 1e-3: {bad}; all: {errs}"


@pytest.mark.parametrize("shape", FP32_SHAPES)
def test_op_fp32_ieee_matches_float64(shape):
    errs = op_errors(shape, torch.float32)
    bad = {n: e[0] for n, e in errs.items() if not e[0] <= 1e-4}
    assert not bad, f"{shape}: fp32 kernel errors vs float64 above 1e-4: {bad}"


VR_SHAPES = ("b2_s1024_W128", "b1_s777_W100", "b2_s128_W40")


@pytest.mark.parametrize("shape", VR_SHAPES)
def test_value_residual_op_bf16_within_2x_of_fork_bf16_chain(shape):
    """The value residual inside the fused op (``v1``, ``lam``): the same 2x rule, now also for the
    gradients to ``v1`` and to the mixing logit (its error relative to the root-sum-square of the
    terms of its sum, root-mean-square over 8 upstream gradients, see :func:`op_errors`)."""
    errs = op_errors(shape, torch.bfloat16, value_residual=True, draws=8)
    bad = {n: e for n, e in errs.items() if not (math.isfinite(e[0]) and e[0] <= 2 * e[1] + 1e-3)}
    assert not bad, f"{shape}: (kernel, fork bf16 chain) errors vs float64 above 2x + 1e-3: {bad}; all: {errs}"


def test_value_residual_op_fp32_ieee_matches_float64():
    errs = op_errors("b2_s128_W40", torch.float32, value_residual=True)
    bad = {n: e[0] for n, e in errs.items() if not e[0] <= 1e-4}
    assert not bad, f"fp32 kernel errors vs float64 above 1e-4 (value residual): {bad}"


@pytest.mark.parametrize("case", list(MIDDLE_CASES))
def test_window_attention_bf16_within_2x_of_fp32_math_reference(case):
    _check_window_middle(case)


def _candidate_tiles():
    """Every attention tile candidate of ``benchmarks/tpa.py --tune`` (forward, dq, dk/dv)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    from benchmarks.tpa import ATTN_DKV, ATTN_DQ, ATTN_FWD, _tile_name

    return {f"{kind}_{_tile_name(t)}": t for kind, cands in (("fwd", ATTN_FWD), ("dq", ATTN_DQ), ("dkv", ATTN_DKV))
            for t in cands}


@pytest.mark.parametrize("tiles", list(_candidate_tiles()))
@pytest.mark.parametrize("case", ["b2_s1024_W128", "gqa3_b1_s300_W64"])
def test_window_attention_tile_candidates_bf16(case, tiles, monkeypatch):
    """Each tile candidate the benchmark may choose (packed heads included) passes the same rule
    at the vpMoE window (the compiled kernels are the ones the tune then times: Triton's cache) and
    with 3 heads per group (padding rows in packed tiles). W = 1 and s = 1 run at the default tiles
    above and, packed, in the CPU tests."""
    for key, val in _candidate_tiles()[tiles].items():
        monkeypatch.setitem(tk.GPU_TILES, key, val)
    _check_window_middle(case)


def _check_window_middle(case):
    b, s, h, g, d, W = MIDDLE_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(7 * s + W)
    q = torch.randn(s, b, h, d, device="cuda", generator=gen).bfloat16()
    k = torch.randn(s, b, g, d, device="cuda", generator=gen).bfloat16()
    v = torch.randn(s, b, g, d, device="cuda", generator=gen).bfloat16()
    sink = torch.randn(h, device="cuda", generator=gen).bfloat16()  # the bf16 softmax_offset parameter
    do = torch.randn(s, b, h, d, device="cuda", generator=gen).bfloat16()
    scale = 1 / math.sqrt(d)

    def dense(dt):
        xs = [t.to(dt).requires_grad_(True) for t in (q, k, v, sink)]
        o, lse = sink_attention_reference(*xs, window=W, softmax_scale=scale, compute_dtype=dt)
        return (o, lse, *torch.autograd.grad(o, xs, do.to(o.dtype)))

    exact = dense(torch.float64)
    t32 = dense(torch.float32)
    t32 = [t32[0].bfloat16(), t32[1]] + [x.bfloat16() for x in t32[2:]]  # in the caller's dtypes
    assert tk.GPU_TILES["DELTA"] == "auto"
    poison()
    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    dq, dk, dv, dsink = tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale)
    torch.cuda.synchronize()
    got = (o, lse, dq, dk, dv, dsink.to(sink.dtype))  # dsink in the parameter's dtype, as the op returns it
    errs = {n: (rel(a, e), rel(t, e)) for n, a, t, e in zip(("out", "lse", "dq", "dk", "dv", "dsink"), got, t32, exact)}
    bad = {n: e for n, e in errs.items() if not e[0] <= 2 * e[1] + 1e-5}
    assert not bad, f"{case}: (kernel, PyTorch bf16-in fp32-math) errors vs float64 above 2x + 1e-5: {bad}; all: {errs}"
