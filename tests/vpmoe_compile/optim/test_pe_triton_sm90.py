"""The fused NorMuon kernels compiled ahead of time for an H100 (sm_90) on a machine without a
GPU: the one-kernel bank step at its default launch configuration (``pe_triton.LAUNCH_128``,
``L2_HINTS``), in the Gram form with per-row and per-column statistics and in the standard
form (and the Gram form's launch of several banks through the address table), must fit the
H100's shared memory per block. A configuration over the limit fails at its
first launch on the GPU with ``OutOfResources`` (the Gram form's first bank kernel did: 256 KiB;
this compile reports the same number for it), so this catches it on the CPU. (Each compile takes 5-10 s on
two cores; the Polar Express-only kernels, which hold less, are left out.)

The compile runs in a subprocess (:func:`tests._sm90.run_sm90_script`)."""

from tests._sm90 import run_sm90_script

#: The H100's largest shared memory per block (227 KiB, opt-in; Triton's ``OutOfResources`` limit).
H100_SHARED_BYTES = 232448

_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vpmoe_compile.optim import pe_triton as pt

def compile_shared(kernel, pointers, scalars, constexprs, launch):
    block_l, num_warps, num_stages = launch
    constexprs = dict(constexprs, BS=128, BL=block_l)
    names = kernel.arg_names
    sig, const = {}, {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
            const[(names.index(n),)] = constexprs[n]
        else:
            sig[n] = pointers.get(n) or scalars[n]
    src = ASTSource(fn=kernel, signature=sig, constexprs=const)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=num_warps, num_stages=num_stages))
    return out.metadata.shared

out = {}
for form, stat, table in (("standard", 1, False), ("gram", 1, False), ("gram", 2, False),
                         ("gram", 1, True)):
    gram = form == "gram"
    kind = "bank_gram" if gram else "bank"
    out[f"bank_{form}_stat{stat}" + ("_table" if table else "")] = compile_shared(
        pt._normuon_bank_kernel,
        dict(G="*fp32", GP="*i64", M="*fp32", V="*fp32", W="*fp32", X="*bf16", COEF="*fp32",
             MU="*fp32", LR="*fp32", DECAY="*fp32", BETA2="*fp32", EPS="*fp32"),
        dict(S="i32", L="i32", SI="i32", SL="i32", safety="fp32", pe_eps="fp32", scale="fp32",
             NT="i32"),
        dict(T=5, STAT=stat, SHAPE_MODE=True, HAS_W=True, G_PTRS=False, GRAM=gram,
             RESTART=pt.GRAM_RESTART, GRAM_STATS=gram and stat == 1, IEEE=False,
             EV_ONCE="evict_first" if pt.L2_HINTS[kind] else "",
             EV_WORK="evict_last" if pt.L2_HINTS[kind] else "",
             F16=gram and pt.GRAM_F16, EVEN=True, SLOT_X=True,
             KEEP_X0=gram and pt.KEEP_X0, TABLE=table),
        pt.LAUNCH_128[kind])
print(json.dumps(out))
"""


def test_default_launches_fit_h100_shared_memory(tmp_path):
    shared = run_sm90_script(_SCRIPT, tmp_path)
    assert len(shared) == 4
    over = {k: v for k, v in shared.items() if not 0 < v <= H100_SHARED_BYTES}
    assert not over, f"over the H100's {H100_SHARED_BYTES} bytes of shared memory: {over}"
