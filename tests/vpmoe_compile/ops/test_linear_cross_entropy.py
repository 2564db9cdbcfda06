"""The fused LM head + loss op against float64, Megatron's cross entropy and TorchDynamo.

Accuracy rule (as for the attention kernels): the op's relative error against a float64
reference is at most 2x that of the plain-PyTorch reference run on the same inputs with fp32
math, plus a small absolute slack for quantities both compute to fp32 rounding.
"""

import pytest
import torch

from vpmoe_compile.ops.linear_cross_entropy import (
    backward_vocab_slice,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

NAMES = ("loss", "d_hidden", "d_weight")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _inputs(n, v, h, dtype=torch.float32, device="cpu", ignore=True):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) / h**0.5 * 3.0).to(dtype)  # peaked softmax
    labels = torch.randint(0, v, (n,), device=device)
    if ignore:
        labels[::7] = -100
    # Megatron's loss mask times a normaliser: non-uniform, zeros included, one negative.
    grad = torch.rand(n, device=device) * 2.0
    grad[::5] = 0.0
    grad[1] = -0.5
    return hidden, weight, labels, grad


def _run(fn, hidden, weight, labels, grad, cast=None):
    hl = (hidden if cast is None else hidden.to(cast)).detach().clone().requires_grad_(True)
    wl = (weight if cast is None else weight.to(cast)).detach().clone().requires_grad_(True)
    loss = fn(hl, wl, labels)
    dh, dw = torch.autograd.grad(loss, (hl, wl), grad.to(loss.dtype))
    return loss.detach(), dh, dw


def _truth(hidden, weight, labels, grad):
    return _run(lambda h, w, l: linear_cross_entropy_reference(h, w, l, torch.float64), hidden, weight, labels, grad, torch.float64)


def _fp32_math(hidden, weight, labels, grad):
    return _run(linear_cross_entropy_reference, hidden, weight, labels, grad)


def _assert_rule(got, ref, truth, slack=1e-6, factor=2.0):
    for name, g, r, t in zip(NAMES, got, ref, truth):
        assert g.dtype == (torch.float32 if name == "loss" else r.dtype), name
        assert torch.isfinite(g).all(), name
        eg, er = _rel(g, t), _rel(r, t)
        assert eg <= factor * er + slack, f"{name}: op error {eg:.3e} vs fp32-math reference {er:.3e}"


@pytest.mark.parametrize(
    "n,v,h,chunk",
    [
        (37, 1009, 32, 8),  # N not a multiple of the chunk, V prime
        (37, 1009, 32, 100),  # chunk larger than N
        (130, 5003, 48, 32),  # several backward vocabulary slices
    ],
)
def test_fp32_matches_float64(n, v, h, chunk):
    hidden, weight, labels, grad = _inputs(n, v, h)
    fused = lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=chunk)  # noqa: E731
    got = _run(fused, hidden, weight, labels, grad)
    truth = _truth(hidden, weight, labels, grad)
    _assert_rule(got, _fp32_math(hidden, weight, labels, grad), truth)
    for name, g, t in zip(NAMES, got, truth):
        assert _rel(g, t) < 2e-6, name


def test_backward_slices_cover_the_vocabulary():
    assert backward_vocab_slice(8192, 201088, 1024) % 128 == 0
    assert backward_vocab_slice(10, 1009, 1024) == 1009  # one slice
    n, v, h = 300, 2003, 16
    cols = backward_vocab_slice(n, v, 16)
    assert 1 < -(-v // cols) and v % cols != 0  # several slices, a ragged last one
    hidden, weight, labels, grad = _inputs(n, v, h)
    labels[-1] = v - 1  # a label in the last, ragged slice
    got = _run(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=16), hidden, weight, labels, grad)
    truth = _truth(hidden, weight, labels, grad)
    _assert_rule(got, _fp32_math(hidden, weight, labels, grad), truth)


