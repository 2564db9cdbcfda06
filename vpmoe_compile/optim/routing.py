"""Parameter routing: which optimizer, which logical matrices, which lr / weight decay
(docs/design.md#the-optimizer).

The role is decided by an explicit rule table (Megatron parameter name + attributes), never by
``ndim`` alone:

======================================================  ==========  =========  =================
parameter                                               optimizer   wd_mult    logical matrices
======================================================  ==========  =========  =================
``rotary_pos_emb.log_freq`` / attr ``grape_log_freq``   AdamW       0          --
attr ``is_embedding_or_output_parameter``               AdamW       1          --
``*.bias``, every 0-d / 1-d tensor (norms, sinks...)    AdamW       0          --
``*.router.weight``                                     per config  1          whole
2-D with attr ``tpa_factor_rows``                       NorMuon     1          one per row block
global ``*.linear_qkv.weight``                          NorMuon     1          per ``qkv_split``
``linear_proj`` / ``linear_fc1`` / ``linear_fc2``       NorMuon     1          whole (fc1 of a
(dense, shared expert, each SequentialMLP expert,                              gated MLP: gate
TEGroupedMLP ``weight{e}``)                                                    and up halves)
legacy ``GroupedMLP`` ``experts.weight1`` / ``weight2``  NorMuon     1          per expert (and
                                                                               gate / up), on
                                                                               strided views
3-D with attr ``expert_stack`` named                    NorMuon     1          per expert (and
``*.linear_fc1.weight`` / ``*.linear_fc2.weight``                              gate / up): each
(grouped experts ``[E, F1, h]`` / ``[E, h, F]``)                               ``p[e]`` (half)
any other 2-D or >2-D parameter                         error       --         --
======================================================  ==========  =========  =================

Every role is ``is_expert_parallel = not allreduce`` (Megatron's attribute, default ``True``).

Legacy ``GroupedMLP`` (Megatron-Core 0.16.1 ``experts.py``) stores all local experts in two 2-D
parameters: ``weight1`` ``[hidden, E * F1]`` used as ``weight1.view(E, hidden, F1)`` and
``weight2`` ``[E * ffn, hidden]`` used as ``weight2.view(E, ffn, hidden)`` (``F1 = 2 ffn`` when
gated, ``[gate | up]`` along ``F1``). Each expert's block is its ``[in, out]`` weight, so the
2-D shape mixes experts. The route carries ``layout = (E, in, out)`` and one
logical matrix per expert (``[out, in]``, the transpose of the block; gate and up separately),
see :mod:`.normuon`.

Grouped experts store all local experts of one projection in one contiguous 3-D parameter
``[E, out, in]`` marked ``expert_stack = True``: ``p[e]`` is expert ``e``'s ``[out, in]``
weight (fc1 ``[E, F1, h]``, ``F1 = 2 ffn`` with ``[gate ; up]`` rows when gated; fc2
``[E, h, ffn]``). The route's ``blocks`` apply to every ``p[e]`` (``None``, or the gate / up
halves for a gated fc1, read from ``model.config.gated_linear_unit``); :mod:`.normuon` runs the
stack as a bank in place. The routing table lists its logical matrices expert by expert
(``e0.fc1``, ``e1.fc1``... or ``e0.gate``, ``e0.up``...).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from vpmoe_compile.tensor_parallel import tp_layout

Segment = Tuple[int, int]
Blocks = Optional[Tuple[Tuple[Segment, ...], ...]]

__all__ = ["ParamRoute", "classify_parameters", "routing_table", "optimizer_settings", "RoutingError"]


class RoutingError(ValueError):
    """A parameter has no known optimizer role."""


@dataclass
class OptimizerSettings:
    """Resolved optimizer settings: the ``[optimizer]`` section of the config (its defaults and
    allowed values live in ``megatron_base.config.OptimizerSection`` only)."""

    values: Dict[str, Any]

    def __getattr__(self, item):
        try:
            return self.values[item]
        except KeyError as e:
            raise AttributeError(item) from e

    @property
    def aux_lr(self) -> float:
        return self.lr if self.normuon_aux_lr is None else self.normuon_aux_lr

    @property
    def aux_min_lr(self) -> float:
        # Fork semantics, field by field: the aux value when set, else the NorMuon one.
        return self.min_lr if self.normuon_aux_min_lr is None else self.normuon_aux_min_lr


def optimizer_settings(cfg: Any = None) -> OptimizerSettings:
    """The optimizer settings of a ``VpMoEConfig``, its ``optimizer`` section, any object with
    some of its keys, ``None`` (the defaults) or already-resolved :class:`OptimizerSettings`
    (returned as they are). Values are validated by the config's own rules."""
    if isinstance(cfg, OptimizerSettings):
        return cfg
    from megatron_base.config import optimizer_section

    return OptimizerSettings(dataclasses.asdict(optimizer_section(cfg)))


