"""Dataset builder: .bin/.idx + loss masks + manifest, determinism, bad lines, Megatron read-back."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from openai_harmony import RenderConversationConfig

from megatron_base.dataset import (
    DEMO_CORPUS_PATH,
    LOSS_MASK_SUFFIX,
    DatasetBuildConfig,
    DatasetBuildError,
    LossMaskedGPTDataset,
    build_dataset,
    build_demo_dataset,
    open_dataset,
)
from megatron_base.harmony import HarmonyFormatError, HarmonyRenderConfig, HarmonyRenderer
from megatron_base.tokenizer import EOD_ID
from tests.megatron_base.test_harmony import CONVS
from tests.megatron_base.test_tokenizer import (  # noqa: F401 (fixtures)
    HAND,
    asset_bytes,
    r2,
    synthetic_docs,
    tok,
)
from vpmoe_compile.cli_data import add_build_dataset_parser

FILES = (".bin", ".idx", LOSS_MASK_SUFFIX + ".bin", LOSS_MASK_SUFFIX + ".idx", ".manifest.json")

BAD_LINES = {
    "not json at all": "invalid JSON",
    "[1, 2, 3]": "must be a JSON object",
    '{"text": 5}': "'text' must be a string",
    '{"text": "a", "source": "web"}': "unknown keys ['source']",
    '{"text": "a", "messages": []}': "exactly one of the two",
    '{"prompt": "x"}': "got keys ['prompt']",
    '{"messages": [{"role": "robot", "content": "x"}]}': "unknown role 'robot'",
    '{"messages": [{"role": "user", "content": "x", "chanel": "final"}]}': "unknown keys",
    '{"messages": []}': "no messages",
    '{"messages": [{"role": "tool", "content": "x"}]}': "tool message needs",
    '{"text": "lone \\ud800 surrogate"}': "lone surrogate",
}


def _write_input(path, with_bad: bool = True):
    """A JSONL of text documents and conversations, with bad lines and blank lines mixed in.

    Returns (expected documents in order as ("text"|"conv", payload), bad line numbers)."""
    docs = []
    for i, t in enumerate(HAND[:40] + synthetic_docs(99, 60)):
        docs.append(("text", t))
        if i % 3 == 0:
            names = sorted(CONVS)
            docs.append(("conv", CONVS[names[(i // 3) % len(names)]].to_json()))
    lines, expected, bad = [], [], []
    bad_items = list(BAD_LINES) if with_bad else []
    for k, (kind, payload) in enumerate(docs):
        if bad_items and k % 9 == 4:
            lines.append(bad_items.pop())
            bad.append(len(lines))
        if k % 17 == 5:
            lines.append("   ")
        if kind == "text":
            lines.append(json.dumps({"text": payload, "id": k}))
        else:
            lines.append(payload)
        expected.append((kind, payload))
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    if with_bad:
        raw += b'{"text": "bad utf8 \xff\xfe"}\n'
        bad.append(len(lines) + 1)
        raw += json.dumps({"text": "last good line"}).encode() + b"\n"
        expected.append(("text", "last good line"))
    path.write_bytes(raw)
    return expected, bad


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    inp = d / "in.jsonl"
    expected, bad = _write_input(inp)
    r1 = build_dataset(DatasetBuildConfig(str(inp), str(d / "w1" / "data"), workers=1, progress=False))
    r2_ = build_dataset(DatasetBuildConfig(str(inp), str(d / "w2" / "data"), workers=2, progress=False))
    r3 = build_dataset(DatasetBuildConfig(str(inp), str(d / "w3" / "data"), workers=3, progress=True))
    build_dataset(DatasetBuildConfig(str(inp), str(d / "p2" / "data"), workers=2, executor="processes",
                                     progress=False))
    return d, inp, expected, bad, (r1, r2_, r3)


def test_builder_deterministic_across_workers(built):
    """In-process, 2 and 3 threads (the default executor) and 2 processes: the same bytes."""
    d, _, _, _, _ = built
    for suffix in FILES:
        blobs = {open(d / w / ("data" + suffix), "rb").read() for w in ("w1", "w2", "w3", "p2")}
        assert len(blobs) == 1, suffix


def test_builder_chunking_does_not_change_the_bytes(built, tmp_path, monkeypatch):
    """Chunks of 3 lines (each chunk's documents appended with one write) give the bytes of the
    one-chunk build, in-process and threaded."""
    import megatron_base.dataset as dataset_mod

    d, inp, _, _, _ = built
    monkeypatch.setattr(dataset_mod, "_CHUNK_LINES", 3)
    for workers in (1, 2):
        build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / f"c{workers}" / "data"), workers=workers,
                                         progress=False))
        for suffix in FILES:
            assert _sha(tmp_path / f"c{workers}" / ("data" + suffix)) == _sha(d / "w1" / ("data" + suffix)), suffix


def test_builder_executor_is_checked():
    with pytest.raises(ValueError, match="executor"):
        DatasetBuildConfig("x", "y", executor="fibers")


def test_builder_contents(built, tok):
    d, inp, expected, bad, (res, _, _) = built
    prefix = str(d / "w1" / "data")
    toks, masks = open_dataset(prefix)
    assert toks.index.dtype == np.int32 and masks.index.dtype == np.uint8
    assert len(toks) == len(expected)
    assert toks.document_indices.tolist() == list(range(len(expected) + 1))  # one sequence per document
    renderer = HarmonyRenderer(tokenizer=tok)
    for i, (kind, payload) in enumerate(expected):
        ids, m = toks[i], masks[i]
        assert ids[-1] == EOD_ID and m[-1] == 0
        if kind == "text":
            assert ids[:-1].tolist() == tok.tokenize(payload)
            assert m[:-1].tolist() == [1] * (len(ids) - 1)
        else:
            want_ids, want_mask = renderer.render(payload)
            assert ids[:-1].tolist() == want_ids
            assert m[:-1].tolist() == want_mask
        # EOD appears only as the appended boundary (raw text never produces it).
        assert EOD_ID not in ids[:-1].tolist()
    man = res.manifest
    assert json.load(open(prefix + ".manifest.json")) == man
    c = man["counts"]
    assert c["documents"] == len(expected)
    assert c["conversations"] == sum(k == "conv" for k, _ in expected)
    assert c["bad_lines"] == len(bad) == len(BAD_LINES) + 1
    assert c["blank_lines"] > 0
    assert c["tokens"] == int(toks.sequence_lengths.sum())
    assert c["trained_tokens"] == sum(int(masks[i].sum()) for i in range(len(masks)))
    assert [e["line"] for e in man["bad_lines"]] == bad
    errors = " | ".join(e["error"] for e in man["bad_lines"])
    for needle in list(BAD_LINES.values()) + ["invalid UTF-8"]:
        assert needle in errors, needle
    assert man["input"]["sha256"] == _sha(inp)
    assert man["tokenizer"]["vocab_sha256"] == tok.vocab_sha256
    assert man["render"]["auto_drop_analysis"] is False
    assert man["render"]["mask_policy"] == "generated"
    assert len(man["preamble_sha256"]) > 3
    o = man["outputs"]
    assert o["tokens"]["bin_sha256"] == _sha(prefix + ".bin")
    assert o["loss_mask"]["idx_sha256"] == _sha(prefix + LOSS_MASK_SUFFIX + ".idx")
    assert not [p for p in os.listdir(d / "w1") if "partial" in p]


def test_strict_mode(tmp_path):
    inp = tmp_path / "in.jsonl"
    _, bad = _write_input(inp)
    prefix = tmp_path / "out" / "data"
    with pytest.raises(DatasetBuildError, match=rf"line {bad[0]}: "):
        build_dataset(DatasetBuildConfig(str(inp), str(prefix), workers=2, strict=True, progress=False))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    # A clean file passes strict mode.
    good = tmp_path / "good.jsonl"
    _write_input(good, with_bad=False)
    res = build_dataset(DatasetBuildConfig(str(good), str(prefix), workers=1, strict=True, progress=False))
    assert res.manifest["counts"]["bad_lines"] == 0


def test_bad_line_warnings_print_above_the_progress_bar(tmp_path, monkeypatch):
    """With the progress bar on, each skipped line's warning goes through tqdm.write (printed
    above the bar), not straight to stderr across it."""
    import tqdm.std

    written = []
    monkeypatch.setattr(tqdm.std.tqdm, "write",
                        classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "good"}) + "\n{not json\n" + json.dumps({"text": "also good"}) + "\n")
    res = build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / "data"), workers=1, progress=True))
    assert res.manifest["counts"]["bad_lines"] == 1
    assert [m for m in written if "line 2 skipped" in m] != []


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        DatasetBuildConfig("x", "y", workers=0)
    with pytest.raises(ValueError, match="without the suffix"):
        DatasetBuildConfig("x", "out/data.bin")
    with pytest.raises(ValueError, match="not a directory"):
        DatasetBuildConfig("x", "out/")
    with pytest.raises(DatasetBuildError, match="does not exist"):
        build_dataset(DatasetBuildConfig(str(tmp_path / "nope.jsonl"), str(tmp_path / "o"), progress=False))


def test_render_options_change_output(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(CONVS["multi_turn_cot"].to_json() + "\n")
    a = build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / "a"), workers=1, progress=False))
    b = build_dataset(DatasetBuildConfig(
        str(inp), str(tmp_path / "b"), workers=1, progress=False,
        render=HarmonyRenderConfig(auto_drop_analysis=True, mask_policy="assistant")))
    assert a.manifest["counts"]["tokens"] > b.manifest["counts"]["tokens"]
    assert b.manifest["render"]["auto_drop_analysis"] is True
    assert "prompt-supplied" not in b.manifest["render"]["mask_rule"]


def test_gpt_dataset_reads_it(built, tok):
    """Megatron's own GPTDataset (through BlendedMegatronDatasetBuilder) reads the output; the
    loss-masked subclass applies the stored masks."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, _, _, _, _ = built
    prefix = str(d / "w1" / "data")
    S = 64
    cfg = GPTDatasetConfig(
        random_seed=1, sequence_length=S, blend=([prefix], None), split="1,0,0",
        tokenizer=tok, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
        path_to_cache=str(d / "cache"),
    )
    assert cfg.token_dtype_code == 4
    stock, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, 0, 0], lambda: True, cfg).build()
    masked, _, _ = BlendedMegatronDatasetBuilder(
        LossMaskedGPTDataset, [20, 0, 0], lambda: True, cfg).build()
    toks, masks = open_dataset(prefix)
    # The token stream GPTDataset samples from: documents in its (shuffled) document order.
    order = masked.document_index
    stream_t = np.concatenate([toks[int(k)] for k in order])
    stream_m = np.concatenate([masks[int(k)] for k in order])
    starts = np.concatenate([[0], np.cumsum([len(toks[int(k)]) for k in order])])
    assert len(stock) >= 20
    n_eod = 0
    totals = [0.0, 0.0]
    for i in range(20):
        s, m = stock[i], masked[i]
        assert s["tokens"].shape == (S,) and s["tokens"].dtype == torch.int64
        assert s["labels"].shape == (S,) and s["position_ids"].shape == (S,)
        assert s["attention_mask"].shape == (1, S, S) and s["attention_mask"].dtype == torch.bool
        assert s["loss_mask"].dtype == torch.float32
        assert torch.equal(s["tokens"], m["tokens"]) and torch.equal(s["labels"], m["labels"])
        # eod_mask_loss: zero where the *input* is EOD; positions restart after each EOD.
        eod = (s["tokens"] == EOD_ID).nonzero().flatten().tolist()
        n_eod += len(eod)
        for p in eod:
            assert s["loss_mask"][p] == 0
            if p + 1 < S:
                assert s["position_ids"][p + 1] == 0
        # The masked loss is the stock one times the stored mask of the labels.
        j = masked.shuffle_index[i]
        doc, off = masked.sample_index[j]
        a = starts[doc] + off
        text = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()
        assert np.array_equal(stream_t[a : a + S + 1], text)
        label_mask = torch.from_numpy(stream_m[a + 1 : a + S + 1].astype(np.float32))
        assert torch.equal(m["loss_mask"], s["loss_mask"] * label_mask)
        totals[0] += float(m["loss_mask"].sum())
        totals[1] += float(s["loss_mask"].sum())
    assert 0 < totals[0] < totals[1]
    assert n_eod > 0


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vpmoe_compile")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_dataset_parser(sub)
    inp = tmp_path / "in.jsonl"
    _write_input(inp)
    out = tmp_path / "o" / "data"
    args = parser.parse_args(["build-dataset", "--input", str(inp), "--output", str(out),
                              "--workers", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "documents" in capsys.readouterr().out
    args = parser.parse_args(["build-dataset", "--input", str(inp), "--output", str(out) + "s",
                              "--strict", "--no-progress", "--workers", "1"])
    assert args.func(args) == 1
    assert "line" in capsys.readouterr().err
    for bad, msg in (
        (["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)], "does not exist"),
        (["--input", str(inp), "--output", str(out) + ".bin"], "without .bin"),
        (["--input", str(inp), "--output", str(tmp_path)], "directory"),
        (["--input", str(inp), "--output", str(out), "--workers", "0"], "positive integer"),
        (["--input", str(inp), "--output", str(out), "--mask-policy", "all"], "invalid choice"),
        (["--input", str(inp), "--output", str(out), "--cross-check-rate", "2"], r"\[0, 1\]"),
        (["--output", str(out)], "required"),
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["build-dataset", *bad])
        assert info.value.code == 2
        assert re.search(msg, capsys.readouterr().err), msg


def test_demo_corpus_and_dataset(tmp_path, tok, r2):
    from openai_harmony import Conversation

    raw = DEMO_CORPUS_PATH.read_bytes()
    assert len(raw) <= 300_000
    lines = [json.loads(l) for l in raw.decode().splitlines()]
    convs = [l for l in lines if "messages" in l]
    texts = [l for l in lines if "text" in l]
    assert len(convs) >= 24 and len(texts) >= 20
    renderer = HarmonyRenderer(tokenizer=tok)
    tool_calls = 0
    for c in convs:
        conv = Conversation.from_json(json.dumps(c))
        ids, _ = renderer.render(c)
        assert ids == r2.render_conversation_for_training(
            conv, RenderConversationConfig(auto_drop_analysis=False))
        tool_calls += any(m.get("recipient", "").startswith("functions.") for m in c["messages"])
    assert tool_calls >= 5
    prefix = build_demo_dataset(tmp_path)
    toks, masks = open_dataset(prefix)
    assert len(toks) == len(lines)
    man = json.load(open(prefix + ".manifest.json"))
    assert man["counts"]["bad_lines"] == 0 and man["counts"]["conversations"] == len(convs)
    # Cached: a second call does not rebuild.
    mtime = os.path.getmtime(prefix + ".bin")
    assert build_demo_dataset(tmp_path) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime
    # A damaged output is detected and rebuilt.
    with open(prefix + ".bin", "r+b") as f:
        f.write(b"\x00\x00\x00\x00")
    assert build_demo_dataset(tmp_path) == prefix
    assert _sha(prefix + ".bin") == man["outputs"]["tokens"]["bin_sha256"]


# --------------------------------------------------------------------------------------------
# Inputs that hold no document, odd encodings, pathological lines
# --------------------------------------------------------------------------------------------

_GOOD_JSONL = '{"text": "caf\u00e9 one"}\n{"text": "caf\u00e9 two"}\n'
NO_DOCUMENT_INPUTS = {  # name: (bytes, hint without --strict, hint with --strict)
    "empty": (b"", "the file is empty", "the file is empty"),
    "blank_lines": (b"\n   \n\t\n", "0 of 3 lines", "0 of 3 lines"),
    "utf16_bom": (_GOOD_JSONL.encode("utf-16"), "UTF-16 byte-order mark", "UTF-16"),
    "utf16le_no_bom": (_GOOD_JSONL.encode("utf-16-le"), "NUL bytes", "NUL bytes"),
    "latin1": (_GOOD_JSONL.encode("latin-1"), "convert Latin-1", "convert Latin-1"),
    "json_but_no_documents": (b'[1]\n{"title": "x"}\n"text"\n', "0 of 3 lines",
                              "must be a JSON object"),
}


def _cli(argv):
    parser = argparse.ArgumentParser(prog="vpmoe_compile")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_dataset_parser(sub)
    args = parser.parse_args(["build-dataset", *argv])
    return args.func(args)


def _leftovers(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.mark.parametrize("name", sorted(NO_DOCUMENT_INPUTS))
@pytest.mark.parametrize("strict", [False, True])
def test_no_document_is_an_error(tmp_path, capsys, name, strict):
    """An input that yields no document (empty, blank, UTF-16, Latin-1, no text/messages
    objects) is an error, with and without --strict: exit 1, the reason on stderr, nothing
    written (Megatron cannot open a 0-byte .bin)."""
    raw, hint, strict_hint = NO_DOCUMENT_INPUTS[name]
    inp = tmp_path / f"{name}.jsonl"
    inp.write_bytes(raw)
    out = tmp_path / "o"
    rc = _cli(["--input", str(inp), "--output", str(out / "data"), "--workers", "1",
               "--no-progress"] + (["--strict"] if strict else []))
    err = capsys.readouterr().err
    assert rc == 1, err
    if strict and name not in ("empty", "blank_lines"):
        assert "line 1: " in err
    else:
        assert f"no document in {inp}" in err
    assert "UTF-8" in err or name == "json_but_no_documents"
    assert (strict_hint if strict else hint) in err, err
    assert _leftovers(out) == []
    with pytest.raises(DatasetBuildError, match="line 1: |no document"):
        build_dataset(DatasetBuildConfig(str(inp), str(out / "lib"), workers=1, strict=strict,
                                         progress=False))
    assert _leftovers(out) == []


def test_utf8_bom_keeps_the_first_document(tmp_path, tok):
    raw = b"\xef\xbb\xbf" + _GOOD_JSONL.encode("utf-8")
    inp = tmp_path / "bom.jsonl"
    inp.write_bytes(raw)
    for w in (1, 2):
        res = build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / f"o{w}" / "d"),
                                               workers=w, strict=True, progress=False))
        assert res.manifest["counts"]["documents"] == 2
        assert res.manifest["input"]["sha256"] == hashlib.sha256(raw).hexdigest()
        toks, _ = open_dataset(str(tmp_path / f"o{w}" / "d"))
        assert tok.detokenize(toks[0][:-1]) == "caf\u00e9 one"
    # Only at the start of the file: a BOM inside is a bad line like any other.
    inp.write_bytes(_GOOD_JSONL.encode() + b"\xef\xbb\xbf" + _GOOD_JSONL.encode())
    res = build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / "o3" / "d"), workers=1,
                                           progress=False))
    assert res.manifest["counts"]["documents"] == 3
    assert [e["line"] for e in res.manifest["bad_lines"]] == [3]


