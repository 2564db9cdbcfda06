"""Plain-PyTorch reference of the fused LM head + loss: full logits, then cross entropy.

Semantics are those of Megatron-Core's ``vocab_parallel_cross_entropy`` at one tensor-parallel
rank (no label smoothing), which has **no ignore index**: a label outside ``[0, V)`` (``-100``
included) is masked out of the target term only. For such a token Megatron returns
``log Σ_v exp(l_v - max_v l_v)`` = ``logsumexp(l) - max(l)`` as its loss, and ``softmax(l)``
(times the incoming gradient) as the logits' gradient, i.e. the max is treated as a constant.
Here that is ``logsumexp(l) - max(l).detach()``, so autograd gives exactly Megatron's gradient.
Callers exclude such tokens with their loss mask, as Megatron's training loop does.
"""

from __future__ import annotations

import torch


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token ``logsumexp(h·Wᵀ) − (h·Wᵀ)[label]`` with the ``[N, V]`` logits materialised.

    Args:
        hidden: ``[N, h]``.
        weight: ``[V, h]``.
        labels: ``[N]`` integer; entries outside ``[0, V)`` are ignored as Megatron does (see the
            module docstring).
        compute_dtype: dtype of the logits and the loss math (``torch.float32`` for the
            "same inputs, fp32 math" reference, ``torch.float64`` for the ground truth). Inputs
            are upcast to it before the product, so 16-bit inputs give exact products.

    Returns:
        ``[N]`` in ``compute_dtype``. Differentiable w.r.t. ``hidden`` and ``weight``; the
        gradients come back in the inputs' dtypes.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()  # [N, V]
    vocab = logits.shape[-1]
    labels = labels.long()
    valid = (labels >= 0) & (labels < vocab)
    target = logits.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    return lse - torch.where(valid, target, logits.amax(dim=-1).detach())
