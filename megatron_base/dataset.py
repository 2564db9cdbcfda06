"""JSONL -> Megatron ``.bin/.idx`` dataset builder (tokens, aligned loss masks, manifest).

Input: a JSONL file, one document per line, either

* ``{"text": "..."}`` - a pretraining document, encoded with ``encode_ordinary`` semantics
  (special-token text stays text, docs/design.md#special-tokens); every token has loss mask 1, or
* ``{"messages": [...]}`` - a Harmony conversation (openai-harmony's JSON form, see
  :mod:`megatron_base.harmony`), rendered exactly like openai-harmony's
  ``render_conversation_for_training``; loss mask per :class:`HarmonyRenderConfig`.

(Optional keys ``"id"`` and ``"meta"`` are ignored; any other key is a schema error. Blank
lines are skipped and counted.) Every document is followed by EOD ``<|endoftext|>`` = 199,999
with mask 0. The file must be UTF-8 (a UTF-8 byte-order mark at its start is ignored); an input
that yields no document at all (empty, only blank or bad lines - e.g. a UTF-16 or Latin-1 file)
is an error, with or without ``strict``.

Output for ``--output PREFIX``:

* ``PREFIX.bin`` / ``PREFIX.idx`` - token ids, ``int32`` (DType code 4), written with
  Megatron's ``IndexedDatasetBuilder``, one sequence per document;
* ``PREFIX_loss_mask.bin`` / ``.idx`` - ``uint8`` 0/1, aligned token by token with the ids
  (identical sequence lengths and document indices). ``mask[i] == 1`` means *token i* is a
  training target, so the mask of Megatron's ``labels = text[1:]`` is ``mask[1:]``
  (:class:`LossMaskedGPTDataset` does this);
* ``PREFIX.manifest.json`` - tokenizer identity and vocab hash, render config and mask rule,
  library versions, input sha256, counts (documents, tokens, trained tokens, bad lines with
  line numbers), size and sha256 of the four output files and a ``build_id`` derived from them,
  hashes of the distinct system/developer preambles. It is written last and is the commit
  record of the set: :func:`open_dataset` checks the four files against it.

Determinism: each line is processed independently and results are written in input order, so
the four outputs and the manifest are byte-identical for the same input on every run and for
every number of worker processes (the manifest holds no paths, times or worker counts).
Bad lines (invalid UTF-8 or JSON, nested deeper than the recursion limit, wrong schema,
unknown role, lone surrogate, ...) are reported with their 1-based line number and skipped
(counted in the manifest), or abort the build with ``strict=True``; no good line is lost.

Committing the outputs: existing outputs of the prefix are only replaced with ``force=True``
(``--force``). The five files are written under temporary names (``NAME.partial-PID``) and
committed together: the old members are first moved aside (manifest first, then the ``.idx``
files, then the ``.bin`` files; ``NAME.old-PID``), then the new ones moved in (``.bin`` files,
then the mask ``.idx``, the tokens ``.idx``, the manifest last), then the old ones deleted. At
every instant each Megatron ``.bin/.idx`` pair is the old one, the new one or absent (its
``.idx`` missing), never a mix, and the manifest exists only beside the set it describes; a
failure during the commit moves the old set back. A build killed mid-commit leaves a prefix
that :func:`open_dataset` refuses (no manifest) and Megatron cannot open or opens as one whole
build; the next build of that prefix deletes the ``NAME.partial-PID`` / ``NAME.old-PID`` files
of dead processes (only those of this prefix's five names).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import re
import threading
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_base import compat
from megatron_base.harmony import (
    HarmonyFormatError,
    HarmonyRenderConfig,
    HarmonyRenderer,
    load_harmony_encoding_offline,
)
from megatron_base.tokenizer import (
    EOD_ID,
    O200K_BASE_SHA256,
    O200K_HARMONY_VOCAB_SIZE,
    O200kHarmonyTokenizer,
    build_o200k_harmony_encoding,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetBuildConfig",
    "DatasetBuildError",
    "BuildResult",
    "build_dataset",
    "build_demo_dataset",
    "open_dataset",
    "verify_dataset",
    "LossMaskedGPTDataset",
    "DEMO_CORPUS_PATH",
    "LOSS_MASK_SUFFIX",
    "MANIFEST_SUFFIX",
]

LOSS_MASK_SUFFIX = "_loss_mask"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "vpmoe-compile/dataset-manifest/v2"
_MANIFEST_FORMATS = ("vpmoe-compile/dataset-manifest/v1", MANIFEST_FORMAT)
DEMO_CORPUS_PATH = Path(__file__).resolve().parent / "sample_data" / "demo.jsonl"

_CHUNK_LINES = 256
_CHUNK_BYTES = 4 << 20
_MAX_REPORTED_ERRORS = 100
_TEXT_DOC_KEYS = {"text"}
_UTF8_BOM = b"\xef\xbb\xbf"
_NESTED_TOO_DEEPLY = "nested too deeply (deeper than Python's recursion limit)"
_EXTRA_DOC_KEYS = {"id", "meta"}

MASK_RULE_TEXT = (
    "text documents: every token 1; conversations: system/developer/user/tool messages 0, "
    "assistant messages 1 (all channels, including <|call|> and the final <|return|>)"
)
MASK_RULE_GENERATED = (
    "; the <|start|> and role tokens of an assistant message that follows a non-assistant "
    "message are 0 (prompt-supplied)"
)


class DatasetBuildError(RuntimeError):
    """The build failed (bad line under ``strict``, unreadable input, no document, outputs
    that exist without ``force``) or a dataset set does not verify (:func:`open_dataset`)."""


@dataclass
class DatasetBuildConfig:
    """Configuration of :func:`build_dataset`.

    Attributes:
        input_path: the JSONL file.
        output_prefix: path prefix of the outputs (no ``.bin``/``.idx`` suffix); missing parent
            directories are created.
        workers: parallel workers; ``None`` = all cores (``os.cpu_count()``); 1 = in-process.
            Does not affect the output.
        executor: ``"threads"`` (default: one process; the tokenizer releases the GIL while
            it encodes, so text documents encode in parallel while another thread parses
            JSON) or ``"processes"`` (a process pool: also the Python-heavy Harmony rendering
            of conversations runs in parallel, at the cost of process start-up and of moving
            lines and results between processes). Does not affect the output.
        strict: abort on the first bad line instead of skipping it.
        render: Harmony rendering / mask policy.
        vocab_path: o200k_base asset (default: the vendored copy).
        progress: show a tqdm progress bar on stderr.
        force: replace existing outputs of ``output_prefix`` (otherwise they are an error).
    """

    input_path: str
    output_prefix: str
    workers: Optional[int] = None
    executor: str = "threads"
    strict: bool = False
    render: HarmonyRenderConfig = field(default_factory=HarmonyRenderConfig)
    vocab_path: Optional[str] = None
    progress: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if self.executor not in ("threads", "processes"):
            raise ValueError(f"executor must be 'threads' or 'processes', got {self.executor!r}")
        prefix = os.fspath(self.output_prefix)
        if not prefix or prefix.endswith(("/", os.sep)):
            raise ValueError(f"output prefix {prefix!r} must name a file prefix, not a directory")
        if prefix.endswith((".bin", ".idx")):
            raise ValueError(
                f"output prefix {prefix!r} ends in .bin/.idx; give the prefix without the suffix"
            )
        self.output_prefix = prefix
        self.input_path = os.fspath(self.input_path)


@dataclass
class BuildResult:
    """What :func:`build_dataset` produced (``manifest`` is what was written to disk)."""

    prefix: str
    manifest_path: str
    manifest: Dict[str, Any]
    seconds: float
    input_bytes: int

    @property
    def mb_per_s(self) -> float:
        """Input throughput in MB/s (10^6 bytes)."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------
