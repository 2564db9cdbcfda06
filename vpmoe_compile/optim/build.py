"""``build_optimizer``: NorMuon + auxiliary AdamW for a (transformed) Megatron-Core GPT model.

The counterpart of Megatron-Core 0.16.1's ``get_megatron_muon_optimizer``
(``megatron/core/optimizer/muon.py``): settings from the ``[optimizer]`` section, overridden by a
Megatron ``OptimizerConfig``'s set fields (:mod:`.optimizer_config`; a field that does not apply
raises naming it), and on every path an object with ``MegatronOptimizer``'s interface.

Two paths, chosen here from the model, never silently mixed (imports run one way:
``build`` -> ``optimizer_config`` / ``plain`` / ``megatron_wrappers`` -> ``param_groups`` /
``grad_norm`` / ``sharded_state`` -> ``routing``; ``megatron_wrappers``, the only module that
imports Megatron's optimizer when imported, is loaded on the Megatron path only):

* **Megatron path** (:mod:`.megatron_wrappers`) -- every model chunk is wrapped in Megatron's
  ``DistributedDataParallel`` (it has a ``ddp_config``); needs CUDA. Returns
  :class:`~.megatron_wrappers.NorMuonChainedOptimizer`, a
  ``megatron.core.optimizer.ChainedOptimizer`` of, in this fixed order:
  ``[NorMuon dense, NorMuon expert-parallel (if any), *Megatron's own Adam optimizers]``.
  NorMuon parts are wrapped in ``Float16OptimizerWithFloat16Params`` (bf16 model, fp32 main
  params) or ``FP32Optimizer`` subclasses that also save the ``[m, 1]`` second moment (``[E, m, 1]``
  of a 3-D expert stack) in ``torch_dist`` checkpoints; the AdamW part is whatever ``get_megatron_optimizer`` builds for the
  non-NorMuon parameters (TE FusedAdam, apex FusedAdam or torch AdamW), with vpMoE overrides
  (wd 0 for biases / norms / sinks / 0-d / GRAPE ``log_freq``, aux lr, decoupled lr).
  ``step()`` = Megatron's: prepare grads, global grad norm, clip by total norm, step all; plus the
  NaN policy: a non-finite global grad norm skips the step (``(False, norm, None)``) with every
  parameter and state untouched (``nan_policy="skip"``) or raises naming the parameters.
  Refused with a clear error: distributed optimizer, Megatron FSDP, CPU offload, precision-aware
  optimizer, fp16, tensor / expert-tensor parallel > 1 on NorMuon parameters.
  Expert stacks (3-D ``[E, m, n]`` grouped-expert weights) need nothing special: the wrapper's
  fp32 main param of a bf16 stack is a contiguous ``[E, m, n]`` tensor that NorMuon updates in
  place as a bank, reading its ``.grad`` (the fp32 ``main_grad`` view of DDP's buffer, or
  Megatron's per-step fp32 copy of a bf16 one) in place when the step is eager.
* **Plain path** (:mod:`.plain`) -- anything else (a bare ``nn.Module``, CPU tests, the CPU
  demo). Returns :class:`~.plain.NorMuonWithAuxAdamW`: the same :class:`~.normuon.NorMuon` plus ``torch.optim.AdamW`` with the
  same routing, groups (incl. Megatron scheduler keys ``max_lr / min_lr / wd_mult``), global
  grad-norm clipping and NaN policy, the same ``step() -> (ok, grad_norm, num_zeros)`` contract
  and the rest of ``MegatronOptimizer``'s interface (``sharded_state_dict`` for
  ``dist_checkpointing`` included, on CPU too). ``bf16`` mixed precision (fp32 main params) is
  the Megatron path's: an ``OptimizerConfig`` with ``bf16=True`` is refused here.
  ``torch.compile`` of the NorMuon bank step (and ``cuda_graph``) is used on this path only when
  the parameters are on CUDA (Inductor on a CPU takes minutes).

* **Layer-wise distributed optimizer** (``layer_wise_distributed_optimizer=True``, :mod:`.layer_wise`,
  Megatron-Core's ``LayerWiseDistributedOptimizer`` scheme): on the plain path over a
  Megatron-DDP-wrapped model, each data-parallel rank builds the same groups with only the whole
  parameters it owns, steps them and broadcasts them; the grad norm covers every parameter.

On both paths the global grad norm accumulates in fp64 (a finite gradient of 1e20 no longer
overflows fp32 squares into an inf norm, i.e. a skipped step), ``nan_policy="raise"`` names the
parameters with non-finite gradients by their model names, and ``load_state_dict`` validates the
whole checkpoint (groups, parameters, every state shape, NorMuon blocks / layouts) before any
part loads, naming the first mismatching parameter and both shapes (:mod:`.state_check`).
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch

from .optimizer_config import UnsupportedOptimizerSetup, is_megatron_optimizer_config, resolve_settings
from .plain import build_plain_optimizer
from .routing import ParamRoute, classify_parameters, routing_table

__all__ = [
    "build_optimizer",
    "UnsupportedOptimizerSetup",
]


def _chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _transform_config(chunks) -> Any:
    """The ``VpMoEConfig`` the model was transformed with (or built from), looking through
    Megatron's ``DistributedDataParallel`` / ``Float16Module`` wrappers; ``None`` if there is none."""
    for chunk in chunks:
        module, depth = chunk, 0
        while module is not None and depth < 8:
            cfg = getattr(module, "vpmoe_config", None)
            if cfg is not None:
                return cfg
            module, depth = getattr(module, "module", None), depth + 1
    return None


