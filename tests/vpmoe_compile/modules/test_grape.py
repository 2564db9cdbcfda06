"""GRAPE-M / GRAPE-A modules (docs/design.md#grape)."""

import math

import pytest
import torch

from vpmoe_compile.modules.grape import GrapeA, GrapeMRotaryEmbedding, apply_grape_m, grape_m_cos_sin
from vpmoe_compile.ops.sink_attention.alibi import alibi_slopes


def _rotation_matrix(g: GrapeMRotaryEmbedding, n: int, dtype=torch.float64) -> torch.Tensor:
    """G(n) as a d x d matrix: the library's own rotation (``grape_m_cos_sin`` +
    ``apply_grape_m``) applied to the d basis vectors at position n."""
    d = g.kv_channels
    cos, sin = grape_m_cos_sin(g(n + 1).to(dtype), n + 1)
    x = torch.eye(d, dtype=dtype)[None, :, None, :].expand(n + 1, d, 1, d)  # [s, b = d vectors, 1, d]
    y = apply_grape_m(x, cos, sin)
    return y[n, :, 0, :].T  # column j = G(n) e_j


def _grape64(d=16):
    g = GrapeMRotaryEmbedding(d, log_freq_scale=16.0)
    g.log_freq.data = g.log_freq.data.double() + torch.randn(d // 2, dtype=torch.float64) * 0.5
    return g


def test_group_law_and_orthogonality():
    g = _grape64()
    with torch.no_grad():
        for n, m in [(0, 5), (3, 7), (11, 2)]:
            Gn, Gm, Gnm = _rotation_matrix(g, n), _rotation_matrix(g, m), _rotation_matrix(g, n + m)
            assert torch.allclose(Gnm, Gn @ Gm, atol=1e-12)
            assert torch.allclose(Gn.T @ Gn, torch.eye(16, dtype=torch.float64), atol=1e-12)
            assert abs(torch.linalg.det(Gn).item() - 1) < 1e-12
        assert torch.allclose(_rotation_matrix(g, 0), torch.eye(16, dtype=torch.float64))


def test_matches_matrix_exponential_definition():
    """G(n) = expm(n * sum_p f_p L_p), L_p = e_{p+P} e_p^T - e_p e_{p+P}^T."""
    g = _grape64()
    d, P = 16, 8
    f = g.frequencies().detach()
    L = torch.zeros(d, d, dtype=torch.float64)
    for p in range(P):
        L[p + P, p] += f[p]
        L[p, p + P] -= f[p]
    for n in (1, 4, 9):
        assert torch.allclose(_rotation_matrix(g, n).detach(), torch.linalg.matrix_exp(n * L), atol=1e-12)


def test_layout_unit_vector_rotates_into_its_plane():
    g = GrapeMRotaryEmbedding(16)
    cos, sin = grape_m_cos_sin(g(6).detach(), 6)
    x = torch.zeros(6, 1, 1, 16)
    x[..., 2] = 1.0
    y = apply_grape_m(x, cos, sin)
    assert torch.allclose(y[..., 2], cos[:, None, None, 2]) and torch.allclose(y[..., 10], sin[:, None, None, 2])
    assert y[..., [i for i in range(16) if i not in (2, 10)]].abs().max() == 0


def test_norm_preservation_fp32():
    g = GrapeMRotaryEmbedding(128)
    cos, sin = grape_m_cos_sin(g(4096).detach(), 4096)
    x = torch.randn(4096, 1, 2, 128)
    y = apply_grape_m(x, cos, sin)
    ratio = y.norm(dim=-1) / x.norm(dim=-1)
    assert (ratio - 1).abs().max() < 1e-5


def test_bf16_rotation_is_fp32_math():
    g = GrapeMRotaryEmbedding(128)
    cos, sin = grape_m_cos_sin(g(512).detach(), 512)
    x = torch.randn(512, 2, 4, 128).bfloat16()
    y = apply_grape_m(x, cos, sin)
    exact = apply_grape_m(x.double(), cos.double(), sin.double())
    assert y.dtype == torch.bfloat16
    # within half a bf16 ulp of the exact rotation (rounding once at the end)
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)
    assert ((y.double() - exact).abs() <= 0.51 * ulp + 1e-6).float().mean() > 0.999


