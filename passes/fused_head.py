"""Fused-head pass: the LM loss through the fused projection + cross-entropy op.

With labels, stock ``GPTModel._postprocess`` computes ``logits [s, b, V]`` with ``output_layer``
and then ``compute_language_model_loss`` (``vocab_parallel_cross_entropy``), which upcasts all
of them to fp32. After this pass the same per-token loss ``[b, s]`` comes from
:func:`vpmoe_compile.ops.linear_cross_entropy.linear_cross_entropy`, which never holds the
``[s·b, V]`` fp32 logits. The seam (see :mod:`vpmoe_compile.modules.head`):

* ``model.output_layer``: its class becomes :class:`FusedHeadLinear` (the same object: the same
  ``output_layer.weight`` Parameter, attributes, hooks and checkpoint keys). Its ``forward`` takes
  ``labels=`` and then returns the loss; without labels it is the stock forward. The whole head
  is this one module: compile it with ``model.output_layer.compile(fullgraph=True)``.
* ``model``: its class becomes a cached subclass of its own class (``FusedHeadGPTModel`` for
  ``GPTModel``) whose ``_postprocess`` calls ``self.output_layer(hidden, weight=..., labels=...)``
  when labels are given; without labels, with MTP, an inference context or the config logger it
  is the stock ``_postprocess``, so logits are returned exactly as before.

Tied embeddings work (the embedding weight is passed as ``weight=``, as stock does). Under TP > 1
or sequence parallelism the pass is a no-op and says so (the vocab-parallel loss needs cross-rank
max / sum reductions the fused op does not do: the stock head and Megatron's
``vocab_parallel_cross_entropy`` stay). Refused before anything changes: multi-token prediction, ``defer_embedding_wgrad_compute``, a pipeline stage without
the output layer, an output layer that is not the stock ``ColumnParallelLinear`` (e.g.
Transformer Engine) or has a bias, and a megatron-core whose ``_postprocess`` signature differs
from 0.16.1's. Needs no other pass.
"""

from __future__ import annotations

import inspect
from typing import List

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from passes.base import (
    ModuleReplacement, Pass, PassContext, PassError, PassResult, SiteGraph, _qualname, capture_graph, head_tp_size,
)
from passes.registry import register_pass
from vpmoe_compile.modules.head import FusedHeadLinear, fused_head_model_class
from vpmoe_compile.ops.linear_cross_entropy import DEFAULT_CHUNK_SIZE, backward_vocab_slice


# megatron-core 0.16.1's GPTModel._postprocess parameters; the override mirrors them.
_POSTPROCESS_PARAMS = (
    "self", "hidden_states", "input_ids", "position_ids", "labels", "rotary_pos_emb", "rotary_pos_cos",
    "rotary_pos_sin", "mtp_in_postprocess", "loss_mask", "decoder_input", "attention_mask", "inference_params",
    "packed_seq_params", "sequence_len_offset", "runtime_gather_output", "extra_block_kwargs", "inference_context",
)
_CAPTURE_KEY = "fused_head.capture_graphs"


