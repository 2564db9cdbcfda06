"""o200k Harmony tokenizer: parity with tiktoken / openai-harmony, policies, bad input.

References (all offline, docs/design.md#tokenizer-tests): R1 = tiktoken 0.14's registry ``o200k_harmony`` loaded from
a pre-seeded temporary ``TIKTOKEN_CACHE_DIR``; R2 = openai-harmony 0.0.8 ``HarmonyGptOss`` with
``TIKTOKEN_ENCODINGS_BASE`` pointing at a temporary directory holding the decompressed asset.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import random
import sysconfig
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_base.tokenizer import (
    DEFAULT_VOCAB_PATH,
    O200K_BASE_SHA256,
    O200K_HARMONY_VOCAB_SIZE,
    O200K_PAT_STR,
    SPECIAL_TOKEN_IDS,
    VocabFileError,
    O200kHarmonyLibrary,
    find_long_whitespace_runs,
    O200kHarmonyTokenizer,
    padded_vocab_size,
)

URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
WHITESPACE = [
    "\t", "\n", "\x0b", "\x0c", "\r", " ", "\x85", "\xa0", "\u1680", "\u2000", "\u2005",
    "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]
# Not White_Space for Rust's regex although some are for Python's str.isspace.
NOT_WHITESPACE = ["\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\u200b", "\ufeff", "\u2060"]


# --------------------------------------------------------------------------------------------
# References and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def asset_bytes() -> bytes:
    return gzip.decompress(DEFAULT_VOCAB_PATH.read_bytes())


@pytest.fixture(scope="session")
def r1(tmp_path_factory, asset_bytes):
    """tiktoken's registry o200k_harmony, offline (its cache pre-seeded with the asset)."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    name = hashlib.sha1(URL.encode()).hexdigest()
    assert name == "fb374d419588a4632f3f557e76b4b70aebbca790"
    (cache / name).write_bytes(asset_bytes)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        enc = tiktoken.get_encoding("o200k_harmony")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


@pytest.fixture(scope="session")
def r2(tmp_path_factory, asset_bytes):
    """openai-harmony's HarmonyGptOss encoding, offline."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    base = tmp_path_factory.mktemp("harmony-base")
    (base / "o200k_base.tiktoken").write_bytes(asset_bytes)
    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(base)
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


@pytest.fixture(scope="session")
def tok() -> O200kHarmonyTokenizer:
    return O200kHarmonyTokenizer()


@pytest.fixture(scope="session")
def cut_lib() -> O200kHarmonyLibrary:
    """A library whose long-whitespace-run cut applies to every run of >= 2 characters."""
    lib = O200kHarmonyLibrary()
    lib._long_run_threshold = 2
    return lib


# --------------------------------------------------------------------------------------------
# The parity corpus (generated; docs/design.md#tokenizer-tests)
# --------------------------------------------------------------------------------------------

SPECIAL_NAMES = list(SPECIAL_TOKEN_IDS) + ["<|reserved_200018|>", "<|reserved_201087|>"]
LOOKALIKES = [
    "<|reserved_201088|>", "<|start|", "<|notatoken|>", "<||>", "<|<|end|>|>", "|>", "<|",
    "<| end |>", "<|END|>", "<<|start|>>",
]
HAND = [
    "", " ", "  ", "\n", "\r\n", "\r", "\t", "a", "hello world", "Hello, World!",
    "x <|endoftext|> y", "hi <|end|><|start|>assistant<|endoftext|>",
    "café", "cafe\u0301", "a\nb", "a\r\nb", "I'M", "WE'LL", "he'D", "they're", "It's",
    "1", "12", "123", "1234", "1234567", "12345678901", "3.14159", "1,000,000", "٣٤٥٦٧",
    "🙂🙃 漢字", "👨\u200d👩\u200d👧\u200d👦", "🇯🇵🇺🇸", "\ufffd", "\x00\x01\x02",
    "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก", "こんにちは世界", "안녕하세요",
    "Привет, мир", "Γειά σου Κόσμε", "  leading", "trailing  ", "a  \n\n  b", " \t \n \t ",
    "x" + " " * 300 + "y", "\t" * 257, "\u3000\u3000全角", "\xa0\xa0nbsp", "path/to/file\n//",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c++; }\r\n",
    "https://example.com/a?b=c&d=e", "e\u0301\u0302\u0303", "Z\u0351\u0352\u0353",
] + SPECIAL_NAMES + LOOKALIKES

_SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "àéîõüçñßøå",
    "абвгдежзийклмнопрстуфхцчшщъыьэюя", "αβγδεζηθικλμνξοπρστυφχψω", "אבגדהוזחטיכלמנסעפצקרשת",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "कखगघङचछजझञटठडढणतथदधन्ािीुूेैोौ", "กขฃคฅฆงจฉชซฌญฎฏั่้็",
    "的一是不了人我在有他这为之大来以个中上们", "あいうえおかきくけこアイウエオカキクケコ", "가나다라마바사아자차카타파하",
    "0123456789", "٠١٢٣٤٥٦٧٨٩", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "😀😁😂🤣😃😄👍🏽❤️🔥",
    "\u0301\u0308\u0327", "'s't're've'm'll'd", "\r\n", "/", "\u200d\ufe0f",
]


def synthetic_docs(seed: int, n: int, max_pieces: int = 60):
    rnd = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(0, max_pieces)):
            kind = rnd.random()
            if kind < 0.55:
                alpha = rnd.choice(_SCRIPTS)
                parts.append("".join(rnd.choice(alpha) for _ in range(rnd.randint(1, 12))))
            elif kind < 0.8:
                ws = rnd.choice(WHITESPACE + [" "] * 6)
                parts.append(ws * rnd.choice([1, 1, 1, 2, 3, 5, 17, 64, 300]))
            elif kind < 0.88:
                parts.append(str(rnd.randint(0, 10 ** rnd.randint(1, 10))))
            elif kind < 0.95:
                parts.append(rnd.choice(SPECIAL_NAMES + LOOKALIKES))
            else:
                parts.append(rnd.choice(NOT_WHITESPACE + ["\x00", "\ufffd", "\x7f"]))
        docs.append("".join(parts))
    return docs


def stdlib_docs(max_bytes: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(root.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


@pytest.fixture(scope="session")
def corpus():
    docs = HAND + synthetic_docs(1234, 400) + stdlib_docs(600_000)
    docs += [unicodedata.normalize(f, d) for f in ("NFC", "NFD") for d in HAND[:60]]
    return docs


# --------------------------------------------------------------------------------------------
# 1. Ordinary parity, round trip, offsets
# --------------------------------------------------------------------------------------------


def test_pattern_is_tiktokens(r1):
    assert O200K_PAT_STR == r1._pat_str


def test_parity_with_tiktoken_and_harmony(tok, r1, r2, corpus):
    assert len(corpus) > 600 and sum(len(d) for d in corpus) > 500_000
    for d in corpus:
        ids = tok.tokenize(d)
        assert ids == r1.encode_ordinary(d), repr(d[:80])
        assert ids == r2.encode(d, disallowed_special=()), repr(d[:80])
        assert tok.detokenize(ids) == d


def test_parity_large(tok, r1, r2):
    """>= 5 MB: the interpreter's stdlib sources, all subpackages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(root.rglob("*.py")):
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        total += len(docs[-1].encode())
        if total >= 5_000_000:
            break
    assert total >= 5_000_000
    ours = tok.tokenize_batch(docs, num_threads=2)
    assert ours == r1.encode_ordinary_batch(docs, num_threads=2)
    for d, ids in zip(docs, ours):
        assert ids == r2.encode(d, disallowed_special=())
    assert [tok.detokenize(ids) for ids in ours] == docs


