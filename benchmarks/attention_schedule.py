"""Grid order of the global (causal + ALiBi + sink) attention kernels: longest-processing-time
first over a 1-D grid (``sink_attention.triton.HEAVY_FIRST = True``, the default) against the 2-D
``(tile, batch x head)`` grid (``HEAVY_FIRST = False``), with SDPA's default backend (cuDNN on the H100; causal,
no bias, no sink: the kernel goal's baseline) in the same run.

Question: does dispatching every (batch, head)'s heaviest causal tile first shorten the kernels?
With the 2-D grid the GPU dispatches ``bh`` after ``bh`` (x fastest), so the last ``bh``'s
heaviest tiles start last and run alone at the end: for the dk/dv kernel (1024 programs at the
shape below) a greedy schedule over 264 slots is 1.28x the ideal makespan, LPT order 1.01x.

Shape: b = 8, s = 4096, H = 8, G = 2, d = 128, bf16 (``benchmarks/attention.py``'s). Each order is
autotuned on its own (``LPT`` is part of the autotune key), or with ``--fixed`` both run the 2-D
grid's H100 autotune choices. Recorded per order: forward + backward (``torch.autograd.grad``
w.r.t. q, k, v, sink) replayed from a CUDA graph (median of ``triton.testing.do_bench_cudagraph``),
the per-kernel device time (``torch.profiler``, mean of 3 calls), every autotune candidate's time
and the compiled kernels' registers / spills. The two orders' outputs and gradients are compared
bitwise.

Usage (GPU): ``python benchmarks/attention_schedule.py --out OUT [--fixed] [--tag T]``
-> ``OUT/attention_schedule[_T].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ops_import import import_op_module  # noqa: E402
from attention import _bench_graph, _profile_kernels, make_inputs  # noqa: E402

KERNELS = ("_sink_attn_fwd_kernel", "_sink_attn_bwd_dq_kernel", "_sink_attn_bwd_dkv_kernel")
#: name -> (HEAVY_FIRST, label); "lpt" is the default kernels, "2d" the baseline.
VARIANTS = {
    "2d": (False, "2-D grid (tile, bh)"),
    "lpt": (True, "1-D grid, heaviest tiles first"),
}


def _config_timings(tk) -> dict:
    """Each autotuned kernel's measured candidates (ms, Triton's ``configs_timings``) of the last
    tuning: how far the runner-up tiles are from the choice."""
    out = {}
    for nm in ("_fwd_autotuned", "_dq_autotuned", "_dkv_autotuned"):
        timings = getattr(getattr(tk, nm), "configs_timings", None) or {}
        out[nm] = {str(cfg): [round(float(t), 4) for t in (ts if isinstance(ts, (list, tuple)) else [ts])]
                   for cfg, ts in timings.items()}
    return out


def _compiled_resources(tk) -> list:
    """Registers / spills / shared memory of every compiled variant of the three kernels
    (best effort: read from Triton's per-device kernel caches)."""
    rows = []
    for name in KERNELS:
        fn = getattr(tk, name)
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kern in getattr(cache, "values", lambda: [])():
                md = getattr(kern, "metadata", None)
                rows.append({"kernel": name, "num_warps": getattr(md, "num_warps", None),
                             "num_stages": getattr(md, "num_stages", None),
                             "shared_bytes": getattr(md, "shared", None),
                             "n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None)})
    return rows


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["variants"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(names))
    for j, nm in enumerate(names):
        ks = res["variants"][nm]["kernels_us"]
        vals = [ks.get(k, 0.0) for k in KERNELS]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(KERNELS))]
        ax1.bar(xs, vals, width, label=res["variants"][nm]["label"])
        for x, v in zip(xs, vals):
            ax1.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(len(KERNELS)), ["forward", "dq", "dk / dv"])
    ax1.set_ylabel("µs per call (device time)")
    ax1.set_title("per kernel")
    ax1.legend(fontsize=7)
    labels = ["SDPA default\n(causal, no bias, no sink)"] + [f"ours: {res['variants'][nm]['label']}" for nm in names]
    vals = [res["sdpa_default_fwd_bwd_us"]] + [res["variants"][nm]["fwd_bwd_us_graph"] for nm in names]
    ax2.barh(range(len(vals)), vals, color=["0.6"] + [f"C{i}" for i in range(len(names))])
    for i, v in enumerate(vals):
        ax2.text(v, i, f" {v:.0f} µs ({v / vals[0]:.2f}× SDPA)", va="center", fontsize=8)
    ax2.set_yticks(range(len(vals)), labels, fontsize=8)
    ax2.set_xlim(0, max(vals) * 1.45)
    ax2.set_xlabel("forward + backward, µs (CUDA-graph replay, median)")
    ax2.set_title("global causal ALiBi + sink attention")
    sh = res["shape"]
    fig.suptitle(f"Grid order of the global attention kernels — {res['device']}, b={sh['b']} "
                 f"s={sh['s']} H={sh['H']} G={sh['G']} d={sh['d']} bf16; tiles {res['tiles']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)} (the first is the reference of the bitwise check)")
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--G", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--rep", type=int, default=100, help="do_bench_cudagraph repetitions (ms)")
    ap.add_argument("--fixed", action="store_true",
                    help="every variant at fixed tiles (the H100 autotune choices of the default grid: fwd "
                         "and dq 128 x 64 / 8 warps / 3 stages, dk/dv 32 x 64 / 4 warps / 2 stages) "
                         "instead of autotuning each")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    import triton

    ops = import_op_module("sink_attention")
    alibi = import_op_module("sink_attention.alibi")
    tk = import_op_module("sink_attention.triton")
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(b=a.b, s=a.s, H=a.H, G=a.G, d=a.d, dtype="bf16"),
           "command": "python benchmarks/attention_schedule.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}}
    q, k, v, sink, dout = make_inputs(a.b, a.s, a.H, a.G, a.d)
    slopes = alibi.alibi_slopes(a.H, device="cuda")
    leaves = (q, k, v, sink)

    KT = tk.KernelTiles
    cfg = (tk.SinkAttentionConfig(fwd=KT(128, 64, 8, 3), dq=KT(128, 64, 8, 3), dkv=KT(32, 64, 4, 2))
           if a.fixed else None)
    res["tiles"] = "fixed: fwd/dq 128x64 w8 s3, dkv 32x64 w4 s2" if a.fixed else "autotuned per variant"

    def step():
        with tk.use_config(cfg):
            out = ops.alibi_sink_attention(q, k, v, slopes, sink)
            return (out,) + torch.autograd.grad(out, leaves, dout)

    outs = {}
    default = tk.HEAVY_FIRST
    try:
        for nm in names:
            tk.HEAVY_FIRST, label = VARIANTS[nm]
            t0 = time.time()
            outs[nm] = [g.detach().clone() for g in step()]  # autotunes this variant
            kern = _profile_kernels(step)
            res["variants"][nm] = {
                "label": label, "heavy_first": tk.HEAVY_FIRST,
                "fwd_bwd_us_graph": _bench_graph(step, a.rep),
                "kernels_us": {kk: kern[kk] for kk in KERNELS if kk in kern},
                "autotune_choices": {an: {str(kk): str(vv) for kk, vv in getattr(tk, an).cache.items()}
                                     for an in ("_fwd_autotuned", "_dq_autotuned", "_dkv_autotuned")
                                     if getattr(tk, an) is not None},
                "autotune_timings_ms": _config_timings(tk),
                "wall_s": round(time.time() - t0, 1),
            }
            print(nm, json.dumps({kk: vv for kk, vv in res["variants"][nm].items()
                                  if not kk.startswith("autotune")}), flush=True)
    finally:
        tk.HEAVY_FIRST = default
    try:
        res["compiled"] = _compiled_resources(tk)
    except Exception as e:  # diagnostics only
        res["compiled"] = f"unavailable: {type(e).__name__}: {e}"[:300]
    base = names[0]
    res["bitwise_equal_to_" + base] = {
        nm: all(torch.equal(x, y) for x, y in zip(outs[base], outs[nm])) for nm in names[1:]}
    qb, kb, vb = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_(True) for t in (q, k, v))
    dob = dout.permute(1, 2, 0, 3).contiguous()
    sdpa = lambda: torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qb, kb, vb, is_causal=True, enable_gqa=True), (qb, kb, vb), dob)
    res["sdpa_default_fwd_bwd_us"] = _bench_graph(sdpa, a.rep)
    t_base = res["variants"][base]["fwd_bwd_us_graph"]
    res["speedup_vs_" + base] = {nm: t_base / r["fwd_bwd_us_graph"] for nm, r in res["variants"].items()}
    res["vs_sdpa"] = {nm: r["fwd_bwd_us_graph"] / res["sdpa_default_fwd_bwd_us"] for nm, r in res["variants"].items()}
    stem = os.path.join(a.out, "attention_schedule" + (f"_{a.tag}" if a.tag else ""))
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=2)
    try:
        plot(res, stem + ".png")
    except Exception as e:  # the numbers are written already
        print("plot failed:", e)
    print("SUMMARY", json.dumps({kk: res[kk] for kk in ("speedup_vs_" + base, "vs_sdpa", "bitwise_equal_to_" + base)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
