"""The plain optimizer path: :class:`NorMuonWithAuxAdamW` (NorMuon + ``torch.optim.AdamW``).

Used by :func:`~.build.build_optimizer` for anything that is not a Megatron-DDP-wrapped model
(a bare ``nn.Module``, CPU tests, the CPU demo). Same routing, groups (incl. Megatron scheduler
keys ``max_lr / min_lr / wd_mult``), global grad-norm clipping, NaN policy and
``step() -> (ok, grad_norm, None)`` contract as the Megatron path; ``torch.compile`` of the
NorMuon bank step (and ``cuda_graph``) is used only when the parameters are on CUDA (Inductor
on a CPU takes minutes). The object has ``MegatronOptimizer``'s interface (it does not subclass
it). Pure torch at import: only :meth:`NorMuonWithAuxAdamW.sharded_state_dict` imports Megatron's
``dist_checkpointing``, when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import ChainMap
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vpmoe_compile.tensor_parallel import tp_layout

from .grad_norm import grad_sq_sum, local_grad_norm, nonfinite_param_names
from .layer_wise import ParamSharding
from .normuon import NorMuon
from .param_groups import aux_override, normuon_group, normuon_kwargs
from .routing import ParamRoute
from .tensor_parallel import TPShadows, whole_sharded
from .state_check import (
    StateDictMismatch,
    check_optimizer_state,
    rollback_on_error,
    spread_common_step,
)

__all__ = ["NorMuonWithAuxAdamW", "build_plain_optimizer"]


class NorMuonWithAuxAdamW:
    """NorMuon + ``torch.optim.AdamW`` with ``MegatronOptimizer``'s interface (plain, non-DDP models).

    ``step()`` computes the global L2 norm of all gradients (fp64 accumulation, so a finite
    gradient never overflows it; one host sync, as Megatron), returns
    ``(False, norm, None)`` without touching anything when it is not finite (``nan_policy="skip"``;
    ``"raise"`` raises naming the parameters), otherwise clips all gradients by
    ``clip_grad / (norm + 1e-6)`` when that is < 1, steps NorMuon then AdamW, and returns
    ``(True, norm, num_zeros)`` (``num_zeros``: the number of zero gradient entries with
    ``log_num_zeros_in_grad``, else ``None``). ``param_groups`` carry Megatron's scheduler keys, so
    ``megatron.core.optimizer_param_scheduler.OptimizerParamScheduler`` can drive it.
    ``load_state_dict`` checks both parts before loading either (see :mod:`.state_check`).

    The rest of ``megatron.core.optimizer.MegatronOptimizer``'s interface, as its
    ``FP32Optimizer`` has it (no main parameters, no loss scaling): ``get_parameters``,
    ``get_main_grads_for_grad_norm``, ``get_grad_norm``, ``clip_grad_norm``, ``count_zeros``,
    ``prepare_grads``, ``step_with_ready_grads``, ``zero_grad``, ``get_loss_scale`` (a
    ``[1.0]`` tensor), ``scale_loss``, ``reload_model_params`` (nothing to reload),
    ``state_dict`` / ``load_state_dict``, ``sharded_state_dict`` (``torch_dist``, see
    :meth:`sharded_state_dict`), ``param_groups``, ``state``, ``is_stub_optimizer``.
    """

    path = "plain"

    def __init__(
        self,
        normuon: Optional[NorMuon],
        adamw: Optional[torch.optim.Optimizer],
        clip_grad: float,
        nan_policy: str,
        names: Dict[int, str],
        *,
        log_num_zeros_in_grad: bool = False,
        timers: Optional[Callable] = None,
        barrier_with_L1_time: bool = False,
        use_main_grad: bool = False,
        sharding: Optional[ParamSharding] = None,
        all_params: Optional[Sequence[torch.Tensor]] = None,
        tp_shadows: Optional[TPShadows] = None,
    ):
        self.normuon = normuon
        # layer-wise distributed optimizer (:mod:`.layer_wise`): the parts hold this rank's
        # parameters only; the grad norm, clipping and NaN policy see every parameter
        self.sharding = sharding
        # tensor parallelism (:mod:`.tensor_parallel`): NorMuon steps whole copies of the TP-split
        # matrices; the grad norm, clipping and NaN policy see the model's parameters
        self.tp_shadows = tp_shadows if tp_shadows else None
        self._all_params = list(all_params) if (sharding is not None or self.tp_shadows) else None
        # built from Megatron-DDP-wrapped chunks (CPU): the gradients are DDP's main_grad views
        self.use_main_grad = bool(use_main_grad)
        self.adamw = adamw
        self.clip_grad = float(clip_grad)
        self.nan_policy = nan_policy
        self.log_num_zeros_in_grad = bool(log_num_zeros_in_grad)
        self.timers = timers
        self.barrier_with_L1_time = bool(barrier_with_L1_time)
        self._names = names
        self._scale: Optional[torch.Tensor] = None

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.normuon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> List[dict]:
        """NorMuon's groups then AdamW's (the very dicts: a scheduler writing ``lr`` /
        ``weight_decay`` into them changes what the next step uses)."""
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> ChainMap:
        """Per-parameter state of both parts (parameter -> dict), like ``optimizer.state``."""
        return ChainMap(*(o.state for o in self.optimizers))

    @property
    def is_stub_optimizer(self) -> bool:
        return not self._params()

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _grad_params(self) -> List[torch.Tensor]:
        """The parameters whose gradients enter the grad norm: every trained parameter (also
        those another rank owns under the layer-wise distributed optimizer, whose gradients
        DDP has all-reduced here too), else :meth:`_params`."""
        return self._all_params if self._all_params is not None else self._params()

    def get_parameters(self) -> List[torch.nn.Parameter]:
        """Every model parameter this optimizer updates (NorMuon's, then AdamW's)."""
        if self.tp_shadows is None:
            return self._params()
        return [self.tp_shadows.param_of(p) for p in self._params()]

    def get_main_grads_for_grad_norm(self) -> List[torch.Tensor]:
        """The gradients the grad norm is taken over (every parameter's ``.grad`` that is not
        ``None``, including parameters another rank owns under the layer-wise distributed
        optimizer; there are no tensor-parallel duplicates on this path)."""
        return [p.grad for p in self._grad_params() if p.grad is not None]

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        """Global L2 norm of all gradients, accumulated in fp64 (a finite gradient never
        overflows it), one host sync (:func:`local_grad_norm`). Under expert parallelism each
        rank holds other experts: their squares are summed over the expert-model-parallel group
        (as Megatron's ``get_grad_norm_fp32`` does over its grad-stats group), the replicated
        parameters' counted once. Under pipeline parallelism each stage holds other layers: the
        sums are added over the pipeline group, a parameter every stage holds (GRAPE-M's
        ``log_freq``) counted on the first stage only (the others' copies are marked ``shared``,
        Megatron's convention)."""
        group, pp_group, tp = _expert_parallel_group(), _pipeline_group(), _parallel_group("tensor")
        if group is None and pp_group is None and tp is None:
            return local_grad_norm(self.get_main_grads_for_grad_norm())
        import torch.distributed as dist

        # a copy another stage also holds (Megatron's ``shared``: GRAPE-M's log_freq after the
        # first stage) is counted once
        params = [p for p in self._grad_params() if p.grad is not None and not getattr(p, "shared", False)]
        dense_params = [p for p in params if getattr(p, "allreduce", True)]
        split, whole = [], []  # under TP: the TP-split elements (summed over the ranks), the rest once
        for p in dense_params:
            layout = tp_layout(p) if tp is not None else None
            if layout is None:
                whole.append(p.grad)
            else:
                s, r = layout.split_sharded(p.grad)
                split.extend(s)
                whole.extend(r)
        dense = grad_sq_sum(whole)
        if tp is not None:
            dense_split = grad_sq_sum(split, device=dense.device)
            dist.all_reduce(dense_split, op=dist.ReduceOp.SUM, group=tp)
            dense = dense + dense_split
        expert = grad_sq_sum([p.grad for p in params if not getattr(p, "allreduce", True)], device=dense.device)
        if group is not None:
            dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=group)
        total = dense + expert.to(dense.device)
        if pp_group is not None:  # each stage holds other layers
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
        return math.sqrt(float(total.item()))

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        """Scale all gradients by ``clip_grad / (norm + 1e-6)`` when that is < 1 (Megatron's
        ``clip_grad_by_total_norm_fp32``); returns the norm before clipping."""
        grad_norm = self.get_grad_norm()
        self._clip(grad_norm, clip_grad)
        return grad_norm

    def _clip(self, grad_norm: float, clip_grad: float) -> None:
        if clip_grad > 0.0 and math.isfinite(grad_norm):
            coef = clip_grad / (grad_norm + 1e-6)
            if coef < 1.0:  # the gradients this rank steps on (all of them when not sharded)
                params = self._params()
                if self.tp_shadows is not None:  # the shards: the shadows gather them afterwards
                    params = [self.tp_shadows.param_of(p) for p in params]
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, coef)

    @torch.no_grad()
    def count_zeros(self) -> float:
        """Number of zero entries in all gradients (Megatron's ``count_zeros``), one host sync."""
        grads = self.get_main_grads_for_grad_norm()
        if not grads:
            return 0.0
        counts = [(g == 0).sum().to(device=grads[0].device, dtype=torch.float64) for g in grads]
        return float(torch.stack(counts).sum().item())

    def _nonfinite_names(self) -> List[str]:
        return nonfinite_param_names(self._grad_params(), self._names)

    def _check_not_megatron_ddp(self) -> None:
        for p in self._params():
            if hasattr(p, "main_grad"):
                raise RuntimeError(
                    f"{self._names.get(id(p), 'a parameter')} is registered with Megatron's "
                    "DistributedDataParallel (its gradients go to main_grad, which this optimizer "
                    "never reads): the optimizer was built on the bare model before wrapping. Build it "
                    "from the DDP-wrapped model: vpmoe_compile.build_optimizer(ddp_model)"
                )

    @contextlib.contextmanager
    def _timed(self, name: str):
        """Megatron's optimizer timers (``OptimizerConfig.timers``), when given."""
        if self.timers is None:
            yield
            return
        self.timers(name, log_level=1).start(barrier=self.barrier_with_L1_time)
        try:
            yield
        finally:
            self.timers(name).stop()

    def prepare_grads(self) -> bool:
        """Megatron's hook before the grad norm; returns whether an inf / NaN was found by a loss
        scaler (never: there is none; non-finite gradients are the NaN policy's, in
        :meth:`step`). Built from Megatron-DDP-wrapped chunks (``use_main_grad``, the CPU case
        of :func:`~.build.build_optimizer`), each parameter's ``.grad`` becomes its ``main_grad``
        view, as in Megatron's ``FP32Optimizer``; otherwise parameters registered with Megatron
        DDP are refused (their gradients go to ``main_grad``, which this optimizer would not see)."""
        if self.use_main_grad:
            # as Megatron's FP32Optimizer.prepare_grads: the step reads DDP's (reduced) buffers
            for p in self._grad_params():
                main = getattr(p, "main_grad", None)
                if main is not None:
                    if main.dtype != p.dtype:
                        raise RuntimeError(
                            f"{self._names.get(id(p), 'a parameter')}: main_grad is {main.dtype} but the "
                            f"parameter is {p.dtype}; without CUDA this path trains fp32 parameters only"
                        )
                    p.grad = main
            return False
        self._check_not_megatron_ddp()
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """Step NorMuon then AdamW on the current (clipped) gradients; under the layer-wise
        distributed optimizer, then every owner broadcasts its updated parameters
        (:meth:`~.layer_wise.ParamSharding.broadcast_updated`). Returns True."""
        if self.tp_shadows is not None:
            with self._timed("params-all-gather"):
                self.tp_shadows.gather()
        with self._timed("optimizer-inner-step"):
            for opt in self.optimizers:
                opt.step()
        if self.tp_shadows is not None:
            self.tp_shadows.scatter()
        if self.sharding is not None:
            with self._timed("params-all-gather"):
                self.sharding.broadcast_updated()
        return True

    @torch.no_grad()
    def step(self) -> Tuple[bool, float, Optional[float]]:
        self.prepare_grads()
        with self._timed("optimizer-clip-main-grad"):
            grad_norm = self.get_grad_norm()
            if not math.isfinite(grad_norm):
                if self.nan_policy == "raise":
                    raise FloatingPointError(
                        f"non-finite gradient norm {grad_norm}; parameters: {self._nonfinite_names()}"
                    )
                return False, grad_norm, None
            self._clip(grad_norm, self.clip_grad)
        num_zeros = None
        if self.log_num_zeros_in_grad:
            with self._timed("optimizer-count-zeros"):
                num_zeros = self.count_zeros()
        ok = self.step_with_ready_grads()
        return ok, grad_norm, num_zeros

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        if self._all_params is not None:  # the parameters other ranks own
            for p in self._all_params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    def get_loss_scale(self) -> torch.Tensor:
        """No loss scaling: a ``[1.0]`` fp32 tensor on the parameters' device (as Megatron's
        ``FP32Optimizer``)."""
        if self._scale is None:
            params = self._params()
            device = params[0].device if params else torch.device("cpu")
            self._scale = torch.ones(1, dtype=torch.float32, device=device)
        return self._scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.get_loss_scale() * loss

    def reload_model_params(self, state_dict=None) -> None:
        """Nothing to reload: this path has no main copies of the parameters (it updates them
        in place; NorMuon re-binds its banks when a parameter's storage changed). ``state_dict``
        is ignored, as by Megatron's ``FP32Optimizer``."""

    def state_dict(self) -> Dict[str, Any]:
        return {
            "normuon": self.normuon.state_dict() if self.normuon is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
        }

    def check_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Check both parts of a :meth:`state_dict` against this optimizer, changing nothing.

        Raises:
            StateDictMismatch: naming the first mismatching parameter (model name) and shapes.
        """
        if not isinstance(state_dict, dict):
            raise StateDictMismatch(
                f"the checkpoint is a {type(state_dict).__name__}, not a NorMuonWithAuxAdamW state dict"
            )
        for key, opt, what in (("normuon", self.normuon, "NorMuon"), ("adamw", self.adamw, "AdamW")):
            saved = state_dict.get(key)
            if opt is None and saved is None:
                continue
            if opt is None or saved is None:
                raise StateDictMismatch(
                    f"the checkpoint has {'no' if saved is None else 'a'} {what} part, this "
                    f"optimizer has {'no ' if opt is None else ''}{what} parameters; nothing was loaded"
                )
            check_optimizer_state(opt, spread_common_step(saved), self._names, what)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load both parts (a :meth:`state_dict`, or what ``dist_checkpointing.load`` returns for
        a :meth:`sharded_state_dict`: its ``common_step`` is spread back into per-parameter
        steps); everything is checked first (:meth:`check_state_dict`), so a checkpoint of
        another model raises with NorMuon and AdamW unchanged (also NorMuon when only the AdamW
        part does not fit), and an unexpected error half-way rolls both back."""
        self.check_state_dict(state_dict)
        with rollback_on_error(*self.optimizers):
            if self.normuon is not None:
                self.normuon.load_state_dict(spread_common_step(state_dict["normuon"]))
            if self.adamw is not None:
                self.adamw.load_state_dict(spread_common_step(state_dict["adamw"]))

    def _init_state(self) -> None:
        """Allocate (zero) state for every parameter, as Megatron's ``init_state_fn`` does before
        a ``torch_dist`` load (so the loading structure has every state tensor)."""
        if self.normuon is not None:
            self.normuon.init_state()
        if self.adamw is not None:
            for group in self.adamw.param_groups:
                on_device = bool(group.get("fused") or group.get("capturable"))
                for p in group["params"]:
                    st = self.adamw.state[p]
                    if len(st) == 0:
                        st["step"] = torch.zeros(
                            (), dtype=torch.float32, device=p.device if on_device else "cpu"
                        )
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(
        self, model_sharded_state_dict, is_loading: bool = False, metadata: Optional[dict] = None
    ) -> Dict[str, Any]:
        """Megatron ``torch_dist`` form of :meth:`state_dict`, for ``dist_checkpointing.save`` /
        ``load``: ``{"normuon": ..., "adamw": ...}``, each part's state tensors as ShardedTensors
        of the model's parameters (keys ``optimizer.state.<state>.<model key>``; NorMuon's
        second moment with its reduced axis collapsed, :mod:`.sharded_state`), AdamW's steps as
        one ``common_step``. Every parameter must be in ``model_sharded_state_dict``
        (``model.sharded_state_dict()``). ``is_loading`` first allocates zero state for every
        parameter (Megatron's ``init_state_fn``). Load with
        ``opt.load_state_dict(dist_checkpointing.load(opt.sharded_state_dict(msd, is_loading=True), dir))``.
        ``metadata`` is accepted for Megatron's signature and not used."""
        from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

        from .sharded_state import optimizer_state_to_sharded

        if is_loading:
            self._init_state()
        out: Dict[str, Any] = {}
        for key, opt in (("normuon", self.normuon), ("adamw", self.adamw)):
            if opt is None:
                out[key] = None
                continue
            sd = opt.state_dict()
            params = [p for g in opt.param_groups for p in g["params"]]
            shadows = self.tp_shadows
            model_params = params if shadows is None else [shadows.param_of(p) for p in params]
            id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, model_params)
            if shadows is not None:  # whole copies: saved whole, replicated over the TP group
                for i, p in enumerate(params):
                    if i in id_map and model_params[i] is not p:
                        id_map[i] = whole_sharded(id_map[i], model_params[i], p)
            missing = [self._names.get(id(p), f"parameter {i}") for i, p in enumerate(params) if i not in id_map]
            if missing:
                raise ValueError(
                    f"sharded_state_dict: {len(missing)} parameters of the {key} part are not in "
                    f"the model's sharded state dict (first: {missing[0]}); pass "
                    "model.sharded_state_dict() of the model this optimizer was built for"
                )
            optimizer_state_to_sharded(sd, id_map)
            out[key] = sd
        if self.sharding is not None:
            _owner_saves(out)
        return out


