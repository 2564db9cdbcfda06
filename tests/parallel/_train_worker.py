"""Run by tests/parallel/test_data_parallel.py under torchrun: a few `train` steps, then rank 0
writes the records and the trained weights to OUT (a torch.save file)."""

import sys

import torch


def main():
    prefix, out, steps, global_batch, micro_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    from vpmoe_compile.train import TrainArgs, train

    run = train(TrainArgs(config="tiny", data=[prefix], micro_batch=micro_batch, global_batch=global_batch,
                          seq_len=32, steps=steps, warmup_steps=0, device="cpu", quiet=True,
                          data_cache=out + ".cache"))
    if torch.distributed.get_rank() == 0:
        bare = run["model"].module
        torch.save({"records": run["records"],
                    "weights": {n: p.detach().clone() for n, p in bare.named_parameters()}}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
