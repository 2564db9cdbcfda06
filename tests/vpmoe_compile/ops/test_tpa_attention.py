"""Tests of the fused TPA local-attention op (docs/design.md#tpa-attention; the accuracy rule:
docs/design.md#benchmarks-and-checks).

CPU only: the Triton kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``) in
fp32, every result is compared with the float64 reference by relative Frobenius error. Inputs
are fresh random draws (never zeros).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as Fn

from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference, visibility_mask
from vpmoe_compile.ops.tpa_attention import layout
from vpmoe_compile.ops.tpa_attention import reference as ref
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
# Checks on CPU tensors through the Triton interpreter (the CPU machines and CI): on a CUDA machine
# they would hand CPU tensors to the CUDA kernels; their GPU runs are test_tpa_attention_gpu.py.
needs_interpreter = pytest.mark.skipif(
    not INTERPRET,
    reason="CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); GPU: test_tpa_attention_gpu.py",
)
NAMES = ("factors", "qkv_bias", "gamma_q", "gamma_k", "cos", "sin", "sink")


# --------------------------------------------------------------------------- helpers


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(s, b, H, G, d, Rq, R, *, bias=True, norm=True, dtype=torch.float64, sink_scale=1.0, gen=None):
    """Random op inputs with realistic magnitudes (factors ~ N(0,1), bias ~ 0.5, gains ~ 1 +- 0.3)."""
    Fw = layout.factor_width(H, G, d, Rq, R)
    hpg = H // G
    factors = torch.randn(s, b, Fw, generator=gen, dtype=torch.float64)
    qkv_bias = 0.5 * torch.randn(G * (hpg + 2) * d, generator=gen, dtype=torch.float64) if bias else None
    gq = 1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64) if norm else None
    gk = 1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64) if norm else None
    # GRAPE-M angles: base-10000 frequencies, perturbed (learned), times exact positions.
    P = d // 2
    log_freq = 16.0 * torch.log(10000.0 ** (-torch.arange(P, dtype=torch.float64) * 2 / d))
    log_freq = log_freq + 0.5 * torch.randn(P, generator=gen, dtype=torch.float64)
    theta = torch.arange(s, dtype=torch.float64)[:, None] * torch.exp(log_freq / 16.0)[None, :]
    cos, sin = theta.cos(), theta.sin()
    sink = sink_scale * torch.randn(H, generator=gen, dtype=torch.float64)
    vals = [factors, qkv_bias, gq, gk, cos, sin, sink]
    return [v.to(dtype) if v is not None else None for v in vals]


def dense_attention(q, k, v, sink, W, scale):
    """The one window + sink reference, math in ``max(float32, q.dtype)`` (as the TPA reference uses it)."""
    return sink_attention_reference(q, k, v, sink, window=W, softmax_scale=scale,
                                    compute_dtype=torch.promote_types(q.dtype, torch.float32))


def kw(H, G, d, Rq, R, W):
    return dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, window=W)


def run_op(inputs, *, backend, cfg, dtype, dout=None, eps=1e-5):
    """Forward + backward of the op; returns ``(out, grads)`` with None for absent inputs."""
    xs = [x.detach().to(dtype).requires_grad_(True) if x is not None else None for x in inputs]
    out = tpa_window_attention(*xs, backend=backend, eps=eps, **cfg)
    if dout is None:
        return out, None
    out.backward(dout.to(out.dtype))
    return out, [x.grad if x is not None else None for x in xs]


# --------------------------------------------------------------------------- independent direct computation


def direct_forward(inputs, H, G, d, Rq, R, W, eps=1e-5):
    """Per token / head / query-row loops, written from docs/design.md#tpa-attention without the
    reference helpers."""
    factors, qkv_bias, gq, gk, cos, sin, sink = inputs
    s, b, _ = factors.shape
    hpg = H // G
    P = d // 2
    scale = 1.0 / math.sqrt(d)
    out = torch.zeros(s, b, H * d, dtype=torch.float64)
    for bi in range(b):
        qs, ks, vs = [], [], []
        for t in range(s):
            f = factors[t, bi]
            col = 0
            aq = f[col:col + H * Rq].view(H, Rq); col += H * Rq
            ak = f[col:col + G * R].view(G, R); col += G * R
            av = f[col:col + G * R].view(G, R); col += G * R
            bq = f[col:col + Rq * d].view(Rq, d); col += Rq * d
            bk = f[col:col + R * d].view(R, d); col += R * d
            bv = f[col:col + R * d].view(R, d)
            mixed = []
            for g in range(G):
                for j in range(hpg):
                    h = g * hpg + j
                    mixed.append(sum(aq[h, r] * bq[r] for r in range(Rq)) / Rq)
                mixed.append(sum(ak[g, r] * bk[r] for r in range(R)) / R)
                mixed.append(sum(av[g, r] * bv[r] for r in range(R)) / R)
            mixed = torch.cat(mixed)
            if qkv_bias is not None:
                mixed = mixed + qkv_bias
            mixed = mixed.view(G, hpg + 2, d)

            def nr(x, gam):
                if gam is None:
                    y = x
                else:
                    y = gam * x / torch.sqrt((x * x).mean() + eps)
                c, sn = cos[t], sin[t]
                return torch.cat([y[:P] * c - y[P:] * sn, y[P:] * c + y[:P] * sn])

            qs.append(torch.stack([nr(mixed[h // hpg, h % hpg], gq) for h in range(H)]))
            ks.append(torch.stack([nr(mixed[g, hpg], gk) for g in range(G)]))
            vs.append(mixed[:, hpg + 1].clone())
        for h in range(H):
            g = h // hpg
            for i in range(s):
                js = [j for j in range(s) if 0 <= i - j <= W - 1]
                logits = torch.stack([scale * torch.dot(qs[i][h], ks[j][g]) for j in js])
                m = torch.maximum(logits.max(), sink[h])
                e = torch.exp(logits - m)
                z = e.sum() + torch.exp(sink[h] - m)
                o = sum(e[n] * vs[j][g] for n, j in enumerate(js)) / z
                out[i, bi, h * d:(h + 1) * d] = o
    return out


def test_reference_matches_direct_computation():
    H, G, d, Rq, R, W = 4, 2, 8, 3, 2, 3
    inp = make_inputs(6, 2, H, G, d, Rq, R)
    want = direct_forward(inp, H, G, d, Rq, R, W)
    got = ref.tpa_reference(*inp, **kw(H, G, d, Rq, R, W))
    assert rel(got, want) < 1e-13
    # Same through the registered op (reference backend) and without bias / norm.
    got_op = tpa_window_attention(*inp, backend="reference", **kw(H, G, d, Rq, R, W))
    assert rel(got_op, want) < 1e-13
    inp2 = make_inputs(5, 1, H, G, d, Rq, R, bias=False, norm=False)
    assert rel(ref.tpa_reference(*inp2, **kw(H, G, d, Rq, R, 2)), direct_forward(inp2, H, G, d, Rq, R, 2)) < 1e-13


def test_window_mask_contract(monkeypatch):
    """Ours == Megatron's (W-1, 0) window mask == the FlexAttention ``q - k < W`` form; ``<= W`` differs."""
    for s in (1, 5, 127, 128, 129, 300):
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        for W in (1, 2, 64, 127, 128, 129, 4096):
            ours = visibility_mask(s, W)
            flex = (i >= j) & (i - j < W)
            fa = (j >= i - (W - 1)) & (j <= i)
            assert torch.equal(ours, flex) and torch.equal(ours, fa)
            wrong = (i >= j) & (i - j <= W)
            if s > W:
                assert torch.equal((wrong.sum(1) - ours.sum(1))[W:], torch.ones(s - W, dtype=torch.long))
    mutils = pytest.importorskip("megatron.core.transformer.utils")
    if not torch.cuda.is_available():  # Megatron hard-codes device="cuda" for the mask
        real_ones = torch.ones
        monkeypatch.setattr(torch, "ones", lambda *a, **k: real_ones(*a, **{**k, "device": "cpu"}))
    for s, W in ((5, 2), (129, 128), (300, 64)):
        # Megatron returns True where *masked*.
        mask = mutils.get_sliding_window_causal_mask(s, s, (W - 1, 0)).cpu()
        assert torch.equal(~mask.bool().view(s, s), visibility_mask(s, W))


