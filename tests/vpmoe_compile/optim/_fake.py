"""A tiny parameter tree with vpMoE's Megatron names and attributes (no Megatron needed).

Layers: 0 = local (TPA packed factors) + dense MLP, 1 = global (fused QKV) + MoE,
2 = local + MoE. Geometry: hidden 32, 4 heads, 2 query groups, head dim 8, 4 experts of ffn 8,
shared expert 16, TPA q-rank 2 / kv-rank 1.

``FakeVpMoE(stacked=True)`` holds the routed experts as grouped experts do: one contiguous 3-D
parameter per projection, ``mlp.experts.linear_fc1.weight`` ``[E, F1, h]`` and
``mlp.experts.linear_fc2.weight`` ``[E, h, F]`` with ``expert_stack = True`` (``F1 = 2F``,
``[gate ; up]`` rows, with ``gated=True``, which also gates the SequentialMLP variant).
"""

from types import SimpleNamespace

import torch
from torch import nn

HIDDEN, HEADS, GROUPS, D = 32, 4, 2, 8
EXPERTS, FFN, SHARED, DENSE_FFN = 4, 8, 16, 8
RQ, R = 2, 1
VOCAB = 50
TPA_ROWS = (
    ("a_q", HEADS * RQ),
    ("a_k", GROUPS * R),
    ("a_v", GROUPS * R),
    ("b_q", RQ * D),
    ("b_k", R * D),
    ("b_v", R * D),
)
QKV_ROWS = GROUPS * (HEADS // GROUPS + 2) * D


def _p(*shape, dtype=torch.float32, **attrs):
    p = nn.Parameter(torch.randn(*shape, dtype=dtype) * 0.1)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class _Mod(nn.Module):
    pass


def _linear(out, inp, bias=False, **attrs):
    m = _Mod()
    m.weight = _p(out, inp, **attrs)
    if bias:
        m.bias = _p(out)
    return m


def _norm(n):
    m = _Mod()
    m.weight = nn.Parameter(torch.ones(n))
    return m


def _attention(local: bool):
    a = _Mod()
    if local:
        rows = sum(n for _, n in TPA_ROWS)
        a.linear_qkv = _linear(rows, HIDDEN, bias=True, tpa_factor_rows=TPA_ROWS)
    else:
        a.linear_qkv = _linear(QKV_ROWS, HIDDEN, bias=True)
    a.linear_proj = _linear(HIDDEN, HEADS * D)
    a.q_layernorm = _norm(D)
    a.k_layernorm = _norm(D)
    a.core_attention = _Mod()
    a.core_attention.softmax_offset = nn.Parameter(torch.zeros(HEADS))
    return a


def _moe(stacked: bool = False, gated: bool = False):
    mlp = _Mod()
    mlp.router = _Mod()
    mlp.router.weight = _p(EXPERTS, HIDDEN)
    mlp.router.register_buffer("expert_bias", torch.zeros(EXPERTS))
    mlp.experts = _Mod()
    f1 = FFN * (2 if gated else 1)
    if stacked:
        mlp.experts.linear_fc1 = _Mod()
        mlp.experts.linear_fc1.weight = _p(EXPERTS, f1, HIDDEN, allreduce=False, expert_stack=True)
        mlp.experts.linear_fc2 = _Mod()
        mlp.experts.linear_fc2.weight = _p(EXPERTS, HIDDEN, FFN, allreduce=False, expert_stack=True)
    else:
        mlp.experts.local_experts = nn.ModuleList()
        for _ in range(EXPERTS):
            e = _Mod()
            e.linear_fc1 = _linear(f1, HIDDEN, allreduce=False)
            e.linear_fc2 = _linear(HIDDEN, FFN, allreduce=False)
            mlp.experts.local_experts.append(e)
    mlp.shared_experts = _Mod()
    mlp.shared_experts.linear_fc1 = _linear(SHARED, HIDDEN)
    mlp.shared_experts.linear_fc2 = _linear(HIDDEN, SHARED)
    return mlp


def _expert_weights(experts):
    """``(fc1 [F1, h], fc2 [h, F])`` of every expert, from either storage."""
    if hasattr(experts, "local_experts"):
        return [(ex.linear_fc1.weight, ex.linear_fc2.weight) for ex in experts.local_experts]
    return list(zip(experts.linear_fc1.weight.unbind(0), experts.linear_fc2.weight.unbind(0)))


def _act(h1):
    """Squared ReLU, gated (``[gate | up]`` halves) when ``h1`` has ``2 F`` columns."""
    if h1.shape[-1] == 2 * FFN:
        gate, up = h1.chunk(2, dim=-1)
        return torch.relu(gate).square() * up
    return torch.relu(h1).square()


def copy_experts(src: "FakeVpMoE", dst: "FakeVpMoE") -> None:
    """Copy every parameter of ``src`` into ``dst``, mapping SequentialMLP experts to stacks
    (or back) by expert index."""
    with torch.no_grad():
        for ls, ld in zip(src.decoder.layers, dst.decoder.layers):
            if hasattr(ls.mlp, "router"):
                pairs = zip(_expert_weights(ls.mlp.experts), _expert_weights(ld.mlp.experts))
                for (a1, a2), (b1, b2) in pairs:
                    b1.copy_(a1)
                    b2.copy_(a2)
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            if ".experts." not in name or "shared_experts" in name:
                dst_params[name].copy_(p)


class FakeVpMoE(nn.Module):
    """Parameter tree only (plus a cheap forward through every matrix for training tests)."""

    def __init__(self, stacked: bool = False, gated: bool = False):
        super().__init__()
        self.config = SimpleNamespace(
            num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=D, gated_linear_unit=gated
        )
        self.embedding = _Mod()
        self.embedding.word_embeddings = _Mod()
        self.embedding.word_embeddings.weight = _p(VOCAB, HIDDEN, is_embedding_or_output_parameter=True)
        self.rotary_pos_emb = _Mod()
        self.rotary_pos_emb.log_freq = _p(D // 2, grape_log_freq=True)
        self.decoder = _Mod()
        self.decoder.layers = nn.ModuleList()
        for i in range(3):
            layer = _Mod()
            layer.input_layernorm = _norm(HIDDEN)
            layer.self_attention = _attention(local=(i != 1))
            layer.pre_mlp_layernorm = _norm(HIDDEN)
            if i == 0:
                layer.mlp = _Mod()
                layer.mlp.linear_fc1 = _linear(DENSE_FFN, HIDDEN)
                layer.mlp.linear_fc2 = _linear(HIDDEN, DENSE_FFN)
            else:
                layer.mlp = _moe(stacked, gated)
            self.decoder.layers.append(layer)
        self.decoder.final_layernorm = _norm(HIDDEN)
        self.output_layer = _linear(VOCAB, HIDDEN, is_embedding_or_output_parameter=True)

    def forward(self, tokens):
        """Toy residual network touching every parameter (not vpMoE math)."""
        x = self.embedding.word_embeddings.weight[tokens]
        for layer in self.decoder.layers:
            h = x * layer.input_layernorm.weight
            att = layer.self_attention
            qkv = h @ att.linear_qkv.weight.T + att.linear_qkv.bias
            qkv = qkv[..., : HEADS * D] if qkv.shape[-1] >= HEADS * D else torch.nn.functional.pad(
                qkv, (0, HEADS * D - qkv.shape[-1])
            )
            qkv = qkv.view(*qkv.shape[:-1], HEADS, D)
            qkv = qkv * att.q_layernorm.weight * att.k_layernorm.weight
            qkv = qkv + att.core_attention.softmax_offset[:, None]
            x = x + torch.tanh(qkv.flatten(-2)) @ att.linear_proj.weight.T
            h = x * layer.pre_mlp_layernorm.weight
            mlp = layer.mlp
            if hasattr(mlp, "router"):
                gate = torch.softmax(h @ mlp.router.weight.T, dim=-1)
                out = 0
                for e, (w1, w2) in enumerate(_expert_weights(mlp.experts)):
                    out = out + gate[..., e : e + 1] * (_act(h @ w1.T) @ w2.T)
                sh = mlp.shared_experts
                out = out + torch.relu(h @ sh.linear_fc1.weight.T).square() @ sh.linear_fc2.weight.T
            else:
                out = torch.relu(h @ mlp.linear_fc1.weight.T).square() @ mlp.linear_fc2.weight.T
            x = x + out
        x = x * self.decoder.final_layernorm.weight
        x = x * torch.cos(self.rotary_pos_emb.log_freq).mean()
        return x @ self.output_layer.weight.T
