"""Run by tests/parallel/test_data_parallel.py under torchrun: a few `train` steps, then rank 0
writes the records and the trained weights to OUT (a torch.save file)."""

import sys

import torch


def main():
    prefix, out, steps, global_batch, micro_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ep = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    init_from = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    save = sys.argv[8] if len(sys.argv) > 8 else None
    from vpmoe_compile.train import TrainArgs, train

    run = train(TrainArgs(config="tiny", data=[prefix], micro_batch=micro_batch, global_batch=global_batch,
                          seq_len=32, steps=steps, warmup_steps=0, device="cpu", quiet=True, expert_parallel=ep,
                          init_from=init_from, save=save,
                          data_cache=out + ".cache"))
    bare = run["model"].module
    weights = {n: p.detach().clone() for n, p in bare.named_parameters()}
    if ep > 1:  # each rank holds E/ep experts: gather the stacks to compare with one process
        from megatron.core import parallel_state

        group = parallel_state.get_expert_model_parallel_group()
        for n, w in list(weights.items()):
            if getattr(dict(bare.named_parameters())[n], "expert_stack", False):
                parts = [torch.empty_like(w) for _ in range(ep)]
                torch.distributed.all_gather(parts, w.contiguous(), group=group)
                weights[n] = torch.cat(parts, 0)
    if torch.distributed.get_rank() == 0:
        torch.save({"records": run["records"], "weights": weights}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
