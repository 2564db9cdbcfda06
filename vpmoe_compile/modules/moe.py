"""Grouped MoE: stacked expert weights, a sparse top-k router and sort-based dispatch.

Installed by the ``moe`` pass (``passes/moe.py``) in place of Megatron-Core's local-spec MoE
layer, whose ``SequentialMLP`` keeps one module (two 2-D weights) per expert and loops over
them, and whose all-gather dispatcher builds a dense ``[T, E]`` mask and copies the per-expert
token counts to the host. Three drop-in pieces, each keeping the stock call signature:

* :class:`GroupedExperts` — the experts module. **One stacked weight per projection**:
  ``linear_fc1.weight [E, F1, h]`` and ``linear_fc2.weight [E, h, F]`` (``F1 = 2F`` when gated,
  ``[gate; up]`` rows as Megatron's gated fc1); slice ``e`` is expert ``e``'s ``[out, in]``
  weight, bit-identical to stock ``local_experts.e.linear_fcX.weight``. Its forward is the
  Megatron experts interface ``(permuted_hidden [M, h], tokens_per_expert [E],
  permuted_probs [M]) -> (out [M, h], None)`` (so it also works behind Megatron's own
  dispatchers, e.g. all-to-all under expert parallelism), computed as two grouped GEMMs
  (:func:`vpmoe_compile.ops.grouped_mm.grouped_mm`) around the activation scaled by the routing
  probability. ``sharded_state_dict`` writes exactly the stock per-expert checkpoint layout
  (global key ``…experts.experts.linear_fc1.weight`` of global shape ``[E_global, F1, h]``,
  experts on axis 0), so ``torch_dist`` checkpoints move between stock and transformed models;
  a plain stock ``state_dict`` (per-expert keys) also loads.
* :class:`SparseTopKRouter` — Megatron's ``TopKRouter`` (same parameters and buffers, same
  ``forward``) plus :meth:`~SparseTopKRouter.route`, which returns the top-k as ``[T, k]``
  probabilities and expert ids instead of dense ``[T, E]`` maps, with the same score function,
  group-limited top-k, scaling factor, expert bias, z-loss and (sequence / global) auxiliary
  losses — the last two attached through a dynamo-traceable equivalent of Megatron's
  ``MoEAuxLossAutoScaler`` (same gradient, same ``set_loss_scale`` scale).
* :class:`GroupedMoELayer` — a ``MoELayer`` whose forward, for expert- and tensor-parallel size
  1, routes, sorts the ``T·k`` (token, expert) pairs by expert on the device (static shapes,
  no host sync), runs :class:`GroupedExperts`, combines with a deterministic gather-and-sum and
  adds the shared expert. Otherwise (expert parallelism, padding masks, partial CUDA-graph
  capture) it runs the stock ``MoELayer.forward`` with Megatron's dispatcher in front of the
  same grouped experts.

Shapes: hidden ``[s, b, h]``, ``T = s·b`` tokens, ``k`` = top-k, ``E`` experts (local),
``F`` expert ffn size.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    group_limited_topk,
    router_gating_linear,
    get_moe_layer_wise_logging_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from megatron_base import compat
from vpmoe_compile.kernels import KernelPolicy
from vpmoe_compile.ops.grouped_mm import grouped_mm

__all__ = [
    "GroupedExperts",
    "GroupedMoELayer",
    "SparseTopKRouter",
    "StackedExpertWeight",
    "attach_aux_loss",
    "sort_by_expert",
]


# --------------------------------------------------------------------------------------------
# Auxiliary-loss attachment (MoEAuxLossAutoScaler, traceable)
# --------------------------------------------------------------------------------------------


class _AuxLossScaler(torch.autograd.Function):
    """Identity on ``activation`` whose backward also sends ``scale`` as the gradient of
    ``aux_loss`` — Megatron's ``MoEAuxLossAutoScaler`` with the scale passed in as a tensor
    (Megatron reads it from a class attribute inside ``backward``, which TorchDynamo cannot
    trace)."""

    @staticmethod
    def forward(ctx, activation: Tensor, aux_loss: Tensor, scale: Tensor) -> Tensor:
        # the scale is read when backward runs, as Megatron reads it: its schedules set it in
        # place after the forward (so it is kept on ctx, outside the saved-tensor version check)
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, ctx.scale.reshape(()).expand(ctx.aux_shape).clone(), None


def attach_aux_loss(activation: Tensor, aux_loss: Tensor) -> Tensor:
    """``activation`` unchanged; in backward ``aux_loss`` receives Megatron's main-loss scale
    (``MoEAuxLossAutoScaler.set_loss_scale``) as its gradient."""
    return _AuxLossScaler.apply(activation, aux_loss, compat.moe_aux_loss_scale(activation.device))


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


class SparseTopKRouter(TopKRouter):
    """Megatron's ``TopKRouter`` with a sparse :meth:`route` (see module docstring).

    Built from a stock router by :meth:`from_stock`, which adopts its parameters and buffers
    (``weight``, ``expert_bias``, ``local_tokens_per_expert`` — the counts
    ``finalize_model_grads`` reads for the aux-loss-free bias update) and its configuration.
    """

    @classmethod
    def from_stock(cls, stock: TopKRouter) -> "SparseTopKRouter":
        obj = cls.__new__(cls)
        obj.__dict__.update(_copy_module_dict(stock))
        obj.set_layer_number(stock.layer_number)
        return obj

    def set_layer_number(self, layer_number: Optional[int]) -> None:
        """Also keeps the layer's aux-loss tracker slot as a tensor (``layer_index``), so that
        compiled layers do not specialise on the layer number (one graph for all layers)."""
        super().set_layer_number(layer_number)
        device = self.weight.device
        index = torch.tensor([(layer_number or 1) - 1], dtype=torch.long, device=device)
        self.register_buffer("layer_index", index, persistent=False)
        self.log_aux_losses = layer_number is not None

    def _log_aux_loss(self, name: str, value: Tensor, reduce_group=None, reduce_group_has_dp: bool = False) -> None:
        """Megatron's ``save_to_aux_losses_tracker`` (add ``value`` to this layer's slot of the
        per-layer aux-loss log that ``track_moe_metrics`` reduces and prints), indexing the slot
        with ``layer_index``."""
        if not self.log_aux_losses:
            return
        tracker = get_moe_layer_wise_logging_tracker()
        if name not in tracker:
            tracker[name] = self._tracker_entry(value.device)
        entry = tracker[name]
        entry["values"].index_add_(0, self.layer_index, value.detach().reshape(1).to(entry["values"].dtype))
        entry["reduce_group"] = reduce_group
        entry["avg_group"] = None
        entry["reduce_group_has_dp"] = reduce_group_has_dp

    def aux_loss_names(self) -> Tuple[str, ...]:
        """Names of the aux-loss tracker entries this router writes (Megatron's names)."""
        names = [n for t, n in (("aux_loss", "load_balancing_loss"), ("seq_aux_loss", "seq_load_balancing_loss"),
                                ("global_aux_loss", "global_load_balancing_loss")) if self.get_aux_loss_coeff(t) > 0]
        if self.config.moe_z_loss_coeff is not None:
            names.append("z_loss")
        return tuple(names)

    def prime_for_compile(self) -> None:
        """Create what the first forward would create (tracker entries, fp32 expert bias, the
        aux-loss scale), so a compiled forward never mutates global structure and is not
        recompiled at the second step."""
        compat.router_fp32_expert_bias(self)
        device = self.weight.device
        compat.prime_moe_aux_loss_scale(device)
        if self.log_aux_losses:
            tracker = get_moe_layer_wise_logging_tracker()
            for name in self.aux_loss_names():
                entry = tracker.setdefault(name, self._tracker_entry(device))
                for key, value in self._tracker_entry(device).items():
                    entry.setdefault(key, value)

    def _tracker_entry(self, device) -> dict:
        """A Megatron aux-loss tracker entry with every key its writers set."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        return {"values": torch.zeros(num_layers, device=device), "reduce_group": None,
                "avg_group": None, "reduce_group_has_dp": False}

    # ---- traceable replacements of the two places that use MoEAuxLossAutoScaler ---------------
    def attach_and_log_load_balancing_loss(
        self,
        activation: Tensor,
        aux_loss_coeff: float,
        aux_loss: Tensor,
        aux_loss_name: str,
        reduce_group,
        reduce_group_has_dp: bool = False,
        valid_token_count=None,
    ) -> Tensor:
        """As ``TopKRouter.attach_and_log_load_balancing_loss`` (log to Megatron's aux-loss
        tracker, scale by the token count for per-token loss), attached with
        :func:`attach_aux_loss`."""
        self._log_aux_loss(aux_loss_name, aux_loss / aux_loss_coeff, reduce_group, reduce_group_has_dp)
        if self.calculate_per_token_loss:
            num_tokens = valid_token_count if valid_token_count is not None else activation.shape[0]
            return attach_aux_loss(activation, aux_loss * num_tokens)
        return attach_aux_loss(activation, aux_loss)

    def apply_z_loss(self, logits: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """As ``TopKRouter.apply_z_loss``, attached with :func:`attach_aux_loss`."""
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        coeff = coeff / self.tp_cp_group.size()
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        if self.calculate_per_token_loss:
            num_tokens = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
            logits = attach_aux_loss(logits, z_loss * num_tokens)
        else:
            logits = attach_aux_loss(logits, z_loss)
        self._log_aux_loss("z_loss", z_loss / coeff)
        return logits

    # ---- sparse routing -------------------------------------------------------------------
    def _select(self, scores: Tensor, num_tokens: int) -> Tuple[Tensor, Tensor]:
        cfg = self.config
        if cfg.moe_router_group_topk:
            return group_limited_topk(
                scores, self.topk, num_tokens, cfg.num_moe_experts, cfg.moe_router_num_groups,
                cfg.moe_router_group_topk,
            )
        return torch.topk(scores, k=self.topk, dim=1)

    def topk_sparse(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Megatron's ``topk_routing_with_score_function`` for ``logits [T, E]``, returning
        ``(probs [T, k], expert ids [T, k] int64)`` instead of dense ``[T, E]`` maps."""
        cfg = self.config
        T = logits.shape[0]
        if self.score_function == "softmax":
            if cfg.moe_router_pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                probs, idx = self._select(scores, T)
            else:
                scores, idx = self._select(logits, T)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        elif self.score_function == "sigmoid":
            scores = torch.sigmoid(logits.float()).type_as(logits)
            if self.expert_bias is not None:
                _, idx = self._select(scores + self.expert_bias, T)
                scores = torch.gather(scores, dim=1, index=idx).type_as(logits)
            else:
                scores, idx = self._select(scores, T)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else scores
        else:
            raise ValueError(f"unsupported moe_router_score_function {self.score_function!r}")
        if cfg.moe_router_topk_scaling_factor:
            probs = probs * cfg.moe_router_topk_scaling_factor
        return probs, idx

    def route(self, hidden: Tensor) -> Tuple[Tensor, Tensor]:
        """Gating, top-k and auxiliary losses of ``hidden [s, b, h]``.

        Returns:
            ``probs [T, k]`` (router dtype, aux losses attached) and ``idx [T, k]`` int64.
            The expert-bias token counts are added by :meth:`count_tokens` (the dispatch has
            them already).
        """
        if not torch.compiler.is_compiling():
            compat.router_fp32_expert_bias(self)  # Float16Module casts buffers to bf16
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, hidden.dtype)
        logits = router_gating_linear(hidden, self.weight, self.bias, router_dtype)
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        probs, idx = self.topk_sparse(logits)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            routing_map, scores = compute_routing_scores_for_aux_loss(logits, self.topk, self.score_function)
            probs = compat.router_apply_aux_losses(
                self, probs, scores, routing_map, seq_length, bsz
            )
        return probs, idx

    def count_tokens(self, tokens_per_expert: Tensor) -> None:
        """``local_tokens_per_expert += tokens_per_expert`` (training with grad, expert bias on),
        as ``TopKRouter._apply_expert_bias``; ``finalize_model_grads`` reads and resets it."""
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                self.local_tokens_per_expert += tokens_per_expert


