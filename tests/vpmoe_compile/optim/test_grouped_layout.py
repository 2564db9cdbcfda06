"""Expert layouts give identical updates (fp64): SequentialMLP, TEGroupedMLP-style
``weight{e}`` and legacy GroupedMLP ``weight1`` / ``weight2`` storage (Megatron-Core 0.16.1:
``weight1.view(E, hidden, F1)[e]`` and ``weight2.view(E, ffn, hidden)[e]`` are expert ``e``'s
``[in, out]`` blocks; gated fc1 holds ``[gate | up]`` along ``F1``)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vpmoe_compile.optim import NorMuon, build_optimizer, classify_parameters, routing_table

H, FFN, E = 24, 8, 3


class _Mod(nn.Module):
    pass


def _model(layout: str, w1, w2, gated: bool):
    """One MoE layer's experts in the given storage layout, built from per-expert ``[out, in]``
    weights ``w1[e]`` (``[F1, H]``) and ``w2[e]`` (``[H, FFN]``)."""
    model = _Mod()
    model.config = SimpleNamespace(
        hidden_size=H, moe_ffn_hidden_size=FFN, gated_linear_unit=gated,
        num_attention_heads=2, num_query_groups=2, kv_channels=4,
    )
    model.decoder = _Mod()
    model.decoder.layers = nn.ModuleList([_Mod()])
    mlp = model.decoder.layers[0].mlp = _Mod()
    experts = mlp.experts = _Mod()

    def par(t):
        p = nn.Parameter(t.clone())
        p.allreduce = False
        return p

    if layout == "sequential":
        experts.local_experts = nn.ModuleList()
        for e in range(E):
            ex = _Mod()
            ex.linear_fc1, ex.linear_fc2 = _Mod(), _Mod()
            ex.linear_fc1.weight = par(w1[e])
            ex.linear_fc2.weight = par(w2[e])
            experts.local_experts.append(ex)
    elif layout == "te_grouped":
        experts.linear_fc1, experts.linear_fc2 = _Mod(), _Mod()
        for e in range(E):
            experts.linear_fc1.register_parameter(f"weight{e}", par(w1[e]))
            experts.linear_fc2.register_parameter(f"weight{e}", par(w2[e]))
    else:
        experts.num_local_experts = E
        F1 = w1[0].shape[0]
        # [E, H, F1] blocks, flattened to Megatron's 2-D [H, E*F1] / [E*FFN, H] parameters
        experts.weight1 = par(torch.stack([w.T for w in w1]).reshape(H, E * F1))
        experts.weight2 = par(torch.stack([w.T for w in w2]).reshape(E * FFN, H))
    return model


def _expert_views(model, layout, t_of=lambda p: p.detach()):
    """Per-expert ``[out, in]`` views ``(fc1[e], fc2[e])`` of params (or of ``t_of(p)``)."""
    ex = model.decoder.layers[0].mlp.experts
    if layout == "sequential":
        return ([t_of(m.linear_fc1.weight) for m in ex.local_experts],
                [t_of(m.linear_fc2.weight) for m in ex.local_experts])
    if layout == "te_grouped":
        return ([t_of(getattr(ex.linear_fc1, f"weight{e}")) for e in range(E)],
                [t_of(getattr(ex.linear_fc2, f"weight{e}")) for e in range(E)])
    t1, t2 = t_of(ex.weight1), t_of(ex.weight2)
    F1 = t1.numel() // (E * H)
    return ([t1.view(E, H, F1)[e].T for e in range(E)], [t2.view(E, FFN, H)[e].T for e in range(E)])


def _set_grads(model, layout, g1, g2):
    ex = model.decoder.layers[0].mlp.experts
    if layout == "sequential":
        for e, m in enumerate(ex.local_experts):
            m.linear_fc1.weight.grad, m.linear_fc2.weight.grad = g1[e].clone(), g2[e].clone()
    elif layout == "te_grouped":
        for e in range(E):
            getattr(ex.linear_fc1, f"weight{e}").grad = g1[e].clone()
            getattr(ex.linear_fc2, f"weight{e}").grad = g2[e].clone()
    else:
        ex.weight1.grad = torch.stack([g.T for g in g1]).reshape(ex.weight1.shape).clone()
        ex.weight2.grad = torch.stack([g.T for g in g2]).reshape(ex.weight2.shape).clone()


@pytest.mark.parametrize("gated", [False, True])
def test_expert_layouts_give_identical_updates_fp64(gated):
    F1 = FFN * (2 if gated else 1)
    w1 = [torch.randn(F1, H, dtype=torch.float64) for _ in range(E)]
    w2 = [torch.randn(H, FFN, dtype=torch.float64) for _ in range(E)]
    grads = [([torch.randn(F1, H, dtype=torch.float64) for _ in range(E)],
              [torch.randn(H, FFN, dtype=torch.float64) for _ in range(E)]) for _ in range(4)]
    grads[2][0][1].zero_()  # a zero-gradient expert fc1
    cfg = SimpleNamespace(clip_grad=0.0, lr=0.02, weight_decay=0.1)
    results = {}
    for layout in ("sequential", "te_grouped", "grouped"):
        model = _model(layout, w1, w2, gated)
        opt = build_optimizer(model, cfg)
        assert opt.normuon is not None and opt.adamw is None
        for step, (g1, g2) in enumerate(grads):
            opt.normuon.param_groups[0]["lr"] = 0.02 / (1 + step)
            _set_grads(model, layout, g1, g2)
            ok, norm, _ = opt.step()
            assert ok
        fc1, fc2 = _expert_views(model, layout)
        st = opt.normuon.state
        mom1, mom2 = _expert_views(model, layout, lambda p: st[p]["momentum_buffer"])
        results[layout] = (fc1, fc2, mom1, mom2, opt)
    ref = results["sequential"]
    for layout in ("te_grouped", "grouped"):
        got = results[layout]
        for a_list, b_list in zip(got[:4], ref[:4]):
            for a, b in zip(a_list, b_list):
                assert (a - b).abs().max().item() <= 1e-12, layout
    # the weights really changed, and the zero-gradient step kept that expert's update finite
    assert all(not torch.equal(a, w) for a, w in zip(ref[0], w1))
    assert all(torch.isfinite(a).all() for a in ref[0])
    # second moments: GroupedMLP keeps [E * out, 1] in expert-major row order
    seq_opt, grp = ref[4], results["grouped"]
    grouped_model_v1 = [
        st["second_moment"] for p, st in grp[4].normuon.state.items() if p.shape == (H, E * F1)
    ][0]
    assert grouped_model_v1.shape == (E * F1, 1)
    seq_v1 = [
        st["second_moment"] for p, st in seq_opt.normuon.state.items() if p.shape == (F1, H)
    ]
    assert (grouped_model_v1 - torch.cat(seq_v1)).abs().max().item() <= 1e-12


def test_grouped_routing_table_and_state_round_trip():
    gated = True
    F1 = 2 * FFN
    w1 = [torch.randn(F1, H, dtype=torch.float64) for _ in range(E)]
    w2 = [torch.randn(H, FFN, dtype=torch.float64) for _ in range(E)]
    model = _model("grouped", w1, w2, gated)
    table = {r["name"]: r for r in routing_table(model)}
    row = table["decoder.layers.0.mlp.experts.weight1"]
    assert (row["group"], row["role"], row["is_expert_parallel"]) == ("normuon", "expert", True)
    assert row["matrices"][:2] == [["e0.gate", FFN, H], ["e0.up", FFN, H]]
    assert len(row["matrices"]) == 2 * E
    assert table["decoder.layers.0.mlp.experts.weight2"]["matrices"] == [
        [f"e{e}.fc2", H, FFN] for e in range(E)
    ]
    routes = [r for r in classify_parameters(model) if r.optimizer == "normuon"]
    assert {r.layout for r in routes} == {(E, H, F1), (E, FFN, H)}

    def make():
        m = _model("grouped", w1, w2, gated)
        rs = [r for r in classify_parameters(m) if r.optimizer == "normuon"]
        opt = NorMuon([{"params": [r.param for r in rs], "blocks": [r.blocks for r in rs],
                        "layouts": [r.layout for r in rs]}], lr=0.02, weight_decay=0.1)
        return m, opt

    steps = [[torch.randn_like(r.param) for r in routes] for _ in range(4)]
    m_a, opt_a = make()
    m_b, opt_b = make()
    for opt, m, todo in ((opt_a, m_a, steps), (opt_b, m_b, steps[:2])):
        for gs in todo:
            for p, g in zip(opt.param_groups[0]["params"], gs):
                p.grad = g.clone()
            opt.step()
    saved = opt_b.state_dict()
    assert saved["param_groups"][0]["layouts"] == [(E, H, F1), (E, FFN, H)]
    m_c, opt_c = make()
    for pc, pb in zip(opt_c.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        pc.data.copy_(pb.detach())
    opt_c.load_state_dict(saved)
    for gs in steps[2:]:
        for p, g in zip(opt_c.param_groups[0]["params"], gs):
            p.grad = g.clone()
        opt_c.step()
    for pa, pc in zip(opt_a.param_groups[0]["params"], opt_c.param_groups[0]["params"]):
        assert torch.equal(pa.detach(), pc.detach())


def test_grouped_layout_errors():
    model = _model("grouped", [torch.randn(FFN, H) for _ in range(E)],
                   [torch.randn(H, FFN) for _ in range(E)], False)
    model.config.moe_ffn_hidden_size = FFN + 1  # storage no longer matches the geometry
    with pytest.raises(ValueError, match="GroupedMLP storage"):
        classify_parameters(model)
    p = nn.Parameter(torch.randn(H, E * FFN))
    with pytest.raises(ValueError, match="layout"):
        NorMuon([{"params": [p], "layouts": [(E, H, FFN + 1)]}])
    with pytest.raises(ValueError, match="crosses an expert"):
        NorMuon([{"params": [p], "layouts": [(E, H, FFN)],
                  "blocks": [(((0, FFN + 2),), ((FFN + 2, E * FFN - FFN - 2),))]}])
