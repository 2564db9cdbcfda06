"""Harmony rendering: ids identical to openai-harmony 0.0.8, loss masks, validation."""

from __future__ import annotations

import collections
import json

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    RenderConversationConfig,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
)

import megatron_base.harmony as harmony_mod
from megatron_base.harmony import (
    CALL,
    END,
    MESSAGE,
    RETURN,
    SPAN_CONTEXT,
    START,
    HarmonyFormatError,
    HarmonyRenderConfig,
    HarmonyRenderer,
    make_system_content,
    parse_conversation,
)
from tests.megatron_base.test_tokenizer import asset_bytes, r1, r2, tok  # noqa: F401 (fixtures)

CHANNEL_ID = 200_005
CONSTRAIN_ID = 200_003


def _sys(**kw):
    kw.setdefault("conversation_start_date", None)
    return Message.from_role_and_content(Role.SYSTEM, make_system_content(**kw))


def _u(text, name=None):
    m = Message.from_role_and_content(Role.USER, text)
    if name:
        m.author = Author(role=Role.USER, name=name)
    return m


def _a(text, channel=None, recipient=None, content_type=None):
    m = Message.from_role_and_content(Role.ASSISTANT, text)
    m.channel, m.recipient, m.content_type = channel, recipient, content_type
    return m


def _tool(name, text, channel="commentary"):
    m = Message.from_author_and_content(Author.new(Role.TOOL, name), text)
    return m.with_channel(channel).with_recipient("assistant")


WEATHER = ToolDescription.new(
    "get_weather",
    "Gets the current weather in the provided location.",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
)
LOOKUP = ToolDescription.new("lookup", "Looks a word up.", {
    "type": "object", "properties": {"word": {"type": "string"}, "limit": {"type": "number"}}})
NOARGS = ToolDescription.new("get_time", "Current time.")


def _dev(instructions=None, tools=None, ns=None):
    d = DeveloperContent.new()
    if instructions is not None:
        d = d.with_instructions(instructions)
    if tools:
        d = d.with_function_tools(tools)
    if ns is not None:
        d = d.with_tools(ns)
    return Message.from_role_and_content(Role.DEVELOPER, d)