def test_labels_outside_vocab_match_megatron_cross_entropy(megatron_env):
    """Megatron's vocab_parallel_cross_entropy has no ignore index: -100 (or any label outside
    [0, V)) keeps logsumexp - max as the loss and softmax as the gradient. Match it exactly."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    n, v, h = 24, 777, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL process group on a GPU machine
    hidden, weight, labels, grad = _inputs(n, v, h, ignore=False, device=device)
    labels[0], labels[5], labels[6], labels[11] = -100, -1, v, v + 50

    def megatron(hl, wl, lab):
        logits = (hl @ wl.t()).unsqueeze(1)  # [s=N, b=1, V] fp32
        return vocab_parallel_cross_entropy(logits, lab.unsqueeze(1)).squeeze(1)

    ref = _run(megatron, hidden, weight, labels, grad)
    got = _run(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=5), hidden, weight, labels, grad)
    for name, g, r in zip(NAMES, got, ref):
        assert _rel(g, r) < 2e-6, name
    ignored = torch.tensor([0, 5, 6, 11], device=device)
    logits = hidden.double() @ weight.double().t()
    expect = torch.logsumexp(logits, -1) - logits.amax(-1)
    assert torch.allclose(got[0][ignored].double(), expect[ignored], rtol=1e-5, atol=1e-5)
    # the reference agrees with Megatron too (its gradient through the detached max)
    ref64 = _truth(hidden, weight, labels, grad)
    for name, r, t in zip(NAMES, ref, ref64):
        assert _rel(r, t) < 2e-6, name


@pytest.mark.parametrize("uniform", [False, True], ids=["random_grad", "uniform_grad"])
def test_bf16_within_2x_of_fp32_math_reference(uniform):
    """With a uniform incoming gradient (Megatron's loss_mask / num_tokens) every token's
    dominant d_logits element (p_t - 1)·g has the same bf16 rounding error; the op adds that
    residual back, so the error stays at the reference's (stock Megatron: ~2.2x at full size).
    Factor 1.5 (stricter than the 2x rule): at this size the unfixed rounding gives ~1.7x."""
    hidden, weight, labels, grad = _inputs(150, 3001, 64, dtype=torch.bfloat16)
    if uniform:
        grad = torch.full_like(grad, 1.37 / 150)
    got = _run(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=64), hidden, weight, labels, grad)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    _assert_rule(got, _fp32_math(hidden, weight, labels, grad), _truth(hidden, weight, labels, grad), factor=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_match_torch_path(dtype):
    """The Triton elementwise kernels (CUDA; here under TRITON_INTERPRET) against the torch path
    and float64. (The interpreter's bf16 cast truncates, so bf16 is checked on the GPU.)"""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    n, v, h = 45, 1201, 32
    hidden, weight, labels, grad = _inputs(n, v, h, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    labels[3] = v + 2
    run = lambda backend: _run(  # noqa: E731
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=16, backend=backend), hidden, weight, labels, grad
    )
    tri, tor = run("triton"), run("torch")
    for name, a, b in zip(NAMES, tri, tor):
        assert _rel(a, b) < (2e-6 if name == "loss" or dtype == torch.float32 else 2e-3), name
    _assert_rule(tri, _fp32_math(hidden, weight, labels, grad), _truth(hidden, weight, labels, grad))


def test_forward_saves_no_logits():
    """Only O(N·h + V·h + N) elements are kept for backward, never N·V."""
    n, v, h = 64, 4099, 8
    hidden, weight, labels, grad = _inputs(n, v, h)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert sum(saved) <= n * h + v * h + 2 * n and max(saved) < n * v
    loss.backward(grad)


def test_frozen_weight_and_tied_use():
    """Only the gradients asked for are computed; the same weight used twice (tied embedding:
    lookup + head) accumulates both contributions."""
    n, v, h = 20, 301, 16
    hidden, weight, labels, grad = _inputs(n, v, h)
    hl = hidden.clone().requires_grad_(True)
    dh, = torch.autograd.grad(linear_cross_entropy(hl, weight, labels, chunk_size=6), (hl,), grad)
    assert _rel(dh, _truth(hidden, weight, labels, grad)[1]) < 2e-6

    ids = torch.randint(0, v, (n,))
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    (linear_cross_entropy(torch.nn.functional.embedding(ids, w1), w1, labels, chunk_size=7) * grad).sum().backward()
    (linear_cross_entropy_reference(torch.nn.functional.embedding(ids, w2), w2, labels) * grad).sum().backward()
    assert _rel(w1.grad, w2.grad) < 2e-6


def test_dynamo_fullgraph_no_graph_break_and_compiled_matches():
    import torch._dynamo

    n, v, h = 45, 1001, 16
    hidden, weight, labels, grad = _inputs(n, v, h)
    fused = lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=16)  # noqa: E731
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(fused)(hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True), labels)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=False)
        got = _run(compiled, hidden, weight, labels, grad)  # traces forward AND backward bodies
    finally:
        torch._dynamo.reset()
    want = _run(fused, hidden, weight, labels, grad)
    for name, g, w in zip(NAMES, got, want):
        assert _rel(g, w) < 1e-6, name


def test_bad_inputs_are_refused_with_a_reason():
    h, w, l = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"flatten \[s, b, h\]"):
        linear_cross_entropy(h.view(2, 2, 8), w, l)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_cross_entropy(h, torch.randn(10, 7), l)
    with pytest.raises(ValueError, match=r"labels \[N\]"):
        linear_cross_entropy(h, w, l[:3])
    with pytest.raises(ValueError, match="integer class ids"):
        linear_cross_entropy(h, w, l.float())
    with pytest.raises(ValueError, match="one dtype"):
        linear_cross_entropy(h, w.bfloat16(), l)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, l, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_accuracy_and_no_fp32_logits():
    n, v, h, chunk = 3000, 50_021, 512, 512  # N not a multiple of the chunk, V odd
    hidden, weight, labels, grad = _inputs(n, v, h, dtype=torch.bfloat16, device="cuda")
    grad = torch.where(labels >= 0, 1.0 / n, 0.0)  # Megatron: loss_mask / num_tokens
    fused = lambda a, b, c: linear_cross_entropy(a, b, c, chunk_size=chunk)  # noqa: E731
    truth = _truth(hidden, weight, labels, grad)
    ref = _fp32_math(hidden, weight, labels, grad)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = _run(fused, hidden, weight, labels, grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _assert_rule(got, ref, truth)
    assert peak < n * v * 4, f"peak {peak / 2**20:.0f} MiB reaches the size of the fp32 logits"
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)
        _assert_rule(_run(compiled, hidden, weight, labels, grad), ref, truth)
    finally:
        torch._dynamo.reset()
