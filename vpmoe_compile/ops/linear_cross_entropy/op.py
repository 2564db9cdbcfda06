"""``linear_cross_entropy``: the LM head's output projection fused with the cross-entropy loss.

``loss[i] = logsumexp_v(h_i · W_v) − h_i · W_{label_i}`` for ``hidden [N, h]``, ``weight [V, h]``
and ``labels [N]``, in fp32 math, **without the ``[N, V]`` fp32 logits**. The stock Megatron head
materialises them (bf16 ``[s, b, V]`` logits, then an fp32 copy, the softmax and its gradient
inside ``vocab_parallel_cross_entropy``); at ``V = 201,088`` that is ≈ 0.8 MB per token.

How (a ``torch.autograd.Function`` with static Python loops over chunks):

* **forward**, in chunks of ``chunk_size`` tokens: the chunk's logits ``[c, V]`` in fp32 (one
  GEMM with fp32 output: 16-bit inputs, fp32 accumulation, the product never rounded to 16 bits),
  then max, target logit, ``Σ exp(l − max)`` and the loss with Megatron's arithmetic
  (``log Σ exp(l − max) − (l_target − max)``). Saved for backward: the inputs and the fp32
  ``lse [N]`` — nothing of size ``N × V``.
* **backward**, in vocabulary slices ``[v0, v1)`` over all tokens: the slice's logits are
  recomputed, ``d_logits = (exp(l − lse) − onehot(label)) · grad_loss`` (fp32, then rounded to
  the input dtype for the two GEMMs, as the stock bf16 path does),
  ``d_weight[v0:v1] = d_logitsᵀ · hidden`` (written once) and
  ``d_hidden += d_logits · W[v0:v1]`` (fp32 accumulator ``[N, h]``). Slicing the vocabulary
  rather than the tokens in backward means the accumulated gradient is the small ``[N, h]`` one,
  not the ``[V, h]`` weight gradient (≈ 16x less accumulation traffic at N = 8192); a slice has
  about as many elements as a forward chunk (``⌈chunk_size · V / N⌉`` columns, a multiple of
  128). ``grad_loss`` is arbitrary per token.
* **the target element's rounding**: a row's dominant gradient element is ``(p_t − 1)·g``; with
  Megatron's usual ``g = loss_mask / num_tokens`` it is the same number in every row, so its
  bf16 rounding error does not average out (stock Megatron: d_hidden / d_weight ≈ 2.2x the error
  of an fp32-math reference at full size). The op adds each row's fp32 rounding residual of that
  element back (``resid · W[label]`` into ``d_hidden``, ``resid · h`` into ``d_weight``'s fp32
  GEMM output before its rounding): ≈ 1.0x.
* FLOPs: 4 GEMMs of ``2·N·h·V`` (forward, recompute, ``d_hidden``, ``d_weight``) against the
  stock head's 3: 4/3 of the stock head's matmul work, in exchange for never holding the logits.

Labels follow Megatron's ``vocab_parallel_cross_entropy`` exactly (there is no ignore index):
a label outside ``[0, V)`` (``-100`` included) drops the target term, the loss is
``logsumexp(l) − max(l)`` and the logits' gradient is ``softmax(l) · grad_loss``; see
:mod:`.reference`. Megatron's training loop multiplies the per-token loss by its loss mask.

Implementation: the GEMMs are ``torch.mm`` (cuBLAS, ``out_dtype=torch.float32`` for 16-bit
inputs on CUDA; upcast elsewhere). On CUDA the two elementwise passes are Triton kernels
(:mod:`.triton`, one read of each fp32 chunk), registered as ``torch.library`` custom
ops with fake impls; elsewhere (and with ``backend="torch"``) they are torch ops. Why not leave
them to Inductor: it fused the chunks' elementwise kernels horizontally, which kept every
chunk's fp32 logits alive at once (compiled peak 6.14 GiB = the whole ``[N, V]`` fp32 at
N = 8192, H100), and in eager the torch ops read each chunk four or five times (51 ms vs 30 ms
fwd+bwd). Why an ``autograd.Function`` rather than one opaque custom op: TorchDynamo traces its
forward and backward (loops over static shapes, no data-dependent shapes, no ``.item()``, no
host synchronisation), so ``torch.compile(fullgraph=True)`` sees the GEMMs and the kernels in
one graph without a break; AOTAutograd keeps the function's own backward, so under compile too
only ``ctx.save_for_backward``'s tensors are kept and the logits are recomputed.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["DEFAULT_CHUNK_SIZE", "linear_cross_entropy", "backward_vocab_slice"]

#: Tokens per forward chunk. At V = 201,088 a chunk's fp32 logits are 0.82 GB. Measured on an
#: H100 at N = 8192, h = 1024 (``benchmarks/head.py --sweep``), fwd+bwd eager / compiled and peak:
#: 512: 31.8 / 28.4 ms, 1.1 GiB; 1024: 29.7 / 28.2 ms, 1.7 GiB; 2048: 28.5 / 27.0 ms, 3.0 GiB;
#: 4096: 28.1 / 27.1 ms, 5.4 GiB. 1024 is within 5 % of the fastest at a third of the memory.
DEFAULT_CHUNK_SIZE = 1024

_SLICE_ALIGN = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# aten::mm.dtype (16-bit inputs, fp32 output) exists on CUDA in recent PyTorch.
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")

try:
    from . import triton as _triton
except ImportError:  # no triton: the torch path everywhere
    _triton = None


def backward_vocab_slice(num_tokens: int, vocab: int, chunk_size: int) -> int:
    """Columns per backward vocabulary slice: about ``chunk_size × vocab`` elements per slice
    (the forward chunk's size), a multiple of 128, at most ``vocab``."""
    cols = math.ceil(chunk_size * vocab / max(num_tokens, 1))
    cols = ((cols + _SLICE_ALIGN - 1) // _SLICE_ALIGN) * _SLICE_ALIGN
    return max(1, min(vocab, cols))


def _f32_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as it enters :func:`_mm_f32`: unchanged where a 16-bit GEMM can write fp32, else
    upcast (CPU, or a PyTorch without ``mm(out_dtype=)``). Hoisted out of the chunk loops."""
    if t.dtype == torch.float32 or (t.is_cuda and _HAS_MM_OUT_DTYPE):
        return t
    return t.float()


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 with fp32 accumulation; 16-bit products are never rounded to 16 bits."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _HAS_MM_OUT_DTYPE and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: int):
    """Megatron's loss arithmetic on one chunk of fp32 logits ``[c, V]`` (overwritten).

    Returns ``(loss [c], lse [c])``, both fp32."""
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(valid, labels, 0)
    lmax = logits.amax(dim=-1)
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    if torch.compiler.is_compiling():
        sum_exp = torch.exp(logits - lmax.unsqueeze(1)).sum(dim=-1)  # one fused kernel
    else:
        sum_exp = logits.sub_(lmax.unsqueeze(1)).exp_().sum(dim=-1)  # in place: no second buffer
    log_sum = torch.log(sum_exp)
    loss = log_sum - torch.where(valid, target - lmax, 0.0)
    return loss, lmax + log_sum


def _slice_dlogits_torch(logits, lse2, g2, local, idx, dtype, compiling):
    """Torch version of :func:`.triton.chunk_dlogits` on one vocabulary slice of fp32
    logits ``[N, c]`` (overwritten in eager): ``(d_logits [N, c] in dtype, residual [N] | None)``."""
    c = logits.shape[1]
    hit = ((local >= 0) & (local < c)).unsqueeze(1)  # [N, 1]: the row's label is in this slice
    idx2 = idx.unsqueeze(1)
    need_resid = dtype != torch.float32
    if need_resid:
        target = logits.gather(1, idx2)  # [N, 1], before the in-place ops below
    if compiling:  # all pointwise: Inductor makes it one pass over the fp32 logits
        onehot = torch.arange(c, device=logits.device).unsqueeze(0) == local.unsqueeze(1)
        dlog = ((torch.exp(logits - lse2) - onehot.to(torch.float32)) * g2).to(dtype)
    else:
        prob = logits.sub_(lse2).exp_()
        prob.scatter_add_(1, idx2, -hit.to(torch.float32))
        if not need_resid:
            dlog = prob.mul_(g2)
        else:  # fp32 math, one rounding to the gradient dtype, no fp32 temporary
            dlog = torch.mul(prob, g2, out=torch.empty(prob.shape, dtype=dtype, device=prob.device))
    if not need_resid:
        return dlog, None
    d_t = (torch.exp(target - lse2) - hit.to(torch.float32)) * g2  # the target element, fp32
    resid = torch.where(hit, d_t - d_t.to(dtype).to(torch.float32), 0.0)
    return dlog, resid.squeeze(1)


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend == "auto":
        return t.is_cuda and _triton is not None
    if backend == "triton" and _triton is None:
        raise RuntimeError("linear_cross_entropy: backend='triton' needs the triton package")
    if backend == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"linear_cross_entropy: backend='triton' needs CUDA tensors (got {t.device}) or "
            "TRITON_INTERPRET=1; use backend='auto' or 'torch' on this device"
        )
    return backend == "triton"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, backend):
        n = hidden.shape[0]
        vocab = weight.shape[0]
        triton = _use_triton(backend, hidden)
        w_t = _f32_operand(weight).t()  # [h, V]
        losses, lses = [], []
        for i0 in range(0, n, chunk_size):
            logits = _mm_f32(hidden[i0 : i0 + chunk_size], w_t)  # [c, V] fp32
            if triton:
                loss, lse = _triton.chunk_loss(logits, labels[i0 : i0 + chunk_size])
            else:
                loss, lse = _chunk_loss(logits, labels[i0 : i0 + chunk_size], vocab)
            del logits
            losses.append(loss)
            lses.append(lse)
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        ctx.triton = triton
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = hidden.dtype
        cols = backward_vocab_slice(n, vocab, ctx.chunk_size)
        compiling = torch.compiler.is_compiling()
        g = grad_loss.float().contiguous()  # [N]
        g2, lse2 = g.unsqueeze(1), lse.unsqueeze(1)
        h32 = _f32_operand(hidden)
        hidden_f = hidden.float() if dtype != torch.float32 else hidden  # residual terms only
        dh = None
        dw = torch.empty_like(weight) if need_dw and not compiling else None
        dw_parts = []
        for v0 in range(0, vocab, cols):
            w_v = weight[v0 : v0 + cols]  # [c, h]
            c = w_v.shape[0]
            logits = _mm_f32(h32, _f32_operand(w_v).t())  # [N, c] fp32, recomputed
            # d_logits = (softmax - onehot(label)) * g on this slice; a label outside [0, V)
            # falls in no slice (Megatron: no target term). For 16-bit gradients the target
            # element's rounding residual (fp32) is added back below, so the dominant onehot
            # term is not rounded (the bf16 rounding of the rest is random across elements).
            local = labels - v0
            idx = local.clamp(0, c - 1)
            if ctx.triton:
                dlog, resid = _triton.chunk_dlogits(logits, lse, g, labels, v0, dtype)
                resid = resid if dtype != torch.float32 else None
            else:
                dlog, resid = _slice_dlogits_torch(logits, lse2, g2, local, idx, dtype, compiling)
            del logits
            if need_dh:
                part = _mm_f32(dlog, _f32_operand(w_v))  # [N, h] fp32
                if resid is not None:
                    part = part + resid.unsqueeze(1) * w_v[idx].float()
                if dh is None:
                    dh = part
                else:
                    dh = dh + part if compiling else dh.add_(part)
            if need_dw:
                if resid is None:
                    dw_v = torch.mm(dlog.t(), hidden) if compiling else torch.mm(dlog.t(), hidden, out=dw[v0 : v0 + c])
                else:
                    acc = _mm_f32(dlog.t(), hidden)  # [c, h] fp32
                    acc = acc.index_add(0, idx, resid.unsqueeze(1) * hidden_f)  # rows with resid 0 add 0
                    dw_v = acc.to(dtype) if compiling else dw[v0 : v0 + c].copy_(acc)
                dw_parts.append(dw_v)
            del dlog
        d_hidden = dh.to(dtype) if need_dh else None
        if need_dw and compiling:
            dw = dw_parts[0] if len(dw_parts) == 1 else torch.cat(dw_parts)
        return d_hidden, dw if need_dw else None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token cross entropy of the logits ``hidden · weightᵀ``, never materialised in fp32.

    Args:
        hidden: ``[N, h]`` (fp32, bf16 or fp16), e.g. the final hidden states ``[s, b, h]``
            flattened to ``[s·b, h]``.
        weight: ``[V, h]``, same dtype and device as ``hidden`` (the output layer's weight, or the
            tied word-embedding weight).
        labels: ``[N]`` integer class ids. A label outside ``[0, V)`` (e.g. ``-100``) is treated
            exactly as Megatron's ``vocab_parallel_cross_entropy`` treats it (no target term; see
            the module docstring); mask such tokens with the loss mask.
        chunk_size: tokens per forward chunk (the backward slices the vocabulary into pieces of
            about ``chunk_size × V`` elements). Peak extra memory is about
            ``chunk_size × V × 6`` bytes (fp32 logits + 16-bit gradient of one chunk).
        backend: ``"auto"`` (Triton kernels for the elementwise passes on CUDA, torch ops
            elsewhere), ``"triton"`` (also on the CPU under ``TRITON_INTERPRET=1``) or
            ``"torch"``. The GEMMs are cuBLAS / ATen either way.

    Returns:
        ``loss [N]`` fp32 (matmul in the input dtype with fp32 accumulation and output, softmax in
        fp32), differentiable w.r.t. ``hidden`` and ``weight`` for any per-token ``grad_output``.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear_cross_entropy expects hidden [N, h] and weight [V, h], got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}; flatten [s, b, h] to [s*b, h]"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden size mismatch, hidden {tuple(hidden.shape)} vs weight "
            f"{tuple(weight.shape)} (weight must be [V, h])"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"linear_cross_entropy expects labels [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}; "
            "for Megatron's [b, s] labels with [s, b, h] hidden, pass labels.t().reshape(-1)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be integer class ids, got {labels.dtype}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"linear_cross_entropy needs hidden and weight of one dtype among fp32/bf16/fp16, got "
            f"{hidden.dtype} and {weight.dtype}; cast them to the model's parameter dtype"
        )
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: hidden, weight and labels must be on one device, got "
            f"{hidden.device}, {weight.device}, {labels.device}"
        )
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"linear_cross_entropy: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return _LinearCrossEntropy.apply(hidden, weight, labels.long().contiguous(), chunk_size, backend)