@register_pass
class FusedHeadPass(Pass):
    """See the module docstring. ``chunk_size``: tokens per forward chunk of the op."""

    name = "fused_head"
    requires = ()
    installs = ("FusedHeadLinear", "FusedHead*")  # the model becomes FusedHead<its class>

    def __init__(self, chunk_size: int = None):
        self.chunk_size = int(chunk_size or DEFAULT_CHUNK_SIZE)
        if self.chunk_size < 1:
            raise PassError(f"fused_head: chunk_size must be >= 1, got {chunk_size}")

    @staticmethod
    def _headless_stage(model) -> bool:
        """A pipeline stage before the last: no output layer, nothing to fuse (the pass is a
        no-op there; the last stage's run fuses its head)."""
        return (
            getattr(model.config, "pipeline_model_parallel_size", 1) > 1
            and not getattr(model, "post_process", True)
            and getattr(model, "output_layer", None) is None
        )

    @staticmethod
    def _vocab_parallel(model) -> int:
        """The TP size when the output layer is vocab-parallel (TP > 1, or sequence parallel):
        the fused op computes the loss of a whole vocabulary, so the pass leaves the stock head
        and Megatron's ``vocab_parallel_cross_entropy`` in place there (a no-op); else 0."""
        tp = max(head_tp_size(model), int(model.config.tensor_model_parallel_size or 1))
        return tp if tp > 1 or getattr(getattr(model, "output_layer", None), "sequence_parallel", False) else 0

    def check(self, ctx: PassContext) -> None:
        model, tc = ctx.model, ctx.model.config
        if self._headless_stage(model) or self._vocab_parallel(model):
            return
        if not getattr(model, "post_process", True) or getattr(model, "output_layer", None) is None:
            raise PassError(
                "fused_head: this model has no output layer (a pipeline stage built with "
                "post_process=False); run the pass on the last pipeline stage only, or leave it "
                "out of the pipeline"
            )
        head = model.output_layer
        if type(head) is not ColumnParallelLinear:
            raise PassError(
                f"fused_head: model.output_layer is {type(head).__name__}, not the stock "
                "megatron.core.tensor_parallel.ColumnParallelLinear (Transformer Engine or a custom "
                "head?); build the model with the local spec, or leave 'fused_head' out of the pipeline"
            )
        if self._vocab_parallel(model):
            return
        if getattr(model, "mtp_process", False) or tc.mtp_num_layers is not None:
            raise PassError(
                f"fused_head does not support multi-token prediction (mtp_num_layers="
                f"{tc.mtp_num_layers}): the MTP losses are computed from logits inside "
                "_postprocess. Build the model without MTP or leave 'fused_head' out of the pipeline."
            )
        if tc.defer_embedding_wgrad_compute:
            raise PassError(
                "fused_head does not support defer_embedding_wgrad_compute = True (the fused op "
                "computes the output weight's gradient itself, in its backward); set it to False "
                "or leave 'fused_head' out of the pipeline"
            )
        if head.bias is not None:
            raise PassError("fused_head: the output layer has a bias, which the fused op does not add; GPTModel builds it without one")
        params = tuple(inspect.signature(type(model)._postprocess).parameters)
        if params != _POSTPROCESS_PARAMS:
            raise PassError(
                f"fused_head overrides GPTModel._postprocess of megatron-core 0.16.1, but "
                f"{type(model).__name__}._postprocess takes {params}; update "
                "vpmoe_compile/modules/head.py for this megatron-core version or leave 'fused_head' "
                "out of the pipeline"
            )
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else head.weight
        if weight is None or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise PassError(
                f"fused_head: the output weight is {None if weight is None else weight.dtype}; the "
                "fused op needs an fp32, bf16 or fp16 weight"
            )

    def sites(self, ctx: PassContext) -> List[str]:
        """``output_layer`` (the manager captures its logits path before/after). Called only when
        the dump captures graphs; the manager's verification batch has no labels, so the labels
        path (projection + loss) is captured here, outside ``run``: before = the stock head and
        Megatron's cross entropy, after = the same output layer seen as :class:`FusedHeadLinear`
        (a shallow copy with the new class; the model is not touched)."""
        import copy

        model = ctx.model
        if self._headless_stage(model):
            return []
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else model.output_layer.weight
        if weight is not None and not weight.is_meta:

            hid, labels, w = sample = _sample(model, weight)
            before, n_before = _capture_stock(model, sample)
            view = copy.copy(model.output_layer)  # new object, same parameters; not attached
            view.__class__ = FusedHeadLinear
            view.lce_chunk_size = self.chunk_size
            after, n_after = capture_graph(view, (hid,), {"weight": w, "labels": labels})
            ctx.options[_CAPTURE_KEY] = SiteGraph(
                site="output_layer (labels given: projection + loss)",
                before=before,
                after=after,
                before_graphs=n_before,
                after_graphs=n_after,
                note=f"synthetic hidden {list(hid.shape)} and labels {list(labels.shape)}, no grad",
            )
        return ["output_layer"]

    def run(self, ctx: PassContext, result: PassResult) -> None:
        model = ctx.model
        if self._headless_stage(model):
            result.summary = "no output layer on this pipeline stage (post_process=False): nothing to fuse"
            return
        tp = self._vocab_parallel(model)
        if tp:
            result.summary = (
                f"tensor parallel {tp}: the output layer is vocab-parallel; the stock head and "
                "Megatron's vocab_parallel_cross_entropy stay (no vocab-parallel fused loss yet)"
            )
            return
        head = model.output_layer
        tied = bool(model.share_embeddings_and_output_weights)
        weight = model.shared_embedding_or_output_weight() if tied else head.weight
        vocab, hidden = weight.shape
        sample = None if weight.is_meta else _sample(model, weight)
        labels_graph = ctx.options.pop(_CAPTURE_KEY, None)  # from sites(), when the dump asked

        old_head, old_model = _qualname(head), _qualname(model)
        FusedHeadLinear.install(head, self.chunk_size)
        model.__class__ = fused_head_model_class(type(model))
        result.replaced.append(ModuleReplacement("output_layer", old_head, _qualname(head)))
        result.replaced.append(ModuleReplacement("(root)", old_model, _qualname(model)))
        result.sites.append("output_layer")

        if sample is not None:
            result.notes.append(_self_check(model, sample))
        if labels_graph is not None:
            result.graphs.append(labels_graph)


        tokens = 8192
        result.summary = (
            f"output layer -> FusedHeadLinear, {type(model).__name__}: loss through the fused "
            f"projection + cross entropy (V={vocab:,}, h={hidden:,}, chunk {self.chunk_size} tokens"
            f"{', tied embeddings' if tied else ''}); logits path unchanged"
        )
        result.notes.append(
            "same output_layer object and weight Parameter (state-dict keys and optimizer unchanged); "
            "the whole head is model.output_layer (vpmoe_compile_region): compile it as one module, "
            "e.g. model.output_layer.compile(fullgraph=True); both paths trace to one graph"
        )
        result.notes.append(
            f"per {tokens} tokens: stock fp32 logits {tokens * vocab * 4 / 2**30:.2f} GiB vs one fused chunk "
            f"{self.chunk_size * vocab * 4 / 2**30:.2f} GiB fp32 logits; backward vocabulary slices of "
            f"{backward_vocab_slice(tokens, vocab, self.chunk_size):,} columns; matmul FLOPs 4/3 of stock "
            "(the backward recomputes the logits)"
        )
        if model.config.cross_entropy_loss_fusion:
            result.notes.append(
                "cross_entropy_loss_fusion is set: the fused head replaces Megatron's fused cross entropy "
                "on the labels path (same loss)"
            )
        result.data.update(
            chunk_size=self.chunk_size,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            tied_embeddings=tied,
            compile_target="output_layer",
        )