def _check_parallel(routes: Sequence[ParamRoute], megatron_path: bool) -> None:
    """NorMuon orthogonalises whole matrices: expert-tensor-parallel shards are refused; tensor-
    parallel shards are assembled whole on the plain path (:mod:`.tensor_parallel`) and refused on
    the Megatron (bf16) path, whose wrappers' main parameters are not reassembled yet
    (docs/design.md#tensor-parallelism)."""
    try:
        from megatron.core import parallel_state as ps

        initialized = ps.model_parallel_is_initialized()
    except Exception:  # pragma: no cover - megatron import problems
        initialized = False
    nm = [r for r in routes if r.optimizer == "normuon"]
    if initialized and nm:
        tp = ps.get_tensor_model_parallel_world_size()
        if megatron_path and tp > 1 and any(not r.is_expert_parallel for r in nm):
            raise UnsupportedOptimizerSetup(
                f"NorMuon with tensor-model-parallel size {tp} runs on the fp32 path only in this "
                "release (each TP-split matrix is gathered whole, orthogonalised and re-split); "
                "Megatron's bf16 wrappers on CUDA are not supported with TP > 1 yet: use TP = 1 "
                "on GPUs (scale experts with expert parallelism, depth with pipeline parallelism)"
            )
        etp = ps.get_expert_tensor_parallel_world_size()
        if etp > 1 and any(r.is_expert_parallel for r in nm):
            raise UnsupportedOptimizerSetup(
                f"NorMuon needs expert-tensor-parallel size 1 (got {etp}): an expert-TP shard of a "
                "matrix cannot be orthogonalised alone"
            )


def _check_ddp(chunks) -> None:
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and getattr(ddp, "use_distributed_optimizer", False):
            raise UnsupportedOptimizerSetup(
                "NorMuon does not support Megatron's distributed optimizer "
                "(DistributedDataParallelConfig.use_distributed_optimizer=True: it gives each rank "
                "a slice of the flattened parameters, not whole matrices). Wrap the model with "
                "use_distributed_optimizer=False and build the optimizer with "
                "build_optimizer(model, layer_wise_distributed_optimizer=True), which shards whole "
                "parameters over the data-parallel ranks as Megatron's own Muon does"
            )
        if ddp is not None and getattr(ddp, "use_megatron_fsdp", False):
            raise UnsupportedOptimizerSetup("NorMuon does not support Megatron FSDP")


