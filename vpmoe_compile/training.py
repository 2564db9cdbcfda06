"""Small training utilities shared by the demo and ``benchmarks/step.py``.

* :class:`TokenBatches` — deterministic next-token micro-batches ``[b, s]`` from a 1-D token
  stream (and an aligned loss mask).
* :func:`train_step` — one forward/backward/optimizer step of a Megatron ``GPTModel`` (labels
  passed to the model, per-token loss ``[b, s]`` reduced with the loss mask), including the
  router expert-bias update Megatron's ``finalize_model_grads`` does for aux-loss-free routing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64 (tokens shifted by one)
    loss_mask: torch.Tensor  # [b, s] float32
    position_ids: torch.Tensor  # [b, s] int64


class TokenBatches:
    """Cycles deterministically through a token stream in windows of ``seq_len + 1``."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, loss_mask: Optional[np.ndarray] = None, device="cpu"):
        tokens = np.asarray(tokens, dtype=np.int64)
        need = seq_len + 1
        if tokens.size < need:
            raise ValueError(f"the token stream has {tokens.size} tokens; need at least seq_len + 1 = {need}")
        self.tokens = torch.from_numpy(tokens)
        self.mask = torch.from_numpy(np.asarray(loss_mask, dtype=np.float32)) if loss_mask is not None else torch.ones(tokens.size)
        self.b, self.s, self.device = batch_size, seq_len, torch.device(device)
        self.num_windows = (tokens.size - 1) // seq_len
        self.cursor = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows, masks = [], []
        for _ in range(self.b):
            start = (self.cursor % self.num_windows) * self.s
            rows.append(self.tokens[start : start + self.s + 1])
            masks.append(self.mask[start + 1 : start + self.s + 1])
            self.cursor += 1
        chunk = torch.stack(rows)
        pos = torch.arange(self.s).unsqueeze(0).expand(self.b, -1)
        return Batch(
            tokens=chunk[:, :-1].contiguous().to(self.device),
            labels=chunk[:, 1:].contiguous().to(self.device),
            loss_mask=torch.stack(masks).to(self.device),
            position_ids=pos.contiguous().to(self.device),
        )


def update_router_expert_bias(model: nn.Module) -> None:
    """The aux-loss-free expert-bias update Megatron's ``finalize_model_grads`` performs: update
    every router's ``expert_bias`` from its ``local_tokens_per_expert`` counts, then reset the
    counts (Megatron's ``reset_model_temporary_tensors``), so each step uses its own counts."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "moe_router_enable_expert_bias", False):
        return
    from megatron_base import compat

    with torch.no_grad():
        compat.update_router_expert_bias([model], config)
        for module in model.modules():
            counts = getattr(module, "local_tokens_per_expert", None)
            if isinstance(counts, torch.Tensor):
                counts.zero_()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(forward: Callable, model: nn.Module, optimizer, batch: Batch) -> Tuple[float, float]:
    """One step; returns ``(loss, seconds)`` (the loss is read after the timer stops)."""
    device = batch.tokens.device
    sync(device)
    t0 = time.perf_counter()
    per_token = forward(batch.tokens, batch.position_ids, None, labels=batch.labels)
    loss = (per_token.float() * batch.loss_mask).sum() / batch.loss_mask.sum().clamp_min(1.0)
    loss.backward()
    update_router_expert_bias(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    dt = time.perf_counter() - t0
    return float(loss.detach()), dt


def wrap_megatron(model: nn.Module, *, grad_reduce_in_fp32: bool = True, overlap_grad_reduce: bool = False) -> nn.Module:
    """Megatron's training wrapping of a (transformed) ``GPTModel``: ``Float16Module`` when the
    model's config trains in bf16 / fp16, then Megatron's ``DistributedDataParallel`` (replicated
    optimizer; NorMuon does not support the distributed one). Build the optimizer from the result
    (``vpmoe_compile.build_optimizer(wrapped)``) and call ``finalize_model_grads([wrapped])``
    after backward."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = model.config
    inner = Float16Module(config, model) if (config.bf16 or config.fp16) else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=False,
    )
    return DistributedDataParallel(config, ddp_config, inner)
