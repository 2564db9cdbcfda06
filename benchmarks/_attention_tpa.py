"""TPA local-attention benchmark cases (imported by ``benchmarks/attention.py --suite tpa``).

Cases, all at one local layer's shape (``[s, b, ...]`` Megatron layout, bf16 activations):

* ``tpa_fused``: our op :func:`vpmoe_compile.ops.tpa_attention.tpa_window_attention` from the
  packed factors (prologue kernel -> sliding-window sink flash attention; Triton backward).
* ``fork_chain_eager``: the reference fork's chain in eager PyTorch with its rounding points
  (:func:`vpmoe_compile.ops.tpa_attention.reference.tpa_fork_emulation`: factors -> bf16 contraction ->
  mixed QKV + bias -> RMSNorm -> bf16 GRAPE-M rotation -> Megatron local-path softmax with
  materialised ``[b*H, s, s]`` scores, ``-10000`` fill and a sink column).
* ``fork_chain_compiled``: the same function under ``torch.compile`` (Inductor).

Each case is ``dict(name, fwd, fwd_bwd)``; the callables take no arguments. ``fwd_bwd`` runs the
forward and ``torch.autograd.grad`` for every differentiable input (factors, qkv bias, both gains,
cos, sin, sink). :func:`floor_us` gives the headline byte/FLOP floors (microseconds; how they are
defined: docs/design.md#benchmarks-and-checks), :func:`floor_details` every term (bytes, FLOPs,
per design and pass).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from vpmoe_compile.ops.tpa_attention import reference as ref
from vpmoe_compile.ops.tpa_attention.layout import factor_width
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention

__all__ = ["make_tpa_inputs", "tpa_cases", "floor_us", "floor_details"]

Q_RANK = 4
KV_RANK = 2


def make_tpa_inputs(b, s, H, G, d, device, *, q_rank=Q_RANK, kv_rank=KV_RANK, dtype=torch.bfloat16, seed=0):
    """Random inputs of one local layer: ``factors [s,b,F]``, ``qkv_bias``, ``gamma_q``, ``gamma_k``
    (``dtype``), ``cos``/``sin`` ``[s, d/2]`` fp32 (GRAPE-M base-10000 angles, exact positions),
    ``sink [H]``; all leaves with ``requires_grad``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Fw = factor_width(H, G, d, q_rank, kv_rank)
    hpg = H // G
    # factors of a packed GEMM of RMS-normalised hidden states: O(1) entries.
    factors = torch.randn(s, b, Fw, generator=gen)
    bias = 0.1 * torch.randn(G * (hpg + 2) * d, generator=gen)
    gq = 1 + 0.1 * torch.randn(d, generator=gen)
    gk = 1 + 0.1 * torch.randn(d, generator=gen)
    P = d // 2
    log_freq = 16.0 * torch.log(10000.0 ** (-torch.arange(P, dtype=torch.float32) * 2 / d))
    theta = torch.arange(s, dtype=torch.float32)[:, None] * torch.exp(log_freq / 16.0)[None, :]
    sink = 0.5 * torch.randn(H, generator=gen)
    out = [factors.to(device, dtype), bias.to(device, dtype), gq.to(device, dtype), gk.to(device, dtype),
           theta.cos().to(device), theta.sin().to(device), sink.to(device, dtype)]
    return [t.requires_grad_(True) for t in out]


def _case(name: str, fn: Callable, inputs: List[torch.Tensor], dout: torch.Tensor) -> Dict:
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)

    return dict(name=name, fwd=fwd, fwd_bwd=fwd_bwd)


def tpa_cases(b: int, s: int, H: int, G: int, d: int, W: int, device) -> List[Dict]:
    """Benchmark cases (see module docstring) at ``Rq = 4``, ``R = 2``."""
    inputs = make_tpa_inputs(b, s, H, G, d, device)
    dout = torch.randn(s, b, H * d, device=device, dtype=torch.bfloat16)
    cfg = dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Q_RANK, kv_rank=KV_RANK, window=W)

    def fused(*a):
        return tpa_window_attention(*a, backend="triton", **cfg)

    def chain(*a):
        return ref.tpa_fork_emulation(*a, **cfg)

    compiled = torch.compile(chain)
    return [
        _case("tpa_fused", fused, inputs, dout),
        _case("fork_chain_eager", chain, inputs, dout),
        _case("fork_chain_compiled", compiled, inputs, dout),
    ]


