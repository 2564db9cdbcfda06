"""One NorMuon step for the vpMoE-8L parameter set: fork-style loop vs batched eager vs compiled.

Question: how far is our batched, compiled NorMuon step from its roofline floor, and how much
faster is it than the reference fork's per-matrix Python loop?

Parameter set (built here from the numbers, no model needed): 8 layers at full width, hidden
1024, 8 heads / 2 query groups / head dim 128, global attention every 4th layer (2 global with
fused QKV ``[1536, 1024]`` split per Q/K/V, 6 local with packed TPA factors q-rank 4 / kv-rank 2),
``linear_proj`` ``[1024, 1024]`` per layer, layer 1 dense MLP (ffn 128), 7 MoE layers with a
router ``[256, 1024]``, 256 experts ``[128, 1024]`` / ``[1024, 128]`` and a shared expert 512.
Random fp32 weights and gradients; expert params form a separate (expert-parallel) group.

Variants (same matrices, same hyper-parameters):
* ``fork_loop``: one Python iteration per matrix (fork semantics: fused QKV whole, TPA factors as
  separate weights), PE in bf16 per matrix -- the shape of the vpMoE fork's ``NormuonWithAuxAdam``.
* ``batched_eager``: :class:`vpmoe_compile.optim.NorMuon` with ``compile=False`` (shape banks).
* ``batched_compiled``: the same with ``torch.compile(dynamic=False, fullgraph=True)`` per bank.
* ``floor``: max(PE FLOPs / bf16 GEMM rate, minimal bytes / copy bandwidth), spec §6.1, with the
  rates measured on the same device (a 8192^3 bf16 GEMM and a 2 GiB device copy) and with the
  datasheet rates (H100 SXM: 989 dense TFLOP/s bf16, 3.35 TB/s) for reference. Minimal bytes:
  20 B / element (read fp32 grad, read+write fp32 momentum, read+write fp32 param; the model's
  bf16 copy is not part of this standalone step).

Also checked / reported (spec T3, T11, T12): compiled vs eager update, bf16 bank vs fp64 REF,
recompilations after LR changes (dynamo counters), cudaMalloc segments in steady state, kernel
launches per step (profiler), host syncs inside the step (``torch.cuda.set_sync_debug_mode``),
and the AdamW part (torch fused AdamW over embedding + output ``2 x [201088, 1024]``).

Usage: ``python benchmarks/optimizer.py --out benchmarks/results`` (GPU);
``python benchmarks/optimizer.py --small --device cpu`` (a smoke run of the script on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vpmoe_compile.optim import NorMuon, polar_express  # noqa: E402
from vpmoe_compile.optim.reference import normuon_reference_update  # noqa: E402

LR, WD, MU, BETA2, EPS = 3e-3, 0.01, 0.95, 0.95, 1e-10


# ------------------------------------------------------------------------------------ shapes
def vpmoe_8l_matrices(small: bool = False, layers: int = 8, local_experts: int = 256) -> List[Dict]:
    """Parameters of vpMoE-8L as dicts {name, shape, blocks, expert}.

    ``layers=80, local_experts=32``: the full vpMoE's per-GPU set at EP = 8 (spec §6.2 probe).
    """
    if small:
        L, h, H, G, d, E, F, S, Fd, V = 4, 64, 4, 2, 16, 8, 16, 32, 16, 512
        rq, r = 2, 1
    else:
        L, h, H, G, d, E, F, S, Fd, V = layers, 1024, 8, 2, 128, local_experts, 128, 512, 128, 201088
        rq, r = 4, 2
    out = []

    def add(name, shape, blocks=None, expert=False):
        out.append(dict(name=name, shape=shape, blocks=blocks, expert=expert))

    rpg = (H // G + 2) * d
    for layer in range(1, L + 1):
        pre = f"decoder.layers.{layer - 1}"
        if layer % 4 == 0:  # global: fused QKV, split per Q / K / V
            q = tuple((g * rpg, H // G * d) for g in range(G))
            k = tuple((g * rpg + H // G * d, d) for g in range(G))
            v = tuple((g * rpg + (H // G + 1) * d, d) for g in range(G))
            add(f"{pre}.self_attention.linear_qkv.weight", (G * rpg, h), (q, k, v))
        else:  # local: packed TPA factors
            rows = [H * rq, G * r, G * r, rq * d, r * d, r * d]
            blocks, start = [], 0
            for n in rows:
                blocks.append(((start, n),))
                start += n
            add(f"{pre}.self_attention.linear_qkv.weight", (start, h), tuple(blocks))
        add(f"{pre}.self_attention.linear_proj.weight", (h, H * d))
        if layer == 1:
            add(f"{pre}.mlp.linear_fc1.weight", (Fd, h))
            add(f"{pre}.mlp.linear_fc2.weight", (h, Fd))
        else:
            add(f"{pre}.mlp.router.weight", (E, h))
            for e in range(E):
                add(f"{pre}.mlp.experts.local_experts.{e}.linear_fc1.weight", (F, h), expert=True)
                add(f"{pre}.mlp.experts.local_experts.{e}.linear_fc2.weight", (h, F), expert=True)
            add(f"{pre}.mlp.shared_experts.linear_fc1.weight", (S, h))
            add(f"{pre}.mlp.shared_experts.linear_fc2.weight", (h, S))
    return out, V, h


def logical_shapes(spec: List[Dict], fork: bool = False) -> List[Tuple[int, int]]:
    """Logical matrices; ``fork=True``: fused QKV whole (fork), TPA factors separate."""
    shapes = []
    for s in spec:
        m, n = s["shape"]
        if s["blocks"] is None or (fork and "linear_qkv" in s["name"] and len(s["blocks"]) == 3):
            shapes.append((m, n))
        else:
            for segs in s["blocks"]:
                shapes.append((sum(x for _, x in segs), n))
    return shapes


def pe_flops(shapes) -> float:
    """Spec §6.1: 5 * (4 s^2 L + 2 s^3) per matrix, s = min, L = max."""
    total = 0.0
    for m, n in shapes:
        s, L = min(m, n), max(m, n)
        total += 5 * (4 * s * s * L + 2 * s**3)
    return total


# ------------------------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup=2, reps=5) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": reps}


def measure_ceilings(device) -> Dict[str, float]:
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device, warmup=3, reps=10)["median_ms"]
    gemm = 2 * n**3 / (t * 1e-3) / 1e12
    x = torch.empty(2**29, device=device, dtype=torch.float32)  # 2 GiB
    x.normal_()
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, warmup=3, reps=10)["median_ms"]
    bw = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": gemm, "copy_tb_s": bw}


# ------------------------------------------------------------------------------------ variants
def make_params(spec, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for s in spec:
        w = (torch.randn(*s["shape"], generator=g) * 0.02).to(device)
        params.append(torch.nn.Parameter(w))
        grads.append((torch.randn(*s["shape"], generator=g) * 1e-3).to(device))
    return params, grads


def build_normuon(spec, params, grads, compile_mode):
    groups = []
    for expert in (False, True):
        idx = [i for i, s in enumerate(spec) if s["expert"] == expert]
        if idx:
            groups.append({"params": [params[i] for i in idx], "blocks": [spec[i]["blocks"] for i in idx]})
    for p, gr in zip(params, grads):
        p.grad = gr
    return NorMuon(groups, lr=LR, momentum=MU, beta2=BETA2, eps=EPS, weight_decay=WD,
                   compile=compile_mode)


class ForkLoop:
    """Per-matrix loop with the fork's semantics (own implementation)."""

    def __init__(self, spec, device, seed=1):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.items = []
        for m, n in logical_shapes(spec, fork=True):
            W = (torch.randn(m, n, generator=g) * 0.02).to(device)
            G = (torch.randn(m, n, generator=g) * 1e-3).to(device)
            self.items.append((W, G, torch.zeros_like(W), torch.zeros(m, 1, device=device)))
        self.pe_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.no_grad()
    def step(self):
        for W, G, M, v in self.items:
            M.lerp_(G, 1 - MU)
            U = G.lerp(M, MU)
            O = polar_express(U, compute_dtype=self.pe_dtype).float()
            v.lerp_(O.square().mean(dim=1, keepdim=True), 1 - BETA2)
            Oh = O * torch.rsqrt(v + EPS)
            Oh = Oh * (O.norm() / Oh.norm().clamp_min(EPS))
            Oh = Oh * math.sqrt(max(1.0, W.shape[0] / W.shape[1]))
            W.mul_(1 - LR * WD).add_(Oh, alpha=-LR)


