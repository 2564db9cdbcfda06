"""Harmony (GPT-OSS chat format) rendering to o200k ids and loss masks.

``render(conversation) -> (ids, loss_mask)`` accepts an ``openai_harmony.Conversation`` or its
JSON form (``Conversation.to_json()`` / ``to_dict()``: ``{"messages": [{"role": ..., "name":
..., "content": str | [{"type": "text", "text": ...}, {"type": "system_content", ...},
{"type": "developer_content", ...}], "channel": ..., "recipient": ..., "content_type":
...}]}``) and returns exactly the ids of openai-harmony 0.0.8's
``render_conversation_for_training`` for the ``HarmonyGptOss`` encoding (with the same
``auto_drop_analysis`` setting), plus a 0/1 mask aligned token by token.

How (docs/design.md#harmony-rendering): openai-harmony's own BPE is quadratic in the length of
one unbroken piece (and panics on ~1M-character whitespace runs), so user / assistant / tool
messages (and system / developer messages whose content is plain text) are serialized here
following harmony's token grammar (below) and every text segment is encoded with the verified
tiktoken encoding of :mod:`megatron_base.o200k` (``encode_ordinary``; harmony encodes
the same segments with the same vocabulary and regex, so the ids are identical - the tests
compare against openai-harmony). Messages carrying ``SystemContent`` / ``DeveloperContent``
(their text is templated by harmony's Rust code, tools rendered as TypeScript) are rendered
by openai-harmony itself and cached per distinct message; they are small.

Token grammar of one message::

    <|start|> ROLE [":" NAME] [" to=" RECIPIENT] [<|channel|> CHANNEL] [CT] <|message|> CONTENT END

(``tool`` messages put the author name in place of ROLE; END is ``<|call|>`` for an assistant
message with a recipient, else ``<|end|>``; the training render replaces the last token by
``<|return|>`` when the last message is an assistant message on channel ``final``.)

Loss mask (``HarmonyRenderConfig.mask_policy``)
-----------------------------------------------
* system, developer, user and tool messages: 0 (context).
* assistant messages, every channel (``analysis``, ``commentary`` tool calls ending in
  ``<|call|>``, ``final`` ending in ``<|end|>`` / ``<|return|>``): 1 - the final
  ``<|return|>`` and ``<|call|>`` are trained (they are how the model stops).
* ``mask_policy="generated"`` (default): the ``<|start|>`` token and the role tokens
  (``assistant``) of an assistant message that follows a non-assistant message (or opens the
  conversation) are 0: at inference they are the completion prompt
  (``render_conversation_for_completion(..., Role.ASSISTANT)``), not generated. Consecutive
  assistant messages (analysis -> final in one turn) are generated entirely, headers included.
  ``mask_policy="assistant"`` marks every assistant token (the vpMoE fork's rule).
* The EOD the dataset builder appends is 0.

:meth:`HarmonyRenderer.render_with_spans` also returns a span id per token (the fork's
``span_id``: 0 context, 1 analysis, 2 final; here also 3 commentary, 4 other assistant).

JSON form: follows openai-harmony's own serialization (``Message.to_dict`` drops null fields
and its Rust side reads an absent field as None), so an absent ``system_content`` /
``developer_content`` field means null - *not* the Python-side default (``SystemContent()``'s
identity, cutoff, effort and channels). Unknown keys are errors.

Determinism: nothing reads the clock; a ``Current date:`` line appears only when
``conversation_start_date`` is given. A ``SystemContent`` *object* must set
``conversation_start_date`` explicitly (``None`` or a fixed date string, e.g. via
:func:`make_system_content`) unless ``require_explicit_date=False``, so that a dataset never
silently depends on defaults. ``auto_drop_analysis`` defaults to ``False`` (keep the
chain of thought for distillation); pass ``True`` for harmony's own default.

Imports go one way: this module uses the encoding of :mod:`megatron_base.o200k` and knows
nothing of :mod:`megatron_base.tokenizer`, whose ``apply_chat_template`` renders through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

from openai_harmony import (
    Author,
    ChannelConfig,
    Conversation,
    DeveloperContent,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    RenderOptions,
    Role,
    SystemContent,
    TextContent,
    load_harmony_encoding,
)

from megatron_base.o200k import (
    LONE_SURROGATE_RE,
    O200kHarmonyLibrary,
    find_long_whitespace_runs,
    load_o200k_base_bytes,
)

__all__ = [
    "HarmonyFormatError",
    "HarmonyRenderConfig",
    "HarmonyRenderer",
    "load_harmony_encoding_offline",
    "parse_conversation",
    "render",
    "make_system_content",
    "START",
    "END",
    "MESSAGE",
    "CHANNEL",
    "CONSTRAIN",
    "RETURN",
    "CALL",
    "SPAN_CONTEXT",
    "SPAN_ANALYSIS",
    "SPAN_FINAL",
    "SPAN_COMMENTARY",
    "SPAN_ASSISTANT_OTHER",
]

START = 200_006
END = 200_007
MESSAGE = 200_008
CHANNEL = 200_005
CONSTRAIN = 200_003
RETURN = 200_002
CALL = 200_012
CONSTRAIN_MARKER = "<|constrain|>"

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "name", "content", "channel", "recipient", "content_type"}
_DOC_EXTRA_KEYS = {"id", "meta"}


#: Span ids of :meth:`HarmonyRenderer.render_with_spans`.
SPAN_CONTEXT = 0
SPAN_ANALYSIS = 1
SPAN_FINAL = 2
SPAN_COMMENTARY = 3
SPAN_ASSISTANT_OTHER = 4
_CHANNEL_SPANS = {"analysis": SPAN_ANALYSIS, "final": SPAN_FINAL, "commentary": SPAN_COMMENTARY}


class HarmonyFormatError(ValueError):
    """A conversation does not follow the Harmony schema (message says where and what)."""


@dataclass(frozen=True)
class HarmonyRenderConfig:
    """How conversations are rendered (recorded in the dataset manifest).

    Attributes:
        auto_drop_analysis: drop ``analysis`` messages before the first ``final`` message when
            the last assistant message is ``final`` (harmony's default is True; here False:
            keep the chain of thought for distillation).
        mask_policy: ``"generated"`` (default) or ``"assistant"`` (see module doc).
        require_explicit_date: ``SystemContent`` must set ``conversation_start_date``.
        cross_check_rate: fraction of conversations (selected deterministically by a hash of
            their ids) also rendered by openai-harmony and compared; a mismatch raises
            ``RuntimeError``. Default 0.001 (docs/design.md#harmony-rendering). Conversations
            with a text piece over 20,000 characters are not cross-checked (harmony is quadratic
            there).
        surrogate_errors: ``"strict"`` (lone surrogates raise) or ``"replace"``.
    """

    auto_drop_analysis: bool = False
    mask_policy: Literal["generated", "assistant"] = "generated"
    require_explicit_date: bool = True
    cross_check_rate: float = 0.001
    surrogate_errors: Literal["strict", "replace"] = "strict"

    def __post_init__(self):
        if not isinstance(self.auto_drop_analysis, bool):
            raise ValueError(f"auto_drop_analysis must be a bool, got {self.auto_drop_analysis!r}")
        if self.mask_policy not in ("generated", "assistant"):
            raise ValueError(
                f"mask_policy must be 'generated' or 'assistant', got {self.mask_policy!r}"
            )
        if not 0.0 <= float(self.cross_check_rate) <= 1.0:
            raise ValueError(f"cross_check_rate must be in [0, 1], got {self.cross_check_rate!r}")
        if self.surrogate_errors not in ("strict", "replace"):
            raise ValueError(
                f"surrogate_errors must be 'strict' or 'replace', got {self.surrogate_errors!r}"
            )

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form (for manifests)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# openai-harmony, offline
# --------------------------------------------------------------------------------------------

_HARMONY_LOCK = threading.Lock()
_HARMONY_ENCODING = None


def load_harmony_encoding_offline(vocab_path=None):
    """openai-harmony's ``HarmonyGptOss`` encoding, loaded without network access.

    openai-harmony reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (else it downloads).
    The verified asset is decompressed into a private temporary directory, the variable points
    there only for the load call (then restored), and the directory is removed. Cached per
    process.
    """
    global _HARMONY_ENCODING
    with _HARMONY_LOCK:
        if _HARMONY_ENCODING is not None:
            return _HARMONY_ENCODING
        data, _ = load_o200k_base_bytes(vocab_path)
        tmp = tempfile.mkdtemp(prefix="vpmoe-harmony-")
        old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        try:
            with open(os.path.join(tmp, "o200k_base.tiktoken"), "wb") as f:
                f.write(data)
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = tmp
            enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = old
            shutil.rmtree(tmp, ignore_errors=True)
        _HARMONY_ENCODING = enc
        return enc


def make_system_content(
    *,
    conversation_start_date: Optional[str],
    model_identity: Optional[str] = "You are ChatGPT, a large language model trained by OpenAI.",
    knowledge_cutoff: Optional[str] = "2024-06",
    reasoning_effort: str = "Medium",
    channels: Sequence[str] = ("analysis", "commentary", "final"),
    tools: Optional[dict] = None,
):
    """A ``SystemContent`` with every field explicit (the date is required: ``None`` or a
    fixed ``YYYY-MM-DD``; never the clock)."""
    return SystemContent(
        model_identity=model_identity,
        reasoning_effort=ReasoningEffort(reasoning_effort),
        conversation_start_date=conversation_start_date,
        knowledge_cutoff=knowledge_cutoff,
        channel_config=ChannelConfig.require_channels(list(channels)),
        tools=tools,
    )


# --------------------------------------------------------------------------------------------
# Parsing / validation
# --------------------------------------------------------------------------------------------


def _opt_str(value, where: str) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise HarmonyFormatError(f"{where} must be a string or null, got {type(value).__name__}")


def _parse_content_item(item, where: str, require_date: bool):
    if not isinstance(item, dict):
        raise HarmonyFormatError(f"{where} must be an object, got {type(item).__name__}")
    kind = item.get("type")
    fields = {k: v for k, v in item.items() if k != "type"}
    if kind == "text":
        if set(fields) != {"text"}:
            raise HarmonyFormatError(
                f"{where}: a text item has exactly the keys 'type' and 'text', got "
                f"{sorted(item)}"
            )
        if not isinstance(fields["text"], str):
            raise HarmonyFormatError(f"{where}.text must be a string")
        return TextContent(text=fields["text"])
    if kind in ("system_content", "developer_content"):
        cls = SystemContent if kind == "system_content" else DeveloperContent
        unknown = set(fields) - set(cls.model_fields)
        if unknown:
            raise HarmonyFormatError(
                f"{where}: unknown {kind} keys {sorted(unknown)}; allowed: "
                f"{sorted(cls.model_fields)}"
            )
        # openai-harmony's JSON form (``to_json`` drops nulls; Rust's serde reads an absent
        # field as None): absent = null, never the Python-side default.
        values = {f: None for f in cls.model_fields}
        values.update(fields)
        try:
            return cls(**values)
        except Exception as exc:  # pydantic.ValidationError
            raise HarmonyFormatError(f"{where}: invalid {kind}: {exc}") from None
    raise HarmonyFormatError(
        f"{where}: unknown content type {kind!r}; expected 'text', 'system_content' or "
        "'developer_content'"
    )


def _message_from_dict(raw, index: int, require_date: bool):
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise HarmonyFormatError(f"{where} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _MESSAGE_KEYS
    if unknown:
        raise HarmonyFormatError(
            f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}"
        )
    role = raw.get("role")
    if role not in ROLES:
        raise HarmonyFormatError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
    if "content" not in raw:
        raise HarmonyFormatError(f"{where}: missing 'content'")
    content = raw["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise HarmonyFormatError(f"{where}.content must be a string or a list of items")
    items = [
        _parse_content_item(c, f"{where}.content[{j}]", require_date)
        for j, c in enumerate(content)
    ]
    msg = Message(
        author=Author(role=Role(role), name=_opt_str(raw.get("name"), f"{where}.name")),
        content=items,
        channel=_opt_str(raw.get("channel"), f"{where}.channel"),
        recipient=_opt_str(raw.get("recipient"), f"{where}.recipient"),
        content_type=_opt_str(raw.get("content_type"), f"{where}.content_type"),
    )
    _check_message(msg, index, require_date)
    return msg


def _check_message(msg, index: int, require_date: bool) -> None:
    where = f"messages[{index}]"
    role = msg.author.role.value
    if role == "tool" and msg.author.name is None:
        raise HarmonyFormatError(f"{where}: a tool message needs an author name (the tool)")
    for j, c in enumerate(msg.content):
        if isinstance(c, SystemContent):
            if role != "system":
                raise HarmonyFormatError(
                    f"{where}.content[{j}]: system_content may only appear in system messages"
                )
            if require_date and "conversation_start_date" not in c.model_fields_set:
                raise HarmonyFormatError(
                    f"{where}.content[{j}]: SystemContent must set conversation_start_date "
                    "explicitly (None or a fixed 'YYYY-MM-DD'), e.g. with "
                    "make_system_content(conversation_start_date=...)"
                )
        elif isinstance(c, DeveloperContent) and role != "developer":
            raise HarmonyFormatError(
                f"{where}.content[{j}]: developer_content may only appear in developer messages"
            )


def parse_conversation(conversation, require_explicit_date: bool = True):
    """Validate and convert a conversation to ``openai_harmony.Conversation``.

    Accepts a ``Conversation``, a dict ``{"messages": [...]}``, its JSON string, or a bare
    list of message dicts (chat-API style, e.g. ``[{"role": "user", "content": "hi"}]``).

    Raises:
        HarmonyFormatError: with the message index and what is wrong (unknown role, unknown
            key, wrong type, tool message without a name, misplaced system/developer content,
            SystemContent without an explicit date).
    """
    if isinstance(conversation, Conversation):
        if not conversation.messages:
            raise HarmonyFormatError("conversation has no messages")
        for i, m in enumerate(conversation.messages):
            _check_message(m, i, require_explicit_date)
        return conversation
    if isinstance(conversation, (str, bytes, bytearray)):
        try:
            conversation = json.loads(conversation)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HarmonyFormatError(f"conversation is not valid JSON: {exc}") from None
        except RecursionError:
            raise HarmonyFormatError(
                "conversation is not valid JSON: nested too deeply (deeper than Python's "
                "recursion limit)"
            ) from None
    if isinstance(conversation, list):  # a bare list of messages (chat-API style)
        conversation = {"messages": conversation}
    if not isinstance(conversation, dict):
        raise HarmonyFormatError(
            f"conversation must be an object with 'messages', got {type(conversation).__name__}"
        )
    unknown = set(conversation) - {"messages"} - _DOC_EXTRA_KEYS
    if unknown or "messages" not in conversation:
        raise HarmonyFormatError(
            "a conversation is {'messages': [...]} (optional 'id', 'meta'); got keys "
            f"{sorted(conversation)}"
        )
    msgs = conversation["messages"]
    if not isinstance(msgs, list):
        raise HarmonyFormatError("'messages' must be a list")
    if not msgs:
        raise HarmonyFormatError("conversation has no messages")
    return Conversation(
        messages=[_message_from_dict(m, i, require_explicit_date) for i, m in enumerate(msgs)]
    )


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------

_HARMONY_MAX_WS_RUN = 50_000


def _walk_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(k)
            yield from _walk_strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_strings(v)


class HarmonyRenderer:
    """Renders Harmony conversations to (ids, loss mask) with tiktoken-backed segments.

    Args:
        config: :class:`HarmonyRenderConfig`.
        tokenizer: an :class:`~megatron_base.tokenizer.O200kHarmonyTokenizer` whose vocabulary
            file encodes the text (any object with its ``o200k_library``); omitted: the default
            vocabulary. The segments are encoded by an
            :class:`~megatron_base.o200k.O200kHarmonyLibrary` with the config's
            ``surrogate_errors`` (the tokenizer's own when they agree, else a new one on the
            same file).

    Attributes:
        tokenizer: the tokenizer given (``None`` when omitted).
        library: the :class:`~megatron_base.o200k.O200kHarmonyLibrary` that encodes the text.
    """

    def __init__(self, config: Optional[HarmonyRenderConfig] = None, tokenizer=None) -> None:
        self.config = config or HarmonyRenderConfig()
        lib = tokenizer.o200k_library if tokenizer is not None else None
        if lib is None or lib.surrogate_errors != self.config.surrogate_errors:
            lib = O200kHarmonyLibrary(
                lib.path if lib is not None else None, surrogate_errors=self.config.surrogate_errors
            )
        self.tokenizer = tokenizer
        self.library = lib
        self._lib = lib
        self._enc_cache: Dict[str, List[int]] = {}
        self._harmony_cache: Dict[Tuple[str, bool], Tuple[List[int], str]] = {}
        #: sha256 of every system/developer message rendered by openai-harmony (for manifests).
        self.preamble_hashes: set = set()

    # -- text segments ---------------------------------------------------------------------

    def _text(self, s: str) -> List[int]:
        """``encode_ordinary`` of one segment (short header strings are memoised)."""
        if len(s) <= 64:
            ids = self._enc_cache.get(s)
            if ids is None:
                ids = self._lib.encode(s)
                if len(self._enc_cache) < 4096:
                    self._enc_cache[s] = ids
            return ids
        return self._lib.encode(s)

    # -- harmony-rendered messages ---------------------------------------------------------

    def _render_with_harmony(self, msg, has_function_tools: bool, index: int) -> List[int]:
        key_json = msg.to_json()
        key = (key_json, has_function_tools)
        hit = self._harmony_cache.get(key)
        if hit is not None:
            self.preamble_hashes.add(hit[1])
            return hit[0]
        for s in _walk_strings(msg.to_dict()):
            m = LONE_SURROGATE_RE.search(s)
            if m is not None:
                raise HarmonyFormatError(
                    f"messages[{index}]: text contains a lone surrogate "
                    f"U+{ord(m.group()):04X} (invalid Unicode)"
                )
            if find_long_whitespace_runs(s, _HARMONY_MAX_WS_RUN):
                raise HarmonyFormatError(
                    f"messages[{index}]: a system/developer message contains a whitespace "
                    "run of >= 50,000 characters, which openai-harmony's renderer cannot "
                    "encode (quadratic / panics); shorten it"
                )
        enc = load_harmony_encoding_offline()
        try:
            ids = list(
                enc.render(
                    msg, RenderOptions(conversation_has_function_tools=has_function_tools)
                )
            )
        except Exception as exc:  # HarmonyError
            raise HarmonyFormatError(
                f"messages[{index}]: openai-harmony cannot render this message: {exc}"
            ) from None
        if len(self._harmony_cache) > 1024:
            self._harmony_cache.clear()
        digest = hashlib.sha256(
            (key_json + ("|functions" if has_function_tools else "")).encode()
        ).hexdigest()
        self._harmony_cache[key] = (ids, digest)
        self.preamble_hashes.add(digest)
        return ids

    # -- one message -----------------------------------------------------------------------

    def _render_message(self, msg, has_function_tools: bool, index: int) -> Tuple[List[int], int]:
        """Ids of one message and the number of leading prompt-supplied header tokens
        (``<|start|>`` + role tokens)."""
        if not all(isinstance(c, TextContent) for c in msg.content):
            return self._render_with_harmony(msg, has_function_tools, index), 0
        role = msg.author.role.value
        name = msg.author.name
        out = [START]
        if role == "tool":
            if name is None:
                raise HarmonyFormatError(f"messages[{index}]: a tool message needs a name")
            out += self._text(name)
            n_head = len(out)
        else:
            out += self._text(role)
            n_head = len(out)
            if name is not None:
                out += self._text(":" + name)
        if msg.recipient is not None and msg.recipient != "all":
            out += self._text(" to=" + msg.recipient)
        if msg.channel is not None:
            out.append(CHANNEL)
            out += self._text(msg.channel)
        ct = msg.content_type
        if ct is not None:
            if ct.startswith(CONSTRAIN_MARKER):
                out += self._text(" ")
                out.append(CONSTRAIN)
                rest = ct[len(CONSTRAIN_MARKER) :]
                if rest:
                    out += self._text(rest)
            else:
                out += self._text(" " + ct)
        out.append(MESSAGE)
        for c in msg.content:
            out += self._lib.encode(c.text)
        out.append(CALL if role == "assistant" and msg.recipient is not None else END)
        return out, n_head

    # -- conversations ---------------------------------------------------------------------

    def _selected_messages(self, messages):
        has_function_tools = any(
            isinstance(c, DeveloperContent)
            and c.tools is not None
            and "functions" in c.tools
            and len(c.tools["functions"].tools) > 0
            for m in messages
            for c in m.content
        )
        last_assistant_is_final = False
        for m in reversed(messages):
            if m.author.role.value == "assistant":
                last_assistant_is_final = m.channel == "final"
                break
        drop = self.config.auto_drop_analysis and last_assistant_is_final
        first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
        keep = [
            (i, m)
            for i, m in enumerate(messages)
            if not (drop and first_final is not None and i < first_final and m.channel == "analysis")
        ]
        return keep, has_function_tools

    def _render_into(self, messages, with_mask: bool, spans: Optional[List[int]] = None):
        keep, has_tools = self._selected_messages(messages)
        ids: List[int] = []
        mask: List[int] = []
        prev_assistant = False
        generated_policy = self.config.mask_policy == "generated"
        for i, m in keep:
            mids, n_head = self._render_message(m, has_tools, i)
            ids += mids
            is_assistant = m.author.role.value == "assistant"
            if with_mask:
                if is_assistant:
                    if generated_policy and not prev_assistant:
                        mask += [0] * n_head
                        mask += [1] * (len(mids) - n_head)
                    else:
                        mask += [1] * len(mids)
                else:
                    mask += [0] * len(mids)
            if spans is not None:
                code = SPAN_CONTEXT
                if is_assistant:
                    code = _CHANNEL_SPANS.get(m.channel, SPAN_ASSISTANT_OTHER)
                spans += [code] * len(mids)
            prev_assistant = is_assistant
        return ids, mask

    def render(self, conversation) -> Tuple[List[int], List[int]]:
        """Training render: ids equal to openai-harmony's ``render_conversation_for_training``
        (same ``auto_drop_analysis``) and the loss mask (module doc), same length.

        Raises:
            HarmonyFormatError: invalid conversation (see :func:`parse_conversation`).
            ValueError: lone surrogate in the text (``surrogate_errors="strict"``).
        """
        ids, mask, _ = self._render_training(conversation, with_spans=False)
        return ids, mask

    def render_with_spans(self, conversation) -> Tuple[List[int], List[int], List[int]]:
        """:meth:`render` plus a span id per token (the vpMoE fork's ``span_id``):
        :data:`SPAN_CONTEXT` (0) for non-assistant messages, :data:`SPAN_ANALYSIS` (1) and
        :data:`SPAN_FINAL` (2) for assistant messages on those channels,
        :data:`SPAN_COMMENTARY` (3) for ``commentary`` (preambles, tool calls) and
        :data:`SPAN_ASSISTANT_OTHER` (4) for assistant messages on any other / no channel.
        Header tokens carry their message's span whatever their mask."""
        return self._render_training(conversation, with_spans=True)

    def _render_training(self, conversation, with_spans: bool):
        conv = parse_conversation(conversation, self.config.require_explicit_date)
        messages = conv.messages
        spans: Optional[List[int]] = [] if with_spans else None
        ids, mask = self._render_into(messages, with_mask=True, spans=spans)
        last = messages[-1]
        if last.author.role.value == "assistant" and last.channel == "final" and ids:
            ids[-1] = RETURN
        if self.config.cross_check_rate > 0:
            self._maybe_cross_check(conv, ids)
        return ids, mask, spans

    def render_for_completion(self, conversation, next_turn_role: str = "assistant") -> List[int]:
        """Prompt ids: the conversation + ``<|start|>`` + role (openai-harmony's
        ``render_conversation_for_completion``)."""
        role = getattr(next_turn_role, "value", next_turn_role)
        if role not in ROLES:
            raise HarmonyFormatError(f"unknown next_turn_role {role!r}; expected one of {ROLES}")
        conv = parse_conversation(conversation, self.config.require_explicit_date)
        ids, _ = self._render_into(conv.messages, with_mask=False)
        return ids + [START] + self._text(role)

    def _maybe_cross_check(self, conv, ids: List[int]) -> None:
        # Deterministic selection by the rendered ids (int-tuple hashing is not salted).
        if (hash(tuple(ids)) & 0xFFFFFFFF) / 2**32 >= self.config.cross_check_rate:
            return
        for s in _walk_strings(conv.to_dict()):
            if len(s) > 20_000:
                return
        ref = load_harmony_encoding_offline().render_conversation_for_training(
            conv, RenderConversationConfig(auto_drop_analysis=self.config.auto_drop_analysis)
        )
        if list(ref) != ids:
            raise RuntimeError(
                "Harmony render cross-check failed: ids differ from openai-harmony's "
                "render_conversation_for_training; please report this conversation"
            )


_DEFAULT_RENDERERS: Dict[HarmonyRenderConfig, HarmonyRenderer] = {}


def render(conversation, config: Optional[HarmonyRenderConfig] = None) -> Tuple[List[int], List[int]]:
    """Module-level convenience: :meth:`HarmonyRenderer.render` with a cached renderer."""
    config = config or HarmonyRenderConfig()
    r = _DEFAULT_RENDERERS.get(config)
    if r is None:
        r = _DEFAULT_RENDERERS[config] = HarmonyRenderer(config)
    return r.render(conversation)
