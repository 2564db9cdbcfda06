"""``benchmarks/normuon_bank.py`` on the CPU (``--small``, the kernels under ``TRITON_INTERPRET=1``
in fp32; the per-SM workspace variants need a GPU and are left out): every variant runs, its
one-step update agrees with the fp64 reference, the layers' banks launched together through the
address table give the same step bitwise, and the JSON and the figure are written."""

import json

from tests.benchmarks._load import load_benchmark


def test_normuon_bank_small_cpu_run(tmp_path):
    mod = load_benchmark("normuon_bank")
    mod.main(["--small", "--device", "cpu", "--reps", "1", "--check", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "normuon_bank.json").read_text())
    for orient in ("wide", "tall"):
        got = res["variants"][orient]
        assert set(got) == {k for k, v in mod.variants().items() if not v["slot"]}
        for name, entry in got.items():
            assert "error" not in entry and entry["finite"], (orient, name)
            # fp32 kernels: the TF32-free fp32 state is exact, the fp16 state within its 10 bits
            bound = 1e-4 if name == "tf32" else 2e-2
            assert max(entry["rel_err_vs_fp64"]) < bound, (orient, name, entry["rel_err_vs_fp64"])
            assert entry["one_launch"]["median_ms"] > 0 and entry["per_layer"]["median_ms"] > 0
            assert entry["table_launch"]["median_ms"] > 0 and entry["table_bitwise_equal"], (orient, name)
    assert (tmp_path / "normuon_bank.png").stat().st_size > 0