# --------------------------------------------------------------------------- triton vs reference


TRITON_CASES = [
    # id, s, b, H, G, d, Rq, R, W, bias, norm
    ("vpmoe_ratios", 37, 2, 8, 2, 32, 4, 2, 10, True, True),  # H/G = 4, s not a block multiple
    ("window1_b3", 21, 3, 4, 2, 32, 4, 2, 1, True, True),  # b = 3: a partial batch chunk
    ("window_ge_s", 19, 2, 4, 2, 32, 4, 2, 64, True, True),  # s < W: full causal
    ("s1", 1, 3, 4, 2, 32, 4, 2, 5, True, True),
    ("mha_G_eq_H", 33, 1, 4, 4, 32, 2, 2, 16, True, True),  # W == block, s = 2 blocks + 1
    ("mqa_G1_odd_ranks", 24, 1, 4, 1, 32, 3, 1, 7, True, True),
    ("no_bias_no_norm", 18, 2, 2, 1, 32, 2, 2, 5, False, False),
    # windows around the interpreter's 16-wide tiles (W = 0, 1, 2, 15 mod 16): the band's first
    # and last tiles in fwd, dq and dk/dv
    ("W2", 37, 1, 4, 2, 32, 2, 2, 2, True, True),
    ("W17", 45, 1, 4, 2, 32, 2, 2, 17, True, True),
    ("W18", 45, 1, 4, 2, 32, 2, 2, 18, True, True),
    ("W31", 50, 1, 4, 2, 32, 2, 2, 31, True, True),
    ("W32", 50, 1, 4, 2, 32, 2, 2, 32, True, True),
]


@needs_interpreter
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference_fwd_bwd(case):
    _check_triton_case(case)


@needs_interpreter
@pytest.mark.parametrize("case", [TRITON_CASES[0], TRITON_CASES[5]], ids=[TRITON_CASES[0][0], TRITON_CASES[5][0]])
def test_triton_packed_heads_match_reference(case, monkeypatch):
    """The op with the attention kernels packing a group's query heads into their rows / query
    tiles (``GPU_TILES["PACK_FWD"]``, ``["PACK_DQ"]``, ``["PACK_DKV"]``): output and every
    gradient as unpacked."""
    from vpmoe_compile.ops.tpa_attention import triton as tk

    for key in ("PACK_FWD", "PACK_DQ", "PACK_DKV"):
        monkeypatch.setitem(tk.GPU_TILES, key, True)
    _check_triton_case(case)


def _check_triton_case(case):
    _, s, b, H, G, d, Rq, R, W, bias, norm = case
    cfg = kw(H, G, d, Rq, R, W)
    inp = make_inputs(s, b, H, G, d, Rq, R, bias=bias, norm=norm)
    dout = torch.randn(s, b, H * d, dtype=torch.float64)
    o64, g64 = run_op(inp, backend="reference", cfg=cfg, dtype=torch.float64, dout=dout)
    o32, g32 = run_op(inp, backend="triton", cfg=cfg, dtype=torch.float32, dout=dout)
    # A float32 PyTorch reference sets the error scale (the accuracy rule of
    # docs/design.md#benchmarks-and-checks).
    assert o32.dtype == torch.float32 and o32.shape == (s, b, H * d)
    assert torch.isfinite(o32).all()
    assert rel(o32, o64) < 2e-5, rel(o32, o64)
    for name, g, gr in zip(NAMES, g32, g64):
        if gr is None:
            assert g is None
            continue
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), name
        if gr.norm() < 1e-10:  # s = 1: the gradient of the shared angle cancels between q and k
            assert (g.double() - gr).abs().max() < 1e-5, name
            continue
        assert rel(g, gr) < 5e-5, (name, rel(g, gr))
    if W >= s:  # W >= s equals plain causal (W = s)
        o_causal = ref.tpa_reference(*inp, **kw(H, G, d, Rq, R, s))
        assert rel(o64, o_causal) < 1e-14