def test_batch_and_numpy_paths(tok, r1, corpus):
    docs = corpus[:300]
    assert tok.tokenize_batch(docs, num_threads=2) == r1.encode_ordinary_batch(docs)
    assert tok.tokenize_batch(docs, num_threads=1) == [r1.encode_ordinary(d) for d in docs]
    for d in docs[:50]:
        arr = tok.tokenize_to_numpy(d)
        assert arr.dtype == np.int32 and arr.tolist() == r1.encode_ordinary(d)
    with pytest.raises(ValueError, match="num_threads"):
        tok.tokenize_batch(docs, num_threads=0)


def test_numpy_path_equals_encode_in_every_case(cut_lib, corpus):
    """``encode_to_numpy`` reads tiktoken's buffer in the common case and falls back to
    ``encode`` otherwise: same ids (or the same error) for special-token text under each policy,
    lone surrogates (replaced or refused), allowed specials, and the long-run cut."""
    texts = corpus[:20] + ["a <|endoftext|> b <|start|>x", "caf\u00e9 \U0001F600", "", " \t\n"]
    for policy in ("ordinary", "allow_all"):
        lib = O200kHarmonyLibrary(special_tokens_policy=policy)
        for t in texts:
            arr = lib.encode_to_numpy(t)
            assert arr.dtype == np.int32 and arr.flags.writeable and arr.tolist() == lib.encode(t)
        t = texts[-4]
        assert lib.encode_to_numpy(t, allowed_special="all").tolist() == lib.encode(t, allowed_special="all")
    strict = O200kHarmonyLibrary(special_tokens_policy="raise")
    with pytest.raises(ValueError, match="special token"):
        strict.encode_to_numpy("x <|endoftext|>")
    assert strict.encode_to_numpy("no specials").tolist() == strict.encode("no specials")
    lone = "ab\ud800cd"
    with pytest.raises(ValueError):
        O200kHarmonyLibrary().encode_to_numpy(lone)
    rep = O200kHarmonyLibrary(surrogate_errors="replace")
    assert rep.encode_to_numpy(lone).tolist() == rep.encode(lone) == rep.encode("ab\ufffdcd")
    long = "x" + " " * 9 + "y"  # a run the threshold-2 library cuts
    assert cut_lib.encode_to_numpy(long).tolist() == cut_lib.encode(long)


