"""Run a compile-for-sm_90 script in a subprocess (the ahead-of-time kernel checks on a machine
without a GPU). The test session's kernels are Triton-interpreter functions
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), which cannot be compiled, so the script runs
in a fresh interpreter without it; it prints its result as JSON on its last line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_sm90_script(script: str, tmp_path) -> object:
    """The JSON value of ``script``'s last output line; skips the test when this Triton has no
    CUDA tools (``ptxas`` / ``cuobjdump``) to compile with."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "cuobjdump" in proc.stderr) and \
            "not found" in proc.stderr.lower():
        pytest.skip("this Triton has no CUDA tools to compile for sm_90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
