"""Run by tests/parallel/test_data_parallel.py under torchrun: a few `train` steps, then rank 0
writes the records and the trained weights to OUT (a torch.save file).

    _train_worker.py PREFIX OUT STEPS GLOBAL_BATCH MICRO_BATCH [EP [INIT_FROM|- [SAVE|- [LOAD|-]]]] [--distopt] [--pp N] [--tp N] [--sp] [--save-interval N]

Under pipeline or tensor parallelism each rank holds other layers or shards: the weights are not
gathered (compare through the saved checkpoint); under TP the replicated parts (every dense
parameter's elements that are not TP-split) must be equal on every rank.
"""

import sys

import torch


def main():
    argv = list(sys.argv[1:])
    pp = 1
    if "--pp" in argv:
        i = argv.index("--pp")
        pp = int(argv[i + 1])
        del argv[i : i + 2]
    tp = 1
    if "--tp" in argv:
        i = argv.index("--tp")
        tp = int(argv[i + 1])
        del argv[i : i + 2]
    save_interval = 0
    if "--save-interval" in argv:
        i = argv.index("--save-interval")
        save_interval = int(argv[i + 1])
        del argv[i : i + 2]
    distopt = "--distopt" in argv
    sp = "--sp" in argv
    argv = [a for a in argv if a not in ("--distopt", "--sp")]
    prefix, out, steps, global_batch, micro_batch = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    opt = [(a if a != "-" else None) for a in argv[5:]] + [None] * 4
    ep = int(opt[0] or 1)
    init_from, save, load = opt[1], opt[2], opt[3]
    from vpmoe_compile.train import TrainArgs, train

    run = train(TrainArgs(config="tiny", data=[prefix], micro_batch=micro_batch, global_batch=global_batch,
                          seq_len=32, steps=steps, warmup_steps=0, lr_decay_steps=6, device="cpu", quiet=True,
                          expert_parallel=ep, pipeline_parallel=pp, distributed_optimizer=distopt,
                          tensor_parallel=tp, sequence_parallel=sp,
                          init_from=init_from, save=save, load=load, save_interval=save_interval,
                          data_cache=out + ".cache"))
    bare = run["model"].module
    weights = {n: p.detach().clone() for n, p in bare.named_parameters()}
    if ep > 1 and tp == 1:  # each rank holds E/ep experts: gather the stacks to compare with one process
        from megatron.core import parallel_state

        group = parallel_state.get_expert_model_parallel_group()
        for n, w in list(weights.items()):
            if getattr(dict(bare.named_parameters())[n], "expert_stack", False):
                parts = [torch.empty_like(w) for _ in range(ep)]
                torch.distributed.all_gather(parts, w.contiguous(), group=group)
                weights[n] = torch.cat(parts, 0)
    # every rank's replicated weights must be equal (the distributed optimizer broadcasts them)
    same = torch.tensor([1.0])
    if tp > 1:  # the replicated elements of every dense parameter must be equal on all ranks
        from vpmoe_compile.tensor_parallel import is_tp_partitioned, tp_layout

        parts = []
        for n, p in sorted(bare.named_parameters()):
            if getattr(p, "expert_stack", False) or not getattr(p, "allreduce", True):
                continue
            layout = tp_layout(p)
            if layout is not None:
                parts.extend(r.reshape(-1) for r in layout.split_sharded(p.detach())[1])
            elif not is_tp_partitioned(p):
                parts.append(p.detach().reshape(-1))
        flat = torch.cat(parts)
        ref = flat.clone()
        torch.distributed.broadcast(ref, 0)
        same = torch.tensor([float(torch.equal(ref, flat))])
        torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    elif pp == 1:
        flat = torch.cat([w.reshape(-1) for n, w in sorted(weights.items())])
        ref = flat.clone()
        torch.distributed.broadcast(ref, 0)
        same = torch.tensor([float(torch.equal(ref, flat))])
        torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    else:  # GRAPE-M's log_freq is held by every stage: the copies must stay equal
        lf = dict(bare.named_parameters()).get("rotary_pos_emb.log_freq")
        if lf is not None:
            ref = lf.detach().clone()
            torch.distributed.broadcast(ref, 0)
            same = torch.tensor([float(torch.equal(ref, lf.detach()))])
            torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    owned = {}
    optimizer = run["optimizer"]
    if getattr(optimizer, "sharding", None) is not None:
        owned = {"state_tensors": sum(len(s) for s in optimizer.state.values()), "params": len(optimizer.get_parameters())}
    all_owned = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(all_owned, owned)
    if torch.distributed.get_rank() == 0:
        torch.save({"records": run["records"], "weights": weights, "ranks_equal": bool(same.item()),
                    "owned": all_owned, "num_params": len(list(bare.parameters()))}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
