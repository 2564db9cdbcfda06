"""``python -m vpmoe_compile plan``: the command-line face of :mod:`vpmoe_compile.plan`.

Per-rank memory (parameters, gradients, main parameters, optimizer state, activations) of a
config's transformed model for every candidate layout of ``--gpus`` GPUs, and the recommended
one (docs/design.md#memory-planner).
"""

from __future__ import annotations

import argparse
import json


def add_plan_parser(sub) -> argparse.ArgumentParser:
    from vpmoe_compile.cli_format import add_config_argument

    about = "per-rank memory of candidate parallel layouts, and the recommended one"
    p = sub.add_parser("plan", help=about, description=(
        "Memory planner: for --gpus GPUs of --gpu-memory each, print per rank the bf16 parameters, fp32 "
        "gradients (DDP buffer), fp32 main parameters, optimizer state (NorMuon + AdamW) and one micro-batch's "
        "activations of every candidate layout (data parallel x expert parallel, optimizer replicated or "
        "distributed), whether it fits after the reserve, and the recommendation: data parallel with the "
        "distributed optimizer first, expert parallelism only where memory forces it. Parameter and optimizer "
        "bytes are exact counts of the transformed model (built on the meta device); activations are an "
        "estimate (docs/design.md, Memory planner). Example: python -m vpmoe_compile plan --config vpmoe "
        "--gpus 8 --gpu-memory 80GB"))
    add_config_argument(p, default="vpmoe")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (the data-parallel world size)")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE",
                   help="memory of one GPU with its unit: 80GB (GB = 10^9 bytes), 80GiB (GiB = 2^30 bytes), 141GB")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the config's max_sequence_length)")
    p.add_argument("--ep", type=int, default=None,
                   help="plan only this expert-parallel size (default: every EP dividing the experts and --gpus)")
    p.add_argument("--reserve", type=float, default=0.10,
                   help="fraction of each GPU's memory kept free for the CUDA context, NCCL buffers and "
                        "fragmentation (default: 0.10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=cmd_plan)
    return p


def format_plan(plan) -> str:
    """The plan as the text table ``plan`` prints."""
    from vpmoe_compile.plan import GB, GIB

    inv = plan.inventory
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    lines = [
        f"memory plan for config {plan.config!r}: {plan.gpus} GPU{'s' if plan.gpus > 1 else ''} x "
        f"{plan.gpu_memory / GB:.4g} GB ({plan.gpu_memory / GIB:.1f} GiB); usable {plan.usable / GIB:.1f} GiB per GPU "
        f"after a {plan.reserve:.0%} reserve (CUDA context, NCCL buffers, fragmentation)",
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens per rank; {inv.total_params:,} parameters "
        f"({inv.expert.total:,} in routed experts); bytes per rank in GiB (2^30)",
        "",
        f"{'DP':>3}{'EP':>4}{'exp-DP':>8}  {'optimizer':<12}{'params':>8}{'grads':>8}{'main':>8}{'optim':>8}"
        f"{'activ':>8}{'total':>8}  fits",
        f"{'':>3}{'':>4}{'':>8}  {'':<12}{'bf16':>8}{'fp32':>8}{'fp32':>8}{'state':>8}{'':>8}{'':>8}",
    ]
    for c in plan.candidates:
        L, m = c.layout, c.memory
        mark = "  <- recommended" if c is plan.recommended else ""
        opt = L.optimizer + ("*" if L.distributed_optimizer else "")
        lines.append(
            f"{L.dp:>3}{L.ep:>4}{L.expert_dp:>8}  {opt:<12}{g(m.params):>8}{g(m.grads):>8}{g(m.main_params):>8}"
            f"{g(m.optimizer_states):>8}{g(m.activations):>8}{g(m.total):>8}  {'yes' if c.fits else 'no':<3}{mark}"
        )
    lines.append("")
    rec = plan.recommended
    if rec is not None:
        L = rec.layout
        lines.append(f"recommendation: DP={L.dp}, EP={L.ep}, {L.optimizer} optimizer, {rec.memory.total / GIB:.1f} of "
                     f"{plan.usable / GIB:.1f} GiB per rank: {plan.reason}.")
        if L.distributed_optimizer:
            rep = next((c for c in plan.candidates if c.layout.ep == L.ep and not c.layout.distributed_optimizer), None)
            if rep is not None:
                lines.append(f"  today's path (replicated optimizer, EP={L.ep}) {'fits' if rep.fits else 'does not fit'}: "
                             f"{rep.memory.total / GIB:.1f} GiB per rank.")
            if rep is not None and not rep.fits:
                alt = min((c for c in plan.candidates if c.fits and not c.layout.distributed_optimizer),
                          key=lambda c: c.layout.ep, default=None)
                if alt is not None:
                    lines.append(f"  with the replicated optimizer, EP={alt.layout.ep} is the smallest EP that fits "
                                 f"({alt.memory.total / GIB:.1f} GiB per rank; EP > 1 is tested on the CPU only, see the notes).")
    else:
        lines.append(f"recommendation: none: {plan.reason}.")
    a = plan.activation
    lines.append(f"activations (EP=1): {a['saved'] / GIB:.2f} GiB saved for backward ({a['saved_per_token'] / 1024:.1f} KiB "
                 f"per token over all {len(inv.shape.layers)} layers) + {a['head'] / GIB:.2f} GiB LM-head working set")
    lines.append("notes: * = " + plan.notes[1])
    lines += ["       " + n for n in (plan.notes[0], *plan.notes[2:])]
    return "\n".join(line.rstrip() for line in lines)


def cmd_plan(args) -> int:
    from megatron_base.config import ConfigError, load_config

    from vpmoe_compile.plan import PlanError, build_inventory, candidate_layouts, parse_memory, plan_memory

    try:
        if args.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {args.gpus}")
        if args.micro_batch < 1:
            raise PlanError(f"--micro-batch must be >= 1, got {args.micro_batch}")
        if args.seq_len is not None and args.seq_len < 1:
            raise PlanError(f"--seq-len must be >= 1, got {args.seq_len}")
        if not 0.0 <= args.reserve < 1.0:
            raise PlanError(f"--reserve must be in [0, 1), got {args.reserve}")
        memory = parse_memory(args.gpu_memory)
        cfg = load_config(args.config)
        if args.seq_len is not None and args.seq_len > cfg.attention.max_sequence_length:
            raise PlanError(f"--seq-len {args.seq_len} exceeds [attention] max_sequence_length "
                            f"{cfg.attention.max_sequence_length} of config {cfg.source!r}")
        if args.ep is not None:  # refuse an impossible EP before the (slow) model build
            from vpmoe_compile.plan import ModelInventory, ModelShape, ParamSplit

            shape = ModelShape(cfg.model.hidden_size, 1, 1, 1, 1, (), num_moe_experts=int(cfg.moe.num_experts or 0))
            candidate_layouts(ModelInventory(cfg.source, 0, ParamSplit(), ParamSplit(), shape), args.gpus, args.ep)
        inv = build_inventory(cfg)
        plan = plan_memory(inv, args.gpus, memory, micro_batch=args.micro_batch, seq_len=args.seq_len,
                           reserve=args.reserve, ep=args.ep)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None  # main() prints a PlanError as a one-line error
    if args.json:
        print(json.dumps(plan.as_dict(), indent=1))
    else:
        print(format_plan(plan))
    return 0
