"""Shared pytest set-up.

* On a machine without CUDA the Triton kernels run under the Triton interpreter
  (``TRITON_INTERPRET=1``); the variable must be set before any ``@triton.jit``
  function is defined, so it is set here, before the package is imported.
* Megatron's ``@jit_fuser`` helpers would silently invoke Inductor on the first
  call on CPU; eager-only tests do not need that, the compile smoke test turns
  dynamo back on explicitly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def megatron_env():
    """torch.distributed (gloo, world size 1) + Megatron parallel state, once per session."""
    from megatron_base import init_process

    init_process(seed=1234)
    yield


@pytest.fixture()
def tiny_cfg():
    from megatron_base import load_config

    return load_config("tiny")


@pytest.fixture()
def tiny_model(megatron_env, tiny_cfg):
    """A freshly built stock tiny GPTModel (fp32, CPU)."""
    from megatron_base import build_stock_gpt
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    return build_stock_gpt(tiny_cfg, device="cpu")


def make_batch(b=2, s=32, vocab=201088, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return ids, pos


def train_steps(model, optimizer, steps, lrs=None):
    """Plain training steps on ``make_batch(2, 32, seed=step)`` for each ``step`` in ``steps``:
    forward with labels, mean loss, backward, the expert-bias update, optimizer step, zero grad.
    ``lrs[step]`` (if given) is written into every param group first. Returns the losses."""
    from vpmoe_compile.training import update_router_expert_bias

    losses = []
    for step in steps:
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
        ids, pos = make_batch(2, 32, seed=step)
        loss = model(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        update_router_expert_bias(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