# --------------------------------------------------------------------------------------------
# Dispatch: sort the T*k (token, expert) pairs by expert
# --------------------------------------------------------------------------------------------


def sort_by_expert(idx: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the ``T·k`` (token, expert) pairs of ``idx [T, k]`` by expert, on the device.

    Returns:
        ``order [T·k]`` (pair index of each sorted row; pairs of one expert keep token order, as
        Megatron's permutation), ``inv [T·k]`` (its inverse), ``counts [E]`` int32 rows per
        expert, ``offs [E]`` int32 cumulative row ends (the grouped GEMM's offsets). Static
        shapes, no host synchronisation.
    """
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = torch.zeros(num_experts, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return order, inv, counts, offs


class _ToExperts(torch.autograd.Function):
    """``x [T, h] -> x[src] [T·k, h]`` (each token once per chosen expert, in sorted order).
    Backward gathers through the inverse permutation and sums the k copies (no atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        T = inv.numel() // ctx.k
        return grad.index_select(0, inv).view(T, ctx.k, -1).sum(1), None, None, None


class _FromExperts(torch.autograd.Function):
    """``y [T·k, h] (sorted) -> [T, h]``: back to pair order, sum over each token's k experts.
    The adjoint of :class:`_ToExperts`."""

    @staticmethod
    def forward(ctx, y: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(src)
        T = inv.numel() // k
        return y.index_select(0, inv).view(T, k, -1).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (src,) = ctx.saved_tensors
        return grad.index_select(0, src), None, None, None


class _Permute(torch.autograd.Function):
    """``v[order]`` with backward ``g[inv]`` (a permutation: a gather both ways)."""

    @staticmethod
    def forward(ctx, v: Tensor, order: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return v.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------


class StackedExpertWeight(torch.nn.Module):
    """Holds one stacked expert weight ``[E, out, in]`` as ``.weight`` (the parameter then has
    the stock checkpoint name ``…experts.linear_fc1.weight``) and, with linear biases, the
    stacked bias ``[E, out]`` as ``.bias``."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight
        self.bias: Optional[torch.nn.Parameter] = None

    def extra_repr(self) -> str:
        E, out, inp = self.weight.shape
        return f"experts={E}, out={out}, in={inp}"


_LOCAL_KEY = re.compile(r"^local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias|_extra_state)$")


class GroupedExperts(MegatronModule):
    """All local experts as two stacked weights and two grouped GEMMs (see module docstring).

    Args:
        config: the experts' ``TransformerConfig`` (``ffn_hidden_size`` = the expert ffn size).
        weight1: ``[E, F1, h]`` stacked fc1 weight; weight2: ``[E, h, F]`` stacked fc2 weight.
        ep_group, tp_group, dp_group: expert-parallel, expert-tensor-parallel and
            expert-data-parallel groups (checkpoint sharding: global expert index, replica id).
        backend: ``grouped_mm`` backend (``"auto"`` or ``"reference"``).
    """

    def __init__(self, config, weight1: torch.nn.Parameter, weight2: torch.nn.Parameter, *,
                 ep_group, tp_group, dp_group, backend: str = "auto"):
        super().__init__(config=config)
        E = weight1.shape[0]
        if weight2.shape[0] != E or weight1.shape[2] != weight2.shape[1]:
            raise ValueError(f"stacked weights do not match: fc1 {tuple(weight1.shape)}, fc2 {tuple(weight2.shape)}")
        self.num_local_experts = E
        self.linear_fc1 = StackedExpertWeight(weight1)
        self.linear_fc2 = StackedExpertWeight(weight2)
        self.ep_group, self.tp_group, self.dp_group = ep_group, tp_group, dp_group
        self.backend = backend

    @classmethod
    def from_sequential(cls, stock, backend: str = "auto") -> "GroupedExperts":
        """Stack the weights of a stock ``SequentialMLP`` (new tensors, same values, the stock
        parameters' attributes plus ``expert_stack = True``)."""
        experts = list(stock.local_experts)
        stacked = []
        for name in ("linear_fc1", "linear_fc2"):
            weights = [getattr(e, name).weight for e in experts]
            p = torch.nn.Parameter(torch.stack([w.detach() for w in weights]), requires_grad=weights[0].requires_grad)
            for key, value in weights[0].__dict__.items():
                setattr(p, key, value)
            p.expert_stack = True
            if stock.config.sequence_parallel and stock.tp_group.size() == 1 and getattr(p, "allreduce", True):
                # Sequence parallelism at expert-parallel size 1: each TP rank routes its own slice
                # of the sequence through the same (whole) experts, so their gradient must be summed
                # over the TP ranks too. Megatron marks expert weights for its expert-data-parallel
                # reduction (which spans the TP ranks at expert-TP 1) only when EP > 1; mark them
                # here so DDP reduces them over that group (at EP 1 it is data x tensor parallel).
                p.allreduce = False
            stacked.append(p)
        return cls(stock.config, stacked[0], stacked[1], ep_group=stock.ep_group,
                   tp_group=stock.tp_group, dp_group=stock.dp_group, backend=backend)

    # ---- compute ------------------------------------------------------------------------------
    def _activation(self, h1: Tensor) -> Tensor:
        cfg = self.config
        if cfg.gated_linear_unit:
            gate, up = torch.chunk(h1, 2, dim=-1)
            if (val := getattr(cfg, "activation_func_clamp_value", None)) is not None:
                gate = gate.clamp(min=None, max=val)
                up = up.clamp(min=-val, max=val)
            return cfg.activation_func(gate) * (up + getattr(cfg, "glu_linear_offset", 0.0))
        return cfg.activation_func(h1)

    def add_biases(self) -> int:
        """Create the stacked biases ``linear_fc1.bias [E, F1]`` and ``linear_fc2.bias [E, h]``
        (zeros, the weights' dtype, device and reduction attributes) where absent; returns how
        many were added (the linear-bias pass)."""
        n = 0
        for lin in (self.linear_fc1, self.linear_fc2):
            if lin.bias is None:
                w = lin.weight
                b = torch.nn.Parameter(torch.zeros(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device))
                b.allreduce = getattr(w, "allreduce", True)
                lin.bias = b
                n += 1
        return n

    def compute(self, x: Tensor, offs: Tensor, probs: Tensor) -> Tensor:
        """``x [M, h]`` rows sorted by expert, ``offs [E]`` int32 row ends on the device,
        ``probs [M]`` -> ``[M, h]``: ``fc2(act(fc1(x) + b1) * prob) + prob * b2`` per row,
        probability applied before fc2 and rounded to ``x.dtype`` there, as Megatron's expert MLP
        (whose fc2 bias is scaled by the probability too); the biases only with linear biases.
        Each row's expert is found from ``offs`` on the device (``searchsorted``: static shapes)."""
        b1, b2 = self.linear_fc1.bias, self.linear_fc2.bias
        eid = None
        if b1 is not None or b2 is not None:
            rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
            eid = torch.searchsorted(offs, rows, right=True)
        h1 = grouped_mm(x, self.linear_fc1.weight.mT, offs, self.backend)
        if b1 is not None:
            h1 = h1 + b1[eid]
        act = (self._activation(h1) * probs.unsqueeze(-1)).to(x.dtype)
        y = grouped_mm(act, self.linear_fc2.weight.mT, offs, self.backend)
        if b2 is not None:
            y = y + (b2[eid] * probs.unsqueeze(-1)).to(y.dtype)
        return y

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
        """Megatron's experts interface: rows grouped by local expert, ``tokens_per_expert``
        ``[E]`` (on the host from Megatron's dispatchers, or on the device)."""
        x = permuted_local_hidden_states
        offs = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
        return self.compute(x, offs, permuted_probs), None

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook: weight gradients are computed in backward."""

    # ---- checkpoints ----------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The stock ``SequentialMLP`` layout: one global tensor per projection,
        ``{prefix}experts.linear_fcX.weight`` of shape ``[*prepended, E_global, out, in]`` with the
        local experts at ``ep_rank * E``, plus the per-expert ``_extra_state`` objects; with
        ``metadata['singleton_local_shards']`` one tensor per expert
        (``{prefix}experts.{global_idx}.linear_fcX.weight``), as stock."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_object_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        E = self.num_local_experts
        ep_size, ep_rank = self.ep_group.size(), self.ep_group.rank()
        num_global, first = ep_size * E, ep_rank * E
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        replica_id = (0, 0, self.dp_group.rank())
        pre = len(sharded_offsets)
        out = {}
        for name in ("linear_fc1", "linear_fc2"):
            lin = getattr(self, name)
            for kind, tensor in (("weight", lin.weight), ("bias", lin.bias)):
                if tensor is None:
                    continue
                if singleton:
                    for e in range(E):
                        key = f"{prefix}experts.{first + e}.{name}.{kind}"
                        out[f"{prefix}local_experts.{e}.{name}.{kind}"] = ShardedTensor.from_rank_offsets(
                            key, tensor[e], *sharded_offsets, replica_id=replica_id, prepend_axis_num=pre
                        )
                else:
                    out[f"{prefix}{name}.{kind}"] = ShardedTensor.from_rank_offsets(
                        f"{prefix}experts.{name}.{kind}", tensor, *sharded_offsets, (pre, ep_rank, ep_size),
                        replica_id=replica_id, prepend_axis_num=pre,
                    )
            for e in range(E):
                if singleton:
                    key, offsets = f"{prefix}experts.{first + e}.{name}._extra_state", sharded_offsets
                else:
                    key = f"{prefix}experts.{name}._extra_state"
                    offsets = (*sharded_offsets, (pre, first + e, num_global))
                out[f"{prefix}local_experts.{e}.{name}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, key, offsets, replica_id
                )
        return out

    # torch's _load_from_state_dict is the per-module hook of load_state_dict that nn.Module's
    # documentation names for overriding; an override has to be a method here (not in compat).
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Also accept the stock per-expert keys ``{prefix}local_experts.{e}.linear_fcX.weight``
        (a plain stock ``state_dict``, or a ``torch_dist`` load with singleton local shards):
        they are stacked into the stacked weights. The stock ``_extra_state`` entries (always
        ``None`` for the local spec) are consumed."""
        per_expert: Dict[Tuple[str, str], Dict[int, Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _LOCAL_KEY.match(key[len(prefix):])
            if m is None:
                continue
            value = state_dict.pop(key)
            if m.group(3) != "_extra_state":
                per_expert.setdefault((m.group(2), m.group(3)), {})[int(m.group(1))] = value
        for (lin, kind), found in per_expert.items():
            name = f"{lin}.{kind}"
            full = f"{prefix}{lin}.{kind}"
            E = self.num_local_experts
            if sorted(found) != list(range(E)):
                error_msgs.append(
                    f"{prefix}: per-expert {name} tensors for experts {sorted(found)} but this layer has "
                    f"{E} local experts; a checkpoint must hold all of them"
                )
                continue
            if full in state_dict:
                error_msgs.append(f"{prefix}: both the stacked {full} and per-expert {name} tensors are present")
                continue
            state_dict[full] = torch.stack([found[e] for e in range(E)])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"num_local_experts={self.num_local_experts}, grouped GEMM ({self.backend})"


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def _copy_module_dict(module: torch.nn.Module) -> dict:
    """A module's instance dict with its own containers (so hooks, children and parameters
    registered on the copy do not leak into the original)."""
    d = {}
    for key, value in module.__dict__.items():
        d[key] = copy.copy(value) if isinstance(value, dict) else value
    return d


class BiasedSharedExpertMLP(SharedExpertMLP):
    """A stock ``SharedExpertMLP`` (same object, class swapped by the linear-bias pass) whose
    ``fc2`` bias is added to its output: ``forward(hidden [s, b, h]) -> [s, b, h]``. Stock
    Megatron's forward drops the bias ``MLP.forward`` returns (it refuses biases there)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        output, bias = MLP.forward(self, hidden_states)
        if bias is not None:
            output = output + bias
        return output


class GroupedMoELayer(MoELayer):
    """``MoELayer`` with grouped experts and, at expert/tensor-parallel size 1, sort-based
    dispatch (see module docstring). ``forward(hidden_states [s, b, h], intermediate_tensors=None,
    padding_mask=None) -> (output [s, b, h], None)`` as stock."""

    @classmethod
    def from_stock(cls, stock: MoELayer, kernels: Optional[KernelPolicy] = None) -> "GroupedMoELayer":
        """Adopt a stock layer: the same router parameters (as a :class:`SparseTopKRouter`),
        shared expert, token dispatcher and configuration; the experts stacked, their grouped
        GEMM as ``kernels`` (the model's :class:`~vpmoe_compile.kernels.KernelPolicy`) says."""
        backend = (kernels if kernels is not None else KernelPolicy()).grouped_gemm
        obj = cls.__new__(cls)
        obj.__dict__.update(_copy_module_dict(stock))
        obj.router = SparseTopKRouter.from_stock(stock.router)  # nn.Module registers the child
        obj.experts = GroupedExperts.from_sequential(stock.experts, backend)
        # Sort-based dispatch runs wherever this rank holds every token of the layer and every
        # expert: expert parallelism 1, and no sequence parallelism (under tensor parallelism
        # without SP the TP ranks hold the same tokens and, at expert-TP 1, the same experts:
        # each computes the routed experts for all of them, as at TP 1; the shared expert stays
        # Megatron's TP-split MLP).
        obj.sort_dispatch = (
            stock.ep_group.size() == 1
            and (stock.attn_tp_group.size() == 1 or not stock.config.sequence_parallel)
            and not stock.config.moe_latent_size
        )
        if obj.sort_dispatch and stock.attn_tp_group.size() > 1:
            # Megatron's router sums its aux-loss token counts (and scales the z-loss) over the
            # TP x CP group because under sequence parallelism each TP rank routes a slice of the
            # sequence; here every TP rank routes all of them, so only CP splits the tokens
            from megatron.core import parallel_state

            obj.router.tp_cp_group = parallel_state.get_context_parallel_group()
        return obj

    def forward(self, hidden_states: Tensor, intermediate_tensors=None, padding_mask: Optional[Tensor] = None):
        if intermediate_tensors is not None or padding_mask is not None or not self.sort_dispatch:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if self.moe_layer_recompute:
            from megatron.core import tensor_parallel

            output = tensor_parallel.checkpoint(self._forward_sorted, False, hidden_states)
        else:
            output = self._forward_sorted(hidden_states)
        return output, None

    def _forward_sorted(self, hidden_states: Tensor) -> Tensor:
        """Route, sort by expert, grouped experts, combine, shared expert: ``[s, b, h] -> [s, b, h]``."""
        s, b, h = hidden_states.shape
        if self.shared_experts_recompute:
            shared = self.shared_experts_compute(hidden_states)
        else:
            shared = self.shared_experts(hidden_states) if self.use_shared_expert else None
        probs, idx = self.router.route(hidden_states)
        k = idx.shape[1]
        order, inv, counts, offs = sort_by_expert(idx, self.experts.num_local_experts)
        self.router.count_tokens(counts)
        src = torch.div(order, k, rounding_mode="floor")
        x = _ToExperts.apply(hidden_states.reshape(s * b, h), src, inv, k)
        p = _Permute.apply(probs.reshape(-1), order, inv)
        y = self.experts.compute(x, offs, p)
        out = _FromExperts.apply(y, src, inv, k).view(s, b, h)
        if shared is not None:
            out = out + shared
        return out