# Per-line processing (runs in workers)
# --------------------------------------------------------------------------------------------


class _LineProcessor:
    def __init__(
        self,
        render_cfg: HarmonyRenderConfig,
        vocab_path: Optional[str],
        tokenizer: Optional[O200kHarmonyTokenizer] = None,
    ) -> None:
        # a tokenizer may be shared by threads (its encoder is thread-safe); the renderer is
        # per processor (it keeps per-chunk state)
        self.tokenizer = tokenizer or O200kHarmonyTokenizer(
            vocab_path, surrogate_errors=render_cfg.surrogate_errors
        )
        self.renderer = HarmonyRenderer(render_cfg, tokenizer=self.tokenizer)
        self._lib = self.tokenizer.o200k_library

    def document(self, line: bytes) -> Tuple[str, Optional[np.ndarray], Optional[np.ndarray]]:
        """-> (kind, ids, mask); kind in {"text", "conversation", "blank"}; raises ValueError."""
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"invalid UTF-8 at byte {exc.start}"
                + (_encoding_hint(line) or "; the input must be UTF-8 (convert Latin-1 / "
                   "cp1252 text first)")
            ) from None
        if not s.strip():
            return "blank", None, None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}{_encoding_hint(line)}") from None
        except RecursionError:
            raise ValueError(f"invalid JSON: {_NESTED_TOO_DEEPLY}") from None
        if not isinstance(obj, dict):
            raise ValueError(
                f'a line must be a JSON object {{"text": ...}} or {{"messages": [...]}}, got '
                f"{type(obj).__name__}"
            )
        if "text" in obj and "messages" not in obj:
            unknown = set(obj) - _TEXT_DOC_KEYS - _EXTRA_DOC_KEYS
            if unknown:
                raise ValueError(
                    f"unknown keys {sorted(unknown)} in a text document (allowed: text, id, meta)"
                )
            text = obj["text"]
            if not isinstance(text, str):
                raise ValueError(f"'text' must be a string, got {type(text).__name__}")
            ids = self._lib.encode_to_numpy(text)
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = EOD_ID
            mask = np.ones(len(arr), dtype=np.uint8)
            mask[-1] = 0
            return "text", arr, mask
        if "messages" in obj and "text" not in obj:
            ids, m = self.renderer.render(obj)
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = EOD_ID
            mask = np.empty(len(arr), dtype=np.uint8)
            mask[:-1] = m
            mask[-1] = 0
            return "conversation", arr, mask
        raise ValueError(
            'a line must be {"text": "..."} or {"messages": [...]} (exactly one of the two), '
            f"got keys {sorted(obj)}"
        )

    def chunk(self, first_line: int, lines: List[bytes]):
        toks: List[np.ndarray] = []
        masks: List[np.ndarray] = []
        lengths: List[int] = []
        errors: List[Tuple[int, str]] = []
        kinds = collections.Counter()
        self.renderer.preamble_hashes.clear()
        for k, line in enumerate(lines):
            if first_line + k == 1 and line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM) :]  # a UTF-8 byte-order mark opening the file
            try:
                kind, ids, mask = self.document(line)
            except (HarmonyFormatError, ValueError, TypeError) as exc:
                errors.append((first_line + k, str(exc)))
                continue
            except RecursionError:
                errors.append((first_line + k, _NESTED_TOO_DEEPLY))
                continue
            kinds[kind] += 1
            if ids is None:
                continue
            toks.append(ids)
            masks.append(mask)
            lengths.append(len(ids))
        tok_arr = np.concatenate(toks) if toks else np.empty(0, np.int32)
        mask_arr = np.concatenate(masks) if masks else np.empty(0, np.uint8)
        if tok_arr.size and (tok_arr.min() < 0 or tok_arr.max() >= O200K_HARMONY_VOCAB_SIZE):
            raise RuntimeError("token id out of range [0, 201088)")  # pragma: no cover
        return (
            tok_arr,
            mask_arr,
            np.asarray(lengths, dtype=np.int64),
            errors,
            dict(kinds),
            sorted(self.renderer.preamble_hashes),
            sum(len(x) for x in lines),
        )


