"""GPU driver for the TPA local-attention op: bf16 correctness vs float64, then timings.

Usage (on a CUDA machine, from the repository root)::

    PYTHONPATH=$PWD python benchmarks/tpa_check.py --out $OUT --tune [--skip-chain] [--skip-shared]

0. (``--tune``) Each kernel's tiles are chosen by timing candidates at the benchmark shape; the
   checks and timings below then run with the chosen tiles (the comparison with the pre-rewrite
   prologue kernels on the same inputs is in ``benchmarks/results/tpa_bench_h100_run5.json``).
1. Correctness of the whole op in bf16 (and fp32 for s <= 128) vs the float64 reference, for the
   output and every gradient, at b=2 s=1024 W=128, b=1 s=777 W=100, b=2 s=64 W=1, b=3 s=1 W=128
   and b=2 s=128 W=40. Two
   rules are reported: ``ok`` = kernel error <= 2x the bf16 fork emulation's (the fork's own
   rounding points) + 1e-3; ``ok_strict`` = kernel error <= 2x that of the PyTorch reference
   run on the same bf16 inputs with fp32 math + 1e-5 (the rule of docs/design.md#benchmarks-and-checks). Freed GPU memory is
   poisoned with NaN first. The attention middle alone (ready bf16 q/k/v; its backward recomputes
   ``delta = rowsum(P*dP)``) is checked the same way at W=1, s=1 and W=128
   (``correctness_attention_middle``), as ``benchmarks/attention_check.py`` does for the
   shared kernels.
2. Timings (``triton.testing.do_bench``, median) at b=8, s=4096, H=8, G=2, d=128, W=128, Rq=4,
   R=2: the cases of :mod:`benchmarks._attention_tpa` (plus a CUDA-graph replay of our op and a
   per-kernel profile). Results and the floors of :func:`benchmarks._attention_tpa.floor_details` go to
   ``<out>/tpa_bench.json``.
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
from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference  # noqa: E402
from vpmoe_compile.ops.tpa_attention import reference as ref  # noqa: E402
from vpmoe_compile.ops.tpa_attention import triton as tk  # noqa: E402
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention  # noqa: E402

NAMES = ("factors", "qkv_bias", "gamma_q", "gamma_k", "cos", "sin", "sink")
RESULTS = {}
T0 = time.time()


def save(out_dir):
    with open(os.path.join(out_dir, "tpa_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


DEVICE = "cuda"


def poison():
    """Fill 1 GiB of the caching allocator's memory with NaN, so that outputs the next call
    allocates from it and never writes show up as NaN."""
    if DEVICE == "cuda":
        torch.full((1 << 28,), float("nan"), device="cuda")


def run_grads(fn, inputs, dtype, dout):
    # cos/sin tables stay fp32 (fp64 for the reference)
    xs = [t.detach().to(dtype if (i not in (4, 5) or dtype == torch.float64) else torch.float32)
          .requires_grad_(True) for i, t in enumerate(inputs)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out, grads


def correctness(shapes, middles=("own",)):
    res = []
    ok_all = True
    for (b, s, W) in shapes:
        H, G, d, Rq, R = 8, 2, 128, 4, 2
        cfg = dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, window=W)
        inputs = [t.detach() for t in make_tpa_inputs(b, s, H, G, d, DEVICE, dtype=torch.float32, seed=s + b + W)]
        # every implementation sees the same (bf16-representable) values: errors measure compute only
        inputs = [t if i in (4, 5) else t.bfloat16().float() for i, t in enumerate(inputs)]
        dout = torch.randn(s, b, H * d, device=DEVICE).bfloat16().float()
        o64, g64 = run_grads(lambda *a: ref.tpa_reference(*a, **cfg), inputs, torch.float64, dout.double())
        oem, gem = run_grads(lambda *a: ref.tpa_fork_emulation(*a, **cfg), inputs, torch.bfloat16, dout)
        orf, grf = run_grads(lambda *a: ref.tpa_reference(*a, **cfg), inputs, torch.bfloat16, dout)
        base = {"out": (rel(oem, o64), rel(orf, o64))}
        for n, a, c, r in zip(NAMES, gem, grf, g64):
            base[n] = (rel(a, r), rel(c, r))
        combos = [(m, torch.bfloat16) for m in middles]
        if s % 16 == 0 and s <= 128:  # fp32 kernels (IEEE dots) vs float64 on one short shape
            combos.append(("own", torch.float32))
        for middle, dt in combos:
            poison()
            ok_, gk_ = run_grads(lambda *a: tpa_window_attention(*a, backend="triton", attention_middle=middle, **cfg),
                                 inputs, dt, dout)
            row = dict(b=b, s=s, W=W, middle=middle, dtype=str(dt).split(".")[-1], errors={})
            errs = {"out": rel(ok_, o64)}
            for n, g, r in zip(NAMES, gk_, g64):
                errs[n] = rel(g, r)
            ok = ok_strict = True
            for n, e in errs.items():
                # cos/sin are fp32 leaves: the fp32-math reference keeps their gradients in fp32 while
                # the kernel's path (like any bf16 model) rounds dq/dk to bf16 first; no strict rule there
                fp32_leaf = n in ("cos", "sin")
                em, er = base[n]
                if dt == torch.bfloat16:
                    lim, lim_strict = 2 * em + 1e-3, 2 * er + 1e-5
                else:  # fp32 inputs take IEEE dots in the own kernels (the shared middle may use tf32)
                    lim = lim_strict = 2e-3 if middle == "shared" else 1e-4
                passed = bool(math.isfinite(e) and e <= lim)
                strict = bool(math.isfinite(e) and e <= lim_strict)
                ok &= passed
                ok_strict &= strict or fp32_leaf
                row["errors"][n] = dict(kernel=e, fork_emul_bf16=em, ref_bf16_in_fp32_math=er, limit=lim, ok=passed,
                                        ratio_vs_fp32_math=e / max(er, 1e-30), ok_strict=strict)
            row["ok"] = ok
            row["ok_strict"] = ok_strict
            ok_all &= ok
            res.append(row)
            print(f"[check {time.time() - T0:6.1f}s] b={b} s={s} W={W} middle={middle} {row['dtype']}: ok={ok} "
                  f"strict={ok_strict} "
                  + " ".join(f"{n}={v['kernel']:.2e}(emul {v['fork_emul_bf16']:.1e}, x{v['ratio_vs_fp32_math']:.2f})"
                             for n, v in row["errors"].items()), flush=True)
    return res, ok_all


def correctness_middle(cases):
    """The attention middle alone (``tpa_attention.triton.swa_fwd``/``swa_bwd``) on ready bf16
    q/k/v vs float64, with the rule of ``benchmarks/attention_check.py``: error <= 2x that of the
    dense PyTorch reference on the same bf16 inputs with fp32 math (gradients rounded to bf16) + 1e-5."""
    out = []
    for (b, s, H, G, d, W) in cases:
        g = torch.Generator(device=DEVICE).manual_seed(7 * s + W)
        q = torch.randn(s, b, H, d, device=DEVICE, generator=g).bfloat16()
        k = torch.randn(s, b, G, d, device=DEVICE, generator=g).bfloat16()
        v = torch.randn(s, b, G, d, device=DEVICE, generator=g).bfloat16()
        sink = torch.randn(H, device=DEVICE, generator=g).bfloat16()  # the bf16 softmax_offset parameter
        do = torch.randn(s, b, H, d, device=DEVICE, generator=g).bfloat16()
        scale = 1 / math.sqrt(d)

        def dense(dt):
            xs = [t.to(dt).requires_grad_(True) for t in (q, k, v, sink)]
            o, lse = sink_attention_reference(*xs, window=W, softmax_scale=scale, compute_dtype=dt)
            return (o, lse, *torch.autograd.grad(o, xs, do.to(o.dtype)))

        exact = dense(torch.float64)
        t32 = list(dense(torch.float32))
        t32 = [t32[0].bfloat16(), t32[1]] + [x.bfloat16() for x in t32[2:]]  # outputs in the caller's dtypes
        poison()
        o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
        got = list((o, lse, *tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale)))
        got[5] = got[5].to(sink.dtype)  # as the op returns it
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        row = dict(b=b, s=s, H=H, G=G, d=d, W=W, errors={})
        ok = True
        for n, a, t, e in zip(("out", "lse", "dq", "dk", "dv", "dsink"), got, t32, exact):
            ea, et = rel(a, e), rel(t, e)
            passed = bool(ea <= 2 * et + 1e-5)
            ok &= passed
            row["errors"][n] = dict(kernel=ea, ref_bf16_in_fp32_math=et, ratio=ea / max(et, 1e-30), ok=passed)
        row["ok"] = ok
        out.append(row)
        print(f"[middle {time.time() - T0:6.1f}s] b={b} s={s} H={H} G={G} W={W}: ok={ok} "
              + " ".join(f"{n}={v['kernel']:.2e}(x{v['ratio']:.2f})" for n, v in row["errors"].items()), flush=True)
    return out


def bench(fn, warm=True):
    if warm:
        fn()
        torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3  # us


def _set_tiles(**kw):
    tk.GPU_TILES.update(kw)


def tune(args, shape=(8, 4096, 8, 2, 128, 128)):
    """Pick the GPU tiles of each kernel by timing it at the benchmark shape (random data)."""
    b, s, H, G, d, W = shape
    kwp = dict(H=H, G=G, d=d, Rq=4, R=2)
    f, bias, gq, gk, cos, sin, sink = [t.detach() for t in make_tpa_inputs(b, s, H, G, d, DEVICE)]
    q, k, v, rq, rk = tk.prologue_fwd(f, bias, gq, gk, cos, sin, eps=1e-5, act_dtype=f.dtype, **kwp)
    dq, dk, dv, do = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), torch.randn_like(q)
    scale = 1 / math.sqrt(d)
    sw = {"prologue_fwd": {}, "prologue_bwd": {}, "attn_fwd": {}, "attn_bwd": {}}

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
    for bt, w, bpp in ((4, 1, 1), (8, 2, 1), (4, 1, 2), (8, 4, 1)):
        _set_tiles(BT_BWD=bt, WARPS_BWD=w, BPP_BWD=bpp)
        trial("prologue_bwd", f"BT{bt}_w{w}_b{bpp}", lambda: tk.prologue_bwd(dq, dk, dv, f, bias, gq, gk, rq, rk,
                                                                              cos, sin, **kwp))
    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    for bm, bn, w, st in ((64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 2, 2)):
        _set_tiles(BM=bm, BN=bn, WARPS_ATTN=w, STAGES_ATTN=st, BM_BWD=bm, BN_BWD=bn, WARPS_ATTN_BWD=w,
                   STAGES_ATTN_BWD=st)
        nm = f"{bm}x{bn}_w{w}_s{st}"
        trial("attn_fwd", nm, lambda: tk.swa_fwd(q, k, v, sink, W, scale))
        trial("attn_bwd", nm, lambda: tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale))
    best = {g: min(v, key=v.get) for g, v in sw.items() if v}
    pf, pb = best["prologue_fwd"], best["prologue_bwd"]
    af = [int(x) for x in best["attn_fwd"].replace("x", "_").replace("w", "").replace("s", "").split("_")]
    ab = [int(x) for x in best["attn_bwd"].replace("x", "_").replace("w", "").replace("s", "").split("_")]
    _set_tiles(BT_FWD=int(pf[2:].split("_")[0]), WARPS_FWD=int(pf.split("_w")[1]),
               BT_BWD=int(pb[2:].split("_")[0]), WARPS_BWD=int(pb.split("_w")[1].split("_")[0]),
               BPP_BWD=int(pb.split("_b")[1]),
               BM=af[0], BN=af[1], WARPS_ATTN=af[2], STAGES_ATTN=af[3],
               BM_BWD=ab[0], BN_BWD=ab[1], WARPS_ATTN_BWD=ab[2], STAGES_ATTN_BWD=ab[3])
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
    if not args.skip_shared:
        try:
            shared = tpa_cases(b, s, H, G, d, W, "cuda", attention_middle="shared")[0]
            out["tpa_fused[shared]"] = dict(fwd=bench(shared["fwd"]), fwd_bwd=bench(shared["fwd_bwd"]))
        except Exception as e:
            out["tpa_fused[shared]"] = dict(error=str(e)[:300])
        print(f"[time {time.time() - T0:6.1f}s] tpa_fused[shared] {out['tpa_fused[shared]']}", flush=True)
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


CHECK_SHAPES = [(2, 1024, 128), (1, 777, 100), (2, 64, 1), (3, 1, 128), (2, 128, 40)]
MIDDLE_CASES = [(2, 1024, 8, 2, 128, 128), (3, 77, 8, 2, 128, 1), (2, 1, 8, 2, 128, 128), (1, 300, 8, 1, 128, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--tune", action="store_true", help="pick kernel tiles by timing before the checks")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny correctness + case calls")
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
        res, ok = correctness([(1, 32, 8), (1, 5, 1)])
        correctness_middle([(1, 5, 8, 2, 128, 1)])
        for c in tpa_cases(1, 32, 8, 2, 128, 8, "cpu"):
            c["fwd"]()
            c["fwd_bwd"]()
            print("[smoke] ran", c["name"])
        print("smoke ok:", ok)
        return
    RESULTS["env"] = dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                          gpu_tiles=dict(tk.GPU_TILES),
                          shape=dict(b=8, s=4096, H=8, G=2, d=128, W=128, Rq=4, R=2))
    RESULTS["floors_us"] = floor_details()
    RESULTS["floors_us_with_value_residual"] = floor_details(value_residual=True)
    RESULTS["floors_headline_us"] = floor_us()
    if args.tune:
        tune(args)
    middles = ("own",) if args.skip_shared else ("own", "shared")
    if not args.skip_check:
        res, ok = correctness(CHECK_SHAPES[:1], middles)
        RESULTS["correctness"] = res
        RESULTS["correctness_ok"] = ok
        save(args.out)
    if not args.skip_timings:
        timings(args)
        save(args.out)
    if not args.skip_check:  # odd length, W = 1, s = 1; then the attention middle alone
        res2, ok2 = correctness(CHECK_SHAPES[1:], middles)
        RESULTS["correctness"] += res2
        RESULTS["correctness_ok"] = RESULTS["correctness_ok"] and ok2
        RESULTS["correctness_strict_ok"] = all(r["ok_strict"] for r in RESULTS["correctness"])
        save(args.out)
        RESULTS["correctness_attention_middle"] = correctness_middle(MIDDLE_CASES)
        save(args.out)
    t = RESULTS.get("timings_us", {})
    fl = RESULTS["floors_us"]
    print("\n==== summary (us, median) ====")
    print(f"correctness ok: {RESULTS.get('correctness_ok')} (strict: {RESULTS.get('correctness_strict_ok')})")
    for k, v in t.items():
        if "fwd" in v:
            print(f"{k:28s} fwd {v['fwd']:9.1f}  fwd+bwd {v['fwd_bwd']:9.1f}")
    for k, v in RESULTS.get("tune_us", {}).items():
        print(f"  {k:20s} " + " ".join(f"{n}={x}" if isinstance(x, dict) else f"{n}={x:.1f}" for n, x in v.items()))
    print(f"floors: bringup fwd {fl['bringup_fwd']:.1f} fwd+bwd {fl['bringup_fwd_bwd']:.1f}; fused theoretical "
          f"fwd {fl['fused_theoretical_fwd']:.1f} fwd+bwd {fl['fused_theoretical_fwd_bwd']:.1f}")


if __name__ == "__main__":
    main()
