"""Memory planner: per-rank memory of a transformed vpMoE model for candidate parallel layouts
(docs/design.md#memory-planner; ``python -m vpmoe_compile plan``).

Two halves:

* :func:`build_inventory` / :func:`inventory_from_model` -- **exact** counts, read off a
  transformed model built on the meta device (nothing allocated): every parameter's size and
  optimizer route from :func:`vpmoe_compile.optim.routing.routing_table` (the same routing the
  optimizer uses), split into replicated (non-expert) and routed-expert parameters, and the layer
  structure (TPA / QKV attention, MoE / dense MLP) and widths the activation estimate needs.
* Everything else is pure arithmetic on those numbers (no torch, no ``torch.distributed``):
  :func:`static_memory`, :func:`activation_memory`, :func:`candidate_layouts`,
  :func:`plan_memory` and the rule :func:`recommend`.

Bytes per parameter (bf16 training on the Megatron path: ``Float16Module``, DDP with
``grad_reduce_in_fp32=True``, ``Float16OptimizerWithFloat16Params``):

=====================  ======================================  ================================
what                   replicated optimizer                    distributed optimizer
=====================  ======================================  ================================
params (bf16)          2                                       2
grads (fp32 DDP buf)   4                                       4 (the buffer stays whole)
main params (fp32)     4                                       4 / D
AdamW state            8 (exp_avg + exp_avg_sq, fp32)          8 / D
NorMuon state          4 (momentum) + 4 per row (second        the same / D (whole parameters
                       moment) + 4 for 2-D matrices (the        dealt to the ranks: the
                       bank's fp32 gradient gather buffer)     layer-wise scheme, see below)
=====================  ======================================  ================================

The distributed optimizer of NorMuon is Megatron's layer-wise scheme
(:mod:`vpmoe_compile.optim.layer_wise`): whole parameters dealt to the ranks. With the model's
parameter list (``ModelInventory.items``, from :func:`inventory_from_model`) the main-param and
state bytes are those of the most loaded rank of that deal (:func:`dealt_memory`); without it,
``1 / D``.

``D`` is the data-parallel size of the parameter's group: ``world`` for replicated parameters
(TP = PP = CP = 1), ``world / EP`` (Megatron's expert-data-parallel size, expert TP = 1) for
routed experts. Routed-expert parameters on a rank are ``1 / EP`` of them.

Activations (**estimated**, per micro-batch of ``T = b * s`` tokens on a rank, no recomputation,
bf16 activations, balanced routing): the tensors saved for backward, per layer, in bytes per
token (``h`` hidden, ``H`` / ``G`` / ``d`` heads / query groups / head dim, ``F`` packed TPA
factors, ``E`` experts, ``k`` top-k, ``F1`` / ``Fa`` an MLP's fc1 rows / activation width,
``Fa = F1`` ungated, ``F1 / 2`` gated):

* norms: two RMSNorms, each input + output bf16 and the fp32 rstd: ``2 (4h + 4)``;
* TPA attention (local layers, fused op, Triton backward): factors ``2F``, q, k, v
  ``2(Hd + 2Gd)``, output ``2Hd``, lse ``4H``, QK-norm rstd ``4(H + G)``;
* QKV attention (global layers, sink attention): the fused QKV output ``2(Hd + 2Gd)`` (the
  QK-norms' inputs, v a view), normed q, k ``2(Hd + Gd)``, output ``2Hd``, lse ``4H``, rstd
  ``4(H + G)``;
* dense MLP: ``2 F1 + 2 Fa``;
* MoE: router ``9E + 12k`` (fp32 logits and scores ``[T, E]``, the aux loss's bool routing map,
  top-k probabilities fp32 and ids int64); routed experts ``k (2h + 2F1 + 4Fa + 4) + 24k`` (the
  gathered token rows, fc1 output, activation and its probability-scaled bf16 copy, the
  permuted probability, three int64 permutations); shared expert ``2 F1s + 2 Fas``;
* final norm ``4h + 4``.

On top of the saved tensors, the peak adds the LM head's backward working set (the fused head
never holds the ``[T, V]`` fp32 logits): a ``c``-token chunk's fp32 logits and bf16 gradient
``6 c V`` (``c = min(1024, T)``), the bf16 weight gradient ``2 V h`` before DDP accumulates it,
and the fp32 hidden-gradient accumulator and partial ``8 T h``; with EP > 1, one MoE layer's
all-gather dispatcher buffers ``EP T (4h + 5E)`` (transient). Not modelled: the CUDA context,
NCCL buffers, allocator fragmentation (the ``reserve``), the optimizer step's Polar Express
workspace (runs after the activations are freed).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "PlanError",
    "ParamSplit",
    "LayerSpec",
    "ModelShape",
    "ModelInventory",
    "Layout",
    "MemoryEstimate",
    "Candidate",
    "Plan",
    "GB",
    "GIB",
    "DEFAULT_RESERVE",
    "parse_memory",
    "build_inventory",
    "inventory_from_model",
    "candidate_layouts",
    "static_memory",
    "layer_activation_bytes_per_token",
    "activation_memory",
    "estimate",
    "recommend",
    "plan_memory",
]

GB = 10**9
GIB = 2**30
#: Fraction of a GPU's memory kept free for the CUDA context, NCCL buffers and fragmentation.
DEFAULT_RESERVE = 0.10

NOTES = (
    "TP and PP are not planned: tensor parallelism (train --tensor-parallel) and pipeline parallelism "
    "(train --pipeline-parallel) run on the fp32 path (CPU-tested), but the planner does not split heads "
    "or layers.",
    "distributed optimizer: optimizer state (and fp32 main params) sharded over the data-parallel group "
    "(routed experts over the expert-data-parallel group, world / EP) by whole parameters, Megatron's "
    "layer-wise scheme for Muon; the figures are the most loaded rank's of that deal. It runs "
    "on the fp32 path (CPU-tested, train --distributed-optimizer); on the bf16 GPU path it is pending, "
    "the replicated optimizer is what runs there today.",
    "EP > 1: Megatron's all-gather dispatcher in front of the grouped experts; tested on the CPU "
    "(2 gloo ranks), not yet on GPUs.",
    "activations are an estimate (no recomputation, balanced routing); parameter and optimizer bytes are "
    "exact counts of the transformed model.",
)


class PlanError(ValueError):
    """A bad planner input (GPU count, memory size, layout impossible for the config)."""


# --------------------------------------------------------------------------------------------
# Inventory (exact, from a meta-device transformed model)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSplit:
    """Parameter elements of one placement class (replicated or routed experts).

    ``normuon_2d`` are the NorMuon parameters stored as 2-D matrices (not 3-D expert stacks):
    their bank keeps an fp32 gradient gather buffer of the same size. ``second_moment`` is the
    number of NorMuon second-moment elements (one per row of every logical matrix with
    ``neuron_axis="rows"``).
    """

    total: int = 0
    normuon: int = 0
    normuon_2d: int = 0
    second_moment: int = 0
    adamw: int = 0
    frozen: int = 0

    def scaled(self, divisor: int) -> "ParamSplit":
        """The split of one of ``divisor`` equal shards (routed experts under EP)."""
        return ParamSplit(*(v // divisor for v in asdict(self).values()))


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer saves activations for.

    Args:
        attention: ``"tpa"`` (packed-factor TPA attention) or ``"qkv"`` (fused QKV + sink attention).
        mlp: ``"moe"`` or ``"dense"``.
        tpa_factors: ``F``, the packed TPA factor width (``"tpa"`` layers).
    """

    attention: str
    mlp: str
    tpa_factors: int = 0


