"""Grid order of the global (causal + ALiBi + sink) attention kernels: longest-processing-time
first over a 1-D grid (``sink_attention.triton.HEAVY_FIRST = True``) against the 2-D
``(tile, batch x head)`` grid (the default), with SDPA's default backend (cuDNN on the H100;
causal, no bias, no sink: the kernel goal's baseline) in the same run.

Question: does dispatching every (batch, head)'s heaviest causal tile first shorten the kernels?
With the 2-D grid the GPU dispatches ``bh`` after ``bh`` (x fastest), so the last ``bh``'s
heaviest tiles start last and run alone at the end: for the dk/dv kernel (1024 programs at the
shape below) a greedy schedule over 264 slots is 1.28x the ideal makespan, LPT order 1.01x.

Shape: b = 8, s = 4096, H = 8, G = 2, d = 128, bf16 (``benchmarks/attention.py``'s). Each order
is autotuned on its own (``LPT`` is part of the autotune key; ``--fixed``: both at the 2-D grid's
H100 autotune choices, no autotuning). Timed: forward + backward
(``torch.autograd.grad`` w.r.t. q, k, v, sink) replayed from a CUDA graph (median of
``triton.testing.do_bench_cudagraph``), and the per-kernel device time (``torch.profiler``, mean
of 3 calls); the two orders' outputs and gradients are compared bitwise.

Usage (GPU): ``python benchmarks/attention_schedule.py --out OUT`` -> ``OUT/attention_schedule.json``
and ``.png``.
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
LABELS = {False: "2-D grid (tile, bh)", True: "1-D grid, heaviest tiles first"}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = [o for o in ("False", "True") if o in res["orders"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    names = ["forward", "dq", "dk / dv"]
    width = 0.38
    for j, o in enumerate(orders):
        ks = res["orders"][o]["kernels_us"]
        vals = [ks.get(k, 0.0) for k in KERNELS]
        xs = [i + (j - 0.5) * width for i in range(len(KERNELS))]
        bars = ax1.bar(xs, vals, width, label=LABELS[o == "True"])
        for x, v in zip(xs, vals):
            ax1.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(KERNELS)), names)
    ax1.set_ylabel("µs per call (device time)")
    ax1.set_title("per kernel")
    ax1.legend(fontsize=8)
    labels = ["SDPA default\n(causal, no bias, no sink)"] + [
        f"ours: {LABELS[o == 'True']}" for o in orders]
    vals = [res["sdpa_default_fwd_bwd_us"]] + [res["orders"][o]["fwd_bwd_us_graph"] for o in orders]
    bars = ax2.barh(range(len(vals)), vals, color=["0.6", "C0", "C1"][: len(vals)])
    for i, v in enumerate(vals):
        ax2.text(v, i, f" {v:.0f} µs ({v / vals[0]:.2f}× SDPA)", va="center", fontsize=8)
    ax2.set_yticks(range(len(vals)), labels, fontsize=8)
    ax2.set_xlim(0, max(vals) * 1.45)
    ax2.set_xlabel("forward + backward, µs (CUDA-graph replay, median)")
    ax2.set_title("global causal ALiBi + sink attention")
    sh = res["shape"]
    fig.suptitle(f"Grid order of the global attention kernels — {res['device']}, b={sh['b']} s={sh['s']} "
                 f"H={sh['H']} G={sh['G']} d={sh['d']} bf16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--G", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--rep", type=int, default=100, help="do_bench_cudagraph repetitions (ms)")
    ap.add_argument("--fixed", action="store_true",
                    help="both orders at fixed tiles (the H100 autotune choices of the 2-D grid: fwd "
                         "and dq 128 x 64 / 8 warps / 3 stages, dk/dv 32 x 64 / 4 warps / 2 stages) "
                         "instead of autotuning each order")
    a = ap.parse_args(argv)
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
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "orders": {}}
    q, k, v, sink, dout = make_inputs(a.b, a.s, a.H, a.G, a.d)
    slopes = alibi.alibi_slopes(a.H, device="cuda")
    leaves = (q, k, v, sink)

    KT = tk.KernelTiles
    cfg = (tk.SinkAttentionConfig(fwd=KT(128, 64, 8, 3), dq=KT(128, 64, 8, 3), dkv=KT(32, 64, 4, 2))
           if a.fixed else None)
    res["tiles"] = "fixed: fwd/dq 128x64 w8 s3, dkv 32x64 w4 s2" if a.fixed else "autotuned per order"

    def step():
        with tk.use_config(cfg):
            return torch.autograd.grad(ops.alibi_sink_attention(q, k, v, slopes, sink), leaves, dout)

    outs = {}
    default = tk.HEAVY_FIRST
    try:
        for order in (False, True):
            tk.HEAVY_FIRST = order
            t0 = time.time()
            outs[order] = [g.detach().clone() for g in step()]  # autotunes this order
            kern = _profile_kernels(step)
            res["orders"][str(order)] = {
                "label": LABELS[order],
                "fwd_bwd_us_graph": _bench_graph(step, a.rep),
                "kernels_us": {kk: kern[kk] for kk in KERNELS if kk in kern},
                "autotune_choices": {nm: {str(kk): str(vv) for kk, vv in getattr(tk, nm).cache.items()}
                                     for nm in ("_fwd_autotuned", "_dq_autotuned", "_dkv_autotuned")
                                     if getattr(tk, nm) is not None},
                "wall_s": round(time.time() - t0, 1),
            }
            print(order, json.dumps({kk: vv for kk, vv in res["orders"][str(order)].items()
                                     if kk != "autotune_choices"}), flush=True)
    finally:
        tk.HEAVY_FIRST = default
    res["bitwise_equal"] = all(torch.equal(x, y) for x, y in zip(outs[False], outs[True]))
    qb, kb, vb = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_(True) for t in (q, k, v))
    dob = dout.permute(1, 2, 0, 3).contiguous()
    sdpa = lambda: torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qb, kb, vb, is_causal=True, enable_gqa=True), (qb, kb, vb), dob)
    res["sdpa_default_fwd_bwd_us"] = _bench_graph(sdpa, a.rep)
    new, old = res["orders"]["True"], res["orders"]["False"]
    res["speedup_fwd_bwd"] = old["fwd_bwd_us_graph"] / new["fwd_bwd_us_graph"]
    res["vs_sdpa"] = {o: r["fwd_bwd_us_graph"] / res["sdpa_default_fwd_bwd_us"] for o, r in res["orders"].items()}
    stem = os.path.join(a.out, "attention_schedule")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=2)
    try:
        plot(res, stem + ".png")
    except Exception as e:  # the numbers are written already
        print("plot failed:", e)
    print("SUMMARY", json.dumps({"speedup_fwd_bwd": res["speedup_fwd_bwd"], "vs_sdpa": res["vs_sdpa"],
                                 "bitwise_equal": res["bitwise_equal"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
