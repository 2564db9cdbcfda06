"""One NorMuon step for the vpMoE-8L parameter set: fork-style loop vs our batched variants.

Question: how far is our batched, compiled NorMuon step from its roofline floor, and how much
faster is it than the reference fork's per-matrix Python loop?

Parameter set (built here from the numbers, no model needed): 8 layers at full width, hidden
1024, 8 heads / 2 query groups / head dim 128, global attention every 4th layer (2 global with
fused QKV ``[1536, 1024]`` split per Q/K/V, 6 local with packed TPA factors q-rank 4 / kv-rank 2),
``linear_proj`` ``[1024, 1024]`` per layer, layer 1 dense MLP (ffn 128), 7 MoE layers with a
router ``[256, 1024]``, 256 experts ``[128, 1024]`` / ``[1024, 128]`` and a shared expert 512.
The routed experts are two ``[256, m, n]`` stacks per MoE layer, as the ``moe`` pass holds them
(``--experts separate``: one matrix per expert, the stock ``SequentialMLP`` layout). Random fp32
weights and gradients; expert params form a separate (expert-parallel) group.

Variants (same matrices, same hyper-parameters, same random gradients):
* ``fork_loop``: one Python iteration per matrix (fork semantics: fused QKV whole, TPA factors as
  separate weights), PE in bf16 per matrix -- the shape of the vpMoE fork's ``NormuonWithAuxAdam``.
* ``batched_eager``: :class:`vpmoe_compile.optim.NorMuon`, shape banks, PyTorch ``bmm`` Polar
  Express, no compile, no graph.
* ``batched_compiled``: the same with ``torch.compile(dynamic=False, fullgraph=True)`` per bank.
* ``pe_kernel``: for the banks with ``min(m, n) <= 128`` (``pe_backend="auto"``) a compiled
  prologue, the fused Triton Polar Express kernel and a compiled epilogue (``fused_bank=False``);
  compiled ``bmm`` banks for the others.
* ``bank_kernel``: the same banks run the whole NorMuon step in one Triton kernel per bank
  (``fused_bank=True``, the default); ``*_direct``: that kernel reads each member's gradient
  in place instead of a gathered copy (``direct_grads=True``, opt-in).
* ``*_gram``: the fused kernels in the Gram form (``pe_form="gram"``, NorMuon's default;
  docs/design.md#gram-form): the Polar Express steps on the ``s x s`` Gram matrix, the bank kernel
  reading each matrix 3-4 times instead of 7. The other variants name ``pe_form="standard"``.
* ``*_graph``: the same, with the step captured in CUDA graphs (``cuda_graph=True``;
  ``batched_compiled_graph``: the compiled ``bmm`` banks captured);
  ``bank_kernel_graph_gram`` (the library's defaults plus CUDA graphs) is the recommended
  configuration; ``bank_kernel_graph`` stays the headline of the recorded tables.
* ``bank_kernel_graph_direct_gram_tf32``: the Gram-space products in TF32 (fp32 state; the
  default holds it in fp16, ``pe_triton.GRAM_F16``); ``bank_kernel_graph_direct_gram_sm_ws``: the
  stacks' bank kernels on one workspace per SM (``normuon.SM_WORKSPACE``, opt-in);
  ``bank_kernel_graph_direct_gram_merged`` (``_sm_ws``): the stacks of every layer in one launch
  per member shape (``NorMuon(merge_launches=True)``, opt-in; with the per-SM workspace).
* ``floor``: max(PE FLOPs / bf16 GEMM rate, minimal bytes / copy bandwidth)
  (docs/design.md#optimizer-tests-and-benchmark), with the
  rates measured on the same device (a 8192^3 bf16 GEMM and a 2 GiB device copy) and with the
  datasheet rates of the device (:data:`DATASHEET`; H100 SXM: 989 dense TFLOP/s bf16, 3.35 TB/s;
  H200: 989, 4.8) for reference. Minimal bytes:
  20 B / element (read fp32 grad, read+write fp32 momentum, read+write fp32 param; the model's
  bf16 copy is not part of this standalone step). The floor assumes perfect overlap of the
  Polar Express arithmetic with the state traffic; it is a lower bound, not a prediction.

Also checked / reported, per variant: update vs ``batched_eager`` after three
steps with a changing lr, recompilations after lr changes (dynamo counters), allocator calls and
new cudaMalloc segments per steady-state step, host syncs inside the step with their Python stacks
(``torch.cuda.set_sync_debug_mode``), kernels and launch calls per step and the kernel-time
table (``torch.profiler``), the per-phase device time (``normuon.*`` profiler ranges), CUDA-graph
replay-only time; bf16 bank vs fp64 REF on sample matrices; a launch-configuration sweep of the
fused Polar Express kernel on the expert bank; the AdamW part (torch fused AdamW over embedding
+ output ``2 x [201088, 1024]``).

Usage: ``python benchmarks/optimizer.py --out benchmarks/results`` (GPU; ``--skip-fork`` and
``--variants a,b`` for shorter runs, ``--pe-tune`` for the kernel sweep, run first: the variants then
use each kernel's fastest configuration, recorded as ``launch_used``);
``python benchmarks/optimizer.py --small --device cpu`` (a smoke run of the script on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vpmoe_compile.optim.normuon as normuon_mod  # noqa: E402
from vpmoe_compile.optim import NorMuon, pe_triton, polar_express  # noqa: E402
from vpmoe_compile.optim.reference import normuon_reference_update  # noqa: E402

LR, WD, MU, BETA2, EPS = 3e-3, 0.01, 0.95, 0.95, 1e-10

#: Datasheet rates (dense bf16 TFLOP/s, HBM TB/s) by a substring of the device name, for the
#: reference floor (none for other devices).
DATASHEET = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}


# ------------------------------------------------------------------------------------ shapes
def vpmoe_8l_matrices(small: bool = False, layers: int = 8, local_experts: int = 256,
                      stacked: bool = True) -> List[Dict]:
    """Parameters of vpMoE-8L as dicts {name, shape, blocks, expert}.

    ``layers=80, local_experts=32``: the full vpMoE's per-GPU set at EP = 8 (``--set ep8``).
    ``stacked``: the routed experts as the ``moe`` pass holds them, two 3-D stacks per layer
    (``experts.linear_fc1.weight [E, F, h]``, ``linear_fc2.weight [E, h, F]``); otherwise one 2-D
    tensor per expert and linear (the stock ``SequentialMLP``).
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
            if stacked:
                add(f"{pre}.mlp.experts.linear_fc1.weight", (E, F, h), expert=True)
                add(f"{pre}.mlp.experts.linear_fc2.weight", (E, h, F), expert=True)
            for e in range(0 if stacked else E):
                add(f"{pre}.mlp.experts.local_experts.{e}.linear_fc1.weight", (F, h), expert=True)
                add(f"{pre}.mlp.experts.local_experts.{e}.linear_fc2.weight", (h, F), expert=True)
            add(f"{pre}.mlp.shared_experts.linear_fc1.weight", (S, h))
            add(f"{pre}.mlp.shared_experts.linear_fc2.weight", (h, S))
    return out, V, h


