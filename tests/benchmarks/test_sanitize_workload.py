"""``scripts/sanitize_kernels.py``'s NorMuon workload, dry-run on the CPU (``--dry-run-cpu``: the
cases under ``TRITON_INTERPRET=1`` in fp32, small shapes, no sanitizer): every case runs and
ends finite, so the GPU run under ``compute-sanitizer`` exercises working code."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_normuon_workload_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        [sys.executable, "scripts/sanitize_kernels.py", "--dry-run-cpu", "--families", "normuon",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sanitize_workload.json").read_text())
    names = [r["case"] for r in rows]
    assert all(r["ran"] for r in rows), [r for r in rows if not r["ran"]]
    # both forms, the bank kernel and the PE kernel, and the whole step ran
    for part in ("bank gram", "bank standard", "banks standard", "pe gram", "pe standard", "NorMuon step"):
        assert any(n.startswith(part) for n in names), part
