"""A torch RMSNorm that allows Megatron's sequence parallelism, for the local (non-TE) spec.

Megatron-Core 0.16.1's local spec builds its norms with ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``; with Transformer Engine the spec uses ``TENorm`` instead, which
allows it. Megatron requires sequence parallelism whenever tensor and expert parallelism are
combined, so without TE a TP x EP model cannot be built at all.

Under sequence parallelism a norm sees this rank's ``[s / tp, b, h]`` slice of the sequence: the
normalisation is per token, so the forward is unchanged, but the weight's gradient covers only
this rank's tokens and must be summed over the tensor-parallel group. Megatron does that in
``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) for every parameter
marked ``sequence_parallel``, the attribute ``TENorm`` and Megatron's own ``FusedLayerNorm``
set. :class:`SequenceParallelTorchNorm` builds the same ``torch.nn.RMSNorm`` ``WrappedTorchNorm``
builds and sets that attribute; :func:`allow_sequence_parallel_norms` puts it into a layer spec
in place of ``WrappedTorchNorm`` (nothing else in the spec changes, and the parameter names and
checkpoints are the stock ones).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["SequenceParallelTorchNorm", "allow_sequence_parallel_norms"]


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm``'s signature and module (``torch.nn.RMSNorm(hidden_size, eps)``), with
    sequence parallelism allowed: the weight is marked ``sequence_parallel`` (its gradient summed
    over the TP group by ``finalize_model_grads``) when ``config.sequence_parallel`` is set. Like
    ``WrappedTorchNorm`` it is a class whose construction returns the torch module (Megatron's
    ``build_module`` instantiates classes and would pass a plain function through unbuilt)."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> torch.nn.Module:
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"SequenceParallelTorchNorm builds RMSNorm only; the config asks for {config.normalization!r}"
            )
        for field in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, field, False):
                raise ValueError(
                    f"{field} is not supported by torch RMSNorm (as in Megatron's WrappedTorchNorm); set it to False"
                )
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = bool(config.sequence_parallel)
        return norm


def allow_sequence_parallel_norms(spec):
    """``spec`` (a ``ModuleSpec``, ``TransformerBlockSubmodules`` or any nesting of them, lists
    included) with every ``WrappedTorchNorm`` replaced by :class:`SequenceParallelTorchNorm`. The spec
    is rebuilt, not modified (Megatron's spec functions may return shared objects)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(obj):
        if obj is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if isinstance(obj, ModuleSpec):
            return dataclasses.replace(
                obj,
                module=swap(obj.module),
                submodules=swap(obj.submodules),
                params=dict(obj.params) if obj.params else obj.params,
            )
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o) for o in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(obj, **{f.name: swap(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                               if f.init})
        return obj

    return swap(spec)