def logical_shapes(spec: List[Dict], fork: bool = False) -> List[Tuple[int, int]]:
    """Logical matrices; ``fork=True``: fused QKV whole (fork), TPA factors separate."""
    shapes = []
    for s in spec:
        if len(s["shape"]) == 3:  # an expert stack: E matrices
            e, m, n = s["shape"]
            shapes.extend([(m, n)] * e)
            continue
        m, n = s["shape"]
        if s["blocks"] is None or (fork and "linear_qkv" in s["name"] and len(s["blocks"]) == 3):
            shapes.append((m, n))
        else:
            for segs in s["blocks"]:
                shapes.append((sum(x for _, x in segs), n))
    return shapes


def pe_flops(shapes) -> float:
    """5 * (4 s^2 L + 2 s^3) per matrix (5 Polar Express steps), s = min, L = max."""
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
    """Random fp32 weights (std 0.02) and gradients (std 1e-3), drawn on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for s in spec:
        w = torch.randn(*s["shape"], generator=g, device=device) * 0.02
        params.append(torch.nn.Parameter(w))
        grads.append(torch.randn(*s["shape"], generator=g, device=device) * 1e-3)
    return params, grads


def build_normuon(spec, params, grads, compile_mode, pe_backend="torch", cuda_graph=False,
                  fused_bank=True, direct_grads=True, pe_form="standard", overlap_banks=True,
                  **extra):
    groups = []
    for expert in (False, True):
        idx = [i for i, s in enumerate(spec) if s["expert"] == expert]
        if idx:
            groups.append({"params": [params[i] for i in idx], "blocks": [spec[i]["blocks"] for i in idx]})
    for p, gr in zip(params, grads):
        p.grad = gr
    return NorMuon(groups, lr=LR, momentum=MU, beta2=BETA2, eps=EPS, weight_decay=WD,
                   compile=compile_mode, pe_backend=pe_backend, cuda_graph=cuda_graph,
                   fused_bank=fused_bank, direct_grads=direct_grads, pe_form=pe_form,
                   overlap_banks=overlap_banks, **extra)


class ForkLoop:
    """Per-matrix loop with the fork's semantics (own implementation)."""

    def __init__(self, spec, device, seed=1):
        g = torch.Generator(device=device).manual_seed(seed)
        self.items = []
        for m, n in logical_shapes(spec, fork=True):
            W = torch.randn(m, n, generator=g, device=device) * 0.02
            G = torch.randn(m, n, generator=g, device=device) * 1e-3
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


