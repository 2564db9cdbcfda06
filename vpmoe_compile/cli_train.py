"""``python -m vpmoe_compile train``: the command-line face of :func:`vpmoe_compile.train.train`."""

from __future__ import annotations

import argparse


def add_train_parser(sub) -> argparse.ArgumentParser:
    from vpmoe_compile.cli_format import CONFIG_PRESETS

    about = "train a transformed model on Megatron's schedule (data, checkpoints, resume)"
    t = sub.add_parser("train", help=about, description=(
        "Train a vpMoE model: build the stock Megatron GPT model of --config, transform it, and train it "
        "with Megatron's own forward/backward schedule, finalize_model_grads and OptimizerParamScheduler "
        "(linear warm-up, cosine decay) on datasets written by build-dataset, read through Megatron's "
        "GPTDataset. --save writes Megatron torch_dist checkpoints that carry the transform; --load resumes "
        "(model, optimizer, scheduler, data position, RNG). Example: python -m vpmoe_compile train "
        "--config tiny --data data/corpus --steps 100 --save ckpt --save-interval 50 --log-json train.jsonl"))
    t.add_argument("--config", default=None, metavar="NAME|PATH",
                   help=f"config preset ({', '.join(CONFIG_PRESETS)}) or path to a TOML file (default: the "
                        "checkpoint's config with --load, else tiny)")
    t.add_argument("--data", nargs="+", required=True, metavar="PREFIX",
                   help="a build-dataset output prefix, or a blend: W1 PREFIX1 W2 PREFIX2 ...")
    t.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (per rank)")
    t.add_argument("--global-batch", type=int, default=8,
                   help="sequences per optimizer step, all ranks (gradient accumulation fills the rest)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's max_sequence_length)")
    t.add_argument("--steps", type=int, default=100, help="train until this iteration")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate of the matrices (default: the config's)")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay (default: lr / 10)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    t.add_argument("--lr-decay-steps", type=int, default=None,
                   help="iteration at which the cosine decay reaches --min-lr (default: --steps; give the full run's "
                        "length when training in pieces)")
    t.add_argument("--compile", action="store_true", help="compile each transformer layer (vpmoe_compile.compile)")
    t.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    t.add_argument("--save", default=None, metavar="DIR", help="write checkpoints to DIR/iter_XXXXXXX")
    t.add_argument("--save-interval", type=int, default=0, help="checkpoint every N steps (and at the end)")
    t.add_argument("--load", default=None, metavar="DIR", help="resume from DIR (a checkpoint or a --save folder)")
    t.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from a checkpoint's weights with a fresh optimizer and step 0 (Megatron's --finetune)")
    t.add_argument("--log-json", default=None, metavar="FILE",
                   help="append one JSON line per step (step, loss, lr, grad_norm, tokens_per_s); the plot goes "
                        "next to it as FILE's name with .png")
    t.add_argument("--plot", default=None, metavar="PNG", help="where the loss / learning-rate plot goes")
    t.add_argument("--data-cache", default=None, metavar="DIR",
                   help="GPTDataset's index cache (default: .gpt_dataset_cache beside the first prefix)")
    t.add_argument("--seed", type=int, default=1234, help="random seed (weights, data shuffle)")
    t.add_argument("--expert-parallel", type=int, default=1,
                   help="expert-parallel size (divides the experts and the number of ranks; launch with torchrun)")
    t.add_argument("--pipeline-parallel", type=int, default=1,
                   help="pipeline-parallel size: the layers split over that many stages (divides the layers and "
                        "the number of ranks; launch with torchrun)")
    t.add_argument("--tensor-parallel", type=int, default=1,
                   help="tensor-parallel size: attention heads, the dense and shared-expert MLPs and the vocabulary "
                        "split over that many ranks (divides the query groups and the number of ranks)")
    t.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism: norms, residual stream and router on seq_len / TP tokens "
                        "per rank (needs --tensor-parallel > 1; required with --tensor-parallel and --expert-parallel)")
    t.add_argument("--distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel ranks by whole parameters (Megatron's "
                        "layer-wise scheme for Muon; fp32 training on the CPU in this release)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    t.set_defaults(func=cmd_train)
    return t


def cmd_train(args) -> int:
    from vpmoe_compile.train import TrainArgs, train

    targs = TrainArgs(
        config=args.config, data=args.data, micro_batch=args.micro_batch, global_batch=args.global_batch,
        seq_len=args.seq_len, steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, lr_decay_steps=args.lr_decay_steps,
        compile=args.compile, compile_backend=args.compile_backend, save=args.save, save_interval=args.save_interval,
        load=args.load, init_from=args.init_from, log_json=args.log_json, plot=args.plot, seed=args.seed, expert_parallel=args.expert_parallel,
        pipeline_parallel=args.pipeline_parallel, tensor_parallel=args.tensor_parallel, sequence_parallel=args.sequence_parallel, distributed_optimizer=args.distributed_optimizer, device=args.device,
        data_cache=args.data_cache,
    )
    train(targs)  # TrainError / CheckpointError: one-line errors of the command line's main()
    return 0
