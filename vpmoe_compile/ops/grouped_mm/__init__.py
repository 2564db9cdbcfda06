"""Grouped matrix product over consecutive row groups (``op.py``; reference ``reference.py``)."""

from vpmoe_compile.ops.grouped_mm.op import grouped_mm, supports
from vpmoe_compile.ops.grouped_mm.reference import grouped_mm_reference, grouped_mm_wgrad_reference

__all__ = ["grouped_mm", "grouped_mm_reference", "grouped_mm_wgrad_reference", "supports"]
