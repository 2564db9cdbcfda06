"""Compatibility fixes for known defects of the pinned ``megatron-core==0.16.1``, and the named
accessors of the Megatron / torch internals this library uses.

This is the one place where this library touches Megatron or torch internals
(docs/design.md#compat-fixes lists the defects and the rule). It holds two kinds of things:

* **Fixes** (patches): every fix is named, documented with the defect it works around, applied
  idempotently by :func:`apply`, recorded in :func:`applied` (the debug dump lists them), and
  reversible with :func:`remove` (tests use that).
* **Accessors** (no patching): a documented function for each private Megatron or torch
  internal that the library reads or calls (:func:`common_per_param_step`,
  :func:`float16_model_and_main_params_data`, :func:`update_router_expert_bias`,
  :func:`router_fp32_expert_bias`, :func:`router_apply_aux_losses`,
  :func:`gpt_dataset_sample_from`, :func:`module_call_impl`,
  :func:`set_module_compiled_call`, :func:`moe_aux_loss_scale`), so that an upgrade of either
  has one file to check.

Fixes fall in two groups:

Device-independent (applied on every machine):

* ``te_general_gemm``: ``megatron.core.transformer.moe.moe_utils`` only defines
  ``te_general_gemm`` when Transformer Engine imports, but ``RouterGatingLinearFunction`` reads
  it unconditionally, so MoE routing raises ``NameError`` without TE -- on GPU as well. Fix:
  define the module attribute as ``None`` (the code then takes its plain ``torch`` path).
* ``moe_aux_loss_scale_shape``: ``MoEAuxLossAutoScaler`` keeps the aux-loss scale in a class
  attribute. Its ``backward`` creates it as a 0-d ``torch.tensor(1.0)`` when unset, while the
  pipeline schedules set it with ``torch.ones(1)`` through ``set_loss_scale``, which ``copy_`` calls
  into the existing tensor: once a MoE backward ran outside a schedule (an eager step, a test),
  every later schedule step raises ``output with shape [] doesn't match the broadcast shape
  [1]``. Fix: ``set_loss_scale`` copies a same-size scale in the existing tensor's shape (still
  in place, so compiled graphs that read that tensor keep seeing the update).
* ``tokenizer_class_metadata``: megatron-core 0.16.1's tokenizer metadata is inconsistent about
  how it names a tokenizer class. ``MegatronTokenizer.write_metadata`` (and the
  ``MegatronTokenizerBase`` docstring, and every stock tokenizer's config) name it with the
  string keys ``class_name`` / ``class_path``, but ``MegatronTokenizer.from_pretrained`` never
  reads them: it looks for a ``tokenizer_class`` key instead, and when that is set it calls
  ``getattr(metadata['tokenizer_class_path'], metadata['tokenizer_class_name'])`` -- ``getattr``
  on the *string* module path, which cannot work for metadata read from JSON. Without
  ``tokenizer_class`` it picks a stock class by ``model_type`` (``GPTTokenizer`` ...), whose
  ``_restore_model`` only knows Megatron's own six libraries, so a tokenizer of another library
  (ours, ``o200k-harmony``) cannot be loaded through the factory at all (``KeyError``). Fix:
  ``MegatronTokenizer.from_pretrained`` reads the metadata as 0.16.1 does (same file location
  rule, file or dict) and, when it has no ``tokenizer_class`` but does name ``class_name`` and
  ``class_path``, imports ``class_path``, checks the class is a ``MegatronTokenizerBase`` and
  constructs it exactly as 0.16.1 constructs its own (``cls(path=tokenizer_path,
  config=metadata, **kwargs)`` with ``metadata['metadata_path']`` set); any other metadata goes
  to the original unchanged. :func:`megatron_base.tokenizer.write_tokenizer_metadata` writes
  such metadata for :class:`~megatron_base.tokenizer.O200kHarmonyTokenizer`.

* ``moe_logging_tracker_size``: the router logs its aux losses per layer into a process-wide
  tracker (``save_to_aux_losses_tracker``) whose ``values`` tensor is sized by the *first*
  model's ``num_layers`` and never resized: once a shallower model ran a MoE forward, a deeper
  one built later in the same process (two configs in one script, a benchmark, a test session)
  raises ``IndexError: index 2 is out of bounds for dimension 0 with size 2`` on CPU, or a
  device-side assert on the GPU. Fix: an entry sized for fewer layers (or on another device) is
  dropped and re-created at the new size before Megatron's own function records the loss.

CPU-only (applied only when ``torch.cuda.is_available()`` is False, so they can never change
what runs on a GPU machine):

* ``cuda_current_device``: six construction/forward sites pass ``torch.cuda.current_device()``
  as a device (DotProductAttention's ``softmax_offset``, the router's ``expert_bias`` buffers and
  its gating, RotaryEmbedding's ``inv_freq``, the global memory buffer). On a machine without
  CUDA that call raises; the fix returns ``"cpu"``.
* ``cpu_p2p_device``: the pipeline-parallel send/receive (``p2p_communication``) allocates its
  receive buffers on ``torch.cuda.current_device()`` and may call ``torch.cuda.synchronize()``;
  both raise without CUDA. Fix: that module sees a ``torch`` whose ``cuda.current_device()`` is
  ``"cpu"`` and whose ``cuda.synchronize()`` does nothing (``build_stock_gpt`` also turns batched
  p2p off without CUDA: gloo sends and receives one by one).
* ``cpu_mask_builders``: ``get_sliding_window_causal_mask`` and ``get_default_causal_mask``
  hardcode ``device="cuda"``; ``fused_softmax`` imports them by name, so both namespaces get
  copies with identical math that build the mask on the CPU.
* ``cpu_dist_checkpoint_save``: ``dist_checkpointing``'s ``torch_dist`` writer
  (``FileSystemWriterAsync.preload_tensors``) copies tensors to the host with
  ``non_blocking=True`` and then calls ``torch.cuda.synchronize()``, which raises without CUDA.
  The fix makes the copy blocking on a machine without CUDA (nothing to synchronise).
* ``cpu_schedule_token_count``: the pipeline schedules (``forward_backward_no_pipelining`` and
  the pipelined ones in ``megatron.core.pipeline_parallel.schedules``) start their token
  counter with ``torch.zeros([], dtype=torch.int, device="cuda")``. The fix gives that module a
  ``torch`` whose ``zeros`` builds ``device="cuda"`` tensors on the CPU (every other name is
  torch's own), so Megatron's schedule, and ``finalize_model_grads`` after it, run on CPU.
* The CUDA RNG tracker is not patched: :func:`megatron_base.parallel.init_process` seeds
  Megatron's *inference* RNG tracker on CPU (public API, a null ``fork()``).

* ``tp_group_warning`` (a graph break, docs/design.md#compilation):
  ``get_tensor_model_parallel_group_if_none`` calls ``warnings.warn`` on rank 0 on *every*
  forward of a Megatron linear layer (deprecated ``tp_group=None``). Dynamo cannot trace
  ``warnings.warn``, so every ``RowParallelLinear`` breaks the graph, and only on rank 0 (ranks
  would capture different graphs). The fix installs, in every ``megatron.*`` namespace that
  imported it by name, an equivalent that returns the same group without the warning.

Dynamo (used by :func:`dynamo_config`, applied around every compile/capture, any device): MoE
permutation has data-dependent shapes; two capture flags keep it in one graph.

* ``moe_aux_loss_scale`` (any device, read by :func:`moe_aux_loss_scale`): Megatron's
  ``MoEAuxLossAutoScaler`` keeps the main-loss gradient scale of the MoE auxiliary losses in a
  class attribute of an ``autograd.Function`` (``main_loss_backward_scale``, set by the schedule
  through ``set_loss_scale``, which copies into the tensor once it exists) and reads it inside
  ``backward``; TorchDynamo cannot trace either read. The grouped MoE layer passes the scale in
  as a tensor instead: eagerly the attribute is read (and created as ``1.0``, as Megatron does,
  when unset); under ``torch.compile`` the tensor last seen eagerly (or primed by
  :func:`prime_moe_aux_loss_scale`) is used -- the same tensor object, since Megatron updates it
  in place.

* ``cuda_rng_under_dynamo`` (GPU only, scoped to :func:`dynamo_config`): Megatron's
  ``CudaRNGStatesTracker.fork()`` (around DotProductAttention's dropout) calls
  ``_set_cuda_rng_state``, which runs its callback through ``torch.cuda._lazy_call`` while holding
  torch's non-reentrant ``_initialization_lock``. Under ``torch.compile`` dynamo converts the
  callback's frame, and its global-state guard calls ``torch.cuda.set_rng_state`` ->
  ``_lazy_call`` again: a deadlock (seen on the H100, torch 2.11, capturing stock attention for the
  debug dump). Fix: for the duration of the capture the setter runs with dynamo disabled (one
  graph break at the fork; the setter itself runs eagerly, as without compile).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np
import torch

_APPLIED: Dict[str, List[Tuple[object, str, object]]] = {}


def _has_transformer_engine() -> bool:
    try:
        importlib.import_module("transformer_engine")
        return True
    except Exception:  # ImportError, or a broken TE install raising at import
        return False


def _set(record: list, obj, name: str, value) -> None:
    record.append((obj, name, getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


# --------------------------------------------------------------------------------------------
# CPU copies of Megatron's mask builders (identical math to megatron.core.transformer.utils).
# --------------------------------------------------------------------------------------------


def cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """``[sq, sq]`` bool, True above the diagonal (masked), built on the CPU."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """``[sq, skv]`` bool, True where masked: key k is kept for query i iff
    ``i - left <= k - (skv - sq) <= i + right`` with ``window_size = (left, right)``."""
    m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _cpu_current_device():
    return "cpu"


# --------------------------------------------------------------------------------------------


def _fix_te_general_gemm(record: list) -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        _set(record, moe_utils, "te_general_gemm", None)


def _fix_cuda_current_device(record: list) -> None:
    _set(record, torch.cuda, "current_device", _cpu_current_device)


def tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
    """``get_tensor_model_parallel_group_if_none`` of megatron-core 0.16.1 without the per-call
    deprecation warning (same return value in every case)."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        return None
    if not parallel_state.is_initialized():
        return tp_group
    if tp_group is None:
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
    return tp_group