def test_long_run_cut_equals_tiktoken(cut_lib, r1, corpus):
    """The whitespace-run cut (used for >= 100k runs) is exact: prove it at threshold 2."""
    for d in corpus:
        assert cut_lib.encode(d) == r1.encode_ordinary(d), repr(d[:80])
        assert cut_lib.encode(d, allowed_special="all") == r1.encode(d, allowed_special="all")


def test_offsets(tok, r1, corpus):
    for d in corpus[:200] + ["🙂🙃 漢字"]:
        ids = tok.tokenize(d)
        text, offs = r1.decode_with_offsets(ids)
        assert text == d
        assert tok.offsets(ids) == offs
        assert offs == sorted(offs)
    assert tok.offsets(tok.tokenize("🙂🙃 漢字")) == [0, 1, 1, 2, 3, 4]


_ALPHABET = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.sampled_from(WHITESPACE + NOT_WHITESPACE + list("aA1'/ .,<|>")),
)
_FRAGMENTS = st.one_of(
    st.text(_ALPHABET, max_size=12),
    st.sampled_from(SPECIAL_NAMES + LOOKALIKES + HAND),
    st.builds(lambda c, n: c * n, st.sampled_from(WHITESPACE), st.integers(1, 40)),
)
_TEXTS = st.lists(_FRAGMENTS, max_size=12).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTS)
def test_fuzz_parity(tok, cut_lib, r1, text):
    ids = tok.tokenize(text)
    assert ids == r1.encode_ordinary(text)
    assert cut_lib.encode(text) == ids
    assert tok.detokenize(ids) == text
    assert tok.tokenize(text, allowed_special="all") == r1.encode(text, allowed_special="all")
    assert cut_lib.encode(text, allowed_special="all") == r1.encode(text, allowed_special="all")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_fuzz_round_trip(tok, r1, text):
    ids = tok.tokenize(text)
    assert ids == r1.encode_ordinary(text)
    assert tok.detokenize(ids) == text
    assert tok.detokenize_bytes(ids) == text.encode("utf-8")


# --------------------------------------------------------------------------------------------
# 2. Special-token policies (docs/design.md#special-tokens)
# --------------------------------------------------------------------------------------------


def test_special_text_is_ordinary_by_default(tok, r1):
    assert tok.tokenize("x <|endoftext|> y") == [87, 464, 91, 419, 1440, 919, 91, 29, 342]
    assert tok.tokenize("<|start|>") == r1.encode_ordinary("<|start|>")
    for name in SPECIAL_NAMES:
        assert all(t < 199_998 for t in tok.tokenize(f"a{name}b"))


def test_allowed_special(tok, r1):
    text = "x <|endoftext|> y<|start|>assistant<|message|>hi<|reserved_200018|><|endofprompt|>"
    assert tok.tokenize(text, allowed_special="all") == r1.encode(text, allowed_special="all")
    assert tok.tokenize("x <|endoftext|> y", allowed_special="all") == [87, 220, 199999, 342]
    sub = {"<|start|>", "<|message|>"}
    assert tok.tokenize(text, allowed_special=sub) == r1.encode(
        text, allowed_special=sub, disallowed_special=()
    )
    with pytest.raises(ValueError, match="not o200k_harmony special tokens"):
        tok.tokenize("a", allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="allowed_special"):
        tok.tokenize("a", allowed_special="<|start|>")


def test_policies():
    allow = O200kHarmonyTokenizer(special_tokens_policy="allow_all")
    assert allow.tokenize("<|start|>") == [200006]
    raising = O200kHarmonyTokenizer(special_tokens_policy="raise")
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>' at index 2"):
        raising.tokenize("x <|endoftext|> y")
    assert raising.tokenize("x <|endoftext|> y", allowed_special={"<|endoftext|>"}) == [
        87, 220, 199999, 342,
    ]
    assert raising.tokenize("plain <|notatoken|>") == allow.tokenize("plain <|notatoken|>")
    with pytest.raises(ValueError, match="special_tokens_policy"):
        O200kHarmonyTokenizer(special_tokens_policy="all")


# --------------------------------------------------------------------------------------------
# 3. The table (docs/design.md#special-tokens)
# --------------------------------------------------------------------------------------------


def test_special_table_matches_tiktoken(tok, r1):
    assert tok.special_tokens == r1._special_tokens
    assert len(tok.special_tokens) == 1091
    assert set(tok.special_tokens.values()) == set(range(199_998, 201_088))
    for name, i in SPECIAL_TOKEN_IDS.items():
        assert tok.special_tokens[name] == i
    enc = tok.encoding
    for i in range(199_998, 201_088):
        assert enc.decode_single_token_bytes(i) == r1.decode_single_token_bytes(i)
    # The doubly-named id decodes to its canonical name.
    assert tok.detokenize([200_018]) == "<|endofprompt|>"
    assert tok.inv_vocab[200_018] == "<|endofprompt|>"
    assert tok.vocab["<|reserved_200018|>"] == tok.vocab["<|endofprompt|>"] == 200_018