@dataclass
class ParamRoute:
    """Routing decision for one parameter."""

    name: str
    param: torch.nn.Parameter = field(repr=False)
    optimizer: str  # "normuon" | "adamw" | "frozen"
    role: str
    wd_mult: float
    blocks: Blocks = None  # NorMuon logical matrices (row segments); None -> whole matrix
    block_names: Tuple[str, ...] = ()
    is_expert_parallel: bool = False
    layout: Optional[Tuple[int, int, int]] = None  # (E, in, out) for legacy GroupedMLP storage

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def routed_expert(self) -> bool:
        """A routed expert's parameter (Megatron's ``.experts.`` names, expert stacks), whether or
        not it is expert-parallel: Megatron reduces it over the expert-data-parallel group when
        the expert-parallel size is > 1 (then ``is_expert_parallel``), with the dense ones at EP 1."""
        return self.role == "expert" or bool(getattr(self.param, "expert_stack", False)) or bool(
            _EXPERT_RE.search(self.name))


_NORM_RE = re.compile(r"(layernorm|layer_norm|final_norm|\.norm)\.(weight|bias)$")
_EXPERT_RE = re.compile(r"\.experts\.")
_FFN_RE = re.compile(r"\.linear_fc[12]\.weight\d*$")
_GROUPED_RE = re.compile(r"\.experts\.weight([12])$")
_STACK_RE = re.compile(r"\.linear_fc([12])\.weight$")


def _model_config(model: torch.nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "module"):
        cfg = getattr(model.module, "config", None)
    return cfg


def _qkv_blocks(param: torch.Tensor, name: str, mcfg, mode: str) -> Tuple[Blocks, Tuple[str, ...]]:
    if mcfg is None:
        raise RoutingError(f"{name}: a fused QKV weight needs model.config for its geometry")
    heads = mcfg.num_attention_heads
    groups = mcfg.num_query_groups or heads
    d = mcfg.kv_channels
    per_group = heads // groups
    rows_per_group = (per_group + 2) * d
    if param.shape[0] != groups * rows_per_group:
        raise RoutingError(
            f"{name}: {tuple(param.shape)} does not match the interleaved QKV layout "
            f"{groups} groups x ({per_group} q + k + v) x {d} rows (tensor parallel > 1?)"
        )
    if mode == "fused":
        return None, ("qkv",)
    if mode == "qkv":
        q = tuple((g * rows_per_group, per_group * d) for g in range(groups))
        k = tuple((g * rows_per_group + per_group * d, d) for g in range(groups))
        v = tuple((g * rows_per_group + (per_group + 1) * d, d) for g in range(groups))
        return (q, k, v), ("q", "k", "v")
    if mode == "head":
        blocks, names = [], []
        for g in range(groups):
            base = g * rows_per_group
            for h in range(per_group):
                blocks.append(((base + h * d, d),))
                names.append(f"q{g * per_group + h}")
            blocks.append(((base + per_group * d, d),))
            names.append(f"k{g}")
            blocks.append(((base + (per_group + 1) * d, d),))
            names.append(f"v{g}")
        return tuple(blocks), tuple(names)
    raise ValueError(f"qkv_split must be 'qkv', 'fused' or 'head', got {mode!r}")


def _tpa_blocks(param: torch.Tensor, name: str) -> Tuple[Blocks, Tuple[str, ...]]:
    spec = getattr(param, "tpa_factor_rows")
    blocks, names, row = [], [], 0
    for block_name, rows in spec:
        blocks.append(((row, int(rows)),))
        names.append(str(block_name))
        row += int(rows)
    if row != param.shape[0]:
        raise RoutingError(f"{name}: tpa_factor_rows sum to {row}, the weight has {param.shape[0]} rows")
    return tuple(blocks), tuple(names)