def _sample(model, weight):
    """A small deterministic ``(hidden [8, 2, h], labels [2, 8], weight)`` (own generator),
    including one Megatron-ignored label (-100)."""
    g = torch.Generator().manual_seed(0)
    s, b = 8, 2
    vocab, h = weight.shape
    hid = torch.randn(s, b, h, generator=g).to(device=weight.device, dtype=weight.dtype)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[0, -1] = -100
    return hid, labels.to(weight.device), (weight if model.share_embeddings_and_output_weights else None)


def _stock_loss(model, hid, labels, weight):

    logits, _ = ColumnParallelLinear.forward(model.output_layer, hid, weight=weight)
    return model.compute_language_model_loss(labels, logits)


class _StockHeadLoss(torch.nn.Module):
    """The stock labels path (``output_layer``, then Megatron's ``compute_language_model_loss``)
    as one module, for the dump's before-graph only; it is not attached to the model."""

    def __init__(self, model):
        super().__init__()
        self.output_layer = model.output_layer
        self.compute_language_model_loss = model.compute_language_model_loss

    def forward(self, hid, labels, weight=None):
        logits, _ = self.output_layer(hid, weight=weight)
        return self.compute_language_model_loss(labels, logits)


def _capture_stock(model, sample):

    hid, labels, w = sample
    return capture_graph(_StockHeadLoss(model), (hid, labels), {"weight": w})


def _self_check(model, sample) -> str:
    """The fused labels path vs the stock one on the sample batch (no grad)."""
    hid, labels, w = sample
    with torch.no_grad():
        ref = _stock_loss(model, hid, labels, w).double()
        got = model.output_layer(hid, weight=w, labels=labels)[0].double()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    # Stock rounds the logits to the parameter dtype before its fp32 cross entropy; fused does not.
    tol = 1e-5 if hid.dtype == torch.float32 else 2e-2
    if got.shape != ref.shape or not err <= tol:
        raise PassError(
            f"fused_head self-check failed: fused loss {tuple(got.shape)} vs stock {tuple(ref.shape)}, "
            f"relative error {err:.2e} > {tol:g}"
        )
    return f"labels path checked against the stock head on a [{hid.shape[0]}, {hid.shape[1]}] batch: relative error {err:.1e}"