@dataclass(frozen=True)
class ModelShape:
    """The widths the activation estimate needs (Megatron's ``TransformerConfig`` names)."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    layers: Tuple[LayerSpec, ...]
    ffn_hidden_size: int = 0
    num_moe_experts: int = 0
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    gated_linear_unit: bool = False
    head_chunk_size: Optional[int] = 1024  # fused head tokens per chunk; None: stock head


@dataclass(frozen=True)
class ParamItem:
    """One trained parameter as the distributed optimizer deals it: its optimizer part, whether
    it is a routed-expert stack, its elements and its optimizer-state bytes (for a stack: of all
    ``E`` experts)."""

    optimizer: str  # "normuon" | "adamw"
    expert: bool
    numel: int
    state_bytes: int


@dataclass(frozen=True)
class ModelInventory:
    """Exact parameter counts by placement and optimizer, plus the model's shape. ``items``
    (every trained parameter, in model order) lets :func:`static_memory` deal whole parameters
    to the ranks as the layer-wise distributed optimizer does; without them the distributed
    optimizer's shares are taken as ``1 / D``."""

    config: str
    max_sequence_length: int
    replicated: ParamSplit
    expert: ParamSplit
    shape: ModelShape
    items: Tuple[ParamItem, ...] = ()

    @property
    def total_params(self) -> int:
        return self.replicated.total + self.expert.total