def _encoding_hint(line: bytes) -> str:
    """A hint when a line looks UTF-16/UTF-32 encoded ("" otherwise)."""
    if line.startswith((b"\xff\xfe", b"\xfe\xff")):
        return (
            "; the line starts with a UTF-16 byte-order mark: the file looks UTF-16 encoded, "
            "the input must be UTF-8 JSONL"
        )
    if b"\x00" in line:
        return "; the line holds NUL bytes (UTF-16/UTF-32 text?): the input must be UTF-8 JSONL"
    return ""


_WORKER: Optional[_LineProcessor] = None


def _worker_init(render_cfg: HarmonyRenderConfig, vocab_path: Optional[str]) -> None:
    global _WORKER
    _WORKER = _LineProcessor(render_cfg, vocab_path)


def _worker_chunk(args):
    return _WORKER.chunk(*args)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _read_chunks(path: str, hasher) -> Iterator[Tuple[int, List[bytes]]]:
    with open(path, "rb") as f:
        line_no = 1
        lines: List[bytes] = []
        nbytes = 0
        first = 1
        for line in f:
            hasher.update(line)
            if not lines:
                first = line_no
            lines.append(line)
            nbytes += len(line)
            line_no += 1
            if len(lines) >= _CHUNK_LINES or nbytes >= _CHUNK_BYTES:
                yield first, lines
                lines, nbytes = [], 0
        if lines:
            yield first, lines


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    out = {}
    for pkg in ("tiktoken", "openai-harmony", "megatron-core"):
        try:
            out[pkg] = _pkg_version(pkg)
        except Exception:  # pragma: no cover
            out[pkg] = "unknown"
    return out


