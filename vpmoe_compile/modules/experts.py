"""Batched routed experts: stock ``SequentialMLP`` semantics without the per-expert Python loop.

Megatron's local-spec ``SequentialMLP`` runs its experts one by one: with vpMoE's 256 experts
that is ~512 linear-layer calls per MoE layer forward (and as many backward), each on ~128
tokens — the step becomes CPU/launch bound (see README, ``benchmarks/step.py``).
:class:`BatchedSequentialMLP` keeps the very same expert modules and parameters (same objects,
same names, same checkpoint layout: it subclasses ``SequentialMLP``) and computes all experts at
once: tokens are scattered into a padded ``[E, M, h]`` buffer (``M`` = the largest token count
of any expert), the expert weights are stacked per call, and the two projections are two
``bmm``. Gradients reach every expert's own ``weight`` through the stack.

Padding costs ``E * M`` rows for ``T`` tokens; when the routing is very unbalanced
(``E * M > max_padding_ratio * T``) the layer falls back to the stock per-expert loop for that
call, so memory never blows up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP


class BatchedSequentialMLP(SequentialMLP):
    """Drop-in for ``SequentialMLP`` (``forward(permuted_hidden [T, h], tokens_per_expert [E],
    permuted_probs [T]) -> (out [T, h], None)``), all experts in two batched GEMMs."""

    max_padding_ratio: float = 4.0

    @classmethod
    def from_stock(cls, stock: SequentialMLP, max_padding_ratio: float = 4.0) -> "BatchedSequentialMLP":
        obj = cls.__new__(cls)
        MegatronModule.__init__(obj, config=stock.config)
        obj.num_local_experts = stock.num_local_experts
        obj.local_experts = stock.local_experts  # the same experts: parameters untouched
        obj.ep_group, obj.tp_group, obj.dp_group = stock.ep_group, stock.tp_group, stock.dp_group
        obj.max_padding_ratio = float(max_padding_ratio)
        obj.batched_calls = 0
        obj.fallback_calls = 0
        return obj

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        E, T = self.num_local_experts, x.shape[0]
        if E == 1 or T == 0 or self.config.moe_apply_probs_on_input:
            return super().forward(x, tokens_per_expert, probs)
        counts = tokens_per_expert.to(device=x.device, dtype=torch.long)
        M = int(counts.max())  # one host sync (stock SequentialMLP syncs on .tolist() too)
        if E * M > self.max_padding_ratio * T:
            self.fallback_calls += 1
            return super().forward(x, tokens_per_expert, probs)
        self.batched_calls += 1
        h = x.shape[-1]
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=T)
        start = torch.cumsum(counts, 0) - counts
        slot = expert * M + (torch.arange(T, device=x.device) - start[expert])  # row in [E*M]
        padded = x.new_zeros(E * M, h).index_copy(0, slot, x).view(E, M, h)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, F, h]
        inter = self.config.activation_func(torch.bmm(padded, w1.transpose(1, 2)))  # [E, M, F]
        scale = probs.new_zeros(E * M).index_copy(0, slot, probs).view(E, M, 1)
        inter = (inter * scale).to(x.dtype)  # same rounding point as MLP(per_token_scale)
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, h, F]
        out = torch.bmm(inter, w2.transpose(1, 2)).reshape(E * M, h)
        return out.index_select(0, slot), None

    def extra_repr(self) -> str:
        return f"num_local_experts={self.num_local_experts}, batched (padded bmm), max_padding_ratio={self.max_padding_ratio:g}"