def build_optimizer(
    model,
    cfg: Any = None,
    *,
    optimizer_config: Any = None,
    pg_collection: Any = None,
    use_gloo_process_groups: bool = True,
    layer_wise_distributed_optimizer: bool = False,
):
    """Build NorMuon (matrices) + AdamW (everything else) for ``model``.

    The counterpart of Megatron-Core's ``get_megatron_muon_optimizer(config, model_chunks, ...)``
    (``megatron/core/optimizer/muon.py``), see the README's "Optimizer" section for how they
    differ.

    Args:
        model: the model, or a list of model chunks; Megatron-DDP-wrapped chunks select the
            Megatron path (see module docstring), anything else the plain path.
        cfg: a ``VpMoEConfig`` (its ``optimizer`` section is used), the section itself, any
            object with those attributes, or ``None``: the config the model was transformed with
            (``model.vpmoe_config``, also through Megatron's wrappers), else the defaults. A
            Megatron ``OptimizerConfig`` passed here is taken as ``optimizer_config``.
        optimizer_config: a ``megatron.core.optimizer.OptimizerConfig`` (or an object with some
            of its fields), both paths: its set fields (those that differ from
            ``OptimizerConfig``'s defaults) override the ``[optimizer]`` settings of ``cfg``
            (lr, min_lr, decoupled lrs, weight_decay, Adam betas / eps, clip_grad, Muon momentum /
            steps / QKV split), ``bf16`` / ``params_dtype`` choose Megatron's wrappers (Megatron
            path only), ``log_num_zeros_in_grad`` / ``timers`` are honoured by ``step()``; any other
            set field raises :class:`UnsupportedOptimizerSetup` naming it
            (:mod:`.optimizer_config`). It is not modified.
        pg_collection, use_gloo_process_groups: forwarded to ``get_megatron_optimizer``.
        layer_wise_distributed_optimizer: shard the optimizer over the data-parallel ranks by
            whole parameters (:mod:`.layer_wise`; the argument of Megatron's
            ``get_megatron_muon_optimizer``): each rank keeps state for the parameters it owns
            (about ``1 / D`` of it), steps them and broadcasts them. Needs a Megatron-DDP-wrapped
            model (the gradients all-reduced) and, in this release, the fp32 path (no CUDA
            ``bf16`` wrappers: refused on the Megatron path). A no-op at data-parallel size 1.

    Returns:
        ``NorMuonChainedOptimizer`` (Megatron path) or ``NorMuonWithAuxAdamW`` (plain path), both
        with ``MegatronOptimizer``'s interface (``step() -> (ok, grad_norm, num_zeros)``,
        ``zero_grad``, ``state_dict`` / ``load_state_dict``, ``sharded_state_dict``,
        ``get_loss_scale``, ``reload_model_params``, ``param_groups`` for
        ``OptimizerParamScheduler``...), and ``.path`` ("megatron" / "plain"), ``.settings`` (the
        resolved ``[optimizer]`` settings), ``.routes`` and ``.routing_table()``.
    """
    chunks = _chunks(model)
    if is_megatron_optimizer_config(cfg):
        if optimizer_config is not None:
            raise ValueError(
                "build_optimizer got two OptimizerConfigs (cfg and optimizer_config); pass one"
            )
        cfg, optimizer_config = None, cfg
    if cfg is None:
        cfg = _transform_config(chunks)
    _check_ddp(chunks)
    megatron_ddp = all(hasattr(c, "ddp_config") for c in chunks)
    # Megatron's optimizer wrappers allocate on CUDA; without it a DDP-wrapped (fp32) model takes
    # the plain path reading DDP's main_grad buffers, as Megatron's FP32Optimizer does
    megatron_path = megatron_ddp and torch.cuda.is_available()
    resolved = resolve_settings(cfg, optimizer_config, "megatron" if megatron_path else "plain")
    st = resolved.settings
    if st.name != "normuon":
        raise ValueError(f"build_optimizer builds NorMuon; optimizer.name is {st.name!r}")
    routes = classify_parameters(chunks if len(chunks) > 1 else chunks[0], st)
    _check_parallel(routes, megatron_path)
    sharding = None
    if layer_wise_distributed_optimizer:
        if megatron_path:
            raise UnsupportedOptimizerSetup(
                "layer_wise_distributed_optimizer=True runs on the fp32 path only in this release "
                "(Megatron DDP-wrapped fp32 parameters, without CUDA); Megatron's bf16 wrappers "
                "(Float16OptimizerWithFloat16Params) on CUDA are not sharded yet: build without it "
                "(replicated optimizer) on GPUs"
            )
        if not megatron_ddp:
            raise UnsupportedOptimizerSetup(
                "layer_wise_distributed_optimizer=True needs every model chunk wrapped in Megatron's "
                "DistributedDataParallel (its all-reduced gradients are what each rank steps on); "
                "wrap the model first (vpmoe_compile.training.wrap_megatron)"
            )
        from vpmoe_compile.tensor_parallel import tp_world

        if tp_world()[0] > 1:
            raise UnsupportedOptimizerSetup(
                "layer_wise_distributed_optimizer=True with tensor parallelism > 1 is not supported yet "
                "(the deal would have to own the whole-matrix copies NorMuon keeps under TP); use one of them"
            )
        from .layer_wise import build_sharding

        sharding = build_sharding(routes)
    if megatron_path:
        from .megatron_wrappers import build_megatron_optimizer  # imports Megatron's optimizer

        opt = build_megatron_optimizer(
            chunks, routes, st, optimizer_config, pg_collection, use_gloo_process_groups
        )
    else:
        opt = build_plain_optimizer(routes, st, resolved.runtime, use_main_grad=megatron_ddp, sharding=sharding)
    opt.settings = st
    opt.routes = routes
    opt.routing_table = lambda: routing_table(model, st)
    return opt
