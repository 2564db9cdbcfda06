"""bf16 accuracy of the sink attention kernels on the GPU (docs/design.md#benchmarks-and-checks).

The rule (as in the FlashAttention test suite): for the output, the LSE and every gradient (dq,
dk, dv, dsink), the kernel's relative error against a float64 reference is at most 2x the error of
a PyTorch implementation run on the same bf16 inputs with fp32 math
(``sink_attention_reference(..., compute_dtype=torch.float32)``), plus an absolute slack of 1e-5
(for quantities both compute almost exactly, such as the fp32 LSE). Outputs must be finite and the
backward bitwise deterministic (two runs). Through the public op (``sink_attention_with_lse``,
``backend="triton"``): the full-causal kernels with fixed tiles (``triton.use_config``) or
autotuned; the window cases on the library's one sliding-window family
(``tpa_attention/triton.py: swa_fwd / swa_bwd``, its ``GPU_TILES``; ``use_config`` does not apply).

Formerly ``benchmarks/attention_check.py`` (its last record: ``benchmarks/results/attention_check.json``).
Skipped without CUDA; the CPU twin of the rule (Triton interpreter) is in ``test_sink_attention.py``.
"""

from __future__ import annotations

import pytest
import torch

from vpmoe_compile.ops.sink_attention import alibi_slopes, sink_attention_with_lse
from vpmoe_compile.ops.sink_attention import triton as tk
from vpmoe_compile.ops.sink_attention.reference import (
    sink_attention_reference,
    sink_attention_reference_backward,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(tk.interpreter_active(), reason="kernels built for the Triton interpreter"),
]

NAMES = ("out", "lse", "dq", "dk", "dv", "dsink")
FACTOR, SLACK = 2.0, 1e-5

# H100-like tiles for the odd full-causal shapes (no autotuning: keeps the compile time down) and
# small tiles (many tiles).
FIXED = tk.SinkAttentionConfig(fwd=tk.KernelTiles(128, 64, 8, 3), dq=tk.KernelTiles(128, 64, 8, 3),
                               dkv=tk.KernelTiles(64, 64, 8, 2))
SMALL = tk.SinkAttentionConfig(fwd=tk.KernelTiles(32, 16), dq=tk.KernelTiles(32, 16), dkv=tk.KernelTiles(32, 16))
VP = dict(H=8, G=2, d=128)  # the vpMoE heads

CASES = {
    # the production paths (config None = autotuned) at the vpMoE shape
    "global_alibi_autotuned": dict(VP, s=1024, b=1, alibi=True),
    "window128": dict(VP, s=1024, b=1, window=128),
    # the window family (its own tiles): odd shapes
    "window128_s1000": dict(VP, s=1000, b=2, window=128),  # s not a multiple of the block
    "window_ge_s": dict(VP, s=100, b=2, window=128),  # s < W: plain causal
    "window33_s203": dict(VP, s=203, b=1, window=33),  # band edges off the tiles
    "mha_window1": dict(H=4, G=4, d=64, s=77, b=3, window=1),  # W = 1: delta recomputed as rowsum(P dP)
    "mqa_window64": dict(H=8, G=1, d=128, s=129, b=2, window=64),
    # full causal, fixed tiles
    "global_alibi_small_tiles": dict(VP, s=203, b=1, alibi=True, config=SMALL),
    "pack3_causal_alibi": dict(H=6, G=2, d=64, s=150, b=1, alibi=True, config=FIXED),  # 3 heads per group
    "s1_alibi": dict(VP, s=1, b=2, alibi=True, config=FIXED),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` in float64 (inf if ``a`` is not finite)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_within_2x_of_fp32_math_reference_and_deterministic(name):
    _check(name, CASES[name])


# Both grid orders of the full-causal kernels (``tk.HEAVY_FIRST``) under the same rule, on the
# full-causal cases with fixed tiles.
@pytest.mark.parametrize("heavy_first", [False, True])
@pytest.mark.parametrize("name", ["global_alibi_small_tiles", "pack3_causal_alibi", "s1_alibi"])
def test_grid_orders_within_2x_of_fp32_math_reference(monkeypatch, heavy_first, name):
    monkeypatch.setattr(tk, "HEAVY_FIRST", heavy_first)
    _check(name, CASES[name])


def _check(name, case):
    s, b, H, G, d = (case[k] for k in ("s", "b", "H", "G", "d"))
    window, config = case.get("window"), case.get("config")
    slopes = alibi_slopes(H, device="cuda") if case.get("alibi") else None
    gen = torch.Generator(device="cuda").manual_seed(100 + list(CASES).index(name))
    q = torch.randn(s, b, H, d, device="cuda", generator=gen).bfloat16()
    k = torch.randn(s, b, G, d, device="cuda", generator=gen).bfloat16()
    v = torch.randn(s, b, G, d, device="cuda", generator=gen).bfloat16()
    sink = torch.randn(H, device="cuda", generator=gen).bfloat16()  # the bf16 softmax_offset parameter
    dout = torch.randn(s, b, H, d, device="cuda", generator=gen).bfloat16()

    def ours():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sink)]
        with tk.use_config(config):
            out, lse = sink_attention_with_lse(*leaves, slopes=slopes, window=window, backend="triton")
            grads = torch.autograd.grad(out, leaves, dout)
        return (out.detach(), lse.detach()) + tuple(grads)

    got = ours()
    again = ours()
    torch.cuda.synchronize()
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[5].dtype == torch.bfloat16
    for n, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{name}: non-finite {n}"
    not_equal = [n for n, x, y in zip(NAMES, got, again) if not torch.equal(x, y)]
    assert not not_equal, f"{name}: two identical runs differ in {not_equal}"

    def reference(cd):
        ins = [t if cd == torch.float32 else t.double() for t in (q, k, v, sink)]
        dd = dout if cd == torch.float32 else dout.double()
        out, lse = sink_attention_reference(*ins, slopes=slopes, window=window, compute_dtype=cd)
        grads = sink_attention_reference_backward(dd, *ins, slopes=slopes, window=window, compute_dtype=cd)
        return (out, lse) + tuple(grads)

    exact, fp32_math = reference(torch.float64), reference(torch.float32)
    errs = {n: (rel(a, e), rel(t, e)) for n, a, t, e in zip(NAMES, got, fp32_math, exact)}
    bad = {n: e for n, e in errs.items() if not e[0] <= FACTOR * e[1] + SLACK}
    assert not bad, (f"{name}: (kernel, PyTorch bf16-in fp32-math) errors vs float64 above "
                     f"{FACTOR}x + {SLACK}: {bad}; all: {errs}")