def _fix_tp_group_warning(record: list) -> None:
    import sys

    original = importlib.import_module("megatron.core.utils").get_tensor_model_parallel_group_if_none
    importlib.import_module("megatron.core.tensor_parallel.layers")
    importlib.import_module("megatron.core.tensor_parallel.mappings")
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(mod, "get_tensor_model_parallel_group_if_none", None) is original:
            _set(record, mod, "get_tensor_model_parallel_group_if_none", tp_group_if_none)


def _fix_mask_builders(record: list) -> None:
    for mod_name in ("megatron.core.fusions.fused_softmax", "megatron.core.transformer.utils"):
        mod = importlib.import_module(mod_name)
        _set(record, mod, "get_default_causal_mask", cpu_default_causal_mask)
        _set(record, mod, "get_sliding_window_causal_mask", cpu_sliding_window_causal_mask)


def _fix_cpu_dist_checkpoint_save(record: list) -> None:
    fs = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    writer = fs.FileSystemWriterAsync
    original = writer.__dict__["preload_tensors"].__func__

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)

    # record the staticmethod object itself (getattr would give the bare function)
    record.append((writer, "preload_tensors", writer.__dict__["preload_tensors"]))
    writer.preload_tensors = staticmethod(preload_tensors)


def tokenizer_class_from_metadata(metadata: dict):
    """The tokenizer class that ``class_name`` / ``class_path`` of Megatron tokenizer metadata
    name (see ``tokenizer_class_metadata`` in the module docstring), or ``None`` where 0.16.1's
    own rule applies (a ``tokenizer_class`` key, or no class named)."""
    from megatron.core.tokenizers import MegatronTokenizerBase

    if metadata.get("tokenizer_class") or not (metadata.get("class_name") and metadata.get("class_path")):
        return None
    name, path = metadata["class_name"], metadata["class_path"]
    try:
        cls = getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"tokenizer metadata names class_path {path!r}, class_name {name!r}, which cannot be "
            f"imported: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, MegatronTokenizerBase)):
        raise TypeError(f"tokenizer metadata names {path}.{name}, which is not a MegatronTokenizerBase")
    return cls


