"""Run the Triton attention kernels of both families and the fused NorMuon kernels under
``compute-sanitizer`` (docs/design.md#benchmarks-and-checks).

A GPU tool, not a test and not a benchmark: it re-runs itself under NVIDIA's ``compute-sanitizer``
(minutes per tool), so it stays a script here in ``scripts/`` (it was ``benchmarks/sanitize_kernels.py``;
the accuracy checks of the same kernels are the ``gpu`` tests
``tests/vpmoe_compile/ops/test_sink_attention_gpu.py`` and ``test_tpa_attention_gpu.py``).

Command (on the GPU machine, from the repository root)::

    PYTHONPATH=$PWD python scripts/sanitize_kernels.py --out $OUT [--tools memcheck,initcheck]

writes ``$OUT/sanitize_kernels.json`` (the copy in ``benchmarks/results/``,
``sanitize_kernels_h100.json``, comes from that command when the script was
``benchmarks/sanitize_kernels.py``). What it does:

1. Control: a planted out-of-bounds Triton store (one element past a tensor's end, unmasked) is
   run under the same sanitizer command and must be reported; this proves the harness sees
   errors in Triton kernels with PyTorch's allocations.
2. Workload: this file re-run with ``--workload`` under
   ``compute-sanitizer --tool <tool> --padding 512 --error-exitcode 3 --print-limit 200``
   (``--padding`` makes the sanitizer place a guard band behind every allocation) with
   ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so every tensor is its own ``cudaMalloc`` and an
   out-of-bounds access lands outside any allocation instead of inside the caching allocator's
   segment. The workload runs forward and backward of

   * the TPA op's kernels (:mod:`vpmoe_compile.ops.tpa_attention.triton`: prologue, window attention
     (the one sliding-window family), dq, dkv, prologue backward) through ``tpa_window_attention`` in bf16:
     s = 1, s not a multiple of any tile, W = 1, W >= s, GQA / MQA / MHA, odd ranks, no bias or
     norm, factors as a misaligned strided view and as an aligned strided view, batch not a
     multiple of the prologue backward's batch chunk, plus the attention middle alone on
     non-contiguous q/k/v (both ways of computing ``delta``);
   * the public sink-attention op (``sink_attention_with_lse``, Triton): global causal + ALiBi +
     sink on the full-causal kernels (:mod:`vpmoe_compile.ops.sink_attention.triton`) with fixed
     small and large tiles and once autotuned, and sliding window + sink on the sliding-window
     family (its own tiles); s = 1, odd s, W = 1, GQA / MQA, 3 heads per group (PACK = 3), a
     gradient into the LSE (both families), non-contiguous inputs. (Until the window path of the
     sink-attention kernels was deleted, its window cases ran those kernels.)
   * the fused NorMuon kernels (:mod:`vpmoe_compile.optim.pe_triton`; family ``normuon``): the
     one-kernel bank step in both Polar Express forms, wide (per-row statistics) and tall
     (per-column), at the expert shape ``[128, 1024]`` (its default launch) and at row and
     column counts that are not multiples of any tile (``[37, 200]``, ``[5, 40]``), reading the
     gradients through the address table (``grad_ptrs``) or from the bank, writing ``W`` or
     ``-lr * Delta`` into ``G``, with and without the L2 eviction hints; the Polar Express kernel
     alone with per-row and per-column sums; one NorMuon step over mixed banks.

   Every case checks that outputs and gradients are finite. The sanitizer's ``ERROR SUMMARY``
   line and exit status give the verdict.

``--workload`` alone (no sanitizer) runs the same cases, e.g. to time them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEV = "cuda"  # "cpu" only for a dry run of the workload under TRITON_INTERPRET=1 (--dry-run-cpu)


def _sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def _module(path):
    """Import ``path`` from this repository (put on ``sys.path`` first)."""
    import importlib

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(path)


def _op(name):
    """``_op("sink_attention.triton")`` -> ``vpmoe_compile.ops.sink_attention.triton`` (imports
    neither Megatron nor the rest of the package)."""
    return _module(f"vpmoe_compile.ops.{name}")


# ----------------------------------------------------------------------------------------- workload


def _finite(*ts):
    import torch

    for t in ts:
        if t is not None and not torch.isfinite(t.float()).all():
            raise AssertionError("non-finite output")


def _tpa_cases():
    """(name, dict) cases of the TPA op; shapes are ``[s, b, ...]``."""
    vp = dict(H=8, G=2, d=128, Rq=4, R=2)
    return [
        ("tpa vpMoE s=1 W=128", dict(vp, s=1, b=2, W=128)),
        ("tpa vpMoE s=37 W=1", dict(vp, s=37, b=3, W=1)),
        ("tpa vpMoE s=37 W=1, 2 samples per prologue-bwd program", dict(vp, s=37, b=3, W=1, bpp=2)),
        ("tpa vpMoE s=100 W=128 (odd s, W>=s)", dict(vp, s=100, b=2, W=128)),
        ("tpa vpMoE s=203 W=64", dict(vp, s=203, b=1, W=64)),
        ("tpa MQA d=64 Rq=3 R=1 (unaligned factors)", dict(H=4, G=1, d=64, Rq=3, R=1, s=45, b=2, W=9)),
        ("tpa MHA d=32 no bias no norm", dict(H=4, G=4, d=32, Rq=2, R=2, s=29, b=2, W=5, bias=False, norm=False)),
        ("tpa vpMoE misaligned strided factors", dict(vp, s=70, b=2, W=16, view="misaligned")),
        ("tpa vpMoE aligned strided factors", dict(vp, s=70, b=2, W=16, view="aligned")),
        # attention tiles of benchmarks/tpa.py --tune: heads packed into the forward / dq rows
        # (4 per program here; for H/G = 3, 42 tokens x 3 heads and two padding rows of 128),
        # dk/dv on 32-key programs
        ("tpa vpMoE s=203 W=64, packed fwd/dq 64x16, dkv 32x32",
         dict(vp, s=203, b=2, W=64, tiles=dict(PACK_FWD=True, BN=16, PACK_DQ=True, BN_DQ=16, BM_DKV=32, BN_DKV=32))),
        ("tpa vpMoE s=150 W=128, packed dkv 64x16 (transposed accumulators)",
         dict(vp, s=150, b=2, W=128, tiles=dict(PACK_DKV=True, BN_DKV=16))),
        ("tpa H=6 G=2 s=77 W=1, packed fwd/dq 128x32 w8, dkv 64x64 w8",
         dict(vp, H=6, s=77, b=1, W=1, tiles=dict(PACK_FWD=True, BM=128, WARPS_ATTN=8, PACK_DQ=True, BM_DQ=128,
                                                  BN_DQ=32, WARPS_DQ=8, WARPS_DKV=8))),
        ("tpa H=6 G=2 s=77 W=5, packed dkv 128x32 w8 (3 heads, padding rows)",
         dict(vp, H=6, s=77, b=1, W=5, tiles=dict(PACK_DKV=True, BM_DKV=128, BN_DKV=32, WARPS_DKV=8))),
    ]


def run_tpa_case(c):
    import torch

    layout = _op("tpa_attention.layout")
    tk = _op("tpa_attention.triton")
    tpa_window_attention = _op("tpa_attention").tpa_window_attention

    H, G, d, Rq, R, s, b, W = (c[k] for k in ("H", "G", "d", "Rq", "R", "s", "b", "W"))
    dev, bf = DEV, torch.bfloat16
    Fw = layout.factor_width(H, G, d, Rq, R)
    f = torch.randn(s, b, Fw, device=dev)
    if c.get("view") == "misaligned":  # [s, b, F] view of a padded [b, s, F + 3] buffer
        buf = torch.randn(b, s, Fw + 3, device=dev, dtype=bf)
        factors = buf[..., 1:1 + Fw].transpose(0, 1)
    elif c.get("view") == "aligned":  # rows 16-byte aligned, not contiguous
        buf = torch.randn(s, b, Fw + 8, device=dev, dtype=bf)
        factors = buf[..., :Fw]
    else:
        factors = f.to(bf)
    hpg = H // G
    bias = 0.3 * torch.randn(G * (hpg + 2) * d, device=dev, dtype=bf) if c.get("bias", True) else None
    gq = (1 + 0.2 * torch.randn(d, device=dev)).to(bf) if c.get("norm", True) else None
    gk = (1 + 0.2 * torch.randn(d, device=dev)).to(bf) if c.get("norm", True) else None
    theta = torch.arange(s, device=dev, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=dev)[None, :]
    cos, sin = theta.cos(), theta.sin()
    sink = torch.randn(H, device=dev, dtype=bf)
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in (factors, bias, gq, gk, cos, sin, sink)]
    present = [t for t in leaves if t is not None]
    saved = dict(tk.GPU_TILES)
    tk.GPU_TILES.update(c.get("tiles", {}), BPP_BWD=c.get("bpp", saved["BPP_BWD"]))
    try:
        out = tpa_window_attention(*leaves, num_heads=H, num_groups=G, head_dim=d, q_rank=Rq, kv_rank=R,
                                   window=W, backend="triton")
        grads = torch.autograd.grad(out, present, torch.randn_like(out))
    finally:
        tk.GPU_TILES.update(saved)
    _sync()
    _finite(out, *grads)
    return dict(aligned=tk.factors_aligned(factors, H, G, Rq, R))


def run_tpa_middle_noncontiguous():
    import torch

    tk = _op("tpa_attention.triton")
    s, b, H, G, d, W = 53, 2, 8, 2, 128, 20
    q = torch.randn(b, s, H, d, device=DEV, dtype=torch.bfloat16).transpose(0, 1)
    k = torch.randn(b, G, s, d, device=DEV, dtype=torch.bfloat16).permute(2, 0, 1, 3)
    v = torch.randn(s, b, G, 2 * d, device=DEV, dtype=torch.bfloat16)[..., ::2]
    sink = torch.randn(H, device=DEV)
    grads = []
    for mode in ("recompute", "output"):  # both ways to get delta
        tk.GPU_TILES["DELTA"] = mode
        o, lse = tk.swa_fwd(q, k, v, sink, W, d ** -0.5)
        grads += tk.swa_bwd(torch.randn_like(o), q, k, v, o, lse, sink, W, d ** -0.5)
    tk.GPU_TILES["DELTA"] = "auto"
    _sync()
    _finite(o, lse, *grads)
    return {}


def _sink_cases(tk):
    small = tk.SinkAttentionConfig(fwd=tk.KernelTiles(32, 16), dq=tk.KernelTiles(32, 16), dkv=tk.KernelTiles(32, 16))
    big = tk.SinkAttentionConfig(fwd=tk.KernelTiles(128, 64, 8, 3), dq=tk.KernelTiles(128, 64, 8, 3),
                                 dkv=tk.KernelTiles(64, 64, 8, 2))
    vp = dict(H=8, G=2, d=128)
    return [
        ("sink global ALiBi s=1 (big tiles)", dict(vp, s=1, b=2, alibi=True), big),
        ("sink global ALiBi s=77 (small tiles) + dLSE", dict(vp, s=77, b=2, alibi=True, dlse=True), small),
        ("sink global ALiBi s=203 (big tiles)", dict(vp, s=203, b=1, alibi=True), big),
        ("sink global ALiBi PACK=3 s=50", dict(H=6, G=2, d=64, s=50, b=1, alibi=True), big),
        # the window cases run the sliding-window family (its own tiles: the configs do not apply)
        ("sink window W=1 s=45 MHA", dict(H=4, G=4, d=64, s=45, b=3, window=1), None),
        ("sink window W=33 s=203", dict(vp, s=203, b=1, window=33), None),
        ("sink window W=128 s=130 MQA + dLSE", dict(H=8, G=1, d=128, s=130, b=2, window=128, dlse=True), None),
        ("sink window W=128 s=1", dict(vp, s=1, b=2, window=128), None),
        ("sink global noncontiguous", dict(vp, s=61, b=2, alibi=True, view=True), big),
        ("sink window noncontiguous", dict(vp, s=61, b=2, window=17, view=True), None),
        ("sink window W=128 s=300", dict(vp, s=300, b=1, window=128), None),
        ("sink global ALiBi s=300 (autotuned)", dict(vp, s=300, b=1, alibi=True), None),
    ]


def run_sink_case(tk, ops, alibi_mod, c, cfg):
    import torch

    H, G, d, s, b = (c[k] for k in ("H", "G", "d", "s", "b"))
    dev, bf = DEV, torch.bfloat16
    if c.get("view"):
        q = torch.randn(b, s, H, d, device=dev, dtype=bf).transpose(0, 1)
        k = torch.randn(b, G, s, d, device=dev, dtype=bf).permute(2, 0, 1, 3)
        v = torch.randn(s, b, G, 2 * d, device=dev, dtype=bf)[..., ::2]
    else:
        q = torch.randn(s, b, H, d, device=dev, dtype=bf)
        k = torch.randn(s, b, G, d, device=dev, dtype=bf)
        v = torch.randn(s, b, G, d, device=dev, dtype=bf)
    sink = torch.randn(H, device=dev, dtype=bf)
    slopes = alibi_mod.alibi_slopes(H, device=dev) if c.get("alibi") else None
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, sink)]
    with tk.use_config(cfg):
        out, lse = ops.sink_attention_with_lse(*leaves, slopes=slopes, window=c.get("window"), backend="triton")
        loss = (out.float() * torch.randn_like(out, dtype=torch.float32)).sum()
        if c.get("dlse"):
            loss = loss + (lse * torch.randn_like(lse)).sum()
        grads = torch.autograd.grad(loss, leaves)
    _sync()
    _finite(out, lse, *grads)
    return {}


def _normuon_cases():
    """(name, dict) cases of the fused NorMuon kernels: ``shape`` is ``[N, m, n]`` (tall when
    ``m > n``), ``stat`` -1 / -2 the oriented axis of the statistics."""
    cases = []
    for form in ("gram", "standard"):
        cases += [
            (f"bank {form} expert wide [128, 1024] grad_ptrs", dict(form=form, shape=(3, 128, 1024), stat=-1, ptrs=True)),
            (f"bank {form} expert tall [1024, 128] per column", dict(form=form, shape=(3, 1024, 128), stat=-2, ptrs=True)),
            (f"bank {form} [37, 200] no W, no hints", dict(form=form, shape=(3, 37, 200), stat=-1, has_w=False, hints=False)),
            (f"bank {form} tall [200, 37] per column, no W", dict(form=form, shape=(2, 200, 37), stat=-2, has_w=False)),
            (f"bank {form} wide [37, 200] per column", dict(form=form, shape=(2, 37, 200), stat=-2)),
            (f"bank {form} [5, 40]", dict(form=form, shape=(4, 5, 40), stat=-1, ptrs=True)),
            (f"pe {form} [37, 200] row sums", dict(form=form, shape=(3, 37, 200), stat=-1, pe=True)),
            (f"pe {form} tall [300, 128] column sums", dict(form=form, shape=(2, 300, 128), stat=-2, pe=True)),
        ]
    # the Gram form's opt-in workspaces: one per SM (x_per_sm), the restart without a store (keep_x0)
    cases += [
        ("bank gram expert wide [128, 1024] per-SM workspace", dict(form="gram", shape=(3, 128, 1024), stat=-1, slot=True)),
        ("bank gram expert tall [1024, 128] per-SM workspace, keep_x0",
         dict(form="gram", shape=(3, 1024, 128), stat=-2, slot=True, keep=True)),
        ("bank gram [37, 200] keep_x0", dict(form="gram", shape=(3, 37, 200), stat=-2, keep=True)),
        # several banks in one launch through the address table (merge_launches)
        ("banks gram expert wide [128, 1024] one launch, address table",
         dict(form="gram", shape=(4, 128, 1024), stat=-1, table=True)),
        ("banks gram expert tall [1024, 128] one launch, address table, per-SM workspace",
         dict(form="gram", shape=(4, 1024, 128), stat=-2, table=True, slot=True)),
        ("banks standard [37, 200] one launch, address table",
         dict(form="standard", shape=(4, 37, 200), stat=-2, table=True)),
    ]
    return cases


def run_normuon_case(c):
    import torch

    pt = _module("vpmoe_compile.optim.pe_triton")
    from vpmoe_compile.optim.polar_express import PINNED_COEFFICIENTS

    N, m, n = c["shape"]
    flip = m > n
    S, L = (n, m) if flip else (m, n)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    if c.get("pe"):
        U = torch.randn(N, m, n, device=DEV)
        X = (U.mT if flip else U).to(dt)  # oriented [N, S, L] view of the stored input
        r = pt.polar_express_fused_(X, U.square().sum((-2, -1)), PINNED_COEFFICIENTS, 0.02, 1e-6,
                                    stat=1 if c["stat"] == -1 else 2, form=c["form"])
        _sync()
        _finite(X, r)
        return {}
    hyper = {k: torch.tensor(v, device=DEV) for k, v in
             dict(momentum=0.95, lr=0.01, decay=0.999, beta2=0.95, eps=1e-10).items()}
    G = torch.randn(N, m, n, device=DEV) * 1e-3
    M = torch.randn(N, m, n, device=DEV) * 1e-3
    W = torch.randn(N, m, n, device=DEV) * 0.02 if c.get("has_w", True) else None
    V = torch.rand(N, S if c["stat"] == -1 else L, device=DEV)
    X = (pt.sm_workspace((m, n), dt, DEV) if c.get("slot")
         else torch.empty(N, m, n, device=DEV, dtype=dt))
    if c.get("table"):  # two banks, separate allocations, in one launch
        banks = [(G[:N // 2].clone(), M[:N // 2].clone(), V[:N // 2].clone(), W[:N // 2].clone()),
                 (G[N // 2:].clone(), M[N // 2:].clone(), V[N // 2:].clone(), W[N // 2:].clone())]
        addr = torch.cat([pt.member_addresses(*b) for b in banks], dim=1).to(DEV)
        pt.normuon_banks_fused_(addr, (m, n), X, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6, flip,
                                c["stat"], "shape", 1.0, 0.0, form=c["form"], x_per_sm=c.get("slot", False))
        _sync()
        _finite(*[t for b in banks for t in b])
        return {}
    grads = [torch.randn(m, n, device=DEV) * 1e-3 for _ in range(N)] if c.get("ptrs") else None
    ptrs = (torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64, device=DEV)
            if grads is not None else None)
    pt.normuon_bank_fused_(G, M, V, W, X, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6, flip, c["stat"],
                           "shape", 1.0, 0.0, grad_ptrs=ptrs, form=c["form"],
                           l2_hints=c.get("hints", True), keep_x0=c.get("keep", False),
                           x_per_sm=c.get("slot", False))
    _sync()
    _finite(G, M, V, W)
    return {}


def run_normuon_step():
    """One NorMuon step over fused banks (wide, tall, small, two expert stacks in one launch) and
    a PyTorch bank."""
    import torch

    NorMuon = _module("vpmoe_compile.optim").NorMuon
    shapes = [(4, 128, 256), (64, 256), (256, 64), (5, 40), (160, 160), (4, 128, 256)]
    params = [torch.nn.Parameter(torch.randn(*s, device=DEV) * 0.02) for s in shapes]
    opt = NorMuon(params, lr=0.01, weight_decay=0.1, direct_grads=True, merge_launches=True,
                  pe_backend="triton" if DEV == "cpu" else "auto",
                  pe_dtype=torch.float32 if DEV == "cpu" else None)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    _sync()
    _finite(*params)
    return {}


def workload(out_dir, which, budget_s=None):
    """Run the cases; once ``budget_s`` seconds have passed, the remaining ones are recorded as not
    run (so the process still ends normally and the sanitizer writes its summary)."""
    import torch

    sys.path.insert(0, ROOT)
    torch.manual_seed(0)
    rows = []
    start = time.time()

    def record(name, fn):
        t0 = time.time()
        if budget_s is not None and t0 - start > budget_s:
            rows.append(dict(case=name, ran=False, error="skipped: time budget spent"))
            print(f"[workload] {rows[-1]}", flush=True)
            return
        try:
            extra = fn()
            rows.append(dict(case=name, ran=True, wall_s=round(time.time() - t0, 2), **(extra or {})))
        except Exception as e:  # keep going: the sanitizer verdict covers what ran
            rows.append(dict(case=name, ran=False, error=f"{type(e).__name__}: {e}"[:400]))
        print(f"[workload] {rows[-1]}", flush=True)
        with open(os.path.join(out_dir, "sanitize_workload.json"), "w") as fh:
            json.dump(rows, fh, indent=1)

    if "tpa" in which:
        for name, c in _tpa_cases():
            record(name, lambda c=c: run_tpa_case(c))
        record("tpa attention middle, non-contiguous q/k/v", run_tpa_middle_noncontiguous)
    if "sink" in which:
        tk = _op("sink_attention.triton")
        ops = _op("sink_attention")
        alibi_mod = _op("sink_attention.alibi")
        for name, c, cfg in _sink_cases(tk):
            if DEV == "cpu" and cfg is None and not c.get("window"):
                continue  # autotuning is GPU-only
            record(name, lambda c=c, cfg=cfg: run_sink_case(tk, ops, alibi_mod, c, cfg))
    if "normuon" in which:
        for name, c in _normuon_cases():
            if DEV == "cpu" and max(c["shape"][1:]) > 256:
                continue  # the interpreter: small shapes only
            record(name, lambda c=c: run_normuon_case(c))
        record("NorMuon step, mixed banks", run_normuon_step)
    return rows


def planted(n=1000):
    """A Triton store one element past the end of an ``n``-element tensor (no mask)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _oob_store(X, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(X + n + i * 0, 1.0, mask=i == 0)  # writes X[n]: out of bounds

    x = torch.zeros(n, device="cuda")
    _oob_store[(1,)](x, n, BLOCK=32)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- driver


def find_sanitizer():
    cands = [shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
             "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    for root in ("/usr/local", "/opt/nvidia", "/opt"):
        if os.path.isdir(root):
            for dirpath, _dirs, files in os.walk(root):
                if "compute-sanitizer" in files:
                    cands.append(os.path.join(dirpath, "compute-sanitizer"))
                if dirpath.count(os.sep) > 5:
                    _dirs[:] = []
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def run_under(san, tool, args, out_dir, tag, timeout):
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    log = os.path.join(out_dir, f"sanitizer_{tag}_{tool}.log")
    cmd = [san, "--tool", tool, "--padding", "512", "--error-exitcode", "3", "--print-limit", "200",
           "--log-file", log, sys.executable, os.path.abspath(__file__), *args]
    if tool != "memcheck":
        cmd.remove("--padding")
        cmd.remove("512")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-500:]
    text = open(log).read() if os.path.exists(log) else ""
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    shown = cmd[:-(len(args) + 2)] + ["python", "scripts/sanitize_kernels.py", *args]
    return dict(tool=tool, command=" ".join(shown),
                returncode=rc, errors=int(m.group(1)) if m else None, wall_s=round(time.time() - t0, 1),
                first_errors=re.findall(r"=+ (Invalid .*|Uninitialized .*|.*out of bounds.*)", text)[:10],
                output_tail=tail[-1500:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tools", default="memcheck", help="comma list of compute-sanitizer tools")
    ap.add_argument("--families", default="tpa,sink,normuon")
    ap.add_argument("--workload", action="store_true", help="run the cases (inside the sanitizer)")
    ap.add_argument("--planted", action="store_true", help="run the planted out-of-bounds store")
    ap.add_argument("--timeout", type=int, default=330, help="seconds for the sanitized workload")
    ap.add_argument("--budget-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run-cpu", action="store_true", help="the workload on CPU under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.dry_run_cpu:
        global DEV
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        rows = workload(a.out, a.families.split(","))
        return 0 if all(r["ran"] for r in rows) else 4
    if a.planted:
        planted()
        return 0
    if a.workload:
        rows = workload(a.out, a.families.split(","), a.budget_s)
        return 0 if all(r["ran"] for r in rows) else 4
    import torch
    import triton

    san = find_sanitizer()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               sanitizer=san, env="PYTORCH_NO_CUDA_MEMORY_CACHING=1", runs=[])
    if san is None:
        res["error"] = "compute-sanitizer not found"
        print(res)
        return 2
    res["sanitizer_version"] = subprocess.run([san, "--version"], capture_output=True, text=True).stdout.strip()[-200:]
    path = os.path.join(a.out, "sanitize_kernels.json")
    t0 = time.time()
    for tool in a.tools.split(","):
        ctl = run_under(san, tool, ["--planted", "--out", a.out], a.out, "planted", 120)
        ctl["kind"] = "planted out-of-bounds store (must be reported)"
        ctl["detected"] = bool(ctl["errors"]) if tool == "memcheck" else None
        res["runs"].append(ctl)
        print(f"[sanitize {time.time() - t0:6.1f}s] planted/{tool}: errors={ctl['errors']} rc={ctl['returncode']}",
              flush=True)
        left = max(60, a.timeout - (time.time() - t0))
        # the workload stops starting cases 45 s before the deadline, so it exits normally and the
        # sanitizer prints its ERROR SUMMARY (a killed run leaves an inconclusive log)
        args = ["--workload", "--out", a.out, "--families", a.families, "--budget-s", str(max(15, left - 45))]
        run = run_under(san, tool, args, a.out, "workload", left)
        run["kind"] = "workload"
        wl = os.path.join(a.out, "sanitize_workload.json")
        run["cases"] = json.load(open(wl)) if os.path.exists(wl) else []
        run["clean"] = run["errors"] == 0 and run["returncode"] == 0 and all(c["ran"] for c in run["cases"])
        res["runs"].append(run)
        print(f"[sanitize {time.time() - t0:6.1f}s] workload/{tool}: errors={run['errors']} rc={run['returncode']} "
              f"cases ran {sum(c['ran'] for c in run['cases'])}/{len(run['cases'])}", flush=True)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
    res["wall_s"] = round(time.time() - t0, 1)
    res["all_clean"] = all(r.get("clean", True) for r in res["runs"] if r["kind"] == "workload")
    res["control_detected"] = all(r["detected"] for r in res["runs"] if r.get("detected") is not None)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    return 0 if res["all_clean"] and res["control_detected"] else 1


if __name__ == "__main__":
    sys.exit(main())