def test_rope_recovery_at_init_against_megatron():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    S, d = 4096, 128
    stock = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = stock.get_freqs_non_repeated(S)
    stock_emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    g = GrapeMRotaryEmbedding(d, rotary_base=10000.0, log_freq_scale=16.0)
    ours = g(S).detach()
    assert (g.frequencies().detach() / stock.inv_freq - 1).abs().max() <= 1e-6
    assert (ours - stock_emb).abs().max() <= 1e-4  # angle difference at S = 4096 (measured 6e-5 rad)
    x = torch.randn(S, 1, 2, d)
    y_stock = _apply_rotary_pos_emb_bshd(x, stock_emb)
    cos, sin = grape_m_cos_sin(ours, S)
    assert (apply_grape_m(x, cos, sin) - y_stock).abs().max() <= 5e-4
    # Frozen mode uses the RoPE inverse frequencies directly: bitwise equal tables.
    frozen = GrapeMRotaryEmbedding(d, learnable=False)
    assert torch.equal(frozen(S), stock_emb)


def test_log_freq_gradient_by_finite_differences():
    """A cross-position loss sum_ij W_ij (G(i) q_i).(G(j) k_j) (a same-position loss would have
    zero gradient and make the test vacuous); float64 central differences vs autograd."""
    torch.manual_seed(0)
    g = _grape64(d=8)
    S = 12
    q, k = torch.randn(S, 1, 1, 8, dtype=torch.float64), torch.randn(S, 1, 1, 8, dtype=torch.float64)
    W = torch.randn(S, S, dtype=torch.float64)

    def loss():
        emb = g(S)
        cos, sin = torch.cos(emb[:, 0, 0, :4]), torch.sin(emb[:, 0, 0, :4])
        qr, kr = apply_grape_m(q, cos, sin), apply_grape_m(k, cos, sin)
        return (W * (qr[:, 0, 0] @ kr[:, 0, 0].T)).sum()

    g.log_freq.grad = None
    loss().backward()
    auto = g.log_freq.grad.clone()
    assert auto.abs().max() > 1e-3
    fd = torch.empty_like(auto)
    h = 1e-6
    with torch.no_grad():
        for p in range(4):
            g.log_freq[p] += h
            up = loss()
            g.log_freq[p] -= 2 * h
            down = loss()
            g.log_freq[p] += h
            fd[p] = (up - down) / (2 * h)
    assert torch.allclose(auto, fd, rtol=1e-6, atol=1e-8)


def test_per_head_frequencies_rejected():
    with pytest.raises(ValueError, match="per-head"):
        GrapeMRotaryEmbedding(16, share_across_heads=False)


@pytest.mark.parametrize("n", range(1, 17))
def test_alibi_slopes(n):
    def press(n):
        def pow2(m):
            start = 2 ** (-(2 ** -(math.log2(m) - 3)))
            return [start * start**i for i in range(m)]

        if math.log2(n).is_integer():
            return pow2(n)
        c = 2 ** math.floor(math.log2(n))
        return pow2(c) + pow2(2 * c)[0::2][: n - c]

    got = alibi_slopes(n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    want = torch.tensor(press(n), dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    if n == 8:
        assert got.tolist() == [2.0 ** -(i + 1) for i in range(8)]
    if n == 6:
        assert torch.allclose(got.double(), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3], dtype=torch.float64))


def test_grape_a_tp_slice():
    full = alibi_slopes(8)
    assert torch.equal(GrapeA(8, tp_rank=1, tp_size=2).slopes, full[4:])