def _fix_tokenizer_class_metadata(record: list) -> None:
    import json
    import os

    mt = importlib.import_module("megatron.core.tokenizers.megatron_tokenizer")
    original = mt.MegatronTokenizer.__dict__["from_pretrained"]  # a plain function in 0.16.1

    def from_pretrained(tokenizer_path=None, metadata_path=None, **kwargs):
        # metadata as 0.16.1 reads it (megatron_tokenizer.MegatronTokenizer.from_pretrained)
        if not metadata_path and not tokenizer_path:
            return original(tokenizer_path, metadata_path, **kwargs)
        path = metadata_path or mt._get_metadata_path(tokenizer_path)
        if isinstance(path, dict):
            metadata, path = dict(path), None
        elif isinstance(path, str) and os.path.exists(path):
            with open(path, "r") as f:
                metadata = json.load(f)
        else:  # missing file or bad type: 0.16.1's own error
            return original(tokenizer_path, metadata_path, **kwargs)
        cls = tokenizer_class_from_metadata(metadata)
        if cls is None:
            return original(tokenizer_path, metadata_path, **kwargs)
        if metadata.get("library") not in ("byte-level", "null"):
            assert tokenizer_path, "Tokenizer path must be specified."  # as 0.16.1
        metadata["metadata_path"] = path
        return cls(path=tokenizer_path, config=metadata, **kwargs)

    from_pretrained.__doc__ = original.__doc__
    from_pretrained.__wrapped__ = original
    _set(record, mt.MegatronTokenizer, "from_pretrained", from_pretrained)