def conversations():
    """>= 30 fixtures: system / developer contents, tools, channels, recipients, content types,
    multi-turn chains of thought and edge cases (docs/design.md#tokenizer-tests)."""
    C = Conversation.from_messages
    big = "Unicode Ωμέγα 漢字 🙂 " * 300 + "\n\n" + "    indented code()\n" * 100
    convs = {
        "minimal": C([_u("hi"), _a("hello", "final")]),
        "system_default": C([_sys(), _u("What is 2+2?"), _a("2+2=4.", "analysis"), _a("4", "final")]),
        "system_date": C([_sys(conversation_start_date="2025-06-28"), _u("Date?"), _a("June.", "final")]),
        "system_high_no_cutoff": C([_sys(reasoning_effort="High", knowledge_cutoff=None,
                                         model_identity="You are a careful tutor."),
                                    _u("Explain BPE."), _a("Merges.", "final")]),
        "system_low_two_channels": C([_sys(reasoning_effort="Low", channels=("analysis", "final")),
                                      _u("x"), _a("y", "final")]),
        "browser_tool": C([Message.from_role_and_content(Role.SYSTEM, make_system_content(
            conversation_start_date="2025-01-01").with_browser_tool()), _u("search"),
            _a("I'll search.", "analysis"),
            _a('{"query":"harmony format"}', "analysis", "browser.search", "json"),
            _tool("browser.search", "results...", "analysis"), _a("Found it.", "final")]),
        "python_tool": C([Message.from_role_and_content(Role.SYSTEM, make_system_content(
            conversation_start_date=None).with_python_tool()), _u("compute 2**10"),
            _a("print(2**10)", "analysis", "python", None), _tool("python", "1024", "analysis"),
            _a("1024", "final")]),
        "developer_instructions": C([_sys(), _dev("Answer in French."), _u("Hello"),
                                     _a("Bonjour", "final")]),
        "function_tools": C([_sys(), _dev("Use tools.", [WEATHER, LOOKUP, NOARGS]),
                             _u("Weather in SF?"), _a("Need the tool.", "analysis"),
                             _a('{"location":"San Francisco, CA"}', "commentary",
                                "functions.get_weather", "<|constrain|>json"),
                             _tool("functions.get_weather", '{"temp": 20, "sky": "sunny"}'),
                             _a("It's sunny.", "analysis"), _a("20 °C and sunny.", "final")]),
        "function_tools_no_instructions": C([_sys(), _dev(None, [NOARGS]), _u("time?"),
                                             _a("{}", "commentary", "functions.get_time",
                                                "<|constrain|>json")]),
        "empty_functions_namespace": C([_sys(), _dev("x", ns=ToolNamespaceConfig(
            name="functions", description=None, tools=[])), _u("a"), _a("b", "final")]),
        "custom_namespace": C([_sys(), _dev("x", ns=ToolNamespaceConfig(
            name="zeta", description="Zeta tools", tools=[LOOKUP])), _u("a"), _a("b", "final")]),
        "user_name": C([_sys(), _u("I am Alice", name="alice"), _a("Hi Alice", "final")]),
        "constrain_bare": C([_u("json"), _a("{}", "commentary", "functions.f", "<|constrain|>")]),
        "content_type_plain": C([_u("q"), _a("{}", "commentary", "functions.f", "json")]),
        "multi_turn_cot": C([_sys(), _u("q1"), _a("think1", "analysis"), _a("a1", "final"),
                             _u("q2"), _a("think2", "analysis"), _a("a2", "final")]),
        "multi_turn_last_analysis": C([_u("q1"), _a("t1", "analysis"), _a("a1", "final"),
                                       _u("q2"), _a("t2", "analysis")]),
        "last_user": C([_sys(), _u("q1"), _a("t", "analysis"), _a("a1", "final"), _u("q2")]),
        "last_tool_call": C([_sys(), _dev(None, [WEATHER]), _u("w?"),
                             _a('{"location":"x"}', "commentary", "functions.get_weather",
                                "<|constrain|>json")]),
        "last_tool_result": C([_sys(), _dev(None, [WEATHER]), _u("w?"),
                               _a('{"location":"x"}', "commentary", "functions.get_weather",
                                  "<|constrain|>json"),
                               _tool("functions.get_weather", "{}")]),
        "preamble_commentary": C([_u("do it"), _a("On it.", "commentary"), _a("Done.", "final")]),
        "multiple_contents": C([Message.from_role_and_contents(Role.USER, [
            TextContent(text="ab"), TextContent(text="cd"), TextContent(text=" ef")]),
            _a("ok", "final")]),
        "special_lookalikes": C([_u("hi <|end|><|start|>assistant<|endoftext|><|return|>"),
                                 _a("<|call|> <|channel|>final <|message|>", "final")]),
        "system_text_content": C([Message.from_role_and_content(Role.SYSTEM, "You are terse."),
                                  _u("x"), _a("y", "final")]),
        "developer_text_content": C([Message.from_role_and_content(Role.DEVELOPER, "Plain dev."),
                                     _u("x"), _a("y")]),
        "assistant_named": C([_u("x"), Message.from_author_and_content(
            Author.new(Role.ASSISTANT, "bot"), "named").with_channel("final")]),
        "recipient_all_user": C([_u("x").with_recipient("all"), _a("y", "final")]),
        "channel_on_user": C([_u("x").with_channel("final"), _a("t", "analysis"),
                              _a("y", "final")]),
        "no_channel_assistant": C([_u("x"), _a("plain reply")]),
        "empty_contents": C([Message(author=Author(role=Role.USER), content=[]),
                             _a("", "final")]),
        "unicode_long": C([_sys(), _u(big), _a(big[::-1], "analysis"), _a(big, "final")]),
        "whitespace_digits": C([_u("  1234567  \t\t\n\n\r\n  x  "),
                                _a("   " * 50 + "3.14159265358979", "final")]),
        "first_message_assistant": C([_a("I start.", "final"), _u("ok")]),
        "consecutive_users": C([_u("a"), _u("b"), _a("c", "analysis"), _a("d", "commentary"),
                                _a("e", "final")]),
    }
    return convs


CONVS = conversations()
CONFIGS = [HarmonyRenderConfig(auto_drop_analysis=False), HarmonyRenderConfig(auto_drop_analysis=True)]


@pytest.fixture(scope="module")
def renderers(tok):
    return {c.auto_drop_analysis: HarmonyRenderer(c, tokenizer=tok) for c in CONFIGS}


def test_fixture_count():
    assert len(CONVS) >= 30


