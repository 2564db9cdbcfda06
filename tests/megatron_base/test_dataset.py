"""Dataset builder: .bin/.idx + loss masks + manifest, determinism, bad lines, Megatron read-back."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re

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
from megatron_base.harmony import HarmonyRenderConfig, HarmonyRenderer
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
    return d, inp, expected, bad, (r1, r2_, r3)


def test_builder_deterministic_across_workers(built):
    d, _, _, _, _ = built
    for suffix in FILES:
        blobs = {open(d / w / ("data" + suffix), "rb").read() for w in ("w1", "w2", "w3")}
        assert len(blobs) == 1, suffix


def test_builder_contents(built, tok):
    d, inp, expected, bad, (res, _, _) = built
    prefix = str(d / "w1" / "data")
    toks, masks = open_dataset(prefix)
    assert toks.index.dtype == np.int32 and masks.index.dtype == np.uint8
    assert len(toks) == len(expected) and len(toks.document_indices) == len(expected) + 1
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
