"""One-process torch.distributed + Megatron parallel-state set-up (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the MASTER_PORT of the one-process world init_process started itself (None: a launcher's)
_SELF_STARTED = [None]


def init_process(
    seed: int = 1234,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    backend: Optional[str] = None,
) -> None:
    """Initialise ``torch.distributed`` and Megatron's parallel state; safe to call twice.

    Without a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) it starts a world of
    one process on a free loopback port. ``backend`` defaults to ``nccl`` when CUDA is
    available, else ``gloo``. It also seeds Megatron's RNG trackers: the CUDA tracker on GPU,
    the inference tracker (whose ``fork()`` is a null context) on CPU, where the CUDA one
    would call ``torch.cuda.get_rng_state`` (docs/design.md#compat-fixes). The compat fixes
    of :mod:`megatron_base.compat` are applied first.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_base import compat

    compat.apply()
    on_gpu = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        if _SELF_STARTED[0] and os.environ.get("MASTER_PORT") == _SELF_STARTED[0]:
            # our own one-process world was torn down: its port may still be held; take a new one
            os.environ["MASTER_PORT"] = _SELF_STARTED[0] = str(_free_port())
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            _SELF_STARTED[0] = os.environ["MASTER_PORT"]
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend or ("nccl" if on_gpu else "gloo"))
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
        want = (tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size)
        if have != want:
            raise RuntimeError(
                f"Megatron's parallel state is already initialised with (TP, PP, EP) = {have}, not the {want} "
                "asked for; call megatron_base.destroy_process() first (or start a new process)"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            # experts are never tensor-split (NorMuon orthogonalises whole expert matrices; the
            # grouped experts scale with expert parallelism): Megatron's default is ETP = TP
            expert_tensor_parallel_size=1,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not on_gpu, force_reset_rng=True)


def is_initialized() -> bool:
    """True once :func:`init_process` (or a launcher's equivalent) has set up both
    ``torch.distributed`` and Megatron's model-parallel state."""
    from megatron.core import parallel_state

    return torch.distributed.is_available() and torch.distributed.is_initialized() and bool(
        parallel_state.model_parallel_is_initialized()
    )


def require_initialized(what: str) -> None:
    """Raise a ``RuntimeError`` that says to call :func:`init_process` unless the process is
    initialised (Megatron itself fails later, deep inside a module constructor, with an
    assertion such as 'pipeline_model parallel group is not initialized')."""
    if is_initialized():
        return
    missing = []
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        missing.append("torch.distributed is not initialized")
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        missing.append("Megatron's model-parallel state is not initialized")
    raise RuntimeError(
        f"{what} needs torch.distributed and Megatron's parallel state ({'; '.join(missing)}): "
        "call megatron_base.init_process() first, once per process (it starts a one-process "
        "gloo/nccl world when no launcher set RANK/WORLD_SIZE), or initialise them yourself "
        "with torch.distributed.init_process_group() and "
        "megatron.core.parallel_state.initialize_model_parallel()"
    )


def destroy_process() -> None:
    """Tear down Megatron's parallel state and the process group (tests, scripts)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
