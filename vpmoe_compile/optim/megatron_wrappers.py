"""The Megatron path of :func:`~.build.build_optimizer`: NorMuon inside Megatron-Core 0.16.1's
optimizer wrappers (docs/design.md#the-megatron-path).

* :class:`NorMuonFloat16Optimizer` / :class:`NorMuonFP32Optimizer` -- Megatron's bf16 / fp32
  wrappers with a slot-ordered ``torch_dist`` state mapping that also saves NorMuon's second
  moment;
* :class:`NorMuonChainedOptimizer` -- Megatron's ``ChainedOptimizer`` with the NaN policy and an
  fp64 global grad norm;
* :func:`build_megatron_optimizer` -- the chain ``[NorMuon dense, NorMuon expert-parallel,
  *Megatron's own Adam parts]``, built like Megatron's ``get_megatron_muon_optimizer``
  (``megatron/core/optimizer/muon.py``; README "Optimizer" says how they differ).

The only module of :mod:`vpmoe_compile.optim` that imports Megatron's optimizer when it is
imported; ``build`` imports it only on the Megatron path (DDP-wrapped chunks, CUDA). The
``torch_dist`` state mapping is :mod:`.sharded_state` (shared with the plain path). The Megatron
internals it needs are reached through :mod:`megatron_base.compat`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_base import compat

from .grad_norm import global_grad_norm, nonfinite_param_names
from .normuon import NorMuon
from .optimizer_config import megatron_optimizer_config
from .param_groups import aux_override, normuon_group, normuon_kwargs
from .routing import ParamRoute
from .sharded_state import optimizer_state_to_sharded
from .state_check import chain_inner_optimizers, check_megatron_chain_state, rollback_on_error

logger = logging.getLogger(__name__)

__all__ = [
    "NorMuonChainedOptimizer",
    "NorMuonFloat16Optimizer",
    "NorMuonFP32Optimizer",
    "build_megatron_optimizer",
    "megatron_param_names",
    "normuon_init_state",
]

def normuon_init_state(opt: NorMuon, config: Any = None) -> None:
    """Megatron ``init_state_fn``: allocate (zero) NorMuon state for every parameter."""
    opt.init_state()


def megatron_param_names(chained_optimizers: Sequence[Any], names: Dict[int, str]) -> Dict[int, str]:
    """``names`` (``{id(model param): name}``) extended to every parameter the wrappers of a
    Megatron chain optimise: the fp32 main copy of a bf16 parameter (``fp32_from_float16_groups``
    slot-aligned with ``float16_groups``, and Megatron's ``param.main_param`` handle) gets its
    model parameter's name. Pure Python (duck-typed on the wrappers)."""
    out = dict(names)
    for opt in chained_optimizers:
        models = getattr(opt, "float16_groups", None) or []
        mains = getattr(opt, "fp32_from_float16_groups", None) or []
        for model_group, main_group in zip(models, mains):
            for model_p, main_p in zip(model_group, main_group):
                name = out.get(id(model_p))
                if name is not None:
                    out.setdefault(id(main_p), name)
                main = getattr(model_p, "main_param", None)
                if name is not None and main is not None:
                    out.setdefault(id(main), name)
    return out


class NorMuonFloat16Optimizer(Float16OptimizerWithFloat16Params):
    """``Float16OptimizerWithFloat16Params`` with slot-ordered ``torch_dist`` state mapping.

    Used for the NorMuon parts and (by class swap) for Megatron's Adam parts:

    * the optimizer-state-id -> model ShardedTensor map follows the optimizer's own slots, so it
      is right also when a group mixes bf16 params and fp32 params (GRAPE ``log_freq``, an fp32
      router): Megatron 0.16.1 enumerates only the bf16 params and shifts every later id;
    * NorMuon's ``[m, 1]`` second moment (``[E, m, 1]`` of an expert stack) is saved with the
      input axis collapsed;
    * main -> model param copy with one ``torch._foreach_copy_`` instead of a per-tensor loop.
    """

    def _model_params_in_slot_order(self) -> List[torch.Tensor]:
        main_to_model = {}
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_p, main_p in zip(model_group, main_group):
                main_to_model[id(main_p)] = model_p
        return [
            main_to_model.get(id(p), p) for g in self.optimizer.param_groups for p in g["params"]
        ]

    def zero_grad(self, set_to_none: bool = True):
        """Megatron's ``zero_grad``; with ``set_to_none`` also lets an inner :class:`NorMuon` forget
        the last step's gradients when they are per-step copies (``main_param.grad =
        main_grad.float()`` with bf16 ``main_grad``, Megatron's default), so the memory Megatron
        frees here is really freed. When they are the model's fp32 ``main_grad`` buffers
        themselves, the list is kept (NorMuon's identity fast path; no memory is held)."""
        super().zero_grad(set_to_none)
        kept = getattr(self.optimizer, "_dense_grads", None)
        if set_to_none and kept:
            buffers = {
                id(getattr(p, "main_grad", None))
                for groups in (self.float16_groups, self.fp32_from_fp32_groups)
                for group in groups
                for p in group
            }
            if not all(id(g) in buffers for g in kept):
                self.optimizer._dense_grads = None

    # Overrides a private hook of Megatron's Float16OptimizerWithFloat16Params (its step calls it
    # after the update): an override has to be a method of this class, so it cannot live in
    # megatron_base.compat; the Megatron internals it reads are behind compat's function.
    def _copy_main_params_to_model_params(self):
        model_data, main_data = compat.float16_model_and_main_params_data(self)
        if model_data:
            torch._foreach_copy_(model_data, main_data)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        id_map = get_param_id_to_sharded_param_map(
            model_sharded_state_dict, self._model_params_in_slot_order()
        )
        groups = state_dict["optimizer"]["param_groups"]
        main_ids = {id(p) for g in self.fp32_from_float16_groups for p in g}
        fp32_sharded = []
        for g_idx, (fp32_group, state_group) in enumerate(
            zip(state_dict["fp32_from_fp16_params"], groups)
        ):
            slots = [
                pid
                for pid, p in zip(state_group["params"], self.optimizer.param_groups[g_idx]["params"])
                if id(p) in main_ids
            ]
            fp32_sharded.append(
                [
                    make_sharded_optimizer_tensor(
                        id_map[pid], fp32_param, prefix="optimizer.state.fp32_param"
                    )
                    for pid, fp32_param in zip(slots, fp32_group)
                ]
            )
        state_dict["fp32_from_fp16_params"] = fp32_sharded
        optimizer_state_to_sharded(state_dict["optimizer"], id_map)
        return state_dict


class NorMuonFP32Optimizer(FP32Optimizer):
    """``FP32Optimizer`` that also saves NorMuon's ``[m, 1]`` / ``[E, m, 1]`` second moment in
    ``torch_dist``."""

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.get_parameters())
        optimizer_state_to_sharded(state_dict, id_map)
        return state_dict


