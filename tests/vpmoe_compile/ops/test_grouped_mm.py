"""grouped_mm: reference op vs float64, gradients, empty groups, bad input, the fused GPU path."""

import pytest
import torch

from vpmoe_compile.ops.grouped_mm import grouped_mm, grouped_mm_reference, supports


def _loop64(x, w, counts):
    """float64 ``x_g @ w[g].T`` by explicit slicing (w is the stacked ``[G, N, K]`` weight)."""
    outs, start = [], 0
    for g, c in enumerate(counts):
        outs.append(x[start : start + c].double() @ w[g].double().T)
        start += c
    return torch.cat(outs)


def _case(counts, K=16, N=24, dtype=torch.float32, device="cpu"):
    M = sum(counts)
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(len(counts), N, K, dtype=dtype, device=device, requires_grad=True)
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    return x, w, offs


@pytest.mark.parametrize("counts", [[3, 5, 2, 6], [0, 4, 0, 7], [9, 0, 0, 0], [0, 0, 0, 0], [1]])
def test_reference_op_matches_float64_with_gradients(counts):
    x, w, offs = _case(counts)
    out = grouped_mm(x, w.mT, offs)
    ref = _loop64(x, w, counts)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    _loop64(x64, w64, counts).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    for e, c in enumerate(counts):  # a group with no rows gets an exactly zero weight gradient
        if c == 0:
            assert torch.count_nonzero(w.grad[e]) == 0


def test_custom_op_registration_is_consistent():
    x, w, offs = _case([2, 0, 3])
    torch.library.opcheck(torch.ops.vpmoe.grouped_mm.default, (x, w.mT.detach().requires_grad_(), offs))


def test_reference_function_zeroes_rows_past_the_last_offset():
    x = torch.randn(6, 8)
    b = torch.randn(2, 8, 4)
    out = grouped_mm_reference(x, b, torch.tensor([2, 4], dtype=torch.int32))
    assert torch.count_nonzero(out[4:]) == 0
    torch.testing.assert_close(out[:2], x[:2] @ b[0])


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([1, 4])), TypeError, "int32"),
        ((torch.randn(4, 8), torch.randn(2, 7, 3), torch.tensor([1, 4], dtype=torch.int32)), ValueError, "share K"),
        ((torch.randn(4, 8), torch.randn(3, 8, 3), torch.tensor([1, 4], dtype=torch.int32)), ValueError, "one entry per group"),
        ((torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([3, 1], dtype=torch.int32)), ValueError, "non-decreasing"),
        ((torch.randn(4, 8, 1), torch.randn(2, 8, 3), torch.tensor([1, 4], dtype=torch.int32)), ValueError, r"x \[M, K\]"),
    ],
)
def test_bad_input_is_refused_with_a_message(args, err, match):
    with pytest.raises(err, match=match):
        grouped_mm(*args)


def test_supports_is_false_on_cpu():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert not supports({"k": 16, "n": 16}, x.dtype, x.device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_path_bf16_accuracy_and_no_host_sync():
    """bf16 fused grouped GEMM (torch._grouped_mm) on the GPU: output and gradients within 2x the
    error of a bf16-input fp32-math reference against float64, with an empty expert, and no host
    synchronisation in forward or backward."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("fused grouped GEMM needs sm90+")
    counts = [130, 0, 257, 64, 1, 300, 0, 160]
    x, w, offs = _case(counts, K=1024, N=128, dtype=torch.bfloat16, device="cuda")
    assert supports({"k": x.shape[1], "n": w.shape[1]}, x.dtype, x.device)
    g = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_mm(x, w.mT, offs)
        out.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _loop64(x64, w64, counts)
    ref.backward(g.double())
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    alt = torch.cat([xf[a:b] @ wf[e].T for e, (a, b) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    alt_b = alt.bfloat16()
    alt.backward(g.float())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    assert rel(out, ref) <= 2 * rel(alt_b, ref) + 1e-6
    assert rel(x.grad, x64.grad) <= 2 * rel(xf.grad.bfloat16(), x64.grad) + 1e-6
    assert rel(w.grad, w64.grad) <= 2 * rel(wf.grad.bfloat16(), w64.grad) + 1e-6
    assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[6]) == 0
