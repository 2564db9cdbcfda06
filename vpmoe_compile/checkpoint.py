"""Checkpoints that carry the transform: ``transform_state`` / ``restore`` and Megatron
``torch_dist`` checkpoints (``save_checkpoint`` / ``load_checkpoint``).

A transformed model's parameters (TPA factors, GRAPE frequencies, sinks, stacked experts) exist
only after ``transform``; a freshly built stock model cannot take them. So, as NVIDIA ModelOpt
stores a ``modelopt_state`` next to the weights, every checkpoint written here holds a
:func:`transform_state` in its common (rank-0, replicated) part: the config, the passes, the
kernel choices, the library / megatron-core / torch versions and the tokenizer's identity.
:func:`load_checkpoint` into a *stock* model replays that state first (:func:`restore`), so::

    model = build_stock_gpt("vpmoe-8l")                 # stock, as any Megatron script builds it
    info = vpmoe_compile.load_checkpoint("ckpt/iter_0000100", model)   # transformed + loaded

The layout of the sharded part is Megatron's own (``GPTModel.sharded_state_dict``; the ``moe``
pass maps its stacked experts to per-expert keys), so checkpoints of stock and transformed
models share their keys wherever the modules agree, and Megatron's resharding applies.

Files: :func:`save_checkpoint` writes into ``<path>.partial`` (marked as ours) and renames it to
``<path>`` when every rank is done: a checkpoint folder exists complete or not at all, and an
existing ``<path>`` is never overwritten. ``docs/design.md#checkpoints`` has the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from vpmoe_compile.compiler import bare_module

__all__ = [
    "CheckpointError",
    "STATE_KEY",
    "transform_state",
    "restore",
    "tokenizer_identity",
    "read_transform_state",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint_dir",
    "iteration_dir",
    "TRACKER_FILE",
]

#: Key of the transform state in a checkpoint's common part.
STATE_KEY = "vpmoe_transform_state"
STATE_FORMAT = "vpmoe_compile.transform_state"
STATE_VERSION = 1
#: Megatron-LM's tracker file: the last complete iteration under a ``--save`` folder.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_PARTIAL_MARKER = ".partial.vpmoe-owner"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# the transform state
# ----------------------------------------------------------------------------------------------




def _chunks(model) -> List[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def tokenizer_identity(name: str = "o200k_harmony", padded_vocab_size: Optional[int] = None) -> Dict[str, Any]:
    """The identity of the library's tokenizer ``name`` (JSON-able): name, encoding, sha256 of the
    vocabulary, padded vocabulary size, the named special-token ids and a sha256 over the whole
    special-token table (ids 199,998 ... padded size - 1)."""
    from megatron_base import o200k

    if name != o200k.ENCODING_NAME:
        raise CheckpointError(f"unknown tokenizer {name!r}: this library provides {o200k.ENCODING_NAME!r} only")
    padded = int(padded_vocab_size if padded_vocab_size is not None else o200k.O200K_HARMONY_VOCAB_SIZE)
    table = {i: f"<|reserved_{i}|>" for i in range(o200k.FIRST_SPECIAL_ID, padded)}
    table.update({i: n for n, i in o200k.SPECIAL_TOKEN_IDS.items() if i < padded})
    digest = hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest()
    return {
        "name": name,
        "encoding": o200k.ENCODING_NAME,
        "vocab_sha256": o200k.O200K_BASE_SHA256,
        "padded_vocab_size": padded,
        "special_token_ids": {"eod": o200k.EOD_ID, "bos": o200k.BOS_ID, "pad": o200k.PAD_ID,
                              **dict(sorted(o200k.SPECIAL_TOKEN_IDS.items(), key=lambda kv: kv[1]))},
        "special_table_sha256": digest,
    }


def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    import vpmoe_compile

    try:
        mcore = version("megatron-core")
    except PackageNotFoundError:  # pragma: no cover - megatron-core is a dependency
        mcore = None
    return {"vpmoe_compile": vpmoe_compile.__version__, "megatron_core": mcore, "torch": str(torch.__version__)}


def transform_state(model: nn.Module) -> Dict[str, Any]:
    """What :func:`restore` needs to replay ``transform`` on a freshly built stock model (JSON-able).

    Keys: ``format``, ``version``, ``config`` (every section of the ``VpMoEConfig``),
    ``config_source``, ``passes`` (names, in order), ``kernels`` (the resolved kernel policy's
    choices), ``versions`` (vpmoe_compile, megatron-core, torch) and ``tokenizer``
    (:func:`tokenizer_identity`).

    Args:
        model: a transformed model (bare or inside Megatron's wrappers).
    """
    bare = bare_module(model)
    record = getattr(bare, "vpmoe_transform", None)
    cfg = getattr(bare, "vpmoe_config", None)
    if record is None or cfg is None:
        raise CheckpointError(
            f"transform_state: this {type(bare).__name__} was not transformed by vpmoe_compile "
            "(no model.vpmoe_transform); call vpmoe_compile.transform(model) first"
        )
    kernels = record.kernels
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": cfg.to_dict(),
        "config_source": cfg.source,
        "passes": list(record.passes),
        "kernels": dict(vars(kernels)) if kernels is not None else None,
        "versions": _versions(),
        "tokenizer": tokenizer_identity(cfg.tokenizer.name, cfg.tokenizer.vocab_size),
    }


def _check_state(state: Any) -> Dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"not a vpmoe_compile transform state (expected a dict with format={STATE_FORMAT!r}, got "
            f"{type(state).__name__}{'' if not isinstance(state, dict) else ' with format=' + repr(state.get('format'))})"
        )
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"transform state version {state.get('version')!r} is not the {STATE_VERSION} this "
            f"vpmoe_compile {_versions()['vpmoe_compile']} reads; load it with the library version that wrote it "
            f"({(state.get('versions') or {}).get('vpmoe_compile')})"
        )
    missing = [k for k in ("config", "passes", "tokenizer") if k not in state]
    if missing:
        raise CheckpointError(f"transform state lacks {missing}; it is incomplete or was edited")
    return state


def _identity_mismatch(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    return [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _check_tokenizer(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
    diff = _identity_mismatch(saved, current)
    if diff:
        raise CheckpointError(
            f"{where} was made with another tokenizer or vocabulary (differs in {', '.join(diff)}):\n"
            f"  checkpoint: {json.dumps(saved, sort_keys=True)}\n"
            f"  this model: {json.dumps(current, sort_keys=True)}\n"
            "its embedding rows mean other tokens here; load it into a model built for that tokenizer"
        )


def _model_tokenizer(bare: nn.Module, saved: Dict[str, Any]) -> Dict[str, Any]:
    """The identity of the tokenizer the model is built for: its config's, else the saved name
    with the model's own vocabulary size."""
    cfg = getattr(bare, "vpmoe_config", None)
    if cfg is not None:
        return tokenizer_identity(cfg.tokenizer.name, cfg.tokenizer.vocab_size)
    name = saved.get("name", "o200k_harmony")
    try:
        return tokenizer_identity(name, getattr(bare, "vocab_size", None))
    except CheckpointError:
        return {"name": name, "padded_vocab_size": getattr(bare, "vocab_size", None), "known": False}


def restore(model: nn.Module, state: Dict[str, Any], *, progress: bool = False) -> nn.Module:
    """Replay a :func:`transform_state` on a freshly built stock model (in place; all or nothing).

    The state's config must describe the model (``transform`` compares them key by key) and its
    tokenizer must be this library's with the model's vocabulary size. Passes are looked up by
    name: a user pass must be registered (``vpmoe_compile.register_pass``) before ``restore``.

    Returns:
        ``model``, transformed as the state says.
    """
    from megatron_base.config import ConfigError, config_from_dict
    from vpmoe_compile.pipeline import TransformError, available_passes, transform

    state = _check_state(state)
    bare = bare_module(model)
    if bare is not model:
        raise CheckpointError(
            f"restore() got a {type(model).__name__}: replay the transform on the bare GPTModel before "
            "Megatron's DDP / Float16Module wrapping (then wrap it and build the optimizer)"
        )
    _check_tokenizer(state["tokenizer"], _model_tokenizer(bare, state["tokenizer"]), "the transform state")
    try:
        cfg = config_from_dict(state["config"], where=f"transform state ({state.get('config_source') or 'checkpoint'})")
    except ConfigError as exc:
        raise CheckpointError(f"the transform state's config is not valid here: {exc}") from None
    cfg.source = state.get("config_source") or cfg.source
    known = available_passes()
    unknown = [p for p in state["passes"] if p not in known]
    if unknown:
        raise CheckpointError(
            f"the transform state names passes {unknown} that are not registered here (registered: "
            f"{', '.join(known)}); register them with vpmoe_compile.register_pass before restoring"
        )
    backend = (state.get("kernels") or {}).get("attention")
    try:
        return transform(bare, cfg, passes=list(state["passes"]), backend=backend, progress=progress)
    except TransformError as exc:
        raise CheckpointError(f"cannot replay the checkpoint's transform on this model: {exc}") from None


def _same_transform(bare: nn.Module, state: Dict[str, Any]) -> None:
    """A transformed model takes only a checkpoint of the same transform."""
    mine = transform_state(bare)
    _check_tokenizer(state["tokenizer"], mine["tokenizer"], "the checkpoint")
    skip = {"optimizer", "meta", "kernels"}  # settings that do not shape the model
    diff = []
    for section in sorted(set(mine["config"]) | set(state["config"])):
        if section in skip:
            continue
        a, b = state["config"].get(section) or {}, mine["config"].get(section) or {}
        diff += [f"[{section}] {k}: checkpoint {a.get(k)!r} vs model {b.get(k)!r}" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
    if list(state["passes"]) != list(mine["passes"]):
        diff.append(f"passes: checkpoint {state['passes']} vs model {mine['passes']}")
    if diff:
        raise CheckpointError(
            "the checkpoint was written by another transform than this model's (" + "; ".join(diff) + "); "
            "load it into a freshly built stock model (load_checkpoint replays its transform) instead"
        )


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------


def iteration_dir(save_dir: Union[str, os.PathLike], iteration: int) -> Path:
    """Megatron-LM's name of the checkpoint of ``iteration`` under ``save_dir``."""
    return Path(save_dir) / f"iter_{int(iteration):07d}"


def resolve_checkpoint_dir(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself when it holds a checkpoint, or the latest complete iteration under it when
    it is a ``--save`` folder (Megatron-LM's ``latest_checkpointed_iteration.txt``)."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
        ck = iteration_dir(p, int(text))
        if not (ck / "metadata.json").is_file():
            raise CheckpointError(f"{tracker} names iteration {text} but {ck} is not a complete checkpoint")
        return ck
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the folder does not exist")
    raise CheckpointError(
        f"no checkpoint at {p}: it has neither metadata.json (a checkpoint folder) nor {TRACKER_FILE} "
        "(a folder of iter_* checkpoints written by save_checkpoint / `train --save`)"
    )


def read_transform_state(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The transform state in a checkpoint's common part (``None`` for a checkpoint without one,
    e.g. one of a stock model written by Megatron-LM)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(resolve_checkpoint_dir(path)))
    state = common.get(STATE_KEY)
    return _check_state(state) if state is not None else None


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def _world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast_error(msg: Optional[str]) -> None:
    """Raise on every rank when rank 0 found a problem (so no rank waits in a collective)."""
    d = _dist()
    if d and d.get_world_size() > 1:
        box = [msg]
        d.broadcast_object_list(box, src=0)
        msg = box[0]
    if msg:
        raise CheckpointError(msg)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def _model_sharded(chunks: Sequence[nn.Module], metadata: Optional[dict]) -> Dict[str, Any]:
    """Each chunk's GPTModel's sharded state dict (Megatron's DDP has none of its own: through it
    every key would gain a ``module.`` prefix that a bare model's checkpoint lacks)."""
    if len(chunks) == 1:
        return {"model": bare_module(chunks[0]).sharded_state_dict(metadata=metadata)}
    return {f"model{i}": bare_module(c).sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def _rng_sharded(state: Optional[dict]):
    """This rank's RNG states as a ShardedObject (one per rank, as Megatron-LM saves them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    d = _dist()
    world, rank = (d.get_world_size(), d.get_rank()) if d else (1, 0)
    if state is None:
        state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states() if torch.cuda.is_available() else None,
        }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(
    path: Union[str, os.PathLike],
    model: Union[nn.Module, Sequence[nn.Module]],
    optimizer: Any = None,
    scheduler: Any = None,
    iteration: Optional[int] = None,
    *,
    extra: Optional[Dict[str, Any]] = None,
    rng: bool = True,
) -> Path:
    """Write a Megatron ``torch_dist`` checkpoint of a transformed model to the new folder ``path``.

    Common part (rank 0): the :func:`transform_state` under :data:`STATE_KEY`, ``iteration``,
    the scheduler's ``state_dict`` (``opt_param_scheduler``, Megatron-LM's key) and ``extra``
    (JSON-able: e.g. consumed samples). Sharded part: ``model`` (``model0``, ``model1``, ... for
    several chunks), ``optimizer`` (its ``sharded_state_dict``) and each rank's RNG states.

    Args:
        path: the checkpoint folder; it must not exist (nothing is overwritten).
        model: the transformed model (bare or wrapped), or its chunks.
        optimizer: e.g. ``vpmoe_compile.build_optimizer(model)``'s result.
        scheduler: Megatron's ``OptimizerParamScheduler`` (anything with ``state_dict``).
        iteration: the training iteration the checkpoint is of.
        extra: more JSON-able state for the common part.
        rng: save the RNG states (restored by :func:`load_checkpoint`).

    Returns:
        ``Path(path)``. Every rank must call it (collective).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    chunks = _chunks(model)
    state = transform_state(chunks[0])
    tmp = path.with_name(path.name + ".partial")
    marker = path.with_name(path.name + _PARTIAL_MARKER)  # beside tmp: Megatron wants tmp empty
    err = None
    if _rank() == 0:
        if path.exists():
            err = f"{path} exists; save_checkpoint never overwrites: pick a new folder (e.g. iter_{iteration or 0:07d})"
        elif tmp.exists() and not marker.is_file():
            err = f"{tmp} exists and is not an unfinished checkpoint of this library; move it away first"
        else:
            if tmp.exists():  # an interrupted save of ours: its files are ours to remove
                shutil.rmtree(tmp)
            path.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"partial": str(tmp), "target": str(path), "pid": os.getpid()}))
            tmp.mkdir(parents=True)
    _broadcast_error(err)
    _barrier()
    sharded = _model_sharded(chunks, None)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        sharded["rng_state"] = _rng_sharded(None)
        sharded["rng_world_size"] = _world_size()
    sharded[STATE_KEY] = state
    sharded["iteration"] = iteration
    sharded["vpmoe_extra"] = dict(extra or {})
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _rank() == 0:
        os.rename(tmp, path)
        marker.unlink()  # atomic on one file system: the folder appears complete
    _barrier()
    return path


def load_checkpoint(
    path: Union[str, os.PathLike],
    model: Union[nn.Module, Sequence[nn.Module]],
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    rng: bool = True,
    progress: bool = False,
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or a stock Megatron ``torch_dist``
    checkpoint of an untransformed model) into ``model`` (and ``optimizer``, ``scheduler``).

    ``path`` is a checkpoint folder or a ``--save`` folder (its latest iteration is loaded).
    A bare *stock* model is transformed first with the checkpoint's :func:`transform_state`
    (build the optimizer afterwards); a transformed model must have the same transform. A
    checkpoint of another tokenizer or vocabulary is refused with both identities.

    Returns:
        ``{"path", "iteration", "extra", "transform_state", "restored", "rng_restored"}``
        (``restored``: whether the transform was replayed on ``model``; the per-rank RNG states
        are restored only at the world size they were saved at).
    """
    from megatron.core import dist_checkpointing

    ck = resolve_checkpoint_dir(path)
    chunks = _chunks(model)
    common = dist_checkpointing.load_common_state_dict(str(ck))
    state = common.get(STATE_KEY)
    restored = False
    if state is not None:
        state = _check_state(state)
        for i, chunk in enumerate(chunks):
            bare = bare_module(chunk)
            if getattr(bare, "vpmoe_transform", None) is not None:
                _same_transform(bare, state)
            elif bare is not chunk:
                raise CheckpointError(
                    f"{ck} holds a transformed model but this {type(chunk).__name__} wraps an untransformed one: "
                    "load into the bare stock GPTModel (load_checkpoint replays the transform), then wrap it "
                    "and build the optimizer; or call vpmoe_compile.restore(model, "
                    "vpmoe_compile.read_transform_state(path)) before wrapping"
                )
            else:
                if optimizer is not None:
                    raise CheckpointError(
                        "load_checkpoint must transform this stock model first, and an optimizer built before "
                        "that would hold the replaced parameters: load the model alone, then build the "
                        "optimizer and load again with it (or restore() before building it)"
                    )
                restore(bare, state, progress=progress)
                restored = True
    else:
        for chunk in chunks:
            if getattr(bare_module(chunk), "vpmoe_transform", None) is not None:
                raise CheckpointError(
                    f"{ck} has no vpmoe_compile transform state (a stock model's checkpoint?) but the model is "
                    "transformed; load it into the stock model first, then transform it"
                )
    sharded = _model_sharded(chunks, None)
    if optimizer is not None:
        if not _has_optimizer_state(_saved_keys(ck)):
            raise CheckpointError(f"{ck} has no optimizer state: load the model only (optimizer=None; "
                                  "`train --init-from` starts a new run from its weights)")
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    # RNG states are per rank: restored at the world size they were saved at, else left alone
    want_rng = rng and "rng_state" in _saved_keys(ck) and common.get("rng_world_size", 1) == _world_size()
    if want_rng:
        sharded["rng_state"] = _rng_sharded({})
    loaded = dist_checkpointing.load(sharded, str(ck))
    if len(chunks) == 1:
        bare_module(chunks[0]).load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            bare_module(c).load_state_dict(loaded[f"model{i}"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        if common.get("opt_param_scheduler") is None:
            raise CheckpointError(f"{ck} has no scheduler state; pass scheduler=None")
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if want_rng:
        _set_rng(loaded["rng_state"])
    return {
        "path": str(ck),
        "iteration": common.get("iteration"),
        "extra": common.get("vpmoe_extra") or {},
        "transform_state": state,
        "restored": restored,
        "rng_restored": bool(want_rng),
    }


def _has_optimizer_state(keys: set) -> bool:
    """Whether a checkpoint's top-level sharded keys hold optimizer state: ``optimizer.…`` (one
    optimizer, the plain path) or ``chained_<i>.optimizer.…`` (Megatron's ``ChainedOptimizer``
    prefixes each part's keys, the Megatron path)."""
    return any(k == "optimizer" or (k.startswith("chained_") and k[len("chained_"):].isdigit()) for k in keys)


def _saved_keys(ck: Path) -> set:
    """Top-level keys of the checkpoint's sharded part (from its metadata, no tensor read)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ck))
    keys = {k.split(".", 1)[0] for k in meta}
    try:
        from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

        keys |= {k.split(".", 1)[0].split("/", 1)[0] for k in load_sharded_metadata(str(ck))}
    except Exception:  # pragma: no cover - older layouts: tensors only
        pass
    return keys


def _set_rng(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None and torch.cuda.is_available():
        get_cuda_rng_tracker().set_states(state["tracker"])
