"""Triton helpers shared by the kernels of :mod:`vpmoe_compile.ops` and :mod:`vpmoe_compile.optim`."""

import triton
import triton.language as tl

__all__ = ["dot"]


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``IEEE`` forces full-fp32 products (``input_precision
    "ieee"``, no TF32) for fp32 operands (the interpreter tests and fp32 checks)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
