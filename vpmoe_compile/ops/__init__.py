"""Kernels registered with ``torch.library`` (custom op + autograd + fake), one folder per op:
``<op>/op.py`` (the custom op, autograd, fake implementation, argument checks), ``<op>/triton.py``
(the Triton kernels and ``supports(...)``), ``<op>/reference.py`` (plain PyTorch: the fallback and
the tests' oracle). Importing this package needs neither Megatron nor a GPU. Which kernel runs is
decided by :mod:`vpmoe_compile.kernels` (``docs/design.md#kernel-choice``).

* :func:`sink_attention`, :func:`alibi_sink_attention`, :func:`window_sink_attention` —
  causal flash attention with the GPT-OSS sink, optional ALiBi (GRAPE-A) or sliding window
  (``sink_attention/``; the window runs on the TPA op's sliding-window kernels, the library's one
  family); :func:`alibi_slopes` — the standard ALiBi slopes for any head count
  (``sink_attention/alibi.py``).
* :func:`tpa_window_attention` — the fused TPA local-layer op: factors -> contraction, bias,
  QK RMSNorm, GRAPE-M rotation, window + sink attention (``tpa_attention/``; the packed factor
  layout in ``tpa_attention/layout.py``).
* ``grouped_mm/`` — the MoE experts' grouped GEMM (``torch._grouped_mm`` or a reference op).
* ``linear_cross_entropy/`` — the LM head fused with the loss.

``vpmoe_compile.ops.sink_attention`` is the function (as the other names here); its folder's
modules import as ``from vpmoe_compile.ops.sink_attention import triton`` or
``from vpmoe_compile.ops.sink_attention.triton import ...``.
"""

from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes
from vpmoe_compile.ops.sink_attention.op import alibi_sink_attention, sink_attention, window_sink_attention
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention

__all__ = ["alibi_sink_attention", "alibi_slopes", "sink_attention", "tpa_window_attention", "window_sink_attention"]
