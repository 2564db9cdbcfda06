#!/usr/bin/env python
"""Generate ``megatron_base/sample_data/demo.jsonl``: the small demo corpus (<= 300 KB).

Content (all offline, deterministic for a given CPython stdlib):

* ``{"text": ...}`` documents: docstrings (module, class and function) harvested with ``ast``
  from a fixed list of pure-Python modules of the running interpreter's standard library
  (Python Software Foundation License; nothing is imported or executed), one document per
  module, in English prose.
* Harmony conversations (``{"messages": [...]}``, openai-harmony's JSON form) about that
  material: system (explicit fields, fixed date) / developer / user / assistant messages on the
  ``analysis`` and ``final`` channels, and tool-call conversations where the assistant calls a
  ``functions.lookup_docstring`` tool (``commentary`` channel, ``<|constrain|>json``) and answers
  from the tool's result (the real docstring).

Usage::

    python scripts/make_demo_corpus.py [--output megatron_base/sample_data/demo.jsonl]

The committed file was generated with CPython 3.11; another stdlib version gives slightly
different text (the corpus is data, not a test oracle).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

MODULES = [
    "textwrap", "heapq", "bisect", "functools", "difflib", "fractions", "statistics",
    "shlex", "fnmatch", "glob", "string", "copy", "abc", "contextlib", "dataclasses",
    "enum", "graphlib", "numbers", "operator", "queue", "sched", "secrets", "colorsys",
    "calendar", "base64", "hmac", "ipaddress", "pprint", "reprlib", "tabnanny", "timeit",
    "uuid", "weakref", "zipapp", "filecmp", "gettext", "html/__init__", "json/__init__",
    "json/decoder", "json/encoder", "csv", "cmd", "code", "codeop", "optparse", "argparse",
]
MAX_BYTES = 290_000
TEXT_BUDGET = 215_000
DATE = "2025-06-28"
SYSTEM_IDENTITY = "You are a helpful assistant who explains the Python standard library."


def _clean(doc: str) -> str:
    return textwrap.dedent(doc).strip()


def harvest(root: Path):
    """-> list of (module, [(qualified name, docstring)]) in MODULES order."""
    out = []
    for mod in MODULES:
        path = root / (mod + ".py")
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = mod.replace("/__init__", "").replace("/", ".")
        docs = []
        d = ast.get_docstring(tree)
        if d:
            docs.append((name, _clean(d)))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_"):
                    continue
                d = ast.get_docstring(node)
                if d and len(d) > 40:
                    docs.append((f"{name}.{node.name}", _clean(d)))
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                            d = ast.get_docstring(sub)
                            if d and len(d) > 60:
                                docs.append((f"{name}.{node.name}.{sub.name}", _clean(d)))
        if docs:
            out.append((name, docs))
    return out


def first_sentence(doc: str) -> str:
    para = doc.split("\n\n")[0].replace("\n", " ").strip()
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


def system(effort: str) -> dict:
    return {
        "role": "system",
        "content": [{
            "type": "system_content",
            "model_identity": SYSTEM_IDENTITY,
            "reasoning_effort": effort,
            "conversation_start_date": DATE,
            "knowledge_cutoff": "2024-06",
            "channel_config": {"valid_channels": ["analysis", "commentary", "final"],
                               "channel_required": True},
        }],
    }


LOOKUP_TOOL = {
    "name": "lookup_docstring",
    "description": "Returns the docstring of a Python standard-library object.",
    "parameters": {
        "type": "object",
        "properties": {"name": {"type": "string",
                                "description": "Dotted name, e.g. textwrap.dedent"}},
        "required": ["name"],
    },
}


def developer(instructions: str, tools: bool) -> dict:
    content = {"type": "developer_content", "instructions": instructions}
    if tools:
        content["tools"] = {"functions": {"name": "functions", "description": None,
                                          "tools": [LOOKUP_TOOL]}}
    return {"role": "developer", "content": [content]}


def msg(role, text, channel=None, recipient=None, content_type=None, name=None):
    m = {"role": role, "content": [{"type": "text", "text": text}]}
    if name is not None:
        m["name"] = name
    if channel is not None:
        m["channel"] = channel
    if recipient is not None:
        m["recipient"] = recipient
    if content_type is not None:
        m["content_type"] = content_type
    return m


QUESTIONS = [
    "What does `{n}` do?",
    "Can you explain `{n}` briefly?",
    "I keep seeing `{n}` in code reviews. What is it for?",
    "Summarize the documentation of `{n}` in one or two sentences.",
]


def conversation(rnd: random.Random, name: str, doc: str, kind: int) -> dict:
    q = rnd.choice(QUESTIONS).format(n=name)
    summary = first_sentence(doc)
    excerpt = doc if len(doc) < 1200 else doc[:1200].rsplit(" ", 1)[0] + " ..."
    effort = rnd.choice(["Low", "Medium", "High"])
    if kind == 0:  # analysis + final, no developer message
        return {"messages": [
            system(effort), msg("user", q),
            msg("assistant", f"The user asks about {name}. From its documentation: "
                             f"{summary} I should restate this plainly and mention where it "
                             "lives.", "analysis"),
            msg("assistant", f"`{name}` is part of the standard library. {summary}", "final"),
        ]}
    if kind == 1:  # developer instructions, two turns
        mod = name.split(".")[0]
        return {"messages": [
            system(effort),
            developer("Answer questions about the Python standard library accurately and "
                      "concisely. Quote the documentation when it helps.", tools=False),
            msg("user", q),
            msg("assistant", f"Look at the docstring of {name}: {summary}", "analysis"),
            msg("assistant", f"In short: {summary}", "final"),
            msg("user", f"Which module do I import for that?"),
            msg("assistant", f"The object is defined in module {mod}.", "analysis"),
            msg("assistant", f"Import it from `{mod}`, for example `import {mod}`.", "final"),
        ]}
    # kind == 2: tool call through functions.lookup_docstring
    return {"messages": [
        system(effort),
        developer("Use the lookup_docstring tool to check the documentation before "
                  "answering.", tools=True),
        msg("user", q),
        msg("assistant", f"I should look up the docstring of {name} first.", "analysis"),
        msg("assistant", json.dumps({"name": name}), "commentary",
            "functions.lookup_docstring", "<|constrain|>json"),
        msg("tool", json.dumps({"name": name, "docstring": excerpt}), "commentary", "assistant",
            name="functions.lookup_docstring"),
        msg("assistant", f"The tool returned the docstring. Key point: {summary}", "analysis"),
        msg("assistant", f"According to its documentation, {summary[0].lower() + summary[1:]}",
            "final"),
    ]}


def build(output: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = harvest(root)
    rnd = random.Random(20250628)
    lines = []
    used = 0
    # Text documents: one per module (module docstring + its public API docstrings).
    for name, docs in modules:
        body = "\n\n".join(f"{q}\n\n{d}" if i else d for i, (q, d) in enumerate(docs))
        body = f"Python standard library: {name}\n\n" + body
        if used + len(body) > TEXT_BUDGET:
            body = body[: max(0, TEXT_BUDGET - used)].rsplit("\n\n", 1)[0]
        if len(body) < 200:
            break
        line = json.dumps({"text": body}, ensure_ascii=False)
        lines.append(line)
        used += len(line.encode())
    # Conversations about documented functions.
    candidates = [(q, d) for _, docs in modules for q, d in docs[1:] if len(d) > 80]
    rnd.shuffle(candidates)
    total = used
    conv_lines = []
    for i, (q, d) in enumerate(candidates[:60]):
        line = json.dumps(conversation(rnd, q, d, i % 3), ensure_ascii=False)
        if total + len(line.encode()) + 1 > MAX_BYTES:
            break
        conv_lines.append(line)
        total += len(line.encode()) + 1
    # Interleave conversations among the text documents (deterministically).
    out = []
    step = max(1, len(lines) // max(1, len(conv_lines)))
    ci = 0
    for i, line in enumerate(lines):
        out.append(line)
        while ci < len(conv_lines) and ci * step <= i:
            out.append(conv_lines[ci])
            ci += 1
    out.extend(conv_lines[ci:])
    data = ("\n".join(out) + "\n").encode("utf-8")
    assert len(data) <= 300_000, len(data)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    print(f"wrote {output}: {len(lines)} text documents, {len(conv_lines)} conversations, "
          f"{len(data)} bytes (Python {sys.version.split()[0]} stdlib)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[1] / "megatron_base" / "sample_data" / "demo.jsonl"
    parser.add_argument("--output", type=Path, default=default)
    build(parser.parse_args().output)


if __name__ == "__main__":
    main()