def test_harmony_table_differences_are_the_documented_ones(tok, r2):
    """R2 agrees on the 1,090 common names; its two known deviations are asserted so that an
    upstream fix is noticed."""
    harmony_names = set(r2.special_tokens_set)
    ours = tok.special_tokens
    common = harmony_names & set(ours)
    assert len(common) == 1090
    for name in common:
        assert r2.encode(name, allowed_special="all") == [ours[name]]
    assert harmony_names - set(ours) == {"<|reserved_201088|>"}
    assert set(ours) - harmony_names == {"<|endofprompt|>"}
    assert r2.encode("<|reserved_201088|>", allowed_special="all") == [201_088]
    with pytest.raises(ValueError, match="201088"):
        tok.detokenize([201_088])


def test_vocab_and_inv_vocab(tok):
    vocab, inv = tok.vocab, tok.inv_vocab
    assert len(inv) == O200K_HARMONY_VOCAB_SIZE and set(inv) == set(range(201_088))
    assert len(vocab) == O200K_HARMONY_VOCAB_SIZE + 1  # + the <|reserved_200018|> alias
    assert all(vocab[s] == i for i, s in inv.items())
    for i in [0, 1, 255, 1000, 84083, 199_997]:
        b = tok.encoding.decode_single_token_bytes(i)
        assert inv[i].encode("utf-8", "surrogateescape") == b
    toks = tok._tokenizer.text_to_tokens("héllo wörld 🙂")
    assert tok._tokenizer.tokens_to_ids(toks) == tok.tokenize("héllo wörld 🙂")
    assert tok._tokenizer.tokens_to_text(toks) == "héllo wörld 🙂"
    with pytest.raises(ValueError, match="unknown token"):
        tok._tokenizer.tokens_to_ids(["definitely not a token \u2603\u2603"])
    with pytest.raises(NotImplementedError, match="locked"):
        tok.add_special_tokens({"pad_token": "<pad>"})


# --------------------------------------------------------------------------------------------
# 4. Megatron integration attributes
# --------------------------------------------------------------------------------------------


def test_megatron_interface(tok, tmp_path, asset_bytes):
    from megatron.core.tokenizers import MegatronTokenizerBase
    from megatron.core.tokenizers.text import MegatronTokenizerText

    assert isinstance(tok, MegatronTokenizerText) and isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab_size == 201_088
    assert tok.eod == tok.eos == tok.eos_id == 199_999
    assert tok.bos == tok.bos_id == 199_998
    assert tok.pad == tok.pad_id == -1
    assert tok.library == "o200k-harmony"
    assert tok.stop_token_ids == (200_002, 200_007, 200_012)
    assert tok.assistant_action_stop_token_ids == (200_002, 200_012)
    assert "skip_special_tokens" in inspect.signature(tok.detokenize).parameters
    ids = tok.tokenize("<|start|>") + [200_006, 200_008] + tok.tokenize("hi")
    assert tok.detokenize(ids, skip_special_tokens=True) == "<|start|>hi"
    assert tok.tokenize("") == [] and tok.detokenize([]) == ""
    # Path-free cache identity (docs/design.md#megatron-ids-and-vocabulary-rows): a copy
    # elsewhere gives the same identifiers.
    copy = tmp_path / "elsewhere.tiktoken"
    copy.write_bytes(asset_bytes)
    other = O200kHarmonyTokenizer(copy)
    assert other.unique_identifiers == tok.unique_identifiers
    assert str(tmp_path) not in repr(other.unique_identifiers)
    assert O200kHarmonyTokenizer(special_tokens_policy="raise").unique_identifiers != (
        tok.unique_identifiers
    )
    with pytest.raises(ValueError, match="library"):
        O200kHarmonyTokenizer(config={"library": "tiktoken"})
    with pytest.raises(ValueError, match="Jinja"):
        tok.apply_chat_template([], chat_template="{{ messages }}")


def test_padded_vocab_size():
    for tp in (1, 2, 4, 8, 16):
        assert padded_vocab_size(tp) == 201_088
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3"):
        padded_vocab_size(3)
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_pickle_round_trip(tok):
    import pickle

    lib2 = pickle.loads(pickle.dumps(tok._tokenizer))
    assert lib2.encode("pickled tokenizer") == tok.tokenize("pickled tokenizer")


# --------------------------------------------------------------------------------------------
# 5. Asset / hash failures
# --------------------------------------------------------------------------------------------