def floor_us(**shape) -> Dict[str, float]:
    """The headline floors (microseconds) of :func:`floor_details` at the vpMoE shape (or ``**shape``, the keyword
    arguments of :func:`floor_details`): one entry per line to draw on a timing plot."""
    f = floor_details(**shape)
    return {
        "floor SWA on ready q/k/v fwd+bwd": f["swa_only_fwd_bwd"],
        "floor two-kernel (ours) fwd": f["bringup_fwd"],
        "floor two-kernel (ours) fwd+bwd": f["bringup_fwd_bwd"],
        "floor fused (theoretical) fwd": f["fused_theoretical_fwd"],
        "floor fused (theoretical) fwd+bwd": f["fused_theoretical_fwd_bwd"],
    }


def floor_details(b: int = 8, s: int = 4096, H: int = 8, G: int = 2, d: int = 128, W: int = 128,
                  q_rank: int = Q_RANK, kv_rank: int = KV_RANK, bandwidth: float = 3.0e12,
                  flops: float = 800e12, value_residual: bool = False) -> Dict[str, float]:
    """Byte and FLOP floors (microseconds), computed from the shape (docs/design.md#benchmarks-and-checks).

    ``bandwidth`` (bytes/s, read + write) and ``flops`` (bf16 dense) default to H100 measurements,
    3.0 TB/s and 800 TFLOP/s. ``value_residual`` adds the ``v1`` read / ``dv1`` write of the
    fork's value residual (the fork's design includes them; our op does not take ``v1`` yet).

    Returns:
        dict of floors in microseconds: ``flop_fwd``, ``flop_bwd``, and for each design
        ``<design>_fwd``, ``<design>_bwd``, ``<design>_fwd_bwd`` (the byte floor or the FLOP floor,
        whichever is larger) with designs ``swa_only`` (attention on ready q/k/v),
        ``bringup`` (separate prologue kernel + attention, what the op runs today) and
        ``fused_theoretical`` (factors in, output out, no q/k/v round trip).
    """
    e = 2  # bf16 bytes
    tok = b * s
    Fw = factor_width(H, G, d, q_rank, kv_rank)
    Qb = tok * H * d * e
    Kb = Vb = tok * G * d * e
    Ob = dOb = Qb
    Lb = b * H * s * 4
    Fb = tok * Fw * e
    V1b = tok * G * d * e if value_residual else 0
    pairs = sum(min(i + 1, W) for i in range(s))
    f_fwd = b * H * pairs * 4 * d
    f_bwd = 2.5 * f_fwd
    bytes_ = {
        "swa_only_fwd": Qb + Kb + Vb + Ob + Lb,
        "swa_only_bwd": Qb + Kb + Vb + Ob + dOb + Lb + Qb + Kb + Vb,
        "fused_theoretical_fwd": Fb + V1b + Ob + Lb,
        "fused_theoretical_bwd": Fb + V1b + Ob + dOb + Lb + Fb + V1b,
    }
    producer_fwd = Fb + V1b + Qb + Kb + Vb
    producer_bwd = Qb + Kb + Vb + Fb + Fb + 2 * V1b
    bytes_["bringup_fwd"] = bytes_["swa_only_fwd"] + producer_fwd
    bytes_["bringup_bwd"] = bytes_["swa_only_bwd"] + producer_bwd
    t_ff = f_fwd / flops * 1e6
    t_fb = f_bwd / flops * 1e6
    res = {"flop_fwd": t_ff, "flop_bwd": t_fb, "flop_total_gflop": (f_fwd + f_bwd) / 1e9}
    for design in ("swa_only", "bringup", "fused_theoretical"):
        fw = max(bytes_[f"{design}_fwd"] / bandwidth * 1e6, t_ff)
        bw = max(bytes_[f"{design}_bwd"] / bandwidth * 1e6, t_fb)
        res[f"{design}_fwd"] = fw
        res[f"{design}_bwd"] = bw
        res[f"{design}_fwd_bwd"] = fw + bw
        res[f"{design}_bytes_fwd_MB"] = bytes_[f"{design}_fwd"] / 1e6
        res[f"{design}_bytes_bwd_MB"] = bytes_[f"{design}_bwd"] / 1e6
    return res
