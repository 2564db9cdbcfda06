"""The two sliding-window + sink attention kernel families, side by side (GPU).

    PYTHONPATH=$PWD python benchmarks/window_kernels.py --out DIR

The library has two Triton implementations of causal sliding-window attention with a learnable
per-head sink and GQA on ready ``q [s,b,H,d]``, ``k, v [s,b,G,d]``:

* ``own``:    :func:`vpmoe_compile.ops.tpa_attention.triton.swa_fwd` / ``swa_bwd`` (written for
  TPA's local layers; the backward recomputes ``delta`` from ``P`` and ``dP`` for a 16-bit output);
* ``shared``: :func:`vpmoe_compile.ops.sink_attention.triton.sink_attention_fwd_triton` /
  ``sink_attention_bwd_triton`` (the global layers' kernels with the window on; autotuned; the
  forward stores the output's bf16 rounding residual for the backward).

Both plug into the fused TPA op as its "attention middle" (``[kernels] tpa_attention_middle``).
This script times, at the local layers' shape (H=8, G=2, d=128, W=128, s=4096, bf16) and two
batch sizes, each family

* alone on ready q/k/v: forward, and forward + backward;
* inside the fused TPA op (factors -> prologue -> middle, and back): forward + backward,

with ``triton.testing.do_bench`` (median, microseconds), and checks each family's accuracy
against the float64 reference at s=1024 (relative error of o, dq, dk, dv, dsink), next to a
bf16-input fp32-math PyTorch reference. Writes ``window_kernels.json`` (``meta``, ``results``,
``accuracy``, ``faster``: the family with the smaller fused fwd+bwd time summed over the shapes)
and ``window_kernels.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ("own", "shared")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _middle(family):
    from vpmoe_compile.ops.sink_attention import triton as sa
    from vpmoe_compile.ops.tpa_attention import triton as tk

    if family == "own":
        def fwd(q, k, v, sink, W, scale):
            o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
            return o, lse, None

        def bwd(do, q, k, v, o, lse, sink, W, scale, o_lo):
            return tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale)
    else:
        def fwd(q, k, v, sink, W, scale):
            return sa.sink_attention_fwd_triton(q, k, v, sink, None, W, scale, return_residual=True)

        def bwd(do, q, k, v, o, lse, sink, W, scale, o_lo):
            return sa.sink_attention_bwd_triton(do, q, k, v, sink, None, o, lse, W, scale, out_lo=o_lo)
    return fwd, bwd


def _qkv(b, s, H, G, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(s, b, H, d, generator=g)
    k = torch.randn(s, b, G, d, generator=g)
    v = torch.randn(s, b, G, d, generator=g)
    sink = 0.5 * torch.randn(H, generator=g)
    do = torch.randn(s, b, H, d, generator=g)
    return [t.to("cuda", dtype) for t in (q, k, v, sink, do)]


def time_middle(family, b, s, H, G, d, W, warmup, rep):
    import triton

    fwd, bwd = _middle(family)
    q, k, v, sink, do = _qkv(b, s, H, G, d, seed=1)
    scale = 1.0 / math.sqrt(d)

    def f():
        return fwd(q, k, v, sink, W, scale)

    def fb():
        o, lse, o_lo = fwd(q, k, v, sink, W, scale)
        return bwd(do, q, k, v, o, lse, sink, W, scale, o_lo)

    fb()
    torch.cuda.synchronize()
    return (triton.testing.do_bench(f, warmup=warmup, rep=rep, return_mode="median") * 1e3,
            triton.testing.do_bench(fb, warmup=warmup, rep=rep, return_mode="median") * 1e3)


def time_fused(family, b, s, H, G, d, W, warmup, rep):
    import triton
    from _attention_tpa import tpa_cases

    case = tpa_cases(b, s, H, G, d, W, "cuda", attention_middle=family)[0]
    assert case["name"] == "tpa_fused"
    case["fwd_bwd"]()
    torch.cuda.synchronize()
    return triton.testing.do_bench(case["fwd_bwd"], warmup=warmup, rep=rep, return_mode="median") * 1e3


def accuracy(b, s, H, G, d, W):
    """Relative errors against float64, for both families and the bf16-input fp32-math reference."""
    from vpmoe_compile.ops.sink_attention.reference import (
        sink_attention_reference,
        sink_attention_reference_backward,
    )

    q, k, v, sink, do = _qkv(b, s, H, G, d, seed=2)
    sink = sink.float()  # the modules keep the sink in fp32
    scale = 1.0 / math.sqrt(d)
    kw = dict(window=W, softmax_scale=scale)
    o64, _ = sink_attention_reference(q.double(), k.double(), v.double(), sink.double(), **kw)
    g64 = sink_attention_reference_backward(do.double(), q.double(), k.double(), v.double(), sink.double(), **kw)
    exact = dict(o=o64, dq=g64[0], dk=g64[1], dv=g64[2], dsink=g64[3])
    o32, _ = sink_attention_reference(q, k, v, sink, compute_dtype=torch.float32, **kw)
    g32 = sink_attention_reference_backward(do, q, k, v, sink, compute_dtype=torch.float32, **kw)
    rows = {"torch_fp32_math": {n: _rel(t, exact[n]) for n, t in zip(exact, (o32, *g32))}}
    for fam in FAMILIES:
        fwd, bwd = _middle(fam)
        o, lse, o_lo = fwd(q, k, v, sink, W, scale)
        dq, dk, dv, ds = bwd(do, q, k, v, o, lse, sink, W, scale, o_lo)
        rows[fam] = {n: _rel(t, exact[n]) for n, t in zip(exact, (o, dq, dk, dv, ds))}
    worst = {fam: max(rows[fam][n] / max(rows["torch_fp32_math"][n], 1e-12) for n in exact) for fam in FAMILIES}
    return dict(shape=dict(b=b, s=s, H=H, G=G, d=d, W=W), rel_err=rows, worst_ratio_to_fp32_math=worst)


FAMILY_LABELS = {  # plot labels (the JSON keeps the family names)
    "own": "TPA's own window kernels (swa_fwd / swa_bwd)",
    "shared": "global layers' sink kernels, window on",
}


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _plot import wrap

    whats = {"middle fwd": "attention alone, fwd", "middle fwd+bwd": "attention alone, fwd+bwd",
             "fused TPA fwd+bwd": "inside the fused TPA op, fwd+bwd"}
    rows = doc["results"]
    labels = [f"batch {r['b']}: {whats.get(r['what'], r['what'])}" for r in rows if r["family"] == "own"]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    width = 0.38
    for i, fam in enumerate(FAMILIES):
        vals = [r["us"] for r in rows if r["family"] == fam]
        xs = [j + (i - 0.5) * width for j in range(len(vals))]
        bars = ax.bar(xs, vals, width, label=FAMILY_LABELS.get(fam, fam))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(labels)), [wrap(x, 18) for x in labels], fontsize=8)
    ax.set_ylim(0, max(r["us"] for r in rows) * 1.25)  # room for the bar labels and the legend
    ax.set_ylabel("microseconds (median, lower is better)")
    m = doc["meta"]
    ax.set_title(f"Sliding-window + sink attention kernels, {m['device']}\n"
                 f"H={m['H']} G={m['G']} d={m['d']} W={m['W']} s={m['s']} bf16 - faster: "
                 f"{FAMILY_LABELS.get(doc['faster'], doc['faster'])}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--batches", default="2,8", help="batch sizes [2,8]")
    p.add_argument("--s", type=int, default=4096)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--G", type=int, default=2)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("window_kernels.py times Triton kernels and needs a CUDA GPU")
    os.makedirs(a.out, exist_ok=True)
    import triton

    shape = dict(H=a.H, G=a.G, d=a.d, W=a.window)
    results = []
    t0 = time.time()
    for b in [int(x) for x in a.batches.split(",")]:
        for fam in FAMILIES:
            f_us, fb_us = time_middle(fam, b, a.s, a.H, a.G, a.d, a.window, a.warmup, a.rep)
            fused_us = time_fused(fam, b, a.s, a.H, a.G, a.d, a.window, a.warmup, a.rep)
            for what, us in (("middle fwd", f_us), ("middle fwd+bwd", fb_us), ("fused TPA fwd+bwd", fused_us)):
                results.append(dict(family=fam, b=b, what=what, us=us))
            print(f"[{time.time() - t0:5.1f}s] b={b} {fam}: middle fwd {f_us:.0f} us, fwd+bwd {fb_us:.0f} us, "
                  f"fused TPA fwd+bwd {fused_us:.0f} us", flush=True)
    acc = accuracy(1, 1024, a.H, a.G, a.d, a.window)
    print("accuracy (rel. err vs float64):", json.dumps(acc["rel_err"], indent=1), flush=True)
    fused_total = {fam: sum(r["us"] for r in results if r["family"] == fam and r["what"] == "fused TPA fwd+bwd")
                   for fam in FAMILIES}
    doc = dict(
        meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command="python benchmarks/window_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  s=a.s, timing=f"triton.testing.do_bench median, warmup={a.warmup}ms rep={a.rep}ms", **shape),
        results=results,
        accuracy=acc,
        fused_fwd_bwd_total_us=fused_total,
        faster=min(fused_total, key=fused_total.get),
    )
    tmp = os.path.join(a.out, ".window_kernels.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(a.out, "window_kernels.json"))
    plot(doc, os.path.join(a.out, "window_kernels.png"))
    print("faster:", doc["faster"], fused_total)


if __name__ == "__main__":
    main()
