"""README.md's "Measured numbers" section is generated from ``benchmarks/results/*.json`` by
``benchmarks/readme_tables.py``: editing a number there by hand, or a recorded JSON, without
running ``python benchmarks/readme_tables.py --write`` fails here."""

import json
import shutil
from pathlib import Path

import pytest

from tests.benchmarks._load import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return load_benchmark("readme_tables")


rt = _load()


def test_readme_in_sync_with_recorded_json():
    ok, diff = rt.check(ROOT / "README.md", ROOT / "benchmarks" / "results")
    assert ok, "README.md's measured numbers differ from benchmarks/results; run " \
               "`python benchmarks/readme_tables.py --write`:\n" + diff


def test_every_region_is_in_the_readme_once():
    text = (ROOT / "README.md").read_text()
    start, end = rt.section_bounds(text)
    section = text[start:end]
    for name in rt.REGIONS:
        assert section.count(f"<!-- readme_tables:{name} -->") == 1, name
        assert section.count(f"<!-- /readme_tables:{name} -->") == 1, name


def _head_json(stock_eager_ms=46.16):
    rows = []
    for variant, mode, t, peak in [("stock", "eager", stock_eager_ms, 9.2054), ("fused", "eager", 29.57, 1.7281),
                                   ("stock", "compiled", 22.21, 9.2053), ("fused", "compiled", 27.75, 2.0175)]:
        rows.append({"variant": variant, "mode": mode, "fwd_bwd_ms": t, "peak_gib_above_inputs": peak})
    return {"device": "Test GPU", "torch": "9.9", "rows": rows}


def test_render_head_table_from_synthetic_json(tmp_path):
    (tmp_path / "head.json").write_text(json.dumps(_head_json()))
    assert rt.render_head(tmp_path) == "\n".join([
        "| head | fwd+bwd | peak |",
        "|---|---|---|",
        "| stock (bf16 logits + Megatron's fp32 `vocab_parallel_cross_entropy`), eager | 46.2 ms | 9.21 GiB |",
        "| `linear_cross_entropy` (fused head), eager | 29.6 ms | 1.73 GiB |",
        "| stock, `torch.compile` | 22.2 ms | 9.21 GiB |",
        "| `linear_cross_entropy`, `torch.compile` | 27.8 ms | 2.02 GiB |",
        "",
        "<sub>Source: `head.json` (Test GPU; torch 9.9; command not recorded; date not recorded).</sub>",
    ])


def test_source_note_names_command_and_date_when_recorded(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"device": "D", "command": "python run.py", "time_utc": "T"}))
    assert rt.source_note(tmp_path, "x.json") == "<sub>Source: `x.json` (D; `python run.py`; T).</sub>"


def _sandbox(tmp_path):
    """A copy of README.md and benchmarks/results to edit."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    return readme, results


def test_hand_edited_number_fails_the_check_and_write_restores_it(tmp_path):
    readme, results = _sandbox(tmp_path)
    text = readme.read_text()
    row = "| `linear_cross_entropy` (fused head), eager | 29.6 ms | 1.73 GiB |"
    assert row in text
    readme.write_text(text.replace(row, row.replace("29.6 ms", "19.6 ms")))
    ok, diff = rt.check(readme, results)
    assert not ok and "-| `linear_cross_entropy` (fused head), eager | 19.6 ms" in diff
    assert rt.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert rt.write(readme, results)
    assert readme.read_text() == text


def test_edited_json_fails_the_check(tmp_path):
    readme, results = _sandbox(tmp_path)
    data = json.loads((results / "head.json").read_text())
    data["rows"][0]["fwd_bwd_ms"] = 50.0
    (results / "head.json").write_text(json.dumps(data))
    ok, diff = rt.check(readme, results)
    assert not ok and "+| stock (bf16 logits" in diff and "| 50.0 ms |" in diff


def test_write_touches_only_the_marked_regions(tmp_path):
    readme, results = _sandbox(tmp_path)
    text = readme.read_text()
    start, end = rt.section_bounds(text)
    # stale content inside a region, plus an edit elsewhere that must survive
    stale = text.replace("<!-- readme_tables:tokenizer -->\n", "<!-- readme_tables:tokenizer -->\nstale line\n")
    stale = stale.replace("## Guarantees", "## Guarantees\n\nedited by someone else")
    readme.write_text(stale)
    rt.write(readme, results)
    new = readme.read_text()
    assert "stale line" not in new and "edited by someone else" in new
    assert new == text.replace("## Guarantees", "## Guarantees\n\nedited by someone else")


def test_markers_are_checked(tmp_path):
    readme, results = _sandbox(tmp_path)
    text = readme.read_text()
    readme.write_text(text.replace("<!-- /readme_tables:head -->\n", ""))
    with pytest.raises(ValueError, match="head"):
        rt.check(readme, results)
    readme.write_text(text + "\n<!-- readme_tables:head -->\n<!-- /readme_tables:head -->\n")
    with pytest.raises(ValueError, match="outside"):
        rt.check(readme, results)


def test_wrapped_lines_never_start_a_markdown_block():
    line = "word " * 17 + "- not a list item, " + "x " * 20 + "+ 1e-3 slack " + "y " * 30
    for out in rt._wrap_line(line.strip(), width=40)[1:]:
        assert not rt._RISKY.match(out.lstrip())