@needs_interpreter
@pytest.mark.parametrize("pad, offset", [(7, 3), (8, 0)], ids=["misaligned", "aligned_strided"])
def test_triton_noncontiguous_factors(pad, offset):
    """Factors as a strided view, misaligned (scalar loads) or with 16-byte aligned rows
    (vectorised loads)."""
    from vpmoe_compile.ops.tpa_attention import triton as triton_tpa

    s, b, H, G, d, Rq, R, W = 29, 2, 8, 2, 32, 4, 2, 9
    cfg = kw(H, G, d, Rq, R, W)
    inp = make_inputs(s, b, H, G, d, Rq, R)
    dout = torch.randn(s, b, H * d, dtype=torch.float64)
    o64, g64 = run_op(inp, backend="reference", cfg=cfg, dtype=torch.float64, dout=dout)
    # factors as a [s, b, F] view of a [b, s, F+pad] buffer (non-contiguous in s and b).
    Fw = inp[0].shape[-1]
    buf = torch.randn(b, s, Fw + pad, dtype=torch.float32)
    buf[..., offset:offset + Fw] = inp[0].transpose(0, 1).float()
    fview = buf[..., offset:offset + Fw].transpose(0, 1)
    assert not fview.is_contiguous()
    assert triton_tpa.factors_aligned(fview, H, G, Rq, R) == (pad == 8)
    leaf = fview.detach().requires_grad_(True)
    rest = [x.float().requires_grad_(True) for x in inp[1:]]
    out = tpa_window_attention(leaf, *rest, backend="triton", **cfg)
    out.backward(dout.float())
    assert rel(out, o64) < 2e-5
    for name, g, gr in zip(NAMES, [leaf.grad] + [x.grad for x in rest], g64):
        assert rel(g, gr) < 5e-5, (name, rel(g, gr))


def _attention_grads(q, k, v, sink, dout, W, scale, dtype):
    """Output and (dq, dk, dv, dsink) of the dense float reference, math in ``dtype``."""
    xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, sink)]
    o, _ = dense_attention(xs[0], xs[1], xs[2], xs[3], W, scale)
    return o, torch.autograd.grad(o, xs, dout.to(o.dtype))


def _bf16_delta_errors(s, b, H, G, W, tk):
    """bf16 attention middle on fresh inputs: ``errors(grads)`` gives dq, dk, dv error ratios vs a
    PyTorch implementation with the same bf16 inputs and fp32 math (its gradients rounded to bf16),
    both against float64, and dsink's (interpreter: relative error vs float64, fp32 dots; GPU: ratio
    in the sink parameter's dtype); ``run()`` the kernel backward under the current ``DELTA``."""
    d = 32
    scale = 1 / math.sqrt(d)
    dev = "cuda" if not INTERPRET else "cpu"
    q = torch.randn(s, b, H, d, device=dev).bfloat16()
    k = torch.randn(s, b, G, d, device=dev).bfloat16()
    v = torch.randn(s, b, G, d, device=dev).bfloat16()
    sink = torch.randn(H, device=dev).bfloat16().float()
    dout = torch.randn(s, b, H, d, device=dev).bfloat16()
    _, g64 = _attention_grads(q, k, v, sink, dout, W, scale, torch.float64)
    _, g32 = _attention_grads(q, k, v, sink, dout, W, scale, torch.float32)
    g32 = [g.bfloat16() for g in g32[:3]] + [g32[3]]  # the kernel returns bf16 dq/dk/dv, fp32 dsink
    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    assert o.dtype == torch.bfloat16

    def errors(grads):
        r = [rel(g, r_) / rel(c, r_) for g, r_, c in zip(grads[:3], g64[:3], g32[:3])]
        if INTERPRET:  # fp32 dots: dsink must be fp32-accurate
            return r + [rel(grads[3], g64[3])]
        # bf16 dots (P of the PV product is bf16): compare in the sink parameter's dtype
        return r + [rel(grads[3].bfloat16(), g64[3]) / max(rel(g32[3].bfloat16(), g64[3]), 1e-6)]

    return errors, lambda: tk.swa_bwd(dout, q, k, v, o, lse, sink, W, scale)


@needs_triton
@pytest.mark.parametrize("s, b, H, G, W", [(45, 2, 4, 2, 1), (1, 3, 4, 2, 7), (40, 1, 4, 1, 3)],
                         ids=["window1", "s1", "mqa_window3"])
def test_window_attention_bf16_delta_is_accurate(s, b, H, G, W, monkeypatch):
    """bf16 attention middle where rows see few keys: ``delta`` must be fp32-accurate.

    From the bf16-rounded ``O``, ``dS = P (dP - delta)`` cancels catastrophically where one key
    holds most of a row's mass (W = 1, s = 1): dq/dk errors vs float64 were 2-7x those of a
    PyTorch implementation with the same bf16 inputs and fp32 math, and dsink's 1e4x. Where rows
    see at most 8 keys on average the kernel recomputes ``delta = rowsum(P * dP)`` and must stay
    within 2x of that reference. The interpreter computes the dots in fp32 but rounds ``O`` to
    bf16 (to nearest even, as the GPU), so the test isolates the rounding of ``O``; with ``dq``'s
    ``delta`` forced from the 16-bit ``O`` (``GPU_TILES["DELTA"] = "output"``) dq fails the bound at
    W = 1, while dk, dv and dsink, which take the exact ``rowsum(P * dP)`` the loop accumulates,
    stay exact.
    """
    from vpmoe_compile.ops.tpa_attention import triton as tk

    monkeypatch.setitem(tk.GPU_TILES, "DELTA", "auto")
    errors, run = _bf16_delta_errors(s, b, H, G, W, tk)
    good = errors(run())
    assert max(good[:3]) <= 2.0, good
    assert good[3] < (1e-4 if INTERPRET else 2.0), good
    monkeypatch.setitem(tk.GPU_TILES, "DELTA", "output")
    plain = errors(run())  # dq's delta from the 16-bit O
    assert max(plain[1:3]) <= 2.0, (good, plain)
    assert plain[3] < (1e-4 if INTERPRET else 2.0), (good, plain)
    if W == 1 and s > 1:
        assert plain[0] > 2.0, (good, plain)


@needs_triton
@pytest.mark.parametrize("s, b, H, G, W", [(96, 2, 4, 2, 16), (64, 1, 4, 1, 40)], ids=["W16", "mqa_W40"])
def test_window_attention_bf16_many_keys_takes_delta_from_output(s, b, H, G, W, monkeypatch):
    """Where rows see more than 8 keys on average, ``auto`` takes dq's ``delta`` from the 16-bit
    ``O`` (bitwise the ``"output"`` mode, and not the recomputing one) and stays within 2x of the
    fp32-math reference; dk, dv and dsink take the exact ``rowsum(P * dP)`` (interpreter: dsink
    fp32-accurate, as with the recomputation)."""
    from vpmoe_compile.ops.tpa_attention import triton as tk
    from vpmoe_compile._triton import needs_exact_delta

    assert not needs_exact_delta(s, W)
    errors, run = _bf16_delta_errors(s, b, H, G, W, tk)
    grads = {}
    for mode in ("auto", "output", "recompute"):
        monkeypatch.setitem(tk.GPU_TILES, "DELTA", mode)
        grads[mode] = run()
    assert all(torch.equal(a, c) for a, c in zip(grads["auto"], grads["output"]))
    assert not torch.equal(grads["auto"][0], grads["recompute"][0])
    err = errors(grads["auto"])
    assert max(err[:3]) <= 2.0, err
    assert err[3] < (1e-4 if INTERPRET else 2.0), err


