"""The one-kernel NorMuon bank step on the vpMoE expert stacks: kernel variants in one run.

Question: which form of ``pe_triton._normuon_bank_kernel`` runs the expert banks of the vpMoE-8L
step fastest, and at what accuracy? The step holds 7 MoE layers x 2 stacks of 256 experts
(``[128, 1024]`` wide, ``[1024, 128]`` tall); this script times the kernel on the same matrices

* as one launch over all 1792 members of a shape (``--members``), and
* as the step issues it: 7 launches of 256 members, one per layer (``x7``), and
* as ``NorMuon(merge_launches=True)`` issues it: the 7 layers' banks in one launch through a
  table of member addresses (:func:`~vpmoe_compile.optim.pe_triton.normuon_banks_fused_`),

for each variant (keyword arguments of :func:`vpmoe_compile.optim.pe_triton.normuon_bank_fused_`):

* ``tf32``: the Gram-space products in TF32 (fp32 state), a workspace matrix per member;
* ``f16``: the Gram-space state in fp16 (``gram_f16=True``; the same 10-bit significand as TF32
  operands, at the half-precision matrix rate, half the registers);
* ``*_keep``: the restart sweep stores nothing; the later sweeps form the restarted tiles again
  (``keep_x0=True``, one bf16 store per element less);
* ``*_slot``: the workspace is one matrix per SM (``pe_triton.sm_workspace``), reused by every
  member the SM runs, so it can stay in L2 instead of streaming ``N`` fresh matrices through it.

Accuracy: the first members' updates against the float64 reference of
``optim/reference.py`` (relative Frobenius error of ``W_new - W``), per variant.

Usage: ``python benchmarks/normuon_bank.py --out OUT`` (GPU; writes ``normuon_bank.json`` and
``.png``); ``--variants a,b`` for a subset; ``--small --device cpu`` is a smoke run under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.optimizer import rel, time_fn  # noqa: E402
from vpmoe_compile.optim import pe_triton  # noqa: E402
from vpmoe_compile.optim.polar_express import PINNED_COEFFICIENTS  # noqa: E402
from vpmoe_compile.optim.reference import normuon_reference_update  # noqa: E402

LR, WD, MU, BETA2, EPS = 3e-3, 0.01, 0.95, 0.95, 1e-10


def variants() -> Dict[str, Dict]:
    """Name -> keyword arguments of ``normuon_bank_fused_``; ``slot``: the per-SM workspace
    (``pe_triton.sm_workspace``) instead of one matrix per member."""
    return {
        "tf32": dict(gram_f16=False, keep_x0=False, slot=False),
        "f16": dict(gram_f16=True, keep_x0=False, slot=False),
        "f16_keep": dict(gram_f16=True, keep_x0=True, slot=False),
        "f16_slot": dict(gram_f16=True, keep_x0=False, slot=True),
        "f16_slot_keep": dict(gram_f16=True, keep_x0=True, slot=True),
    }


#: plot labels (the JSON keeps the variant names); the first run's variants included
LABELS = {
    "tf32": "TF32 Gram products",
    "f16": "fp16 Gram state",
    "f16_keep": "fp16, restart\nstores nothing",
    "f16_slot": "fp16, one\nworkspace per SM",
    "f16_slot_keep": "fp16, per SM,\nrestart stores nothing",
    "head": "before: 64-bit offsets,\nmasks, TF32",
    "tf32_persist": "TF32, persistent",
    "f16_persist": "fp16, persistent",
    "f16_skew20": "fp16, persistent,\nstaggered 20 us",
    "f16_skew40": "fp16, persistent,\nstaggered 40 us",
    "f16_skew80": "fp16, persistent,\nstaggered 80 us",
    "f16_bl32s4": "fp16, 32-wide tiles,\n4 stages",
    "f16_s2": "fp16, 2 stages",
}


def make_bank(N, m, n, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    G = (torch.randn(N, m, n, generator=g) * 1e-3).to(device)
    M = (torch.randn(N, m, n, generator=g) * 1e-3).to(device)
    W = (torch.randn(N, m, n, generator=g) * 0.02).to(device)
    return G, M, W


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (smoke run)")
    ap.add_argument("--members", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=7, help="launches of the per-layer timing")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=None, help="comma list (default: all)")
    ap.add_argument("--check", type=int, default=4, help="members checked against the fp64 reference")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    on_gpu = device.type == "cuda"
    S, L = (16, 64) if args.small else (128, 1024)
    N = 8 if args.small else args.members
    layers = 2 if args.small else args.layers
    per_layer = N // layers
    table = variants()
    if not on_gpu:  # the per-SM workspace needs %smid
        table = {k: v for k, v in table.items() if not v["slot"]}
    names = list(table) if not args.variants else args.variants.split(",")
    unknown = [v for v in names if v not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(table)}")
    hyper = {k: torch.tensor(v, device=device) for k, v in
             dict(momentum=MU, lr=LR, decay=1 - LR * WD, beta2=BETA2, eps=EPS).items()}
    res: Dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "sms": sms, "members": N, "per_layer": per_layer,
                 "layers": layers, "shape_wide": [S, L],
                 "command": "python benchmarks/normuon_bank.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {},
                 "bytes_per_member": 20 * S * L}
    stem = os.path.join(args.out, "normuon_bank")
    for flip in (False, True):
        orient = "tall" if flip else "wide"
        m, n = (L, S) if flip else (S, L)
        G, M0, W0 = make_bank(N, m, n, device, seed=1 + flip)
        stat_n = m  # per output neuron (rows of [out, in])
        shape_scale = math.sqrt(max(1.0, m / n))
        dt = torch.float32 if device.type != "cuda" else torch.bfloat16
        X = torch.empty(N, m, n, device=device, dtype=dt)
        Xs = pe_triton.sm_workspace((m, n), dt, device) if on_gpu else None
        # fp64 reference of the first members (one step from M0, W0, V = 0)
        refs = []
        for i in range(min(args.check, N)):
            W64 = W0[i].double().cpu().clone()
            normuon_reference_update(W64, G[i].double().cpu(), M0[i].double().cpu().clone(),
                                     torch.zeros(stat_n, 1, dtype=torch.float64), lr=LR, momentum=MU,
                                     beta2=BETA2, eps=EPS, weight_decay=WD, pe_eps=1e-6)
            refs.append(W64 - W0[i].double().cpu())
        for name in names:
            kw = dict(table[name])
            work = Xs if kw.pop("slot") else X
            M, W = M0.clone(), W0.clone()
            V = torch.zeros(N, stat_n, device=device)
            entry = {"kwargs": table[name]}

            def launch(lo, hi, M=M, W=W, V=V, work=work, kw=kw):
                pe_triton.normuon_bank_fused_(
                    G[lo:hi], M[lo:hi], V[lo:hi], W[lo:hi], work if work is Xs else work[lo:hi], hyper,
                    PINNED_COEFFICIENTS, 0.02, 1e-6, flip, -2 if flip else -1, "shape", shape_scale, 0.0,
                    form="gram", x_per_sm=work is Xs, **kw)

            try:
                launch(0, N)  # one step from the initial state: the accuracy check
                entry["rel_err_vs_fp64"] = [rel((W[i] - W0[i]).cpu(), refs[i]) for i in range(len(refs))]
                entry["finite"] = bool(torch.isfinite(W).all())
                first = W[:layers * per_layer].clone()
                t = time_fn(lambda: launch(0, N), device, reps=args.reps)
                entry["one_launch"] = {**t, "tb_s_at_20B": res["bytes_per_member"] * N / (t["median_ms"] * 1e-3) / 1e12}

                def per_layer_launches():
                    for k in range(layers):
                        launch(k * per_layer, (k + 1) * per_layer)

                entry["per_layer"] = time_fn(per_layer_launches, device, reps=args.reps)
                # the layers' banks through one address table (as merge_launches launches them)
                addr = torch.cat([pe_triton.member_addresses(
                    G[k * per_layer:(k + 1) * per_layer], M[k * per_layer:(k + 1) * per_layer],
                    V[k * per_layer:(k + 1) * per_layer], W[k * per_layer:(k + 1) * per_layer])
                    for k in range(layers)], dim=1).to(device)
                wt = work if work is Xs else work[:layers * per_layer]

                def table_launch(addr=addr, wt=wt, kw=kw):
                    pe_triton.normuon_banks_fused_(
                        addr, (m, n), wt, hyper, PINNED_COEFFICIENTS, 0.02, 1e-6, flip,
                        -2 if flip else -1, "shape", shape_scale, 0.0, form="gram",
                        x_per_sm=work is Xs, **kw)

                # the same step through the table from the same initial state: bitwise equal
                M.copy_(M0)
                W.copy_(W0)
                V.zero_()
                table_launch()
                entry["table_bitwise_equal"] = bool(torch.equal(W[:layers * per_layer], first))
                entry["table_launch"] = time_fn(table_launch, device, reps=args.reps)
            except Exception as e:  # a variant that fails must not end the run
                entry["error"] = f"{type(e).__name__}: {e}"[:400]
            res["variants"].setdefault(orient, {})[name] = entry
            print(orient, name, json.dumps({k: v for k, v in entry.items() if k != "kwargs"}), flush=True)
            with open(stem + ".json", "w") as f:
                json.dump(res, f, indent=2)
        del G, M0, W0, X
    plot(res, stem + ".png")
    print("wrote", stem + ".json", flush=True)


def plot(res: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    n = max(len(res["variants"].get(o, {})) for o in ("wide", "tall"))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * n + 2), 9), sharey=False)
    for ax, orient in zip(axes, ("wide", "tall")):
        vs = res["variants"].get(orient, {})
        names = [k for k, v in vs.items() if "one_launch" in v]
        one = [vs[k]["one_launch"]["median_ms"] for k in names]
        lay = [vs[k]["per_layer"]["median_ms"] for k in names]
        tab = [vs[k].get("table_launch", {}).get("median_ms", 0.0) for k in names]
        x = range(len(names))
        w = 0.27 if any(tab) else 0.4
        ax.bar([i - w for i in x] if any(tab) else [i - 0.2 for i in x], one, w,
               label=f"one launch, {res['members']} members")
        ax.bar([i for i in x] if any(tab) else [i + 0.2 for i in x], lay, w,
               label=f"{res['layers']} launches of {res['per_layer']}")
        if any(tab):
            ax.bar([i + w for i in x], tab, w,
                   label=f"the {res['layers']} banks in one launch (address table)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([LABELS.get(k, k) for k in names], fontsize=8)
        ax.set_ylabel("ms (median)")
        shape = res["shape_wide"] if orient == "wide" else res["shape_wide"][::-1]
        ax.set_title(f"NorMuon bank step, {res['members']} x {shape} "
                     f"({'per-row' if orient == 'wide' else 'per-column'} statistics)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['device']}: the one-kernel NorMuon bank step, kernel variants (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