def _ordered_results(cfg: DatasetBuildConfig, chunks):
    """Yield chunk results in input order, with a bounded number in flight."""
    if cfg.workers == 1:
        proc = _LineProcessor(cfg.render, cfg.vocab_path)
        for c in chunks:
            yield proc.chunk(*c)
        return
    if cfg.executor == "threads":
        yield from _threaded_results(cfg, chunks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        # Build the encodings once here; forked workers inherit them (copy-on-write).
        build_o200k_harmony_encoding(cfg.vocab_path)
        load_harmony_encoding_offline(cfg.vocab_path)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(cfg.workers, _worker_init, (cfg.render, cfg.vocab_path)) as pool:
        pending = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_worker_chunk, (c,)))
            if len(pending) >= 3 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _threaded_results(cfg: DatasetBuildConfig, chunks):
    """``_ordered_results`` on a thread pool: one tokenizer shared by all threads, a processor
    (renderer state) per thread; results in input order, a bounded number in flight."""
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = O200kHarmonyTokenizer(cfg.vocab_path, surrogate_errors=cfg.render.surrogate_errors)
    local = threading.local()

    def work(c):
        proc = getattr(local, "proc", None)
        if proc is None:
            proc = local.proc = _LineProcessor(cfg.render, cfg.vocab_path, tokenizer=tokenizer)
        return proc.chunk(*c)

    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="build-dataset") as pool:
        pending = collections.deque()
        for c in chunks:
            pending.append(pool.submit(work, c))
            if len(pending) >= 3 * cfg.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _output_paths(prefix: str) -> Dict[str, str]:
    mask_prefix = prefix + LOSS_MASK_SUFFIX
    return {
        "tokens_bin": prefix + ".bin",
        "tokens_idx": prefix + ".idx",
        "mask_bin": mask_prefix + ".bin",
        "mask_idx": mask_prefix + ".idx",
        "manifest": prefix + MANIFEST_SUFFIX,
    }