@pytest.mark.parametrize("name", sorted(CONVS))
def test_render_parity(name, renderers, r2):
    conv = CONVS[name]
    for drop, rend in renderers.items():
        cfg = RenderConversationConfig(auto_drop_analysis=drop)
        ref = r2.render_conversation_for_training(conv, cfg)
        ids, mask = rend.render(conv)
        assert ids == ref, (name, drop)
        assert len(mask) == len(ids) and set(mask) <= {0, 1}
        # JSON and dict forms give the same result.
        assert rend.render(conv.to_json()) == (ids, mask)
        assert rend.render(json.loads(conv.to_json())) == (ids, mask)
        for role in (Role.ASSISTANT, Role.USER):
            assert rend.render_for_completion(conv, role) == r2.render_conversation_for_completion(
                conv, role, cfg
            ), (name, drop, role)
        _check_mask(rend, ids, mask, rend.config.mask_policy)


def _segments(ids):
    """Split rendered ids into messages at <|start|> (content never holds special ids)."""
    starts = [i for i, t in enumerate(ids) if t == START] + [len(ids)]
    assert starts[0] == 0
    return [(starts[k], starts[k + 1]) for k in range(len(starts) - 1)]


def _check_mask(rend, ids, mask, policy):
    tok = rend.tokenizer
    n_role = 1 + len(tok.tokenize("assistant"))
    prev_assistant = False
    for s, e in _segments(ids):
        head_end = next(i for i in range(s, e) if ids[i] in (CHANNEL_ID, MESSAGE, CONSTRAIN_ID))
        header = tok.detokenize(ids[s + 1 : head_end])
        is_assistant = header.split(" to=")[0].split(":")[0] == "assistant"
        seg = mask[s:e]
        if not is_assistant:
            assert seg == [0] * (e - s), header
        elif policy == "generated" and not prev_assistant:
            assert seg == [0] * n_role + [1] * (e - s - n_role), header
        else:
            assert seg == [1] * (e - s), header
        if is_assistant:
            assert ids[e - 1] in (END, CALL, RETURN)
        prev_assistant = is_assistant


def test_mask_policy_assistant(tok, r2):
    rend = HarmonyRenderer(HarmonyRenderConfig(mask_policy="assistant"), tokenizer=tok)
    for conv in list(CONVS.values())[:10]:
        ids, mask = rend.render(conv)
        _check_mask(rend, ids, mask, "assistant")


def test_mask_example(renderers, tok):
    ids, mask = renderers[False].render(CONVS["function_tools"])
    trained = tok.detokenize([t for t, m in zip(ids, mask) if m])
    assert trained == (
        "<|channel|>analysis<|message|>Need the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"location":"San Francisco, CA"}<|call|>'
        "<|channel|>analysis<|message|>It's sunny.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>20 °C and sunny.<|return|>"
    )
    assert ids[-1] == RETURN and mask[-1] == 1


def test_render_with_spans(renderers, tok):
    rend = renderers[False]
    for name in ("function_tools", "multi_turn_cot", "no_channel_assistant", "minimal"):
        ids, mask, spans = rend.render_with_spans(CONVS[name])
        assert (ids, mask) == rend.render(CONVS[name]) and len(spans) == len(ids)
        for s, e in _segments(ids):
            head_end = next(i for i in range(s, e) if ids[i] in (CHANNEL_ID, MESSAGE, CONSTRAIN_ID))
            header = tok.detokenize(ids[s + 1 : head_end])
            channel = None
            if ids[head_end] == CHANNEL_ID:
                stop = next(i for i in range(head_end, e) if ids[i] in (MESSAGE, CONSTRAIN_ID))
                channel = tok.detokenize(ids[head_end + 1 : stop]).split(" ")[0]
            if header.split(" to=")[0] != "assistant":
                want = SPAN_CONTEXT
            else:
                want = {"analysis": 1, "final": 2, "commentary": 3}.get(channel, 4)
            assert spans[s:e] == [want] * (e - s), (name, header, channel)
    assert set(rend.render_with_spans(CONVS["function_tools"])[2]) == {0, 1, 2, 3}


class _CountingEncoding:
    """Forwards to openai-harmony's encoding and counts the calls of each method."""

    def __init__(self, real):
        self._real = real
        self.calls = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture()