def _variants(asset: bytes):
    lines = asset.splitlines(keepends=True)
    flipped = bytearray(asset)
    flipped[1000] ^= 0x01
    tok_, rank = lines[5].split(b" ")
    return {
        "flipped.tiktoken": bytes(flipped),
        "truncated.tiktoken": asset[: len(asset) // 2],
        "empty.tiktoken": b"",
        "extra_line.tiktoken": asset + b"AAAA 199998\n",
        "crlf.tiktoken": asset.replace(b"\n", b"\r\n"),
        "rank_changed.tiktoken": b"".join(lines[:5] + [tok_ + b" 6\n"] + lines[6:]),
        "flipped.tiktoken.gz": gzip.compress(bytes(flipped)),
    }


def test_corrupted_assets_are_rejected(tmp_path, asset_bytes, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # must not disable the check
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))
    for name, data in _variants(asset_bytes).items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(VocabFileError) as info:
            O200kHarmonyTokenizer(p)
        msg = str(info.value)
        assert str(p) in msg and O200K_BASE_SHA256 in msg, msg
        raw = gzip.decompress(data) if name.endswith(".gz") else data
        assert hashlib.sha256(raw).hexdigest() in msg, msg
    # corrupt gzip
    good_gz = DEFAULT_VOCAB_PATH.read_bytes()
    bad_gz = tmp_path / "corrupt.tiktoken.gz"
    bad_gz.write_bytes(good_gz[: len(good_gz) - 100])
    with pytest.raises(VocabFileError, match="corrupt gzip") as info:
        O200kHarmonyTokenizer(bad_gz)
    assert O200K_BASE_SHA256 in str(info.value) and str(bad_gz) in str(info.value)
    crc = bytearray(good_gz)
    crc[-6] ^= 0xFF  # CRC32 trailer
    (tmp_path / "crc.gz").write_bytes(bytes(crc))
    with pytest.raises(VocabFileError, match="corrupt gzip"):
        O200kHarmonyTokenizer(tmp_path / "crc.gz")
    # missing file, URL
    with pytest.raises(VocabFileError, match="cannot read") as info:
        O200kHarmonyTokenizer(tmp_path / "missing.tiktoken")
    assert O200K_BASE_SHA256 in str(info.value)
    with pytest.raises(VocabFileError, match="URL"):
        O200kHarmonyTokenizer(URL)
    # nothing was cached or written anywhere
    assert list(cache.iterdir()) == []


def test_plain_asset_and_env_override(tmp_path, asset_bytes, monkeypatch):
    plain = tmp_path / "o200k_base.tiktoken"
    plain.write_bytes(asset_bytes)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setenv("VPMOE_O200K_BASE_PATH", str(plain))
    t = O200kHarmonyTokenizer()
    assert t.path == str(plain) and t.tokenize("hello world") == [24912, 2375]
    # A file corrupted after a successful load is still detected (no stale cache).
    plain.write_bytes(asset_bytes[:-10] + b"AAAA 1\n\n\n")
    with pytest.raises(VocabFileError, match="expected"):
        O200kHarmonyTokenizer()
    assert sorted(os.listdir(tmp_path)) == before
    monkeypatch.setenv("VPMOE_O200K_BASE_PATH", str(tmp_path / "nope"))
    with pytest.raises(VocabFileError, match="nope"):
        O200kHarmonyTokenizer()


# --------------------------------------------------------------------------------------------
# 6. Bad input (docs/design.md#text-the-encoder-refuses-or-repairs)
# --------------------------------------------------------------------------------------------


def test_bad_text_types(tok):
    with pytest.raises(TypeError, match="str, got bytes"):
        tok.tokenize(b"hello")
    with pytest.raises(TypeError, match="str"):
        tok.tokenize(None)


def test_lone_surrogates(tok, r1):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 1"):
        tok.tokenize("a\ud800b")
    with pytest.raises(ValueError, match=r"U\+DC00 at index 3"):
        tok.tokenize("\ud83d\ude00x\udc00")
    # A surrogate pair given as two code units is valid UTF-16: recombined like tiktoken.
    assert tok.tokenize("\ud83d\ude00") == tok.tokenize("😀") == [84083]
    rep = O200kHarmonyTokenizer(surrogate_errors="replace")
    for s in ["a\ud800b", "\udfff", "x\ud83d\ude00\ud800 y"]:
        assert rep.tokenize(s) == r1.encode_ordinary(s)
    assert rep.tokenize("a\ud800b") == [64, 3251, 65]


def test_bad_ids(tok):
    for bad, pos in (([1, 2, 201_088], 2), ([-1], 0), ([5, 2**32], 1), ([0, 2**70], 1)):
        with pytest.raises(ValueError, match=rf"invalid token id {bad[pos]} at position {pos}"):
            tok.detokenize(bad)
    with pytest.raises(ValueError, match="201088"):
        tok.detokenize(np.array([3, 201_088], dtype=np.int64))
    with pytest.raises(ValueError, match="position 1"):
        tok.detokenize(torch.tensor([3, -5]))
    with pytest.raises(TypeError, match=r"1\.5 at position 1"):
        tok.detokenize([3, 1.5])
    with pytest.raises(TypeError):
        tok.detokenize(np.array([1.0]))
    with pytest.raises(TypeError):
        tok.detokenize("abc")
    with pytest.raises(ValueError, match="position 0"):
        tok.offsets([201_088])
    with pytest.raises(ValueError, match="position 1"):
        tok.detokenize([1, 201_090], skip_special_tokens=True)