_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.")


def inventory_from_model(model, cfg: Any = None, name: str = "", max_sequence_length: int = 0) -> ModelInventory:
    """Count a transformed ``GPTModel`` (any device, meta included) by optimizer route.

    The routes are :func:`~vpmoe_compile.optim.routing.routing_table`'s (role ``"expert"`` =
    routed experts); NorMuon second-moment elements come from its logical matrices (rows, or the
    larger dimension with ``neuron_axis="larger"``).
    """
    from vpmoe_compile.optim.routing import optimizer_settings, routing_table

    st = optimizer_settings(cfg)
    acc = {False: asdict(ParamSplit()), True: asdict(ParamSplit())}
    items = []
    for row in routing_table(model, cfg):
        n = math.prod(row["shape"])
        # routed experts: their weights (role "expert") and their biases, which shard with them
        expert = row["role"] == "expert" or bool(_ROUTED_EXPERT.search(row["name"]))
        a = acc[expert]
        a["total"] += n
        if row["group"] == "normuon":
            a["normuon"] += n
            sm = 0
            if len(row["shape"]) == 2:
                a["normuon_2d"] += n
            for _, rows, cols in row["matrices"]:
                sm += rows if (st.neuron_axis == "rows" or rows >= cols) else cols
            a["second_moment"] += sm
            items.append(ParamItem("normuon", expert, n, 4 * n + 4 * sm + (4 * n if len(row["shape"]) == 2 else 0)))
        elif row["group"] == "adamw":
            a["adamw"] += n
            items.append(ParamItem("adamw", expert, n, 8 * n))
        else:
            a["frozen"] += n
    mc = model.config
    layers = []
    for layer in model.decoder.layers:
        attn = layer.self_attention
        w = getattr(getattr(attn, "linear_qkv", None), "weight", None)
        if w is not None and hasattr(w, "tpa_factor_rows"):
            spec_attn, F = "tpa", int(w.shape[0])
        else:
            spec_attn, F = "qkv", 0
        layers.append(LayerSpec(spec_attn, "moe" if hasattr(layer.mlp, "router") else "dense", F))
    head = getattr(model, "output_layer", None)
    chunk = getattr(head, "lce_chunk_size", None)
    shape = ModelShape(
        hidden_size=int(mc.hidden_size),
        num_attention_heads=int(mc.num_attention_heads),
        num_query_groups=int(mc.num_query_groups or mc.num_attention_heads),
        kv_channels=int(mc.kv_channels),
        vocab_size=int(getattr(model, "vocab_size", 0) or model.embedding.word_embeddings.weight.shape[0]),
        layers=tuple(layers),
        ffn_hidden_size=int(mc.ffn_hidden_size or 0),
        num_moe_experts=int(mc.num_moe_experts or 0),
        moe_router_topk=int(mc.moe_router_topk or 0),
        moe_ffn_hidden_size=int(mc.moe_ffn_hidden_size or 0),
        moe_shared_expert_intermediate_size=int(mc.moe_shared_expert_intermediate_size or 0),
        gated_linear_unit=bool(mc.gated_linear_unit),
        head_chunk_size=int(chunk) if chunk else None,
    )
    return ModelInventory(name, int(max_sequence_length), ParamSplit(**acc[False]), ParamSplit(**acc[True]), shape,
                          tuple(items))


