"""The fused TPA local-layer op: packed factors -> contraction, ``/R``, QKV bias, QK RMSNorm,
GRAPE-M rotation, sliding-window attention with a sink (``docs/design.md#tpa-attention``).

* ``op.py`` — :func:`tpa_window_attention` and the ``torch.library`` custom ops (autograd, fake
  implementations, argument checks).
* ``triton.py`` — the Triton kernels (prologue, window + sink attention, their backwards) and
  ``supports(...)`` / ``check_supported(...)``. Its window + sink attention (``swa_fwd`` /
  ``swa_bwd``) is the library's one sliding-window kernel family: ``window_sink_attention``
  (``ops/sink_attention``) runs on it too.
* ``reference.py`` — plain PyTorch: the whole op (the fallback and the tests' oracle), the
  fork's rounding emulation and the fork's unpacked-weight layout.
* ``layout.py`` — the packed factor layout (:func:`tpa_factor_rows`, the one owner of the
  ``A_q | A_k | A_v | B_q | B_k | B_v`` order).
"""

from vpmoe_compile.ops.tpa_attention.layout import factor_offsets, factor_width, split_factors, tpa_factor_rows
from vpmoe_compile.ops.tpa_attention.op import tpa_window_attention
from vpmoe_compile.ops.tpa_attention.reference import tpa_fork_emulation, tpa_prologue_reference, tpa_reference

__all__ = [
    "factor_offsets",
    "factor_width",
    "split_factors",
    "tpa_factor_rows",
    "tpa_fork_emulation",
    "tpa_prologue_reference",
    "tpa_reference",
    "tpa_window_attention",
]