class _CpuScheduleTorch:
    """``torch`` for ``megatron.core.pipeline_parallel.schedules`` on a machine without CUDA:
    ``zeros(..., device="cuda")`` is built on the CPU; every other attribute is torch's."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


class _CpuCuda:
    """``torch.cuda`` for ``megatron.core.pipeline_parallel.p2p_communication`` on a machine
    without CUDA: receive buffers are allocated on ``current_device()`` -> ``"cpu"``, and
    ``synchronize()`` has nothing to wait for; every other attribute is ``torch.cuda``'s."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(device=None):
        return None


class _CpuP2PTorch:
    """``torch`` for the p2p module on a machine without CUDA (its ``cuda`` is :class:`_CpuCuda`)."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _fix_cpu_p2p_device(record: list) -> None:
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    _set(record, p2p, "torch", _CpuP2PTorch())


def _fix_moe_aux_loss_scale_shape(record: list) -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    cls = moe_utils.MoEAuxLossAutoScaler

    def set_loss_scale(scale: torch.Tensor) -> None:
        current = cls.main_loss_backward_scale
        if current is None:
            cls.main_loss_backward_scale = scale
        elif current.numel() == scale.numel():
            current.copy_(scale.reshape(current.shape))  # in place: captured graphs keep reading it
        else:
            current.copy_(scale)  # Megatron's own behaviour (and its error)

    record.append((cls, "set_loss_scale", cls.__dict__["set_loss_scale"]))
    cls.set_loss_scale = staticmethod(set_loss_scale)


def _fix_moe_logging_tracker_size(record: list) -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    router = importlib.import_module("megatron.core.transformer.moe.router")
    original = moe_utils.save_to_aux_losses_tracker

    def save_to_aux_losses_tracker(name, loss, layer_number, num_layers, *args, **kwargs):
        if layer_number is not None:
            entry = moe_utils.get_moe_layer_wise_logging_tracker().get(name)
            values = entry.get("values") if isinstance(entry, dict) else None
            if values is not None and (values.numel() < num_layers or values.device != loss.device):
                # sized by an earlier, shallower model (or on another device): start it afresh
                del moe_utils.get_moe_layer_wise_logging_tracker()[name]
        return original(name, loss, layer_number, num_layers, *args, **kwargs)

    _set(record, moe_utils, "save_to_aux_losses_tracker", save_to_aux_losses_tracker)
    _set(record, router, "save_to_aux_losses_tracker", save_to_aux_losses_tracker)


def _fix_cpu_schedule_token_count(record: list) -> None:
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    _set(record, schedules, "torch", _CpuScheduleTorch())


_FIXES: Dict[str, Tuple[Callable[[list], None], str]] = {
    "te_general_gemm": (_fix_te_general_gemm, "any"),
    "tp_group_warning": (_fix_tp_group_warning, "any"),
    "tokenizer_class_metadata": (_fix_tokenizer_class_metadata, "any"),
    "cuda_current_device": (_fix_cuda_current_device, "cpu"),
    "cpu_mask_builders": (_fix_mask_builders, "cpu"),
    "cpu_dist_checkpoint_save": (_fix_cpu_dist_checkpoint_save, "cpu"),
    "cpu_schedule_token_count": (_fix_cpu_schedule_token_count, "cpu"),
    "cpu_p2p_device": (_fix_cpu_p2p_device, "cpu"),
    "moe_aux_loss_scale_shape": (_fix_moe_aux_loss_scale_shape, "any"),
    "moe_logging_tracker_size": (_fix_moe_logging_tracker_size, "any"),
}


def apply(force_cpu: bool | None = None, only: Iterable[str] | None = None) -> List[str]:
    """Apply every fix this machine needs; idempotent. Returns the names applied now.

    Args:
        force_cpu: apply the CPU-only fixes (default: only when CUDA is unavailable). Tests
            may pass False to check that nothing CPU-only is installed.
        only: apply just these fixes (by name; those of another scope are still skipped),
            e.g. ``only=["tokenizer_class_metadata"]`` to load a tokenizer through Megatron's
            factory without touching anything else.
    """
    on_cpu = (not torch.cuda.is_available()) if force_cpu is None else force_cpu
    wanted = _check_names(only)
    done = []
    for name, (fix, scope) in _FIXES.items():
        if name in _APPLIED or (wanted is not None and name not in wanted):
            continue
        if scope == "cpu" and not on_cpu:
            continue
        if name == "te_general_gemm" and _has_transformer_engine():
            continue
        record: list = []
        fix(record)
        _APPLIED[name] = record
        done.append(name)
    return done


def _check_names(names: Iterable[str] | None):
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in _FIXES]
    if unknown:
        raise ValueError(f"unknown compat fix(es) {unknown}; known: {list(_FIXES)}")
    return set(names)


def remove(only: Iterable[str] | None = None) -> None:
    """Undo every applied fix, or just those named in ``only`` (restores the original
    attributes)."""
    wanted = _check_names(only)
    for name in list(_APPLIED)[::-1]:
        if wanted is not None and name not in wanted:
            continue
        for obj, attr, old in reversed(_APPLIED.pop(name)):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def applied() -> List[str]:
    """Names of the fixes currently installed (recorded in the debug dump)."""
    return list(_APPLIED)


@contextlib.contextmanager
def dynamo_config():
    """Dynamo flags that let stock Megatron models capture as one graph
    (docs/design.md#compilation).

    The two capture flags let MoE permutation's data-dependent shapes stay in the graph (the
    rank-0 ``warnings.warn`` of Megatron's linears is removed by the ``tp_group_warning`` fix, so
    ``ignore_logging_functions`` is not needed). Apply around every compiled call: a recompile
    re-traces.
    """
    import torch._dynamo

    apply()
    cfg = torch._dynamo.config.get_config_copy()
    patch = {}
    patch["capture_dynamic_output_shape_ops"] = True
    patch["capture_scalar_outputs"] = True
    if "cache_size_limit" in cfg:
        patch["cache_size_limit"] = max(cfg["cache_size_limit"], 64)
    with torch._dynamo.config.patch(**patch), _dynamo_safe_cuda_rng():
        yield


@contextlib.contextmanager
def _dynamo_safe_cuda_rng():
    """``cuda_rng_under_dynamo`` (see the module docstring); a no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom
    from torch import _dynamo

    orig = mrandom._set_cuda_rng_state
    if getattr(orig, "_vpmoe_dynamo_disabled", False):  # nested dynamo_config()
        yield
        return
    safe = _dynamo.disable(orig)
    safe._vpmoe_dynamo_disabled = True
    mrandom._set_cuda_rng_state = safe
    try:
        yield
    finally:
        mrandom._set_cuda_rng_state = orig