def test_deeply_nested_line_is_a_bad_line(tmp_path):
    """A line nested deeper than the interpreter's recursion limit (json raises RecursionError)
    is a bad line: skipped and counted, or a line-numbered error under --strict."""
    deep = '{"text": "a", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep_conv = '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "ok 1"}\n' + deep + '\n{"text": "ok 2"}\n' + deep_conv + "\n")
    for w in (1, 2):
        res = build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / f"o{w}" / "d"),
                                               workers=w, progress=False))
        c = res.manifest["counts"]
        assert (c["documents"], c["bad_lines"]) == (2, 2)
        assert [e["line"] for e in res.manifest["bad_lines"]] == [2, 4]
        assert all("nested too deeply" in e["error"] for e in res.manifest["bad_lines"])
    with pytest.raises(DatasetBuildError, match=r"line 2: .*nested too deeply"):
        build_dataset(DatasetBuildConfig(str(inp), str(tmp_path / "s" / "d"), workers=2,
                                         strict=True, progress=False))
    assert _leftovers(tmp_path / "s") == []
    with pytest.raises(HarmonyFormatError, match="nested too deeply"):
        HarmonyRenderer().render(deep_conv)


# --------------------------------------------------------------------------------------------
# Existing outputs, atomic commit, verified reads, stale partial files
# --------------------------------------------------------------------------------------------

