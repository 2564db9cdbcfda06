"""Causal flash attention with a learnable sink, optional ALiBi (GRAPE-A) or sliding window.

* ``op.py`` — the public functions and the ``torch.library`` custom ops (autograd, fake
  implementations, argument checks): :func:`sink_attention`, :func:`alibi_sink_attention`,
  :func:`window_sink_attention`, :func:`sink_attention_with_lse`, raw
  :func:`sink_attention_forward` / :func:`sink_attention_backward`.
* ``triton.py`` — the Triton kernels and ``supports(...)`` / ``check_supported(...)``.
* ``reference.py`` — the dense PyTorch reference (the fallback and the tests' oracle; also the
  attention step of the TPA op's reference).
* ``alibi.py`` — the ALiBi slopes the global layers pass as ``slopes``.

Math: ``docs/design.md#sink-attention``.
"""

from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes, alibi_slopes_for_rank, alibi_slopes_list
from vpmoe_compile.ops.sink_attention.op import (
    alibi_sink_attention,
    sink_attention,
    sink_attention_backward,
    sink_attention_forward,
    sink_attention_with_lse,
    window_sink_attention,
)
from vpmoe_compile.ops.sink_attention.reference import (
    sink_attention_reference,
    sink_attention_reference_backward,
    visibility_mask,
)

__all__ = [
    "alibi_sink_attention",
    "alibi_slopes",
    "alibi_slopes_for_rank",
    "alibi_slopes_list",
    "sink_attention",
    "sink_attention_backward",
    "sink_attention_forward",
    "sink_attention_reference",
    "sink_attention_reference_backward",
    "sink_attention_with_lse",
    "visibility_mask",
    "window_sink_attention",
]
