"""Optimizer state in Megatron's ``torch_dist`` sharded form, shared by both optimizer paths.

Every state tensor shards like its parameter (``optim_state_to_sharding_state``, keys
``optimizer.state.<state key>.<model key>``), except NorMuon's second moment, whose reduced axis
is collapsed (:func:`second_moment_sharded`); per-parameter ``step`` entries become one
``common_step`` (Megatron's convention, restored by the loaders with
:func:`~.state_check.spread_common_step`); the groups' per-parameter entries are the loading
optimizer's own (``LocalNonpersistentObject``), so a checkpoint loads at another data-parallel
layout of the layer-wise distributed optimizer.

Megatron's ``dist_checkpointing`` is imported when a function here is called, not at import.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

import torch

__all__ = ["SECOND_MOMENT_KEY", "second_moment_sharded", "optimizer_state_to_sharded"]

SECOND_MOMENT_KEY = "second_moment"
#: NorMuon param-group entries with one item per parameter of the group.
PER_PARAM_GROUP_KEYS = ("blocks", "layouts")


def second_moment_sharded(sh_param, v: torch.Tensor, prefix: str):
    """ShardedTensor of a second moment: the param's, with the reduced axis collapsed to 1.

    Every axis on which ``v`` has size 1 and the parameter does not gets global size 1, offset 0
    and fragmentation 1; the others keep the parameter's sharding. So ``[m, 1]`` of an
    ``[m, n]`` weight (``[1, n]`` for column statistics) and ``[E, m, 1]`` of a 3-D expert stack
    ``[E, m, n]``, whose one ShardedTensor has global shape ``[*prepended, E_global, m, n]`` with
    the local experts at offset ``ep_rank * E`` on the expert axis: the second moment keeps that
    expert axis and becomes ``[*prepended, E_global, m, 1]``.

    Args:
        sh_param: the model's ShardedTensor of the parameter (a factory is refused, except the
            TPA factor-block split, :mod:`vpmoe_compile.checkpoint_tp`).
        v: the local second moment, the parameter's local shape with the reduced axis 1.
        prefix: key prefix (``optimizer.state.second_moment``).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from vpmoe_compile.checkpoint_tp import FactorBlocksFactory

    if isinstance(sh_param, FactorBlocksFactory):
        # the TPA factor weight's blocks are cut from the first axis: ``[F, 1]`` splits like ``[F, h]``
        if v.dim() != 2 or v.shape[1] != 1:
            raise ValueError(f"{sh_param.key}: a TPA factor weight's second moment is [F, 1], got {tuple(v.shape)}")
        return replace(sh_param, key=f"{prefix}.{sh_param.key}", data=v)
    if isinstance(sh_param, ShardedTensorFactory):
        raise NotImplementedError(
            f"{sh_param.key}: NorMuon second moments of factory-sharded params (gated MLP fc1, "
            "legacy GroupedMLP weight1/weight2) are not supported in the torch_dist format; "
            "use the legacy torch checkpoint format, SequentialMLP / TEGroupedMLP experts or "
            "grouped experts (3-D expert stacks, one ShardedTensor per stack)"
        )
    local = tuple(v.shape)
    pre = sh_param.prepend_axis_num
    gshape = list(sh_param.global_shape)
    goff = list(sh_param.global_offset)
    frag = list(sh_param.axis_fragmentations) if sh_param.axis_fragmentations else None
    for ax, (lv, lp) in enumerate(zip(local, sh_param.local_shape)):
        if lv != lp:
            if lv != 1:
                raise ValueError(f"second moment {local} vs param {sh_param.local_shape}")
            gshape[pre + ax] = 1
            goff[pre + ax] = 0
            if frag is not None:
                frag[pre + ax] = 1
    sh = replace(
        sh_param,
        key=f"{prefix}.{sh_param.key}",
        data=v,
        dtype=v.dtype,
        local_shape=local,
        global_shape=tuple(gshape),
        global_offset=tuple(goff),
        axis_fragmentations=tuple(frag) if frag is not None else None,
    )
    sh.validate_metadata_integrity()
    return sh


def optimizer_state_to_sharded(opt_sd: Dict[str, Any], id_map: Dict[int, Any]) -> None:
    """In place: every state tensor of a torch optimizer ``state_dict`` like Adam's moments,
    except NorMuon's second moment, which gets the parameter's ShardedTensor with the reduced
    axis collapsed; per-param ``step`` is replaced by one ``common_step`` (Megatron's
    convention); the groups' ``params`` become ``LocalNonpersistentObject`` (taken from the
    loading optimizer, not the checkpoint).

    Args:
        opt_sd: ``optimizer.state_dict()`` (its state tensors are not copied).
        id_map: optimizer state id -> the model's ShardedTensor of that parameter
            (``get_param_id_to_sharded_param_map``).
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.dist_checkpointing.optimizer import optim_state_to_sharding_state

    from megatron_base import compat

    step = compat.common_per_param_step(opt_sd)
    vs = {}
    state = {}
    for pid, st in opt_sd["state"].items():
        st = dict(st)
        if SECOND_MOMENT_KEY in st:
            vs[pid] = st.pop(SECOND_MOMENT_KEY)
        state[pid] = st
    opt_sd["state"] = state
    optim_state_to_sharding_state(opt_sd, id_map, exclude_keys=("step",))
    for pid, v in vs.items():
        opt_sd["state"][pid][SECOND_MOMENT_KEY] = second_moment_sharded(
            id_map[pid], v, prefix=f"optimizer.state.{SECOND_MOMENT_KEY}"
        )
    if step:
        opt_sd["state"]["common_step"] = step
    # NorMuon's per-parameter group metadata is the loading optimizer's own, like ``params``: it
    # lists the parameters a rank optimises, which differ between data-parallel layouts under the
    # layer-wise distributed optimizer (the state tensors' shapes are checked through their keys)
    for group in opt_sd["param_groups"]:
        for key in PER_PARAM_GROUP_KEYS:
            if key in group and not isinstance(group[key], LocalNonpersistentObject):
                group[key] = LocalNonpersistentObject(group[key])