def build_inventory(cfg) -> ModelInventory:
    """Build the stock model of ``cfg`` (a ``VpMoEConfig``) on the meta device, transform it and
    count it (:func:`inventory_from_model`). Initialises a one-process ``torch.distributed``
    world (gloo) if none is, as ``python -m vpmoe_compile params`` does."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, init_process

    init_process()
    model = build_stock_gpt(cfg, device="meta")
    vpmoe_compile.transform(model, cfg, verify="params", progress=False)
    return inventory_from_model(model, cfg, name=cfg.source, max_sequence_length=cfg.attention.max_sequence_length)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

_UNITS = {"kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}
_MEM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*$")


def parse_memory(text: str) -> int:
    """``"80GB"`` -> 80e9 bytes, ``"80GiB"`` -> 80 * 2^30; KB/MB/GB/TB are powers of 10,
    KiB/MiB/GiB/TiB powers of 2 (case-insensitive). A unit is required."""
    m = _MEM_RE.match(str(text))
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise PlanError(
            f"cannot read GPU memory {text!r}: give a number and a unit, e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes)"
        )
    value = float(m.group(1)) * unit
    if value <= 0:
        raise PlanError(f"GPU memory must be > 0, got {text!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Layouts and memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A parallel layout of ``world`` GPUs: data parallel over all of them (TP = PP = CP = 1),
    routed experts split over ``ep`` ranks, optimizer state replicated or distributed."""

    world: int
    ep: int = 1
    distributed_optimizer: bool = False

    @property
    def dp(self) -> int:
        return self.world

    @property
    def expert_dp(self) -> int:
        return self.world // self.ep

    @property
    def optimizer(self) -> str:
        return "distributed" if self.distributed_optimizer else "replicated"


