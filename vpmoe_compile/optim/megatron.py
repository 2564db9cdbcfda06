"""``build_optimizer``: NorMuon + auxiliary AdamW for a (transformed) Megatron-Core GPT model.

Two paths, chosen from the model, never silently mixed:

* **Megatron path** -- every model chunk is wrapped in Megatron's ``DistributedDataParallel``
  (it has a ``ddp_config``); needs CUDA. Returns :class:`NorMuonChainedOptimizer`, a
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
* **Plain path** -- anything else (a bare ``nn.Module``, CPU tests, the CPU demo). Returns
  :class:`NorMuonWithAuxAdamW`: the same :class:`NorMuon` plus ``torch.optim.AdamW`` with the
  same routing, groups (incl. Megatron scheduler keys ``max_lr / min_lr / wd_mult``), global
  grad-norm clipping and NaN policy, and the same ``step() -> (ok, grad_norm, None)`` contract.
  ``torch.compile`` of the NorMuon bank step (and ``cuda_graph``) is used on this path only when
  the parameters are on CUDA (Inductor on a CPU takes minutes).

On both paths the global grad norm accumulates in fp64 (a finite gradient of 1e20 no longer
overflows fp32 squares into an inf norm, i.e. a skipped step), ``nan_policy="raise"`` names the
parameters with non-finite gradients by their model names, and ``load_state_dict`` validates the
whole checkpoint (groups, parameters, every state shape, NorMuon blocks / layouts) before any
part loads, naming the first mismatching parameter and both shapes (:mod:`.state_check`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .normuon import NorMuon
from .routing import ParamRoute, classify_parameters, optimizer_settings, routing_table
from .state_check import StateDictMismatch, check_optimizer_state, rollback_on_error

logger = logging.getLogger(__name__)

__all__ = [
    "build_optimizer",
    "NorMuonWithAuxAdamW",
    "normuon_init_state",
    "UnsupportedOptimizerSetup",
]


class UnsupportedOptimizerSetup(ValueError):
    """The requested parallel / precision setup is not supported by the NorMuon optimizer."""


def normuon_init_state(opt: NorMuon, config: Any = None) -> None:
    """Megatron ``init_state_fn``: allocate (zero) NorMuon state for every parameter."""
    opt.init_state()


# --------------------------------------------------------------------------- gradient norm
def grad_sq_sum(grads: Sequence[torch.Tensor], device: Any = None) -> torch.Tensor:
    """Sum of squares of all gradients as a 0-d fp64 tensor, without a host sync.

    One ``_foreach_norm`` with an fp64 output, which accumulates in fp64 while reading the
    gradients in their own dtype (no fp32 / fp64 copies): a finite fp32 / bf16 / fp16 gradient
    cannot overflow it (``(3.4e38)^2 * 1e12`` elements is ~1e89 << 1.8e308), whereas the
    squares of fp32 accumulation overflow from |g| ~ 1.8e19 on (a finite 1e20 gradient read as
    an inf norm, i.e. a NaN skip). Only fp64 gradients beyond ~1e150 can overflow; see
    :func:`local_grad_norm`.
    """
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            buckets.setdefault((g.device, g.dtype), []).append(g)
    if not buckets:
        return torch.zeros((), dtype=torch.float64, device=device)
    # one multi-tensor kernel per (device, dtype): foreach's fast path needs them uniform
    norms = [n for gs in buckets.values() for n in torch._foreach_norm(gs, 2.0, dtype=torch.float64)]
    dev = norms[0].device
    return torch.stack([n if n.device == dev else n.to(dev) for n in norms]).square().sum()


def local_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of ``grads``: :func:`grad_sq_sum` and one host sync. Only for fp64
    gradients whose fp64 squares overflow (beyond ~1e150) while every value is finite, the norm
    is recomputed rescaled by the largest ``|g|`` (extra syncs on that path only; a non-finite
    norm of fp32 / bf16 / fp16 gradients always means a NaN / Inf gradient)."""
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if not grads:
        return 0.0
    total = math.sqrt(float(grad_sq_sum(grads).item()))
    if math.isfinite(total) or not any(g.dtype == torch.float64 for g in grads):
        return total
    amax = torch.stack(
        [n.to(device=grads[0].device, dtype=torch.float64) for n in torch._foreach_norm(grads, math.inf)]
    ).max()
    amax = float(amax.item())
    if not math.isfinite(amax) or amax == 0.0:
        return total  # a NaN / Inf gradient: the norm is not finite
    acc = 0.0
    for g in grads:
        acc += float(torch.linalg.vector_norm(g / amax, dtype=torch.float64).item()) ** 2
    return amax * math.sqrt(acc)