def test_id_containers(tok):
    ids = tok.tokenize("containers 🙂")
    for c in (ids, tuple(ids), np.array(ids, np.int32), np.array(ids, np.uint32),
              np.array(ids, np.int64), torch.tensor(ids), torch.tensor(ids, dtype=torch.int32)):
        assert tok.detokenize(c) == "containers 🙂"


def test_invalid_utf8_policy(tok):
    # "🙂" is one token; a token boundary inside a character decodes to U+FFFD by default.
    ids = tok.tokenize("🙂🙃")
    frag = ids[1:2]  # f0 9f 99: an incomplete character
    assert tok.detokenize(frag) == "\ufffd"
    assert tok.detokenize_bytes(frag) == b"\xf0\x9f\x99"
    with pytest.raises(UnicodeDecodeError):
        tok.detokenize(frag, errors="strict")
    strict = O200kHarmonyTokenizer(decode_errors="strict")
    with pytest.raises(UnicodeDecodeError):
        strict.detokenize(frag)
    with pytest.raises(ValueError, match="decode_errors"):
        O200kHarmonyTokenizer(decode_errors="nope")


def test_whitespace_run_of_a_million(tok, r1):
    """tiktoken panics (PanicException, a BaseException) here; we return tiktoken's ids, checked
    against tiktoken's own Python-regex splitter (``_encode_only_native_bpe``)."""
    text = "a" + " " * 1_000_000 + "b\t\t" + "\u3000" * 100_001
    ids = tok.tokenize(text)
    assert ids == r1._encode_only_native_bpe(text)
    assert tok.detokenize(ids) == text
    # A long run that ends in a newline is handled by tiktoken's own (linear) branch.
    text2 = "x" + "\t" * 200_000 + "\n" + "y"
    assert tok.tokenize(text2) == r1.encode_ordinary(text2)


