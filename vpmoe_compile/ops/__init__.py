"""Kernels registered with ``torch.library`` (custom op + autograd + fake), each beside its
plain-PyTorch reference. Importing this package needs neither Megatron nor a GPU.

* :func:`sink_attention`, :func:`alibi_sink_attention`, :func:`window_sink_attention` —
  causal flash attention with the GPT-OSS sink, optional ALiBi (GRAPE-A) or sliding window
  (``sink_attention.py``; kernels ``triton_sink_attention.py``; reference
  ``attention_reference.py``).
* :func:`tpa_window_attention` — the fused TPA local-layer op: factors -> contraction, bias,
  QK RMSNorm, GRAPE-M rotation, window + sink attention (``tpa_attention.py``; kernels
  ``triton_tpa.py``; reference ``tpa_reference.py``).
* :func:`alibi_slopes` — the standard ALiBi slopes for any head count (``alibi.py``).
"""

from vpmoe_compile.ops.alibi import alibi_slopes
from vpmoe_compile.ops.sink_attention import alibi_sink_attention, sink_attention, window_sink_attention
from vpmoe_compile.ops.tpa_attention import tpa_window_attention

__all__ = ["alibi_sink_attention", "alibi_slopes", "sink_attention", "tpa_window_attention", "window_sink_attention"]