def global_grad_norm(grads: Sequence[torch.Tensor], group: Any = None, device: Any = None) -> float:
    """L2 norm of ``grads`` summed over the ranks of ``group`` (one all-reduce of an fp64 scalar,
    one host sync), overflow-free for fp32 / bf16 / fp16 gradients (:func:`grad_sq_sum`); the
    Megatron path's replacement of ``get_grad_norm_fp32``, whose fp32 ``norm ** 2`` overflows
    for a finite gradient of 1e20. Without an initialised process group it is the local norm."""
    import torch.distributed as dist

    if device is None and not any(g is not None for g in grads) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    sq = grad_sq_sum(grads, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return math.sqrt(float(sq.item()))


# --------------------------------------------------------------------------- NaN policy names
def nonfinite_param_names(params: Sequence[torch.Tensor], names: Dict[int, str]) -> List[str]:
    """Model names of the parameters whose gradient holds a NaN / Inf (``names``: ``{id: name}``;
    unknown ones as ``<param (shape)>``). If no gradient does (a norm that overflowed), the
    parameter with the largest ``|grad|``, marked as such, so the error always names one."""

    def label(p):
        return names.get(id(p), f"<param {tuple(p.shape)}>")

    with_grad = [p for p in params if p.grad is not None and p.grad.numel() > 0]
    bad = [label(p) for p in with_grad if not bool(torch.isfinite(p.grad).all())]
    if bad or not with_grad:
        return bad
    biggest = max(with_grad, key=lambda p: float(p.grad.abs().max()))
    return [f"{label(biggest)} (all gradients finite; largest |grad| "
            f"{float(biggest.grad.abs().max()):.3e})"]


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


def _normuon_kwargs(st) -> Dict[str, Any]:
    return dict(
        pe_steps=int(st.polar_express_steps),
        safety=float(st.polar_express_safety_factor),
        scale_mode=st.scale_mode,
        neuron_axis=st.neuron_axis,
        pe_backend=st.pe_backend,
    )


def _normuon_group(routes: Sequence[ParamRoute], st, expert: bool) -> Dict[str, Any]:
    return {
        "params": [r.param for r in routes],
        "blocks": [r.blocks for r in routes],
        "layouts": [r.layout for r in routes],
        "is_expert_parallel": expert,
        "default_config": True,
        "wd_mult": 1.0,
        "lr_mult": 1.0,
        "is_decoupled_lr": False,
        "max_lr": st.lr,
        "min_lr": st.min_lr,
        "lr": st.lr,
        "weight_decay": st.weight_decay,
        "momentum": st.normuon_momentum,
        "beta2": st.normuon_beta2,
        "eps": st.normuon_eps,
        "use_normuon": True,
    }


def _aux_override(r: ParamRoute, st) -> Dict[str, Any]:
    """Scheduler override of one AdamW parameter (each param gets exactly one, no conflicts)."""
    ov: Dict[str, Any] = {"wd_mult": float(r.wd_mult)}
    if r.role in ("embedding", "output") and st.decoupled_lr is not None:
        ov["max_lr"] = st.decoupled_lr
        ov["min_lr"] = st.decoupled_min_lr if st.decoupled_min_lr is not None else st.min_lr
        ov["is_decoupled_lr"] = True
    elif st.normuon_aux_lr is not None or st.normuon_aux_min_lr is not None:
        ov["max_lr"] = st.aux_lr
        ov["min_lr"] = st.aux_min_lr
    return ov


def _check_parallel(routes: Sequence[ParamRoute]) -> None:
    """D13: NorMuon orthogonalises whole matrices; TP / expert-TP shards would be wrong."""
    try:
        from megatron.core import parallel_state as ps

        initialized = ps.model_parallel_is_initialized()
    except Exception:  # pragma: no cover - megatron import problems
        initialized = False
    nm = [r for r in routes if r.optimizer == "normuon"]
    if initialized and nm:
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1 and any(not r.is_expert_parallel for r in nm):
            raise UnsupportedOptimizerSetup(
                f"NorMuon needs tensor-model-parallel size 1 (got {tp}): a TP shard of a "
                "matrix cannot be orthogonalised alone (spec D13)"
            )
        etp = ps.get_expert_tensor_parallel_world_size()
        if etp > 1 and any(r.is_expert_parallel for r in nm):
            raise UnsupportedOptimizerSetup(
                f"NorMuon needs expert-tensor-parallel size 1 (got {etp}) (spec D13)"
            )
    for r in nm:
        if getattr(r.param, "tensor_model_parallel", False) and initialized:
            if ps.get_tensor_model_parallel_world_size() > 1:
                raise UnsupportedOptimizerSetup(f"{r.name} is tensor-parallel; NorMuon needs TP = 1")


def _check_config(config, chunks) -> None:
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and getattr(ddp, "use_distributed_optimizer", False):
            raise UnsupportedOptimizerSetup(
                "NorMuon does not support Megatron's distributed optimizer "
                "(DistributedDataParallelConfig.use_distributed_optimizer=True); use the "
                "replicated optimizer (spec D10)"
            )
        if ddp is not None and getattr(ddp, "use_megatron_fsdp", False):
            raise UnsupportedOptimizerSetup("NorMuon does not support Megatron FSDP")
    if config is None:
        return
    if getattr(config, "use_distributed_optimizer", False):
        raise UnsupportedOptimizerSetup(
            "NorMuon does not support the distributed optimizer (use_distributed_optimizer=True)"
        )
    if getattr(config, "optimizer_cpu_offload", False):
        raise UnsupportedOptimizerSetup("NorMuon does not support optimizer CPU offload")
    if getattr(config, "use_precision_aware_optimizer", False):
        raise UnsupportedOptimizerSetup("NorMuon does not support the precision-aware optimizer")
    if getattr(config, "fp16", False):
        raise UnsupportedOptimizerSetup("NorMuon supports bf16 or fp32 training, not fp16")


def build_optimizer(
    model,
    cfg: Any = None,
    *,
    optimizer_config: Any = None,
    pg_collection: Any = None,
    use_gloo_process_groups: bool = True,
):
    """Build NorMuon (matrices) + AdamW (everything else) for ``model``.

    Args:
        model: the model, or a list of model chunks; Megatron-DDP-wrapped chunks select the
            Megatron path (see module docstring), anything else the plain path.
        cfg: a ``VpMoEConfig`` (its ``optimizer`` section is used), the section itself, any
            object with those attributes, or ``None``: the config the model was transformed with
            (``model.vpmoe_config``, also through Megatron's wrappers), else the defaults.
        optimizer_config: Megatron path only: an ``OptimizerConfig`` to use instead of one built
            from ``cfg`` (its ``optimizer`` field is set to ``"adam"`` for the AdamW part).
        pg_collection, use_gloo_process_groups: forwarded to ``get_megatron_optimizer``.

    Returns:
        ``NorMuonChainedOptimizer`` (Megatron path) or ``NorMuonWithAuxAdamW`` (plain path);
        both have ``.path`` ("megatron" / "plain"), ``.routes`` and ``.routing_table()``.
    """
    chunks = _chunks(model)
    if cfg is None:
        cfg = _transform_config(chunks)
    st = optimizer_settings(cfg)
    if st.name != "normuon":
        raise ValueError(f"build_optimizer builds NorMuon; optimizer.name is {st.name!r}")
    _check_config(optimizer_config, chunks)
    routes = classify_parameters(chunks if len(chunks) > 1 else chunks[0], st_to_cfg(st))
    _check_parallel(routes)
    megatron_ddp = all(hasattr(c, "ddp_config") for c in chunks)
    if megatron_ddp:
        if not torch.cuda.is_available():
            raise UnsupportedOptimizerSetup(
                "Megatron DDP-wrapped model without CUDA: Megatron's mixed-precision optimizer "
                "wrappers need CUDA"
            )
        from ._megatron_path import build_megatron_optimizer

        opt = build_megatron_optimizer(
            chunks, routes, st, optimizer_config, pg_collection, use_gloo_process_groups
        )
    else:
        opt = _build_plain(routes, st)
    opt.routes = routes
    opt.routing_table = lambda: routing_table(model, st_to_cfg(st))
    return opt


def st_to_cfg(st):
    """An object with the resolved optimizer attributes (what ``optimizer_settings`` accepts)."""

    class _Cfg:
        pass

    obj = _Cfg()
    for k, v in st.values.items():
        setattr(obj, k, v)
    return obj


# --------------------------------------------------------------------------- plain path
class NorMuonWithAuxAdamW:
    """NorMuon + ``torch.optim.AdamW`` with Megatron's step contract (plain, non-DDP models).

    ``step()`` computes the global L2 norm of all gradients (fp64 accumulation, so a finite
    gradient never overflows it; one host sync, as Megatron), returns
    ``(False, norm, None)`` without touching anything when it is not finite (``nan_policy="skip"``;
    ``"raise"`` raises naming the parameters), otherwise clips all gradients by
    ``clip_grad / (norm + 1e-6)`` when that is < 1, steps NorMuon then AdamW, and returns
    ``(True, norm, None)``. ``param_groups`` carry Megatron's scheduler keys, so
    ``megatron.core.optimizer_param_scheduler.OptimizerParamScheduler`` can drive it.
    ``load_state_dict`` checks both parts before loading either (see :mod:`.state_check`).
    """

    path = "plain"

    def __init__(
        self,
        normuon: Optional[NorMuon],
        adamw: Optional[torch.optim.Optimizer],
        clip_grad: float,
        nan_policy: str,
        names: Dict[int, str],
    ):
        self.normuon = normuon
        self.adamw = adamw
        self.clip_grad = float(clip_grad)
        self.nan_policy = nan_policy
        self._names = names

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.normuon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> List[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        """Global L2 norm of all gradients, accumulated in fp64 (a finite gradient never
        overflows it), one host sync (:func:`local_grad_norm`)."""
        return local_grad_norm([p.grad for p in self._params() if p.grad is not None])

    def _nonfinite_names(self) -> List[str]:
        return nonfinite_param_names(self._params(), self._names)

    def _check_not_megatron_ddp(self) -> None:
        for p in self._params():
            if hasattr(p, "main_grad"):
                raise RuntimeError(
                    f"{self._names.get(id(p), 'a parameter')} is registered with Megatron's "
                    "DistributedDataParallel (its gradients go to main_grad, which this optimizer "
                    "never reads): the optimizer was built on the bare model before wrapping. Build it "
                    "from the DDP-wrapped model: vpmoe_compile.build_optimizer(ddp_model)"
                )

    @torch.no_grad()
    def step(self) -> Tuple[bool, float, None]:
        self._check_not_megatron_ddp()
        grad_norm = self.get_grad_norm()
        if not math.isfinite(grad_norm):
            if self.nan_policy == "raise":
                raise FloatingPointError(
                    f"non-finite gradient norm {grad_norm}; parameters: {self._nonfinite_names()}"
                )
            return False, grad_norm, None
        if self.clip_grad > 0.0:
            coef = self.clip_grad / (grad_norm + 1e-6)
            if coef < 1.0:
                grads = [p.grad for p in self._params() if p.grad is not None]
                torch._foreach_mul_(grads, coef)
        for opt in self.optimizers:
            opt.step()
        return True, grad_norm, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

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
            check_optimizer_state(opt, saved, self._names, what)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load both parts; everything is checked first (:meth:`check_state_dict`), so a
        checkpoint of another model raises with NorMuon and AdamW unchanged (also NorMuon when
        only the AdamW part does not fit), and an unexpected error half-way rolls both back."""
        self.check_state_dict(state_dict)
        with rollback_on_error(*self.optimizers):
            if self.normuon is not None:
                self.normuon.load_state_dict(state_dict["normuon"])
            if self.adamw is not None:
                self.adamw.load_state_dict(state_dict["adamw"])


def _build_plain(routes: Sequence[ParamRoute], st) -> NorMuonWithAuxAdamW:
    nm = [r for r in routes if r.optimizer == "normuon"]
    aux = [r for r in routes if r.optimizer == "adamw"]
    names = {id(r.param): r.name for r in routes}
    normuon = None
    if nm:
        groups = []
        for expert in (False, True):
            sel = [r for r in nm if r.is_expert_parallel == expert]
            if sel:
                groups.append(_normuon_group(sel, st, expert))
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
            **_normuon_kwargs(st),
        )
    adamw = None
    if aux:
        buckets: Dict[Tuple, List[ParamRoute]] = {}
        for r in aux:
            ov = _aux_override(r, st)
            key = (tuple(sorted(ov.items())), r.is_expert_parallel)
            buckets.setdefault(key, []).append(r)
        groups = []
        for (ov_items, expert), rs in buckets.items():
            ov = dict(ov_items)
            max_lr = ov.get("max_lr", st.lr)
            groups.append(
                {
                    "params": [r.param for r in rs],
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
    return NorMuonWithAuxAdamW(normuon, adamw, st.clip_grad, st.nan_policy, names)
