"""A minimal Megatron-Core training script for a vpMoE model: the template for your own.

It has the structure of Megatron-LM's ``examples/run_simple_mcore_train_loop.py`` (initialise
distributed -> model provider -> data iterator -> forward-step function -> Megatron's
``get_forward_backward_func`` loop -> ``finalize_model_grads`` -> optimizer step -> distributed
checkpoint save / load). Every line that differs from that example carries a ``# vpmoe:``
comment; there are eight such places:

1. initialise with :func:`megatron_base.init_process` (torch.distributed + parallel state, CPU or GPU);
2. build the stock model from a vpMoE config (:func:`megatron_base.build_stock_gpt`);
3. ``vpmoe_compile.transform(model)`` before wrapping in DDP;
4. ``vpmoe_compile.build_optimizer(ddp_model)`` instead of ``Adam`` (NorMuon + AdamW);
5. the data: ``GPTDataset`` (loss-masked) over a ``build-dataset`` prefix (here the shipped
   demo corpus) with the o200k Harmony tokenizer, instead of the mock dataset;
6. the optimizer's ``step()`` returns Megatron's ``(ok, grad_norm, num_zeros)``;
7. ``vpmoe_compile.save_checkpoint`` (the transform travels with the checkpoint) instead of
   ``dist_checkpointing.save``;
8. ``vpmoe_compile.load_checkpoint`` into a *freshly built stock model* (the transform is
   replayed from the checkpoint) instead of ``dist_checkpointing.load``.

Run (CPU or one GPU; several with ``torchrun --nproc-per-node N``)::

    python examples/pretrain_vpmoe.py --config tiny --steps 5 --out /tmp/pretrain_vpmoe
"""

import argparse
import os
import tempfile
from functools import partial
from typing import Dict, Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from torch.utils.data import DataLoader

import vpmoe_compile
from megatron_base import LossMaskedGPTDataset, build_demo_dataset, build_stock_gpt, init_process, load_config
from megatron_base.tokenizer import O200kHarmonyTokenizer


def model_provider(config_name: str, device: torch.device):
    """The stock Megatron-Core GPTModel of a vpMoE config, transformed."""
    cfg = load_config(config_name)  # vpmoe: a vpMoE TOML config
    model = build_stock_gpt(cfg, device=device)  # vpmoe: stock GPTModel, local layer spec
    vpmoe_compile.transform(model, cfg)  # vpmoe: TPA / GRAPE / sink / grouped MoE, before DDP
    return model


def get_train_data_iterator(prefix: str, seq_len: int, micro_batch: int, num_samples: int) -> Iterator:
    """Megatron's GPTDataset over a build-dataset prefix (loss masks applied)."""
    config = GPTDatasetConfig(
        random_seed=0,
        sequence_length=seq_len,
        blend=([prefix], None),
        split="1,0,0",
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=O200kHarmonyTokenizer(),  # vpmoe: o200k Harmony (GPT-OSS parity)
    )
    train_ds, _, _ = BlendedMegatronDatasetBuilder(
        LossMaskedGPTDataset, [num_samples, 0, 0], lambda: True, config  # vpmoe: loss-masked
    ).build()
    return iter(DataLoader(train_ds, batch_size=micro_batch, shuffle=False))


def forward_step_func(device, data_iterator: Iterator, model: torch.nn.Module):
    def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
        losses = output_tensor.float().view(-1)
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * loss_mask)
        num_tokens = loss_mask.sum().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}

    data: Dict[str, torch.Tensor] = next(data_iterator)
    tokens = data["tokens"].to(device)
    position_ids = data["position_ids"].to(device)
    labels = data["labels"].to(device)
    loss_mask = data["loss_mask"].to(device)
    output_tensor = model(tokens, position_ids, None, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="vpMoE config preset or TOML path (default: tiny)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps (default: 5)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default: 2)")
    p.add_argument("--num-microbatches", type=int, default=2, help="gradient accumulation (default: 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--out", default=None, help="folder for the data cache and the checkpoint (default: a temp dir)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="pretrain_vpmoe_")

    init_process(seed=123)  # vpmoe: torch.distributed + parallel state (nccl on GPU, gloo on CPU)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    gpt_model = model_provider(args.config, device)
    config = gpt_model.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    gpt_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt_model)

    optim = vpmoe_compile.build_optimizer(gpt_model)  # vpmoe: NorMuon + Polar Express, AdamW for the rest

    prefix = build_demo_dataset(os.path.join(out, "data"))  # vpmoe: build-dataset output (the demo corpus)
    global_batch = args.micro_batch * args.num_microbatches
    train_iterator = get_train_data_iterator(prefix, args.seq_len, args.micro_batch, args.steps * global_batch)
    forward_backward_func = get_forward_backward_func()

    for iteration in range(args.steps):
        optim.zero_grad()
        gpt_model.zero_grad_buffer()
        losses_reduced = forward_backward_func(
            forward_step_func=partial(forward_step_func, device),
            data_iterator=train_iterator,
            model=gpt_model,
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_len,
            micro_batch_size=args.micro_batch,
            decoder_seq_length=args.seq_len,
            forward_only=False,
        )
        finalize_model_grads([gpt_model])
        ok, grad_norm, _ = optim.step()  # vpmoe: Megatron's (ok, grad_norm, num_zeros)
        total = torch.stack([r["lm loss"] for r in losses_reduced]).sum(0)
        print(f"iteration {iteration}: loss {float(total[0] / total[1]):.4f}, grad norm {grad_norm:.3f}, ok={ok}")

    ckpt_path = os.path.join(out, "ckpt", f"iter_{args.steps:07d}")
    vpmoe_compile.save_checkpoint(ckpt_path, gpt_model, optim, iteration=args.steps)  # vpmoe: carries the transform

    fresh = build_stock_gpt(args.config, device=device)  # a stock model, as any script builds it
    info = vpmoe_compile.load_checkpoint(ckpt_path, fresh)  # vpmoe: replays the transform, then loads
    print(f"loaded {info['path']} (iteration {info['iteration']}) into a fresh stock model; transform replayed: "
          f"{info['restored']}")


if __name__ == "__main__":
    main()
