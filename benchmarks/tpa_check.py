"""GPU driver for the TPA local-attention op: bf16 correctness vs float64, then timings.

Usage (on a CUDA machine, from the repository root)::

    PYTHONPATH=$PWD python benchmarks/tpa_check.py --out $OUT --tune [--skip-chain] [--skip-shared]

1. Correctness: our op in bf16 (each attention middle) vs the float64 reference, for the output
   and every gradient; passes when the kernel's relative error is at most 2x that of a bf16
   PyTorch implementation (the fork emulation, bf16 rounding points) plus 1e-3. Also an fp32
   run of the kernels (IEEE dots) against float64. Freed GPU memory is poisoned with NaN first.
0. (``--tune``) Each kernel's tiles are chosen by timing candidates at the benchmark shape; the
   checks and timings below then run with the chosen tiles.
2. Timings (``triton.testing.do_bench``, median) at b=8, s=4096, H=8, G=2, d=128, W=128, Rq=4,
   R=2: the cases of :mod:`benchmarks._attention_tpa` (plus a CUDA-graph replay of our op and a
   per-kernel profile). Results and the spec 5.5 floors go to ``<out>/tpa_bench.json``.
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
from vpmoe_compile.ops import tpa_reference as ref  # noqa: E402
from vpmoe_compile.ops import triton_tpa as tk  # noqa: E402
from vpmoe_compile.ops.tpa_attention import tpa_window_attention  # noqa: E402

NAMES = ("factors", "qkv_bias", "gamma_q", "gamma_k", "cos", "sin", "sink")
RESULTS = {}
T0 = time.time()


def save(out_dir):
    with open(os.path.join(out_dir, "tpa_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


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


def correctness(shapes):
    res = []
    ok_all = True
    for (b, s, W) in shapes:
        H, G, d, Rq, R = 8, 2, 128, 4, 2
        cfg = dict(num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R, window=W)
        inputs = [t.detach() for t in make_tpa_inputs(b, s, H, G, d, DEVICE, dtype=torch.float32, seed=s + b)]
        # every implementation sees the same (bf16-representable) values: errors measure compute only
        inputs = [t if i in (4, 5) else t.bfloat16().float() for i, t in enumerate(inputs)]
        dout = torch.randn(s, b, H * d, device=DEVICE)
        o64, g64 = run_grads(lambda *a: ref.tpa_reference(*a, **cfg), inputs, torch.float64, dout.double())
        oem, gem = run_grads(lambda *a: ref.tpa_fork_emulation(*a, **cfg), inputs, torch.bfloat16, dout)
        orf, grf = run_grads(lambda *a: ref.tpa_reference(*a, **cfg), inputs, torch.bfloat16, dout)
        base = {"out": (rel(oem, o64), rel(orf, o64))}
        for n, a, c, r in zip(NAMES, gem, grf, g64):
            base[n] = (rel(a, r), rel(c, r))
        chosen = bool(tk.GPU_TILES["FUSED_FWD"])
        combos = [("own", torch.bfloat16, chosen), ("own", torch.float32, chosen)] if s % 16 == 0 else \
            [("own", torch.bfloat16, chosen)]
        if s % 16 == 0 and DEVICE == "cuda":
            combos.append(("own", torch.bfloat16, not chosen))  # verify the other forward path too
        for middle, dt, fused in combos:
            os.environ["VPMOE_TPA_ATTENTION"] = middle
            tk.GPU_TILES["FUSED_FWD"] = fused
            if True:
                poison()
                ok_, gk_ = run_grads(lambda *a: tpa_window_attention(*a, backend="triton", **cfg), inputs, dt, dout)
                row = dict(b=b, s=s, W=W, middle=middle, fused_fwd=fused, dtype=str(dt).split(".")[-1], errors={})
                errs = {"out": rel(ok_, o64)}
                for n, g, r in zip(NAMES, gk_, g64):
                    errs[n] = rel(g, r)
                ok = True
                for n, e in errs.items():
                    em, er = base[n]
                    lim = 2 * em + 1e-3 if dt == torch.bfloat16 else 1e-4
                    # tf32 is never used: fp32 inputs take IEEE dots in the own kernels; the shared
                    # middle may use tf32 for fp32 inputs, so allow the tf32 level there.
                    if dt == torch.float32 and middle == "shared":
                        lim = 2e-3
                    passed = bool(math.isfinite(e) and e <= lim)
                    ok &= passed
                    row["errors"][n] = dict(kernel=e, fork_emul_bf16=em, ref_bf16_in_fp32_math=er, limit=lim,
                                            ok=passed)
                row["ok"] = ok
                ok_all &= ok
                res.append(row)
                print(f"[check {time.time() - T0:6.1f}s] b={b} s={s} W={W} middle={middle} fused={fused} "
                      f"{row['dtype']}: ok={ok} "
                      + " ".join(f"{n}={v['kernel']:.2e}(emul {v['fork_emul_bf16']:.1e})"
                                 for n, v in row["errors"].items()), flush=True)
        tk.GPU_TILES["FUSED_FWD"] = chosen
    os.environ["VPMOE_TPA_ATTENTION"] = "auto"
    return res, ok_all


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

    for impl, bt, w in (("2d", 16, 4), ("2d", 16, 8), ("2d", 32, 4), ("2d", 32, 8)):
        _set_tiles(PROLOGUE=impl, BT_FWD=bt, WARPS_FWD=w, BT_BWD=bt, WARPS_BWD=w)
        nm = f"{impl}_BT{bt}_w{w}"
        trial("prologue_fwd", nm, lambda: tk.prologue_fwd(f, bias, gq, gk, cos, sin, eps=1e-5, act_dtype=f.dtype,
                                                          **kwp))
        trial("prologue_bwd", nm, lambda: tk.prologue_bwd(dq, dk, dv, f, bias, gq, gk, rq, rk, cos, sin, **kwp))
    o, lse = tk.swa_fwd(q, k, v, sink, W, scale)
    for bm, bn, w, st in ((64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 2, 2)):
        _set_tiles(BM=bm, BN=bn, WARPS_ATTN=w, STAGES_ATTN=st, BM_BWD=bm, BN_BWD=bn, WARPS_ATTN_BWD=w,
                   STAGES_ATTN_BWD=st)
        nm = f"{bm}x{bn}_w{w}_s{st}"
        trial("attn_fwd", nm, lambda: tk.swa_fwd(q, k, v, sink, W, scale))
        trial("attn_bwd", nm, lambda: tk.swa_bwd(do, q, k, v, o, lse, sink, W, scale))
    best = {g: min(v, key=v.get) for g, v in sw.items()}
    pf, pb = best["prologue_fwd"], best["prologue_bwd"]
    # one prologue implementation for both directions (they share rstd/semantics; pick by the sum)
    impls = {nm.split("_")[0] for nm in sw["prologue_fwd"]}
    tot = {nm: sw["prologue_fwd"][nm] + sw["prologue_bwd"][nm] for nm in sw["prologue_fwd"]}
    impl = min(tot, key=tot.get).split("_")[0]
    pf = min((n for n in sw["prologue_fwd"] if n.startswith(impl)), key=sw["prologue_fwd"].get)
    pb = min((n for n in sw["prologue_bwd"] if n.startswith(impl)), key=sw["prologue_bwd"].get)
    del impls
    bt_f, w_f = int(pf.split("_BT")[1].split("_")[0]), int(pf.split("_w")[1])
    bt_b, w_b = int(pb.split("_BT")[1].split("_")[0]), int(pb.split("_w")[1])
    af = [int(x) for x in best["attn_fwd"].replace("x", "_").replace("w", "").replace("s", "").split("_")]
    ab = [int(x) for x in best["attn_bwd"].replace("x", "_").replace("w", "").replace("s", "").split("_")]
    _set_tiles(PROLOGUE=impl, BT_FWD=bt_f, WARPS_FWD=w_f, BT_BWD=bt_b, WARPS_BWD=w_b,
               BM=af[0], BN=af[1], WARPS_ATTN=af[2], STAGES_ATTN=af[3],
               BM_BWD=ab[0], BN_BWD=ab[1], WARPS_ATTN_BWD=ab[2], STAGES_ATTN_BWD=ab[3])
    # forward: two kernels (prologue + attention) vs the fused forward (spec 5.3)
    sw["fwd_path"] = {}
    _set_tiles(FUSED_FWD=False)
    sw["fwd_path"]["two_kernel"] = bench(lambda: tk.swa_fwd(*tk.prologue_fwd(
        f, bias, gq, gk, cos, sin, eps=1e-5, act_dtype=f.dtype, **kwp)[:3], sink, W, scale))
    for bm, bn, w, st in ((64, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)):
        _set_tiles(BM_FUSED=bm, BN_FUSED=bn, WARPS_FUSED=w, STAGES_FUSED=st)
        trial("fwd_path", f"fused_{bm}x{bn}_w{w}_s{st}", lambda: tk.fused_fwd(
            f, bias, gq, gk, cos, sin, sink, eps=1e-5, window=W, softmax_scale=scale, act_dtype=f.dtype, **kwp))
    bestf = min(sw["fwd_path"], key=sw["fwd_path"].get)
    if bestf.startswith("fused"):
        fz = [int(x) for x in bestf[6:].replace("x", "_").replace("w", "").replace("s", "").split("_")]
        _set_tiles(FUSED_FWD=True, BM_FUSED=fz[0], BN_FUSED=fz[1], WARPS_FUSED=fz[2], STAGES_FUSED=fz[3])
    else:
        _set_tiles(FUSED_FWD=False, BM_FUSED=64, BN_FUSED=32, WARPS_FUSED=8, STAGES_FUSED=2)
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
    os.environ["VPMOE_TPA_ATTENTION"] = "own"
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
        os.environ["VPMOE_TPA_ATTENTION"] = "shared"
        try:
            out["tpa_fused[shared]"] = dict(fwd=bench(c["fwd"]), fwd_bwd=bench(c["fwd_bwd"]))
        except Exception as e:
            out["tpa_fused[shared]"] = dict(error=str(e)[:300])
        print(f"[time {time.time() - T0:6.1f}s] tpa_fused[shared] {out['tpa_fused[shared]']}", flush=True)
        os.environ["VPMOE_TPA_ATTENTION"] = "auto"
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
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--tune", action="store_true", help="pick kernel tiles by timing before the checks")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny correctness + case calls")
    args = ap.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        global bench

        def bench(fn):  # noqa: F811 - wall clock, CPU smoke only
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6

        tune(args, shape=(1, 32, 8, 2, 128, 8))
        res, ok = correctness([(1, 40, 8)])
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
    if not args.skip_check:
        res, ok = correctness([(2, 1024, 128)])
        RESULTS["correctness"] = res
        RESULTS["correctness_ok"] = ok
        save(args.out)
    timings(args)
    save(args.out)
    if not args.skip_check:  # odd length (not a multiple of any tile), window < tile multiple
        res2, ok2 = correctness([(1, 777, 100)])
        RESULTS["correctness"] += res2
        RESULTS["correctness_ok"] = RESULTS["correctness_ok"] and ok2
        save(args.out)
    t = RESULTS.get("timings_us", {})
    fl = RESULTS["floors_us"]
    print("\n==== summary (us, median) ====")
    print(f"correctness ok: {RESULTS.get('correctness_ok')}")
    for k, v in t.items():
        if "fwd" in v:
            print(f"{k:28s} fwd {v['fwd']:9.1f}  fwd+bwd {v['fwd_bwd']:9.1f}")
    for k, v in RESULTS.get("tune_us", {}).items():
        print(f"  {k:14s} " + " ".join(f"{n}={x:.1f}" for n, x in v.items()))
    print(f"floors: bringup fwd {fl['bringup_fwd']:.1f} fwd+bwd {fl['bringup_fwd_bwd']:.1f}; fused theoretical "
          f"fwd {fl['fused_theoretical_fwd']:.1f} fwd+bwd {fl['fused_theoretical_fwd_bwd']:.1f}")


if __name__ == "__main__":
    main()
