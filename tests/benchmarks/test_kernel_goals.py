"""benchmarks/_kernel_goals.py: the kernel-goal record the benchmark scripts share (merged per
device, written atomically, verdicts from the numbers present) and the rows it reads them from."""

import json

import pytest

from tests.benchmarks._load import load_benchmark



_load = load_benchmark


def test_update_merges_per_device_and_judges_each_goal(tmp_path):
    pytest.importorskip("matplotlib")
    kg = _load("_kernel_goals")
    rec = kg.update(str(tmp_path), "GPU A", {"global_fwd_bwd_us": 3000.0, "sdpa_default_fwd_bwd_us": 2000.0},
                    script="benchmarks/attention.py")
    assert rec["goals"] == {"global_le_sdpa": {"ratio": 1.5, "met": False}}
    rec = kg.update(str(tmp_path), "GPU A", {"tpa_fwd_bwd_us": 300.0}, script="benchmarks/attention.py")
    assert rec["global_fwd_bwd_us"] == 3000.0 and rec["goals"]["tpa_le_350us"]["met"]
    rec = kg.update(str(tmp_path), "GPU A", {"normuon_step_ms": 7.0, "normuon_floor_ms": 3.0},
                    script="benchmarks/optimizer.py")
    assert rec["goals"]["normuon_le_2x_floor"] == {"ratio": 7.0 / 3.0, "goal": 2.0, "met": False}
    on_disk = json.loads((tmp_path / "kernel_goals.json").read_text())
    assert on_disk == rec and set(on_disk["runs"]) == {"benchmarks/attention.py", "benchmarks/optimizer.py"}
    assert (tmp_path / "kernel_goals.png").stat().st_size > 0
    assert not list(tmp_path.glob(".kernel_goals.*"))  # no temporary file left
    assert (tmp_path / "kernel_goals.json").stat().st_mode & 0o044  # readable as a plain open() file is
    # another device's numbers are not mixed with these: the record starts over
    rec = kg.update(str(tmp_path), "GPU B", {"tpa_fwd_bwd_us": 400.0}, script="benchmarks/attention.py")
    assert "global_fwd_bwd_us" not in rec and rec["goals"] == {"tpa_le_350us": {
        "value_us": 400.0, "goal_us": 350.0, "met": False}}


def test_attention_rows_give_the_goal_numbers_global_and_sdpa_only_together():
    att = _load("attention")
    rows = [{"name": "ours: causal+ALiBi+sink (Triton)", "fwd_bwd_us": 3100.0, "fwd_bwd_us_graph": 3000.0},
            {"name": "SDPA causal default (enable_gqa), no bias/sink", "fwd_bwd_us": 2100.0},
            {"name": "(a) ours: fused TPA op from factors", "fwd_bwd_us": 1900.0, "fwd_bwd_us_graph": 850.0}]
    assert att.kernel_goal_values(rows) == {"global_fwd_bwd_us": 3000.0, "sdpa_default_fwd_bwd_us": 2100.0,
                                            "tpa_fwd_bwd_us": 850.0}
    # without the SDPA row of the same run, the global number is not recorded
    assert att.kernel_goal_values([rows[0], rows[2]]) == {"tpa_fwd_bwd_us": 850.0}
