"""Triton helpers shared by the kernels of :mod:`vpmoe_compile.ops` and :mod:`vpmoe_compile.optim`."""

import torch
import triton
import triton.language as tl

__all__ = ["dot", "ieee_fp32"]


def ieee_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` on operands of ``dtype`` must use full fp32 products: fp32 operands do,
    unless the user allowed TF32 for fp32 matmuls (``torch.set_float32_matmul_precision("high")``
    or ``"medium"``, i.e. ``torch.backends.cuda.matmul.allow_tf32``) — the kernels follow torch's
    own fp32 matmul setting, IEEE by default. Read by the launchers at call time."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``IEEE`` forces full-fp32 products (``input_precision
    "ieee"``, no TF32) for fp32 operands (the interpreter tests and fp32 checks)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
