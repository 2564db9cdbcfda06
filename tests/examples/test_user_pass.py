"""examples/user_pass.py: a user's pass joins the default pipeline, gets a dump page, and a
checkpoint replays it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_user_pass_example(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # the test process's own world
        env.pop(k, None)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "user_pass.py"), "--dump-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local_norm_eps     3 local-layer input norms with eps 0.0001" in out.stdout
    restored = out.stdout.split("restored passes:", 1)[1]
    assert "local_norm_eps" in restored and restored.index("local_norm_eps") > restored.index("grape")
    assert (tmp_path / "d" / "07-local_norm_eps.md").is_file()
