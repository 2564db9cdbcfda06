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
    # the compiled phase resumes the eager-trained model from its checkpoint (steps 4-6 of one
    # run, not a fresh model), and the run as a whole trains
    assert (r["eager"]["first_step"], r["eager"]["last_step"]) == (1, 3)
    assert (r["compiled"]["first_step"], r["compiled"]["last_step"]) == (4, 6)
    assert r["compiled"]["last_loss"] < r["eager"]["first_loss"]
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


def _subcommand_parsers():
    import argparse

    from vpmoe_compile.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return parser, dict(subs[0].choices)


def test_help_is_plain_text_and_shows_the_config_default(capsys):
    """python -m vpmoe_compile --help and every sub-command's --help: no reStructuredText markup,
    and --config (wherever accepted) shows its presets and its default."""
    from megatron_base.config import PRESETS

    from vpmoe_compile.cli_format import CONFIG_PRESETS

    assert tuple(CONFIG_PRESETS) == tuple(PRESETS)
    parser, subs = _subcommand_parsers()
    assert {"demo", "dump", "params", "build-dataset"} <= set(subs)
    with_config = 0
    for name, sub in [("", parser)] + sorted(subs.items()):
        with pytest.raises(SystemExit) as e:
            main(([name] if name else []) + ["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":func:`" not in text and ":class:`" not in text, name
        config = [a for a in sub._actions if "--config" in a.option_strings]
        if name and config:
            with_config += 1
            flat = " ".join(text.split())
            if config[0].default is not None:
                assert f"(default: {config[0].default})" in flat, name
            for preset in PRESETS:
                assert preset in flat, name
    assert with_config >= 3  # demo, dump, params (and any later sub-command with --config)


def test_help_formatter_strips_docstring_markup_and_adds_defaults():
    from vpmoe_compile.cli_format import ArgumentParser

    p = ArgumentParser(prog="x", description="Run ``python -m x`` (see :func:`x.main`).")
    p.add_argument("--n", type=int, default=3, help="how many ``items``")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--opt", default=None, help="unset by default")
    p.add_argument("--k", default=5, help="k (default: five)")
    sub = p.add_subparsers().add_parser("sub", help="a ``sub`` command")
    sub.add_argument("--m", default="a", help="m")
    text = " ".join(p.format_help().split())
    assert "Run python -m x (see x.main)." in text and "a sub command" in text
    assert "how many items (default: 3)" in text
    assert "a flag (default" not in text and "unset by default (default" not in text
    assert "k (default: five)" in text and "(default: 5)" not in text
    assert "m (default: a)" in " ".join(sub.format_help().split())  # sub-parsers inherit it
