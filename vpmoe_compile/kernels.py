"""Which kernel runs each op: :class:`KernelPolicy`, decided once per ``transform``.

The ``[kernels]`` section of the config (:class:`megatron_base.config.KernelsSection`) names the
choices; ``transform`` turns it into one frozen :class:`KernelPolicy` (``transform(...,
backend=...)`` overrides ``[kernels] attention``), hands it to the passes through their
context, and the passes hand it to the modules they install. Nothing else chooses kernels: no
pass restates a kernel's limits and no environment variable changes the choice.

Two functions hold the whole rule:

* :meth:`KernelPolicy.backend` (at ``transform`` time, shapes known, device and dtype not yet
  final): the backend string an op's modules are built with. ``"reference"`` stays;
  ``"triton"`` stays where the kernel module's ``supports(shapes)`` says yes and is refused
  (:class:`KernelPolicyError`, with the kernel's own reason) where it says no; ``"auto"`` stays
  ``"auto"`` where the kernel supports the shapes and becomes ``"reference"`` where it does not.
* :func:`resolve_backend` (per call, inside the op): ``"auto"`` becomes the fast path where the
  tensors are on a CUDA device and the kernel module's ``supports(shapes, dtype, device)`` says
  yes, else ``"reference"`` (``"auto"`` never picks the Triton interpreter on the CPU). The ops
  call it for their own ``backend`` argument, so direct callers of an op get the same rule.

Each kernel module exports ``supports(shapes, dtype=None, device=None) -> bool`` (``shapes`` a
mapping of named sizes; ``None`` means "not known yet, not judged"):

=====================  ===================================================  ====================
op                     kernel module                                        ``shapes`` keys
=====================  ===================================================  ====================
``sink_attention``     :mod:`vpmoe_compile.ops.sink_attention.triton`       ``head_dim``
                                                                            (the op adds
                                                                            ``alibi_with_window``)
``tpa_attention``      :mod:`vpmoe_compile.ops.tpa_attention.triton`        ``head_dim``,
                                                                            ``q_rank``,
                                                                            ``kv_rank``
``grouped_mm``         :mod:`vpmoe_compile.ops.grouped_mm.op` (the fused    ``k``, ``n``
                       path is ``torch._grouped_mm``; no kernel of ours)
=====================  ===================================================  ====================

Not here: the optimizer's Polar Express kernels are chosen by ``[optimizer] pe_backend`` (they
belong to the optimizer, built after ``transform``), and ``linear_cross_entropy`` picks its
elementwise kernels per call (Triton on CUDA, torch ops elsewhere), with no choice to make at
``transform``. This module imports neither Megatron nor the kernels (they are imported when a
policy first asks them).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

__all__ = [
    "ATTENTION_BACKENDS",
    "GROUPED_GEMM_BACKENDS",
    "KernelPolicy",
    "KernelPolicyError",
    "resolve_backend",
]

#: ``[kernels] attention``: both attention ops (global sink attention, local TPA attention).
ATTENTION_BACKENDS: Tuple[str, ...] = ("auto", "triton", "reference")
#: ``[kernels] grouped_gemm``: the MoE experts' grouped GEMM (``"auto"``: ``torch._grouped_mm``
#: where it runs without a host sync, else the reference op).
GROUPED_GEMM_BACKENDS: Tuple[str, ...] = ("auto", "reference")

Shapes = Mapping[str, int]

#: op -> the module that exports its fast path's ``supports`` (and, for the Triton kernels,
#: ``check_supported``, which raises with the reason).
_KERNEL_MODULES = {
    "sink_attention": "vpmoe_compile.ops.sink_attention.triton",
    "tpa_attention": "vpmoe_compile.ops.tpa_attention.triton",
    "grouped_mm": "vpmoe_compile.ops.grouped_mm.op",
}


class KernelPolicyError(ValueError):
    """A kernel was asked for where it cannot run; the message says why and what to set."""


def _check_choice(what: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def resolve_backend(
    choice: str,
    *,
    allowed: Tuple[str, ...],
    supports: Callable[..., bool],
    shapes: Shapes,
    dtype: Optional[torch.dtype],
    device: Any,
    fast: str = "triton",
    what: str = "op",
) -> str:
    """One call's backend: ``choice`` unless it is ``"auto"``, which becomes ``fast`` on a CUDA
    device where ``supports(shapes, dtype, device)`` holds and ``"reference"`` everywhere else.

    Args:
        choice: the op's ``backend`` argument (checked against ``allowed``).
        supports: the kernel module's ``supports``.
        shapes, dtype, device: the call's named sizes, dtype and device.
        fast: the name of the op's fast path (``"triton"``; ``"fused"`` for ``grouped_mm``).
        what: the op's name for the error message.
    """
    _check_choice(f"{what}: backend", choice, allowed)
    if choice != "auto":
        return choice
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and supports(shapes, dtype, dev):
        return fast
    return "reference"


def _kernel_module(op: str):
    if op not in _KERNEL_MODULES:
        raise ValueError(f"unknown op {op!r}; the kernel policy covers {', '.join(_KERNEL_MODULES)}")
    return importlib.import_module(_KERNEL_MODULES[op])


@dataclass(frozen=True)
class KernelPolicy:
    """The kernel choices of one transformed model (the ``[kernels]`` config section).

    Attributes:
        attention: ``"auto"`` (Triton on CUDA where the kernels support the shapes, the
            PyTorch reference elsewhere), ``"triton"`` or ``"reference"``; both attention ops.
        grouped_gemm: ``"auto"`` or ``"reference"``: the MoE experts' grouped GEMM.

    The optimizer's kernel choice, ``[optimizer] pe_backend`` (Polar Express: fused Triton
    kernel or batched ``bmm``), stays in the optimizer's section: the optimizer is built after
    ``transform`` and reads its own config. (The former ``tpa_attention_middle`` choice was
    removed: the library has one sliding-window kernel family, ``docs/design.md#kernel-choice``.)
    """

    attention: str = "auto"
    grouped_gemm: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("[kernels] attention", self.attention, ATTENTION_BACKENDS)
        _check_choice("[kernels] grouped_gemm", self.grouped_gemm, GROUPED_GEMM_BACKENDS)

    @classmethod
    def from_config(cls, cfg: Any = None, *, attention: Optional[str] = None) -> "KernelPolicy":
        """The policy of ``cfg.kernels`` (defaults where ``cfg`` has none); ``attention``, when
        given, overrides ``[kernels] attention`` (``transform(..., backend=...)``)."""
        section = getattr(cfg, "kernels", None)
        values = {} if section is None else {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        if attention is not None:
            values["attention"] = attention
        return cls(**values)

    def _choice(self, op: str) -> Tuple[str, str]:
        if op == "grouped_mm":
            return self.grouped_gemm, "[kernels] grouped_gemm"
        return self.attention, "[kernels] attention"

    def supports(self, op: str, shapes: Shapes, dtype: Optional[torch.dtype] = None, device: Any = None) -> bool:
        """The kernel module's own ``supports`` for ``op`` (see the module docstring)."""
        return bool(_kernel_module(op).supports(shapes, dtype, device))

    def backend(self, op: str, shapes: Shapes) -> str:
        """The backend string the modules of ``op`` are built with (see the module docstring).

        Raises:
            KernelPolicyError: ``[kernels] attention = "triton"`` and the Triton kernels of
                ``op`` cannot run these shapes (the message carries the kernel's reason).
        """
        choice, key = self._choice(op)
        if choice == "reference" or self.supports(op, shapes):
            return choice
        if choice == "auto":
            return "reference"
        module = _kernel_module(op)
        reason = "unsupported shapes"
        try:
            module.check_supported(shapes)
        except (ValueError, TypeError, RuntimeError) as exc:
            reason = str(exc)
        shown = ", ".join(f"{k} {v}" for k, v in shapes.items())
        override = " (or transform's backend=, which overrides it)" if key == "[kernels] attention" else ""
        raise KernelPolicyError(
            f"{key} = {choice!r}: the {op} kernels cannot run {shown} ({reason}); set {key}{override} "
            "to 'auto' (falls back to the PyTorch reference where the kernels cannot run) or 'reference'"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