_A_LINES = ['{"text": "alpha"}', '{"text": "beta gamma"}', '{"text": "delta"}']
_B_LINES = [json.dumps({"text": f"document number {i} " * (i + 3)}) for i in range(6)] + [
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello", "channel": "final"}]})
]


def _megatron_view(prefix):
    """Megatron's own reading of each pair (tokens, masks): the documents, or None if it
    cannot open / read the pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = []
    for p in (prefix, prefix + LOSS_MASK_SUFFIX):
        if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx")):
            out.append(None)  # (IndexedDataset asserts this; its __del__ then warns)
            continue
        try:
            ds = IndexedDataset(p)
            out.append([ds[i].tolist() for i in range(len(ds))])
        except Exception:
            out.append(None)
    return tuple(out)


def _reader_view(prefix):
    """open_dataset's reading: (tokens, masks) documents, or None if it refuses."""
    try:
        toks, masks = open_dataset(prefix)
    except DatasetBuildError:
        return None
    return ([toks[i].tolist() for i in range(len(toks))],
            [masks[i].tolist() for i in range(len(masks))])


def _force_cfg(inp, prefix):
    cfg = DatasetBuildConfig(str(inp), str(prefix), workers=1, progress=False)
    cfg.force = True
    return cfg


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Inputs A and B and what Megatron / open_dataset read for each of their builds."""
    d = tmp_path_factory.mktemp("sets")
    (d / "a.jsonl").write_text("\n".join(_A_LINES) + "\n")
    (d / "b.jsonl").write_text("\n".join(_B_LINES) + "\n")
    views = {}
    for k in ("a", "b"):
        prefix = str(d / f"ref_{k}" / "data")
        build_dataset(DatasetBuildConfig(str(d / f"{k}.jsonl"), prefix, workers=1,
                                         progress=False))
        views[k] = (_megatron_view(prefix), _reader_view(prefix))
        assert None not in views[k][0] and views[k][1] is not None
    assert views["a"] != views["b"]
    return d, views


def _restore(directory, files):
    for p in os.listdir(directory):
        os.remove(os.path.join(directory, p))
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def test_existing_outputs_need_force(tmp_path, two_sets, capsys):
    d, views = two_sets
    out = tmp_path / "o"
    prefix = str(out / "data")
    build_dataset(DatasetBuildConfig(str(d / "a.jsonl"), prefix, workers=1, progress=False))
    before = {p: _sha(out / p) for p in os.listdir(out)}
    with pytest.raises(DatasetBuildError, match=r"exist.*data\.bin.*pass --force"):
        build_dataset(DatasetBuildConfig(str(d / "b.jsonl"), prefix, workers=1, progress=False))
    rc = _cli(["--input", str(d / "b.jsonl"), "--output", prefix, "--no-progress",
               "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--force" in err and "data.manifest.json" in err
    assert {p: _sha(out / p) for p in os.listdir(out)} == before
    assert _reader_view(prefix) == views["a"][1]
    # Any one member is enough to refuse (here a lone .idx).
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "data.idx").write_bytes(b"x")
    with pytest.raises(DatasetBuildError, match=r"data\.idx.*--force"):
        build_dataset(DatasetBuildConfig(str(d / "b.jsonl"), str(lone / "data"), workers=1,
                                         progress=False))
    # --force replaces the set.
    assert _cli(["--input", str(d / "b.jsonl"), "--output", prefix, "--no-progress",
                 "--workers", "1", "--force"]) == 0
    assert _reader_view(prefix) == views["b"][1]
    assert _megatron_view(prefix) == views["b"][0]
    assert sorted(os.listdir(out)) == sorted("data" + s for s in FILES)


def _counting_failure(k, real_replace, real_remove):
    """os.replace / os.remove wrappers whose k-th call (both counted together) fails."""
    n = [0]

    def wrap(real):
        def f(*args, **kwargs):
            n[0] += 1
            if n[0] == k:
                raise OSError(f"simulated failure of file-system step {k}")
            return real(*args, **kwargs)

        return f

    return wrap(real_replace), wrap(real_remove), n


def test_commit_failure_keeps_the_old_set(tmp_path, two_sets, monkeypatch):
    """A failure at any file-system step of replacing set A by set B (--force) leaves set A,
    whole, for Megatron's reader and for open_dataset; no temporary file is left."""
    d, views = two_sets
    out = tmp_path / "o"
    prefix = str(out / "data")
    build_dataset(DatasetBuildConfig(str(d / "a.jsonl"), prefix, workers=1, progress=False))
    files_a = {p: (out / p).read_bytes() for p in os.listdir(out)}
    real_replace, real_remove = os.replace, os.remove
    k = 0
    while True:
        k += 1
        _restore(out, files_a)
        rep, rem, n = _counting_failure(k, real_replace, real_remove)
        monkeypatch.setattr(os, "replace", rep)
        monkeypatch.setattr(os, "remove", rem)
        try:
            build_dataset(_force_cfg(d / "b.jsonl", prefix))
            failed = None
        except (OSError, DatasetBuildError) as exc:
            failed = exc
        finally:
            monkeypatch.undo()
        want = "a" if failed is not None else "b"
        assert _megatron_view(prefix) == views[want][0], (k, failed)
        assert _reader_view(prefix) == views[want][1], (k, failed)
        left = sorted(os.listdir(out))
        if failed is None and n[0] >= k:
            # The failure hit the deletion of the old set after the commit: the new set is in
            # place and an old member is left as NAME.old-PID (a later build removes it once
            # this process is gone).
            left = [p for p in left if not p.endswith(f".old-{os.getpid()}")]
        assert left == sorted("data" + s for s in FILES), (k, failed)
        if failed is None and n[0] < k:
            break
        assert k < 40
    assert k > 5  # every step of the commit was made to fail once