# Commit order (see the module docstring): old members go aside manifest first, then the .idx
# files (a pair without its .idx cannot be opened), then the .bin files; new members come in
# .bin files first, then the .idx files (mask before tokens), the manifest last. Invariant: a
# pair's .bin only changes while its .idx is absent, and the manifest is only present beside
# the set it describes.
_ASIDE_ORDER = ("manifest", "tokens_idx", "mask_idx", "tokens_bin", "mask_bin")
_PLACE_ORDER = ("tokens_bin", "mask_bin", "mask_idx", "tokens_idx", "manifest")
_SCRATCH_RE = re.compile(r"^(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[0-9]+)$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we could have written: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's process)
        return True
    return True


def _stale_scratch_files(final: Dict[str, str]) -> Dict[str, List[str]]:
    """``NAME.partial-PID`` / ``NAME.old-PID`` files of dead processes for the five output
    names of this prefix (``{"partial": [...], "old": [...]}``, paths)."""
    parent = os.path.dirname(os.path.abspath(final["manifest"]))
    names = {os.path.basename(p) for p in final.values()}
    out: Dict[str, List[str]] = {"partial": [], "old": []}
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return out
    for entry in entries:
        m = _SCRATCH_RE.match(entry)
        if m is None or m["name"] not in names:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        if os.path.isfile(path) and not os.path.islink(path):
            out[m["kind"]].append(path)
    return out


def _remove_files(paths: List[str], what: str) -> None:
    for path in paths:
        try:
            os.remove(path)
            logger.info("removed %s %s", what, path)
        except OSError as exc:  # pragma: no cover
            logger.warning("could not remove %s %s: %s", what, path, exc)


def _refuse_existing(prefix: str, final: Dict[str, str], stale_old: List[str]) -> None:
    existing = [p for p in final.values() if os.path.lexists(p)] + stale_old
    if existing:
        names = ", ".join(os.path.basename(p) for p in existing)
        raise DatasetBuildError(
            f"outputs of {prefix!r} exist ({names}); pass --force (force=True) to replace them"
        )


def _commit(tmp: Dict[str, str], final: Dict[str, str]) -> None:
    """Replace the set at ``final`` by the one at ``tmp`` (order: module docstring). On an
    exception the steps done are undone in reverse order (each intermediate state is one the
    forward order also passes through) and the exception re-raised."""
    aside = {k: v + f".old-{os.getpid()}" for k, v in final.items()}
    moved: List[str] = []
    placed: List[str] = []
    try:
        for k in _ASIDE_ORDER:
            if os.path.lexists(final[k]):
                os.replace(final[k], aside[k])
                moved.append(k)
        for k in _PLACE_ORDER:
            os.replace(tmp[k], final[k])
            placed.append(k)
    except BaseException:
        try:
            for k in reversed(placed):
                os.replace(final[k], tmp[k])
            for k in reversed(moved):
                os.replace(aside[k], final[k])
        except OSError as exc:  # pragma: no cover
            logger.error(
                "could not restore the previous outputs of %s (%s); they are the *.old-%d "
                "files beside it",
                final["tokens_bin"], exc, os.getpid(),
            )
        raise
    _remove_files([aside[k] for k in moved], "previous output")


def _member_digest(outputs: Dict[str, Any]) -> str:
    """The build id: sha256 over the four members' recorded sha256."""
    h = hashlib.sha256()
    for part in ("tokens", "loss_mask"):
        for ext in ("bin", "idx"):
            h.update(f"{part}.{ext}={outputs[part][f'{ext}_sha256']}\n".encode())
    return h.hexdigest()


def _no_document_message(path: str, size: int, counts, n_bad: int, errors) -> str:
    if size == 0:
        return (
            f"no document in {path}: the file is empty (expected UTF-8 JSONL, one "
            '{"text": ...} or {"messages": [...]} object per line); nothing was written'
        )
    blank = counts.get("blank", 0)
    n_lines = n_bad + blank
    msg = (
        f"no document in {path}: 0 of {n_lines} lines were valid JSON objects with a "
        f"'text'/'messages' field ({n_bad} bad, {blank} blank); is the file UTF-8 JSONL?"
    )
    if errors:
        msg += f" First bad line {errors[0]['line']}: {errors[0]['error']}."
    return msg + " Nothing was written."


def build_dataset(config: DatasetBuildConfig) -> BuildResult:
    """Build ``PREFIX.bin/.idx``, ``PREFIX_loss_mask.bin/.idx`` and ``PREFIX.manifest.json``.

    Raises:
        DatasetBuildError: unreadable input; a bad line under ``strict`` (message names the
            line number and the problem); no document in the input; outputs of the prefix
            exist and ``force`` is not set. Nothing is written (existing outputs untouched)
            then.
        OSError: a file-system failure; a failure while committing restores the previous set.
        ValueError: invalid configuration.
    """
    cfg = config
    if not os.path.isfile(cfg.input_path):
        raise DatasetBuildError(
            f"input file {cfg.input_path!r} does not exist or is not a regular file"
        )
    prefix = cfg.output_prefix
    force = bool(cfg.force)
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)
    final = _output_paths(prefix)
    stale = _stale_scratch_files(final)
    _remove_files(stale["partial"], "stale temporary file")
    if not force:
        _refuse_existing(prefix, final, stale["old"])
    _remove_files(stale["old"], "stale previous output")
    tmp = {k: v + f".partial-{os.getpid()}" for k, v in final.items()}
    input_size = os.path.getsize(cfg.input_path)
    t0 = time.perf_counter()
    hasher = hashlib.sha256()
    counts = collections.Counter()
    errors: List[Dict[str, Any]] = []
    preambles = set()
    n_bad = 0
    tok_builder = IndexedDatasetBuilder(tmp["tokens_bin"], dtype=np.int32)
    mask_builder = IndexedDatasetBuilder(tmp["mask_bin"], dtype=np.uint8)
    bin_hash = {"tokens": hashlib.sha256(), "mask": hashlib.sha256()}  # of the .bin bytes written
    try:
        from tqdm import tqdm

        from megatron_base.progress import progress_logging

        bar = tqdm(
            total=input_size,
            unit="B",
            unit_scale=True,
            desc=f"build-dataset {os.path.basename(cfg.input_path)}",
            disable=not cfg.progress,
            file=sys.stderr,
        )
        with progress_logging(), bar:  # log records and warnings print above the bar
            for tok_arr, mask_arr, lengths, errs, kinds, pre, nbytes in _ordered_results(
                cfg, _read_chunks(cfg.input_path, hasher)
            ):
                for line_no, msg in errs:
                    n_bad += 1
                    if cfg.strict:
                        raise DatasetBuildError(
                            f"{cfg.input_path}: line {line_no}: {msg} (--strict: aborting; "
                            "nothing was written)"
                        )
                    logger.warning("%s: line %d skipped: %s", cfg.input_path, line_no, msg)
                    if len(errors) < _MAX_REPORTED_ERRORS:
                        errors.append({"line": line_no, "error": msg})
                counts.update(kinds)
                preambles.update(pre)
                if lengths.size:  # one write per chunk, hashed as it is written
                    n_list = lengths.tolist()
                    bin_hash["tokens"].update(compat.indexed_builder_append_documents(tok_builder, tok_arr, n_list))
                    bin_hash["mask"].update(compat.indexed_builder_append_documents(mask_builder, mask_arr, n_list))
                counts["tokens"] += int(tok_arr.size)
                counts["trained_tokens"] += int(mask_arr.sum(dtype=np.int64))
                bar.update(nbytes)
        n_docs = counts.get("text", 0) + counts.get("conversation", 0)
        if n_docs == 0:
            raise DatasetBuildError(
                _no_document_message(cfg.input_path, input_size, counts, n_bad, errors)
            )
        tok_builder.finalize(tmp["tokens_idx"])
        mask_builder.finalize(tmp["mask_idx"])
        if n_bad:
            print(
                f"build-dataset: skipped {n_bad} bad line(s) of {cfg.input_path} (see the "
                f"manifest; --strict makes them fatal)",
                file=sys.stderr,
            )
        outputs = {
            "tokens": {
                "bin": os.path.basename(final["tokens_bin"]),
                "idx": os.path.basename(final["tokens_idx"]),
                "dtype": "int32",
                "bin_sha256": bin_hash["tokens"].hexdigest(),
                "idx_sha256": _sha256_file(tmp["tokens_idx"]),
                "bin_bytes": os.path.getsize(tmp["tokens_bin"]),
                "idx_bytes": os.path.getsize(tmp["tokens_idx"]),
            },
            "loss_mask": {
                "bin": os.path.basename(final["mask_bin"]),
                "idx": os.path.basename(final["mask_idx"]),
                "dtype": "uint8",
                "bin_sha256": bin_hash["mask"].hexdigest(),
                "idx_sha256": _sha256_file(tmp["mask_idx"]),
                "bin_bytes": os.path.getsize(tmp["mask_bin"]),
                "idx_bytes": os.path.getsize(tmp["mask_idx"]),
            },
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "tokenizer": {
                "name": "o200k_harmony",
                "class": "megatron_base.tokenizer.O200kHarmonyTokenizer",
                "vocab_file": "o200k_base.tiktoken",
                "vocab_sha256": O200K_BASE_SHA256,
                "vocab_size": O200K_HARMONY_VOCAB_SIZE,
                "eod": EOD_ID,
                "text_special_tokens": "ordinary",
            },
            "versions": _versions(),
            "render": {
                **cfg.render.to_dict(),
                "mask_rule": MASK_RULE_TEXT
                + (MASK_RULE_GENERATED if cfg.render.mask_policy == "generated" else ""),
                "eod_appended": True,
                "eod_mask": 0,
                "label_mask": "mask[1:] of a sample's tokens (mask is aligned with tokens)",
            },
            "input": {
                "name": os.path.basename(cfg.input_path),
                "sha256": hasher.hexdigest(),
                "bytes": input_size,
            },
            "counts": {
                "documents": n_docs,
                "text_documents": counts.get("text", 0),
                "conversations": counts.get("conversation", 0),
                "blank_lines": counts.get("blank", 0),
                "bad_lines": n_bad,
                "tokens": counts["tokens"],
                "trained_tokens": counts["trained_tokens"],
            },
            "bad_lines": errors,
            "bad_lines_truncated": n_bad > len(errors),
            "preamble_sha256": sorted(preambles),
            "outputs": outputs,
            "build_id": _member_digest(outputs),
        }
        with open(tmp["manifest"], "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        if not force:  # outputs that appeared while we were building
            _refuse_existing(prefix, final, [])
        _commit(tmp, final)
    except BaseException:
        for p in tmp.values():
            try:
                os.remove(p)
            except OSError:
                pass
        raise
    seconds = time.perf_counter() - t0
    return BuildResult(prefix, final["manifest"], manifest, seconds, input_size)


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


_VERIFY_MODES = ("fast", "full", "none")
_REBUILD = "rebuild it with build-dataset --force"


def verify_dataset(prefix: str, full: bool = False) -> Dict[str, Any]:
    """Check the four members of ``prefix`` against its manifest (the commit record written
    last by :func:`build_dataset`) and return the manifest.

    Always: the manifest exists and is intact (its ``build_id`` matches the recorded member
    hashes), each member's size is the recorded one and each ``.idx`` file's sha256 is the
    recorded one. ``full=True``: the ``.bin`` files' sha256 too (reads the whole dataset).

    Raises:
        DatasetBuildError: naming the file and what does not match.
    """
    mpath = prefix + MANIFEST_SUFFIX
    if not os.path.exists(mpath):
        raise DatasetBuildError(
            f"{prefix}: no manifest {mpath}: the set is incomplete (an interrupted "
            f"build-dataset?) or was not written by build-dataset; {_REBUILD} (or read it "
            "with open_dataset(prefix, verify='none'))"
        )
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        fmt = manifest["format"]
        outputs = manifest["outputs"]
        records = {part: outputs[part] for part in ("tokens", "loss_mask")}
        for rec in records.values():
            for ext in ("bin", "idx"):
                if not isinstance(rec[f"{ext}_sha256"], str):
                    raise TypeError(f"{ext}_sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetBuildError(f"{mpath}: unreadable or damaged manifest ({exc}); {_REBUILD}")
    if fmt not in _MANIFEST_FORMATS:
        raise DatasetBuildError(f"{mpath}: unknown manifest format {fmt!r}")
    if "build_id" in manifest and manifest["build_id"] != _member_digest(outputs):
        raise DatasetBuildError(f"{mpath}: damaged manifest (build_id does not match); {_REBUILD}")
    for part, p in (("tokens", prefix), ("loss_mask", prefix + LOSS_MASK_SUFFIX)):
        for ext in ("bin", "idx"):
            path = f"{p}.{ext}"
            if not os.path.isfile(path):
                raise DatasetBuildError(f"missing {path} (listed in {mpath}); {_REBUILD}")
            size = os.path.getsize(path)
            want = records[part].get(f"{ext}_bytes")
            if want is not None and size != want:
                raise DatasetBuildError(
                    f"{path} does not match the manifest {mpath}: {size} bytes, the manifest "
                    f"records {want} (a member of another or an interrupted build); {_REBUILD}"
                )
            if ext == "idx" or full:
                got, want = _sha256_file(path), records[part][f"{ext}_sha256"]
                if got != want:
                    raise DatasetBuildError(
                        f"{path} does not match the manifest {mpath}: sha256 {got[:16]}..., "
                        f"the manifest records {want[:16]}... (a member of another build or a "
                        f"damaged file); {_REBUILD}"
                    )
    return manifest


def _stat_members(prefix: str):
    out = []
    for p in (prefix, prefix + LOSS_MASK_SUFFIX):
        for ext in (".bin", ".idx"):
            st = os.stat(p + ext)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    try:
        out.append(os.stat(prefix + MANIFEST_SUFFIX).st_ino)
    except FileNotFoundError:
        out.append(None)  # verify_dataset says what is wrong
    return out


def _check_bin_size(ds: IndexedDataset, path: str) -> None:
    """The .bin holds exactly what its .idx points at (catches a .bin of another build)."""
    index = ds.index
    n = len(index.sequence_lengths)
    want = 0
    if n:
        want = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * int(
            index.dtype_size
        )
    size = os.path.getsize(path)
    if size != want:
        raise DatasetBuildError(
            f"{path} does not match its .idx: {size} bytes, the index describes {want}; "
            f"{_REBUILD}"
        )


def open_dataset(prefix: str, verify: str = "fast"):
    """Open ``(tokens, loss_mask)`` as Megatron ``IndexedDataset``s and check the set.

    Args:
        prefix: the ``--output`` prefix of :func:`build_dataset`.
        verify: ``"fast"`` (default): :func:`verify_dataset` (manifest present and intact,
            member sizes, ``.idx`` sha256), each ``.bin`` holds exactly what its ``.idx``
            describes, and no member was replaced while opening; ``"full"``: also the
            ``.bin`` files' sha256 (reads the whole dataset); ``"none"``: only the checks
            below (for sets without a manifest).

    Always checked: both pairs exist, int32 tokens and uint8 masks, masks aligned with the
    tokens (same sequence lengths and document indices).

    Raises:
        DatasetBuildError: missing files, a member that does not match the manifest (a mixed
            or interrupted set), wrong dtypes, or masks not aligned with the tokens.
        ValueError: an unknown ``verify``.
    """
    if verify not in _VERIFY_MODES:
        raise ValueError(f"verify must be one of {_VERIFY_MODES}, got {verify!r}")
    for p in (prefix, prefix + LOSS_MASK_SUFFIX):
        if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx")):
            raise DatasetBuildError(f"missing {p}.bin/.idx; build it with build-dataset")
    for attempt in range(3):
        if verify != "none":
            try:
                before = _stat_members(prefix)
            except OSError as exc:
                raise DatasetBuildError(f"{prefix}: {exc}; {_REBUILD}") from None
            verify_dataset(prefix, full=verify == "full")
        toks = IndexedDataset(prefix)
        masks = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        if verify == "none":
            break
        try:
            after = _stat_members(prefix)
        except OSError:
            after = None
        if after == before:  # the verified files are the opened ones (same inodes, unchanged)
            break
        if attempt == 2:
            raise DatasetBuildError(
                f"{prefix}: the dataset changed while it was being opened (a build-dataset "
                "--force committing?); try again"
            )
        time.sleep(0.05)
    if toks.index.dtype != np.int32 or masks.index.dtype != np.uint8:
        raise DatasetBuildError(
            f"{prefix}: expected int32 tokens and uint8 masks, got {toks.index.dtype} and "
            f"{masks.index.dtype}"
        )
    if not (
        np.array_equal(toks.sequence_lengths, masks.sequence_lengths)
        and np.array_equal(toks.document_indices, masks.document_indices)
    ):
        raise DatasetBuildError(f"{prefix}: loss masks are not aligned with the tokens")
    if verify != "none":
        _check_bin_size(toks, prefix + ".bin")
        _check_bin_size(masks, prefix + LOSS_MASK_SUFFIX + ".bin")
    return toks, masks


class LossMaskedGPTDataset(GPTDataset):
    """``GPTDataset`` whose ``loss_mask`` also applies the stored per-token loss masks.

    Use it as the dataset class of ``BlendedMegatronDatasetBuilder`` on a prefix written by
    :func:`build_dataset`. Samples are cut exactly as stock ``GPTDataset`` cuts them (same
    indices, packing across documents); the mask dataset ``PREFIX_loss_mask`` is sliced with the
    same sample index, shifted to label alignment and multiplied into Megatron's own
    ``loss_mask`` (padding, ``eod_mask_loss``). The set is checked against its manifest first
    (:func:`verify_dataset`, the fast checks).
    """

    def __init__(
        self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
    ) -> None:
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )
        prefix = indexed_dataset.path_prefix
        if not os.path.exists(prefix + LOSS_MASK_SUFFIX + ".idx"):
            raise DatasetBuildError(
                f"{prefix}: no loss-mask dataset {prefix + LOSS_MASK_SUFFIX}.bin/.idx next to "
                "the tokens; build the data with build-dataset"
            )
        verify_dataset(prefix)
        self.mask_dataset = IndexedDataset(prefix + LOSS_MASK_SUFFIX, mmap=config.mmap_bin_files)
        if not (
            np.array_equal(indexed_dataset.sequence_lengths, self.mask_dataset.sequence_lengths)
            and np.array_equal(
                indexed_dataset.document_indices, self.mask_dataset.document_indices
            )
        ):
            raise DatasetBuildError(f"{prefix}: loss masks are not aligned with the tokens")

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        m, _ = compat.gpt_dataset_sample_from(self, self.mask_dataset, 0 if idx is None else idx)
        m = torch.from_numpy(np.clip(m, 0, 1)).float()  # padding (-1) -> 0
        if self.config.add_extra_token_to_sequence:
            label_mask = m[1:]
        else:
            label_mask = torch.roll(m, shifts=-1, dims=0)
            label_mask[-1] = 0
        sample["loss_mask"] = sample["loss_mask"] * label_mask
        return sample


# --------------------------------------------------------------------------------------------
# The demo dataset
# --------------------------------------------------------------------------------------------


def build_demo_dataset(out_dir, workers: int = 1, progress: bool = False) -> str:
    """Build (or reuse) the ``.bin/.idx`` of the shipped demo corpus and return its prefix.

    The prefix is ``out_dir/demo-<first 12 hex of the corpus sha256>``; an existing build is
    reused when its manifest matches the corpus hash, the vocabulary hash and the render config
    and the four output files still have the recorded sha256 (otherwise it is rebuilt). Read it
    back with :func:`open_dataset` or Megatron's ``IndexedDataset(prefix)``. The corpus is
    small (< 300 KB, well under a second in-process), so ``workers`` defaults to 1: no
    processes are forked from a caller that may already hold a GPU context.
    """
    corpus = DEMO_CORPUS_PATH
    if not corpus.is_file():
        raise DatasetBuildError(f"the demo corpus {corpus} is missing from the package")
    digest = _sha256_file(str(corpus))
    out = Path(out_dir)
    prefix = str(out / f"demo-{digest[:12]}")
    cfg = DatasetBuildConfig(
        input_path=str(corpus),
        output_prefix=prefix,
        workers=workers,
        strict=True,
        progress=progress,
        force=True,  # this prefix is the demo's own cache entry
    )
    mpath = prefix + MANIFEST_SUFFIX
    if os.path.exists(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                m = json.load(f)
            ok = (
                m.get("input", {}).get("sha256") == digest
                and m.get("tokenizer", {}).get("vocab_sha256") == O200K_BASE_SHA256
                and {k: m["render"].get(k) for k in cfg.render.to_dict()} == cfg.render.to_dict()
            )
            if ok:
                outs = m["outputs"]
                for part, p in (("tokens", prefix), ("loss_mask", prefix + LOSS_MASK_SUFFIX)):
                    for ext in ("bin", "idx"):
                        if _sha256_file(f"{p}.{ext}") != outs[part][f"{ext}_sha256"]:
                            ok = False
            if ok:
                return prefix
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logger.info("demo dataset at %s is stale or damaged; rebuilding", prefix)
    build_dataset(cfg)
    return prefix