class NorMuonChainedOptimizer(ChainedOptimizer):
    """Megatron ``ChainedOptimizer`` with the NaN policy (docs/design.md#the-megatron-path).

    After the global grad norm (already a host sync), a non-finite norm returns
    ``(False, grad_norm, None)`` before clipping or any update (``nan_policy="skip"``), or raises
    naming the parameters with non-finite gradients by their model names (``"raise"``; the fp32
    main copies of bf16 parameters included, :func:`megatron_param_names`).
    The grad norm accumulates in fp64 (:func:`~.grad_norm.global_grad_norm`; Megatron's fp32
    ``norm ** 2`` overflows for a finite gradient of 1e20). ``load_state_dict`` checks every
    part of the checkpoint before Megatron loads any (:mod:`.state_check`).
    """

    path = "megatron"

    def __init__(self, chained_optimizers, nan_policy: str = "skip", names=None):
        super().__init__(chained_optimizers)
        self.nan_policy = nan_policy
        self._names = megatron_param_names(chained_optimizers, names or {})

    def _param_names(self) -> Dict[int, str]:
        return megatron_param_names(self.chained_optimizers, self._names)

    def _nonfinite_names(self) -> List[str]:
        params = [p for opt in self.chained_optimizers for p in opt.get_parameters()]
        return nonfinite_param_names(params, self._param_names())

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        """Megatron's ``ChainedOptimizer.get_grad_norm`` (same gradients: each wrapper's
        ``get_main_grads_for_grad_norm``, same reduction groups), accumulated in fp64."""
        opts = self.chained_optimizers
        if not opts:
            return 0.0
        if len(opts) == 1 or self.grads_states_parallel_group_is_shared():
            grads = [g for o in opts for g in o.get_main_grads_for_grad_norm()]
            return global_grad_norm(grads, opts[0].get_grad_stats_parallel_group())
        return math.sqrt(
            sum(
                global_grad_norm(o.get_main_grads_for_grad_norm(), o.get_grad_stats_parallel_group()) ** 2
                for o in opts
            )
        )

    def get_parameters(self) -> List[torch.Tensor]:
        """Every part's parameters, in chain order (``ChainedOptimizer`` inherits the one-optimizer
        version, which asserts a chain of one): the fp32 main copies of bf16 parameters."""
        return [p for o in self.chained_optimizers for p in o.get_parameters()]

    def get_main_grads_for_grad_norm(self) -> List[torch.Tensor]:
        """Every part's gradients that enter the grad norm, in chain order."""
        return [g for o in self.chained_optimizers for g in o.get_main_grads_for_grad_norm()]

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        """The global grad norm (fp64, :meth:`get_grad_norm`), every part's gradients clipped by
        it to ``clip_grad``; returns the norm."""
        grad_norm = self.get_grad_norm()
        self._clip_by_total_norm(grad_norm, clip_grad)
        return grad_norm

    def _clip_by_total_norm(self, grad_norm: float, clip_grad: Optional[float] = None) -> None:
        """Megatron's ``clip_grad_by_total_norm_fp32`` on each part with the global norm, to
        ``clip_grad`` (default: each part's ``config.clip_grad``)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for optimizer in self.chained_optimizers:
            if getattr(optimizer, "is_stub_optimizer", False):
                continue
            parameters = optimizer.get_parameters()
            if len(parameters) == 0:
                continue
            max_norm = optimizer.config.clip_grad if clip_grad is None else clip_grad
            if max_norm > 0.0:
                clip_grad_by_total_norm_fp32(
                    parameters,
                    max_norm=max_norm,
                    total_norm=grad_norm,
                    use_decoupled_grad=(
                        optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                    ),
                )

    def load_state_dict(self, state_dict):
        """Megatron's chained load, after :func:`~.state_check.check_megatron_chain_state` has
        checked every part (groups, parameters, NorMuon / Adam state shapes, fp32 main params):
        a checkpoint of another model raises naming the first mismatching parameter with every
        part unchanged, instead of failing half-way through the chain. An unexpected error
        half-way rolls the inner optimizers back (the fp32 main parameters, which Megatron
        overwrites in place, are validated beforehand but not snapshotted)."""
        check_megatron_chain_state(self.chained_optimizers, state_dict, self._param_names())
        with rollback_on_error(*chain_inner_optimizers(self.chained_optimizers)):
            super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self):
        found_inf_flag = self.prepare_grads()
        if found_inf_flag:
            return False, None, None
        grad_norm = self.get_grad_norm()
        if grad_norm is not None and not math.isfinite(grad_norm):
            if self.nan_policy == "raise":
                raise FloatingPointError(
                    f"non-finite gradient norm {grad_norm}; parameters: {self._nonfinite_names()}"
                )
            return False, grad_norm, None
        self._clip_by_total_norm(grad_norm)
        num_zeros_in_grad = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        update_successful = self.step_with_ready_grads()
        return update_successful, grad_norm, num_zeros_in_grad


def build_megatron_optimizer(
    chunks: List[torch.nn.Module],
    routes: Sequence[ParamRoute],
    st,
    optimizer_config: Optional[OptimizerConfig],
    pg_collection,
    use_gloo_process_groups: bool,
) -> NorMuonChainedOptimizer:
    """Steps 2-6 of the Megatron path (docs/design.md#the-megatron-path): NorMuon wrappers, the
    Adam parts from ``get_megatron_optimizer``, the chain; the checks of step 1 ran in
    ``build_optimizer``. ``st`` are the resolved settings (``[optimizer]`` with the
    ``OptimizerConfig``'s set fields applied); Megatron gets a copy of ``optimizer_config``
    carrying them (:func:`~.optimizer_config.megatron_optimizer_config`)."""
    config = megatron_optimizer_config(chunks, st, optimizer_config)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        pg_collection, chunks, use_gloo_process_groups
    )
    if pg_collection is None or not hasattr(pg_collection, "tp"):
        tp_group = parallel_state.get_tensor_model_parallel_group()
    else:
        tp_group = pg_collection.tp
    nm = [r for r in routes if r.optimizer == "normuon"]
    aux = [r for r in routes if r.optimizer == "adamw"]
    names = {}
    for r in routes:
        names[id(r.param)] = r.name

    optimizers = []
    for expert in (False, True):
        sel = [r for r in nm if r.is_expert_parallel == expert]
        if not sel:
            continue
        inner = NorMuon(
            [normuon_group(sel, st, expert)],
            lr=st.lr,
            momentum=st.normuon_momentum,
            beta2=st.normuon_beta2,
            eps=st.normuon_eps,
            weight_decay=st.weight_decay,
            compile=bool(st.compile),
            cuda_graph=bool(st.cuda_graph),
            param_names=names,
            **normuon_kwargs(st),
        )
        if config.bf16:
            wrapped = NorMuonFloat16Optimizer(inner, config, None, normuon_init_state)
        else:
            wrapped = NorMuonFP32Optimizer(inner, config, normuon_init_state)
        # Same groups as get_megatron_optimizer: mp for dense, expert tp-pp for expert params.
        group = groups["expt_tp_pp_group"] if expert else groups["mp_group"]
        setattr(wrapped, "grad_stats_parallel_group", group)
        setattr(wrapped, "tp_group", tp_group)
        optimizers.append(wrapped)
        for r in sel:
            main = getattr(r.param, "main_param", None)
            if main is not None:
                names[id(main)] = r.name

    # AdamW part through Megatron's own builder, NorMuon (and frozen) params hidden.
    overrides: Dict[ParamKey, Dict[str, Any]] = {}
    buckets: Dict[Tuple, set] = {}
    for r in aux:
        key = tuple(sorted(aux_override(r, st).items()))
        buckets.setdefault(key, set()).add(id(r.param))
    for i, (key, ids) in enumerate(sorted(buckets.items(), key=lambda kv: str(kv[0]))):
        pred = ParamPredicate(name=f"vpmoe_aux_{i}_{key}", fn=lambda p, ids=ids: id(p) in ids)
        overrides[ParamKey(predicate=pred)] = dict(key)
    flipped = [r.param for r in nm if r.param.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        if aux:
            aux_chain = get_megatron_optimizer(
                config,
                chunks,
                config_overrides=overrides,
                use_gloo_process_groups=use_gloo_process_groups,
                pg_collection=pg_collection,
            )
            for o in aux_chain.chained_optimizers:
                if getattr(o, "optimizer", None) is not None and o.get_parameters():
                    # Same wrapper, slot-safe torch_dist mapping (see NorMuonFloat16Optimizer).
                    if type(o) is Float16OptimizerWithFloat16Params:
                        o.__class__ = NorMuonFloat16Optimizer
                    elif type(o) is FP32Optimizer:
                        o.__class__ = NorMuonFP32Optimizer
                    optimizers.append(o)
    finally:
        for p in flipped:
            p.requires_grad_(True)
    for r in routes:  # fp32 main copies of the Adam parts' bf16 params too (NaN-policy names)
        main = getattr(r.param, "main_param", None)
        if main is not None:
            names.setdefault(id(main), r.name)
    chained = NorMuonChainedOptimizer(optimizers, nan_policy=st.nan_policy, names=names)
    # Megatron's groups carry only max_lr / wd_mult (its OptimizerParamScheduler writes
    # lr = get_lr(group), from max_lr, and weight_decay = wd * wd_mult on each step); until then
    # torch's AdamW steps every group at the config's lr (NorMuon's, not normuon_aux_lr) and
    # decays every group, norms and biases included. Set both now, as the plain path does: an
    # optimizer stepped before (or without) a scheduler runs at its peak lr and decays what the
    # scheduler would.
    for g in chained.param_groups:
        g["lr"] = float(g.get("max_lr", g["lr"]))
        g["weight_decay"] = st.weight_decay * float(g.get("wd_mult", 1.0))
    names = chained._names
    for o in optimizers:
        if isinstance(getattr(o, "optimizer", None), NorMuon):
            o.optimizer.param_names = names  # load_state_dict errors name the model parameter
    return chained