def candidate_layouts(inv: ModelInventory, gpus: int, ep: Optional[int] = None) -> List[Layout]:
    """Every ``(EP, optimizer)`` for ``gpus`` GPUs: EP divides both the experts and ``gpus``;
    the distributed optimizer only where there is more than one data-parallel rank. ``ep``
    restricts the list to that EP (an impossible one raises :class:`PlanError`)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"--gpus must be a positive integer, got {gpus!r}")
    E = inv.shape.num_moe_experts
    eps = [e for e in range(1, gpus + 1) if gpus % e == 0 and (e == 1 or (E and E % e == 0))]
    if ep is not None:
        if ep < 1:
            raise PlanError(f"--ep must be >= 1, got {ep}")
        if ep > 1 and not E:
            raise PlanError(f"--ep {ep}: config {inv.config!r} has no routed experts")
        if ep not in eps:
            raise PlanError(
                f"--ep {ep} is impossible for config {inv.config!r} on {gpus} GPUs: EP must divide both the "
                f"{E} experts and the GPU count (possible: {', '.join(map(str, eps))})"
            )
        eps = [ep]
    out = []
    for e in eps:
        out.append(Layout(gpus, e, False))
        if gpus > 1:
            out.append(Layout(gpus, e, True))
    return out


def dealt_memory(items: Sequence[ParamItem], layout: Layout) -> Tuple[int, int]:
    """``(main-param bytes, optimizer-state bytes)`` of the most loaded rank under the layer-wise
    distributed optimizer: within each optimizer part, replicated parameters are dealt over the
    ``dp`` ranks and routed-expert stacks (``1 / EP`` of each on a rank) over the ``expert_dp``
    ranks, by size, ping-pong -- the deal of :func:`vpmoe_compile.ownership.deal`, as the optimizer shards.
    The replicated and the expert maxima are added (a bound: the same rank need not carry both)."""
    from vpmoe_compile.ownership import deal as _deal

    worst = {}
    for expert, size, div in ((False, layout.dp, 1), (True, layout.expert_dp, layout.ep)):
        main = [0] * size
        opt = [0] * size
        for part in ("normuon", "adamw"):
            sel = [it for it in items if it.optimizer == part and it.expert == expert]
            for it, r in zip(sel, _deal([it.numel for it in sel], size)):
                main[r] += 4 * it.numel // div
                opt[r] += it.state_bytes // div
        totals = [m + o for m, o in zip(main, opt)]
        r = max(range(size), key=totals.__getitem__)
        worst[expert] = (main[r], opt[r])
    return worst[False][0] + worst[True][0], worst[False][1] + worst[True][1]


def static_memory(inv: ModelInventory, layout: Layout) -> Dict[str, int]:
    """Bytes per rank of params (bf16), grads (fp32), main params (fp32) and optimizer states;
    the table in the module docstring."""
    if layout.ep > 1 and inv.expert.total and inv.shape.num_moe_experts % layout.ep:
        raise PlanError(f"EP {layout.ep} does not divide the {inv.shape.num_moe_experts} experts")
    rep, exp = inv.replicated, inv.expert.scaled(layout.ep)
    d_rep = layout.dp if layout.distributed_optimizer else 1
    d_exp = layout.expert_dp if layout.distributed_optimizer else 1

    def trained(s: ParamSplit) -> int:
        return s.total - s.frozen

    def states(s: ParamSplit) -> int:
        return 8 * s.adamw + 4 * s.normuon + 4 * s.second_moment + 4 * s.normuon_2d

    if layout.distributed_optimizer and inv.items:
        main, opt = dealt_memory(inv.items, layout)
        return {
            "params": 2 * (rep.total + exp.total),
            "grads": 4 * (trained(rep) + trained(exp)),
            "main_params": main,
            "optimizer_states": opt,
        }
    return {
        "params": 2 * (rep.total + exp.total),
        "grads": 4 * (trained(rep) + trained(exp)),
        "main_params": 4 * trained(rep) // d_rep + 4 * trained(exp) // d_exp,
        "optimizer_states": states(rep) // d_rep + states(exp) // d_exp,
    }


def layer_activation_bytes_per_token(shape: ModelShape, layer: LayerSpec) -> Dict[str, int]:
    """Bytes per token one layer saves for backward, by part (module docstring formulas)."""
    h, H, G, d = shape.hidden_size, shape.num_attention_heads, shape.num_query_groups, shape.kv_channels
    gate = 2 if shape.gated_linear_unit else 1
    parts = {"norms": 2 * (4 * h + 4)}
    q, kv = H * d, G * d
    if layer.attention == "tpa":
        parts["attention"] = 2 * layer.tpa_factors + 2 * (q + 2 * kv) + 2 * q + 4 * H + 4 * (H + G)
    else:
        parts["attention"] = 2 * (q + 2 * kv) + 2 * (q + kv) + 2 * q + 4 * H + 4 * (H + G)
    if layer.mlp == "moe":
        E, k, F = shape.num_moe_experts, shape.moe_router_topk, shape.moe_ffn_hidden_size
        parts["router"] = 9 * E + 12 * k
        parts["experts"] = k * (2 * h + 2 * gate * F + 4 * F + 4) + 24 * k
        Fs = shape.moe_shared_expert_intermediate_size
        parts["shared_expert"] = 2 * gate * Fs + 2 * Fs
    else:
        F = shape.ffn_hidden_size
        parts["mlp"] = 2 * gate * F + 2 * F
    return parts


def activation_memory(shape: ModelShape, micro_batch: int, seq_len: int, ep: int = 1) -> Dict[str, int]:
    """Activation bytes of one micro-batch on a rank: ``saved`` (every layer's saved tensors and
    the final norm), ``head`` (the LM head's backward working set), ``dispatch`` (EP > 1: one
    layer's all-gather buffers) and their ``total``."""
    T = micro_batch * seq_len
    h, V = shape.hidden_size, shape.vocab_size
    per_token = sum(sum(layer_activation_bytes_per_token(shape, L).values()) for L in shape.layers)
    per_token += 4 * h + 4  # final norm
    saved = T * per_token
    if shape.head_chunk_size:
        c = min(shape.head_chunk_size, T)
        head = 6 * c * V + 2 * V * h + 8 * T * h
    else:  # stock head: bf16 logits saved, fp32 copy, softmax / gradient
        head = 10 * T * V + 2 * V * h
    has_moe = any(L.mlp == "moe" for L in shape.layers)
    dispatch = ep * T * (4 * h + 5 * shape.num_moe_experts) if ep > 1 and has_moe else 0
    return {"saved": saved, "head": head, "dispatch": dispatch, "total": saved + head + dispatch,
            "saved_per_token": per_token}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by category."""

    params: int
    grads: int
    main_params: int
    optimizer_states: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.main_params + self.optimizer_states + self.activations

    def as_dict(self) -> Dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    fits: bool

    def as_dict(self) -> Dict[str, Any]:
        L = self.layout
        return {"dp": L.dp, "ep": L.ep, "expert_dp": L.expert_dp, "optimizer": L.optimizer,
                "bytes": self.memory.as_dict(), "fits": self.fits}


def estimate(inv: ModelInventory, layout: Layout, micro_batch: int, seq_len: int) -> MemoryEstimate:
    """Per-rank bytes of ``layout`` (static memory + one micro-batch's activations)."""
    st = static_memory(inv, layout)
    act = activation_memory(inv.shape, micro_batch, seq_len, layout.ep)
    return MemoryEstimate(st["params"], st["grads"], st["main_params"], st["optimizer_states"], act["total"])


def recommend(candidates: Sequence[Candidate]) -> Tuple[Optional[Candidate], str]:
    """The rule: among candidates that fit, the smallest EP, and at equal EP the distributed
    optimizer (so EP = 1 with the distributed optimizer first, then EP = 1 replicated, then the
    smallest EP that fits). ``(None, why)`` when nothing fits."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        if not candidates:
            return None, "no candidate layouts"
        best = min(candidates, key=lambda c: c.memory.total)
        L = best.layout
        return None, (f"nothing fits; the smallest per-rank total is {best.memory.total / GIB:.1f} GiB "
                      f"(DP={L.dp}, EP={L.ep}, {L.optimizer} optimizer): use more or larger GPUs, or a smaller "
                      "micro-batch / sequence")
    best = min(fitting, key=lambda c: (c.layout.ep, not c.layout.distributed_optimizer))
    L = best.layout
    if L.ep == 1:
        why = ("data parallel only (EP=1) fits"
               + (", the distributed optimizer sharding main params and optimizer state" if L.distributed_optimizer
                  else " with the optimizer replicated"))
    else:
        why = f"nothing with EP=1 fits; EP={L.ep} is the smallest expert parallelism that does"
    return best, why


@dataclass
class Plan:
    """The planner's answer: every candidate with its per-rank bytes, and the recommendation."""

    config: str
    gpus: int
    gpu_memory: int
    reserve: float
    micro_batch: int
    seq_len: int
    inventory: ModelInventory
    candidates: List[Candidate]
    recommended: Optional[Candidate]
    reason: str
    activation: Dict[str, int] = field(default_factory=dict)
    notes: Tuple[str, ...] = NOTES

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1.0 - self.reserve))

    def as_dict(self) -> Dict[str, Any]:
        inv = self.inventory
        rec = self.recommended
        return {
            "config": self.config,
            "gpus": self.gpus,
            "gpu_memory_bytes": self.gpu_memory,
            "reserve_fraction": self.reserve,
            "usable_bytes": self.usable,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "parameters": {"total": inv.total_params, "replicated": asdict(inv.replicated),
                           "routed_experts": asdict(inv.expert)},
            "activations_ep1": self.activation,
            "candidates": [c.as_dict() for c in self.candidates],
            "recommendation": (
                {"dp": rec.layout.dp, "ep": rec.layout.ep, "expert_dp": rec.layout.expert_dp,
                 "optimizer": rec.layout.optimizer, "total_bytes": rec.memory.total, "reason": self.reason}
                if rec is not None else {"none": True, "reason": self.reason}
            ),
            "notes": list(self.notes),
        }


