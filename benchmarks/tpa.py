"""GPU timings of the TPA local-attention op (``tpa_window_attention``).

Usage (on a CUDA machine, from the repository root)::

    PYTHONPATH=$PWD python benchmarks/tpa.py --out $OUT --tune [--skip-chain]

0. (``--tune``) Each kernel's tiles are chosen by timing candidates at the benchmark shape; the
   timings below then run with the chosen tiles (the comparison with the pre-rewrite prologue
   kernels on the same inputs is in ``benchmarks/results/tpa_bench_h100_run5.json``).
1. Timings (``triton.testing.do_bench``, median) at b=8, s=4096, H=8, G=2, d=128, W=128, Rq=4,
   R=2: the cases of :mod:`benchmarks._attention_tpa` (plus a CUDA-graph replay of our op and a
   per-kernel profile). Results and the floors of :func:`benchmarks._attention_tpa.floor_details` go to
   ``<out>/tpa_bench.json``.

The op's bf16 correctness (against float64, the rule of docs/design.md#benchmarks-and-checks) is
checked by the GPU tests, ``python -m pytest -m gpu tests/vpmoe_compile/ops/test_tpa_attention_gpu.py``.
This script was ``benchmarks/tpa_check.py`` (timings and those checks) until the checks moved there;
the recorded runs ``benchmarks/results/tpa_bench_h100_run*.json`` name that script in their commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._attention_tpa import floor_details, floor_us, make_tpa_inputs, tpa_cases  # noqa: E402
from vpmoe_compile.ops.tpa_attention import triton as tk  # noqa: E402

RESULTS = {}
T0 = time.time()
DEVICE = "cuda"


def save(out_dir):
    with open(os.path.join(out_dir, "tpa_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench(fn, warm=True):
    if warm:
        fn()
        torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3  # us


def _set_tiles(**kw):
    tk.GPU_TILES.update(kw)


def _attn(prefix, bm, bn, w, st=2, pack=None):
    keys = {"": ("BM", "BN", "WARPS_ATTN", "STAGES_ATTN", "PACK_FWD"),
            "DQ": ("BM_DQ", "BN_DQ", "WARPS_DQ", "STAGES_DQ", "PACK_DQ"),
            "DKV": ("BM_DKV", "BN_DKV", "WARPS_DKV", "STAGES_DKV", "PACK_DKV")}[prefix]
    vals = (bm, bn, w, st, pack)
    return {k: v for k, v in zip(keys, vals) if v is not None}


def _tile_name(t):
    """``64x32_w4_s2[_pack]`` of an attention candidate."""
    bm, bn, w, st = (next(v for k, v in t.items() if k.startswith(p)) for p in ("BM", "BN", "WARPS", "STAGES"))
    return f"{bm}x{bn}_w{w}_s{st}" + ("_pack" if any(k.startswith("PACK") and v for k, v in t.items()) else "")


# Attention tile candidates (BM x BN, warps, stages, heads packed), each list's default first: the
# tiles of the earlier runs plus, from benchmarks/tpa_static.py's sm_90 compile with Triton 3.6
# (benchmarks/results/tpa_static_triton36.json): packed forward / dq programs (16 tokens x 4 heads;
# forward 130-172 registers, dq 149-192 at 16 / 32 keys, 252 at 64), the dq kernel at 8 warps
# (185 registers), the dk/dv kernel at 8 warps (no spills; the default 4 warps spill 68 stores), on
# 32-key programs (32x32: no spills; 64x32 and 32x64 spill 25 / 8 stores), or with packed query
# tiles and transposed accumulators (108-159 registers, no spills, warpgroup MMAs at 16 / 32 keys).
ATTN_FWD = [_attn("", 64, 32, 4, pack=False), _attn("", 64, 64, 4, pack=False), _attn("", 128, 64, 8, pack=False),
            _attn("", 32, 32, 2, pack=False), _attn("", 64, 32, 4, pack=True), _attn("", 64, 16, 4, pack=True),
            _attn("", 128, 32, 8, pack=True)]
ATTN_DQ = [_attn("DQ", 64, 64, 4, pack=False), _attn("DQ", 64, 32, 4, pack=False), _attn("DQ", 64, 64, 8, pack=False),
           _attn("DQ", 64, 64, 4, pack=True), _attn("DQ", 64, 32, 4, pack=True), _attn("DQ", 64, 16, 4, pack=True),
           _attn("DQ", 128, 32, 8, pack=True)]
ATTN_DKV = [_attn("DKV", 64, 64, 4, pack=False), _attn("DKV", 64, 64, 8, pack=False),
            _attn("DKV", 64, 32, 4, pack=False), _attn("DKV", 32, 64, 4, pack=False),
            _attn("DKV", 32, 32, 4, pack=False), _attn("DKV", 64, 32, 4, pack=True), _attn("DKV", 64, 16, 4, pack=True),
            _attn("DKV", 64, 32, 8, pack=True), _attn("DKV", 128, 32, 8, pack=True)]


def tune(args, shape=(8, 4096, 8, 2, 128, 128)):
    """Pick the GPU tiles of each kernel by timing it at the benchmark shape (random data)."""
    b, s, H, G, d, W = shape
    kwp = dict(H=H, G=G, d=d, Rq=4, R=2)
    f, bias, gq, gk, cos, sin, sink = [t.detach() for t in make_tpa_inputs(b, s, H, G, d, DEVICE)]
    q, k, v, rq, rk = tk.prologue_fwd(f, bias, gq, gk, cos, sin, eps=1e-5, act_dtype=f.dtype, **kwp)
    dq, dk, dv, do = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), torch.randn_like(q)
    scale = 1 / math.sqrt(d)
    sw = {"prologue_fwd": {}, "prologue_bwd": {}}

    def trial(group, name, fn):
        try:
            sw[group][name] = bench(fn)
        except Exception as e:  # resource limits of a tile choice
            sw[group][name] = float("inf")
            print(f"[tune] {group} {name} failed: {str(e)[:160]}", flush=True)

    for bt, w in ((16, 4), (16, 8), (8, 4)):
        _set_tiles(BT_FWD=bt, WARPS_FWD=w)
        trial("prologue_fwd", f"BT{bt}_w{w}", lambda: tk.prologue_fwd(f, bias, gq, gk, cos, sin, eps=1e-5,
                                                                       act_dtype=f.dtype, **kwp))
    # (2, 1) and (4, 2): 167 / 168 registers and no spills against the default's 255 with spills
    # (benchmarks/tpa_static.py's compile for sm_90), i.e. 1.5x the resident warps per SM
    for bt, w, bpp in ((4, 1, 1), (8, 2, 1), (4, 1, 2), (8, 4, 1), (2, 1, 1), (4, 2, 1)):
        _set_tiles(BT_BWD=bt, WARPS_BWD=w, BPP_BWD=bpp)
        trial("prologue_bwd", f"BT{bt}_w{w}_b{bpp}", lambda: tk.prologue_bwd(dq, dk, dv, f, bias, gq, gk, rq, rk,
                                                                              cos, sin, **kwp))
    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    # attention: the forward, then the dq kernel (dk/dv at its default tiles), then the dk/dv
    # kernel (dq at its best); each backward trial times both kernels, only one kernel's tiles vary
    for group, cands, fn in (("attn_fwd", ATTN_FWD, lambda: tk.swa_fwd(q, k, v, sink, W, scale)),
                             ("attn_dq", ATTN_DQ, lambda: tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale)),
                             ("attn_dkv", ATTN_DKV, lambda: tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale))):
        sw[group] = {}
        for tiles in cands:
            _set_tiles(**tiles)
            trial(group, _tile_name(tiles), fn)
        best = min(sw[group], key=sw[group].get)
        # the fastest candidate stays set (the first, the default tiles, if every one failed)
        _set_tiles(**(next(t for t in cands if _tile_name(t) == best) if sw[group][best] < float("inf")
                      else cands[0]))
    best = {g: min(v, key=v.get) for g, v in sw.items() if v and g.startswith("prologue")}
    pf, pb = best["prologue_fwd"], best["prologue_bwd"]
    _set_tiles(BT_FWD=int(pf[2:].split("_")[0]), WARPS_FWD=int(pf.split("_w")[1]),
               BT_BWD=int(pb[2:].split("_")[0]), WARPS_BWD=int(pb.split("_w")[1].split("_")[0]),
               BPP_BWD=int(pb.split("_b")[1]))
    # cost of the accurate delta (recomputed rowsum(P*dP)) vs FlashAttention-2's rowsum(dO*O)
    sw["attn_bwd_delta"] = {}
    for mode in ("recompute", "output"):
        _set_tiles(DELTA=mode)
        trial("attn_bwd_delta", mode, lambda: tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale))
    _set_tiles(DELTA="auto")
    RESULTS["tune_us"] = sw
    RESULTS["chosen_tiles"] = dict(tk.GPU_TILES)
    print(f"[tune {time.time() - T0:6.1f}s] {json.dumps(sw)}", flush=True)
    print(f"[tune] chosen {tk.GPU_TILES}", flush=True)
    save(args.out)


def profile_breakdown(fn, n=3):
    """Device time per kernel over ``n`` calls (torch.profiler), and the summed device busy time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None)
        if dev is None:
            dev = getattr(e, "cuda_time_total", 0)
        skip = ("aten::", "vpmoe::", "autograd", "ProfilerStep", "cuda", "GeneratedBackwardFor", "Activity Buffer")
        if dev and e.key and not e.key.startswith(skip):
            rows.append((e.key[:60], dev / n, e.count // n))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return [dict(kernel="TOTAL device busy", us_per_call=total, launches_per_call=sum(r[2] for r in rows))] + \
        [dict(kernel=k, us_per_call=t, launches_per_call=c) for k, t, c in rows[:20]]


def timings(args):
    b, s, H, G, d, W = 8, 4096, 8, 2, 128, 128
    out = {}
    cases = tpa_cases(b, s, H, G, d, W, "cuda")
    c = cases[0]
    out["tpa_fused[own]"] = dict(fwd=bench(c["fwd"]), fwd_bwd=bench(c["fwd_bwd"]))
    print(f"[time {time.time() - T0:6.1f}s] tpa_fused[own] {out['tpa_fused[own]']}", flush=True)
    RESULTS["timings_us"] = out
    save(args.out)
    try:  # device time without launch gaps: CUDA-graph replay
        g = {}
        for key in ("fwd", "fwd_bwd"):
            g[key] = triton.testing.do_bench_cudagraph(c[key], rep=300, return_mode="median") * 1e3
        out["tpa_fused[own]_cudagraph"] = g
        print(f"[time {time.time() - T0:6.1f}s] cudagraph {g}", flush=True)
    except Exception as e:
        out["tpa_fused[own]_cudagraph"] = dict(error=str(e)[:300])
        print(f"[time] cudagraph failed: {str(e)[:300]}", flush=True)
    save(args.out)
    try:
        RESULTS["profile_fwd_bwd"] = profile_breakdown(c["fwd_bwd"])
        for r in RESULTS["profile_fwd_bwd"]:
            print(f"[prof] {r['kernel']:60s} {r['us_per_call']:9.1f} us  x{r['launches_per_call']}", flush=True)
    except Exception as e:
        print(f"[prof] failed: {str(e)[:300]}", flush=True)
    save(args.out)
    if not args.skip_chain:
        for c in cases[1:]:
            t0 = time.time()
            try:
                r = dict(fwd=bench(c["fwd"]), fwd_bwd=bench(c["fwd_bwd"]))
            except Exception as e:
                r = dict(error=str(e)[:300])
            r["wall_s"] = time.time() - t0
            out[c["name"]] = r
            print(f"[time {time.time() - T0:6.1f}s] {c['name']} {r}", flush=True)
            RESULTS["timings_us"] = out
            save(args.out)
            torch.cuda.empty_cache()



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-chain", action="store_true", help="time only our op (not the fork chain)")
    ap.add_argument("--tune", action="store_true", help="pick kernel tiles by timing before the timings")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny tuning + case calls")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        global bench

        def bench(fn):  # noqa: F811 - wall clock, CPU smoke only
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6

        tune(args, shape=(1, 32, 8, 2, 128, 8))
        for c in tpa_cases(1, 32, 8, 2, 128, 8, "cpu"):
            c["fwd"]()
            c["fwd_bwd"]()
            print("[smoke] ran", c["name"])
        print("smoke ok")
        return
    RESULTS["env"] = dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                          gpu_tiles=dict(tk.GPU_TILES),
                          shape=dict(b=8, s=4096, H=8, G=2, d=128, W=128, Rq=4, R=2))
    RESULTS["floors_us"] = floor_details()
    RESULTS["floors_us_with_value_residual"] = floor_details(value_residual=True)
    RESULTS["floors_headline_us"] = floor_us()
    if args.tune:
        tune(args)
    timings(args)
    save(args.out)
    t = RESULTS.get("timings_us", {})
    graph = t.get("tpa_fused[own]_cudagraph", {})
    fwd_bwd = graph.get("fwd_bwd") or t.get("tpa_fused[own]", {}).get("fwd_bwd")
    if fwd_bwd:  # fwd+bwd, CUDA-graph replay (do_bench where the capture failed)
        from benchmarks._kernel_goals import update

        update(args.out, RESULTS["env"]["device"], {"tpa_fwd_bwd_us": fwd_bwd}, script="benchmarks/tpa.py",
               details={"shape": RESULTS["env"]["shape"], "cuda_graph": bool(graph.get("fwd_bwd"))})
    fl = RESULTS["floors_us"]
    print("\n==== summary (us, median) ====")
    for k, v in t.items():
        if "fwd" in v:
            print(f"{k:28s} fwd {v['fwd']:9.1f}  fwd+bwd {v['fwd_bwd']:9.1f}")
    for k, v in RESULTS.get("tune_us", {}).items():
        print(f"  {k:20s} " + " ".join(f"{n}={x}" if isinstance(x, dict) else f"{n}={x:.1f}" for n, x in v.items()))
    print(f"floors: bringup fwd {fl['bringup_fwd']:.1f} fwd+bwd {fl['bringup_fwd_bwd']:.1f}; fused theoretical "
          f"fwd {fl['fused_theoretical_fwd']:.1f} fwd+bwd {fl['fused_theoretical_fwd_bwd']:.1f}")


if __name__ == "__main__":
    main()
