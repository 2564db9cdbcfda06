"""The o200k Harmony encoding (GPT-OSS vocabulary): the verified asset, the tiktoken encoding,
the text policies, and :class:`O200kHarmonyLibrary`, the conversions behind
:class:`megatron_base.tokenizer.O200kHarmonyTokenizer` (Megatron-Core's tokenizer *library*
object, ``MegatronTokenizerTextAbstract`` of ``megatron.core.tokenizers.text.libraries``).

It wraps tiktoken's Rust ``CoreBPE`` (no BPE, regex splitting or merging in Python); the
``o200k_harmony`` encoding is built from the vendored asset and reached through tiktoken 0.14's
``Encoding._core_bpe`` / ``_special_tokens`` (tiktoken is pinned; these are tiktoken's, not
Megatron's or torch's internals). Design and policies: docs/design.md#the-tokenizer. The Harmony
renderer (:mod:`megatron_base.harmony`) encodes its text segments with this module; the
Megatron-facing tokenizer class (:mod:`megatron_base.tokenizer`) sits above both.

Invariants (checked when an encoding is built)
----------------------------------------------
* The BPE asset is ``o200k_base.tiktoken`` (plain or gzipped); the sha256 of the
  **decompressed** bytes must be :data:`O200K_BASE_SHA256`. The vendored copy
  ``megatron_base/data/o200k_base.tiktoken.gz`` is used unless a path is given; a given path
  must exist. Nothing is fetched from the network and nothing is written to disk (tiktoken's
  ``load_tiktoken_bpe`` cache pitfalls are avoided by parsing the file here). A wrong,
  truncated or corrupt file raises :class:`VocabFileError` (a ``ValueError``) naming the file,
  the expected and the actual sha256.
* 199,998 mergeable ranks (ids 0 ... 199,997) and 1,090 special ids 199,998 ... 201,087:
  ``vocab_size == 201088`` (:data:`O200K_HARMONY_VOCAB_SIZE`, divisible by 128).

Special tokens (docs/design.md#special-tokens)
----------------------------------------------
The string -> id map equals tiktoken 0.14's ``o200k_harmony`` exactly (1,091 names: id 200,018
is named both ``<|endofprompt|>`` and ``<|reserved_200018|>``). The id -> string map is a
bijection on 199,998 ... 201,087 with 200,018 -> ``<|endofprompt|>``. Id 201,088 (which
openai-harmony 0.0.8 accepts because of an off-by-one) is rejected: it lies outside the
201,088-row embedding. Named ids: :data:`SPECIAL_TOKEN_IDS`.

Megatron ids (docs/design.md#megatron-ids-and-vocabulary-rows)
--------------------------------------------------------------
``eod = eos = 199999`` (``<|endoftext|>``, the document boundary), ``bos = 199998``
(``<|startoftext|>``, defined but never prepended), ``pad = -1`` (no pad token: Megatron's own
sentinel, which ``GPTDataset`` maps to a zero-loss 0). Harmony's generation stop ids are
:data:`HARMONY_STOP_TOKEN_IDS` (``<|return|>``, ``<|end|>``, ``<|call|>``).

Encoding policy (docs/design.md#text-the-encoder-refuses-or-repairs)
-------------------------------------------------------------------
* ``encode(text)`` treats special-token text as ordinary text by default
  (``special_tokens_policy="ordinary"``, identical to tiktoken's ``encode_ordinary`` and to
  Harmony's content rendering). ``"raise"`` raises ``ValueError`` naming the first
  special-token string found (tiktoken's ``encode`` default); ``"allow_all"`` maps every
  special-token string to its id. A caller can allow specific tokens per call with
  ``allowed_special=``.
* Whitespace runs: tiktoken 0.14 aborts with ``pyo3_runtime.PanicException`` (a
  ``BaseException``) on a run of >= 999,999 whitespace characters that is not followed by a
  newline (fancy-regex backtracking stack). Such runs never reach the regex engine here: the
  text is cut where tiktoken's pre-tokenizer necessarily cuts (the run is exactly one
  pre-token: the whole run at the end of the text, or the run minus its last character, which
  begins the next pre-token, before a non-space character), each side is encoded by tiktoken
  and the run itself by tiktoken's single-piece BPE (``CoreBPE.encode_single_piece``). The ids
  are therefore the ones tiktoken's algorithm defines; the tests prove the cut equal to
  tiktoken by lowering the threshold to 2 characters on fuzzed text.
* Lone surrogates: ``ValueError`` naming the index of the first one by default;
  ``surrogate_errors="replace"`` reproduces tiktoken exactly (U+FFFD). Surrogate *pairs* given
  as two code units are recombined, as tiktoken does.
* ``decode(ids)``: ids must be integers in ``[0, 201088)``; anything else raises
  ``ValueError`` (``TypeError`` for non-integers, booleans included) naming the bad value and
  its position. ``ids`` is one sequence (list, tuple, iterable, 1-D NumPy array or tensor): a
  dict or set is a ``TypeError``, an array or tensor of more than one dimension a
  ``ValueError``.
  Invalid UTF-8 (token boundaries need not be character boundaries) is replaced with U+FFFD by
  default (``decode_errors="replace"``, what Megatron's streaming decode needs);
  ``decode_errors="strict"`` raises ``UnicodeDecodeError``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import re
import threading
import zlib
from collections.abc import Mapping as _Mapping
from collections.abc import Set as _Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import (
    AbstractSet,
    Dict,
    Iterable,
    List,
    Literal,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import tiktoken
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)

__all__ = [
    "O200K_BASE_SHA256",
    "O200K_HARMONY_VOCAB_SIZE",
    "O200K_PAT_STR",
    "SPECIAL_TOKEN_IDS",
    "HARMONY_STOP_TOKEN_IDS",
    "HARMONY_ASSISTANT_ACTION_STOP_TOKEN_IDS",
    "BOS_ID",
    "EOD_ID",
    "PAD_ID",
    "ENCODING_NAME",
    "DEFAULT_VOCAB_PATH",
    "VOCAB_PATH_ENV",
    "LONG_WHITESPACE_RUN",
    "LONE_SURROGATE_RE",
    "SpecialPolicy",
    "VocabFileError",
    "O200kHarmonyLibrary",
    "load_o200k_base_bytes",
    "resolve_vocab_path",
    "build_o200k_harmony_encoding",
    "o200k_harmony_special_tokens",
    "padded_vocab_size",
    "find_long_whitespace_runs",
]

# --------------------------------------------------------------------------------------------
# Locked constants (docs/design.md#the-tokenizer)
# --------------------------------------------------------------------------------------------

#: sha256 of the decompressed ``o200k_base.tiktoken`` (tiktoken's registry, openai-harmony).
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
#: Number of mergeable ranks in ``o200k_base.tiktoken`` (ids 0 ... 199,997).
O200K_N_MERGEABLE = 199_998
#: Vocabulary size = embedding rows: 199,998 ranks + 1,090 special ids (2^7 * 1571).
O200K_HARMONY_VOCAB_SIZE = 201_088
#: Name of the encoding (same as tiktoken's registry entry it reproduces).
ENCODING_NAME = "o200k_harmony"

#: The vendored asset (gzip; its own checksum depends on the gzip header and is no identity).
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "o200k_base.tiktoken.gz"
#: Environment variable that may point at another copy of the asset (must exist).
VOCAB_PATH_ENV = "VPMOE_O200K_BASE_PATH"

#: Pre-tokenization regex of o200k_base / o200k_harmony, verbatim from tiktoken 0.14's registry.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

#: Named special ids (docs/design.md#special-tokens). Every other id in 199,998 ... 201,087 is
#: ``<|reserved_{id}|>``.
SPECIAL_TOKEN_IDS: Dict[str, int] = {
    "<|startoftext|>": 199_998,
    "<|endoftext|>": 199_999,
    "<|return|>": 200_002,
    "<|constrain|>": 200_003,
    "<|channel|>": 200_005,
    "<|start|>": 200_006,
    "<|end|>": 200_007,
    "<|message|>": 200_008,
    "<|call|>": 200_012,
    "<|endofprompt|>": 200_018,
}
FIRST_SPECIAL_ID = 199_998
BOS_ID = SPECIAL_TOKEN_IDS["<|startoftext|>"]
EOD_ID = SPECIAL_TOKEN_IDS["<|endoftext|>"]
PAD_ID = -1
#: Harmony generation stop ids: ``<|return|>``, ``<|end|>``, ``<|call|>``.
HARMONY_STOP_TOKEN_IDS: Tuple[int, ...] = (200_002, 200_007, 200_012)
#: Stop ids of an assistant action: ``<|return|>``, ``<|call|>``.
HARMONY_ASSISTANT_ACTION_STOP_TOKEN_IDS: Tuple[int, ...] = (200_002, 200_012)

#: Non-newline characters of Rust regex's Unicode ``\s`` (the White_Space property minus
#: ``\r`` and ``\n``); the only characters whose long runs can reach fancy-regex's
#: backtracking ``\s+(?!\S)``. Python's ``str.isspace`` differs (e.g. U+001C..U+001F).
_WS_NO_NEWLINE = (
    "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS_CHARS = (
    "\t\x0b\x0c \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_WS_SET = frozenset(_WS_CHARS)
_WS_RUN_RE = re.compile(f"[{_WS_NO_NEWLINE}]*")


def find_long_whitespace_runs(text: str, threshold: int) -> List[Tuple[int, int]]:
    """Maximal runs ``[start, end)`` of >= ``threshold`` non-newline whitespace characters.

    Linear and cheap: a run that long covers an index that is a multiple of ``threshold``, so
    only those ``len(text) / threshold`` characters are probed (a regex search would be
    quadratic in the length of shorter runs).
    """
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    runs: List[Tuple[int, int]] = []
    n = len(text)
    if n < threshold:
        return runs
    pos = 0
    ws = _WS_SET
    for i in range(0, n, threshold):
        if i < pos or text[i] not in ws:
            continue
        seg = text[pos:i]
        start = i - (len(seg) - len(seg.rstrip(_WS_CHARS)))
        end = _WS_RUN_RE.match(text, i).end()
        if end - start >= threshold:
            runs.append((start, end))
        pos = end
    return runs


#: Runs of at least this many such characters bypass the regex engine (tiktoken 0.14 panics
#: at 999,999); a 10x margin. Tests lower it (``_long_run_threshold``) to prove the cut exact.
LONG_WHITESPACE_RUN = 100_000
_NO_SPECIAL: frozenset = frozenset()

LONE_SURROGATE_RE = re.compile(
    "[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]"
)

SpecialPolicy = Literal["ordinary", "raise", "allow_all"]
_POLICIES = ("ordinary", "raise", "allow_all")


class VocabFileError(ValueError):
    """The BPE asset is missing, unreadable, corrupt or not the official o200k_base file."""


# --------------------------------------------------------------------------------------------
# Loader: the verified asset, read offline (module docstring, Invariants)
# --------------------------------------------------------------------------------------------


def o200k_harmony_special_tokens() -> Dict[str, int]:
    """The 1,091-name special-token table of tiktoken 0.14 ``o200k_harmony``
    (docs/design.md#special-tokens).

    Insertion order equals tiktoken's (it decides which name of id 200,018 tiktoken's Rust
    decoder keeps), so decode results are identical to the registry encoding.
    """
    table: Dict[str, int] = {"<|endoftext|>": 199_999, "<|endofprompt|>": 200_018}
    table.update(
        {
            "<|startoftext|>": 199_998,
            "<|endoftext|>": 199_999,
            "<|reserved_200000|>": 200_000,
            "<|reserved_200001|>": 200_001,
            "<|return|>": 200_002,
            "<|constrain|>": 200_003,
            "<|reserved_200004|>": 200_004,
            "<|channel|>": 200_005,
            "<|start|>": 200_006,
            "<|end|>": 200_007,
            "<|message|>": 200_008,
            "<|reserved_200009|>": 200_009,
            "<|reserved_200010|>": 200_010,
            "<|reserved_200011|>": 200_011,
            "<|call|>": 200_012,
        }
    )
    table.update({f"<|reserved_{i}|>": i for i in range(200_013, O200K_HARMONY_VOCAB_SIZE)})
    return table


def resolve_vocab_path(path: Union[str, os.PathLike, None]) -> Path:
    """The asset path: ``path``, else ``$VPMOE_O200K_BASE_PATH``, else the vendored copy; a URL is
    refused (nothing is ever downloaded)."""
    if path is None:
        env = os.environ.get(VOCAB_PATH_ENV)
        path = env if env else DEFAULT_VOCAB_PATH
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if "://" in text:
        raise VocabFileError(
            f"o200k_base vocabulary path {text!r} is a URL; this library never downloads. "
            f"Pass a local copy of the official o200k_base.tiktoken (plain or .gz, sha256 of "
            f"the decompressed bytes {O200K_BASE_SHA256})."
        )
    return Path(text)


def load_o200k_base_bytes(path: Union[str, os.PathLike, None] = None) -> Tuple[bytes, Path]:
    """Read the asset (plain or gzip), verify the sha256 of the decompressed bytes.

    Args:
        path: file to read; ``None`` = ``$VPMOE_O200K_BASE_PATH`` if set, else the vendored
            copy. Gzip is recognised by its magic bytes, not by the file name.

    Returns:
        (decompressed bytes, resolved path).

    Raises:
        VocabFileError: missing/unreadable file, corrupt gzip, or a sha256 mismatch; the
            message names the file, the expected and (where one exists) the actual sha256.
    """
    p = resolve_vocab_path(path)
    hint = (
        "it must be the official o200k_base.tiktoken (decompressed if .gz) with sha256 "
        f"{O200K_BASE_SHA256}"
    )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise VocabFileError(
            f"cannot read o200k_base vocabulary file {str(p)!r} ({exc.strerror or exc}); "
            f"expected sha256 {O200K_BASE_SHA256}: {hint}. The vendored copy is "
            f"{DEFAULT_VOCAB_PATH}."
        ) from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            actual = hashlib.sha256(raw).hexdigest()
            raise VocabFileError(
                f"o200k_base vocabulary file {str(p)!r} is a corrupt gzip file ({exc}); "
                f"expected sha256 {O200K_BASE_SHA256} of the decompressed bytes, got a file "
                f"that cannot be decompressed (sha256 of the gzip file itself: {actual}); "
                f"{hint}."
            ) from exc
    else:
        data = raw
    actual = hashlib.sha256(data).hexdigest()
    if actual != O200K_BASE_SHA256:
        raise VocabFileError(
            f"o200k_base vocabulary file {str(p)!r} has sha256 {actual} (of the "
            f"{'decompressed ' if data is not raw else ''}bytes), expected "
            f"{O200K_BASE_SHA256}: {hint}. Replace it with a fresh copy (the vendored one is "
            f"{DEFAULT_VOCAB_PATH})."
        )
    return data, p


def _parse_ranks(data: bytes, path: Path) -> Dict[bytes, int]:
    ranks: Dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if not line:
                continue
            token, rank = line.split(b" ")
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error) as exc:  # pragma: no cover - hash-checked above
        raise VocabFileError(f"cannot parse o200k_base vocabulary file {str(path)!r}: {exc}")
    if len(ranks) != O200K_N_MERGEABLE or sorted(ranks.values()) != list(
        range(O200K_N_MERGEABLE)
    ):  # pragma: no cover - hash-checked above
        raise VocabFileError(
            f"o200k_base vocabulary file {str(path)!r} does not hold ranks 0..199997 once each"
        )
    return ranks


_ENCODING_CACHE: Dict[str, tiktoken.Encoding] = {}
_ENCODING_LOCK = threading.Lock()


def build_o200k_harmony_encoding(
    path: Union[str, os.PathLike, None] = None,
) -> Tuple[tiktoken.Encoding, Path]:
    """Build (or reuse) the verified ``o200k_harmony`` ``tiktoken.Encoding``.

    The file is read and hash-checked on every call; the parsed encoding is cached per
    process keyed by that verified hash (so a later-corrupted file is always detected).
    """
    data, p = load_o200k_base_bytes(path)
    with _ENCODING_LOCK:
        enc = _ENCODING_CACHE.get(O200K_BASE_SHA256)
        if enc is None:
            ranks = _parse_ranks(data, p)
            specials = o200k_harmony_special_tokens()
            enc = tiktoken.Encoding(
                name=ENCODING_NAME,
                pat_str=O200K_PAT_STR,
                mergeable_ranks=ranks,
                special_tokens=specials,
            )
            # 1,091 names -> 1,090 ids, so tiktoken's explicit_n_vocab check cannot be used;
            # check the id set instead.
            ids = set(ranks.values()) | set(specials.values())
            if enc.max_token_value != O200K_HARMONY_VOCAB_SIZE - 1 or ids != set(
                range(O200K_HARMONY_VOCAB_SIZE)
            ):  # pragma: no cover - locked table
                raise RuntimeError("o200k_harmony id set is not exactly range(201088)")
            if enc.decode_single_token_bytes(200_018) != b"<|endofprompt|>":
                raise RuntimeError(  # pragma: no cover - depends on tiktoken's hash map
                    "tiktoken decodes id 200018 as "
                    f"{enc.decode_single_token_bytes(200_018)!r}, expected <|endofprompt|>"
                )
            _ENCODING_CACHE[O200K_BASE_SHA256] = enc
    return enc, p


def padded_vocab_size(tensor_model_parallel_size: int = 1) -> int:
    """Vocabulary rows for a tensor-parallel size: always 201,088, never padded further
    (docs/design.md#megatron-ids-and-vocabulary-rows).

    Raises:
        ValueError: if 201,088 is not divisible by ``tensor_model_parallel_size``.
    """
    tp = tensor_model_parallel_size
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_model_parallel_size must be a positive int, got {tp!r}")
    if O200K_HARMONY_VOCAB_SIZE % tp:
        allowed = [d for d in (1, 2, 4, 8, 16, 32, 64, 128)]
        raise ValueError(
            f"vocab size {O200K_HARMONY_VOCAB_SIZE} (locked for GPT-OSS parity) is not "
            f"divisible by tensor_model_parallel_size={tp}; use one of {allowed} (or 1571 and "
            "its multiples that divide 201088)"
        )
    return O200K_HARMONY_VOCAB_SIZE


# --------------------------------------------------------------------------------------------
# The Megatron "library" object (the conversions MegatronTokenizerText delegates to)
# --------------------------------------------------------------------------------------------


class O200kHarmonyLibrary(MegatronTokenizerTextAbstract):
    """Tokenizer library object of :class:`O200kHarmonyTokenizer` (wraps tiktoken).

    Args:
        path: asset path (see :func:`load_o200k_base_bytes`).
        special_tokens_policy: ``"ordinary"`` (default), ``"raise"`` or ``"allow_all"``
            (docs/design.md#special-tokens).
        decode_errors: UTF-8 error handler of ``ids_to_text``: ``"replace"`` (default) or
            ``"strict"`` (or any Python codec handler).
        surrogate_errors: ``"strict"`` (default: lone surrogates raise ``ValueError``) or
            ``"replace"`` (tiktoken's behaviour, U+FFFD).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike, None] = None,
        special_tokens_policy: SpecialPolicy = "ordinary",
        decode_errors: str = "replace",
        surrogate_errors: Literal["strict", "replace"] = "strict",
    ) -> None:
        if special_tokens_policy not in _POLICIES:
            raise ValueError(
                f"special_tokens_policy must be one of {_POLICIES}, got {special_tokens_policy!r}"
            )
        if surrogate_errors not in ("strict", "replace"):
            raise ValueError(
                f"surrogate_errors must be 'strict' or 'replace', got {surrogate_errors!r}"
            )
        try:
            b"\xff".decode("utf-8", errors=decode_errors)
        except LookupError as exc:
            raise ValueError(f"unknown decode_errors handler {decode_errors!r}") from exc
        except UnicodeDecodeError:
            pass
        self.encoding, self.path = build_o200k_harmony_encoding(path)
        self._core = self.encoding._core_bpe
        self.special_tokens_policy = special_tokens_policy
        self.decode_errors = decode_errors
        self.surrogate_errors = surrogate_errors
        self._specials: Dict[str, int] = dict(self.encoding._special_tokens)
        self._all_special: frozenset = frozenset(self._specials)
        self._long_run_threshold = LONG_WHITESPACE_RUN
        self._vocab: Optional[Dict[str, int]] = None
        self._inv_vocab: Optional[Dict[int, str]] = None

    # -- constants -------------------------------------------------------------------------

    vocab_size = O200K_HARMONY_VOCAB_SIZE
    eod = EOD_ID
    eod_id = EOD_ID
    eos_id = EOD_ID
    bos_id = BOS_ID
    pad_id = PAD_ID
    unk_id = None
    mask_id = None
    cls_id = None
    sep_id = None

    @property
    def special_tokens(self) -> Dict[str, int]:
        """Copy of the 1,091-name string -> id special table."""
        return dict(self._specials)

    # -- encoding --------------------------------------------------------------------------

    def _encode_segment(self, text: str) -> List[int]:
        """``encode_ordinary`` of valid Unicode, with long whitespace runs cut (module doc)."""
        core = self._core
        t = self._long_run_threshold
        if len(text) < t:
            return core.encode_ordinary(text)
        if t < 2:  # the cut below relies on runs of >= 2 characters
            raise ValueError("_long_run_threshold must be >= 2")
        out: Optional[List[int]] = None
        pos = 0
        n = len(text)
        for start, end in find_long_whitespace_runs(text, t):
            if end < n and text[end] in "\r\n":
                # ``\s*[\r\n]+`` (a linear regex-crate branch) takes the run: no panic.
                continue
            if out is None:
                out = []
            out += core.encode_ordinary(text[pos:start])
            cut = end if end == n else end - 1
            out += core.encode_single_piece(text[start:cut].encode("utf-8"))
            pos = cut
        if out is None:
            return core.encode_ordinary(text)
        out += core.encode_ordinary(text[pos:])
        return out

    def _encode_valid(self, text: str, allowed: AbstractSet[str]) -> List[int]:
        if not allowed:
            return self._encode_segment(text)
        if len(text) < self._long_run_threshold:
            return self._core.encode(text, allowed)
        # Split at allowed special tokens the way tiktoken's Rust encoder does (each gap is a
        # separate regex haystack), then encode each gap with the long-run cut.
        out: List[int] = []
        pos = 0
        for m in _special_regex(frozenset(allowed)).finditer(text):
            out += self._encode_segment(text[pos : m.start()])
            out.append(self._specials[m.group()])
            pos = m.end()
        out += self._encode_segment(text[pos:])
        return out

    def _repair_surrogates(self, text: str) -> str:
        m = LONE_SURROGATE_RE.search(text)
        if m is not None and self.surrogate_errors == "strict":
            raise ValueError(
                f"text contains a lone surrogate U+{ord(m.group()):04X} at index {m.start()} "
                "(not valid Unicode, cannot be encoded as UTF-8); fix the input or build the "
                "tokenizer with surrogate_errors='replace' to encode it as U+FFFD like tiktoken"
            )
        # Recombine surrogate pairs, replace lone ones (exactly tiktoken's fix-up).
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

    def encode(
        self,
        text: str,
        allowed_special: Union[Literal["all"], AbstractSet[str], None] = None,
    ) -> List[int]:
        """Encode one string to ids under the tokenizer's special-token policy.

        Args:
            text: the text (``str``; ``bytes`` raise ``TypeError``).
            allowed_special: special-token strings to map to their ids in this call
                (``"all"`` or a set of names); the policy decides about the others.

        Raises:
            TypeError: ``text`` is not a ``str``.
            ValueError: lone surrogate (unless ``surrogate_errors="replace"``); a disallowed
                special token under the ``"raise"`` policy; an unknown name in
                ``allowed_special``.
        """
        if type(text) is not str:
            if not isinstance(text, str):
                raise TypeError(
                    f"tokenize expects text of type str, got {type(text).__name__}"
                    + (" (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else "")
                )
        allowed = self._allowed_set(allowed_special)
        if self.special_tokens_policy == "raise":
            disallowed = self._all_special - allowed
            if disallowed and "<|" in text:
                m = _special_regex(frozenset(disallowed)).search(text)
                if m is not None:
                    raise ValueError(
                        f"text contains the special token {m.group()!r} at index {m.start()}, "
                        "which is not allowed under special_tokens_policy='raise'; pass "
                        "allowed_special={...} to encode it as a special token, or use the "
                        "'ordinary' policy to encode it as plain text"
                    )
        try:
            return self._encode_valid(text, allowed)
        except UnicodeEncodeError:
            return self._encode_valid(self._repair_surrogates(text), allowed)

    def _allowed_set(self, allowed_special) -> AbstractSet[str]:
        if allowed_special is None:
            return self._all_special if self.special_tokens_policy == "allow_all" else frozenset()
        if allowed_special == "all":
            return self._all_special
        if isinstance(allowed_special, str):
            raise TypeError(
                "allowed_special must be 'all' or a set of special-token strings, "
                f"got the string {allowed_special!r}"
            )
        allowed = frozenset(allowed_special)
        unknown = allowed - self._all_special
        if unknown:
            raise ValueError(
                f"allowed_special contains names that are not o200k_harmony special tokens: "
                f"{sorted(unknown)[:5]}"
            )
        return allowed

    def encode_to_numpy(self, text: str, allowed_special=None) -> np.ndarray:
        """Like :meth:`encode`, returning an ``int32`` NumPy array (for ``.bin`` writing).

        The common case -- no special token allowed, valid Unicode, shorter than the long
        whitespace-run threshold -- reads tiktoken's token buffer directly
        (``encode_to_tiktoken_buffer``, the GIL released while it encodes) instead of building
        a Python list; everything else takes :meth:`encode`. Same ids either way."""
        if (
            type(text) is str
            and len(text) < self._long_run_threshold
            and not self._allowed_set(allowed_special)
            and (self.special_tokens_policy != "raise" or "<|" not in text)
        ):
            try:
                buf = self._core.encode_to_tiktoken_buffer(text, _NO_SPECIAL)
            except UnicodeEncodeError:
                pass  # lone surrogates: repaired or refused by encode()
            else:
                return np.frombuffer(buf, dtype=np.uint32).astype(np.int32)
        return np.asarray(self.encode(text, allowed_special), dtype=np.int32)

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: Optional[int] = None,
        allowed_special=None,
    ) -> List[List[int]]:
        """Encode many texts with a thread pool (tiktoken releases the GIL while encoding).

        Args:
            texts: the documents.
            num_threads: worker threads; default ``os.cpu_count()``. 1 = no pool.
        """
        n = num_threads if num_threads is not None else (os.cpu_count() or 1)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        if allowed_special is None:
            fn = self.encode
        else:
            fn = lambda t: self.encode(t, allowed_special)  # noqa: E731
        if n == 1 or len(texts) <= 1:
            return [fn(t) for t in texts]
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(fn, texts))

    # -- decoding --------------------------------------------------------------------------

    def _as_id_list(self, ids) -> List[int]:
        """Validate ``ids`` (list/tuple/NumPy/torch of ints in [0, vocab), at most 1-D)
        -> list of int. Booleans, mappings and sets are not id sequences (``TypeError``); an
        array or tensor of more than one dimension is a batch (``ValueError``)."""
        if isinstance(ids, (str, bytes, bytearray)):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        if isinstance(ids, (_Mapping, _Set)):
            raise TypeError(
                f"ids must be a sequence of ints, got a {type(ids).__name__} (no token order)"
            )
        if hasattr(ids, "detach") and hasattr(ids, "tolist"):  # torch.Tensor
            if ids.is_floating_point() or ids.is_complex() or str(ids.dtype) == "torch.bool":
                raise TypeError(f"ids must be integers, got a tensor of dtype {ids.dtype}")
            if ids.dim() > 1:
                raise ValueError(
                    f"ids must be 1-D, got a {ids.dim()}-D tensor of shape {tuple(ids.shape)}; "
                    "decode each sequence of a batch on its own"
                )
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise TypeError(f"ids must be integers, got a NumPy array of dtype {ids.dtype}")
            if ids.ndim > 1:
                raise ValueError(
                    f"ids must be 1-D, got a {ids.ndim}-D array of shape {ids.shape}; decode "
                    "each sequence of a batch on its own"
                )
            flat = ids.reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= O200K_HARMONY_VOCAB_SIZE):
                bad = np.flatnonzero((flat < 0) | (flat >= O200K_HARMONY_VOCAB_SIZE))[0]
                self._raise_bad_id(int(flat[bad]), int(bad))
            return flat.tolist()
        elif not isinstance(ids, list):
            try:
                ids = list(ids)
            except TypeError as exc:
                raise TypeError(
                    f"ids must be a sequence of ints, got {type(ids).__name__}"
                ) from exc
        if bool in map(type, ids):  # True/False are ints to Python and to tiktoken
            self._diagnose_ids(ids)
        return ids

    @staticmethod
    def _raise_bad_id(value, index: int):
        raise ValueError(
            f"invalid token id {value!r} at position {index}: o200k_harmony ids are integers "
            f"in [0, {O200K_HARMONY_VOCAB_SIZE})"
        )

    def _diagnose_ids(self, ids: List) -> None:
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise TypeError(
                    f"invalid token id {t!r} at position {i}: ids must be integers, got "
                    f"{type(t).__name__}"
                )
            v = t.__index__()
            if not 0 <= v < O200K_HARMONY_VOCAB_SIZE:
                self._raise_bad_id(v, i)

    def decode_bytes(self, ids) -> bytes:
        """Bytes of ``ids`` concatenated (exact; no UTF-8 decoding)."""
        ids = self._as_id_list(ids)
        try:
            return self._core.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError):
            self._diagnose_ids(ids)
            raise

    def decode(self, ids, errors: Optional[str] = None, skip_special_tokens: bool = False) -> str:
        """Decode ids to text; invalid UTF-8 per ``errors`` (default: ``decode_errors``)."""
        ids = self._as_id_list(ids)
        if skip_special_tokens:
            self._decode_check(ids)
            ids = [t for t in ids if t < FIRST_SPECIAL_ID]
        return self.decode_bytes(ids).decode("utf-8", errors=errors or self.decode_errors)

    def _decode_check(self, ids: List) -> None:
        try:
            if ids and (min(ids) < 0 or max(ids) >= O200K_HARMONY_VOCAB_SIZE):
                self._diagnose_ids(ids)
        except TypeError:
            self._diagnose_ids(ids)
            raise

    def token_bytes(self, ids) -> List[bytes]:
        """Per-token bytes."""
        ids = self._as_id_list(ids)
        self._diagnose_ids(ids)
        single = self._core.decode_single_token_bytes
        return [single(t) for t in ids]

    def offsets(self, ids, text: Optional[str] = None) -> List[int]:
        """Character offset (in the decoded text) at which each token starts.

        A token that starts inside a multi-byte character gets the offset of that character
        (tiktoken's ``decode_with_offsets`` rule), without requiring valid UTF-8.
        """
        out: List[int] = []
        n_chars = 0
        for tb in self.token_bytes(ids):
            out.append(max(0, n_chars - (0x80 <= tb[0] < 0xC0)) if tb else n_chars)
            n_chars += sum(1 for c in tb if not 0x80 <= c < 0xC0)
        return out

    # -- Megatron MegatronTokenizerTextAbstract --------------------------------------------

    @staticmethod
    def _token_str(b: bytes) -> str:
        # Bijective bytes -> str: invalid UTF-8 bytes become U+DC80..U+DCFF (surrogateescape).
        return b.decode("utf-8", errors="surrogateescape")

    def text_to_ids(self, text: str) -> List[int]:
        """Megatron: text -> ids (under the special-token policy)."""
        return self.encode(text)

    def ids_to_text(self, ids) -> str:
        """Megatron: ids -> text (``decode_errors`` policy)."""
        return self.decode(ids)

    def text_to_tokens(self, text: str) -> List[str]:
        """Text -> token strings (keys of :attr:`vocab`, see there)."""
        return self.ids_to_tokens(self.encode(text))

    def text_to_token_bytes(self, text: str) -> List[bytes]:
        """Text -> exact per-token bytes."""
        return self.token_bytes(self.encode(text))

    def ids_to_tokens(self, ids) -> List[str]:
        """Ids -> token strings (keys of :attr:`vocab`; specials by their canonical name)."""
        inv = self.inv_vocab
        ids = self._as_id_list(ids)
        self._decode_check(ids)
        return [inv[t] for t in ids]

    def tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        """Token strings (as produced by :meth:`ids_to_tokens`) -> ids."""
        vocab = self.vocab
        out = []
        for i, tok in enumerate(tokens):
            try:
                out.append(vocab[tok])
            except (KeyError, TypeError):
                raise ValueError(f"unknown token {tok!r} at position {i}") from None
        return out

    def tokens_to_text(self, tokens: Iterable[str]) -> str:
        """Token strings -> text."""
        return self.decode(self.tokens_to_ids(tokens))

    def add_special_tokens(self, *args, **kwargs):
        """The o200k Harmony table is locked (docs/design.md#special-tokens): adding tokens is
        refused."""
        raise NotImplementedError(
            "the o200k_harmony special-token table is locked (201,088 ids, GPT-OSS parity); "
            "use the reserved tokens <|reserved_200013|> ... <|reserved_201087|> instead"
        )

    def _build_vocab(self) -> None:
        single = self._core.decode_single_token_bytes
        inv: Dict[int, str] = {}
        for t in range(FIRST_SPECIAL_ID):
            inv[t] = self._token_str(single(t))
        for t in range(FIRST_SPECIAL_ID, O200K_HARMONY_VOCAB_SIZE):
            inv[t] = single(t).decode("utf-8")  # 200018 -> <|endofprompt|>, its canonical name
        vocab = {s: t for t, s in inv.items()}
        if len(vocab) != O200K_HARMONY_VOCAB_SIZE:  # pragma: no cover - bijective by design
            raise RuntimeError("o200k_harmony token strings are not unique")
        vocab.update(self._specials)  # adds the alias <|reserved_200018|>
        self._inv_vocab, self._vocab = inv, vocab

    @property
    def vocab(self) -> Dict[str, int]:
        """Token string -> id (lazy). Ordinary tokens are their bytes decoded as UTF-8 with
        ``surrogateescape`` (bijective: byte fragments become U+DC80..U+DCFF); specials by
        name, including the alias ``<|reserved_200018|>`` (201,089 keys, 201,088 ids)."""
        if self._vocab is None:
            self._build_vocab()
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string (lazy), a bijection on ``range(201088)``; 200018 ->
        ``<|endofprompt|>``."""
        if self._inv_vocab is None:
            self._build_vocab()
        return self._inv_vocab

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("encoding", "_core", "_vocab", "_inv_vocab"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.encoding, _ = build_o200k_harmony_encoding(self.path)
        self._core = self.encoding._core_bpe
        self._vocab = self._inv_vocab = None


def _special_regex(tokens: frozenset) -> "re.Pattern[str]":
    pat = _SPECIAL_RE_CACHE.get(tokens)
    if pat is None:
        # Longest first so that no name is shadowed by a prefix (all end in "|>", so none is).
        inner = "|".join(re.escape(t) for t in sorted(tokens, key=lambda s: (-len(s), s)))
        pat = re.compile(inner)
        if len(_SPECIAL_RE_CACHE) > 64:
            _SPECIAL_RE_CACHE.clear()
        _SPECIAL_RE_CACHE[tokens] = pat
    return pat


_SPECIAL_RE_CACHE: Dict[frozenset, "re.Pattern[str]"] = {}
