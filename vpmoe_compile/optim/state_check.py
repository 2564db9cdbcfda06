"""Checkpoint compatibility checks shared by every optimizer path (``load_state_dict``).

Loading an optimizer checkpoint of another model (another ``hidden_size``, expert width, TPA rank,
or the untransformed stock model) must be refused *before* anything changes: torch's
``Optimizer.load_state_dict`` only compares the number of groups and parameters and casts the
state without looking at shapes, and a chain of optimizers loads its parts one after the other.
So every loader here first validates the whole checkpoint against the live optimizers

* number of groups and of parameters per group,
* every saved state tensor against its parameter (NorMuon: ``momentum_buffer`` has the
  parameter's shape, ``second_moment`` ``[m, 1]`` / ``[1, n]`` / ``[E, m, 1]``..., blocks and
  layouts fit the parameter, see :meth:`.NorMuon.check_state_dict`; AdamW and other torch
  optimizers: every state tensor but ``step`` has the parameter's shape),
* Megatron wrappers: the ``fp32_from_fp16_params`` against the main parameters, after the
  same ``common_step`` / group re-ordering Megatron's loader applies,

raising :class:`StateDictMismatch` that names the first mismatching parameter (by model
parameter name where the optimizer knows it) and both shapes, and only then loads, under
:func:`rollback_on_error` (an unexpected error half-way restores every optimizer object).

Pure Python: nothing here imports Megatron or needs CUDA (the Megatron-path loader,
:func:`check_megatron_chain_state`, is duck-typed on the wrappers' attributes).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "StateDictMismatch",
    "check_optimizer_state",
    "check_megatron_chain_state",
    "rollback_on_error",
    "spread_common_step",
]


class StateDictMismatch(ValueError):
    """An optimizer checkpoint does not fit the optimizer it is loaded into (nothing was loaded)."""


def shape_of(v: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in v.shape)


def param_label(p: torch.Tensor, names: Optional[Mapping[int, str]], gi: Optional[int], pi: int) -> str:
    """``'model.param.name'`` when known, else ``group g parameter i``; always with its shape."""
    name = names.get(id(p)) if names else None
    where = f"group {gi} parameter {pi}" if gi is not None else f"parameter {pi}"
    if name is not None:
        return f"{name!r} ({where}, shape {tuple(p.shape)})"
    return f"{where} (shape {tuple(p.shape)})"


def state_parts(state_dict: Any, what: str) -> Tuple[List[Dict[str, Any]], Dict[Any, Any]]:
    """``(param_groups, state)`` of a torch optimizer state dict, checked for structure."""
    if not isinstance(state_dict, Mapping):
        raise StateDictMismatch(f"{what}: the checkpoint part is a {type(state_dict).__name__}, not a state dict")
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise StateDictMismatch(f"{what}: the checkpoint part has no 'param_groups' list / 'state' dict")
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)):
            raise StateDictMismatch(f"{what}: checkpoint group {gi} has no 'params' list")
    return list(groups), state


def param_state(state: Mapping[Any, Any], idx: Any, label: str, what: str) -> Dict[str, Any]:
    st = state.get(idx)
    if st is None:
        return {}
    if not isinstance(st, Mapping):
        raise StateDictMismatch(f"{what} {label}: the checkpoint's state is a {type(st).__name__}, not a dict")
    return dict(st)


def mismatch(what: str, label: str, key: str, expected: Sequence[int], got: Sequence[int]) -> StateDictMismatch:
    return StateDictMismatch(
        f"{what} parameter {label}: the checkpoint's {key} has shape {tuple(got)}, this optimizer "
        f"needs {tuple(expected)} (a checkpoint of another model?); nothing was loaded"
    )


def spread_common_step(state_dict: Any) -> Any:
    """A torch optimizer state dict with Megatron's ``torch_dist`` ``common_step`` (one step for
    every parameter, :mod:`.sharded_state`) turned back into per-parameter ``step`` entries, as
    Megatron's loaders do; a new dict (the caller's is not modified). Anything else (no
    ``common_step``, not a state dict) is returned as it is."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        return state_dict
    if "common_step" not in state_dict["state"]:
        return state_dict
    state = dict(state_dict["state"])
    step = state.pop("common_step")
    state = {
        k: {**v, "step": copy.deepcopy(step)} if isinstance(v, Mapping) else v for k, v in state.items()
    }
    return {**state_dict, "state": state}