def _owner_saves(sharded: Dict[str, Any]) -> None:
    """In place, for the layer-wise distributed optimizer: each state tensor exists on its owner
    only, so its data-parallel replica id becomes 0 there (it is saved once, by the owner;
    Megatron's ``LayerWiseDistributedOptimizer.sharded_state_dict`` does the same). The keys are
    the model parameters' (and the groups' per-parameter entries the loading rank's own,
    :mod:`.sharded_state`), so a checkpoint saved at one data-parallel size loads at another."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for part in sharded.values():
        if part is None:
            continue
        for sh in nested_values(part["state"]):
            rid = getattr(sh, "replica_id", None)
            if isinstance(rid, tuple) and len(rid) == 3:
                sh.replica_id = (*rid[:2], 0)
            elif isinstance(rid, int):
                sh.replica_id = 0


def build_plain_optimizer(
    routes: Sequence[ParamRoute],
    st,
    runtime: Optional[Dict[str, Any]] = None,
    *,
    use_main_grad: bool = False,
    sharding: Optional[ParamSharding] = None,
) -> NorMuonWithAuxAdamW:
    """The plain path of :func:`~.build.build_optimizer`: NorMuon (dense and expert-parallel
    groups) + one ``torch.optim.AdamW`` whose groups bucket the AdamW parameters by
    :func:`~.param_groups.aux_override`; ``torch.compile`` / CUDA graphs of the NorMuon step only
    when its parameters are on CUDA. ``runtime``: the ``OptimizerConfig`` fields the step honours
    (``log_num_zeros_in_grad``, ``timers``, ``barrier_with_L1_time``). ``sharding``: the
    layer-wise distributed optimizer (:mod:`.layer_wise`): every group is built (the same groups
    on every rank, some possibly empty) with the parameters this rank owns."""
    nm = [r for r in routes if r.optimizer == "normuon"]
    aux = [r for r in routes if r.optimizer == "adamw"]
    names = {id(r.param): r.name for r in routes}
    # tensor parallelism: NorMuon steps whole copies of the TP-split matrices (:mod:`.tensor_parallel`)
    shadows = TPShadows([r.param for r in nm]) if _parallel_group("tensor") is not None else None
    if shadows:  # (with the layer-wise distributed optimizer: refused by build_optimizer)
        nm = [dataclasses.replace(r, param=shadows.shadow_of(r.param)) if shadows.shadow_of(r.param) is not None
              else r for r in nm]
        names.update({id(r.param): r.name for r in nm})

    def mine(rs: Sequence[ParamRoute]) -> List[ParamRoute]:
        return list(rs) if sharding is None else [r for r in rs if sharding.owns(r.param)]

    normuon = None
    if nm:
        groups = []
        # the groups every pipeline stage has (a stage without MoE layers gets an empty expert
        # group), so that the stages' optimizers have the same structure; with routed experts
        # both groups at any expert-parallel size (at EP 1 the experts are in the dense group and
        # the expert group is empty), so that a checkpoint loads at another EP size
        kinds = {bool(r.is_expert_parallel) for r in nm}
        if any(r.routed_expert for r in nm):
            kinds |= {False, True}
        present = _pipeline_union(sorted(kinds))
        for expert in (False, True):
            sel = [r for r in nm if r.is_expert_parallel == expert]
            if expert in present:
                groups.append(normuon_group(mine(sel), st, expert))
        on_cuda = all(r.param.is_cuda for r in nm)
        normuon = NorMuon(
            groups,
            lr=st.lr,
            momentum=st.normuon_momentum,
            beta2=st.normuon_beta2,
            eps=st.normuon_eps,
            weight_decay=st.weight_decay,
            compile=bool(st.compile) and on_cuda,
            cuda_graph=bool(st.cuda_graph) and on_cuda,
            param_names=names,
            **normuon_kwargs(st),
        )
    adamw = None
    if aux:
        buckets: Dict[Tuple, List[ParamRoute]] = {}
        for r in aux:
            ov_items = tuple(sorted(aux_override(r, st).items()))
            buckets.setdefault((ov_items, bool(r.is_expert_parallel)), []).append(r)
            if r.routed_expert:  # both buckets at any EP size (see the NorMuon groups above)
                for expert in (False, True):
                    buckets.setdefault((ov_items, expert), [])
        groups = []
        # every pipeline stage's buckets (a middle stage has no embedding / output layer), in a
        # canonical order (not the parameters' order): the stages' optimizers have the same
        # groups in the same order, so a checkpoint's group settings fit every stage
        for ov_items, expert in _pipeline_union(list(buckets)):
            rs = buckets.get((ov_items, expert), [])
            ov = dict(ov_items)
            max_lr = ov.get("max_lr", st.lr)
            groups.append(
                {
                    "params": [r.param for r in mine(rs)],
                    "is_expert_parallel": expert,
                    "default_config": "max_lr" not in ov,
                    "wd_mult": ov["wd_mult"],
                    "lr_mult": 1.0,
                    "is_decoupled_lr": ov.get("is_decoupled_lr", False),
                    "max_lr": max_lr,
                    "min_lr": ov.get("min_lr", st.min_lr),
                    "lr": max_lr,
                    "weight_decay": st.weight_decay * ov["wd_mult"],
                }
            )
        fused = all(r.param.is_cuda and r.param.is_floating_point() for r in aux)
        adamw = torch.optim.AdamW(
            groups,
            lr=st.aux_lr,
            betas=(st.adam_beta1, st.adam_beta2),
            eps=st.adam_eps,
            weight_decay=st.weight_decay,
            fused=True if fused else None,
        )
    return NorMuonWithAuxAdamW(
        normuon, adamw, st.clip_grad, st.nan_policy, names, use_main_grad=use_main_grad,
        sharding=sharding, all_params=[r.param for r in routes], tp_shadows=shadows, **(runtime or {})
    )


def _pipeline_union(keys: List) -> List:
    """The union of ``keys`` over Megatron's pipeline group (``all_gather_object``; just
    ``keys`` without pipeline parallelism), sorted canonically (by ``repr``)."""
    group = _pipeline_group()
    if group is not None:
        import torch.distributed as dist

        gathered: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, list(keys), group=group)
        keys = [k for ks in gathered for k in ks]
    return sorted(set(keys), key=repr)


def _parallel_group(kind: str):
    """Megatron's ``kind`` ("pipeline", "expert" or "tensor") model-parallel group when its size is > 1,
    else ``None`` (also without ``torch.distributed`` or Megatron's parallel state)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if getattr(parallel_state, f"get_{kind}_model_parallel_world_size")() <= 1:
        return None
    return getattr(parallel_state, f"get_{kind}_model_parallel_group")()


def _pipeline_group():
    return _parallel_group("pipeline")


def _expert_parallel_group():
    return _parallel_group("expert")