def test_exact_delta_rule_counts_the_window_keys():
    from vpmoe_compile._triton import mean_keys_per_row, needs_exact_delta

    assert mean_keys_per_row(15) == 8.0 and mean_keys_per_row(15, 20) == 8.0  # window >= s: causal
    assert mean_keys_per_row(4096, 1) == 1.0
    assert mean_keys_per_row(10, 4) == (1 + 2 + 3 + 4 * 7) / 10
    assert abs(mean_keys_per_row(4096, 128) - (128 * 129 / 2 + 3968 * 128) / 4096) < 1e-9
    assert needs_exact_delta(4096, 8) and not needs_exact_delta(4096, 9)
    assert needs_exact_delta(15) and not needs_exact_delta(16)
    assert not needs_exact_delta(4096, 128)


@pytest.fixture(scope="module")
def megatron_gloo():
    """Megatron's parallel state on a world of one process, gloo backend also on a GPU machine
    (the stock attention runs no collective at TP = 1; NCCL start-up is not needed)."""
    from megatron_base import init_process

    init_process(seed=1234, backend="gloo")
    yield


def _megatron_dpa(H, G, d, W, dtype, device):
    """Stock Megatron-Core ``DotProductAttention``: window ``(W-1, 0)``, learnable softmax offset."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=H * d, num_attention_heads=H, num_query_groups=G, kv_channels=d,
        softmax_type="learnable", window_size=(W - 1, 0), attention_dropout=0.0, masked_softmax_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
    )
    dpa = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    assert dpa.softmax_offset.shape == (H,) and dpa.softmax_offset.requires_grad
    return dpa.to(device), AttnMaskType.causal


def _stock_parity(device, dtype, s, b, H, G, d, W):
    """O and gradients (q, k, v, sink) of stock DotProductAttention and of our one window + sink
    kernel family, through the public ``window_sink_attention`` (its Triton path) and called directly
    as the TPA op's attention middle, on the same materialised inputs; all compared with float64.
    Returns ``{impl: {name: rel error}}``."""
    from vpmoe_compile.ops.tpa_attention import triton as tk
    from vpmoe_compile.ops.sink_attention.op import window_sink_attention

    dpa, mask_type = _megatron_dpa(H, G, d, W, dtype, device)
    with torch.no_grad():
        dpa.softmax_offset.normal_(0.0, 1.0)  # make the sink matter (stock init std is 0.02)
    q = torch.randn(s, b, H, d, device=device).to(dtype)
    k = torch.randn(s, b, G, d, device=device).to(dtype)
    v = torch.randn(s, b, G, d, device=device).to(dtype)
    dout = torch.randn(s, b, H, d, device=device).to(dtype)
    sink = dpa.softmax_offset.detach().clone()
    scale = 1 / math.sqrt(d)
    assert dpa.softmax_scale == pytest.approx(scale)
    names = ("out", "dq", "dk", "dv", "dsink")
    o64, g64 = _attention_grads(q, k, v, sink, dout, W, scale, torch.float64)
    exact = dict(zip(names, (o64, *g64)))

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = dpa(*leaves, None, attn_mask_type=mask_type).view(s, b, H, d)
    results = {"megatron": (out, *torch.autograd.grad(out, leaves + [dpa.softmax_offset], dout))}

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sink)]
    out = window_sink_attention(*leaves, W, backend="triton")
    results["window_sink_attention"] = (out, *torch.autograd.grad(out, leaves, dout))

    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    results["tpa_middle"] = (o, *tk.swa_bwd(dout, q, k, v, o, lse, sink, W, scale))
    errs = {impl: {n: rel(x, exact[n]) for n, x in zip(names, vals)} for impl, vals in results.items()}
    for impl, vals in results.items():
        assert vals[0].dtype == dtype and vals[0].shape == (s, b, H, d), impl
        assert all(torch.isfinite(x).all() for x in vals), impl
    errs["ours_vs_megatron"] = {n: rel(results["window_sink_attention"][i], results["megatron"][i])
                                for i, n in enumerate(names)}
    return errs


@needs_triton
def test_stock_megatron_window_sink_parity_fp32(megatron_gloo):
    """Stock-Megatron parity on CPU (fp32, docs/design.md#benchmarks-and-checks): stock DotProductAttention (window (W-1, 0), softmax_type='learnable',
    GQA) == our window + sink kernels on materialised q/k/v: O and grads of q, k, v and the offset."""
    if torch.cuda.is_available():
        pytest.skip("CPU variant (the CUDA bf16 variant runs on GPU machines)")
    errs = _stock_parity("cpu", torch.float32, s=41, b=2, H=8, G=2, d=32, W=16)
    for impl in ("megatron", "window_sink_attention", "tpa_middle"):
        for n, e in errs[impl].items():
            assert e < 5e-6, (impl, n, e)
    for n, e in errs["ours_vs_megatron"].items():
        assert e < 5e-6, (n, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("s, W", [(300, 128), (77, 1), (1, 128)], ids=["s300_W128", "s77_W1", "s1"])
def test_stock_megatron_window_sink_parity_cuda_bf16(megatron_gloo, s, W):
    """Stock-Megatron parity on the GPU in bf16 (vpMoE heads: H=8, G=2, d=128): our kernels' errors vs float64
    are at most 2x stock Megatron's (which rounds logits and probabilities to bf16) + 1e-3, for O
    and every gradient, and ours agree with stock within bf16 tolerance."""
    errs = _stock_parity("cuda", torch.bfloat16, s=s, b=2, H=8, G=2, d=128, W=W)
    print(errs)
    for impl in ("window_sink_attention", "tpa_middle"):
        for n, e in errs[impl].items():
            assert e <= 2 * errs["megatron"][n] + 1e-3, (impl, n, e, errs["megatron"][n])
    for n, e in errs["ours_vs_megatron"].items():
        assert e < 3e-2, (n, e)


@needs_interpreter
def test_triton_lse_sink_limits_and_determinism():
    """Per-head sinks at the limits: -1e4 (vanilla softmax), 0 (softmax1), +30 (O ~ 0); LSE
    includes the sink; two identical runs give bit-identical gradients."""
    s, b, H, G, d, Rq, R, W = 20, 1, 4, 2, 32, 2, 2, 6
    inp = make_inputs(s, b, H, G, d, Rq, R)
    inp[6] = torch.tensor([-1e4, 0.0, 30.0, 0.7], dtype=torch.float64)
    args = (H, G, d, Rq, R, W, 1e-5, 1 / math.sqrt(d), "triton", False)
    f32 = [x.float() for x in inp]
    out, lse = torch.ops.vpmoe.tpa_window_attention_fwd(*f32, None, None, *args)[:2]
    q, k, v = ref.tpa_prologue_reference(*inp[:6], **{k_: v_ for k_, v_ in kw(H, G, d, Rq, R, W).items()
                                                       if k_ != "window"})
    o64, lse64 = dense_attention(q, k, v, inp[6], W, 1 / math.sqrt(d))
    assert rel(lse, lse64) < 1e-6
    o_nosink, lse_nosink = dense_attention(q, k, v, torch.full((H,), -math.inf, dtype=torch.float64),
                                                    W, 1 / math.sqrt(d))
    o4 = out.view(s, b, H, d)
    assert rel(o4[:, :, 0], o_nosink[:, :, 0]) < 1e-5  # sink -1e4 == vanilla softmax
    # sink 0: softmax1, i.e. the post-hoc identity O = O0 * sigmoid(L0 - 0), L = logaddexp(L0, 0)
    assert rel(o4[:, :, 1], o_nosink[:, :, 1] * torch.sigmoid(lse_nosink[:, 1].T)[..., None]) < 1e-5
    assert rel(lse[:, 1], torch.logaddexp(lse_nosink[:, 1], torch.zeros(()))) < 1e-6
    assert o4[:, :, 2].abs().max() < 1e-9 * o4[:, :, 3].abs().max() + 1e-8  # sink +30 drives O to ~0
    assert rel(o4[:, :, 3], o64[:, :, 3]) < 1e-5
    dout = torch.randn(s, b, H * d)
    _, g1 = run_op(inp, backend="triton", cfg=kw(H, G, d, Rq, R, W), dtype=torch.float32, dout=dout)
    _, g2 = run_op(inp, backend="triton", cfg=kw(H, G, d, Rq, R, W), dtype=torch.float32, dout=dout)
    for name, a, c in zip(NAMES, g1, g2):
        assert torch.equal(a, c), name


# --------------------------------------------------------------------------- reference-level properties


def test_window_one_formula_and_row_zero():
    """W = 1: o_i = v_i * sigmoid(s_ii - sigma_h); row 0 obeys it for any W."""
    H, G, d, Rq, R = 4, 2, 8, 2, 2
    s, b = 7, 2
    inp = make_inputs(s, b, H, G, d, Rq, R)
    cfgp = {k_: v_ for k_, v_ in kw(H, G, d, Rq, R, 1).items() if k_ != "window"}
    q, k, v = ref.tpa_prologue_reference(*inp[:6], **cfgp)
    kk = k.repeat_interleave(H // G, dim=2)
    vv = v.repeat_interleave(H // G, dim=2)
    sii = (q * kk).sum(-1) / math.sqrt(d)  # [s, b, H]
    want = vv * torch.sigmoid(sii - inp[6])[..., None]
    out1 = ref.tpa_reference(*inp, **kw(H, G, d, Rq, R, 1)).view(s, b, H, d)
    assert rel(out1, want) < 1e-14
    out5 = ref.tpa_reference(*inp, **kw(H, G, d, Rq, R, 5)).view(s, b, H, d)
    assert rel(out5[0], want[0]) < 1e-14


def test_gqa_grouping_heads_read_their_group():
    """Heads 0-3 read KV group 0 and 4-7 group 1: perturbing group 1's factors moves only heads 4-7;
    dk/dv of a group equal the sum over its heads."""
    H, G, d, Rq, R, W = 8, 2, 8, 2, 2, 4
    s, b = 6, 1
    inp = make_inputs(s, b, H, G, d, Rq, R)
    o = ref.tpa_reference(*inp, **kw(H, G, d, Rq, R, W)).view(s, b, H, d)
    off = layout.factor_offsets(H, G, d, Rq, R)
    f2 = inp[0].clone()
    f2[..., off["a_k"] + R:off["a_k"] + 2 * R] += 3.0  # A_k of group 1
    f2[..., off["a_v"] + R:off["a_v"] + 2 * R] -= 2.0  # A_v of group 1
    o2 = ref.tpa_reference(f2, *inp[1:], **kw(H, G, d, Rq, R, W)).view(s, b, H, d)
    assert torch.equal(o[:, :, :4], o2[:, :, :4])
    assert (o[:, :, 4:] - o2[:, :, 4:]).abs().min() > 0
    # dk of a group == sum over its heads (expanded-KV attention)
    q, k, v = (torch.randn(s, b, H, d, dtype=torch.float64), torch.randn(s, b, G, d, dtype=torch.float64),
               torch.randn(s, b, G, d, dtype=torch.float64))
    k.requires_grad_(True)
    ke = k.detach().repeat_interleave(H // G, dim=2).requires_grad_(True)
    dout = torch.randn(s, b, H, d, dtype=torch.float64)
    (dense_attention(q, k, v, inp[6], W, 0.3)[0] * dout).sum().backward()
    (dense_attention(q, ke, v.repeat_interleave(H // G, dim=2), inp[6], W, 0.3)[0] * dout).sum().backward()
    assert rel(k.grad, ke.grad.view(s, b, G, H // G, d).sum(3)) < 1e-14


def test_sink_gradient_formula_vs_finite_differences():
    """dsigma_h = -sum_{b,i} exp(sigma_h - L) * D  (docs/design.md#sink-attention) vs central
    differences."""
    s, b, H, G, d, W = 9, 2, 2, 1, 8, 4
    q, k, v = (torch.randn(s, b, H, d, dtype=torch.float64), torch.randn(s, b, G, d, dtype=torch.float64),
               torch.randn(s, b, G, d, dtype=torch.float64))
    sink = torch.randn(H, dtype=torch.float64)
    dout = torch.randn(s, b, H, d, dtype=torch.float64)
    o, lse = dense_attention(q, k, v, sink, W, 0.35)
    D = (dout * o).sum(-1).permute(1, 2, 0)  # [b, H, s]
    formula = -(torch.exp(sink[None, :, None] - lse) * D).sum(dim=(0, 2))
    h = 1e-6
    fd = torch.zeros(H, dtype=torch.float64)
    for i in range(H):
        e = torch.zeros(H, dtype=torch.float64)
        e[i] = h
        fp = (dense_attention(q, k, v, sink + e, W, 0.35)[0] * dout).sum()
        fm = (dense_attention(q, k, v, sink - e, W, 0.35)[0] * dout).sum()
        fd[i] = (fp - fm) / (2 * h)
    assert rel(formula, fd) < 1e-7


def test_gradcheck_reference_op():
    """torch.autograd.gradcheck through the registered op (reference backend, float64)."""
    H, G, d, Rq, R, W = 2, 1, 4, 2, 1, 3
    inp = make_inputs(5, 1, H, G, d, Rq, R)
    xs = tuple(x.requires_grad_(True) for x in inp)

    def f(*a):
        return tpa_window_attention(*a, backend="reference", **kw(H, G, d, Rq, R, W))

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_factor_identity_and_its_limits():
    """Factor identity: pre-rotation of gamma*B (and the rotated bias) with 1/rho afterwards equals the
    post-contraction form; rotating raw B then applying gamma does not; Gram-form norm == direct norm;
    without bias, gain and norm the paper's Theorem 3.1 holds."""
    H, G, d, Rq, R = 4, 2, 16, 4, 2
    s, b, P = 9, 2, 8
    eps = 1e-5
    factors, bias, gq, gk, cos, sin, _ = make_inputs(s, b, H, G, d, Rq, R)
    a_q, _, _, b_q, _, _ = layout.split_factors(factors, H, G, d, Rq, R)
    c_q = ref.split_qkv_bias(bias, H, G, d)[0]
    cfgp = dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, eps=eps)
    q_post = ref.tpa_prologue_reference(factors, bias, gq, gk, cos, sin, **cfgp)[0]

    def rot(x):  # x [s, b, n, d]
        c, sn = cos[:, None, None, :], sin[:, None, None, :]
        return torch.cat([x[..., :P] * c - x[..., P:] * sn, x[..., P:] * c + x[..., :P] * sn], -1)

    x = torch.matmul(a_q, b_q) / Rq + c_q  # [s, b, H, d], pre-norm
    rho = torch.sqrt(x.pow(2).mean(-1) + eps)
    rot_gb = rot(gq * b_q)  # [s, b, Rq, d]
    rot_gc = rot((gq * c_q).expand(s, b, H, d))
    q_pre = (torch.matmul(a_q, rot_gb) / Rq + rot_gc) / rho[..., None]
    assert rel(q_pre, q_post) < 1e-13
    # Wrong form: rotate raw B (and bias), then apply gamma.
    q_wrong = gq * (torch.matmul(a_q, rot(b_q)) / Rq + rot(c_q.expand(s, b, H, d))) / rho[..., None]
    assert rel(q_wrong, q_post) > 1e-2
    # Gram form of ||q_h||^2 (a = A_q[h]; B = B_q; c = c_q[h]).
    gram = torch.matmul(b_q, b_q.transpose(-1, -2))  # [s, b, Rq, Rq]
    a = a_q
    n2 = (torch.einsum("sbhr,sbrt,sbht->sbh", a, gram, a) / Rq ** 2
          + 2 / Rq * torch.einsum("sbhr,sbrd,hd->sbh", a, b_q, c_q) + (c_q ** 2).sum(-1))
    assert rel(n2, x.pow(2).sum(-1)) < 1e-13
    # Theorem 3.1: no bias, no norm -> RoPE(A^T B)/Rq == A^T RoPE(B)/Rq.
    q_plain = ref.tpa_prologue_reference(factors, None, None, None, cos, sin, **cfgp)[0]
    assert rel(q_plain, torch.matmul(a_q, rot(b_q)) / Rq) < 1e-13


