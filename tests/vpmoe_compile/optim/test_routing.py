"""Routing of every parameter (docs/design.md#the-optimizer) on a vpMoE-like parameter tree with
Megatron names."""

from types import SimpleNamespace

import pytest
import torch

from vpmoe_compile.optim import RoutingError, classify_parameters, routing_table

from ._fake import D, EXPERTS, FFN, GROUPS, HEADS, HIDDEN, QKV_ROWS, TPA_ROWS, FakeVpMoE


def _by_name(table):
    return {row["name"]: row for row in table}


def test_every_parameter_has_the_spec_role():
    model = FakeVpMoE()
    table = _by_name(routing_table(model))
    assert set(table) == {n for n, _ in model.named_parameters()}
    for name, row in table.items():
        p = dict(model.named_parameters())[name]
        assert row["shape"] == list(p.shape)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert (row["group"], row["wd_mult"], row["lr"]) == ("adamw", 1.0, 3e-4)
        elif name == "rotary_pos_emb.log_freq":
            assert (row["group"], row["role"], row["wd"]) == ("adamw", "grape_log_freq", 0.0)
        elif name.endswith(".bias") or p.ndim < 2:
            assert row["group"] == "adamw" and row["wd_mult"] == 0.0 and row["wd"] == 0.0
            assert row["lr"] == 3e-4 and row["min_lr"] == 3e-4
        else:
            assert row["group"] == "normuon", name
            assert row["wd"] == pytest.approx(0.01) and row["lr"] == 3e-3 and row["min_lr"] == 3e-4
    assert table["decoder.layers.0.self_attention.core_attention.softmax_offset"]["role"] == "sink"
    assert table["decoder.layers.1.input_layernorm.weight"]["role"] == "norm"
    assert table["decoder.layers.1.self_attention.q_layernorm.weight"]["role"] == "norm"
    assert table["decoder.final_layernorm.weight"]["role"] == "norm"
    # per expert, expert-parallel flag from `allreduce=False`
    for e in range(EXPERTS):
        row = table[f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc2.weight"]
        assert row["role"] == "expert" and row["is_expert_parallel"] is True
        assert row["matrices"] == [["fc2", 32, 8]]
    assert table["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"]["role"] == "shared_expert"
    assert table["decoder.layers.0.mlp.linear_fc1.weight"]["role"] == "dense_mlp"
    assert table["decoder.layers.1.mlp.router.weight"]["group"] == "normuon"  # router_optimizer default
    # TPA factors as their own matrices, in row order
    tpa = table["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert tpa["role"] == "tpa_factors"
    assert tpa["matrices"] == [[n, r, 32] for n, r in TPA_ROWS]
    # global fused QKV split per Q / K / V (default qkv_split="qkv")
    qkv = table["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv["matrices"] == [["q", HEADS * D, 32], ["k", GROUPS * D, 32], ["v", GROUPS * D, 32]]


def test_qkv_split_modes_gather_the_interleaved_rows():
    model = FakeVpMoE()
    name = "decoder.layers.1.self_attention.linear_qkv.weight"
    routes = {r.name: r for r in classify_parameters(model, SimpleNamespace(qkv_split="qkv"))}
    q, k, v = routes[name].blocks
    rpg = QKV_ROWS // GROUPS
    assert q == ((0, 16), (rpg, 16)) and k == ((16, 8), (rpg + 16, 8)) and v == ((24, 8), (rpg + 24, 8))
    fused = {r.name: r for r in classify_parameters(model, SimpleNamespace(qkv_split="fused"))}
    assert fused[name].blocks is None
    head = {r.name: r for r in classify_parameters(model, SimpleNamespace(qkv_split="head"))}
    assert head[name].block_names == ("q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1")
    rows = sorted(seg for blk in head[name].blocks for seg in blk)
    assert sum(n for _, n in rows) == QKV_ROWS


def test_router_optimizer_option_and_decoupled_lr():
    model = FakeVpMoE()
    cfg = SimpleNamespace(router_optimizer="adamw", decoupled_lr=1e-3, decoupled_min_lr=1e-5,
                          normuon_aux_lr=None)
    table = _by_name(routing_table(model, cfg))
    router = table["decoder.layers.1.mlp.router.weight"]
    assert router["group"] == "adamw" and router["wd_mult"] == 1.0 and router["lr"] == 3e-3
    emb = table["embedding.word_embeddings.weight"]
    assert (emb["lr"], emb["min_lr"]) == (1e-3, 1e-5)
    bias = table["decoder.layers.1.self_attention.linear_qkv.bias"]
    assert (bias["lr"], bias["min_lr"]) == (3e-3, 3e-4)  # aux lr None -> lr / min_lr


def test_log_freq_stays_adamw_when_2d_and_zero_dim_gets_no_decay():
    model = FakeVpMoE()
    model.rotary_pos_emb.log_freq = torch.nn.Parameter(torch.zeros(HEADS, D // 2))
    model.rotary_pos_emb.log_freq.grape_log_freq = True
    model.decoder.layers[0].value_residual_logit = torch.nn.Parameter(torch.tensor(0.0))
    table = _by_name(routing_table(model))
    assert table["rotary_pos_emb.log_freq"]["group"] == "adamw"
    assert table["rotary_pos_emb.log_freq"]["wd"] == 0.0
    row = table["decoder.layers.0.value_residual_logit"]
    assert (row["group"], row["role"], row["wd"]) == ("adamw", "scalar", 0.0)


def test_unknown_matrices_raise_naming_them():
    model = FakeVpMoE()
    model.decoder.layers[0].mystery = torch.nn.Parameter(torch.randn(4, 4))
    model.decoder.layers[1].mystery3d = torch.nn.Parameter(torch.randn(2, 4, 4))
    with pytest.raises(RoutingError, match=r"decoder\.layers\.0\.mystery .*decoder\.layers\.1\.mystery3d"):
        routing_table(model)


def test_bad_geometry_and_tpa_rows_raise():
    model = FakeVpMoE()
    model.config.num_query_groups = 4  # QKV rows no longer match the layout
    with pytest.raises(RoutingError, match="interleaved QKV layout"):
        classify_parameters(model)
    model = FakeVpMoE()
    model.decoder.layers[0].self_attention.linear_qkv.weight.tpa_factor_rows = (("a_q", 3),)
    with pytest.raises(RoutingError, match="tpa_factor_rows"):
        classify_parameters(model)


def test_frozen_params_are_listed_not_optimised():
    model = FakeVpMoE()
    model.output_layer.weight.requires_grad_(False)
    table = _by_name(routing_table(model))
    assert table["output_layer.weight"]["group"] == "frozen"


def test_te_grouped_expert_names_per_expert_and_legacy_grouped_per_expert():
    model = FakeVpMoE()
    experts = model.decoder.layers[1].mlp.experts
    del experts.local_experts
    for e in range(EXPERTS):  # TEGroupedMLP: linear_fc1.weight{e} / linear_fc2.weight{e}
        setattr(experts, "linear_fc1", getattr(experts, "linear_fc1", torch.nn.Module()))
        setattr(experts, "linear_fc2", getattr(experts, "linear_fc2", torch.nn.Module()))
        p1 = torch.nn.Parameter(torch.randn(8, 32))
        p1.allreduce = False
        p2 = torch.nn.Parameter(torch.randn(32, 8))
        p2.allreduce = False
        experts.linear_fc1.register_parameter(f"weight{e}", p1)
        experts.linear_fc2.register_parameter(f"weight{e}", p2)
    table = _by_name(routing_table(model))
    for e in range(EXPERTS):
        row = table[f"decoder.layers.1.mlp.experts.linear_fc2.weight{e}"]
        assert (row["group"], row["role"], row["is_expert_parallel"]) == ("normuon", "expert", True)
    experts.weight1 = torch.nn.Parameter(torch.randn(32, EXPERTS * 8))  # legacy GroupedMLP
    experts.weight1.allreduce = False
    # without the geometry in model.config the per-expert layout cannot be known: clear error
    with pytest.raises(RoutingError, match=r"experts\.weight1: a GroupedMLP weight needs"):
        routing_table(model)
    model.config.hidden_size, model.config.moe_ffn_hidden_size = 32, 8
    row = _by_name(routing_table(model))["decoder.layers.1.mlp.experts.weight1"]
    assert (row["group"], row["role"]) == ("normuon", "expert")
    assert row["matrices"] == [[f"e{e}.fc1", 8, 32] for e in range(EXPERTS)]  # per expert


@pytest.mark.parametrize("gated", [False, True])
def test_expert_stacks_route_per_expert(gated):
    """Grouped experts' 3-D ``expert_stack`` weights: NorMuon, role expert, one logical matrix per
    expert (gate and up when gated), expert-parallel from ``allreduce``, decayed."""
    model = FakeVpMoE(stacked=True, gated=gated)
    table = _by_name(routing_table(model))
    assert set(table) == {n for n, _ in model.named_parameters()}
    f1 = 2 * FFN if gated else FFN
    for layer in (1, 2):
        fc1 = table[f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight"]
        fc2 = table[f"decoder.layers.{layer}.mlp.experts.linear_fc2.weight"]
        assert fc1["shape"] == [EXPERTS, f1, HIDDEN] and fc2["shape"] == [EXPERTS, HIDDEN, FFN]
        for row in (fc1, fc2):
            assert (row["group"], row["role"], row["is_expert_parallel"]) == ("normuon", "expert", True)
            assert row["wd_mult"] == 1.0 and row["wd"] == pytest.approx(0.01) and row["lr"] == 3e-3
        if gated:
            assert fc1["matrices"] == [
                [f"e{e}.{half}", FFN, HIDDEN] for e in range(EXPERTS) for half in ("gate", "up")
            ]
        else:
            assert fc1["matrices"] == [[f"e{e}.fc1", FFN, HIDDEN] for e in range(EXPERTS)]
        assert fc2["matrices"] == [[f"e{e}.fc2", HIDDEN, FFN] for e in range(EXPERTS)]
    routes = {r.name: r for r in classify_parameters(model)}
    r1 = routes["decoder.layers.1.mlp.experts.linear_fc1.weight"]
    assert r1.blocks == ((((0, FFN),), ((FFN, FFN),)) if gated else None) and r1.layout is None
    assert routes["decoder.layers.1.mlp.experts.linear_fc2.weight"].blocks is None
    # a replicated (allreduce) stack is a dense-group expert param
    model.decoder.layers[1].mlp.experts.linear_fc2.weight.allreduce = True
    row = _by_name(routing_table(model))["decoder.layers.1.mlp.experts.linear_fc2.weight"]
    assert row["is_expert_parallel"] is False


def test_unmarked_or_misnamed_3d_parameters_are_refused_by_name():
    model = FakeVpMoE(stacked=True)
    experts = model.decoder.layers[1].mlp.experts
    del experts.linear_fc1.weight.expert_stack  # a 3-D fc1 weight without the attribute
    experts.linear_fc3 = torch.nn.Module()
    experts.linear_fc3.weight = torch.nn.Parameter(torch.randn(EXPERTS, 8, HIDDEN))
    experts.linear_fc3.weight.expert_stack = True  # marked, but no fc1 / fc2 rule
    with pytest.raises(RoutingError) as err:
        routing_table(model)
    msg = str(err.value)
    assert f"decoder.layers.1.mlp.experts.linear_fc1.weight ({EXPERTS}, {FFN}, {HIDDEN})" in msg
    assert "decoder.layers.1.mlp.experts.linear_fc3.weight" in msg
    assert "decoder.layers.2." not in msg  # the marked stacks of layer 2 route fine
    model = FakeVpMoE(stacked=True, gated=True)
    odd = torch.nn.Parameter(torch.randn(EXPERTS, 7, HIDDEN))  # 7 rows: no gate / up halves
    odd.expert_stack = True
    model.decoder.layers[2].mlp.experts.linear_fc1.weight = odd
    with pytest.raises(RoutingError, match=r"layers\.2\.mlp\.experts\.linear_fc1\.weight: a gated fc1"):
        routing_table(model)
