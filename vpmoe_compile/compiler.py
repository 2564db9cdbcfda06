"""``vpmoe_compile.compile(model)``: compile a transformed model layer by layer, in place.

After :func:`vpmoe_compile.transform`, every module of a transformer layer is free of host
synchronisation and data-dependent shapes (TPA / sink attention are custom ops, the grouped MoE
layer sorts on the device), so TorchDynamo captures **each whole layer as one graph**
(``fullgraph=True``: a graph break is an error, not a silent slowdown). Layers of the same kind
share their compiled code (one compilation for all MoE layers with local attention, one for the
global ones, one for the dense first layer): nothing a layer's forward reads differs between
layers of a kind — the MoE router even indexes its aux-loss log slot with a tensor for that.

What is compiled (each with ``nn.Module.compile`` semantics, so module tree, parameter names,
hooks and state-dict keys are unchanged and Megatron's wrappers — ``Float16Module``,
``DistributedDataParallel`` — can sit outside):

* every ``decoder.layers[i]`` (attention, MLP / MoE, norms, residuals);
* ``decoder.final_layernorm``;
* the LM head: the fused head + loss module when the ``fused_head`` pass installed one
  (anything with ``vpmoe_compile_region = True``), otherwise ``output_layer``.

Before compiling, everything a first eager forward would create lazily is created (Megatron's
MoE aux-loss scale tensor and tracker entries, the fp32 expert bias), so the second step does not
recompile. Each compiled call runs under :func:`megatron_base.compat.dynamo_config`.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import nn

__all__ = ["compile", "unwrap_gpt", "bare_module"]


class CompileError(RuntimeError):
    """The model cannot be compiled as asked; the message says why and what to do."""


def bare_module(model: nn.Module) -> nn.Module:
    """The module inside Megatron's ``DistributedDataParallel`` / ``Float16Module`` wrappers
    (the first one with a ``decoder``, or the innermost ``.module``); ``model`` itself if bare."""
    seen = 0
    while not hasattr(model, "decoder") and hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    return model


def unwrap_gpt(model: nn.Module) -> nn.Module:
    """The ``GPTModel`` inside Megatron's ``DistributedDataParallel`` / ``Float16Module``."""
    model = bare_module(model)
    if not hasattr(model, "decoder"):
        raise CompileError(f"vpmoe_compile.compile needs a (wrapped) Megatron GPTModel, got {type(model).__name__}")
    return model


def _compile_module(module: nn.Module, **kwargs) -> None:
    from megatron_base.compat import dynamo_config, module_call_impl, set_module_compiled_call

    call_impl = module_call_impl(module)

    def region(*args, **kw):  # a frame of ours: TorchDynamo skips torch.nn's own frames as roots
        return call_impl(*args, **kw)

    compiled = torch.compile(region, **kwargs)

    @functools.wraps(call_impl)
    def call(*args, **kw):
        with dynamo_config():
            return compiled(*args, **kw)

    set_module_compiled_call(module, call)


def compile(
    model: nn.Module,
    *,
    backend: str = "inductor",
    mode: Optional[str] = None,
    fullgraph: bool = True,
    dynamic: bool = False,
) -> List[str]:
    """Compile each transformer layer (and the head) of a transformed model, in place.

    Args:
        model: a model transformed by :func:`vpmoe_compile.transform`, bare or inside Megatron's
            ``Float16Module`` / ``DistributedDataParallel``.
        backend, mode, dynamic: passed to ``torch.compile`` (``backend="eager"`` or
            ``"aot_eager"`` check capture without Inductor).
        fullgraph: refuse graph breaks (default; pass False only to investigate one).

    Returns:
        The compiled module paths (relative to the ``GPTModel``).

    Raises:
        CompileError: the model was not transformed, or is already compiled.
    """
    from megatron_base import compat

    gpt = unwrap_gpt(model)
    if getattr(gpt, "vpmoe_transform", None) is None:
        raise CompileError(
            "vpmoe_compile.compile needs a transformed model: the stock layers have host syncs and "
            "data-dependent shapes (MoE dispatch) that break graphs. Call vpmoe_compile.transform(model) "
            "first (before DDP wrapping), then compile."
        )
    if getattr(gpt, "vpmoe_compiled", None):
        raise CompileError("this model is already compiled by vpmoe_compile.compile")
    compat.apply()
    from vpmoe_compile.modules.moe import SparseTopKRouter

    for module in gpt.modules():
        if isinstance(module, SparseTopKRouter):
            module.prime_for_compile()
    kwargs = dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    done = []
    for i, layer in enumerate(gpt.decoder.layers):
        _compile_module(layer, **kwargs)
        done.append(f"decoder.layers.{i}")
    if getattr(gpt.decoder, "final_layernorm", None) is not None:
        _compile_module(gpt.decoder.final_layernorm, **kwargs)
        done.append("decoder.final_layernorm")
    heads = [(n, m) for n, m in gpt.named_modules() if getattr(m, "vpmoe_compile_region", False)]
    if not heads and getattr(gpt, "output_layer", None) is not None:
        heads = [("output_layer", gpt.output_layer)]
    for name, module in heads:
        _compile_module(module, **kwargs)
        done.append(name)
    gpt.vpmoe_compiled = tuple(done)
    return done