# --------------------------------------------------------------------------------------------
# MoE auxiliary-loss scale (see the module docstring, ``moe_aux_loss_scale``)
# --------------------------------------------------------------------------------------------

_AUX_SCALE: List[object] = [None]


def moe_aux_loss_scale(device) -> torch.Tensor:
    """Megatron's ``MoEAuxLossAutoScaler.main_loss_backward_scale`` as a tensor a compiled
    region can take as input (see the module docstring)."""
    if torch.compiler.is_compiling():
        scale = _AUX_SCALE[0]
        if scale is None:
            raise RuntimeError(
                "the MoE aux-loss scale was never initialised before torch.compile traced a MoE "
                "layer; compile through vpmoe_compile.compile(model), or run one eager forward first"
            )
        return scale
    return prime_moe_aux_loss_scale(device)


def prime_moe_aux_loss_scale(device) -> torch.Tensor:
    """Read (creating it as ``1.0`` on ``device`` when unset, as Megatron's backward does) and
    remember Megatron's aux-loss scale tensor; returns it."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is None:
        # shape [1], as Megatron's schedules set it (set_loss_scale copies into this tensor)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device))
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    _AUX_SCALE[0] = scale
    return scale


# --------------------------------------------------------------------------------------------
# Accessors: private Megatron / torch internals the library uses, one named function each.
# Nothing here patches anything; each says what it reaches and what relies on it.
# --------------------------------------------------------------------------------------------


def common_per_param_step(optimizer_state_dict: dict):
    """Megatron's ``MegatronOptimizer._extract_common_per_param_step`` (private, 0.16.1): the
    common value of the per-parameter ``step`` entries of a torch optimizer ``state_dict``
    (``None`` when there is none; ``ValueError`` when they differ), which Megatron's ``torch_dist``
    optimizer state stores once as ``common_step``. Used by the NorMuon wrappers'
    ``sharded_state_dict`` (:mod:`vpmoe_compile.optim.megatron_wrappers`)."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return MegatronOptimizer._extract_common_per_param_step(optimizer_state_dict)


