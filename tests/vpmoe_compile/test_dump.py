"""The debug dump of the tiny config: readable index and per-pass pages, complete JSON twin."""

import json

import torch

import pytest

import vpmoe_compile


@pytest.fixture()
def dumped(tiny_model, tmp_path):
    d = tmp_path / "dump"
    vpmoe_compile.transform(tiny_model, dump_dir=d)
    return d, tiny_model


def test_index_and_pages(dumped):
    d, model = dumped
    index = (d / "index.md").read_text()
    names = model.vpmoe_transform.passes
    for i, name in enumerate(names, 1):
        page = d / f"{i:02d}-{name}.md"
        assert page.exists() and f"({page.name})" in index
    assert "## Layer plan" in index and "| 4 | global | moe |" in index
    tpa = (d / "04-tpa.md").read_text()
    assert "TPAFactorProjection" in tpa and "## Parameter-table diff" in tpa
    assert "| + | `decoder.layers.0.self_attention.linear_qkv.weight` | [168, 64]" in tpa
    assert "| - | `decoder.layers.0.self_attention.linear_qkv.weight` | [192, 64]" in tpa
    assert "```diff" in tpa and "+        self_attention: TPASelfAttention" in tpa
    # graphs: stock attention before (baddbmm inside DotProductAttention), our fused op after
    assert "### `decoder.layers.0.self_attention`" in tpa
    before, after = tpa.split("### `decoder.layers.0.self_attention`")[1].split("After (")[:2]
    assert "baddbmm" in before and "vpmoe" in after and "baddbmm" not in after.split("###")[0]
    grape = (d / "03-grape.md").read_text()
    assert "rotary_pos_emb.log_freq" in grape and "GrapeMRotaryEmbedding" in grape
    routing = (d / "07-optimizer_routing.md").read_text()
    assert "rotary_pos_emb.log_freq" in routing
    moe = (d / "05-moe.md").read_text()
    assert "GroupedMoELayer" in moe and "## Parameter-table diff" in moe
    assert "| + | `decoder.layers.1.mlp.experts.linear_fc1.weight` | [8, 32, 64]" in moe
    assert "| - | `decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight` | [64, 32]" in moe
    assert "### `decoder.layers.1.mlp`" in moe
    moe_before, moe_after = moe.split("### `decoder.layers.1.mlp`")[1].split("After (")[:2]
    assert "vpmoe.grouped_mm" in moe_after and "grouped_mm" not in moe_before


def test_json_twin_is_complete(dumped):
    d, model = dumped
    data = json.loads((d / "dump.json").read_text())
    assert [p["name"] for p in data["passes"]] == model.vpmoe_transform.passes
    assert data["config"]["model"]["num_layers"] == 4 and len(data["plan"]) == 4
    by = {p["name"]: p for p in data["passes"]}
    tpa = by["tpa"]
    assert tpa["params_added_count"] == 3 * 168 * 64 and tpa["params_removed_count"] == 3 * 192 * 64
    assert len(tpa["replaced"]) == 9 and all({"path", "old", "new"} <= set(r) for r in tpa["replaced"])
    assert {g["site"] for g in tpa["graphs"]} == {f"decoder.layers.{i}.self_attention" for i in range(3)}
    assert all(g["before"] and g["after"] for g in tpa["graphs"])
    assert by["optimizer_routing"]["data"]["routing"]
    assert data["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert "te_general_gemm" in data["compat"]


def test_env_var_enables_dump(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VPMOE_DUMP_DIR", str(tmp_path / "envdump"))
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    assert (tmp_path / "envdump" / "index.md").exists()


def test_failed_dump_leaves_old_dump_and_model_untouched(tiny_model, tmp_path, monkeypatch):
    from vpmoe_compile import dump as dump_mod

    d = tmp_path / "dump"
    d.mkdir()
    # An earlier dump of ours (its marker lists its files), with a page the new dump does not
    # have, plus a file the user put there.
    (d / "index.md").write_text("old index\n")
    (d / "09-stale.md").write_text("stale page\n")
    (d / dump_mod.MARKER).write_text(json.dumps({"files": ["index.md", "09-stale.md"]}))
    (d / "notes.txt").write_text("user notes\n")
    calls = []
    real = dump_mod._pass_markdown

    def flaky(i, r):
        calls.append(i)
        if i == 3:
            raise OSError("disk full (simulated)")
        return real(i, r)

    monkeypatch.setattr(dump_mod, "_pass_markdown", flaky)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with pytest.raises(Exception, match="disk full"):
        vpmoe_compile.transform(tiny_model, dump_dir=d)
    assert calls == [1, 2, 3]
    assert sorted(p.name for p in d.iterdir()) == sorted([dump_mod.MARKER, "09-stale.md", "index.md", "notes.txt"])
    assert (d / "index.md").read_text() == "old index\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dump.partial-")]
    assert not hasattr(tiny_model, "vpmoe_transform")
    after = dict(tiny_model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)

    # A successful dump into the same directory replaces our pages, drops our stale one and
    # keeps the user's file.
    monkeypatch.setattr(dump_mod, "_pass_markdown", real)
    vpmoe_compile.transform(tiny_model, dump_dir=d)
    names = {p.name for p in d.iterdir()}
    assert "09-stale.md" not in names and "notes.txt" in names and "01-layer_plan.md" in names
    assert (d / "index.md").read_text().startswith("# vpmoe-compile debug dump")
    assert set(json.loads((d / dump_mod.MARKER).read_text())["files"]) == names - {dump_mod.MARKER, "notes.txt"}


def test_dump_never_touches_a_folder_it_did_not_write(tiny_model, tmp_path, monkeypatch):
    """A user's folder with numbered pages of their own is refused before anything runs; its
    files and the model stay as they were; an empty dump_dir (argument or environment) too."""
    from vpmoe_compile.dump import DumpDirError

    docs = tmp_path / "docs"
    docs.mkdir()
    pages = {"01-introduction.md": "intro", "02-setup.md": "setup", "07-results.md": "results"}
    for name, text in pages.items():
        (docs / name).write_text(text)
    with pytest.raises(DumpDirError, match="no vpmoe-compile dump wrote"):
        vpmoe_compile.transform(tiny_model, dump_dir=docs)
    assert {p.name: p.read_text() for p in docs.iterdir()} == pages
    assert not hasattr(tiny_model, "vpmoe_transform")
    assert type(tiny_model.decoder.layers[0].self_attention).__name__ == "SelfAttention"
    with pytest.raises(DumpDirError, match="empty"):
        vpmoe_compile.transform(tiny_model, dump_dir="")
    monkeypatch.setenv("VPMOE_DUMP_DIR", "")
    with pytest.raises(DumpDirError, match="empty"):
        vpmoe_compile.transform(tiny_model)
    monkeypatch.chdir(docs)
    monkeypatch.setenv("VPMOE_DUMP_DIR", ".")
    with pytest.raises(DumpDirError, match="no vpmoe-compile dump wrote"):
        vpmoe_compile.transform(tiny_model)
    assert {p.name: p.read_text() for p in docs.iterdir()} == pages
