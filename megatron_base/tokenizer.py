"""The o200k Harmony tokenizer (GPT-OSS vocabulary) as a Megatron-Core 0.16.1 tokenizer.

:class:`O200kHarmonyTokenizer` plugs the o200k Harmony encoding of :mod:`megatron_base.o200k`
into Megatron-Core's tokenizer interface
(:class:`megatron.core.tokenizers.text.MegatronTokenizerText`, whose abstract base is
:class:`megatron.core.tokenizers.MegatronTokenizerBase`): the conversions are its library object
:class:`~megatron_base.o200k.O200kHarmonyLibrary`, the chat template is the Harmony renderer of
:mod:`megatron_base.harmony`. Imports go one way: ``tokenizer`` -> ``harmony`` -> ``o200k``.

The invariants and policies (verified asset, special-token table and policy, Megatron ids,
whitespace runs, lone surrogates, decoding) are the encoding's: see :mod:`megatron_base.o200k`
and docs/design.md#the-tokenizer. The encoding's public names are re-exported here.

Through Megatron's factory: :func:`write_tokenizer_metadata` puts the asset and a
``tokenizer_metadata.json`` in a folder, after which (with the compat fix
``tokenizer_class_metadata`` applied, as :func:`megatron_base.compat.apply` does)
``MegatronTokenizer.from_pretrained(folder)`` returns an :class:`O200kHarmonyTokenizer`::

    write_tokenizer_metadata("ckpt/tokenizer")
    compat.apply(only=["tokenizer_class_metadata"])   # or compat.apply() / init_process()
    tok = MegatronTokenizer.from_pretrained("ckpt/tokenizer")
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import AbstractSet, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import tiktoken
from megatron.core.tokenizers.text import MegatronTokenizerText

from megatron_base.harmony import HarmonyRenderConfig, HarmonyRenderer
from megatron_base.o200k import (  # re-exported: the tokenizer's public names
    BOS_ID,
    DEFAULT_VOCAB_PATH,
    ENCODING_NAME,
    EOD_ID,
    HARMONY_ASSISTANT_ACTION_STOP_TOKEN_IDS,
    HARMONY_STOP_TOKEN_IDS,
    O200K_BASE_SHA256,
    O200K_HARMONY_VOCAB_SIZE,
    O200K_PAT_STR,
    PAD_ID,
    SPECIAL_TOKEN_IDS,
    VOCAB_PATH_ENV,
    O200kHarmonyLibrary,
    SpecialPolicy,
    VocabFileError,
    build_o200k_harmony_encoding,
    find_long_whitespace_runs,
    load_o200k_base_bytes,
    o200k_harmony_special_tokens,
    padded_vocab_size,
    resolve_vocab_path,
)

__all__ = [
    "O200K_BASE_SHA256",
    "O200K_HARMONY_VOCAB_SIZE",
    "O200K_PAT_STR",
    "SPECIAL_TOKEN_IDS",
    "HARMONY_STOP_TOKEN_IDS",
    "HARMONY_ASSISTANT_ACTION_STOP_TOKEN_IDS",
    "DEFAULT_VOCAB_PATH",
    "VOCAB_PATH_ENV",
    "VocabFileError",
    "O200kHarmonyLibrary",
    "O200kHarmonyTokenizer",
    "METADATA_FILE_NAME",
    "write_tokenizer_metadata",
    "load_o200k_base_bytes",
    "build_o200k_harmony_encoding",
    "o200k_harmony_special_tokens",
    "padded_vocab_size",
    "find_long_whitespace_runs",
]


# --------------------------------------------------------------------------------------------
# The Megatron tokenizer
# --------------------------------------------------------------------------------------------


class O200kHarmonyTokenizer(MegatronTokenizerText):
    """o200k Harmony (GPT-OSS) tokenizer usable wherever Megatron-Core 0.16.1 takes a tokenizer.

    Subclass of Megatron's :class:`MegatronTokenizerText` (abstract base
    :class:`MegatronTokenizerBase`); the conversions live in :class:`O200kHarmonyLibrary`.
    See the module docstring for the invariants and policies.

    Args:
        path: the ``o200k_base.tiktoken`` asset (plain or ``.gz``), or a folder holding exactly
            one of ``o200k_base.tiktoken`` / ``o200k_base.tiktoken.gz`` (what
            :func:`write_tokenizer_metadata` writes; Megatron's factory passes the folder);
            default ``$VPMOE_O200K_BASE_PATH`` or the vendored copy. Must exist; hash-checked.
        config: Megatron tokenizer metadata (``library`` is forced to ``"o200k-harmony"``).
        special_tokens_policy: ``"ordinary"`` (default), ``"raise"`` or ``"allow_all"``.
        decode_errors: ``"replace"`` (default) or ``"strict"``.
        surrogate_errors: ``"strict"`` (default) or ``"replace"``.

    Example::

        tok = O200kHarmonyTokenizer()
        ids = tok.tokenize("hello world")     # [24912, 2375]
        tok.detokenize(ids)                    # 'hello world'
        tok.vocab_size, tok.eod, tok.pad       # 201088, 199999, -1
    """

    LIBRARY = "o200k-harmony"

    def __init__(
        self,
        path: Union[str, os.PathLike, None] = None,
        config: Optional[dict] = None,
        *,
        special_tokens_policy: SpecialPolicy = "ordinary",
        decode_errors: str = "replace",
        surrogate_errors: Literal["strict", "replace"] = "strict",
    ) -> None:
        resolved = resolve_vocab_path(path)
        if resolved.is_dir():
            resolved = _asset_in_folder(resolved)
        cfg = {"model_type": "gpt", "chat_template": None}
        cfg.update(config or {})
        if cfg.get("library", self.LIBRARY) != self.LIBRARY:
            raise ValueError(
                f"O200kHarmonyTokenizer is library {self.LIBRARY!r}, config says "
                f"{cfg['library']!r}"
            )
        cfg["library"] = self.LIBRARY
        cfg["class_name"] = type(self).__name__
        cfg["class_path"] = type(self).__module__
        super().__init__(
            str(resolved),
            cfg,
            special_tokens_policy=special_tokens_policy,
            decode_errors=decode_errors,
            surrogate_errors=surrogate_errors,
        )
        if self._tokenizer.vocab_size != O200K_HARMONY_VOCAB_SIZE:  # pragma: no cover
            raise RuntimeError("o200k_harmony vocab_size invariant violated")

    def _restore_model(self, **kwargs) -> O200kHarmonyLibrary:
        """Build the library object (no mutation of Megatron's module-level maps)."""
        return O200kHarmonyLibrary(self.path, **kwargs)

    @property
    def o200k_library(self) -> O200kHarmonyLibrary:
        """The library object that does every conversion (:meth:`_restore_model` built it;
        Megatron's base class keeps it as ``self._tokenizer``, read only inside this class)."""
        return self._tokenizer

    # -- encode / decode -------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying verified ``tiktoken.Encoding`` (name ``o200k_harmony``)."""
        return self._tokenizer.encoding

    def tokenize(
        self, text: str, allowed_special: Union[Literal["all"], AbstractSet[str], None] = None
    ) -> List[int]:
        """Text -> ids; special-token text is ordinary text unless allowed
        (docs/design.md#special-tokens)."""
        return self._tokenizer.encode(text, allowed_special)

    def tokenize_batch(
        self, texts: Sequence[str], num_threads: Optional[int] = None, allowed_special=None
    ) -> List[List[int]]:
        """Batch :meth:`tokenize` over ``num_threads`` threads (default: all cores)."""
        return self._tokenizer.encode_batch(texts, num_threads, allowed_special)

    def tokenize_to_numpy(self, text: str, allowed_special=None) -> np.ndarray:
        """:meth:`tokenize` as an ``int32`` array (the ``.bin`` dtype)."""
        return self._tokenizer.encode_to_numpy(text, allowed_special)

    def detokenize(
        self, ids, skip_special_tokens: bool = False, errors: Optional[str] = None
    ) -> str:
        """Ids -> text. ``skip_special_tokens`` drops ids >= 199,998; invalid UTF-8 is handled
        per ``errors`` (default the tokenizer's ``decode_errors``, ``"replace"``)."""
        return self._tokenizer.decode(ids, errors=errors, skip_special_tokens=skip_special_tokens)

    def detokenize_bytes(self, ids) -> bytes:
        """Ids -> exact bytes."""
        return self._tokenizer.decode_bytes(ids)

    def offsets(self, ids, text: Optional[str] = None) -> List[int]:
        """Per-token character start offsets in ``detokenize(ids)``."""
        return self._tokenizer.offsets(ids, text)

    def token_to_id(self, token: str) -> int:
        """Special-token name -> id (ordinary tokens via :attr:`vocab`)."""
        try:
            return self._tokenizer._specials[token]
        except KeyError:
            return self._tokenizer.tokens_to_ids([token])[0]

    # -- attributes Megatron reads ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """201,088 (locked)."""
        return O200K_HARMONY_VOCAB_SIZE

    @property
    def eod(self) -> int:
        """``<|endoftext|>`` = 199,999 (document boundary)."""
        return EOD_ID

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`; Harmony's stop ids are :attr:`stop_token_ids`."""
        return EOD_ID

    @property
    def eos_id(self) -> int:
        """Same as :attr:`eod`."""
        return EOD_ID

    @property
    def bos(self) -> int:
        """``<|startoftext|>`` = 199,998 (defined, never prepended)."""
        return BOS_ID

    @property
    def bos_id(self) -> int:
        """Same as :attr:`bos`."""
        return BOS_ID

    @property
    def pad(self) -> int:
        """-1: no pad token; Megatron's datasets treat -1 as 'no pad'."""
        return PAD_ID

    @property
    def pad_id(self) -> int:
        """Same as :attr:`pad`."""
        return PAD_ID

    @property
    def stop_token_ids(self) -> Tuple[int, ...]:
        """Harmony stop ids: ``<|return|>``, ``<|end|>``, ``<|call|>``."""
        return HARMONY_STOP_TOKEN_IDS

    @property
    def assistant_action_stop_token_ids(self) -> Tuple[int, ...]:
        """Stop ids of an assistant action: ``<|return|>``, ``<|call|>``."""
        return HARMONY_ASSISTANT_ACTION_STOP_TOKEN_IDS

    @property
    def special_tokens(self) -> Dict[str, int]:
        """The 1,091-name special table (string -> id)."""
        return self._tokenizer.special_tokens

    @property
    def vocab_sha256(self) -> str:
        """sha256 of the decompressed asset (verified)."""
        return O200K_BASE_SHA256

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Path-free identity for Megatron's dataset cache hashes
        (docs/design.md#megatron-ids-and-vocabulary-rows)."""
        lib = self._tokenizer
        ids = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["encoding"] = ENCODING_NAME
        ids["vocab_sha256"] = O200K_BASE_SHA256
        ids["vocab_size"] = O200K_HARMONY_VOCAB_SIZE
        ids["special_tokens_policy"] = lib.special_tokens_policy
        ids["surrogate_errors"] = lib.surrogate_errors
        ids["tiktoken_version"] = _tiktoken_version()
        return ids

    def apply_chat_template(
        self,
        conversation,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> List[int]:
        """Render a Harmony conversation to ids (no Jinja; ``chat_template`` must be None).

        With ``add_generation_prompt`` the ids end with ``<|start|>assistant`` (openai-harmony's
        ``render_conversation_for_completion``); otherwise they are the training render.
        Extra keyword arguments go to :class:`megatron_base.harmony.HarmonyRenderConfig`.
        """
        if chat_template is not None:
            raise ValueError(
                "O200kHarmonyTokenizer renders Harmony conversations itself; Jinja chat "
                "templates are not supported (pass chat_template=None)"
            )
        renderer = HarmonyRenderer(HarmonyRenderConfig(**kwargs), tokenizer=self)
        if add_generation_prompt:
            return renderer.render_for_completion(conversation)
        return renderer.render(conversation)[0]


# --------------------------------------------------------------------------------------------
# Megatron's tokenizer factory (MegatronTokenizer.from_pretrained)
# --------------------------------------------------------------------------------------------

METADATA_FILE_NAME = "tokenizer_metadata.json"  # the name Megatron's factory looks for
_ASSET_NAMES = ("o200k_base.tiktoken", "o200k_base.tiktoken.gz")


def _asset_in_folder(folder: Path) -> Path:
    found = [folder / n for n in _ASSET_NAMES if (folder / n).is_file()]
    if len(found) != 1:
        raise VocabFileError(
            f"tokenizer folder {str(folder)!r} must hold exactly one of {', '.join(_ASSET_NAMES)} "
            f"(found {len(found)}); write_tokenizer_metadata(folder) puts one there"
        )
    return found[0]


def _metadata() -> Dict[str, object]:
    # The keys of MegatronTokenizer.write_metadata (0.16.1), which itself refuses any library
    # outside Megatron's own six; class_name / class_path are read by the compat fix
    # tokenizer_class_metadata (0.16.1's from_pretrained ignores them).
    return {
        "library": O200kHarmonyTokenizer.LIBRARY,
        "class_name": O200kHarmonyTokenizer.__name__,
        "class_path": O200kHarmonyTokenizer.__module__,
        "model_type": "gpt",
        "chat_template": None,
    }


def write_tokenizer_metadata(
    path: Union[str, os.PathLike],
    vocab_path: Union[str, os.PathLike, None] = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Make ``path`` loadable by Megatron's tokenizer factory as an :class:`O200kHarmonyTokenizer`.

    Writes ``tokenizer_metadata.json`` (the file name and keys of Megatron-Core 0.16.1's
    ``MegatronTokenizer.write_metadata``: ``library``, ``class_name``, ``class_path``,
    ``model_type``, ``chat_template``) so that ``MegatronTokenizer.from_pretrained(path)`` builds
    this tokenizer -- with the compat fix ``tokenizer_class_metadata`` applied
    (:func:`megatron_base.compat.apply`), since 0.16.1's factory does not read the class keys
    its own ``write_metadata`` writes.

    Args:
        path: a folder (created if missing; a hash-checked copy of the asset is put in it as
            ``o200k_base.tiktoken[.gz]`` unless it already holds one, which is then checked), or
            an existing asset file (the metadata goes next to it, as Megatron's rule for a file
            path is its folder).
        vocab_path: the asset to copy into a folder (default ``$VPMOE_O200K_BASE_PATH`` or the
            vendored copy); not allowed with a file ``path``.
        overwrite: replace a different existing metadata file (default: refuse, as Megatron's
            ``write_metadata`` does; an identical one is left as it is).

    Returns:
        The metadata file's path.

    Raises:
        VocabFileError: a missing or wrong asset (sha256 mismatch).
        FileExistsError: a different metadata file is there and ``overwrite`` is False.
    """
    target = Path(os.fspath(path))
    if target.is_file():
        if vocab_path is not None:
            raise ValueError("vocab_path is only for a folder path; path is already the asset")
        load_o200k_base_bytes(target)  # hash check
        folder = target.parent
    else:
        folder = target
        folder.mkdir(parents=True, exist_ok=True)
        present = [folder / n for n in _ASSET_NAMES if (folder / n).is_file()]
        if present and vocab_path is None:
            load_o200k_base_bytes(_asset_in_folder(folder))
        elif present:
            raise FileExistsError(
                f"{str(folder)!r} already holds {present[0].name}; pass no vocab_path to use it"
            )
        else:
            _, source = load_o200k_base_bytes(vocab_path)  # hash check before copying
            with open(source, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            dest = folder / _ASSET_NAMES[1 if gz else 0]
            tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
    meta_path = folder / METADATA_FILE_NAME
    text = json.dumps(_metadata(), indent=1) + "\n"
    if meta_path.exists() and not overwrite:
        try:
            same = json.loads(meta_path.read_text()) == _metadata()
        except (OSError, ValueError):
            same = False
        if same:
            return meta_path
        raise FileExistsError(
            f"{str(meta_path)!r} exists with other contents; pass overwrite=True to replace it"
        )
    meta_path.write_text(text)
    return meta_path


@functools.lru_cache(maxsize=None)
def _tiktoken_version() -> str:
    from importlib.metadata import version

    return version("tiktoken")
