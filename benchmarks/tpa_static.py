"""Resource report of the TPA Triton kernels for sm_90a, computed on a machine without a GPU.

Usage (any machine with Triton and its bundled CUDA tools; no GPU needed)::

    python benchmarks/tpa_static.py

Compiles each kernel of :mod:`vpmoe_compile.ops.tpa_attention.triton` at the vpMoE shape (H=8, G=2,
d=128, Rq=4, R=2, bf16) for ``cuda:90`` with ``triton.compile`` and prints, per kernel and tile
choice: registers per thread, local-memory spill stores/loads and ``BAR.SYNC`` count in the SASS
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
        "V_ptr", "O_ptr", "DO_ptr", "SINK_ptr")
FP32 = ("RSQ_ptr", "RSK_ptr", "COS_ptr", "SIN_ptr", "PART_ptr", "CS_ptr", "L_ptr", "DLSE_ptr", "DELTA_ptr",
        "DSINK_part")
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
        registers=int(regs.group(1)) if regs else None,
        spill_stores=len(re.findall(r"\bSTL", sass)), spill_loads=len(re.findall(r"\bLDL", sass)),
        bar_sync=len(re.findall(r"\bBAR\.SYNC", sass)), convert_layout=ttgir.count("ttg.convert_layout"),
        ldg128=len(re.findall(r"LDG\.E\.128", sass)), sass_lines=sass.count("\n"),
        layouts=[ln.split("=", 1)[1].strip() for ln in ttgir.splitlines() if ln.startswith("#blocked")],
    )


def main():
    warnings.filterwarnings("ignore")
    tk = import_op_module("tpa_attention.triton")
    shape = dict(H=8, G=2, D=128)
    pro = dict(shape, P=64, RQ=4, RK=2, FW=1064, HAS_BIAS=True, NORM_Q=True, NORM_K=True, sF_f=1)
    att = dict(shape, BM=64, BN=64, IEEE=False)
    jobs = [
        ("prologue_bwd BT4 w1 (default)", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=8), 1),
        ("prologue_bwd BT4 w1 unaligned", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=1), 1),
        ("prologue_bwd BT8 w2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=8, BPP=1, ALIGN=8), 2),
        ("prologue_bwd BT4 w1 BPP2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=2, ALIGN=8), 1),
        ("prologue_bwd BT2 w1", tk._tpa_prologue_bwd_kernel, dict(pro, BT=2, BPP=1, ALIGN=8), 1),
        ("prologue_bwd BT4 w2", tk._tpa_prologue_bwd_kernel, dict(pro, BT=4, BPP=1, ALIGN=8), 2),
        ("prologue_fwd BT8 w4 (default)", tk._tpa_prologue_fwd_kernel, dict(pro, BT=8, ALIGN=8), 4),
        ("swa_fwd 64x64 w4", tk._swa_fwd_kernel, att, 4),
        ("swa_bwd_dq 64x64 w4 recompute delta", tk._swa_bwd_dq_kernel,
         dict(att, RECOMPUTE_DELTA=True, HAS_DLSE=False), 4),
        ("swa_bwd_dq 64x64 w4 delta from O", tk._swa_bwd_dq_kernel, dict(att, RECOMPUTE_DELTA=False, HAS_DLSE=False), 4),
        ("swa_bwd_dq 64x64 w4 recompute + dLSE", tk._swa_bwd_dq_kernel,
         dict(att, RECOMPUTE_DELTA=True, HAS_DLSE=True), 4),
        ("swa_bwd_dkv 64x64 w4", tk._swa_bwd_dkv_kernel, att, 4),
    ]
    print(f"triton {triton.__version__}, target cuda:90")
    for name, kern, ce, warps in jobs:
        r = report(compile_sm90(kern, ce, warps))
        lay = r.pop("layouts")
        print(f"{name:38s} " + " ".join(f"{k}={v}" for k, v in r.items()))
        for ln in lay:
            print(f"{'':40s}{ln}")


if __name__ == "__main__":
    main()