def test_find_long_whitespace_runs(monkeypatch):
    import re

    import megatron_base.o200k as o200k_mod  # defines find_long_whitespace_runs

    ws = "".join(c for c in WHITESPACE if c not in "\r\n") + "\u2001\u2009"
    pat = {t: re.compile(f"(?<![{ws}])[{ws}]{{{t},}}|^[{ws}]{{{t},}}") for t in (1, 2, 3, 7)}
    rnd = random.Random(5)
    alphabet = list(ws) + ["a", "\n", "\r", "\u200b", "\x1c"]
    for _ in range(300):
        text = "".join(rnd.choice(alphabet) * rnd.randint(1, 9) for _ in range(rnd.randint(0, 30)))
        for t, p in pat.items():
            assert find_long_whitespace_runs(text, t) == [m.span() for m in p.finditer(text)]
    # No quadratic trap: many runs just below the threshold are scanned in linear time,
    # counted as characters touched (probes + slices + regex matches; each character at most
    # twice). The wall time is measured by benchmarks/tokenizer.py (unit_test_timings).
    touched = []

    class CountingStr(str):
        def __getitem__(self, key):
            out = str.__getitem__(self, key)
            touched.append(len(out))
            return out

    class CountingRe:
        def match(self, s, pos):
            m = real_re.match(s, pos)
            touched.append(m.end() - pos)
            return m

    real_re = o200k_mod._WS_RUN_RE
    monkeypatch.setattr(o200k_mod, "_WS_RUN_RE", CountingRe())
    for text, threshold, want in (
        ((" " * 99_999 + "x") * 20, 100_000, []),
        (("\u3000" * 999 + "y") * 400, 1_000, []),
        (("\t" * 1_000 + "z") * 400, 1_000, [(1001 * i, 1001 * i + 1000) for i in range(400)]),
    ):
        touched.clear()
        assert find_long_whitespace_runs(CountingStr(text), threshold) == want
        assert sum(touched) <= 2 * len(text), (sum(touched), len(text))
        assert len(touched) <= 3 * (len(text) // threshold + 1)


def test_skip_special_tokens_boundary(tok, r1):
    """``skip_special_tokens`` drops exactly the ids >= 199,998: ``<|startoftext|>`` (199,998,
    the first special id) never leaks into the text, the last ordinary ids (199,996/199,997)
    survive, whatever the id container."""
    last_ordinary = [199_996, 199_997]
    assert all(r1.decode_single_token_bytes(t) for t in last_ordinary)
    body = tok.tokenize("ok ")
    ids = [199_998] + body + last_ordinary + [199_998, 199_999, 200_006, 200_018, 201_087]
    want = r1.decode(body + last_ordinary)
    for c in (ids, np.array(ids, np.int64), torch.tensor(ids)):
        got = tok.detokenize(c, skip_special_tokens=True)
        assert got == want
        assert "<|startoftext|>" not in got and "<|endoftext|>" not in got
    assert tok.detokenize([199_998], skip_special_tokens=True) == ""
    assert tok.detokenize([199_997], skip_special_tokens=True) == r1.decode([199_997]) != ""
    # Without skipping, the special token is decoded as its text.
    assert tok.detokenize([199_998, 199_997]) == "<|startoftext|>" + r1.decode([199_997])


def test_decode_refuses_non_integer_ids_and_nd_input(tok):
    """Booleans, mappings/sets and arrays of more than one dimension are not token-id
    sequences: refused with a clear error instead of being decoded (``True`` as id 1, a dict's
    keys, a flattened 2-D batch)."""
    for decode in (tok.detokenize, tok.detokenize_bytes, tok._tokenizer.decode):
        with pytest.raises(TypeError, match=r"True at position 0.*bool"):
            decode([True, False])
        with pytest.raises(TypeError, match=r"position 1.*bool"):
            decode([5, False])
        with pytest.raises(TypeError, match="bool"):
            decode(torch.tensor([True, False]))
        with pytest.raises(TypeError, match="bool"):
            decode(np.array([True, False]))
        with pytest.raises(TypeError, match="dict"):
            decode({1: "a", 2: "b"})
        with pytest.raises(TypeError, match="set"):
            decode({1, 2})
        with pytest.raises(ValueError, match=r"1-D.*2-D"):
            decode(torch.tensor([[1, 2], [3, 4]]))
        with pytest.raises(ValueError, match=r"1-D.*2-D"):
            decode(np.array([[1, 2], [3, 4]], np.int32))
        with pytest.raises(ValueError, match=r"1-D.*3-D"):
            decode(torch.zeros(1, 1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="bool"):
        tok.detokenize([True], skip_special_tokens=True)
    with pytest.raises(ValueError, match="1-D"):
        tok.offsets(np.array([[1, 2]]))
    # Still accepted: 1-D containers, NumPy / torch integer scalars in a list, generators.
    ids = tok.tokenize("still fine")
    assert tok.detokenize([np.int64(t) for t in ids]) == "still fine"
    assert tok.detokenize(torch.tensor(ids)[None][0]) == "still fine"
    assert tok.detokenize(t for t in ids) == "still fine"


# --------------------------------------------------------------------------------------------
# 7. Through Megatron's factory: MegatronTokenizer.from_pretrained + the compat fix
# --------------------------------------------------------------------------------------------

FACTORY_FIX = "tokenizer_class_metadata"
FACTORY_TEXTS = ["hello world", "x <|endoftext|> y", "<|start|>assistant<|channel|>final<|message|>hi<|end|>",
                 "café 漢字 🙂", "  two  spaces\n\n"]


@pytest.fixture()
def factory_fix():
    """The compat fix applied for the test (restored to its earlier state after)."""
    from megatron_base import compat

    was = FACTORY_FIX in compat.applied()
    compat.apply(only=[FACTORY_FIX])
    yield
    if not was:
        compat.remove(only=[FACTORY_FIX])


def _assert_same_tokenizer(got, tok):
    assert type(got) is O200kHarmonyTokenizer
    assert got.vocab_size == 201_088 == padded_vocab_size(1)
    assert got.eod == 199_999 and got.token_to_id("<|endoftext|>") == 199_999
    assert got.library == "o200k-harmony"
    assert got.unique_identifiers == tok.unique_identifiers
    for text in FACTORY_TEXTS:
        ids = got.tokenize(text)
        assert ids == tok.tokenize(text)
        assert got.detokenize(ids) == text
        special = got.tokenize(text, allowed_special="all")
        assert special == tok.tokenize(text, allowed_special="all")
        assert got.detokenize(special) == tok.detokenize(special) == text
    assert got.tokenize("<|endoftext|>", allowed_special="all") == [199_999]


def test_megatron_factory_builds_our_tokenizer(tok, tmp_path, factory_fix):
    import json

    from megatron.core.tokenizers import MegatronTokenizer

    from megatron_base.tokenizer import write_tokenizer_metadata

    folder = tmp_path / "tokenizer"
    meta = write_tokenizer_metadata(folder)
    assert meta == folder / "tokenizer_metadata.json"
    assert sorted(p.name for p in folder.iterdir()) == ["o200k_base.tiktoken.gz", "tokenizer_metadata.json"]
    data = json.loads(meta.read_text())
    assert data == {"library": "o200k-harmony", "class_name": "O200kHarmonyTokenizer",
                    "class_path": "megatron_base.tokenizer", "model_type": "gpt", "chat_template": None}
    # Megatron's three ways in: the folder, the asset file (metadata found in its folder), and
    # an explicit metadata dict; keyword arguments reach our constructor.
    by_folder = MegatronTokenizer.from_pretrained(str(folder))
    _assert_same_tokenizer(by_folder, tok)
    assert by_folder.metadata_path == str(meta)
    _assert_same_tokenizer(MegatronTokenizer.from_pretrained(str(folder / "o200k_base.tiktoken.gz")), tok)
    _assert_same_tokenizer(
        MegatronTokenizer.from_pretrained(tokenizer_path=str(folder), metadata_path=data), tok
    )
    strict = MegatronTokenizer.from_pretrained(str(folder), special_tokens_policy="raise")
    with pytest.raises(ValueError):
        strict.tokenize("<|endoftext|>")
    # A second write is a no-op; a different metadata file is only replaced with overwrite.
    assert write_tokenizer_metadata(folder) == meta
    meta.write_text(json.dumps({**data, "model_type": "default"}))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tokenizer_metadata(folder)
    write_tokenizer_metadata(folder, overwrite=True)
    assert json.loads(meta.read_text()) == data


def test_megatron_factory_fails_without_the_compat_fix(tmp_path):
    """0.16.1's from_pretrained ignores class_name / class_path and falls back to GPTTokenizer,
    which does not know the library: the fix is what makes the factory work."""
    from megatron.core.tokenizers import MegatronTokenizer

    from megatron_base import compat
    from megatron_base.tokenizer import write_tokenizer_metadata

    write_tokenizer_metadata(tmp_path)
    with pytest.raises(ValueError, match="unknown compat fix"):
        compat.apply(only=["tokenizer_metadata"])
    was = FACTORY_FIX in compat.applied()
    compat.remove(only=[FACTORY_FIX])
    try:
        with pytest.raises(KeyError, match="o200k-harmony"):
            MegatronTokenizer.from_pretrained(str(tmp_path))
        # the metadata Megatron's own write_metadata would write for our class is just as stuck
        with pytest.raises(AssertionError, match="not supported"):
            MegatronTokenizer.write_metadata(str(tmp_path), "o200k-harmony", tokenizer_class=O200kHarmonyTokenizer,
                                             metadata_path=str(tmp_path / "m.json"))
        compat.apply(only=[FACTORY_FIX])
        assert type(MegatronTokenizer.from_pretrained(str(tmp_path))) is O200kHarmonyTokenizer
    finally:
        if not was:
            compat.remove(only=[FACTORY_FIX])


def test_megatron_factory_other_metadata_unchanged(tmp_path, factory_fix):
    """Metadata without class keys still takes 0.16.1's own route; a bad class is a clear error."""
    import json

    from megatron.core.tokenizers import MegatronTokenizer
    from megatron.core.tokenizers.text.models import DefaultTokenizerText

    null = MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=10)
    assert type(null) is DefaultTokenizerText and null.library == "null"
    bad = {"library": "o200k-harmony", "class_name": "Nope", "class_path": "megatron_base.tokenizer"}
    with pytest.raises(ValueError, match="cannot be imported"):
        MegatronTokenizer.from_pretrained(str(tmp_path), metadata_path=bad)
    with pytest.raises(TypeError, match="not a MegatronTokenizerBase"):
        MegatronTokenizer.from_pretrained(str(tmp_path), metadata_path={**bad, "class_name": "O200kHarmonyLibrary"})
    with pytest.raises(AssertionError, match="doesn't exist"):  # no metadata file: Megatron's message
        MegatronTokenizer.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "m.json").write_text(json.dumps({**bad, "class_name": "O200kHarmonyTokenizer"}))
    with pytest.raises(VocabFileError, match="exactly one"):  # folder without an asset
        MegatronTokenizer.from_pretrained(str(tmp_path), metadata_path=str(tmp_path / "m.json"))