# ------------------------------------------------------------------------------------ diagnostics
VARIANTS = {
    # name: (compile, pe_backend, cuda_graph, fused_bank, direct_grads, pe_form, overlap_banks)
    "batched_eager": (False, "torch", False, False, False, "standard", True),
    "batched_compiled": (True, "torch", False, False, False, "standard", True),
    "batched_compiled_graph": (True, "torch", True, False, False, "standard", True),
    "pe_kernel": (True, "auto", False, False, False, "standard", True),
    "pe_kernel_graph": (True, "auto", True, False, False, "standard", True),
    "bank_kernel": (True, "auto", False, True, False, "standard", True),
    "bank_kernel_graph": (True, "auto", True, True, False, "standard", True),
    "bank_kernel_graph_direct": (True, "auto", True, True, True, "standard", True),
    "bank_kernel_graph_gram": (True, "auto", True, True, False, "gram", True),
    "bank_kernel_graph_direct_gram": (True, "auto", True, True, True, "gram", True),
    "bank_kernel_graph_direct_gram_serial": (True, "auto", True, True, True, "gram", False),
    "bank_kernel_graph_direct_gram_tf32": (True, "auto", True, True, True, "gram", True),
    "bank_kernel_graph_direct_gram_sm_ws": (True, "auto", True, True, True, "gram", True),
    "bank_kernel_graph_direct_gram_merged": (True, "auto", True, True, True, "gram", True),
    "bank_kernel_graph_direct_gram_merged_sm_ws": (True, "auto", True, True, True, "gram", True),
}
#: further NorMuon arguments of a variant: ``merge_launches`` (one launch for the expert stacks
#: of every layer, opt-in)
VARIANT_ARGS = {
    "bank_kernel_graph_direct_gram_merged": {"merge_launches": True},
    "bank_kernel_graph_direct_gram_merged_sm_ws": {"merge_launches": True},
}
#: module settings a variant runs with (restored after it): ``pe_triton.GRAM_F16`` (Gram-space
#: state in fp16, the default) and ``normuon.SM_WORKSPACE`` (per-SM workspace, opt-in)
VARIANT_KNOBS = {
    "bank_kernel_graph_direct_gram_tf32": {"pe_triton.GRAM_F16": False, "normuon.SM_WORKSPACE": False},
    "bank_kernel_graph_direct_gram_sm_ws": {"normuon.SM_WORKSPACE": True},
    "bank_kernel_graph_direct_gram_merged_sm_ws": {"normuon.SM_WORKSPACE": True},
}
HEADLINE = "bank_kernel_graph"
CHECK_STEPS = 3


VARIANT_LABELS = {  # plot labels (the JSON keeps the variant names)
    "fork_loop": "fork's per-matrix loop",
    "batched_eager": "batched, eager",
    "batched_compiled": "batched, torch.compile",
    "batched_compiled_graph": "batched, torch.compile + CUDA graph",
    "pe_kernel": "Polar Express kernel",
    "pe_kernel_graph": "Polar Express kernel + CUDA graph",
    "bank_kernel": "one kernel per bank",
    "bank_kernel_graph": "one kernel per bank + CUDA graph",
    "bank_kernel_graph_direct": "one kernel per bank + CUDA graph, grads in place",
    "bank_kernel_graph_gram": "one kernel per bank, Gram form + CUDA graph",
    "bank_kernel_graph_direct_gram": "one kernel per bank, Gram form + CUDA graph, grads in place",
    "bank_kernel_graph_direct_gram_serial": "the same, every bank on one stream",
    "bank_kernel_graph_direct_gram_tf32": "the same, TF32 Gram products",
    "bank_kernel_graph_direct_gram_sm_ws": "the same, one workspace per SM (opt-in)",
    "bank_kernel_graph_direct_gram_merged": "the same, one launch for every layer's stacks (opt-in)",
    "bank_kernel_graph_direct_gram_merged_sm_ws": "one launch for every layer's stacks + one workspace per SM",
}


