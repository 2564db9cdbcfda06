"""GPU check of ``build_optimizer`` on the Megatron path (docs/design.md#the-megatron-path): the
GPU parts of the checkpoint and NaN-policy checks.

On one GPU (world size 1, nccl): the tiny vpMoE config as a stock Megatron-Core GPTModel in bf16
(and, when ``vpmoe_compile.transform`` works, the transformed model: TPA factor weights, GRAPE
``log_freq``), wrapped in Megatron's ``DistributedDataParallel``; then

1. ``build_optimizer`` -> ``NorMuonChainedOptimizer`` of NorMuon (Float16 wrapper, dense +
   expert) and Megatron's Adam; one training step (forward/backward through DDP, global grad
   norm, clip, step), params change, bf16 model params == fp32 main params (rounded);
2. clipping: the main grads after the step have global norm ``min(norm, clip_grad)``;
3. NaN policy: a NaN in one expert's main grad -> ``(False, nan, None)``, model params, main
   params, NorMuon and Adam state bitwise unchanged;
4. ``torch`` checkpoint format: ``state_dict`` -> ``torch.save/load`` -> fresh model + optimizer
   ``load_state_dict`` -> identical states and identical next step (fixed synthetic grads);
5. ``torch_dist`` format: ``sharded_state_dict`` -> ``dist_checkpointing.save`` -> fresh
   model/optimizer ``sharded_state_dict(is_loading=True)`` -> ``dist_checkpointing.load`` ->
   ``load_state_dict`` -> identical states (incl. the ``[m, 1]`` second moments) and next step.
6. with ``--cuda-graph``: every check above with ``optimizer.cuda_graph = true``, plus
   ``graph_equals_eager``: two identical models, NorMuon with and without CUDA graphs, five
   steps (gradients written into the DDP buffers, lr changing) -> bitwise identical models and
   the compute graph (and the gather graph, if any bank gathers) captured once (Megatron's
   ``main_grad`` views keep their addresses).

Prints one line per check and writes ``check_megatron_optimizer.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = {}


def record(name, ok, **info):
    RESULTS[name] = dict(ok=bool(ok), **info)
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {json.dumps(info, default=str)[:400]}", flush=True)


def build(cfg, transform: bool, seed: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    model = build_stock_gpt(cfg, device="cuda", params_dtype=torch.bfloat16)
    if transform:
        import vpmoe_compile

        model = vpmoe_compile.transform(model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    return model, ddp


def all_params(opt):
    """(model params, main params) of every chained optimizer."""
    out = []
    for o in opt.chained_optimizers:
        out += o.get_parameters()
    return out


def states_cpu(opt):
    snap = []
    for o in opt.chained_optimizers:
        inner = o.optimizer
        sd = inner.state_dict()
        snap.append({i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                     for i, st in sd["state"].items()})
    return snap


def same_states(a, b):
    bad = []
    for oi, (sa, sb) in enumerate(zip(a, b)):
        if set(sa) != set(sb):
            bad.append((oi, "keys"))
            continue
        for i in sa:
            for k in sa[i]:
                va, vb = sa[i][k], sb[i][k]
                if torch.is_tensor(va):
                    if va.shape != vb.shape or not torch.equal(va, vb):
                        bad.append((oi, i, k))
                elif va != vb:
                    bad.append((oi, i, k))
    return bad


def fixed_grads(ddp, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p in ddp.module.parameters():
        if p.requires_grad:
            p.main_grad.copy_(torch.randn(p.shape, generator=g, device="cuda") * 1e-2)


def loss_fn(ddp, tokens):
    pos = torch.arange(tokens.shape[1] - 1, device="cuda").unsqueeze(0).expand(tokens.shape[0], -1)
    out = ddp(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    return out.float().mean()


def run_suite(cfg, transform: bool, tag: str, tmp: str):
    from megatron.core import dist_checkpointing

    from vpmoe_compile.optim import build_optimizer

    model, ddp = build(cfg, transform, seed=1)
    t0 = time.perf_counter()
    opt = build_optimizer(ddp, cfg)
    kinds = [type(o).__name__ + "/" + type(o.optimizer).__name__ for o in opt.chained_optimizers]
    record(f"{tag}.build", opt.path == "megatron", optimizers=kinds, build_s=time.perf_counter() - t0,
           groups=[(g.get("use_normuon", False), g["wd_mult"], g["is_expert_parallel"], g["max_lr"],
                    len(g["params"])) for g in opt.param_groups])

    # 1. one real training step
    tokens = torch.randint(0, 1000, (2, 33), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    try:
        loss = loss_fn(ddp, tokens)
        loss.backward()
        how = "model forward/backward"
    except Exception as e:  # keep the optimizer checks alive if the model forward breaks
        traceback.print_exc()
        ddp.zero_grad_buffer()
        fixed_grads(ddp, 7)
        how = f"synthetic grads (forward failed: {type(e).__name__}: {e})"[:300]
    ddp.finish_grad_sync()
    t0 = time.perf_counter()
    ok, norm, zeros = opt.step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    main_match = True
    for o in opt.chained_optimizers:
        for mg, fg in zip(getattr(o, "float16_groups", []), getattr(o, "fp32_from_float16_groups", [])):
            for mp, fp in zip(mg, fg):
                main_match &= torch.equal(mp.detach(), fp.detach().to(mp.dtype))
    record(f"{tag}.step", ok and math.isfinite(norm) and changed == len(before) and main_match,
           grads=how, grad_norm=norm, params_changed=f"{changed}/{len(before)}",
           bf16_equals_main=main_match, first_step_s=step_s)

    # 2. clipping to the global norm
    grads = [p.grad for p in all_params(opt) if p.grad is not None]
    after = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()
    clip = opt.config.clip_grad
    record(f"{tag}.clip", abs(after - min(norm, clip)) <= 1e-3 * max(1.0, clip),
           norm_before=norm, norm_after=after, clip_grad=clip)

    # a second real step so every state (incl. Adam) is non-trivial
    ddp.zero_grad_buffer()
    fixed_grads(ddp, 11)
    ok2, _, _ = opt.step()

    # 3. NaN policy: skip with everything untouched
    ddp.zero_grad_buffer()
    fixed_grads(ddp, 13)
    expert = [(n, p) for n, p in model.named_parameters() if "local_experts.1.linear_fc1" in n][0]
    expert[1].main_grad[0, 0] = float("nan")
    snap_p = [p.detach().clone() for p in model.parameters()]
    snap_main = [p.detach().clone() for p in all_params(opt)]
    snap_s = states_cpu(opt)
    ok3, norm3, z3 = opt.step()
    same_p = all(torch.equal(a, b) for a, b in zip(snap_p, model.parameters()))
    same_main = all(torch.equal(a, b) for a, b in zip(snap_main, all_params(opt)))
    bad = same_states(snap_s, states_cpu(opt))
    record(f"{tag}.nan_skip", ok2 and ok3 is False and not math.isfinite(norm3) and same_p and same_main and not bad,
           returned=[ok3, norm3, z3], params_unchanged=same_p, main_unchanged=same_main,
           state_diffs=bad[:5], nan_param=expert[0])

    # 4. torch format round trip
    path = os.path.join(tmp, f"{tag}_opt.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model2, ddp2 = build(cfg, transform, seed=2)
    opt2 = build_optimizer(ddp2, cfg)
    ck = torch.load(path, weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    bad = same_states(states_cpu(opt), states_cpu(opt2))
    for d, m in ((ddp, opt), (ddp2, opt2)):
        d.zero_grad_buffer()
        fixed_grads(d, 17)
        m.step()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    record(f"{tag}.ckpt_torch", not bad and same, state_diffs=bad[:5], next_step_identical=same)

    # 5. torch_dist round trip
    ckdir = os.path.join(tmp, f"{tag}_dist")
    os.makedirs(ckdir, exist_ok=True)
    sharded = {"optimizer": opt.sharded_state_dict(model.sharded_state_dict())}
    n_v = sum(1 for k in _keys(sharded) if "second_moment" in k)
    dist_checkpointing.save(sharded, ckdir)
    model3, ddp3 = build(cfg, transform, seed=3)
    model3.load_state_dict(model.state_dict())
    opt3 = build_optimizer(ddp3, cfg)
    loaded = dist_checkpointing.load(
        {"optimizer": opt3.sharded_state_dict(model3.sharded_state_dict(), is_loading=True)}, ckdir
    )
    opt3.load_state_dict(loaded["optimizer"])
    bad = same_states(states_cpu(opt), states_cpu(opt3))
    mains_same = all(torch.equal(a, b) for a, b in zip(all_params(opt), all_params(opt3)))
    for d, m in ((ddp, opt), (ddp3, opt3)):
        d.zero_grad_buffer()
        fixed_grads(d, 19)
        m.step()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))
    record(f"{tag}.ckpt_torch_dist", not bad and same and mains_same and n_v > 0,
           second_moment_tensors=n_v, state_diffs=bad[:5], main_params_same=mains_same,
           next_step_identical=same)
    RESULTS[f"{tag}.routing_rows"] = len(opt.routing_table())


def graph_equals_eager(cfg, transform: bool, tag: str):
    from vpmoe_compile.optim import build_optimizer

    runs = []
    for use_graph in (True, False):
        c = copy.deepcopy(cfg)
        c.optimizer.cuda_graph = use_graph
        model, ddp = build(c, transform, seed=5)
        opt = build_optimizer(ddp, c)
        for step in range(5):
            for g in opt.param_groups:
                g["lr"] = g["max_lr"] * (1.0 - 0.1 * step)
            ddp.zero_grad_buffer()
            fixed_grads(ddp, 100 + step)
            opt.step()
        nm = [o.optimizer for o in opt.chained_optimizers if type(o.optimizer).__name__ == "NorMuon"]
        runs.append((model, [o.graph_captures for o in nm]))
    (m_g, caps), (m_e, _) = runs
    same = all(torch.equal(a, b) for a, b in zip(m_g.parameters(), m_e.parameters()))
    # compute graph + gather graph (none when every bank reads its gradients in place)
    record(f"{tag}.graph_equals_eager", same and all(c in (1, 2) for c in caps), captures=caps,
           params_identical=same)


def _keys(d, prefix=""):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(d, dict):
        for k, v in d.items():
            yield from _keys(v, f"{prefix}.{k}")
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            yield from _keys(v, f"{prefix}.{i}")
    elif isinstance(d, ShardedTensor):
        yield d.key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-transform", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the NorMuon banks (benchmarks/optimizer.py checks compile)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="NorMuon with CUDA graphs (optimizer.cuda_graph) + the graph-vs-eager check")
    args = ap.parse_args()
    from megatron_base import init_process, load_config

    init_process(seed=1234)
    cfg = load_config("tiny")
    cfg.optimizer.compile = bool(args.compile)
    cfg.optimizer.cuda_graph = bool(args.cuda_graph)
    RESULTS["compile"] = args.compile
    RESULTS["cuda_graph"] = args.cuda_graph
    with tempfile.TemporaryDirectory() as tmp:
        for tag, tr in (("stock", False), ("transformed", True)):
            if tr and args.no_transform:
                continue
            try:
                c = cfg
                if tr:  # the TPA Triton kernels need head_dim / 2 >= 16 (tiny has head_dim 16)
                    c = copy.deepcopy(cfg)
                    c.model.head_dim = 32
                run_suite(c, tr, tag, tmp)
                if args.cuda_graph:
                    graph_equals_eager(c, tr, tag)
            except Exception as e:
                traceback.print_exc()
                record(f"{tag}.suite", False, error=f"{type(e).__name__}: {e}"[:500])
    os.makedirs(args.out, exist_ok=True)
    name = "check_megatron_optimizer_graph.json" if args.cuda_graph else "check_megatron_optimizer.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)
    n_fail = sum(1 for v in RESULTS.values() if isinstance(v, dict) and not v["ok"])
    print("CHECK SUMMARY", {k: v["ok"] for k, v in RESULTS.items() if isinstance(v, dict)}, flush=True)
    return n_fail


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