def harmony_calls(monkeypatch):
    """openai-harmony's encoding, as the renderer sees it, with a call counter."""
    counting = _CountingEncoding(harmony_mod.load_harmony_encoding_offline())
    monkeypatch.setattr(harmony_mod, "load_harmony_encoding_offline", lambda *a, **k: counting)
    return counting.calls


def test_deterministic_and_cached(tok, harmony_calls):
    """Fresh renderers agree; one renderer renders each distinct system/developer message with
    openai-harmony once and then serves it (and its preamble hash, which the dataset manifest
    collects per chunk) from its cache; results never alias the cache."""
    conv = CONVS["function_tools"]
    n_pre = sum(
        not all(isinstance(c, TextContent) for c in m.content) for m in conv.messages
    )
    assert n_pre == 2  # the system and the developer message
    rend = HarmonyRenderer(tokenizer=tok)
    first = rend.render(conv)
    assert harmony_calls["render"] == n_pre
    hashes = set(rend.preamble_hashes)
    assert len(hashes) == n_pre
    rend.preamble_hashes.clear()
    second = rend.render(conv)
    assert harmony_calls["render"] == n_pre  # cached: no further openai-harmony call
    assert rend.preamble_hashes == hashes  # a cache hit still records the preamble
    fresh = HarmonyRenderer(tokenizer=tok).render(conv)
    assert harmony_calls["render"] == 2 * n_pre  # the cache is per renderer
    assert first == second == fresh
    # Mutating a returned result does not change what the cache serves next.
    first[0].clear()
    first[1].clear()
    assert rend.render(conv) == second == fresh
    assert harmony_calls["render"] == 2 * n_pre
    # The same system message in a conversation without function tools is another render.
    other = Conversation.from_messages([conv.messages[0], _u("no tools here")])
    rend.render(other)
    assert harmony_calls["render"] == 2 * n_pre + 1
    # Short header segments are memoised, long text is not.
    assert rend._enc_cache["assistant"] == tok.tokenize("assistant")
    assert all(len(k) <= 64 for k in rend._enc_cache)


def test_cross_check(tok, r2, harmony_calls):
    """cross_check_rate=1.0 renders every conversation with openai-harmony too (and they
    agree); rate 0 never calls it."""
    names = ("function_tools", "multi_turn_cot", "special_lookalikes")
    rend = HarmonyRenderer(HarmonyRenderConfig(cross_check_rate=1.0), tokenizer=tok)
    cfg = RenderConversationConfig(auto_drop_analysis=False)
    for k, name in enumerate(names, 1):
        ids, _ = rend.render(CONVS[name])
        assert harmony_calls["render_conversation_for_training"] == k
        assert ids == r2.render_conversation_for_training(CONVS[name], cfg)
    off = HarmonyRenderer(HarmonyRenderConfig(cross_check_rate=0.0), tokenizer=tok)
    for name in names:
        off.render(CONVS[name])
    assert harmony_calls["render_conversation_for_training"] == len(names)


def test_cross_check_detects_a_mismatch(tok):
    class Broken(HarmonyRenderer):
        def _text(self, s):
            return super()._text(s.upper() if s == "assistant" else s)

    with pytest.raises(RuntimeError, match="cross-check failed"):
        Broken(HarmonyRenderConfig(cross_check_rate=1.0), tokenizer=tok).render(CONVS["minimal"])
    # Off by default for this rate: same broken renderer, no reference call.
    Broken(HarmonyRenderConfig(cross_check_rate=0.0), tokenizer=tok).render(CONVS["minimal"])


def test_apply_chat_template(tok, r2):
    conv = CONVS["developer_instructions"]
    assert tok.apply_chat_template(conv) == r2.render_conversation_for_completion(
        conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
    )
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == r2.render_conversation_for_completion(
        parse_conversation({"messages": chat}), Role.ASSISTANT
    )
    assert tok.apply_chat_template(conv, add_generation_prompt=False) == (
        r2.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=False))
    )


def test_long_piece_renders_through_tiktoken(tok, r1, harmony_calls):
    """A 1 MB unbroken piece (openai-harmony's encoder is quadratic there) is encoded by
    tiktoken, never by openai-harmony, with tiktoken's ids. (Its render time is measured by
    ``benchmarks/tokenizer.py``, ``render_single_piece`` / ``unit_test_timings``.)"""
    content = "x" * 1_000_000
    rend = HarmonyRenderer(tokenizer=tok)
    ids, mask = rend.render(Conversation.from_messages([_u("go"), _a(content, "final")]))
    assert sum(harmony_calls.values()) == 0
    body = ids[ids.index(MESSAGE, ids.index(MESSAGE) + 1) + 1 : -1]
    assert body == r1.encode_ordinary(content)
    assert len(mask) == len(ids)


