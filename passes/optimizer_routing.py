"""Read-only pass: the optimizer routing table of the transformed model.

Every parameter's role for :func:`vpmoe_compile.build_optimizer` (docs/design.md#the-optimizer): which
group (NorMuon matrix / per-expert / per-Q,K,V / per-TPA-factor, or AdamW), its lr and weight
decay. It runs last so the table covers the parameters the earlier passes created; it changes
nothing, it records the table for the debug dump and attaches it as
``model.vpmoe_optimizer_routing``. Unknown 2-D parameters are refused here, at transform time,
rather than at the first optimizer step.
"""

from __future__ import annotations

from collections import Counter

from passes.base import AFTER_ALL, Pass, PassContext, PassResult
from passes.registry import register_pass
from vpmoe_compile.optim import routing_table


@register_pass
class OptimizerRoutingPass(Pass):
    name = "optimizer_routing"
    requires = ("layer_plan",)
    after = (AFTER_ALL,)  # its table must cover every parameter the other passes create
    read_only = True

    def run(self, ctx: PassContext, result: PassResult) -> None:
        table = routing_table(ctx.model, ctx.cfg)
        result.data["routing"] = table
        groups = Counter(row.get("group", "?") for row in table)
        result.summary = f"{len(table)} parameters routed: " + ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))
        result.notes.append("the table is attached as model.vpmoe_optimizer_routing")
        ctx.options["optimizer_routing"] = table

    # attaching happens in transform's success hook (read-only passes may not change the model)
