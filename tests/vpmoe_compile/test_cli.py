"""The command line: params, dump, demo (incl. the one Inductor compile smoke test), bad args."""

import json
import math

import pytest

from vpmoe_compile.cli import main


def test_params_tiny_json(megatron_env, capsys):
    assert main(["params", "--config", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    st, tr = out["stock"], out["transformed"]
    assert st["embedding_and_output"] == 2 * 201088 * 64
    assert st["total"] - tr["total"] == 3 * (192 - 168) * 64 - 8  # TPA factors vs QKV, + log_freq
    assert tr["active"] < tr["total"]


def test_params_table(megatron_env, capsys):
    assert main(["params", "--config", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "stock GPTModel" in text and "after transform" in text and "active" in text


def test_dump_command(megatron_env, tmp_path):
    out = tmp_path / "d"
    assert main(["dump", "--config", "tiny", "--out", str(out)]) == 0
    assert (out / "index.md").exists() and (out / "dump.json").exists()
    (out / "x").mkdir(exist_ok=True)
    assert main(["dump", "--config", "tiny", "--out", str(out)]) == 2  # not empty, no --force


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "0"], "--steps must be >= 1"),
        (["demo", "--config", "nope"], "neither a preset"),
        (["demo", "--seq-len", "100000"], "exceeds [attention] max_sequence_length"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors():
    with pytest.raises(SystemExit) as e:
        main(["dump"])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.slow
def test_demo_eager_and_compiled(megatron_env, tmp_path, capsys):
    """The demo end to end on CPU: transform, eager steps, then the single Inductor compile
    smoke test of the suite (compiled steps must train the same model on)."""
    res = tmp_path / "res.json"
    rc = main([
        "demo", "--config", "tiny", "--steps", "3", "--seq-len", "32", "--dump-dir", str(tmp_path / "dump"),
        "--data-cache", str(tmp_path / "data"), "--json-out", str(res),
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "debug dump written to" in out and "compiled / eager speed-up" in out
    r = json.loads(res.read_text())
    for mode in ("eager", "compiled"):
        assert r[mode]["median_step_s"] > 0
        assert math.isfinite(r[mode]["first_loss"]) and math.isfinite(r[mode]["last_loss"])
        assert r[mode]["last_loss"] < r[mode]["first_loss"]  # each phase trains
    # the compiled phase continues the eager-trained model (not a fresh one): its first loss is
    # one step on from the eager phase's last, well below the initial loss
    assert abs(r["compiled"]["first_loss"] - r["eager"]["last_loss"]) < 0.1
    assert r["compiled"]["first_loss"] < r["eager"]["first_loss"] - 0.1
    assert (tmp_path / "dump" / "index.md").exists()


def test_bad_output_paths_are_one_line_errors_before_any_work(tmp_path, capsys):
    """dump --out FILE, demo --dump-dir FILE and a --json-out in a missing folder: exit 2 with a
    message, no traceback, nothing trained."""
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["dump", "--config", "tiny", "--out", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["demo", "--config", "tiny", "--steps", "1", "--dump-dir", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    rc = main(["demo", "--config", "tiny", "--steps", "1", "--json-out", str(tmp_path / "missing" / "r.json"),
               "--dump-dir", str(tmp_path / "d")])
    err = capsys.readouterr()
    assert rc == 2 and "does not exist" in err.err and "[demo]" not in err.out
    assert not (tmp_path / "d").exists()
