"""The plain optimizer path: :class:`NorMuonWithAuxAdamW` (NorMuon + ``torch.optim.AdamW``).

Used by :func:`~.build.build_optimizer` for anything that is not a Megatron-DDP-wrapped model
(a bare ``nn.Module``, CPU tests, the CPU demo). Same routing, groups (incl. Megatron scheduler
keys ``max_lr / min_lr / wd_mult``), global grad-norm clipping, NaN policy and
``step() -> (ok, grad_norm, None)`` contract as the Megatron path; ``torch.compile`` of the
NorMuon bank step (and ``cuda_graph``) is used only when the parameters are on CUDA (Inductor
on a CPU takes minutes). Pure torch: nothing here imports Megatron.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .grad_norm import local_grad_norm, nonfinite_param_names
from .normuon import NorMuon
from .param_groups import aux_override, normuon_group, normuon_kwargs
from .routing import ParamRoute
from .state_check import StateDictMismatch, check_optimizer_state, rollback_on_error

__all__ = ["NorMuonWithAuxAdamW", "build_plain_optimizer"]


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


def build_plain_optimizer(routes: Sequence[ParamRoute], st) -> NorMuonWithAuxAdamW:
    """The plain path of :func:`~.build.build_optimizer`: NorMuon (dense and expert-parallel
    groups) + one ``torch.optim.AdamW`` whose groups bucket the AdamW parameters by
    :func:`~.param_groups.aux_override`; ``torch.compile`` / CUDA graphs of the NorMuon step only
    when its parameters are on CUDA."""
    nm = [r for r in routes if r.optimizer == "normuon"]
    aux = [r for r in routes if r.optimizer == "adamw"]
    names = {id(r.param): r.name for r in routes}
    normuon = None
    if nm:
        groups = []
        for expert in (False, True):
            sel = [r for r in nm if r.is_expert_parallel == expert]
            if sel:
                groups.append(normuon_group(sel, st, expert))
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
            ov = aux_override(r, st)
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
