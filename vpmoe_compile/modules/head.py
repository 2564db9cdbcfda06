"""The fused LM head: output projection + cross entropy in one module (``fused_head`` pass).

Two classes, both installed by **changing the class of the existing objects** (``__class__``),
so nothing else about them changes: same module objects, same ``output_layer.weight``
Parameter (name, attributes, checkpoint key, optimizer entry), same hooks and ``_extra_state``.

* :class:`FusedHeadLinear` (subclass of ``ColumnParallelLinear``): ``forward(hidden, weight=None,
  runtime_gather_output=None, labels=None)``. Without labels it is the stock forward (logits
  ``[s, b, V]``, bias). With labels it returns ``(loss [b, s] fp32, None)`` through
  :func:`vpmoe_compile.ops.linear_cross_entropy.linear_cross_entropy` (also available as
  :meth:`FusedHeadLinear.loss`). This ``forward`` is the one callable to compile: the whole
  head (projection + loss) is ``model.output_layer``, e.g.
  ``model.output_layer.compile(fullgraph=True)``; ``vpmoe_compile.compile`` finds it by its
  ``vpmoe_compile_region`` flag. Each path (labels / no labels) traces to one graph.
* :func:`fused_head_model_class` (a cached subclass of the model's class, e.g.
  :class:`FusedHeadGPTModel`): overrides ``GPTModel._postprocess`` so that, when labels are given
  on the plain training/eval path, the loss comes from ``self.output_layer(hidden, weight=...,
  labels=labels)``. Every other case (no labels, MTP, an inference context, the config logger,
  a stage without the output layer) runs the stock ``_postprocess`` unchanged.

The loss is Megatron's ``compute_language_model_loss`` (``vocab_parallel_cross_entropy``,
TP = 1) computed without the logits: per token ``[b, s]`` fp32, labels outside ``[0, V)``
handled as Megatron does.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.config_logger import has_config_logger_enabled

from vpmoe_compile.ops.linear_cross_entropy import DEFAULT_CHUNK_SIZE, linear_cross_entropy

__all__ = ["FusedHeadGPTModel", "FusedHeadLinear", "fused_head_model_class"]


class FusedHeadLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` output layer that can also return the per-token LM loss.

    Not constructed directly: :meth:`install` turns the model's own output layer into one.
    Attribute ``lce_chunk_size`` is the op's tokens-per-chunk. ``vpmoe_compile_region`` marks it
    as the head region ``vpmoe_compile.compile`` compiles (both paths trace to one graph each).
    """

    vpmoe_compile_region = True

    @classmethod
    def install(cls, layer: ColumnParallelLinear, chunk_size: int = DEFAULT_CHUNK_SIZE) -> "FusedHeadLinear":
        """Turn ``layer`` (exactly a ``ColumnParallelLinear``) into a :class:`FusedHeadLinear`
        in place; returns the same object."""
        if type(layer) is not ColumnParallelLinear:
            raise TypeError(f"FusedHeadLinear.install needs a ColumnParallelLinear, got {type(layer).__name__}")
        layer.__class__ = cls
        layer.lce_chunk_size = int(chunk_size)
        return layer

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Stock forward without labels: ``(logits [s, b, V], bias)``. With ``labels [b, s]``:
        ``(loss [b, s] fp32, None)`` (see :meth:`loss`)."""
        if labels is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return self.loss(input_, labels, weight=weight), None

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token LM loss, equal to ``compute_language_model_loss(labels, self(hidden)[0])``.

        Args:
            hidden: ``[s, b, h]`` final hidden states.
            labels: ``[b, s]`` integer token ids (Megatron's layout).
            weight: ``[V, h]``; default ``self.weight`` (pass the word-embedding weight for tied
                embeddings, as ``GPTModel`` does).

        Returns:
            ``[b, s]`` fp32.
        """
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "FusedHeadLinear.loss: the output layer has no weight of its own (tied "
                    "embeddings); pass weight=model.shared_embedding_or_output_weight()"
                )
            weight = self.weight
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not {expected} as expected")
        if hidden.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != (hidden.shape[1], hidden.shape[0]):
            raise ValueError(
                f"FusedHeadLinear.loss expects hidden [s, b, h] and labels [b, s], got hidden "
                f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}"
            )
        s, b, h = hidden.shape
        # Tokens in [s, b] order: hidden is a view, labels a small transposed copy.
        loss = linear_cross_entropy(
            hidden.reshape(s * b, h),
            weight,
            labels.transpose(0, 1).reshape(s * b),
            chunk_size=getattr(self, "lce_chunk_size", DEFAULT_CHUNK_SIZE),
        )
        return loss.view(s, b).transpose(0, 1).contiguous()


class _FusedHeadPostprocess:
    """Mixin over a ``GPTModel`` class: ``_postprocess`` computes the loss through the fused
    head when labels are given (signature of megatron-core 0.16.1's ``GPTModel._postprocess``)."""

    def _fused_head_applies(self, labels, mtp_in_postprocess, inference_context) -> bool:
        return (
            labels is not None
            and self.post_process
            and not mtp_in_postprocess
            and self.config.mtp_num_layers is None
            and inference_context is None
            and isinstance(self.output_layer, FusedHeadLinear)
            and not has_config_logger_enabled(self.config)
        )

    # Overrides Megatron's private GPTModel._postprocess: the loss is computed there, and an
    # override has to be a method of the model class, so it cannot live in megatron_base.compat.
    # The fused_head pass refuses a megatron-core whose _postprocess signature differs.
    def _postprocess(
        self,
        hidden_states,
        input_ids,
        position_ids,
        labels,
        rotary_pos_emb,
        rotary_pos_cos,
        rotary_pos_sin,
        mtp_in_postprocess=None,
        loss_mask=None,
        decoder_input=None,
        attention_mask=None,
        inference_params=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        runtime_gather_output=None,
        extra_block_kwargs=None,
        inference_context=None,
    ):
        """Labels given (training / eval): ``loss [b, s]`` fp32 from the fused head, without the
        logits. Otherwise the stock ``_postprocess`` (logits ``[b, s, V]``, MTP, inference)."""
        if not self._fused_head_applies(labels, mtp_in_postprocess, inference_context):
            return super()._postprocess(
                hidden_states=hidden_states,
                input_ids=input_ids,
                position_ids=position_ids,
                labels=labels,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                mtp_in_postprocess=mtp_in_postprocess,
                loss_mask=loss_mask,
                decoder_input=decoder_input,
                attention_mask=attention_mask,
                inference_params=inference_params,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
                runtime_gather_output=runtime_gather_output,
                extra_block_kwargs=extra_block_kwargs,
                inference_context=inference_context,
            )
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        loss, _ = self.output_layer(hidden_states, weight=output_weight, labels=labels)
        return loss


class FusedHeadGPTModel(_FusedHeadPostprocess, GPTModel):
    """``GPTModel`` whose labels path computes the loss through :class:`FusedHeadLinear`."""


_CLASSES: Dict[type, type] = {GPTModel: FusedHeadGPTModel}


def fused_head_model_class(base: type) -> type:
    """The fused-head subclass of ``base`` (a ``GPTModel`` subclass), created once and cached
    (``FusedHeadGPTModel`` for ``GPTModel`` itself, importable by name for pickling)."""
    if issubclass(base, _FusedHeadPostprocess):
        return base
    if not issubclass(base, GPTModel):
        raise TypeError(f"fused_head_model_class needs a GPTModel subclass, got {base.__name__}")
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"FusedHead{base.__name__}", (_FusedHeadPostprocess, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls
