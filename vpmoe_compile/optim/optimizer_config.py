"""Megatron's ``OptimizerConfig`` in :func:`~.build.build_optimizer` (docs/design.md#megatrons-optimizerconfig).

The ``[optimizer]`` section (``megatron_base.config.OptimizerSection``) owns every default. An
``OptimizerConfig`` (``megatron.core.optimizer.OptimizerConfig`` or a subclass, or any object
with some of its fields as attributes) overrides it field by field, **where a field is set**:
a field counts as set when its value differs from ``OptimizerConfig``'s own default (a dataclass
cannot tell an explicit default from an omitted one; ``lr`` / ``min_lr`` default to ``None``).

=============================================  =====================================================
``OptimizerConfig`` field                      effect
=============================================  =====================================================
``lr`` / ``min_lr``                            ``[optimizer] lr`` / ``min_lr``: NorMuon's max / min
                                               lr (the AdamW part keeps ``normuon_aux_lr`` /
                                               ``normuon_aux_min_lr``, which fall back to these)
``decoupled_lr`` / ``decoupled_min_lr``,       the section keys of the same name
``weight_decay``, ``adam_beta1``,
``adam_beta2``, ``adam_eps``, ``clip_grad``
``muon_momentum``                              ``normuon_momentum``
``muon_num_ns_steps``                          ``polar_express_steps``
``muon_split_qkv = False``                     ``qkv_split = "fused"``
``muon_use_nesterov = True``                   accepted (NorMuon's momentum is always Nesterov)
``optimizer`` ``"adam"`` / ``"muon"``          accepted (the non-NorMuon part is AdamW)
``bf16``, ``params_dtype``,                    Megatron path: handed to Megatron's wrappers
``config_logger_dir``                          (``bf16``: fp32 main params); plain path: refused
                                               (it steps the parameters in their own dtype)
``log_num_zeros_in_grad``, ``timers``,         both paths: ``step()`` returns the number of zero
``barrier_with_L1_time``                       gradient entries / reports to the timers
anything else set                              :class:`UnsupportedOptimizerSetup` naming every such
                                               field (fp16 and loss scaling, distributed
                                               optimizer, CPU offload, precision-aware optimizer,
                                               fp8, SGD, Megatron-Muon-only knobs ...)
=============================================  =====================================================

Only ``adam_beta2`` has a Megatron default (0.999) that differs from the section's (0.95): an
``OptimizerConfig`` holding 0.999 keeps the section's value; set ``[optimizer] adam_beta2`` for
0.999. The caller's ``OptimizerConfig`` is never modified (Megatron's muon builder sets its
``optimizer`` to ``"adam"``); the Megatron path gets a copy (:func:`megatron_optimizer_config`).

Megatron is imported only to read ``OptimizerConfig``'s defaults for an object that is not a
dataclass, and on the Megatron path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .routing import OptimizerSettings, optimizer_settings

__all__ = [
    "UnsupportedOptimizerSetup",
    "ResolvedSettings",
    "resolve_settings",
    "set_fields",
    "is_megatron_optimizer_config",
    "megatron_optimizer_config",
    "MAPPED_FIELDS",
    "RUNTIME_FIELDS",
    "MEGATRON_PATH_FIELDS",
]


class UnsupportedOptimizerSetup(ValueError):
    """The requested parallel / precision setup, or an ``OptimizerConfig`` field, is not supported
    by the NorMuon optimizer."""


#: ``OptimizerConfig`` field -> (``[optimizer]`` key, value conversion).
MAPPED_FIELDS: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "lr": ("lr", float),
    "min_lr": ("min_lr", float),
    "decoupled_lr": ("decoupled_lr", lambda v: None if v is None else float(v)),
    "decoupled_min_lr": ("decoupled_min_lr", lambda v: None if v is None else float(v)),
    "weight_decay": ("weight_decay", float),
    "adam_beta1": ("adam_beta1", float),
    "adam_beta2": ("adam_beta2", float),
    "adam_eps": ("adam_eps", float),
    "clip_grad": ("clip_grad", float),
    "muon_momentum": ("normuon_momentum", float),
    "muon_num_ns_steps": ("polar_express_steps", int),
    "muon_split_qkv": ("qkv_split", lambda v: "qkv" if v else "fused"),
}

#: Fields both paths honour at step time (not optimizer settings).
RUNTIME_FIELDS = ("log_num_zeros_in_grad", "timers", "barrier_with_L1_time")

#: Fields only Megatron's wrappers use (refused on the plain path).
MEGATRON_PATH_FIELDS = {
    "bf16": "bf16 mixed precision keeps fp32 main parameters in Megatron's "
    "Float16OptimizerWithFloat16Params; the plain path steps the parameters in their own dtype. "
    "Wrap the model in Megatron's DistributedDataParallel (vpmoe_compile.training.wrap_megatron) "
    "for the Megatron path",
    "params_dtype": "only Megatron's wrappers read it; the plain path steps the parameters in "
    "their own dtype",
    "config_logger_dir": "Megatron's config logger runs in Megatron's wrappers only",
}

_DIST = (
    "NorMuon does not support Megatron's distributed optimizer (it gives each data-parallel rank "
    "a slice of the flattened parameters, not whole matrices); use the replicated optimizer"
)
_OFFLOAD = "NorMuon does not support optimizer CPU offload"
_PRECISION_AWARE = "NorMuon does not support the precision-aware optimizer"
_FP16 = "NorMuon supports bf16 or fp32 training, not fp16 (no loss scaling)"
_LOSS_SCALE = "loss scaling is fp16's; NorMuon supports bf16 or fp32 training without it"
_FP8 = "fp8 parameters are not supported by NorMuon"

#: Fields that are refused when set, with the reason.
REFUSED_FIELDS: Dict[str, str] = {
    "fp16": _FP16,
    "loss_scale": _LOSS_SCALE,
    "initial_loss_scale": _LOSS_SCALE,
    "min_loss_scale": _LOSS_SCALE,
    "loss_scale_window": _LOSS_SCALE,
    "hysteresis": _LOSS_SCALE,
    "use_distributed_optimizer": _DIST,
    "overlap_param_gather": "distributed optimizer only; " + _DIST,
    "overlap_param_gather_with_optimizer_step": "distributed optimizer only; " + _DIST,
    "optimizer_cpu_offload": _OFFLOAD,
    "optimizer_offload_fraction": _OFFLOAD,
    "use_torch_optimizer_for_cpu_offload": _OFFLOAD,
    "overlap_cpu_optimizer_d2h_h2d": _OFFLOAD,
    "pin_cpu_grads": _OFFLOAD,
    "pin_cpu_params": _OFFLOAD,
    "use_precision_aware_optimizer": _PRECISION_AWARE,
    "store_param_remainders": _PRECISION_AWARE,
    "main_grads_dtype": _PRECISION_AWARE,
    "main_params_dtype": _PRECISION_AWARE,
    "exp_avg_dtype": _PRECISION_AWARE,
    "exp_avg_sq_dtype": _PRECISION_AWARE,
    "fp8_recipe": _FP8,
    "reuse_grad_buf_for_mxfp8_param_ag": _FP8,
    "apply_wd_to_qk_layernorm": "weight decay per parameter comes from the routing table "
    "(vpmoe_compile/optim/routing.py: norms, biases, sinks get wd_mult 0)",
    "decoupled_weight_decay": "AdamW and NorMuon weight decay are always decoupled",
    "sgd_momentum": "the non-NorMuon part is AdamW, not SGD",
    "muon_use_nesterov": "NorMuon's momentum is always Nesterov",
    "muon_scale_mode": "NorMuon's update scale is [optimizer] scale_mode ('shape': "
    "sqrt(max(1, m/n)) after the per-neuron normalisation, or 'rms0.2')",
    "muon_fp32_matmul_prec": "Polar Express runs in bf16 with fp32 accumulation on CUDA",
    "muon_tp_mode": "NorMuon needs tensor-parallel size 1 (whole matrices)",
    "muon_extra_scale_factor": "NorMuon has no extra scale factor (see [optimizer] scale_mode)",
}

_OPTIMIZER_NAMES = ("adam", "muon")


def is_megatron_optimizer_config(obj: Any) -> bool:
    """``obj`` is a ``megatron.core.optimizer.OptimizerConfig`` (or subclass) instance; checked
    by class name and module, without importing Megatron."""
    return any(
        c.__name__ == "OptimizerConfig" and c.__module__.startswith("megatron.core.optimizer")
        for c in type(obj).__mro__
    )


def _megatron_defaults() -> Dict[str, Any]:
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    return _dataclass_defaults(OptimizerConfig)


def _dataclass_defaults(cls) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    try:
        return bool(value == default)  # 1 == 1.0, torch dtypes, strings, None
    except Exception:  # pragma: no cover - exotic values
        return False


def set_fields(optimizer_config: Any) -> Dict[str, Any]:
    """The fields of ``optimizer_config`` that differ from ``OptimizerConfig``'s defaults (a
    dataclass: its own class's defaults; any other object: its attributes against
    ``megatron.core.optimizer.OptimizerConfig``'s), in field order."""
    if optimizer_config is None:
        return {}
    if dataclasses.is_dataclass(optimizer_config) and not isinstance(optimizer_config, type):
        defaults = _dataclass_defaults(type(optimizer_config))
        values = {f.name: getattr(optimizer_config, f.name) for f in dataclasses.fields(optimizer_config)}
    else:
        defaults = _megatron_defaults()
        values = {k: v for k, v in vars(optimizer_config).items() if not k.startswith("_")}
    return {
        name: value for name, value in values.items()
        if not (name in defaults and _is_default(value, defaults[name]))
    }


@dataclass
class ResolvedSettings:
    """What :func:`resolve_settings` made of a config and an ``OptimizerConfig``."""

    settings: OptimizerSettings
    #: ``[optimizer]`` keys taken from the ``OptimizerConfig`` (key -> value).
    overrides: Dict[str, Any] = field(default_factory=dict)
    #: :data:`RUNTIME_FIELDS` given (field -> value), for the plain path's step.
    runtime: Dict[str, Any] = field(default_factory=dict)
    #: Every ``OptimizerConfig`` field that was set (field -> value).
    given: Dict[str, Any] = field(default_factory=dict)


def resolve_settings(cfg: Any, optimizer_config: Any = None, path: str = "plain") -> ResolvedSettings:
    """The optimizer settings of ``cfg`` (see :func:`.routing.optimizer_settings`), overridden by
    the set fields of ``optimizer_config`` (module docstring).

    Args:
        cfg: a ``VpMoEConfig``, its ``[optimizer]`` section, any object with some of its keys, or
            ``None`` (the section's defaults).
        optimizer_config: a Megatron ``OptimizerConfig`` (or an object with some of its fields),
            or ``None``.
        path: ``"plain"`` or ``"megatron"`` (which fields apply depends on it).

    Raises:
        UnsupportedOptimizerSetup: naming every set field that does not apply, with the reason.
        ValueError: an overridden ``min_lr`` above the (overridden) ``lr``.
        megatron_base.config.ConfigError: an overridden value the section does not allow.
    """
    from megatron_base.config import optimizer_section

    base = optimizer_settings(cfg)
    if optimizer_config is None:
        return ResolvedSettings(base)
    given = set_fields(optimizer_config)
    errors: List[str] = []
    overrides: Dict[str, Any] = {}
    runtime: Dict[str, Any] = {}
    for name, value in given.items():
        if name in MAPPED_FIELDS:
            key, conv = MAPPED_FIELDS[name]
            overrides[key] = conv(value)
        elif name in RUNTIME_FIELDS:
            runtime[name] = value
        elif name in MEGATRON_PATH_FIELDS:
            if path != "megatron":
                errors.append(f"{name}={value!r} (plain path: {MEGATRON_PATH_FIELDS[name]})")
        elif name == "optimizer":
            if value not in _OPTIMIZER_NAMES:
                errors.append(
                    f"optimizer={value!r} (build_optimizer builds NorMuon + AdamW: accepted "
                    f"names are {', '.join(map(repr, _OPTIMIZER_NAMES))})"
                )
        elif name == "muon_use_nesterov" and value is True:
            continue  # NorMuon's momentum is Nesterov
        elif name in REFUSED_FIELDS:
            errors.append(f"{name}={value!r} ({REFUSED_FIELDS[name]})")
        else:
            errors.append(f"{name}={value!r} (not known to apply to NorMuon + AdamW)")
    if errors:
        raise UnsupportedOptimizerSetup(
            "build_optimizer does not support these OptimizerConfig fields: " + "; ".join(errors)
        )
    values = dict(base.values)
    values.update(overrides)
    merged = dataclasses.asdict(optimizer_section(SimpleNamespace(**values)))  # validated
    if ("lr" in overrides or "min_lr" in overrides) and merged["min_lr"] > merged["lr"]:
        raise ValueError(
            f"min_lr ({merged['min_lr']!r}) is above lr ({merged['lr']!r}) after the "
            f"OptimizerConfig's {', '.join(k for k in ('lr', 'min_lr') if k in overrides)}: the "
            "schedule decays from lr to min_lr; set OptimizerConfig.min_lr (or [optimizer] min_lr)"
        )
    return ResolvedSettings(OptimizerSettings(merged), overrides, runtime, given)


def megatron_optimizer_config(chunks: Sequence[torch.nn.Module], st, optimizer_config: Any = None):
    """The ``OptimizerConfig`` handed to Megatron on the Megatron path: the resolved settings
    ``st`` (lr, min_lr, decoupled lrs, weight decay, Adam betas / eps, clip_grad), ``optimizer =
    "adam"`` (the AdamW part, as Megatron's muon builder does) and, from ``optimizer_config`` when
    set, ``bf16`` / ``params_dtype`` (else: bf16 when any parameter is bf16) and the fields
    Megatron's wrappers read at step time. A copy: ``optimizer_config`` is left as it is."""
    from megatron.core.optimizer import OptimizerConfig

    bf16 = any(p.dtype == torch.bfloat16 for c in chunks for p in c.parameters())
    given = set_fields(optimizer_config)
    values = dict(
        optimizer="adam",
        lr=st.lr,
        min_lr=st.min_lr,
        decoupled_lr=st.decoupled_lr,
        decoupled_min_lr=st.decoupled_min_lr,
        weight_decay=st.weight_decay,
        adam_beta1=st.adam_beta1,
        adam_beta2=st.adam_beta2,
        adam_eps=st.adam_eps,
        clip_grad=st.clip_grad,
        bf16=bool(given.get("bf16", bf16)),
        params_dtype=given.get("params_dtype", torch.bfloat16 if bf16 else torch.float32),
        use_distributed_optimizer=False,
    )
    for name in RUNTIME_FIELDS + ("config_logger_dir",):
        if name in given:
            values[name] = given[name]
    if is_megatron_optimizer_config(optimizer_config):
        return dataclasses.replace(optimizer_config, **values)
    return OptimizerConfig(**values)