def plan_memory(inv: ModelInventory, gpus: int, gpu_memory: int, *, micro_batch: int = 1,
                seq_len: Optional[int] = None, reserve: float = DEFAULT_RESERVE, ep: Optional[int] = None) -> Plan:
    """Plan ``gpus`` GPUs of ``gpu_memory`` bytes each (``reserve`` of it kept free).

    ``seq_len`` defaults to the config's ``max_sequence_length`` (a longer one is refused, as
    ``train`` refuses it)."""
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise PlanError(f"--micro-batch must be >= 1, got {micro_batch!r}")
    s = seq_len if seq_len is not None else inv.max_sequence_length
    if not isinstance(s, int) or s < 1:
        raise PlanError(f"--seq-len must be >= 1, got {s!r}")
    if inv.max_sequence_length and s > inv.max_sequence_length:
        raise PlanError(f"--seq-len {s} exceeds [attention] max_sequence_length {inv.max_sequence_length} "
                        f"of config {inv.config!r}")
    if not 0.0 <= reserve < 1.0:
        raise PlanError(f"--reserve must be in [0, 1), got {reserve}")
    if gpu_memory <= 0:
        raise PlanError(f"GPU memory must be > 0, got {gpu_memory}")
    usable = gpu_memory * (1.0 - reserve)
    cands = []
    for layout in candidate_layouts(inv, gpus, ep):
        mem = estimate(inv, layout, micro_batch, s)
        cands.append(Candidate(layout, mem, mem.total <= usable))
    rec, why = recommend(cands)
    return Plan(inv.config, gpus, int(gpu_memory), reserve, micro_batch, s, inv, cands, rec, why,
                activation_memory(inv.shape, micro_batch, s, 1))