def plot(res: dict, path: str) -> None:
    """Median step time per variant against the roofline floor, from the JSON this script writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _plot import plain_log_axis, wrap

    results = res["results"]
    floors = res.get("floor") or {}
    fl = floors.get("measured") or floors.get("datasheet")
    names = [k for k in ("fork_loop",) + tuple(VARIANTS) if k in results]
    vals = [results[k]["median_ms"] for k in names]
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = {"fork_loop": "#b04040", "batched_eager": "#4070b0", "batched_compiled": "#40a060",
              HEADLINE: "#d08030"}
    bars = ax.bar(range(len(names)), vals, color=[colors.get(k, "#e0b070") for k in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([wrap(VARIANT_LABELS.get(k, k), 16) + ("\n(recommended)" if k == HEADLINE else "")
                        for k in names], fontsize=8)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.03, f"{v:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    lo = min(vals + ([fl["floor_ms"]] if fl else []))
    ax.set_ylim(lo / 1.25, max(vals) * 1.6)  # room for the value labels and the legend
    if fl:
        ax.axhline(fl["floor_ms"], color="k", ls="--", label=f"roofline floor {fl['floor_ms']:.2f} ms")
        ax.axhline(2 * fl["floor_ms"], color="gray", ls=":", label="goal: 2x floor")
        ax.legend(fontsize=8, loc="upper right")
    plain_log_axis(ax.yaxis)
    ax.set_ylabel("ms per NorMuon step (median, log scale)")
    m = res["matrices"]
    ax.set_title(f"NorMuon step, {res['config']}: {m['logical_matrices']} matrices, {m['elements'] / 1e6:.0f} M "
                 f"elements\n{res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_at(k: int) -> float:
    return LR * (1.0 - 0.05 * (k % 10))


def set_lr(opt, k):
    for g in opt.param_groups:
        g["lr"] = lr_at(k)


def sync_sites(fn) -> List[Dict]:
    """Host synchronisations inside ``fn()`` with the Python stack where each happened."""
    sites: List[Dict] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        # the only real hits are "called a synchronizing CUDA operation"; set_sync_debug_mode
        # itself warns once that it "is a prototype feature" (torch/cuda/__init__.py), which an
        # earlier version of this script counted as a sync
        if "synchroniz" not in text or "prototype feature" in text:
            return
        stack = traceback.extract_stack()[:-1]
        sites.append({
            "where": f"{filename}:{lineno}",
            "message": str(message)[:200],
            "stack": [f"{f.filename}:{f.lineno} {f.name}" for f in stack[-14:]],
        })

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


KERNEL_CLASSES = (
    ("normuon_bank_triton", ("_normuon_bank_kernel",)),
    ("pe_fused_triton", ("_pe_fused_kernel",)),
    ("gemm_cublas", ("nvjet", "gemm", "cutlass", "sm90_xmma", "Kernel2")),
    ("memcpy", ("Memcpy", "Memset")),
    ("foreach_copy", ("Copy<",)),
    ("foreach_other", ("multi_tensor_apply",)),
    ("inductor_triton", ("triton_",)),
    ("aten_elementwise", ("elementwise_kernel", "vectorized_", "reduce_kernel")),
)


def kernel_class(name: str) -> str:
    for cls, keys in KERNEL_CLASSES:
        if any(k in name for k in keys):
            return cls
    return "other"


def profile_step(fn, device) -> Dict:
    """Kernel table, kernel classes, phase ranges and launch calls of one ``fn()`` call."""
    from torch.profiler import ProfilerActivity, profile

    normuon_mod.PROFILE_RANGES = True
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
    finally:
        normuon_mod.PROFILE_RANGES = False
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    # drop gpu_user_annotation spans (our ranges, the optimizer's step range)
    kernels = [e for e in kernels if not e.name.startswith(("normuon.", "Optimizer."))]
    by_name: Dict[str, float] = {}
    by_class: Dict[str, float] = {}
    for e in kernels:
        ms = e.device_time_total / 1e3
        by_name[e.name] = by_name.get(e.name, 0.0) + ms
        c = kernel_class(e.name)
        by_class[c] = by_class.get(c, 0.0) + ms
    phases = {}
    launches = {}
    averages = prof.key_averages()
    cpu_top = sorted(averages, key=lambda a: -a.self_cpu_time_total)[:12]
    step_cpu = [a.cpu_time_total / 1e3 for a in averages if a.key.startswith("Optimizer.step#")]
    for a in averages:
        if a.key.startswith("normuon."):
            phases[a.key] = {"device_ms": a.device_time_total / 1e3, "calls": a.count}
        if "Launch" in a.key or a.key.startswith("cudaMemcpy") or a.key.startswith("cudaMemset"):
            launches[a.key] = a.count
    return {
        "kernels": len(kernels),
        "kernel_time_ms": sum(by_name.values()),
        "kernel_classes_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": {k[:160]: v for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]},
        "phases": phases,
        "launch_calls": launches,
        "step_cpu_ms": step_cpu[0] if step_cpu else None,
        "cpu_top_self_ms": {a.key[:100]: [a.self_cpu_time_total / 1e3, a.count] for a in cpu_top},
    }


def run_variant(name, spec, device, reps, delta_eager, init, diagnose=True) -> Tuple[Dict, Dict, object]:
    """Build, check and time one NorMuon variant; returns (timing, info, deltas after checks)."""
    from torch._dynamo import reset as dynamo_reset
    from torch._dynamo.utils import counters

    compile_mode, backend, graph, fused_bank, direct, form, overlap = VARIANTS[name]
    dynamo_reset()
    counters.clear()
    params, grads = make_params(spec, device)
    extra = VARIANT_ARGS.get(name, {})
    opt = build_normuon(spec, params, grads, compile_mode, backend, graph, fused_bank, direct, form,
                        overlap, **extra)
    info: Dict = {"compile": bool(compile_mode), "pe_backend": backend, "cuda_graph": graph,
                  "fused_bank": fused_bank, "direct_grads": direct, "pe_form": form,
                  "overlap_banks": overlap, **extra}
    _sync(device)
    t0 = time.perf_counter()
    set_lr(opt, 0)
    opt.step()
    _sync(device)
    info["first_step_s"] = time.perf_counter() - t0
    graphs0 = counters["stats"]["unique_graphs"]
    for k in range(1, CHECK_STEPS):
        set_lr(opt, k)
        opt.step()
    _sync(device)
    delta = [p.detach() - w for p, w in zip(params, init)]
    if delta_eager is not None:
        info["vs_eager_rel_err_max"] = max(rel(a, b) for a, b in zip(delta, delta_eager))
    info["banks"] = opt.bank_summary()
    counter = iter(range(CHECK_STEPS, 10**6))

    def step():
        set_lr(opt, next(counter))
        opt.step()

    timing = time_fn(step, device, warmup=2, reps=reps)
    if device.type == "cuda":
        # host time to issue one step (the GPU runs behind; measured without a sync inside)
        host = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        info["host_issue_ms"] = statistics.median(host)
    if compile_mode:
        info["recompiles_after_lr_changes"] = counters["stats"]["unique_graphs"] - graphs0
        info["unique_graphs"] = graphs0
    info["graph_captures"] = opt.graph_captures
    if device.type == "cuda" and diagnose:
        torch.cuda.synchronize()
        stats0 = torch.cuda.memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        stats1 = torch.cuda.memory_stats()
        info["steady_state_new_segments"] = stats1["segment.all.allocated"] - stats0["segment.all.allocated"]
        info["steady_state_allocator_calls_per_step"] = (
            stats1["allocation.all.allocated"] - stats0["allocation.all.allocated"]) / 3
        sites = sync_sites(step)
        info["host_syncs_in_step"] = len(sites)
        info["host_sync_sites"] = sites[:6]
        info["profile"] = profile_step(step, device)
        if graph and opt._graphs is not None and opt._graphs.compute is not None:
            gs = opt._graphs

            def replay_only():
                if gs.gather is not None:
                    gs.gather.replay()
                gs.compute.replay()

            info["graph_replay_only"] = time_fn(replay_only, device, warmup=2, reps=reps)
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(name, json.dumps(timing), json.dumps({k: v for k, v in info.items()
                                                 if k not in ("banks", "profile", "host_sync_sites")}),
          flush=True)
    del opt, params, grads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return timing, info, delta


#: Launch configurations of the sweep: (form, BLOCK_L, num_warps, num_stages), and for the bank
#: kernel also its L2 eviction priorities (``pe_triton.L2_HINTS``).
#: (An H100 sweep with more candidates -- 2 stages, 16 warps, BLOCK_L 32 -- found each slower
#: than 3 stages, 8 warps, BLOCK_L 64 for both forms: results/optimizer_vpmoe-8l_launch_sweep.json
#: and results/optimizer_vpmoe-8l_gram.json.)
PE_SWEEP = (("standard", 64, 8, 3), ("gram", 64, 8, 3))
BANK_SWEEP = (("standard", 64, 8, 3, False), ("standard", 64, 8, 3, True),
              ("gram", 64, 8, 3, False), ("gram", 64, 8, 3, True))


def bank_key(form, orient, bl, nw, ns, hints) -> str:
    return f"bank_{form}_{orient}_bl{bl}_w{nw}_s{ns}" + ("_l2" if hints else "")


def best_launch(sweep: Dict) -> Tuple[Dict[str, Tuple[int, int, int]], Dict[str, bool]]:
    """Fastest finite configuration per kernel kind of :func:`kernel_sweep`'s results (the bank
    kernel by the sum of its wide and tall times): ``(launch, hints)`` as
    ``pe_triton.LAUNCH_128`` / ``pe_triton.L2_HINTS`` entries."""
    best: Dict[str, Tuple[float, Tuple]] = {}
    for form, bl, nw, ns in PE_SWEEP:
        r = sweep.get(f"pe_{form}_bl{bl}_w{nw}_s{ns}", {})
        kind = "pe" if form == "standard" else "pe_gram"
        if "median_ms" in r and (kind not in best or r["median_ms"] < best[kind][0]):
            best[kind] = (r["median_ms"], (bl, nw, ns))
    hints: Dict[str, Tuple[float, bool]] = {}
    for form, bl, nw, ns, h in BANK_SWEEP:
        rs = [sweep.get(bank_key(form, o, bl, nw, ns, h), {}) for o in ("wide", "tall")]
        if all("median_ms" in r and r.get("finite") for r in rs):
            ms = sum(r["median_ms"] for r in rs)
            kind = "bank" if form == "standard" else "bank_gram"
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, (bl, nw, ns))
                hints[kind] = (ms, h)
    return {k: v[1] for k, v in best.items()}, {k: v[1] for k, v in hints.items()}


def kernel_sweep(device, reps) -> Dict:
    """Launch configurations of the fused kernels on one expert bank (1792 x [128, 1024] and
    1792 x [1024, 128]): the Polar Express kernel (vs the PyTorch bmm path) and the one-kernel
    bank step (bytes: 22 B / element = the floor's 20 + the bf16 workspace write)."""
    from vpmoe_compile.optim.pe_triton import normuon_bank_fused_, polar_express_fused_
    from vpmoe_compile.optim.polar_express import PINNED_COEFFICIENTS, _pe_polynomial

    out = {}
    N, S, L = 1792, 128, 1024
    flops = N * 5 * (4 * S * S * L + 2 * S**3)
    U = torch.randn(N, S, L, device=device)
    norm2 = U.square().sum((-2, -1))
    Xb = U.to(torch.bfloat16)
    X0 = (U / (1.02 * norm2.sqrt()[:, None, None] + 1e-6)).to(torch.bfloat16)
    t = time_fn(lambda: _pe_polynomial(X0, PINNED_COEFFICIENTS, torch.bfloat16), device,
                warmup=2, reps=reps)
    out["pe_torch_bmm"] = {**t, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12}
    ref = _pe_polynomial(X0, PINNED_COEFFICIENTS, torch.bfloat16).float()
    work = torch.empty_like(Xb)
    tc = time_fn(lambda: work.copy_(Xb), device, warmup=2, reps=reps)["median_ms"]
    for form, bl, nw, ns in PE_SWEEP:
        key = f"pe_{form}_bl{bl}_w{nw}_s{ns}"
        try:
            def run():
                work.copy_(Xb)
                polar_express_fused_(work, norm2, PINNED_COEFFICIENTS, 0.02, 1e-6, stat=1,
                                     block_l=bl, num_warps=nw, num_stages=ns, form=form)

            run()
            err = rel(work.float(), ref)
            ms = time_fn(run, device, warmup=2, reps=reps)["median_ms"] - tc
            out[key] = {"median_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_vs_torch": err}
        except Exception as e:  # a configuration that does not compile must not end the sweep
            out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print("sweep", key, out[key], flush=True)
    del U, Xb, X0, ref, work
    hyper = {k: torch.tensor(v, device=device) for k, v in
             dict(momentum=MU, lr=LR, decay=1 - LR * WD, beta2=BETA2, eps=EPS).items()}
    for flip in (False, True):
        shape = (N, L, S) if flip else (N, S, L)
        G = torch.randn(shape, device=device) * 1e-3
        M = torch.zeros(shape, device=device)
        W = torch.randn(shape, device=device) * 0.02
        X = torch.empty(shape, device=device, dtype=torch.bfloat16)
        V = torch.zeros((N, L) if flip else (N, S), device=device)
        for form, bl, nw, ns, hints in BANK_SWEEP:
            key = bank_key(form, "tall" if flip else "wide", bl, nw, ns, hints)
            try:
                def run():
                    normuon_bank_fused_(G, M, V, W, X, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6,
                                        flip, -2 if flip else -1, "shape", math.sqrt(8.0) if flip else 1.0,
                                        0.0, block_l=bl, num_warps=nw, num_stages=ns, form=form,
                                        l2_hints=hints)

                t = time_fn(run, device, warmup=2, reps=reps)
                ms = t["median_ms"]
                out[key] = {"median_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                            "tb_s_at_22B": 22 * N * S * L / (ms * 1e-3) / 1e12,
                            "finite": bool(torch.isfinite(W).all())}
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print("sweep", key, out[key], flush=True)
        del G, M, W, X, V
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (script smoke run)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-fork", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pe-tune", action="store_true", help="launch-configuration sweep of the fused PE")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--set", default="8l", choices=["8l", "ep8"],
                    help="8l: vpMoE-8L, all 256 experts; ep8: full 80-layer vpMoE, 32 experts per GPU")
    ap.add_argument("--experts", default="stacked", choices=["stacked", "separate"],
                    help="stacked: the routed experts as the moe pass holds them ([E, m, n] per layer and "
                         "linear, the default); separate: one matrix per expert (stock SequentialMLP)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or ("small" if args.small else ("vpmoe-8l" if args.set == "8l" else "vpmoe-ep8"))
    stacked = args.experts == "stacked"
    if not stacked and args.tag is None:
        tag += "_separate"
    res: Dict = {"config": tag, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "hyper": dict(lr=LR, wd=WD, mu=MU, beta2=BETA2, eps=EPS),
                 "command": "python benchmarks/optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception:
        pass
    print(f"device {res['device']} torch {torch.__version__}", flush=True)

    if args.set == "ep8" and not args.small:
        spec, vocab, hidden = vpmoe_8l_matrices(layers=80, local_experts=32, stacked=stacked)
    else:
        spec, vocab, hidden = vpmoe_8l_matrices(args.small, stacked=stacked)
    res["experts"] = args.experts
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
    rates = {"measured": (ceil.get("bf16_gemm_tflops"), ceil.get("copy_tb_s"))}
    rates.update({"datasheet": rate for name, rate in DATASHEET.items() if name in res["device"]})
    for label, (tf, bw) in rates.items():
        if tf and bw:
            fl = flops / (tf * 1e12) * 1e3
            by = min_bytes / (bw * 1e12) * 1e3
            floors[label] = {"flop_ms": fl, "byte_ms": by, "floor_ms": max(fl, by)}
    res["floor"] = floors
    res["min_bytes"] = min_bytes
    print(json.dumps(res["matrices"]), json.dumps(floors), flush=True)

    stem = os.path.join(args.out, f"optimizer_{tag}")

    def dump():  # partial results survive a time limit
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=2, default=str)

    if args.pe_tune and device.type == "cuda" and not args.small:
        # sweep first: the variants below run the fastest configuration of each kernel
        res["kernel_sweep"] = kernel_sweep(device, args.reps)

        launch, hints = best_launch(res["kernel_sweep"])
        pe_triton.LAUNCH_128.update(launch)
        pe_triton.L2_HINTS.update(hints)
        res["launch_used"] = dict(pe_triton.LAUNCH_128)
        res["l2_hints_used"] = dict(pe_triton.L2_HINTS)
        print("launch used", res["launch_used"], "L2 hints", res["l2_hints_used"], flush=True)
        dump()

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if device.type != "cuda":
        variants = [v for v in variants if not VARIANTS[v][2] and not VARIANTS[v][0]]
    init = None
    results: Dict = {}
    details: Dict = {}
    delta_eager = None
    for v in ["batched_eager"] + [v for v in variants if v != "batched_eager"]:
        if init is None:
            p0, _ = make_params(spec, device)
            init = [p.detach().clone() for p in p0]
            del p0
        knobs = VARIANT_KNOBS.get(v, {})
        mods = {"pe_triton": pe_triton, "normuon": normuon_mod}
        saved = {k: getattr(mods[k.split(".")[0]], k.split(".")[1]) for k in knobs}
        try:
            for k, val in knobs.items():
                setattr(mods[k.split(".")[0]], k.split(".")[1], val)
            timing, info, delta = run_variant(v, spec, device, args.reps, delta_eager, init)
            info["pe_triton_knobs"] = knobs
        except Exception as e:
            traceback.print_exc()
            details[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        finally:
            for k, val in saved.items():
                setattr(mods[k.split(".")[0]], k.split(".")[1], val)
        results[v] = timing
        details[v] = info
        res["results"], res["variants"] = results, details
        dump()
        if v == "batched_eager":
            delta_eager = delta
        if v == HEADLINE:
            res["banks"] = info["banks"]
        if v == HEADLINE or VARIANTS[v][5] == "gram":
            # The accuracy bound on the real shapes (docs/design.md#polar-express): the 3-step
            # update of the headline and of each Gram-form variant vs fp64 REF
            ref_err = {}
            samples = [i for i, s in enumerate(spec)
                       if ("local_experts.0." in s["name"] and "layers.1." in s["name"])
                       or (".experts.linear_fc" in s["name"] and "layers.1." in s["name"])
                       or s["name"].endswith("layers.3.self_attention.linear_qkv.weight")
                       or s["name"].endswith("layers.0.self_attention.linear_qkv.weight")
                       or s["name"].endswith("layers.0.self_attention.linear_proj.weight")]
            _, grads = make_params(spec, device)
            grads = {i: grads[i].cpu() for i in samples}
            for i in samples:
                # an expert stack: its expert 0 (each expert's matrix is updated on its own)
                pick = (lambda t: t[0]) if len(spec[i]["shape"]) == 3 else (lambda t: t)
                W = pick(init[i]).double().cpu().clone()
                M = torch.zeros_like(W)
                vv = torch.zeros(W.shape[0], 1, dtype=torch.float64)
                for k in range(CHECK_STEPS):
                    normuon_reference_update(W, pick(grads[i]).double(), M, vv, lr=lr_at(k), weight_decay=WD,
                                             blocks=spec[i]["blocks"])
                ref_err[spec[i]["name"]] = rel(pick(delta[i]).cpu(), W - pick(init[i]).double().cpu())
            res.setdefault("vs_fp64_ref_rel_err", {})[v] = ref_err
            if v == HEADLINE:
                res["headline_vs_fp64_ref_rel_err"] = ref_err
            print(v, "vs REF", ref_err, flush=True)
        del delta
    del delta_eager
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
    res["variants"] = details
    fl = floors.get("measured") or floors.get("datasheet")
    best = min((k for k in results if k in VARIANTS), key=lambda k: results[k]["median_ms"], default=None)
    res["best_variant"] = best
    if fl and best:
        res["best_over_floor"] = results[best]["median_ms"] / fl["floor_ms"]
        res["goal_best_le_2x_floor"] = res["best_over_floor"] <= 2.0
        res["over_floor"] = {k: results[k]["median_ms"] / fl["floor_ms"] for k in results if k in VARIANTS}
    if "fork_loop" in results and best:
        res["speedup_best_vs_fork"] = results["fork_loop"]["median_ms"] / results[best]["median_ms"]
    if best and "batched_eager" in results:
        res["speedup_best_vs_eager"] = results["batched_eager"]["median_ms"] / results[best]["median_ms"]

    dump()
    if fl and best and device.type == "cuda" and not args.small:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _kernel_goals import update

        update(args.out, res["device"], {"normuon_step_ms": results[best]["median_ms"], "normuon_floor_ms": fl["floor_ms"]},
               script="benchmarks/optimizer.py",
               details={"set": tag, "experts": args.experts, "variant": best,
                        "floor": "measured" if "measured" in floors else "datasheet"})
    try:
        plot(res, stem + ".png")
    except Exception as e:  # plotting must not lose the numbers
        print("plot failed:", e)
    print("SUMMARY", json.dumps({k: round(v["median_ms"], 3) for k, v in results.items()}),
          "floor", json.dumps(fl), "best", best, "over_floor", res.get("best_over_floor"), flush=True)
    return res


if __name__ == "__main__":
    main()