def test_commit_killed_at_any_step_never_mixes(tmp_path, two_sets):
    """SIGKILL at any file-system step of replacing set A by set B: each Megatron .bin/.idx pair
    is A's, B's or absent, the pairs that open come from one build, open_dataset reads A, B or
    refuses (clear error), and the next build cleans up the dead process's files."""
    d, views = two_sets
    out = tmp_path / "o"
    prefix = str(out / "data")
    build_dataset(DatasetBuildConfig(str(d / "a.jsonl"), prefix, workers=1, progress=False))
    files_a = {p: (out / p).read_bytes() for p in os.listdir(out)}
    seen = set()
    k = 0
    while True:
        k += 1
        _restore(out, files_a)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 3
            try:
                rep, rem, n = _counting_failure(k, os.replace, os.remove)

                def die_at_k(real):
                    def f(*args, **kwargs):
                        if n[0] + 1 == k:
                            os.kill(os.getpid(), signal.SIGKILL)
                        return real(*args, **kwargs)
                    return f

                os.replace = die_at_k(rep)
                os.remove = die_at_k(rem)
                build_dataset(_force_cfg(d / "b.jsonl", prefix))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        assert killed or os.WEXITSTATUS(status) == 0
        mv = _megatron_view(prefix)
        opened = [v for v in mv if v is not None]
        origin = {w for w in ("a", "b") for v, ref in zip(mv, views[w][0]) if v == ref}
        assert all(v in (views["a"][0][i], views["b"][0][i]) for i, v in enumerate(mv)
                   if v is not None), (k, mv)
        assert len(origin) == 1 or not opened, (k, mv)  # the pairs that open: one build's
        rv = _reader_view(prefix)
        assert rv in (None, views["a"][1], views["b"][1]), k
        seen.add((tuple(v is not None for v in mv), rv is not None))
        if not killed:
            assert rv == views["b"][1]
            break
        # The next build (after a kill) cleans the dead build's files and commits B.
        build_dataset(_force_cfg(d / "b.jsonl", prefix))
        assert sorted(os.listdir(out)) == sorted("data" + s for s in FILES), k
        assert _reader_view(prefix) == views["b"][1]
        assert k < 40
    assert k > 5 and len(seen) > 2


