"""GPU correctness check of the sink attention kernels (bf16) against float64.

Rule (docs/design.md#benchmarks-and-checks, as in the FlashAttention test suite): for the output, the LSE
and every gradient (dq, dk, dv, dsink), the kernel's relative error against a float64 reference
must be at most ``2 x`` the error of a PyTorch implementation run on the same bf16 inputs with fp32
math (``sink_attention_reference(..., compute_dtype=torch.float32)``), plus a small absolute slack
``1e-5`` (for quantities both compute essentially exactly, e.g. the fp32 LSE).
Also: outputs finite, backward bitwise deterministic (two runs), every tile variant compiles.

Usage::

    export PYTHONPATH=$PWD
    python benchmarks/attention_check.py --out DIR     # writes DIR/attention_check.json
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
from _ops_import import import_op_module  # noqa: E402

NAMES = ("out", "lse", "dq", "dk", "dv", "dsink")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_case(ops, ref, tk, case, seed):
    s, b, H, G, d = case["s"], case["b"], case["H"], case["G"], case["d"]
    window, alibi = case.get("window"), case.get("alibi", False)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s, b, H, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(s, b, G, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(s, b, G, d, device="cuda", generator=g).bfloat16()
    sink = torch.randn(H, device="cuda", generator=g).bfloat16()
    dout = torch.randn(s, b, H, d, device="cuda", generator=g).bfloat16()
    slopes = import_op_module("sink_attention.alibi").alibi_slopes(H, device="cuda") if alibi else None
    cfg = case.get("config")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sink)]

    def ours():
        with tk.use_config(cfg):
            out, lse = ops.sink_attention_with_lse(*leaves, slopes=slopes, window=window, backend="triton")
            grads = torch.autograd.grad(out, leaves, dout)
        return (out.detach(), lse.detach()) + tuple(grads)

    got = ours()
    again = ours()
    deterministic = all(torch.equal(x, y) for x, y in zip(got, again))
    torch.cuda.synchronize()

    def reference(cd):
        ins = (q, k, v, sink) if cd != torch.float64 else (q.double(), k.double(), v.double(), sink.double())
        dd = dout if cd != torch.float64 else dout.double()
        out, lse = ref.sink_attention_reference(*ins, slopes=slopes, window=window, compute_dtype=cd)
        grads = ref.sink_attention_reference_backward(dd, *ins, slopes=slopes, window=window, compute_dtype=cd)
        return (out, lse) + tuple(grads)

    def forklike():
        # Megatron/fork-like unfused bf16 path: bf16 scores (baddbmm-style rounding), fp32 bias and
        # softmax with a sink column, probs cast to bf16, bf16 P@V; gradients by autograd.
        hpg = H // G
        lv = [t.clone().requires_grad_(True) for t in (q, k, v, sink)]
        qb = lv[0].permute(1, 2, 0, 3)
        kb = lv[1].permute(1, 2, 0, 3).repeat_interleave(hpg, 1)
        vb = lv[2].permute(1, 2, 0, 3).repeat_interleave(hpg, 1)
        sc = (torch.matmul(qb, kb.transpose(-1, -2)) * (1.0 / math.sqrt(d))).float()
        idx = torch.arange(s, device="cuda")
        rel_ij = (idx[:, None] - idx[None, :])
        if slopes is not None:
            sc = sc - slopes.view(1, H, 1, 1) * rel_ij.float()
        vis = rel_ij >= 0
        if window is not None:
            vis = vis & (rel_ij < window)
        sc = sc.masked_fill(~vis, -10000.0)
        full = torch.cat([sc, lv[3].float().view(1, H, 1, 1).expand(b, H, s, 1)], -1)
        lse = torch.logsumexp(full, -1)
        probs = torch.softmax(full, -1)[..., :-1].to(torch.bfloat16)
        out = torch.matmul(probs, vb).permute(2, 0, 1, 3)
        grads = torch.autograd.grad(out, lv, dout)
        return (out.detach(), lse.detach()) + tuple(grads)

    exact = reference(torch.float64)
    torch_fp32 = reference(torch.float32)
    fork_bf16 = forklike()
    res = {"case": {kk: vv for kk, vv in case.items() if kk != "config"},
           "config": None if cfg is None else repr(cfg), "deterministic": deterministic, "errors": {}}
    ok = ok_fork = deterministic
    for n, a, t, f, e in zip(NAMES, got, torch_fp32, fork_bf16, exact):
        e_ours, e_torch, e_fork = rel(a, e), rel(t, e), rel(f, e)
        passed = e_ours <= 2.0 * e_torch + 1e-5
        passed_fork = e_ours <= 2.0 * e_fork + 1e-5
        ok = ok and passed
        ok_fork = ok_fork and passed_fork
        res["errors"][n] = {"ours": e_ours, "torch_bf16_fp32math": e_torch, "ratio": e_ours / max(e_torch, 1e-12),
                            "pass": passed, "torch_forklike_bf16": e_fork, "pass_vs_forklike": passed_fork}
    res["pass"] = ok
    res["pass_vs_forklike"] = ok_fork
    del exact, torch_fp32, fork_bf16
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_check needs a CUDA GPU")
        return 1
    import triton

    ops = import_op_module("sink_attention")
    ref = import_op_module("sink_attention.reference")
    tk = import_op_module("sink_attention.triton")
    small = tk.SinkAttentionConfig(fwd=tk.KernelTiles(32, 16), dq=tk.KernelTiles(32, 16),
                                   dkv=tk.KernelTiles(32, 16))
    # fixed H100-like tiles for the odd shapes (no autotuning: keeps compile time down)
    fixed = tk.SinkAttentionConfig(fwd=tk.KernelTiles(128, 64, 8, 3), dq=tk.KernelTiles(128, 64, 8, 3),
                                   dkv=tk.KernelTiles(64, 64, 8, 2))
    cases = [  # autotuned (the benchmark shape's s) first
        dict(name="global s=4096 (autotuned)", s=4096, b=1, H=8, G=2, d=128, alibi=True),
        dict(name="window s=4096 (autotuned)", s=4096, b=1, H=8, G=2, d=128, window=128),
        dict(name="global s=1000", s=1000, b=2, H=8, G=2, d=128, alibi=True, config=fixed),
        dict(name="window s=1000", s=1000, b=2, H=8, G=2, d=128, window=128, config=fixed),
        dict(name="global+window W=33, small tiles", s=203, b=1, H=8, G=2, d=128, alibi=True, window=33,
             config=small),
        dict(name="MHA W=1", s=77, b=3, H=4, G=4, d=64, window=1, config=fixed),
        dict(name="MQA W=64", s=129, b=2, H=8, G=1, d=128, window=64, config=fixed),
        dict(name="3 heads/group (PACK=3), causal ALiBi", s=150, b=1, H=6, G=2, d=64, alibi=True,
             config=fixed),
        dict(name="s=1", s=1, b=2, H=8, G=2, d=128, alibi=True, config=fixed),
    ]
    os.makedirs(a.out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "rule": "err_ours <= 2*err_torch(bf16 in, fp32 math) + 1e-5, vs float64; "
            "pass_vs_forklike: same with the fork-like bf16 unfused torch path", "cases": []}
    t0 = time.time()
    for i, c in enumerate(cases):
        try:
            r = run_case(ops, ref, tk, c, seed=100 + i)
        except Exception as e:  # keep going; report
            import traceback

            traceback.print_exc()
            r = {"case": {kk: vv for kk, vv in c.items() if kk != "config"}, "pass": False,
                 "error": f"{type(e).__name__}: {e}"[:500]}
        results["cases"].append(r)
        errs = r.get("errors", {})
        print(f"{'PASS' if r['pass'] else 'FAIL'}/{'PASS' if r.get('pass_vs_forklike') else 'FAIL'} "
              f"{c['name']:38s} det={r.get('deterministic')} " + " ".join(
            f"{n}={errs[n]['ours']:.1e}/{errs[n]['torch_bf16_fp32math']:.1e}/{errs[n]['torch_forklike_bf16']:.1e}"
            for n in errs) + (
            f" ERROR {r['error']}" if "error" in r else ""), flush=True)
        with open(os.path.join(a.out, "attention_check.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    results["all_pass"] = all(r["pass"] for r in results["cases"])
    results["all_pass_vs_forklike"] = all(r.get("pass_vs_forklike", False) for r in results["cases"])
    results["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(a.out, "attention_check.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print("strict rule (2x bf16-in/fp32-math torch):", "ALL PASS" if results["all_pass"] else "SOME FAILED",
          "| FA-style rule (2x fork-like bf16 torch):",
          "ALL PASS" if results["all_pass_vs_forklike"] else "SOME FAILED", f"({results['wall_s']} s)")
    print("columns: name=ours/torch_fp32math/torch_forklike_bf16 relative errors vs float64")
    return 0 if results["all_pass"] else 2


if __name__ == "__main__":
    sys.exit(main())