def _grouped_mlp(
    param: torch.Tensor, name: str, which: int, chunk, mcfg
) -> Tuple[Blocks, Tuple[str, ...], Tuple[int, int, int]]:
    """Per-expert logical matrices of a legacy ``GroupedMLP`` ``weight1`` / ``weight2``."""
    module = None
    try:
        module = chunk.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        pass
    cfg = mcfg if mcfg is not None else getattr(module, "config", None)
    ffn = getattr(cfg, "moe_ffn_hidden_size", None) or getattr(cfg, "ffn_hidden_size", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not ffn or not hidden:
        raise RoutingError(
            f"{name}: a GroupedMLP weight needs model.config.hidden_size and moe_ffn_hidden_size "
            "for its per-expert layout"
        )
    gated = bool(getattr(cfg, "gated_linear_unit", False))
    f1 = ffn * (2 if gated else 1)
    fin, fout = (hidden, f1) if which == 1 else (ffn, hidden)
    per_expert = fin * fout
    E = getattr(module, "num_local_experts", None)
    if E is None:
        E = param.numel() // per_expert
    expected = (hidden, E * f1) if which == 1 else (E * ffn, hidden)
    if E < 1 or tuple(param.shape) != expected:
        raise RoutingError(
            f"{name}: shape {tuple(param.shape)} does not match GroupedMLP storage {expected} "
            f"(experts {E}, hidden {hidden}, ffn {ffn}, gated {gated}; tensor parallel > 1?)"
        )
    blocks, names = [], []
    for e in range(E):
        if which == 1 and gated:
            blocks += [((e * fout, ffn),), ((e * fout + ffn, ffn),)]
            names += [f"e{e}.gate", f"e{e}.up"]
        else:
            blocks.append(((e * fout, fout),))
            names.append(f"e{e}.fc{which}")
    return tuple(blocks), tuple(names), (int(E), int(fin), int(fout))


def _expert_stack(
    param: torch.Tensor, name: str, which: int, mcfg
) -> Tuple[Blocks, Tuple[str, ...]]:
    """Per-expert blocks (``None`` or gate / up) of a 3-D ``expert_stack`` weight
    ``[E, rows, cols]`` and the names of one expert's logical matrices."""
    if which == 1 and getattr(mcfg, "gated_linear_unit", False):
        rows = int(param.shape[1])
        if rows % 2:
            raise RoutingError(
                f"{name}: a gated fc1 stack needs an even number of rows ([gate ; up]), got "
                f"{tuple(param.shape)}"
            )
        half = rows // 2
        return (((0, half),), ((half, half),)), ("gate", "up")
    return None, (f"fc{which}",)


def _named_parameters(model) -> Iterable[Tuple[str, torch.nn.Parameter]]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    seen = set()
    for ci, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (name if len(chunks) == 1 else f"chunk{ci}.{name}"), p, chunk


def _whole(p: torch.Tensor) -> torch.Tensor:
    """``p``, or under tensor parallelism a meta tensor of its one-rank shape: NorMuon's blocks
    describe the whole matrix (:mod:`.tensor_parallel` steps a whole copy of a TP-split weight)."""
    layout = tp_layout(p)
    if layout is None:
        return p
    whole = torch.empty(layout.full_shape(p.shape), device="meta")
    if hasattr(p, "tpa_factor_rows"):
        whole.tpa_factor_rows = p.tpa_factor_rows
    return whole


def classify_parameters(model, cfg: Any = None) -> List[ParamRoute]:
    """Route every parameter of ``model`` (a module or a list of model chunks) by the table above.

    Raises:
        RoutingError: naming every 2-D (or higher) parameter that matches no rule.
    """
    st = optimizer_settings(cfg)
    routes: List[ParamRoute] = []
    unknown: List[str] = []
    for name, p, chunk in _named_parameters(model):
        ep = not getattr(p, "allreduce", True)
        if not p.requires_grad:
            routes.append(ParamRoute(name, p, "frozen", "frozen", 0.0, is_expert_parallel=ep))
            continue
        if getattr(p, "grape_log_freq", False) or name.endswith("log_freq"):
            routes.append(ParamRoute(name, p, "adamw", "grape_log_freq", 0.0, is_expert_parallel=ep))
            continue
        if getattr(p, "is_embedding_or_output_parameter", False):
            role = "output" if "output_layer" in name else "embedding"
            routes.append(ParamRoute(name, p, "adamw", role, 1.0, is_expert_parallel=ep))
            continue
        if name.endswith(".bias") or p.ndim < 2:
            if name.endswith(".bias") and not _NORM_RE.search(name):
                role = "bias"
            elif _NORM_RE.search(name):
                role = "norm"
            elif name.endswith("softmax_offset"):
                role = "sink"
            else:
                role = "scalar" if p.ndim == 0 else "vector"
            routes.append(ParamRoute(name, p, "adamw", role, 0.0, is_expert_parallel=ep))
            continue
        if p.ndim == 3 and getattr(p, "expert_stack", False):
            stack = _STACK_RE.search(name)
            if stack:
                blocks, names = _expert_stack(p, name, int(stack.group(1)), _model_config(chunk))
                routes.append(ParamRoute(name, p, "normuon", "expert", 1.0, blocks, names, ep))
                continue
        if p.ndim != 2:
            unknown.append(f"{name} {tuple(p.shape)}")
            continue
        if name.endswith(".router.weight"):
            opt = st.router_optimizer
            routes.append(
                ParamRoute(name, p, opt, "router", 1.0, None, ("router",), is_expert_parallel=ep)
            )
            continue
        if hasattr(p, "tpa_factor_rows"):
            blocks, names = _tpa_blocks(_whole(p), name)
            routes.append(ParamRoute(name, p, "normuon", "tpa_factors", 1.0, blocks, names, ep))
            continue
        if name.endswith(".linear_qkv.weight"):
            blocks, names = _qkv_blocks(_whole(p), name, _model_config(chunk), st.qkv_split)
            routes.append(ParamRoute(name, p, "normuon", "qkv", 1.0, blocks, names, ep))
            continue
        if name.endswith(".linear_proj.weight"):
            routes.append(ParamRoute(name, p, "normuon", "attn_proj", 1.0, None, ("proj",), ep))
            continue
        grouped = _GROUPED_RE.search(name)
        if grouped:
            blocks, names, layout = _grouped_mlp(
                p, name, int(grouped.group(1)), chunk, _model_config(chunk)
            )
            routes.append(
                ParamRoute(name, p, "normuon", "expert", 1.0, blocks, names, ep, layout=layout)
            )
            continue
        if _FFN_RE.search(name):
            if _EXPERT_RE.search(name) and "shared_experts" not in name:
                role = "expert"
            elif "shared_experts" in name:
                role = "shared_expert"
            else:
                role = "dense_mlp"
            blocks, names = None, ("fc2",) if ".linear_fc2." in name else ("fc1",)
            mcfg = _model_config(chunk)
            if ".linear_fc1." in name and getattr(mcfg, "gated_linear_unit", False):
                if tp_layout(p) is not None:
                    raise RoutingError(
                        f"{name}: a gated fc1 split over tensor-parallel ranks interleaves each rank's gate "
                        "and up rows; NorMuon's whole-matrix TP mode does not reassemble it yet (use TP = 1 "
                        "or gated_linear_unit = false)"
                    )
                half = p.shape[0] // 2
                blocks, names = (((0, half),), ((half, half),)), ("gate", "up")
            routes.append(ParamRoute(name, p, "normuon", role, 1.0, blocks, names, ep))
            continue
        unknown.append(f"{name} {tuple(p.shape)}")
    if unknown:
        raise RoutingError(
            "no optimizer role for these parameters (add a rule in vpmoe_compile/optim/routing.py "
            "or mark them with an attribute): " + ", ".join(unknown)
        )
    return routes


def routing_table(model, cfg: Any = None) -> List[Dict[str, Any]]:
    """Routing as data for the debug dump: one dict per parameter.

    Keys: ``name``, ``shape``, ``dtype``, ``group`` ("normuon" | "adamw" | "frozen"), ``role``,
    ``lr``, ``min_lr`` (the scheduler's ``max_lr`` / ``min_lr`` of that group), ``wd`` (weight
    decay applied = ``weight_decay * wd_mult``), ``wd_mult``, ``is_expert_parallel`` and
    ``matrices``: the logical NorMuon matrices as ``[name, rows, cols]`` (empty for AdamW; for a
    3-D expert stack ``[E, ...]`` one per expert and block, named ``e{i}.{block}``).
    """
    st = optimizer_settings(cfg)
    table = []
    for r in classify_parameters(model, cfg):
        if r.optimizer == "normuon":
            lr, min_lr = st.lr, st.min_lr
            shape = r.shape[1:] if len(r.shape) == 3 else r.shape  # one expert of a stack
            cols = int(r.layout[1]) if r.layout is not None else int(shape[1])
            if r.blocks is None:
                mats = [[(r.block_names or ("matrix",))[0], int(shape[0]), cols]]
            else:
                mats = [
                    [n, int(sum(length for _, length in segs)), cols]
                    for n, segs in zip(r.block_names, r.blocks)
                ]
            if len(r.shape) == 3:
                mats = [[f"e{e}.{n}", rows, c] for e in range(r.shape[0]) for n, rows, c in mats]
        elif r.optimizer == "adamw":
            mats = []
            if r.role in ("embedding", "output") and st.decoupled_lr is not None:
                lr = st.decoupled_lr
                min_lr = st.decoupled_min_lr if st.decoupled_min_lr is not None else st.min_lr
            else:
                lr, min_lr = st.aux_lr, st.aux_min_lr
        else:
            lr = min_lr = 0.0
            mats = []
        table.append(
            dict(
                name=r.name,
                shape=list(r.shape),
                dtype=str(r.param.dtype).replace("torch.", ""),
                group=r.optimizer,
                role=r.role,
                lr=lr,
                min_lr=min_lr,
                wd=st.weight_decay * r.wd_mult if r.optimizer != "frozen" else 0.0,
                wd_mult=r.wd_mult,
                is_expert_parallel=r.is_expert_parallel,
                matrices=mats,
            )
        )
    return table