def check_group_counts(
    what: str,
    groups: Sequence[Mapping[str, Any]],
    saved_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Any, Any],
    names: Optional[Mapping[int, str]],
    shape_keys: Optional[Sequence[str]],
) -> None:
    """Same number of groups and of parameters per group; the message of a count mismatch also
    names the first parameter (in order) whose saved state has another shape, or the first one
    without a counterpart."""
    if len(groups) != len(saved_groups):
        raise StateDictMismatch(
            f"{what}: the checkpoint has {len(saved_groups)} parameter groups, this optimizer "
            f"{len(groups)}; nothing was loaded"
        )
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        params, ids = group["params"], saved["params"]
        if len(params) == len(ids):
            continue
        hint = ""
        for pi, (p, idx) in enumerate(zip(params, ids)):
            st = state.get(idx)
            if not isinstance(st, Mapping):
                continue
            bad = [
                (k, v) for k, v in st.items()
                if isinstance(v, torch.Tensor) and (shape_keys is None and k != "step" or k in (shape_keys or ()))
                and shape_of(v) != tuple(p.shape)
            ]
            if bad:
                k, v = bad[0]
                hint = (
                    f"; first mismatching parameter: {param_label(p, names, gi, pi)}, the "
                    f"checkpoint's {k} there has shape {shape_of(v)}"
                )
                break
        else:
            n = min(len(params), len(ids))
            if len(params) > n:
                hint = f"; first parameter without a counterpart: {param_label(params[n], names, gi, n)}"
        raise StateDictMismatch(
            f"{what} group {gi}: the checkpoint has {len(ids)} parameters, this optimizer "
            f"{len(params)}{hint}; nothing was loaded"
        )


def check_torch_optimizer_state(
    opt: torch.optim.Optimizer, state_dict: Any, names: Optional[Mapping[int, str]], what: str = "AdamW"
) -> None:
    """A torch optimizer (AdamW, Adam, TE / apex FusedAdam...): counts, and every saved state
    tensor except ``step`` has its parameter's shape (``exp_avg``, ``exp_avg_sq``...)."""
    saved_groups, state = state_parts(state_dict, what)
    check_group_counts(what, opt.param_groups, saved_groups, state, names, None)
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        for pi, (p, idx) in enumerate(zip(group["params"], saved["params"])):
            label = param_label(p, names, gi, pi)
            for k, v in param_state(state, idx, label, what).items():
                if k == "step" or not isinstance(v, torch.Tensor):
                    continue
                if shape_of(v) != tuple(p.shape):
                    raise mismatch(what, label, k, tuple(p.shape), shape_of(v))


def check_optimizer_state(opt: Any, state_dict: Any, names: Optional[Mapping[int, str]], what: str) -> None:
    """:meth:`.NorMuon.check_state_dict` for NorMuon, :func:`check_torch_optimizer_state` else."""
    check = getattr(opt, "check_state_dict", None)
    if check is not None:
        check(state_dict, names=names)
    else:
        check_torch_optimizer_state(opt, state_dict, names, what)


@contextlib.contextmanager
def rollback_on_error(*optimizers: Any):
    """On any exception in the block, put every optimizer object back as it was: its attributes
    (torch's loader and NorMuon's bank rebuild re-bind ``param_groups``, ``state`` and the banks
    rather than mutating them) and its parameters' ``.data`` (NorMuon re-homes parameters into
    new banks; the old storage still holds the same values). References only, no copies."""
    saved = []
    for opt in optimizers:
        if opt is None:
            continue
        datas = [(p, p.data) for g in opt.param_groups for p in g["params"]]
        saved.append((opt, dict(opt.__dict__), datas))
    try:
        yield
    except BaseException:
        for opt, attrs, datas in saved:
            opt.__dict__.clear()
            opt.__dict__.update(attrs)
            for p, d in datas:
                if p.data.data_ptr() != d.data_ptr() or p.data.shape != d.shape:
                    p.data = d
        raise