def float16_model_and_main_params_data(optimizer) -> Tuple[list, list]:
    """``(model_data, main_data)`` of a ``Float16OptimizerWithFloat16Params``: the ``.data`` of
    its bf16 model parameters and of their fp32 main copies, slot-aligned
    (``_get_model_and_main_params_data_float16``, private, 0.16.1). The NorMuon wrapper copies
    main -> model with one ``torch._foreach_copy_`` over them instead of Megatron's loop."""
    return optimizer._get_model_and_main_params_data_float16()


def update_router_expert_bias(model_chunks, config) -> None:
    """The aux-loss-free expert-bias update of ``finalize_model_grads``
    (``megatron.core.distributed.finalize_model_grads._update_router_expert_bias``, private,
    0.16.1): every router's ``expert_bias`` moves by ``moe_router_bias_update_rate`` times the
    sign of (mean count - its ``local_tokens_per_expert`` count), the counts all-reduced over the
    tensor x context x data-parallel group. It does not reset the counts. Used by
    :func:`vpmoe_compile.training.update_router_expert_bias` for training loops that do not call
    ``finalize_model_grads``."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    _update_router_expert_bias(model_chunks, config)


def router_fp32_expert_bias(router) -> None:
    """``TopKRouter._maintain_float32_expert_bias`` (private, 0.16.1): turns the router's
    ``expert_bias`` back to fp32 (keeping its values) after ``Float16Module`` cast the buffers to
    bf16. The sparse router calls it before routing and when priming for ``torch.compile``."""
    router._maintain_float32_expert_bias()


def router_apply_aux_losses(router, probs, scores, routing_map, seq_length: int, bsz: int):
    """``TopKRouter``'s ``_apply_aux_loss``, ``_apply_seq_aux_loss`` and ``_apply_global_aux_loss``
    (private, 0.16.1), in Megatron's order: each, when its coefficient is set, computes its
    load-balancing loss from the dense ``scores`` / ``routing_map`` of
    ``compute_routing_scores_for_aux_loss``, logs it and attaches it to ``probs`` (through the
    router's ``attach_and_log_load_balancing_loss``, which the sparse router overrides with a
    traceable one). Returns ``probs``; the sparse router reuses them so that the losses are
    Megatron's own."""
    probs = router._apply_aux_loss(probs, scores, routing_map)
    probs = router._apply_seq_aux_loss(probs, scores, routing_map, seq_length, bsz)
    return router._apply_global_aux_loss(probs, scores, routing_map)


