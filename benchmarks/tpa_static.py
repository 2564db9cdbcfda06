"""Resource report of the attention Triton kernels for sm_90a, computed on a machine without a GPU.

Usage (any machine with Triton and its bundled CUDA tools; no GPU needed)::

    python benchmarks/tpa_static.py [--json benchmarks/results/tpa_static_triton36.json]

To compile with the GPU machine's Triton (3.6) on a machine whose venv has another one::

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/t36/lib/python3.11/site-packages/zz_venv.pth
    /tmp/t36/bin/python benchmarks/tpa_static.py

(the ``.pth`` line appends the project venv's packages, torch included, after Triton 3.6).

Compiles each kernel of :mod:`vpmoe_compile.ops.tpa_attention.triton` at the vpMoE shape (H=8, G=2,
d=128, Rq=4, R=2, bf16), at its defaults and at the tile candidates of ``benchmarks/tpa.py --tune``,
and each autotune configuration of the global layers' kernels
(:mod:`vpmoe_compile.ops.sink_attention.triton`, causal + ALiBi, 4 heads packed), for ``cuda:90``
with ``triton.compile`` and prints, per kernel and tile choice: registers per thread, local-memory spill stores/loads and ``BAR.SYNC`` count in the SASS
(``cuobjdump``), ``convert_layout`` count in the TTGIR, 128-bit global loads and the tile layouts.
This is how ``benchmarks/results/tpa_notes.md`` traced the old prologue backward's 455 barriers to
its scalar (unaligned) loads. The installed Triton may differ from the GPU machine's.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before tpa_attention.triton defines its kernels
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks._ops_import import import_op_module  # noqa: E402

BF16 = ("F_ptr", "DF_ptr", "DQ_ptr", "DK_ptr", "DV_ptr", "BIAS_ptr", "GQ_ptr", "GK_ptr", "Q_ptr", "K_ptr",
        "V_ptr", "O_ptr", "DO_ptr", "SINK_ptr",
        "Q", "K", "V", "O", "O_LO", "DO", "DQ", "DK", "DV", "SINK")  # the global kernels' names
FP32 = ("RSQ_ptr", "RSK_ptr", "COS_ptr", "SIN_ptr", "PART_ptr", "CS_ptr", "L_ptr", "DLSE_ptr", "DELTA_ptr",
        "DSINK_part", "SLOPES", "LSE", "DLSE", "DELTA", "PSINK")
SCALARS = dict(eps="fp32", qk_scale="fp32", sm_scale="fp32")


def compile_sm90(kern, constexprs, num_warps, num_stages=2):
    """``triton.compile`` of a ``@triton.jit`` kernel for sm_90a; pointers are 16-byte aligned."""
    names = list(inspect.signature(kern.fn).parameters)
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in BF16:
            sig[n] = "*bf16"
        elif n in FP32:
            sig[n] = "*fp32"
        else:
            sig[n] = SCALARS.get(n, "i32")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn=kern, signature=sig, constexprs={k: v for k, v in constexprs.items() if k in names},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def report(compiled):
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", res)
    ttgir = compiled.asm["ttgir"]
    return dict(
        registers=int(regs.group(1)) if regs else None, shared_bytes=compiled.metadata.shared,
        spill_stores=len(re.findall(r"\bSTL", sass)), spill_loads=len(re.findall(r"\bLDL", sass)),
        bar_sync=len(re.findall(r"\bBAR\.SYNC", sass)), convert_layout=ttgir.count("ttg.convert_layout"),
        ldg128=len(re.findall(r"LDG\.E\.128", sass)), hgmma=len(re.findall(r"\bHGMMA", sass)),
        hmma=len(re.findall(r"\bHMMA", sass)), sass_lines=sass.count("\n"),
        layouts=[ln.split("=", 1)[1].strip() for ln in ttgir.splitlines() if ln.startswith("#blocked")],
    )


def _attention_jobs(tk, att):
    """The attention tile candidates of ``benchmarks/tpa.py --tune`` (forward, dq with ``delta``
    from ``O`` as at ``W = 128``, dk/dv), each marked ``(default)`` where it is ``GPU_TILES``'."""
    from benchmarks.tpa import ATTN_DKV, ATTN_DQ, ATTN_FWD, _tile_name

    from vpmoe_compile._triton import default_pack

    jobs = []
    for kind, kern, cands, extra in (("swa_fwd", tk._swa_fwd_kernel, ATTN_FWD, {}),
                                     ("swa_bwd_dq", tk._swa_bwd_dq_kernel, ATTN_DQ,
                                      dict(RECOMPUTE_DELTA=False, HAS_DLSE=False)),
                                     ("swa_bwd_dkv", tk._swa_bwd_dkv_kernel, ATTN_DKV, {})):
        for t in cands:
            get = {k.split("_")[0]: v for k, v in t.items()}  # BM, BN, WARPS, STAGES, PACK
            pack = default_pack(att["H"] // att["G"], get["BM"]) if get.get("PACK") else 1
            default = all(tk.GPU_TILES[k] == v for k, v in t.items())
            jobs.append((f"{kind} {_tile_name(t)}" + (" (default)" if default else ""), kern,
                         dict(att, BM=get["BM"], BN=get["BN"], PACK=pack, **extra), get["WARPS"],
                         get["STAGES"]))
    return jobs


def _global_jobs():
    """Every autotune configuration of the global (full-causal, ALiBi, sink) kernels at the vpMoE
    shape: 4 query heads per KV group packed, ``LPT`` grid, 16-bit output without residual."""
    sk = import_op_module("sink_attention.triton")
    base = dict(HPG=4, PACK=4, HEAD_DIM=128, HAS_ALIBI=True, IEEE=False, LPT=True)
    jobs = []
    for kind, kern, cfgs, extra in (("global_fwd", sk._sink_attn_fwd_kernel, sk._FWD_CONFIGS, dict(STORE_LO=False)),
                                    ("global_dq", sk._sink_attn_bwd_dq_kernel, sk._DQ_CONFIGS,
                                     dict(HAS_DLSE=False, HAS_LO=False)),
                                    ("global_dkv", sk._sink_attn_bwd_dkv_kernel, sk._DKV_CONFIGS, {})):
        for c in cfgs:
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            jobs.append((f"{kind} {m}x{n}_w{c.num_warps}_s{c.num_stages}", kern, dict(base, **extra, **c.kwargs),
                         c.num_warps, c.num_stages))
    return jobs


def main():
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows (without layouts) to this JSON file")
    ap.add_argument("--family", choices=("tpa", "global", "all"), default="all",
                    help="the TPA op's kernels, the global layers' autotune configurations, or both")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    tk = import_op_module("tpa_attention.triton")
    shape = dict(H=8, G=2, D=128)
    pro = dict(shape, P=64, RQ=4, RK=2, FW=1064, HAS_BIAS=True, NORM_Q=True, NORM_K=True, sF_f=1)
    att = dict(shape, BM=64, BN=64, IEEE=False, PACK=1)
    jobs = [
        ("prologue_bwd BT4 w1 (default)", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=8), 1),
        ("prologue_bwd BT4 w1 unaligned", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=1), 1),
        ("prologue_bwd BT8 w2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=8, BPP=1, ALIGN=8), 2),
        ("prologue_bwd BT4 w1 BPP2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=2, ALIGN=8), 1),
        ("prologue_bwd BT2 w1", tk._tpa_prologue_bwd_kernel, dict(pro, BT=2, BPP=1, ALIGN=8), 1),
        ("prologue_bwd BT4 w2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=8), 2),
        ("prologue_fwd BT8 w4 (default)", tk._tpa_prologue_fwd_kernel, dict(pro, BT=8, ALIGN=8), 4),
        ("swa_bwd_dq 64x64 w4 recompute delta", tk._swa_bwd_dq_kernel,
         dict(att, RECOMPUTE_DELTA=True, HAS_DLSE=False), 4),
        ("swa_bwd_dq 64x64 w4 recompute + dLSE", tk._swa_bwd_dq_kernel,
         dict(att, RECOMPUTE_DELTA=True, HAS_DLSE=True), 4),
    ] + _attention_jobs(tk, att)
    jobs = ([] if args.family == "global" else jobs) + (_global_jobs() if args.family != "tpa" else [])
    print(f"triton {triton.__version__}, target cuda:90")
    rows = {}
    for name, kern, ce, warps, *stages in jobs:
        r = report(compile_sm90(kern, ce, warps, *stages))
        lay = r.pop("layouts")
        rows[name] = r
        print(f"{name:38s} " + " ".join(f"{k}={v}" for k, v in r.items()))
        for ln in lay:
            print(f"{'':40s}{ln}")
    if args.json:
        out = dict(command=f"python benchmarks/tpa_static.py --family {args.family} --json {args.json}",
                   triton=triton.__version__,
                   target="cuda:90 (sm_90a), ahead of time, no GPU",
                   shape=dict(H=8, G=2, d=128, Rq=4, R=2, dtype="bf16", global_layers="causal + ALiBi + sink"),
                   kernels=rows)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