# --------------------------------------------------------------------------- Megatron path
def _megatron_inner_state(wrapper: Any, part: Any, what: str) -> Tuple[Dict[str, Any], Any]:
    """The inner optimizer's state dict as Megatron's ``load_state_dict`` would hand it to the
    inner optimizer (``common_step`` spread, groups filtered / re-ordered), built on copies
    (the caller's checkpoint is not modified), and the saved ``fp32_from_fp16_params`` or None."""
    fp16 = hasattr(wrapper, "fp32_from_float16_groups")
    if not isinstance(part, Mapping):
        raise StateDictMismatch(f"{what}: the checkpoint part is a {type(part).__name__}, not a state dict")
    fp32_saved = None
    if fp16:
        key = "optimizer" if "optimizer" in part else "optimizer_state_dict"
        if key not in part:
            raise StateDictMismatch(f"{what}: the checkpoint part has no 'optimizer' state")
        inner = part[key]
        fp32_saved = part.get("fp32_from_fp16_params", part.get("fp32_from_fp16"))
    else:
        inner = part
    saved_groups, state = state_parts(spread_common_step(inner), what)
    groups = [dict(g) for g in saved_groups]
    reorder = getattr(wrapper, "_filter_and_reorder_param_groups", None)
    if reorder is not None:
        try:
            groups = reorder(wrapper.optimizer.param_groups, groups)
        except (KeyError, ValueError) as e:
            raise StateDictMismatch(f"{what}: the checkpoint's parameter groups do not match: {e}") from None
    return {"state": state, "param_groups": groups}, fp32_saved


def check_megatron_chain_state(
    chained_optimizers: Sequence[Any], state_dict: Any, names: Optional[Mapping[int, str]]
) -> None:
    """Validate a ``ChainedOptimizer`` checkpoint (one part per wrapper: a list, a dict keyed by
    position, or the part itself for a chain of one) before Megatron's loader touches anything."""
    n = len(chained_optimizers)
    if n == 1:
        parts = [state_dict]
    elif isinstance(state_dict, Mapping):
        parts = [v for _, v in sorted(state_dict.items())]
    elif isinstance(state_dict, (list, tuple)):
        parts = list(state_dict)
    else:
        raise StateDictMismatch(f"the checkpoint is a {type(state_dict).__name__}, not a chained optimizer state")
    if len(parts) != n:
        raise StateDictMismatch(
            f"the checkpoint has {len(parts)} optimizer parts, this chain {n} (NorMuon dense, "
            "NorMuon expert-parallel, then the Adam parts); nothing was loaded"
        )
    for i, (wrapper, part) in enumerate(zip(chained_optimizers, parts)):
        inner = getattr(wrapper, "optimizer", None)
        if inner is None or getattr(wrapper, "is_stub_optimizer", False):
            continue
        what = f"{'NorMuon' if hasattr(inner, 'check_state_dict') else type(inner).__name__} (chain part {i})"
        inner_sd, fp32_saved = _megatron_inner_state(wrapper, part, what)
        check_optimizer_state(inner, inner_sd, names, what)
        if fp32_saved is None:
            continue
        mains = wrapper.fp32_from_float16_groups
        if not isinstance(fp32_saved, (list, tuple)) or len(fp32_saved) != len(mains):
            raise StateDictMismatch(
                f"{what}: the checkpoint's fp32_from_fp16_params has "
                f"{len(fp32_saved) if isinstance(fp32_saved, (list, tuple)) else 'no'} groups, "
                f"this optimizer {len(mains)}; nothing was loaded"
            )
        for gi, (cur, sav) in enumerate(zip(mains, fp32_saved)):
            if len(cur) != len(sav):
                raise StateDictMismatch(
                    f"{what}: fp32_from_fp16_params group {gi} has {len(sav)} tensors in the "
                    f"checkpoint, {len(cur)} here; nothing was loaded"
                )
            for pi, (p, s) in enumerate(zip(cur, sav)):
                label = param_label(p, names, gi, pi)
                if not isinstance(s, torch.Tensor):
                    raise StateDictMismatch(
                        f"{what} parameter {label}: the checkpoint's fp32 main parameter is a "
                        f"{type(s).__name__}; nothing was loaded"
                    )
                if shape_of(s) != tuple(p.shape):
                    raise mismatch(what, label, "fp32 main parameter", tuple(p.shape), shape_of(s))


def chain_inner_optimizers(chained_optimizers: Iterable[Any]) -> List[Any]:
    return [
        o.optimizer for o in chained_optimizers
        if getattr(o, "optimizer", None) is not None and not getattr(o, "is_stub_optimizer", False)
    ]