def gpt_dataset_sample_from(dataset, indexed_dataset, idx: int):
    """What Megatron's ``GPTDataset`` sample ``idx`` reads from ``indexed_dataset`` instead of its
    own token dataset: ``GPTDataset._query_document_sample_shuffle_indices`` (private, 0.16.1)
    with ``dataset.dataset`` swapped for the call (and restored), so the document / sample /
    shuffle indices -- cross-document packing and padding included -- are exactly the ones of the
    tokens. ``indexed_dataset`` must have the tokens' sequence and document layout. Returns
    Megatron's ``(array, document ids)``. Used for the loss-mask dataset
    (:class:`megatron_base.dataset.LossMaskedGPTDataset`)."""
    tokens_dataset = dataset.dataset
    dataset.dataset = indexed_dataset
    try:
        return dataset._query_document_sample_shuffle_indices(idx)
    finally:
        dataset.dataset = tokens_dataset


def indexed_builder_append_documents(builder, array, lengths) -> memoryview:
    """Append ``len(lengths)`` one-sequence documents, laid end to end in ``array``, to Megatron's
    ``IndexedDatasetBuilder``: what one ``add_document(array[o:o + n], [n])`` per document records
    (the bytes, ``sequence_lengths`` and ``document_indices``; 0.16.1's attributes), with one
    ``write`` of the array's own memory instead of two copies per document. ``array`` must
    already have the builder's dtype. Returns the bytes written (a view, for hashing)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.dtype(builder.dtype):
        raise TypeError(f"array dtype {array.dtype} is not the builder's {np.dtype(builder.dtype)}")
    view = memoryview(array).cast("B")
    builder.data_file.write(view)
    first = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths)
    builder.document_indices.extend(range(first + 1, len(builder.sequence_lengths) + 1))
    return view


def module_call_impl(module: torch.nn.Module) -> Callable:
    """The module's ``_call_impl`` (torch internal): its forward wrapped with the forward hooks
    and pre-hooks -- what ``nn.Module.compile`` compiles. :func:`set_module_compiled_call`
    installs the compiled replacement."""
    return module._call_impl


def set_module_compiled_call(module: torch.nn.Module, call: Callable) -> None:
    """Make ``module(...)`` run ``call`` in place of :func:`module_call_impl`, as
    ``nn.Module.compile`` does (it sets the internal ``_compiled_call_impl``, which
    ``nn.Module.__call__`` prefers): the module tree, parameter names, hooks and state-dict keys
    stay as they are. Used by :func:`vpmoe_compile.compile` with its own wrapper around the
    compiled region (``dynamo_config``)."""
    module._compiled_call_impl = call
