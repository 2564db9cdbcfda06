"""Fused LM head + loss: ``linear_cross_entropy(hidden [N, h], weight [V, h], labels [N])`` ->
per-token fp32 loss ``[N]`` without the ``[N, V]`` fp32 logits (``op.py``; plain-PyTorch
reference with the logits materialised in ``reference.py``). Imports without Megatron."""

from vpmoe_compile.ops.linear_cross_entropy.op import DEFAULT_CHUNK_SIZE, backward_vocab_slice, linear_cross_entropy
from vpmoe_compile.ops.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["DEFAULT_CHUNK_SIZE", "backward_vocab_slice", "linear_cross_entropy", "linear_cross_entropy_reference"]
