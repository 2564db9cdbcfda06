"""Smoke test of the GPU benchmark scripts on the CPU: ``benchmarks/step.py`` and
``benchmarks/train_parity.py`` run in-process at tiny size with the smallest counts (plain path,
``aot_eager`` for the compiled variant, profiler and per-part breakdown included) and write JSON
with the keys the GPU runs are read by."""

import json

import pytest
import torch

from tests.benchmarks._load import load_benchmark


# 2 CPU cores: ~17 s + ~8 s when the machine is quiet, up to ~45 s + ~15 s under load
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test (a visible GPU makes the CPU model refuse)"),
]


_load = load_benchmark


def test_step_benchmark_smoke(tmp_path, megatron_env):
    step = _load("step")
    small = ["--warmup", "1", "--micro-steps", "1", "--accum", "2", "--accum-steps", "1",
             "--stock-warmup", "1", "--stock-micro-steps", "1", "--stock-accum-steps", "1",
             "--parts-reps", "1", "--parts-warmup", "1", "--num-batches", "2"]
    rc = step.main(["--device", "cpu", "--path", "plain", "--config", "tiny", "--seq-len", "32", "--micro-batch", "1",
                    "--compile-backend", "aot_eager", "--out", str(tmp_path), *small])
    assert rc == 0
    data = json.loads((tmp_path / "step.json").read_text())
    assert (tmp_path / "step.png").stat().st_size > 0
    meta = data["meta"]
    for key in ("device", "torch", "command", "date", "flop_count", "goals"):
        assert key in meta
    assert [g["id"] for g in meta["goals"]] == [g[0] for g in step.GOALS]
    results = data["results"]
    assert [r["variant"] for r in results] == list(step.VARIANTS)
    for r in results:
        assert "error" not in r, r.get("traceback")
        for key in ("mfu", "accumulated_mfu", "fwd_bwd_ms", "finalize_optimizer_ms", "micro_step_ms",
                    "accumulated_step_ms", "tokens_per_s", "speedup_vs_stock_eager", "speedup_vs_transformed_eager"):
            assert r[key] is not None, key
        assert r["mfu"] > 0 and r["accumulated_mfu"] > 0
        assert r["profile"]["kernels_per_step"] > 0 and len(r["profile"]["top_kernels"]) > 0
        parts = r["breakdown"]["parts"]
        assert set(parts) == set(step.PARTS)
        assert all("error" not in p for p in parts.values()), parts
    assert results[0]["speedup_vs_stock_eager"]["fwd_bwd"] == pytest.approx(1.0)
    assert results[2]["breakdown"]["parts"]["attention_local"]["mode"] == "compiled"
    assert results[2]["compiled_regions"][0] == "decoder.layers.0"
    fork = results[3]  # value residual + linear biases on: their cost against transformed_compiled
    assert fork["variant"] == "fork_compiled" and fork["speedup_vs_fork_base"]["fwd_bwd"] > 0
    assert "value_residual" in fork["passes"] and "linear_bias" in fork["passes"]


def test_train_parity_smoke(tmp_path, megatron_env):
    parity = _load("train_parity")
    rc = parity.main(["--device", "cpu", "--config", "tiny", "--seq-len", "32", "--steps", "2",
                      "--compile-backend", "aot_eager", "--yardstick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_parity.json").read_text())
    assert (tmp_path / "train_parity.png").stat().st_size > 0
    assert data["meta"]["path"] == "plain"
    for mode in ("eager", "compiled"):
        assert "error" not in data[mode], data[mode].get("traceback")
        assert len(data[mode]["losses"]) == 2
    c = data["comparison"]
    assert c["rule"] == parity.RULE and c["same_initial_weights"] is True
    assert c["within_bf16_tolerance"] is True and rc == 0
    assert len(c["abs_diff"]) == 2 and c["max_rel_diff"] < 1e-4  # fp32 + aot_eager: same math
    y = data["yardstick"]  # the third run starts from other weights (1 ulp apart on 1 % of elements)
    assert data["eager_1ulp"]["perturbed_elements"] > 0 and len(data["eager_1ulp"]["losses"]) == 2
    assert y["initial_weights_differ"] is True and isinstance(y["compiled_within_2x"], bool)
