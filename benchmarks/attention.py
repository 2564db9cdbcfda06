"""Attention benchmark (GPU): our sink-attention kernels vs SDPA, FlexAttention and the fork's path.

Usage::

    export PYTHONPATH=$PWD
    python benchmarks/attention.py --suite global|window|tpa|all --out DIR

Shape (defaults): b=8, s=4096, H=8, G=2, d=128, bf16, W=128 (window suite). Times are medians of
``triton.testing.do_bench`` in microseconds, forward and forward+backward (``torch.autograd.grad``
w.r.t. every differentiable input). Writes ``DIR/attention_<suite>.json`` and ``.png``.

Suites:
* ``global``: ours (causal + ALiBi + sink); SDPA causal (no bias, no sink; GQA through
  ``enable_gqa=True`` and, per backend, expanded K/V where that backend rejects GQA); FlexAttention
  with an ALiBi ``score_mod`` and a causal BlockMask (without sink, and with the post-hoc sink
  ``O * sigmoid(L - sink)`` from ``return_lse``); the fork path (materialised fp32 ``[H, s, s]``
  bias, unfused fp32 softmax with a concatenated sink column, plain eager).
* ``window``: FlexAttention with a sliding-window BlockMask (without / with post-hoc sink), ours
  (``window_sink_attention``: the one sliding-window kernel family, ``tpa_attention/triton.py``;
  ``attention_window.json`` was recorded when it ran on the sink-attention kernels' window path,
  since deleted), and the byte floor of attention on ready q/k/v (docs/design.md#benchmarks-and-checks).
* ``tpa``: cases from ``benchmarks/_attention_tpa.py`` (teammate-owned) if present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ops_import import import_op_module  # noqa: E402


def _bench(fn, warmup, rep):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def _bench_graph(fn, rep):
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Runner:
    def __init__(self, args):
        self.args = args
        self.rows = []

    def case(self, suite, name, fwd, fwd_bwd, note="", flops_fwd=None, compare=None, graph=True):
        """``*_us``: do_bench (host launch overhead included: what an eager step sees when the GPU
        waits for Python); ``*_us_graph``: the same calls replayed from a CUDA graph (GPU time)."""
        row = {"suite": suite, "name": name, "note": note}
        for key, fn in (("fwd_us", fwd), ("fwd_bwd_us", fwd_bwd)):
            if fn is None:
                row[key] = None
                continue
            try:
                t0 = time.time()
                row[key] = _bench(fn, self.args.warmup, self.args.rep)
                row[key + "_wall_s"] = round(time.time() - t0, 1)
            except Exception as e:  # record and go on: one failing baseline must not stop the rest
                row[key] = None
                row[key + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                traceback.print_exc(limit=2)
                continue
            if graph and not self.args.no_graph:
                try:
                    row[key + "_graph"] = _bench_graph(fn, self.args.rep)
                except Exception as e:
                    row[key + "_graph"] = None
                    row[key + "_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    torch.cuda.synchronize()
        if flops_fwd is not None:
            for key, mult in (("fwd_us", 1.0), ("fwd_bwd_us", 3.5), ("fwd_us_graph", 1.0),
                              ("fwd_bwd_us_graph", 3.5)):
                if row.get(key):
                    row[key.replace("_us", "_tflops")] = mult * flops_fwd / row[key] / 1e6
        if compare is not None:
            try:
                row["rel_diff_vs_ours"] = compare()
            except Exception as e:
                row["rel_diff_vs_ours_error"] = f"{type(e).__name__}: {e}"[:300]
        self.rows.append(row)
        print(f"[{suite}] {name:48s} fwd {row['fwd_us']} us (graph {row.get('fwd_us_graph')})  fwd+bwd "
              f"{row['fwd_bwd_us']} us (graph {row.get('fwd_bwd_us_graph')})", flush=True)
        torch.cuda.empty_cache()
        return row


def _copy_bandwidth(warmup, rep):
    x = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x), warmup, rep)
    return 2 * x.numel() * 4 / (t * 1e-6) / 1e12  # TB/s, read + write


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


def _flex_with_lse(fa, q, k, v, **kw):
    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
        return out, aux.lse
    return fa.flex_attention(q, k, v, return_lse=True, **kw)


def make_inputs(b, s, H, G, d, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)  # noqa: E731
    q = mk(s, b, H, d).requires_grad_(True)
    k = mk(s, b, G, d).requires_grad_(True)
    v = mk(s, b, G, d).requires_grad_(True)
    sink = (0.5 * torch.randn(H, device=device, generator=g)).to(dtype).requires_grad_(True)
    dout = mk(s, b, H, d)
    return q, k, v, sink, dout


def _bhsd(x):
    return x.detach().permute(1, 2, 0, 3).contiguous().requires_grad_(True)


def suite_global(r: Runner, a):
    ops = import_op_module("sink_attention")
    alibi = import_op_module("sink_attention.alibi")
    b, s, H, G, d = a.b, a.s, a.H, a.G, a.d
    hpg = H // G
    scale = 1.0 / math.sqrt(d)
    flops = 4.0 * b * H * d * (s * (s + 1) / 2)  # causal useful FLOPs of the forward
    q, k, v, sink, dout = make_inputs(b, s, H, G, d)
    slopes = alibi.alibi_slopes(H, device="cuda")

    ours = lambda: ops.alibi_sink_attention(q, k, v, slopes, sink)  # noqa: E731
    ours_out = ours().detach()
    r.case("global", "ours: causal+ALiBi+sink (Triton)", ours,
           lambda: torch.autograd.grad(ours(), (q, k, v, sink), dout), flops_fwd=flops)

    qb, kb, vb, dob = _bhsd(q), _bhsd(k), _bhsd(v), dout.permute(1, 2, 0, 3).contiguous()
    ke = kb.detach().repeat_interleave(hpg, 1).requires_grad_(True)
    ve = vb.detach().repeat_interleave(hpg, 1).requires_grad_(True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("default", None)):
        for gqa in (True, False):
            kk, vv = (kb, vb) if gqa else (ke, ve)

            def fwd(kk=kk, vv=vv, backend=backend, gqa=gqa):
                if backend is None:
                    return F.scaled_dot_product_attention(qb, kk, vv, is_causal=True, enable_gqa=gqa)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qb, kk, vv, is_causal=True, enable_gqa=gqa)

            row = r.case("global", f"SDPA causal {label} ({'enable_gqa' if gqa else 'KV expanded'}), no bias/sink",
                         fwd, lambda fwd=fwd, kk=kk, vv=vv: torch.autograd.grad(fwd(), (qb, kk, vv), dob),
                         flops_fwd=flops)
            if row["fwd_us"] is not None and gqa:
                break  # GQA works on this backend: skip the expanded variant

    try:
        fa = _flex()
        sl = slopes
        mask = fa.create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device="cuda")

        def alibi_mod(score, b_, h_, qi, ki):
            return score - sl[h_] * (qi - ki)

        flex_ns = torch.compile(lambda q_, k_, v_: fa.flex_attention(
            q_, k_, v_, score_mod=alibi_mod, block_mask=mask, enable_gqa=True, scale=scale))
        r.case("global", "FlexAttention causal+ALiBi score_mod, no sink", lambda: flex_ns(qb, kb, vb),
               lambda: torch.autograd.grad(flex_ns(qb, kb, vb), (qb, kb, vb), dob), flops_fwd=flops)

        def flex_sink_fn(q_, k_, v_, sink_):
            o, lse = _flex_with_lse(fa, q_, k_, v_, score_mod=alibi_mod, block_mask=mask, enable_gqa=True,
                                    scale=scale)
            return (o.float() * torch.sigmoid(lse - sink_.float().view(1, -1, 1))[..., None]).to(o.dtype)

        flex_sink = torch.compile(flex_sink_fn)
        sb = sink.detach().clone().requires_grad_(True)
        r.case("global", "FlexAttention causal+ALiBi + post-hoc sink", lambda: flex_sink(qb, kb, vb, sb),
               lambda: torch.autograd.grad(flex_sink(qb, kb, vb, sb), (qb, kb, vb, sb), dob), flops_fwd=flops,
               note="O*sigmoid(L-sink) from return_lse/AuxRequest",
               compare=lambda: _rel(flex_sink(qb, kb, vb, sb).permute(2, 0, 1, 3), ours_out))
    except Exception as e:
        r.rows.append({"suite": "global", "name": "FlexAttention", "error": f"{type(e).__name__}: {e}"[:300]})
        traceback.print_exc(limit=3)

    # The fork path: materialised fp32 bias (cached, not timed), unfused softmax + sink column, eager.
    idx = torch.arange(s, device="cuda", dtype=torch.float32)
    bias = (-slopes.view(H, 1, 1) * (idx.view(1, s, 1) - idx.view(1, 1, s)).clamp_min(0)).unsqueeze(0)
    causal_masked = torch.triu(torch.ones(s, s, dtype=torch.bool, device="cuda"), 1)
    sf = sink.detach().clone().requires_grad_(True)

    def fork():
        scores = torch.matmul(qb, ke.transpose(-1, -2)) * scale  # bf16 like baddbmm(alpha=scale)
        scores = scores.float() + bias
        scores = scores.masked_fill(causal_masked, -10000.0)
        col = sf.float().view(1, H, 1, 1).expand(b, H, s, 1)
        probs = torch.softmax(torch.cat([scores, col], -1), -1)[..., :-1].to(qb.dtype)
        return torch.matmul(probs, ve)

    r.case("global", "fork path: fp32 [s,s] bias + unfused softmax + sink col (eager)", fork,
           lambda: torch.autograd.grad(fork(), (qb, ke, ve, sf), dob), flops_fwd=flops,
           note="KV expanded (repeat_interleave, not timed); bias cached, not timed", graph=False,
           compare=lambda: _rel(fork().permute(2, 0, 1, 3), ours_out))


def _floor(b, s, H, G, d, bw_tbs):
    el = 2  # bf16
    Q = O = b * s * H * d * el
    K = V = b * s * G * d * el
    L = b * H * s * 4
    fwd = Q + K + V + O + L
    bwd = (Q + K + V + O + O + L) + (Q + K + V)  # read q,k,v,o,do,lse; write dq,dk,dv
    return {"fwd_bytes": fwd, "bwd_bytes": bwd, "fwd_us": fwd / bw_tbs / 1e6, "bwd_us": bwd / bw_tbs / 1e6,
            "fwd_bwd_us": (fwd + bwd) / bw_tbs / 1e6, "bandwidth_TBps": bw_tbs}


def suite_window(r: Runner, a, results):
    ops = import_op_module("sink_attention")
    b, s, H, G, d, W = a.b, a.s, a.H, a.G, a.d, a.window
    scale = 1.0 / math.sqrt(d)
    pairs = sum(min(i + 1, W) for i in range(s))
    flops = 4.0 * b * H * d * pairs
    q, k, v, sink, dout = make_inputs(b, s, H, G, d)
    ours = lambda: ops.window_sink_attention(q, k, v, sink, W)  # noqa: E731
    ours_out = ours().detach()
    qb, kb, vb, dob = _bhsd(q), _bhsd(k), _bhsd(v), dout.permute(1, 2, 0, 3).contiguous()
    try:
        fa = _flex()
        mask = fa.create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki < W), None, None, s, s,
                                    device="cuda")
        flex_ns = torch.compile(lambda q_, k_, v_: fa.flex_attention(q_, k_, v_, block_mask=mask,
                                                                     enable_gqa=True, scale=scale))
        r.case("window", f"(d) FlexAttention sliding window W={W}, no sink", lambda: flex_ns(qb, kb, vb),
               lambda: torch.autograd.grad(flex_ns(qb, kb, vb), (qb, kb, vb), dob), flops_fwd=flops,
               note="BlockMask 128 (default)")

        def flex_sink_fn(q_, k_, v_, sink_):
            o, lse = _flex_with_lse(fa, q_, k_, v_, block_mask=mask, enable_gqa=True, scale=scale)
            return (o.float() * torch.sigmoid(lse - sink_.float().view(1, -1, 1))[..., None]).to(o.dtype)

        flex_sink = torch.compile(flex_sink_fn)
        sb = sink.detach().clone().requires_grad_(True)
        r.case("window", f"(d) FlexAttention sliding window W={W} + post-hoc sink",
               lambda: flex_sink(qb, kb, vb, sb),
               lambda: torch.autograd.grad(flex_sink(qb, kb, vb, sb), (qb, kb, vb, sb), dob), flops_fwd=flops,
               compare=lambda: _rel(flex_sink(qb, kb, vb, sb).permute(2, 0, 1, 3), ours_out))
    except Exception as e:
        r.rows.append({"suite": "window", "name": "FlexAttention", "error": f"{type(e).__name__}: {e}"[:300]})
        traceback.print_exc(limit=3)
    r.case("window", f"(e) ours: window W={W} + sink (Triton)", ours,
           lambda: torch.autograd.grad(ours(), (q, k, v, sink), dout), flops_fwd=flops)
    bw = results.get("copy_bandwidth_TBps") or 3.0
    results["window_floor"] = {"measured_bw": _floor(b, s, H, G, d, bw), "at_3.0TBps": _floor(b, s, H, G, d, 3.0)}


def suite_tpa(r: Runner, a, results):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_attention_tpa.py")
    if not os.path.exists(path):
        msg = "benchmarks/_attention_tpa.py not found: tpa suite skipped"
        print(msg)
        results["tpa_skipped"] = msg
        return
    spec = importlib.util.spec_from_file_location("_attention_tpa", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for c in mod.tpa_cases(a.b, a.s, a.H, a.G, a.d, a.window, "cuda"):
        r.case("tpa", c["name"], c.get("fwd"), c.get("fwd_bwd"), note=c.get("note", ""))
    try:
        results["tpa_floor_us"] = mod.floor_us()
    except Exception as e:
        results["tpa_floor_error"] = str(e)[:300]


def _profile_kernels(fn, iters=3):
    """Average CUDA time (us) per kernel name over ``iters`` calls of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0)
        if t and t > 0:
            out[evt.key[:60]] = round(t / iters, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def kernel_sweep(a, results):
    """Per-kernel times of ours (fwd+bwd): the full-causal kernels autotuned and with a few fixed
    tile triples; the window flavour once (the sliding-window family runs its own ``GPU_TILES``,
    ``use_config`` does not apply to it)."""
    ops = import_op_module("sink_attention")
    alibi = import_op_module("sink_attention.alibi")
    tk = import_op_module("sink_attention.triton")
    KT, SC = tk.KernelTiles, tk.SinkAttentionConfig
    triples = {
        "autotuned": None,
        "f128x64w8|dq128x64w8|dkv64x64w8": SC(fwd=KT(128, 64, 8, 3), dq=KT(128, 64, 8, 3), dkv=KT(64, 64, 8, 2)),
        "f64x64w4|dq64x64w4|dkv32x64w4": SC(fwd=KT(64, 64, 4, 3), dq=KT(64, 64, 4, 3), dkv=KT(32, 64, 4, 2)),
        "f128x128w8|dq64x32w4|dkv32x128w8": SC(fwd=KT(128, 128, 8, 2), dq=KT(64, 32, 4, 2), dkv=KT(32, 128, 8, 2)),
        "f64x128w4|dq64x128w8|dkv16x64w4": SC(fwd=KT(64, 128, 4, 2), dq=KT(64, 128, 8, 2), dkv=KT(16, 64, 4, 2)),
        "f128x64w4|dq128x64w4s2|dkv64x128w8s1": SC(fwd=KT(128, 64, 4, 2), dq=KT(128, 64, 4, 2),
                                                   dkv=KT(64, 128, 8, 1)),
    }
    if not a.kernel_sweep_all:
        triples = {"autotuned": None}
    q, k, v, sink, dout = make_inputs(a.b, a.s, a.H, a.G, a.d)
    slopes = alibi.alibi_slopes(a.H, device="cuda")
    sweep = {}
    for flavour in ("window", "global"):
        for name, cfg in (triples.items() if flavour == "global" else [("GPU_TILES", None)]):
            def step(cfg=cfg, flavour=flavour):
                with tk.use_config(cfg):
                    if flavour == "global":
                        o = ops.alibi_sink_attention(q, k, v, slopes, sink)
                    else:
                        o = ops.window_sink_attention(q, k, v, sink, a.window)
                    torch.autograd.grad(o, (q, k, v, sink), dout)
            try:
                t0 = time.time()
                prof = _profile_kernels(step)
                sweep[f"{flavour}:{name}"] = prof
                top = {kk: vv for kk, vv in prof.items() if "sink_attn" in kk or "_swa_" in kk}
                print(f"[sweep] {flavour:6s} {name:40s} " + "  ".join(
                    f"{kk.replace('_sink_attn_', '').replace('_swa_', '')[:14]}={vv:.0f}" for kk, vv in top.items())
                    + f"  ({time.time() - t0:.0f}s)", flush=True)
            except Exception as e:
                sweep[f"{flavour}:{name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"[sweep] {flavour} {name} ERROR {e}", flush=True)
    try:
        best = {}
        for nm in ("_fwd_autotuned", "_dq_autotuned", "_dkv_autotuned"):
            at = getattr(tk, nm)
            if at is not None:
                best[nm] = {str(kk): str(vv) for kk, vv in at.cache.items()}
        results["autotune_choices"] = best
        print("[sweep] autotune choices:", json.dumps(best, indent=1), flush=True)
    except Exception as e:
        results["autotune_choices_error"] = str(e)[:300]
    results["kernel_sweep_us"] = sweep


def plot(rows, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _plot import plain_log_axis

    suites = [s for s in ("global", "window", "tpa") if any(r["suite"] == s and r.get("fwd_us") for r in rows)]
    if not suites:
        return
    fig, axes = plt.subplots(len(suites), 1, figsize=(15, 3.2 + 0.55 * max(
        sum(1 for r in rows if r["suite"] == s) for s in suites) * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        rs = [r for r in rows if r["suite"] == suite and (r.get("fwd_us") or r.get("fwd_bwd_us"))]
        names = [r["name"] for r in rs]
        y = range(len(rs))
        f = [r.get("fwd_us_graph") or r.get("fwd_us") or 0 for r in rs]
        fb = [r.get("fwd_bwd_us_graph") or r.get("fwd_bwd_us") or 0 for r in rs]
        ax.barh([i + 0.2 for i in y], f, height=0.4, label="fwd (CUDA-graph replay; eager if none)")
        ax.barh([i - 0.2 for i in y], fb, height=0.4, label="fwd+bwd (CUDA-graph replay; eager if none)")
        fw = [r.get("fwd_us") for r in rs]
        fbw = [r.get("fwd_bwd_us") for r in rs]
        ax.scatter([x for x in fw if x], [i + 0.2 for i, x in zip(y, fw) if x], marker="|", s=120, color="k",
                   label="eager do_bench (incl. host launch gaps)", zorder=3)
        ax.scatter([x for x in fbw if x], [i - 0.2 for i, x in zip(y, fbw) if x], marker="|", s=120, color="k",
                   zorder=3)
        for i in y:
            for val, eager, off in ((f[i], fw[i], 0.2), (fb[i], fbw[i], -0.2)):
                if val:
                    # the value right of the bar, or right of the eager marker where that sits
                    # just past the bar's end (it would cross the number)
                    at = eager if eager and val < eager < val * 1.4 else val
                    ax.text(at * 1.02, i + off, f" {val:,.0f}", va="center", fontsize=7)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("time (us, median, log scale)")
        ax.set_title(f"{suite}: b={results['shape']['b']} s={results['shape']['s']} H={results['shape']['H']} "
                     f"G={results['shape']['G']} d={results['shape']['d']} bf16, {results.get('device', '')}",
                     fontsize=9)
        if suite == "window" and "window_floor" in results:
            fl = results["window_floor"]["measured_bw"]
            ax.axvline(fl["fwd_us"], color="C0", ls="--", lw=1, label=f"fwd byte floor {fl['fwd_us']:.0f} us")
            ax.axvline(fl["fwd_bwd_us"], color="C1", ls="--", lw=1,
                       label=f"fwd+bwd byte floor {fl['fwd_bwd_us']:.0f} us")
        if suite == "tpa" and isinstance(results.get("tpa_floor_us"), dict):
            for j, (kname, val) in enumerate(results["tpa_floor_us"].items()):
                ax.axvline(val, color=f"C{j + 2}", ls=":", lw=1, label=f"{kname} {val:.0f} us")
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, max(hi, max(v for v in f + fb + fw + fbw if v) * 1.5))  # room for the last label
        plain_log_axis(ax.xaxis)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


GOAL_ROWS = {  # kernel_goals.json key -> the row that measures it
    "global_fwd_bwd_us": "ours: causal+ALiBi+sink (Triton)",
    "sdpa_default_fwd_bwd_us": "SDPA causal default (enable_gqa), no bias/sink",
    "tpa_fwd_bwd_us": "(a) ours: fused TPA op from factors",
}


def kernel_goal_values(rows) -> dict:
    """The kernel-goal numbers among ``rows``: fwd+bwd, CUDA-graph replay where measured. The
    global attention and SDPA are recorded only together (the goal compares them in one run)."""
    by_name = {row["name"]: row for row in rows}
    out = {}
    for key, name in GOAL_ROWS.items():
        row = by_name.get(name)
        val = row and (row.get("fwd_bwd_us_graph") or row.get("fwd_bwd_us"))
        if val:
            out[key] = val
    if ("global_fwd_bwd_us" in out) != ("sdpa_default_fwd_bwd_us" in out):
        out.pop("global_fwd_bwd_us", None)
        out.pop("sdpa_default_fwd_bwd_us", None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["global", "window", "tpa", "all", "none"], default="all")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--s", type=int, default=4096)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--G", type=int, default=2)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--kernel-sweep", action="store_true",
                   help="also profile ours per kernel (torch.profiler), autotuned tiles")
    p.add_argument("--kernel-sweep-all", action="store_true",
                   help="with --kernel-sweep: also several fixed tile triples")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention benchmark needs a CUDA GPU")
        return 1
    import triton

    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"b": a.b, "s": a.s, "H": a.H, "G": a.G, "d": a.d, "window": a.window, "dtype": "bf16"},
        "timing": f"triton.testing.do_bench median, warmup={a.warmup}ms rep={a.rep}ms",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["copy_bandwidth_TBps"] = _copy_bandwidth(a.warmup, a.rep)
    r = Runner(a)
    if a.kernel_sweep:
        kernel_sweep(a, results)
        with open(os.path.join(a.out, f"attention_{a.suite}.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    suites = {"all": ["global", "window", "tpa"], "none": []}.get(a.suite, [a.suite])
    for suite in suites:
        try:
            if suite == "global":
                suite_global(r, a)
            elif suite == "window":
                suite_window(r, a, results)
            else:
                suite_tpa(r, a, results)
        except Exception as e:
            results[f"{suite}_error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        results["rows"] = r.rows
        with open(os.path.join(a.out, f"attention_{a.suite}.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    goals = kernel_goal_values(r.rows)
    if goals:
        from _kernel_goals import update

        update(a.out, results["device"], goals, script="benchmarks/attention.py",
               details={"shape": results["shape"], "timing": "fwd+bwd, CUDA-graph replay (do_bench where none)"})
    plot(r.rows, results, os.path.join(a.out, f"attention_{a.suite}.png"))
    print("\n%-66s %9s %9s %11s %11s" % ("case (us, median)", "fwd", "fwd graph", "fwd+bwd", "f+b graph"))
    for row in r.rows:
        vals = [row.get(kk) for kk in ("fwd_us", "fwd_us_graph", "fwd_bwd_us", "fwd_bwd_us_graph")]
        print("%-66s %9s %9s %11s %11s" % ((f"[{row['suite']}] {row['name']}"[:66],)
                                           + tuple(f"{x:.1f}" if x else "-" for x in vals)))
    if "window_floor" in results:
        fl = results["window_floor"]["measured_bw"]
        print(f"window byte floor @ {fl['bandwidth_TBps']:.2f} TB/s: fwd {fl['fwd_us']:.1f} us, "
              f"fwd+bwd {fl['fwd_bwd_us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
