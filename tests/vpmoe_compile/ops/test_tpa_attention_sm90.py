"""The TPA prologue backward compiled ahead of time for an H100 (sm_90) on a machine without a GPU
(``benchmarks/tpa_static.py``'s compile and report): its low-register form
(``GPU_TILES["LOWREG_BWD"]``, docs/design.md#tpa-attention) must spill nothing and hold few enough
registers per thread for more resident warps per SM than the default form, at the default tile
(4 tokens, one warp): the point of that form. (Two compiles, about 10 s on two cores.)

The compile runs in a subprocess (:func:`tests._sm90.run_sm90_script`)."""

from tests._sm90 import run_sm90_script

_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
from benchmarks import tpa_static as ts
tk = ts.import_op_module("tpa_attention.triton")
pro = dict(H=8, G=2, D=128, P=64, RQ=4, RK=2, FW=1064, HAS_BIAS=True, NORM_Q=True, NORM_K=True, sF_f=1,
           BT=tk.GPU_TILES["BT_BWD"], BPP=1, ALIGN=8)
out = {}
for low in (False, True):
    r = ts.report(ts.compile_sm90(tk._tpa_prologue_bwd_kernel, dict(pro, LOWREG=low), tk.GPU_TILES["WARPS_BWD"]))
    out["low" if low else "default"] = {k: r[k] for k in ("registers", "spill_stores", "spill_loads")}
print(json.dumps(out))
"""


def test_low_register_prologue_backward_holds_fewer_registers_and_spills_nothing(tmp_path):
    res = run_sm90_script(_SCRIPT, tmp_path)
    low, default = res["low"], res["default"]
    assert low["registers"] is not None and default["registers"] is not None, res
    assert low["spill_stores"] == 0 and low["spill_loads"] == 0, res
    # what the form is for: more resident warps per SM (a 64K-register file, registers allocated
    # per thread in steps of 8; one warp per program at the default tile)
    warps = {k: 65536 // (32 * -(-v["registers"] // 8) * 8) for k, v in res.items()}
    assert warps["low"] > warps["default"], (warps, res)
