"""Param groups and scheduler overrides built from the routes, shared by both optimizer paths.

``st`` is the resolved ``[optimizer]`` section (:func:`.routing.optimizer_settings`, re-exported
here).

* :func:`normuon_kwargs` -- the :class:`~.normuon.NorMuon` constructor arguments of a config.
* :func:`normuon_group` -- one NorMuon param group (dense or expert-parallel), carrying
  Megatron's scheduler keys (``max_lr / min_lr / wd_mult / lr_mult / is_decoupled_lr``) so that
  ``OptimizerParamScheduler`` drives it like Megatron's own groups.
* :func:`aux_override` -- the scheduler override of one AdamW parameter: the plain path buckets
  parameters by it into AdamW groups, the Megatron path turns each bucket into a
  ``config_overrides`` entry of ``get_megatron_optimizer``.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from .routing import ParamRoute, optimizer_settings  # noqa: F401  (re-exported for callers)

__all__ = ["normuon_kwargs", "normuon_group", "aux_override", "optimizer_settings"]


def normuon_kwargs(st) -> Dict[str, Any]:
    """The Polar Express / scaling / gradient-access arguments of :class:`~.normuon.NorMuon` for a
    config."""
    return dict(
        pe_steps=int(st.polar_express_steps),
        safety=float(st.polar_express_safety_factor),
        scale_mode=st.scale_mode,
        neuron_axis=st.neuron_axis,
        pe_backend=st.pe_backend,
        pe_form=st.pe_form,
        direct_grads=bool(st.direct_grads),
        merge_launches=bool(st.merge_launches),
    )


def normuon_group(routes: Sequence[ParamRoute], st, expert: bool) -> Dict[str, Any]:
    """One NorMuon param group of ``routes`` (all dense or all expert-parallel: ``expert``)."""
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


def aux_override(r: ParamRoute, st) -> Dict[str, Any]:
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