def _dead_pid():
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stale_partial_files_are_removed(tmp_path, two_sets, sig):
    """A build killed while writing leaves PREFIX*.partial-PID files; the next build for the
    prefix removes those of dead processes only: not a live process's, not another prefix's,
    not other names."""
    import subprocess

    d, _ = two_sets
    out = tmp_path / "o"
    prefix = str(out / "data")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            import megatron_base.dataset as ds

            def stall(path):
                os.write(w, b"x")
                time.sleep(60)

            ds._sha256_file = stall
            build_dataset(DatasetBuildConfig(str(d / "b.jsonl"), prefix, workers=1,
                                             progress=False))
        finally:
            os._exit(3)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.kill(pid, sig)
    os.waitpid(pid, 0)
    stale = sorted(p for p in os.listdir(out) if p.endswith(f".partial-{pid}"))
    assert stale and all(p.startswith("data") for p in stale)
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    keep = [f"data.bin.partial-{live.pid}", f"other.bin.partial-{dead}",
            f"data.bin.partial-{dead}x", "data.bin.partial-abc", f"xdata.idx.partial-{dead}",
            f"data.txt.partial-{dead}"]
    gone = stale + [f"data.idx.partial-{dead}", f"data_loss_mask.bin.partial-{dead}",
                    f"data.manifest.json.partial-{dead}"]
    try:
        for p in keep + gone[len(stale):]:
            (out / p).write_bytes(b"junk")
        build_dataset(DatasetBuildConfig(str(d / "b.jsonl"), prefix, workers=1, progress=False))
        left = set(os.listdir(out))
        assert not left & set(gone)
        assert set(keep) <= left
    finally:
        live.kill()
        live.wait()


