"""Training on Megatron's own schedule: ``python -m vpmoe_compile train`` and :func:`train`.

The loop is Megatron-LM's ``pretrain`` reduced to what a single-model GPT run needs, built from
megatron-core pieces only:

* data: ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` (our :class:`LossMaskedGPTDataset`,
  which also applies the loss masks ``build-dataset`` stores) over one prefix or a weighted
  blend; samples are taken in order from ``consumed_samples`` (Megatron-LM's
  ``MegatronPretrainingSampler`` rule), each data-parallel rank its slice of the global batch;
* model: a stock ``GPTModel`` (``build_stock_gpt``), ``vpmoe_compile.transform`` (or, on
  ``--load``, the checkpoint's transform replayed), Megatron's ``Float16Module`` (bf16 on GPU)
  and ``DistributedDataParallel``; optionally ``vpmoe_compile.compile``;
* step: ``get_forward_backward_func()`` (gradient accumulation over ``global_batch /
  (micro_batch x data-parallel size)`` micro-batches), ``finalize_model_grads`` (grad
  all-reduce, router expert-bias update), the optimizer's ``step()`` (NorMuon + AdamW,
  ``vpmoe_compile.build_optimizer``), Megatron's ``OptimizerParamScheduler`` (linear warm-up,
  cosine decay to ``min_lr``);
* checkpoints: ``vpmoe_compile.save_checkpoint`` into ``SAVE/iter_XXXXXXX`` plus Megatron-LM's
  ``latest_checkpointed_iteration.txt``; ``--load`` restores model, optimizer, scheduler, data
  position and RNG, so a resumed run continues bit-identically on CPU.

Each step appends one JSON line (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ...)
to ``--log-json``; the end writes a loss / learning-rate plot.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["TrainArgs", "TrainError", "train", "parse_blend", "plot_log"]


class TrainError(ValueError):
    """The run cannot start as asked; the message says what was wrong and what to do."""


@dataclass
class TrainArgs:
    """Settings of one run (the ``train`` command's flags).

    Attributes:
        config: preset name or TOML path (default: the checkpoint's config on ``load``, else
            ``"tiny"``).
        data: ``[PREFIX]`` or a blend ``[W1, PREFIX1, W2, PREFIX2, ...]`` of ``build-dataset``
            outputs.
        micro_batch, global_batch: sequences per micro-batch and per optimizer step (all ranks).
        seq_len: tokens per sequence (default: ``[attention] max_sequence_length``).
        steps: the iteration to train to (a resumed run continues from its checkpoint's).
        lr, min_lr: peak and final learning rate of the matrix (NorMuon) group; default the
            config's ``[optimizer]`` lr and 1/10 of it. The other groups keep their ratio.
        init_from: start from a checkpoint's model weights with a fresh optimizer, scheduler and
            data position (Megatron-LM's ``--load`` with ``--finetune``); it may have been saved
            at another expert-parallel size.
        pipeline_parallel: pipeline-parallel size (the layers split over that many stages, each
            stage on its own ranks, Megatron's 1F1B schedule; divides the number of ranks).
        tensor_parallel: tensor-parallel size (Megatron's head / MLP / vocabulary split; the TPA
            head factors split with the heads, the token factors replicated; NorMuon
            orthogonalises each matrix whole).
        sequence_parallel: Megatron's sequence parallelism (``--sequence-parallel``): the
            norms, residual stream and MoE router see ``seq_len / tensor_parallel`` tokens per
            rank, gathered before attention and the MLPs and reduce-scattered after. Needs
            ``tensor_parallel`` > 1; required with ``tensor_parallel`` > 1 and
            ``expert_parallel`` > 1, as in Megatron-LM.
        distributed_optimizer: shard the optimizer state over the data-parallel ranks by whole
            parameters (``build_optimizer(..., layer_wise_distributed_optimizer=True)``; the
            fp32 path, CPU); a checkpoint saved with it loads at any data-parallel size.
        warmup_steps: linear warm-up iterations; then cosine decay to ``min_lr`` at
            ``lr_decay_steps`` (default ``steps``; Megatron-LM's ``--lr-decay-iters``: set it to
            the full run's length when training in pieces). A resumed run takes the schedule
            from its checkpoint.
    """

    config: Optional[str] = None
    data: Sequence[str] = field(default_factory=list)
    micro_batch: int = 2
    global_batch: int = 8
    seq_len: Optional[int] = None
    steps: int = 100
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_steps: int = 0
    lr_decay_steps: Optional[int] = None
    compile: bool = False
    compile_backend: str = "inductor"
    save: Optional[str] = None
    save_interval: int = 0
    load: Optional[str] = None
    init_from: Optional[str] = None
    log_json: Optional[str] = None
    plot: Optional[str] = None
    seed: int = 1234
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    device: str = "auto"
    data_cache: Optional[str] = None
    progress: Optional[bool] = None
    quiet: bool = False
    dump_dir: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def parse_blend(items: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``[PREFIX]`` -> ``([PREFIX], None)``; ``[W1, P1, W2, P2, ...]`` -> ``([P1, P2], [W1, W2])``
    (Megatron-LM's ``--data-path`` convention)."""
    items = [str(x) for x in items]
    suffixed = [x for x in items if x.endswith((".bin", ".idx", ".json"))]
    if suffixed:
        raise TrainError(f"--data takes dataset PREFIXES (without .bin / .idx), got {suffixed}; e.g. --data "
                         f"{suffixed[0].rsplit('.', 1)[0].removesuffix('.manifest').removesuffix('_loss_mask')}")
    if not items:
        raise TrainError("--data is required: a prefix written by build-dataset, or a blend 'W1 PREFIX1 W2 PREFIX2'")
    if len(items) == 1:
        return items, None
    if len(items) % 2:
        raise TrainError(f"--data blend must alternate weight and prefix (an even count), got {len(items)} items: {items}")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise TrainError(f"--data blend: {w!r} is not a weight (expected 'W1 PREFIX1 W2 PREFIX2 ...')") from None
        prefixes.append(p)
    if any(w <= 0 or not math.isfinite(w) for w in weights):
        raise TrainError(f"--data blend weights must be positive numbers, got {weights}")
    return prefixes, weights


def _check_prefixes(prefixes: Sequence[str]) -> None:
    for p in prefixes:
        missing = [p + ext for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
        if missing:
            raise TrainError(
                f"--data {p}: {', '.join(missing)} not found; give the PREFIX that build-dataset wrote "
                "(python -m vpmoe_compile build-dataset --input FILE --output-prefix PREFIX)"
            )


def build_train_dataset(prefixes, weights, num_samples: int, seq_len: int, seed: int, cache_dir: str):
    """Megatron's ``BlendedMegatronDatasetBuilder`` over ``LossMaskedGPTDataset`` (train split only)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_base import LossMaskedGPTDataset
    from megatron_base.tokenizer import O200kHarmonyTokenizer

    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(list(prefixes), list(weights) if weights else None),
        split="1,0,0",
        tokenizer=O200kHarmonyTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=cache_dir,
    )
    train_ds, _, _ = BlendedMegatronDatasetBuilder(
        LossMaskedGPTDataset, [num_samples, 0, 0], lambda: True, cfg
    ).build()
    return train_ds


def sample_batches(dataset, consumed_samples: int, micro_batch: int, dp_rank: int, dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches in sample order from ``consumed_samples``: each global slice of
    ``micro_batch x dp_size`` samples, this rank's ``micro_batch`` of it (Megatron-LM's
    ``MegatronPretrainingSampler``)."""
    i = consumed_samples
    while True:
        start = i + dp_rank * micro_batch
        samples = [dataset[(start + j) % len(dataset)] for j in range(micro_batch)]
        yield {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        i += micro_batch * dp_size


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron-LM's GPT loss: masked sum, the token count, and ``[sum, count]`` for reporting."""
    losses = output.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def _forward_step(device, data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------


def plot_log(records: Sequence[Dict[str, Any]], path: str, title: str = "") -> None:
    """Loss (left axis) and learning rate (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per token, nats)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", linestyle="--", label="learning rate")
    ax2.set_ylabel("learning rate (matrix group)", color="tab:orange")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    ax.set_title(title or "Training loss and learning rate", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _check_args(a: TrainArgs) -> None:
    bad = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(a, n)}" for n in ("micro_batch", "global_batch", "steps")
           if getattr(a, n) < 1]
    if a.seq_len is not None and a.seq_len < 2:
        bad.append(f"--seq-len must be >= 2, got {a.seq_len}")
    if a.lr_decay_steps is not None and a.lr_decay_steps < 1:
        bad.append(f"--lr-decay-steps must be >= 1, got {a.lr_decay_steps}")
    if a.warmup_steps < 0 or a.save_interval < 0:
        bad.append("--warmup-steps and --save-interval must be >= 0")
    if a.save_interval and not a.save:
        bad.append("--save-interval needs --save DIR")
    for name in ("lr", "min_lr"):
        v = getattr(a, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            bad.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if a.device not in ("auto", "cpu", "cuda"):
        bad.append(f"--device must be auto, cpu or cuda, got {a.device!r}")
    if bad:
        raise TrainError("; ".join(bad))
    if a.log_json and not a.load and os.path.exists(a.log_json):
        raise TrainError(f"--log-json {a.log_json} exists; give a new file (a resumed run, --load, appends to it)")
    if a.plot and os.path.exists(a.plot) and not a.plot.endswith(".png"):
        raise TrainError(f"--plot {a.plot} exists and is not a .png this command writes; give a new .png path")


def train(a: TrainArgs) -> Dict[str, Any]:
    """Run (or resume) training; returns ``{"records": [...], "iteration", "checkpoints": [...]}``."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import vpmoe_compile
    from megatron_base import build_stock_gpt, init_process, load_config
    from megatron_base.config import config_from_dict
    from vpmoe_compile.checkpoint import (
        TRACKER_FILE,
        iteration_dir,
        load_checkpoint,
        read_transform_state,
        restore,
        save_checkpoint,
    )
    from vpmoe_compile.training import wrap_megatron

    _check_args(a)
    prefixes, weights = parse_blend(a.data)
    _check_prefixes(prefixes)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda given but no CUDA device is available")
    if a.device == "cpu" and torch.cuda.is_available():
        raise TrainError("--device cpu with a visible GPU: megatron-core 0.16.1 hardcodes CUDA inside forward; "
                         "run with CUDA_VISIBLE_DEVICES='' to train on the CPU")
    on_gpu = torch.cuda.is_available()
    if a.distributed_optimizer and on_gpu:
        raise TrainError("--distributed-optimizer shards the fp32 optimizer and runs on the CPU in this release; "
                         "on GPUs train without it (the replicated optimizer)")
    device = torch.device("cuda" if on_gpu else "cpu")
    state = read_transform_state(a.load) if a.load else None
    if a.config:
        cfg = load_config(a.config)
    elif state is not None:
        cfg = config_from_dict(state["config"], where=f"checkpoint {a.load}")
        cfg.source = state.get("config_source") or cfg.source
    else:
        cfg = load_config("tiny")
    seq_len = a.seq_len or cfg.attention.max_sequence_length
    if seq_len > cfg.attention.max_sequence_length:
        raise TrainError(f"--seq-len {seq_len} exceeds [attention] max_sequence_length "
                         f"{cfg.attention.max_sequence_length} of config {cfg.source!r}")

    if a.expert_parallel < 1:
        raise TrainError(f"--expert-parallel must be >= 1, got {a.expert_parallel}")
    if a.pipeline_parallel < 1:
        raise TrainError(f"--pipeline-parallel must be >= 1, got {a.pipeline_parallel}")
    if a.pipeline_parallel > 1 and cfg.model.num_layers % a.pipeline_parallel:
        raise TrainError(f"--pipeline-parallel {a.pipeline_parallel} does not divide the {cfg.model.num_layers} "
                         f"layers of config {cfg.source!r}")
    if a.tensor_parallel < 1:
        raise TrainError(f"--tensor-parallel must be >= 1, got {a.tensor_parallel}")
    groups = cfg.model.num_query_groups or cfg.model.num_attention_heads
    if groups % a.tensor_parallel:
        raise TrainError(f"--tensor-parallel {a.tensor_parallel} does not divide the {groups} query groups of "
                         f"config {cfg.source!r} (each rank holds whole groups)")
    if a.tensor_parallel > 1 and a.expert_parallel > 1 and not a.sequence_parallel:
        raise TrainError("--tensor-parallel > 1 with --expert-parallel > 1 needs Megatron's sequence parallelism "
                         "(Megatron-LM requires it: the MoE layers dispatch each TP rank's slice of the sequence); "
                         "add --sequence-parallel")
    if a.sequence_parallel and a.tensor_parallel <= 1:
        raise TrainError("--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
                         "--tensor-parallel > 1")
    if a.sequence_parallel and seq_len % a.tensor_parallel:
        raise TrainError(f"--sequence-parallel: --seq-len {seq_len} is not a multiple of --tensor-parallel "
                         f"{a.tensor_parallel} (each rank holds seq_len / tensor_parallel tokens)")
    if a.tensor_parallel > 1 and a.distributed_optimizer:
        raise TrainError("--distributed-optimizer with --tensor-parallel > 1 is not supported yet: use one of them")
    init_process(seed=a.seed, expert_model_parallel_size=a.expert_parallel,
                 pipeline_model_parallel_size=a.pipeline_parallel, tensor_model_parallel_size=a.tensor_parallel)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    if a.global_batch % (a.micro_batch * dp_size):
        raise TrainError(f"--global-batch {a.global_batch} must be a multiple of --micro-batch {a.micro_batch} x "
                         f"data-parallel size {dp_size}")
    num_micro = a.global_batch // (a.micro_batch * dp_size)
    rank0 = torch.distributed.get_rank() == 0
    say = (lambda *x: print("[train]", *x, file=sys.stderr, flush=True)) if (rank0 and not a.quiet) else (lambda *x: None)

    model = build_stock_gpt(cfg, device=device, params_dtype=torch.bfloat16 if on_gpu else torch.float32,
                            sequence_parallel=a.sequence_parallel)
    if state is not None:
        restore(model, state)
    else:
        vpmoe_compile.transform(model, cfg, progress=False, dump_dir=a.dump_dir)
    wrapped = wrap_megatron(model)
    optimizer = vpmoe_compile.build_optimizer(wrapped, cfg, layer_wise_distributed_optimizer=a.distributed_optimizer)
    st = optimizer.settings  # the [optimizer] section as build_optimizer resolved it
    max_lr = float(a.lr if a.lr is not None else st.lr)
    min_lr = float(a.min_lr if a.min_lr is not None else (st.min_lr if a.lr is None else max_lr * st.min_lr / st.lr))
    if min_lr > max_lr:
        raise TrainError(f"--min-lr {min_lr} exceeds the peak lr {max_lr}")
    if a.lr is not None or a.min_lr is not None:
        _scale_group_lrs(optimizer, st, max_lr, min_lr)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if a.warmup_steps else max_lr, max_lr=max_lr, min_lr=min_lr,
        lr_warmup_steps=a.warmup_steps, lr_decay_steps=max(a.lr_decay_steps or a.steps, a.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=st.weight_decay, end_wd=st.weight_decay, wd_incr_steps=max(a.steps, 1), wd_incr_style="constant",
    )
    iteration, consumed = 0, 0
    if a.init_from:
        if a.load:
            raise TrainError("--init-from and --load exclude each other: --load resumes a run, --init-from starts "
                             "a new one from a checkpoint's weights")
        info = load_checkpoint(a.init_from, wrapped, rng=False)
        say(f"initialised the weights from {info['path']} (fresh optimizer, step 0)")
    if a.load:
        info = load_checkpoint(a.load, wrapped, optimizer, scheduler)
        iteration = int(info["iteration"] or 0)
        consumed = int(info["extra"].get("consumed_samples", iteration * a.global_batch))
        saved_gb = info["extra"].get("global_batch")
        if saved_gb is not None and saved_gb != a.global_batch:
            say(f"note: the checkpoint was trained with --global-batch {saved_gb}; continuing with {a.global_batch}")
        say(f"resumed from {info['path']} at iteration {iteration} ({consumed} samples consumed)")
    if iteration >= a.steps:
        raise TrainError(f"--steps {a.steps} but the checkpoint is already at iteration {iteration}; ask for more steps")
    if a.compile:
        vpmoe_compile.compile(wrapped, backend=a.compile_backend)

    cache = a.data_cache or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), ".gpt_dataset_cache")
    dataset = build_train_dataset(prefixes, weights, a.steps * a.global_batch, seq_len, a.seed, cache)
    batches = sample_batches(dataset, consumed, a.micro_batch, dp_rank, dp_size)

    tconf = model.config
    tconf.no_sync_func = wrapped.no_sync
    tconf.finalize_model_grads_func = finalize_model_grads
    fb = get_forward_backward_func()
    if a.log_json and rank0:
        Path(a.log_json).parent.mkdir(parents=True, exist_ok=True)
    log = open(a.log_json, "a", encoding="utf-8") if (a.log_json and rank0) else None
    records: List[Dict[str, Any]] = []
    checkpoints: List[str] = []
    progress = a.progress if a.progress is not None else (rank0 and not a.quiet and sys.stderr.isatty())
    say(f"config {cfg.source!r} on {device}; {a.steps - iteration} steps of {a.global_batch} x {seq_len} tokens "
        f"({num_micro} micro-batches of {a.micro_batch} per rank, {dp_size} data-parallel rank(s))")
    from tqdm import tqdm

    from megatron_base.progress import progress_logging

    try:
        with progress_logging(), tqdm(range(iteration, a.steps), disable=not progress, desc="train", unit="step",
                                      initial=iteration, total=a.steps, file=sys.stderr, dynamic_ncols=True) as bar:
            for _ in bar:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                wrapped.zero_grad_buffer()
                optimizer.zero_grad()
                out = fb(forward_step_func=partial(_forward_step, device), data_iterator=batches, model=[wrapped],
                         num_microbatches=num_micro, seq_length=seq_len, micro_batch_size=a.micro_batch,
                         decoder_seq_length=seq_len, forward_only=False)
                lr = float(_matrix_lr(optimizer))  # the lr this step uses
                ok, grad_norm, _ = optimizer.step()
                if ok:
                    scheduler.step(increment=1)
                rep = torch.stack([o["lm loss"] for o in out]).sum(0) if out else torch.zeros(2)
                torch.distributed.all_reduce(rep)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                iteration += 1
                consumed += a.global_batch
                loss = float(rep[0] / rep[1].clamp_min(1))
                rec = {
                    "step": iteration,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens_per_s": a.global_batch * seq_len / dt,
                    "step_s": dt,
                    "skipped": not ok,
                    "consumed_samples": consumed,
                }
                records.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}")
                if a.save and ((a.save_interval and iteration % a.save_interval == 0) or iteration == a.steps):
                    path = iteration_dir(a.save, iteration)
                    save_checkpoint(path, wrapped, optimizer, scheduler, iteration,
                                    extra={"consumed_samples": consumed, "global_batch": a.global_batch,
                                           "seq_len": seq_len, "data": list(a.data)})
                    if rank0:
                        _atomic_write(Path(a.save) / TRACKER_FILE, f"{iteration}\n")
                    checkpoints.append(str(path))
    finally:
        if log:
            log.close()
    plot = a.plot or (os.path.splitext(a.log_json)[0] + ".png" if a.log_json else None)
    if plot and rank0 and records:
        every = _read_log(a.log_json) if a.log_json else records
        plot_log(every, plot, title=f"vpmoe_compile train: {cfg.source}, global batch {a.global_batch} x {seq_len}")
        say(f"wrote {plot}")
    if records:
        say(f"iteration {iteration}: loss {records[-1]['loss']:.4f}, {records[-1]['tokens_per_s']:.0f} tokens/s")
    return {"records": records, "iteration": iteration, "checkpoints": checkpoints, "model": wrapped,
            "optimizer": optimizer, "scheduler": scheduler}


def _read_log(path: str) -> List[Dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _matrix_lr(optimizer) -> float:
    for g in optimizer.param_groups:
        return g["lr"]
    return float("nan")


def _scale_group_lrs(optimizer, st, max_lr: float, min_lr: float) -> None:
    """Each parameter group carries its own ``max_lr`` / ``min_lr`` for Megatron's scheduler
    (``build_optimizer`` sets them from the config). ``--lr`` / ``--min-lr`` rescale every
    group's by the factor they change the matrix group's, so the config's ratios between the
    NorMuon and AdamW groups are kept."""
    f_max = max_lr / st.lr if st.lr else 1.0
    f_min = min_lr / st.min_lr if st.min_lr else None
    for g in optimizer.param_groups:
        g_max = g.get("max_lr", st.lr)
        g["max_lr"] = g_max * f_max
        g["min_lr"] = g.get("min_lr", st.min_lr) * f_min if f_min is not None else min_lr * g_max / (st.lr or 1.0)