def test_long_whitespace_content(tok, r1):
    """Content with a whitespace run past the tokenizer's cut threshold (tiktoken panics from
    ~1M; the cut applies from 100k) renders through the panic-safe path, ids equal."""
    rend = HarmonyRenderer(tokenizer=tok)
    content = "a" + " " * 200_000 + "?"
    ids, _ = rend.render([{"role": "user", "content": content}])
    body = ids[ids.index(MESSAGE) + 1 : -1]
    assert body == r1.encode_ordinary(content)
    assert tok.detokenize(ids).endswith(content + "<|end|>")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

BAD = [
    ("not json {", "not valid JSON"),
    ('["a"]', "must be an object"),
    ('{"msgs": []}', "got keys"),
    ('{"messages": []}', "no messages"),
    ('{"messages": {}}', "must be a list"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "user"}]}', "missing 'content'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content must be"),
    ('{"messages": [{"role": "user", "content": "x", "chanel": "final"}]}', r"unknown keys \['chanel'\]"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}', "unknown content type"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}', "text must be a string"),
    ('{"messages": [{"role": "user", "content": "x", "channel": 7}]}', "channel must be a string"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "tool message needs"),
    ('{"messages": [{"role": "user", "content": [{"type": "system_content", "conversation_start_date": null}]}]}',
     "only appear in system"),
    ('{"messages": [{"role": "system", "content": [{"type": "system_content", "conversation_start_date": null, "colour": 1}]}]}',
     "unknown system_content keys"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]}', "exactly the keys"),
    ('{"messages": [{"role": "system", "content": [{"type": "system_content", "conversation_start_date": null, "reasoning_effort": "extreme"}]}]}',
     "invalid system_content"),
    ('{"messages": [{"role": "user", "content": [{"type": "developer_content"}]}]}', "only appear in developer"),
]


@pytest.mark.parametrize("payload,match", BAD)
def test_bad_conversations(payload, match, tok):
    rend = HarmonyRenderer(tokenizer=tok)
    with pytest.raises(HarmonyFormatError, match=match):
        rend.render(payload)


def test_bad_conversation_objects(tok):
    rend = HarmonyRenderer(tokenizer=tok)
    undated = Conversation.from_messages(
        [Message.from_role_and_content(Role.SYSTEM, SystemContent.new()), _u("x")]
    )
    with pytest.raises(HarmonyFormatError, match="conversation_start_date"):
        rend.render(undated)
    # Explicit opt-out reproduces harmony's defaults.
    loose = HarmonyRenderer(HarmonyRenderConfig(require_explicit_date=False), tokenizer=tok)
    assert loose.render(undated)[0] == rend.render(
        Conversation.from_messages([_sys(), _u("x")])
    )[0]
    with pytest.raises(HarmonyFormatError, match="no messages"):
        rend.render(Conversation.from_messages([]))
    with pytest.raises(ValueError, match="lone surrogate"):
        rend.render({"messages": [{"role": "user", "content": "a\ud800"}]})
    with pytest.raises(HarmonyFormatError, match="lone surrogate"):
        rend.render({"messages": [{"role": "developer", "content": [
            {"type": "developer_content", "instructions": "a\udc00"}]}]})
    with pytest.raises(HarmonyFormatError, match="whitespace run"):
        rend.render({"messages": [{"role": "developer", "content": [
            {"type": "developer_content", "instructions": "a" + " " * 60_000 + "b"}]}]})
    with pytest.raises(HarmonyFormatError, match="next_turn_role"):
        rend.render_for_completion(CONVS["minimal"], "robot")
    with pytest.raises(ValueError, match="mask_policy"):
        HarmonyRenderConfig(mask_policy="all")
    rep = HarmonyRenderer(HarmonyRenderConfig(surrogate_errors="replace"), tokenizer=tok)
    ids, _ = rep.render({"messages": [{"role": "user", "content": "a\ud800"}]})
    assert 3251 in ids  # U+FFFD


def test_parse_conversation_plain_string_content():
    conv = parse_conversation({"messages": [{"role": "user", "content": "hi", "name": None}]})
    assert conv.messages[0].content[0].text == "hi"