def test_open_dataset_verifies_the_set(tmp_path, two_sets, tok):
    """open_dataset checks the members against the manifest (written last): a member of
    another build, a missing or foreign manifest, a truncated file are refused with a clear
    error; verify="full" also hashes the .bin files; verify="none" skips the checks."""
    d, views = two_sets
    prefix = str(tmp_path / "o" / "data")
    build_dataset(DatasetBuildConfig(str(d / "a.jsonl"), prefix, workers=1, progress=False))
    other = str(d / "ref_b" / "data")
    files = {s: (tmp_path / "o" / ("data" + s)).read_bytes() for s in FILES}

    def reset():
        _restore(tmp_path / "o", {"data" + s: b for s, b in files.items()})

    assert _reader_view(prefix) == views["a"][1]
    for suffix in FILES:  # a member of build B beside the others of build A
        reset()
        shutil.copyfile(other + suffix, prefix + suffix)
        with pytest.raises(DatasetBuildError, match="does not match|not aligned|manifest"):
            open_dataset(prefix)
    reset()
    os.remove(prefix + ".manifest.json")
    with pytest.raises(DatasetBuildError, match=r"no manifest.*incomplete.*--force"):
        open_dataset(prefix)
    toks, _ = open_dataset(prefix, verify="none")
    assert len(toks) == len(_A_LINES)
    # The training path (LossMaskedGPTDataset through Megatron's builder) checks it too.
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    gcfg = GPTDatasetConfig(random_seed=1, sequence_length=4, blend=([prefix], None),
                            split="1,0,0", tokenizer=tok, path_to_cache=str(tmp_path / "c"),
                            reset_position_ids=False, reset_attention_mask=False,
                            eod_mask_loss=False)
    with pytest.raises(DatasetBuildError, match="no manifest"):
        BlendedMegatronDatasetBuilder(LossMaskedGPTDataset, [2, 0, 0], lambda: True,
                                      gcfg).build()
    reset()
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DatasetBuildError, match=r"data\.bin.*does not match"):
        open_dataset(prefix)
    # Same size, other content (a mask of another mask policy): only a full check sees it.
    reset()
    with open(prefix + LOSS_MASK_SUFFIX + ".bin", "r+b") as f:
        f.write(b"\x00")
    open_dataset(prefix)
    with pytest.raises(DatasetBuildError, match=r"_loss_mask\.bin.*sha256"):
        open_dataset(prefix, verify="full")
    with pytest.raises(ValueError, match="verify"):
        open_dataset(prefix, verify="yes")
