"""The debug dump: what each pass changed, readable by a person and by tools.

Layout of ``DIR``::

    index.md                 passes in order with their summaries, the layer plan, the config,
                             the compat fixes in force, versions
    NN-<pass>.md             per pass: summary and notes, module-tree diff, parameter-table diff
                             (added/removed with shapes and counts), the graph of every changed
                             site before and after (TorchDynamo capture), pass data (tables)
    dump.json                the JSON twin of all of the above

Written by ``transform(model, dump_dir=DIR)`` (or ``$VPMOE_DUMP_DIR``) and by
``python -m vpmoe_compile dump --config tiny --out DIR``.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("megatron.core", "triton", "tiktoken"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = "not installed"
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def _md_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    if not rows:
        return "_none_\n"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def _tree_diff(before: str, after: str) -> str:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", n=1, lineterm="")
    text = "\n".join(diff)
    return text or "(no change)"


def _pass_markdown(i: int, r) -> str:
    out = [f"# Pass {i}: `{r.name}`\n", f"{r.summary}\n", f"- time: {r.time_s:.3f} s", f"- verified: {r.verified}"]
    out += [f"- {n}" for n in r.notes]
    out.append("\n## Modules replaced\n")
    out.append(_md_table([{"path": f"`{m.path}`", "old": m.old, "new": m.new} for m in r.replaced], ["path", "old", "new"]))
    out.append("\n## Parameter-table diff\n")
    out.append(
        f"Added {len(r.params_added)} tensors ({r.params_added_count:,} values), removed "
        f"{len(r.params_removed)} tensors ({r.params_removed_count:,} values), net "
        f"{r.params_added_count - r.params_removed_count:+,}.\n"
    )
    rows = [{"": "+", "name": f"`{p.name}`", "shape": list(p.shape), "dtype": p.dtype, "numel": f"{p.numel:,}"} for p in r.params_added]
    rows += [{"": "-", "name": f"`{p.name}`", "shape": list(p.shape), "dtype": p.dtype, "numel": f"{p.numel:,}"} for p in r.params_removed]
    out.append(_md_table(rows, ["", "name", "shape", "dtype", "numel"]))
    if r.params_kept_moved:
        out.append("\nKept (same tensor) under a new name:\n")
        out += [f"- `{a}` -> `{b}`" for a, b in r.params_kept_moved]
    out.append("\n## Module-tree diff\n")
    out.append("```diff\n" + _tree_diff(r.tree_before, r.tree_after) + "\n```\n")
    if r.graphs:
        out.append("\n## Graphs of the changed sites (TorchDynamo capture)\n")
        for g in r.graphs:
            out.append(f"\n### `{g.site}`\n")
            out.append(f"Before ({g.before_graphs} graph(s)):\n\n```python\n{g.before.rstrip()}\n```\n")
            out.append(f"After ({g.after_graphs} graph(s)):\n\n```python\n{g.after.rstrip()}\n```\n")
    for key, value in r.data.items():
        out.append(f"\n## Data: `{key}`\n")
        if isinstance(value, list) and value and isinstance(value[0], dict):
            out.append(_md_table(value, list(value[0].keys())))
        else:
            out.append("```json\n" + json.dumps(value, indent=1, default=str) + "\n```\n")
    return "\n".join(out) + "\n"


#: Marker file a dump writes into its folder: the list of files it wrote. A later dump removes
#: only files listed there, and refuses a non-empty folder that has no marker.
MARKER = ".vpmoe-dump.json"


class DumpDirError(ValueError):
    """The dump folder cannot be used; nothing was written or removed."""


def check_dump_dir(dump_dir) -> Path:
    """Validate ``dump_dir`` before any work: a new or empty folder, or one an earlier dump of
    ours wrote (it holds :data:`MARKER`). Returns it as a ``Path``."""
    if dump_dir is None or str(dump_dir).strip() == "":
        raise DumpDirError(
            "debug dump: dump_dir is empty; name a folder for the dump (e.g. dump_dir='vpmoe-dump'), "
            "or pass dump_dir=None for no dump"
        )
    d = Path(dump_dir)
    if d.exists() and not d.is_dir():
        raise DumpDirError(f"debug dump: {d} exists and is not a directory; pass another dump_dir")
    if d.is_dir() and not (d / MARKER).is_file() and any(d.iterdir()):
        raise DumpDirError(
            f"debug dump: {d} is a non-empty folder that no vpmoe-compile dump wrote (no {MARKER}); "
            "the dump never writes into or deletes from such a folder. Pass a new or empty folder, or "
            "the folder of an earlier dump"
        )
    return d


def _our_files(d: Path) -> List[str]:
    try:
        names = json.loads((d / MARKER).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]


def write_dump(dump_dir, model, cfg, record) -> Path:
    """Write the dump for a finished transform (see module docstring); returns the directory.

    All-or-nothing: the pages are written into a hidden sibling directory first and moved into
    ``dump_dir`` (one ``os.replace`` per file) only once every page is written, so an error half
    way leaves an existing dump untouched and no partial one. Only files an earlier dump of ours
    wrote (listed in its :data:`MARKER`) and the new one does not have are removed; a non-empty
    folder without the marker is refused (:func:`check_dump_dir`).
    """
    d = check_dump_dir(dump_dir)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.partial-", dir=d.parent))
    try:
        _write_pages(tmp, model, cfg, record)
        new = sorted(f.name for f in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"writer": "vpmoe-compile debug dump", "files": new}, indent=1))
        d.mkdir(exist_ok=True)
        check_dump_dir(d)  # still ours or empty (another process may have written meanwhile)
        for name in _our_files(d):
            if name not in new and (d / name).is_file():
                (d / name).unlink()
        for name in new:
            os.replace(tmp / name, d / name)
        os.replace(tmp / MARKER, d / MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _write_pages(d: Path, model, cfg, record) -> None:
    from megatron_base import compat
    from megatron_base.model import count_parameters

    counts = count_parameters(model).as_dict()
    index = [
        "# vpmoe-compile debug dump\n",
        f"Config: `{cfg.source}` · {len(record.results)} passes in {record.time_s:.2f} s · "
        f"parameters after: {counts['total']:,} total, {counts['active']:,} active per token.\n",
        "\n## Passes\n",
    ]
    files = []
    for i, r in enumerate(record.results, 1):
        fname = f"{i:02d}-{r.name}.md"
        files.append(fname)
        (d / fname).write_text(_pass_markdown(i, r))
        delta = f"+{r.params_added_count:,} / -{r.params_removed_count:,}"
        index.append(f"{i}. [`{r.name}`]({fname}) — {r.summary} ({len(r.replaced)} modules replaced, params {delta}, {r.time_s:.2f} s)")
    if record.plan is not None:
        index.append("\n## Layer plan\n")
        index.append(_md_table(record.plan.table(), ["layer_number", "kind", "mlp", "attention_path", "mlp_path", "window"]))
    kernels = record.kernels.to_dict() if getattr(record, "kernels", None) is not None else None
    if kernels is not None:
        index.append("\n## Kernel policy (vpmoe_compile.kernels)\n")
        index += [f"- {k}: `{v}`" for k, v in kernels.items()]
    index.append("\n## Compat fixes in force (megatron_base.compat)\n")
    index += [f"- `{n}`" for n in compat.applied()] or ["- none"]
    index.append("\n## Config\n")
    index.append("```json\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```\n")
    index.append("\n## Versions\n")
    index += [f"- {k}: {v}" for k, v in _versions().items()]
    index.append("\nJSON twin of everything: [dump.json](dump.json)\n")
    (d / "index.md").write_text("\n".join(index) + "\n")
    payload = {
        "config_source": cfg.source,
        "config": cfg.to_dict(),
        "time_s": record.time_s,
        "parameters": counts,
        "plan": record.plan.table() if record.plan is not None else None,
        "kernels": kernels,
        "compat": compat.applied(),
        "versions": _versions(),
        "passes": [dict(r.to_json(), file=f) for r, f in zip(record.results, files)],
    }
    (d / "dump.json").write_text(json.dumps(payload, indent=1, default=str))