# --------------------------------------------------------------------------- fork layout parity


def _megatron_rope(x, theta):
    """Megatron's unfused rotation ``x*cos(emb) + rotate_half(x)*sin(emb)``, emb = cat(theta, theta)."""
    try:
        from megatron.core.models.common.embeddings.rope_utils import _rotate_half
    except Exception:  # pragma: no cover - megatron layout changed
        def _rotate_half(t, rotary_interleaved=False):
            t1, t2 = t.chunk(2, dim=-1)
            return torch.cat((-t2, t1), dim=-1)
    emb = torch.cat([theta, theta], dim=-1)[:, None, None, :]
    return x * emb.cos().to(x.dtype) + _rotate_half(x, False) * emb.sin().to(x.dtype)


@needs_interpreter
def test_layout_parity_with_fork():
    """From fork-shaped weights: the packed-factor path reproduces the fork's mixed_qkv, q/k/v after
    QK-norm and rotation, and the attention output (fp32 kernel and bf16 fork emulation vs fp64)."""
    H, G, d, Rq, R, W = 4, 2, 32, 4, 2, 6
    hpg = H // G
    s, b, hidden = 23, 2, 48
    dt = torch.float64
    x = torch.randn(s, b, hidden, dtype=dt)
    w = dict(
        linear_a_q=0.2 * torch.randn(H * Rq, hidden, dtype=dt), linear_a_k=0.2 * torch.randn(G * R, hidden, dtype=dt),
        linear_a_v=0.2 * torch.randn(G * R, hidden, dtype=dt), linear_b_q=0.2 * torch.randn(Rq * d, hidden, dtype=dt),
        linear_b_k=0.2 * torch.randn(R * d, hidden, dtype=dt), linear_b_v=0.2 * torch.randn(R * d, hidden, dtype=dt),
    )
    bias = 0.3 * torch.randn(G * (hpg + 2) * d, dtype=dt)
    gq, gk = 1 + 0.3 * torch.randn(d, dtype=dt), 1 + 0.3 * torch.randn(d, dtype=dt)
    log_freq = 16.0 * torch.log(10000.0 ** (-torch.arange(d // 2, dtype=dt) * 2 / d))
    theta = torch.arange(s, dtype=dt)[:, None] * torch.exp(log_freq / 16.0)[None, :]
    sink = torch.randn(H, dtype=dt)
    eps = 1e-5
    # Fork side: six linears, interleaved mixed_qkv + bias, split, torch RMSNorm, Megatron RoPE.
    mixed = ref.fork_mixed_qkv(x, *w.values(), bias, num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R)
    qf, kf, vf = ref.split_mixed_qkv(mixed, H, G, d)
    qf = _megatron_rope(Fn.rms_norm(qf, (d,), gq, eps), theta)
    kf = _megatron_rope(Fn.rms_norm(kf, (d,), gk, eps), theta)
    # Bias layout: head h's q bias at (h//hpg)*(hpg+2)*d + (h%hpg)*d, k at g*(hpg+2)*d + hpg*d.
    c_q, c_k, c_v = ref.split_qkv_bias(bias, H, G, d)
    for h in range(H):
        o = (h // hpg) * (hpg + 2) * d + (h % hpg) * d
        assert torch.equal(c_q[h], bias[o:o + d])
    assert torch.equal(ref.merge_qkv_bias(c_q, c_k, c_v), bias)
    # Our side: one packed GEMM.
    factors = Fn.linear(x, ref.pack_fork_factor_weights(*w.values()))
    assert factors.shape[-1] == layout.factor_width(H, G, d, Rq, R)
    a_q, a_k, a_v, b_q, b_k, b_v = layout.split_factors(factors, H, G, d, Rq, R)
    ours_mixed = torch.cat([(torch.matmul(a_q, b_q) / Rq).view(s, b, G, hpg, d),
                            (torch.matmul(a_k, b_k) / R).view(s, b, G, 1, d),
                            (torch.matmul(a_v, b_v) / R).view(s, b, G, 1, d)], 3).reshape(s, b, -1) + bias
    assert rel(ours_mixed, mixed) < 1e-13
    q, k, v = ref.tpa_prologue_reference(factors, bias, gq, gk, theta.cos(), theta.sin(), num_heads=H, num_groups=G,
                                         head_dim=d, q_rank=Rq, kv_rank=R, eps=eps)
    assert rel(q, qf) < 1e-13 and rel(k, kf) < 1e-13 and rel(v, vf) < 1e-13
    q2, k2, v2 = ref.fork_qkv(x, *w.values(), bias, gq, gk, theta.cos(), theta.sin(), num_heads=H, num_groups=G,
                              head_dim=d, q_rank=Rq, kv_rank=R, eps=eps)
    assert rel(q2, qf) < 1e-13 and rel(k2, kf) < 1e-13 and rel(v2, vf) < 1e-13
    # End to end.
    o_fork64, _ = dense_attention(qf, kf, vf, sink, W, 1 / math.sqrt(d))
    o_fork64 = o_fork64.reshape(s, b, H * d)
    inputs = [factors, bias, gq, gk, theta.cos(), theta.sin(), sink]
    cfg = kw(H, G, d, Rq, R, W)
    o32 = tpa_window_attention(*[t.float() for t in inputs], backend="triton", **cfg)
    assert rel(o32, o_fork64) < 2e-5
    o_emul = ref.tpa_fork_emulation(*inputs, **cfg)
    o_bf16_ref = ref.tpa_reference(*[t.to(torch.bfloat16) for t in inputs], **cfg)
    e_emul, e_bf16 = rel(o_emul, o_fork64), rel(o_bf16_ref, o_fork64)
    assert o_emul.dtype == torch.bfloat16 and 1e-4 < e_emul < 5e-2
    assert e_bf16 < 2e-2


# --------------------------------------------------------------------------- registration / compile / errors


def test_opcheck_reference():
    H, G, d, Rq, R, W = 2, 1, 4, 2, 1, 3
    inp = make_inputs(4, 1, H, G, d, Rq, R, dtype=torch.float32)
    inp = [t.requires_grad_(True) for t in inp]
    args = (*inp, None, None, H, G, d, Rq, R, W, 1e-5, 0.5, "reference", False)
    torch.library.opcheck(torch.ops.vpmoe.tpa_window_attention_fwd.default, args)
    # with the value residual: v1 and lam differentiable, this layer's own v returned
    v1 = torch.randn(4, 1, G, d, requires_grad=True)
    lam = torch.tensor(0.3, requires_grad=True)
    args = (*inp, v1, lam, H, G, d, Rq, R, W, 1e-5, 0.5, "reference", True)
    torch.library.opcheck(torch.ops.vpmoe.tpa_window_attention_fwd.default, args)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    H, G, d, Rq, R, W = 2, 1, 32, 2, 1, 5
    s, b = 16, 1
    inp = make_inputs(s, b, H, G, d, Rq, R, dtype=torch.float32)
    hidden = 24
    x = torch.randn(s, b, hidden)
    wpk = (0.2 * torch.randn(layout.factor_width(H, G, d, Rq, R), hidden)).requires_grad_(True)
    params = [t.requires_grad_(True) for t in inp[1:]]

    def step(x, wpk, *p):
        factors = Fn.linear(x, wpk)
        out = tpa_window_attention(factors, *p, backend=backend, **kw(H, G, d, Rq, R, W))
        return (out * out).sum()

    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = cstep(x, wpk, *params)
    grads_c = torch.autograd.grad(loss_c, [wpk, *params])
    loss_e = step(x, wpk, *params)
    grads_e = torch.autograd.grad(loss_e, [wpk, *params])
    assert rel(loss_c, loss_e) < 1e-6
    for a, c in zip(grads_c, grads_e):
        assert rel(a, c) < 1e-5


def test_clear_errors(monkeypatch):
    H, G, d, Rq, R, W = 4, 2, 32, 4, 2, 4
    inp = make_inputs(8, 1, H, G, d, Rq, R, dtype=torch.float32)
    cfg = kw(H, G, d, Rq, R, W)

    def call(*a, **k):
        c = dict(cfg)
        c.update(k)
        return tpa_window_attention(*a, **c)

    with pytest.raises(ValueError, match="factors last dim"):
        call(inp[0][..., :-1], *inp[1:])
    with pytest.raises(ValueError, match=r"\[s, b, F\]"):
        call(inp[0][0], *inp[1:])
    with pytest.raises(ValueError, match="factors last dim"):
        call(*inp, q_rank=3)
    with pytest.raises(ValueError, match="window"):
        call(*inp, window=0)
    with pytest.raises(ValueError, match="multiple of num_groups"):
        call(*inp, num_groups=3)
    with pytest.raises(ValueError, match="qkv_bias"):
        call(inp[0], inp[1][:-1], *inp[2:])
    with pytest.raises(ValueError, match="gamma_q"):
        call(inp[0], inp[1], inp[2][:-2], *inp[3:])
    with pytest.raises(ValueError, match="cos"):
        call(*inp[:4], inp[4][:-1], *inp[5:])
    with pytest.raises(TypeError, match="sin"):
        call(*inp[:5], inp[5].half(), inp[6])
    with pytest.raises(ValueError, match="sink"):
        call(*inp[:6], inp[6][:2])
    with pytest.raises(TypeError, match="floating"):
        call(inp[0].long(), *inp[1:])
    with pytest.raises(ValueError, match="backend"):
        call(*inp, backend="cuda")
    with pytest.raises(ValueError, match="both v1 and lam"):
        call(*inp, v1=torch.randn(8, 1, G, d))
    with pytest.raises(ValueError, match="v1 must be"):
        call(*inp, v1=torch.randn(8, 1, G + 1, d), lam=torch.tensor(0.5))
    with pytest.raises(ValueError, match="lam must be a 0-d"):
        call(*inp, v1=torch.randn(8, 1, G, d), lam=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="float64"):
        call(*[t.double() for t in inp], backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        Hs, Gs, ds = 2, 1, 12
        i2 = make_inputs(8, 1, Hs, Gs, ds, 2, 1, dtype=torch.float32)
        tpa_window_attention(*i2, backend="triton", **kw(Hs, Gs, ds, 2, 1, 4))
    with pytest.raises(ValueError, match="ranks <= 4"):
        i3 = make_inputs(8, 1, 2, 1, 32, 5, 1, dtype=torch.float32)
        tpa_window_attention(*i3, backend="triton", **kw(2, 1, 32, 5, 1, 4))
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call(*inp, backend="triton")


@needs_interpreter
def test_removed_attention_middle_is_refused_and_fake_matches():
    """The ``attention_middle`` choice was removed (one sliding-window kernel family): the public
    function and the custom op refuse it; the Triton forward op returns no ``out_lo`` any more and
    its fake impl predicts every output (bf16 factors: the saved q/k/v, rstd)."""
    H, G, d, Rq, R, s, W = 4, 2, 32, 2, 1, 20, 1
    inp = [t.bfloat16() if i == 0 else t for i, t in enumerate(make_inputs(s, 1, H, G, d, Rq, R, dtype=torch.float32))]
    with pytest.raises(TypeError, match="attention_middle"):
        tpa_window_attention(*inp, backend="triton", attention_middle="own", **kw(H, G, d, Rq, R, W))
    args = (*inp, None, None, H, G, d, Rq, R, W, 1e-5, 0.5, "triton", False)
    with pytest.raises(Exception, match="argument|expected"):
        torch.ops.vpmoe.tpa_window_attention_fwd(*args, "shared")
    out = torch.ops.vpmoe.tpa_window_attention_fwd(*args)
    assert len(out) == 8 and out[0].dtype == torch.bfloat16 and out[2].shape == (s, 1, H, d)
    assert out[7].numel() == 0  # no value residual, v not asked for
    torch.library.opcheck(torch.ops.vpmoe.tpa_window_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_attention_tiles_fit_shared_memory(monkeypatch):
    """GPU tiles of the sliding-window kernels: unchanged at the vpMoE shape (bf16, d = 128) and up to
    bf16 at d = 256; halved where 64 x 64 tiles would overflow the H100's shared memory (fp32 at
    d = 256 compiles to ~279 KB for sm_90, 32 x 32 to ~135 KB)."""
    from vpmoe_compile.ops.tpa_attention import triton as tk

    monkeypatch.setattr(tk, "_interpreting", lambda: False)
    blk = dict(BM=64, BN=64, warps=4, stages=2)
    for d, elem in ((128, 2), (128, 4), (256, 2), (16, 4)):
        assert tk._fit_attention_tiles(blk, d, elem) == blk
    assert tk._fit_attention_tiles(blk, 256, 4) == dict(blk, BM=32, BN=32)
    assert tk._fit_attention_tiles(dict(blk, BM=128), 256, 4) == dict(blk, BM=32, BN=16)
    monkeypatch.setattr(tk, "_interpreting", lambda: True)
    assert tk._fit_attention_tiles(blk, 256, 4) == blk


# --------------------------------------------------------------------------- value residual


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("s,W", [(19, 5), (6, 16)], ids=["s_not_block_multiple", "seq_below_window"])
def test_value_residual_matches_float64_oracle(backend, s, W):
    """The reference fork's value residual inside the op: the attention reads
    ``lam * v + (1 - lam) * v1`` (``lam = sigmoid(logit)``), and the layer's own ``v`` comes back
    (``return_v``, what the first layer hands on). fp32 op vs a float64 oracle built from the
    prologue reference and the dense window attention: output, own ``v``, and the gradients to
    the factors, the bias, ``v1`` and the logit (through both outputs)."""
    H, G, d, Rq, R, b = 4, 2, 32, 2, 2, 2
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    inp = make_inputs(s, b, H, G, d, Rq, R, gen=gen)
    v1 = torch.randn(s, b, G, d, generator=gen, dtype=torch.float64)
    logit = torch.randn((), generator=gen, dtype=torch.float64)
    dout = torch.randn(s, b, H * d, generator=gen, dtype=torch.float64)
    dvo = torch.randn(s, b, G, d, generator=gen, dtype=torch.float64)
    scale = 1 / math.sqrt(d)

    def oracle(factors, bias, v1_, logit_):
        q, k, v = ref.tpa_prologue_reference(factors, bias, *inp[2:6], num_heads=H, num_groups=G, head_dim=d,
                                             q_rank=Rq, kv_rank=R)
        lam = torch.sigmoid(logit_)
        o, _ = dense_attention(q, k, lam * v + (1 - lam) * v1_, inp[6], W, scale)
        return o.reshape(s, b, H * d), v

    leaves64 = [t.clone().requires_grad_(True) for t in (inp[0], inp[1], v1, logit)]
    o64, v64 = oracle(*leaves64)
    g64 = torch.autograd.grad((o64 * dout).sum() + (v64 * dvo).sum(), leaves64)

    leaves = [t.float().requires_grad_(True) for t in (inp[0], inp[1], v1, logit)]
    out, v_own = tpa_window_attention(leaves[0], leaves[1], *[t.float() for t in inp[2:7]], v1=leaves[2],
                                      lam=torch.sigmoid(leaves[3]), return_v=True, backend=backend,
                                      **kw(H, G, d, Rq, R, W))
    g = torch.autograd.grad((out * dout.float()).sum() + (v_own * dvo.float()).sum(), leaves)
    assert rel(out, o64) < 1e-5 and rel(v_own, v64) < 1e-5
    for name, a, e in zip(("factors", "qkv_bias", "v1", "logit"), g, g64):
        assert rel(a, e) < 1e-4, name
    # lam = 1 is the layer without residual; lam = 0 reads v1 only (dv1 carries everything)
    plain = tpa_window_attention(*[t.float() for t in inp], backend=backend, **kw(H, G, d, Rq, R, W))
    one = tpa_window_attention(*[t.float() for t in inp], v1=v1.float(), lam=torch.tensor(1.0), backend=backend,
                               **kw(H, G, d, Rq, R, W))
    assert rel(one, plain) < 1e-6