def rel(a, b):
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (script smoke run)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-fork", action="store_true")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--set", default="8l", choices=["8l", "ep8"],
                    help="8l: vpMoE-8L, all 256 experts; ep8: full 80-layer vpMoE, 32 experts per GPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or ("small" if args.small else ("vpmoe-8l" if args.set == "8l" else "vpmoe-ep8"))
    res: Dict = {"config": tag, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "hyper": dict(lr=LR, wd=WD, mu=MU, beta2=BETA2, eps=EPS)}
    print(f"device {res['device']} torch {torch.__version__}", flush=True)

    if args.set == "ep8" and not args.small:
        spec, vocab, hidden = vpmoe_8l_matrices(layers=80, local_experts=32)
    else:
        spec, vocab, hidden = vpmoe_8l_matrices(args.small)
    shapes = logical_shapes(spec)
    numel = sum(m * n for m, n in shapes)
    flops = pe_flops(shapes)
    res["matrices"] = {"params": len(spec), "logical_matrices": len(shapes), "elements": numel,
                       "fork_matrices": len(logical_shapes(spec, fork=True)),
                       "pe_tflop": flops / 1e12}
    ceil = measure_ceilings(device)
    res["ceilings_measured"] = ceil
    min_bytes = 20 * numel
    floors = {}
    for label, (tf, bw) in {"measured": (ceil.get("bf16_gemm_tflops"), ceil.get("copy_tb_s")),
                            "datasheet": (989.0, 3.35)}.items():
        if tf and bw:
            fl = flops / (tf * 1e12) * 1e3
            by = min_bytes / (bw * 1e12) * 1e3
            floors[label] = {"flop_ms": fl, "byte_ms": by, "floor_ms": max(fl, by)}
    res["floor"] = floors
    res["min_bytes"] = min_bytes
    print(json.dumps(res["matrices"]), json.dumps(floors), flush=True)

    results = {}
    # -------------------------------------------------- batched eager
    params_e, grads_e = make_params(spec, device)
    init = [p.detach().clone() for p in params_e]
    opt_e = build_normuon(spec, params_e, grads_e, False)
    opt_e.step()
    delta_eager = [p.detach() - w for p, w in zip(params_e, init)]
    results["batched_eager"] = time_fn(opt_e.step, device, warmup=1, reps=args.reps)
    res["banks"] = [
        {"shape": list(b.shape), "members": b.size, "group": b.group_index} for b in opt_e._banks
    ]
    print("batched_eager", results["batched_eager"], flush=True)

    # -------------------------------------------------- check vs fp64 REF (sample of matrices)
    ref_err = {}
    samples = [i for i, s in enumerate(spec) if ("local_experts.0." in s["name"] and "layers.1." in s["name"])
               or s["name"].endswith("layers.3.self_attention.linear_qkv.weight")
               or s["name"].endswith("layers.0.self_attention.linear_qkv.weight")
               or s["name"].endswith("layers.0.self_attention.linear_proj.weight")]
    for i in samples:
        W = init[i].double().cpu().clone()
        M = torch.zeros_like(W)
        v = torch.zeros(W.shape[0], 1, dtype=torch.float64)
        normuon_reference_update(W, grads_e[i].double().cpu(), M, v, lr=LR, weight_decay=WD,
                                 blocks=spec[i]["blocks"])
        ref_err[spec[i]["name"]] = rel(delta_eager[i].cpu(), W - init[i].double().cpu())
    res["bank_vs_fp64_ref_rel_err"] = ref_err
    print("bank vs REF", ref_err, flush=True)
    del opt_e, params_e, grads_e
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -------------------------------------------------- batched compiled
    from torch._dynamo import reset as dynamo_reset
    from torch._dynamo.utils import counters

    dynamo_reset()
    counters.clear()
    params_c, grads_c = make_params(spec, device)
    opt_c = build_normuon(spec, params_c, grads_c, args.compile_backend)
    _sync(device)
    t0 = time.perf_counter()
    opt_c.step()
    _sync(device)
    res["compile_first_step_s"] = time.perf_counter() - t0
    delta_comp = [p.detach() - w for p, w in zip(params_c, init)]
    res["compiled_vs_eager_rel_err_max"] = max(rel(a, b) for a, b in zip(delta_comp, delta_eager))
    graphs0 = counters["stats"]["unique_graphs"]
    lrs = iter([LR * (0.5 + 0.1 * k) for k in range(1000)])

    def compiled_step():
        lr = next(lrs)
        for g in opt_c.param_groups:
            g["lr"] = lr
        opt_c.step()

    results["batched_compiled"] = time_fn(compiled_step, device, warmup=2, reps=args.reps)
    res["recompiles_after_lr_changes"] = counters["stats"]["unique_graphs"] - graphs0
    res["unique_graphs"] = graphs0
    print("batched_compiled", results["batched_compiled"], "compile", res["compile_first_step_s"],
          flush=True)
    if device.type == "cuda":
        stats0 = torch.cuda.memory_stats()
        for _ in range(3):
            compiled_step()
        torch.cuda.synchronize()
        stats1 = torch.cuda.memory_stats()
        res["steady_state_new_segments"] = stats1["segment.all.allocated"] - stats0["segment.all.allocated"]
        res["steady_state_allocator_calls_per_step"] = (
            stats1["allocation.all.allocated"] - stats0["allocation.all.allocated"]) / 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                compiled_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        res["host_syncs_in_step"] = len(syncs)
        res["host_sync_sites"] = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled_step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        res["kernels_per_step"] = len(kernels)
        by_name: Dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total / 1e3
        res["top_kernels_ms"] = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:12])
        res["kernel_time_total_ms"] = sum(by_name.values())
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del opt_c, params_c, grads_c
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -------------------------------------------------- fork-style loop
    if not args.skip_fork:
        fork = ForkLoop(spec, device)
        results["fork_loop"] = time_fn(fork.step, device, warmup=1, reps=2)
        print("fork_loop", results["fork_loop"], flush=True)
        del fork

    # -------------------------------------------------- AdamW part (embedding + output)
    if device.type == "cuda" and not args.small:
        ps = [torch.nn.Parameter(torch.randn(vocab, hidden, device=device) * 0.02) for _ in range(2)]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        adam = torch.optim.AdamW(ps, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True)
        results["adamw_embed_output_fused"] = time_fn(adam.step, device, warmup=2, reps=args.reps)
        del ps, adam
        torch.cuda.empty_cache()

    res["results"] = results
    fl = floors.get("measured") or floors.get("datasheet")
    if fl:
        res["compiled_over_floor"] = results["batched_compiled"]["median_ms"] / fl["floor_ms"]
        res["goal_compiled_le_2x_floor"] = res["compiled_over_floor"] <= 2.0
    if "fork_loop" in results:
        res["speedup_compiled_vs_fork"] = results["fork_loop"]["median_ms"] / results["batched_compiled"]["median_ms"]
    res["speedup_compiled_vs_eager"] = results["batched_eager"]["median_ms"] / results["batched_compiled"]["median_ms"]

    stem = os.path.join(args.out, f"optimizer_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in ("fork_loop", "batched_eager", "batched_compiled") if k in results]
        vals = [results[k]["median_ms"] for k in names]
        fig, ax = plt.subplots(figsize=(7, 4))
        bars = ax.bar(names, vals, color=["#b04040", "#4070b0", "#40a060"][: len(names)])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f} ms", ha="center", va="bottom")
        if fl:
            ax.axhline(fl["floor_ms"], color="k", ls="--", label=f"roofline floor {fl['floor_ms']:.1f} ms")
            ax.axhline(2 * fl["floor_ms"], color="gray", ls=":", label="goal: 2x floor")
            ax.legend()
        ax.set_yscale("log")
        ax.set_ylabel("ms per NorMuon step (median)")
        ax.set_title(f"NorMuon step, {tag}: {len(shapes)} matrices, {numel / 1e6:.0f} M elements\n{res['device']}")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
    except Exception as e:  # plotting must not lose the numbers
        print("plot failed:", e)
    print("SUMMARY", json.dumps({k: v["median_ms"] for k, v in results.items()}),
          "floor", json.dumps(fl), "over_floor", res.get("compiled_over_floor"), flush=True)
    return res


if __name__ == "__main__":
    main()
