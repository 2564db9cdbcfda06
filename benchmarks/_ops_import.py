"""Import ``vpmoe_compile.ops`` modules for the benchmarks without importing the whole package.

``vpmoe_compile/__init__.py`` may import Megatron (absent on the GPU box); the attention ops do not
need it. Try the normal import first; on failure register bare package objects whose ``__path__``
points at the source folders, so only the leaf modules (and their relative imports) are executed.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_op_module(name: str):
    """``import_op_module("sink_attention.triton")`` -> the module ``vpmoe_compile.ops.sink_attention.triton``
    (``"sink_attention"`` -> the op's package, which exports its public functions)."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    full = f"vpmoe_compile.ops.{name}"
    try:
        return importlib.import_module(full)
    except ImportError:
        for mod in [m for m in sys.modules if m == "vpmoe_compile" or m.startswith("vpmoe_compile.")]:
            del sys.modules[mod]
        for pkg, path in (("vpmoe_compile", "vpmoe_compile"), ("vpmoe_compile.ops", "vpmoe_compile/ops")):
            m = types.ModuleType(pkg)
            m.__path__ = [os.path.join(_ROOT, path)]
            sys.modules[pkg] = m
        return importlib.import_module(full)