def test_write_tokenizer_metadata_next_to_an_asset(tmp_path, asset_bytes):
    from megatron_base.tokenizer import write_tokenizer_metadata

    plain = tmp_path / "plain" / "o200k_base.tiktoken"
    plain.parent.mkdir()
    plain.write_bytes(asset_bytes)
    assert write_tokenizer_metadata(plain) == plain.parent / "tokenizer_metadata.json"
    assert sorted(p.name for p in plain.parent.iterdir()) == ["o200k_base.tiktoken", "tokenizer_metadata.json"]
    # a plain asset from elsewhere is copied under the plain name, hash-checked first
    assert (write_tokenizer_metadata(tmp_path / "copy", vocab_path=plain).parent / "o200k_base.tiktoken").is_file()
    bad = tmp_path / "bad" / "o200k_base.tiktoken"
    bad.parent.mkdir()
    bad.write_bytes(asset_bytes[:-10])
    with pytest.raises(VocabFileError, match="sha256"):
        write_tokenizer_metadata(bad)
    with pytest.raises(VocabFileError, match="sha256"):
        write_tokenizer_metadata(tmp_path / "other", vocab_path=bad)
    assert not (tmp_path / "other" / "o200k_base.tiktoken").exists()
    assert not (tmp_path / "bad" / "tokenizer_metadata.json").exists()
