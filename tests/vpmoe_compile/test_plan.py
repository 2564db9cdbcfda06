"""The memory planner (vpmoe_compile/plan.py, ``python -m vpmoe_compile plan``): exact parameter
split, bytes per category as documented, the activation formula, the recommendation rule, the
vpmoe-8l measured anchor and bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vpmoe_compile.cli import main
from vpmoe_compile.plan import (
    GB,
    GIB,
    Candidate,
    Layout,
    LayerSpec,
    MemoryEstimate,
    ModelInventory,
    ModelShape,
    ParamSplit,
    PlanError,
    activation_memory,
    candidate_layouts,
    layer_activation_bytes_per_token,
    parse_memory,
    plan_memory,
    recommend,
    static_memory,
)

ROOT = Path(__file__).resolve().parents[2]
VPMOE_TRANSFORMED_TOTAL = 6_021_784_719  # benchmarks/results/params_vpmoe.json, "transformed" "total"
VPMOE_ROUTED = 5_324_898_304  # ... "routed_experts" (expert weights and biases)
VPMOE_EXPERT_BIASES = 79 * 256 * (128 + 1024)
VPMOE_EMBEDDING_AND_OUTPUT = 411_828_224
VPMOE_8L_TRANSFORMED_TOTAL = 909_130_880  # python -m vpmoe_compile params --config vpmoe-8l


@pytest.fixture(scope="module")
def vpmoe_meta():
    """configs/vpmoe.toml's model on the meta device, transformed (as the params command does)."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, init_process, load_config

    init_process()
    cfg = load_config("vpmoe")
    model = build_stock_gpt(cfg, device="meta")
    vpmoe_compile.transform(model, cfg, verify="params", progress=False)
    return model, cfg


@pytest.fixture(scope="module")
def inv_vpmoe(vpmoe_meta):
    from vpmoe_compile.plan import inventory_from_model

    model, cfg = vpmoe_meta
    return inventory_from_model(model, cfg, name=cfg.source, max_sequence_length=cfg.attention.max_sequence_length)


def test_vpmoe_counts_match_the_reference_fork(vpmoe_meta):
    """configs/vpmoe.toml (the fork's locked config: value residual and linear biases on) after
    the transform: 6,021,784,719 parameters, 780,087,951 active (what ``python -m vpmoe_compile
    params --config vpmoe`` prints). The fork's own counter (scripts/param_count_megatron.py)
    reports 6,021,692,480 / 779,995,712: it leaves out the QKV bias of its 60 TPA layers
    (60 x 1,536) and the 79 value-residual logits."""
    from megatron_base import count_parameters

    c = count_parameters(vpmoe_meta[0])
    assert (c.total, c.active) == (6_021_784_719, 780_087_951)
    assert (c.total, c.active) == (6_021_692_480 + 60 * 1536 + 79, 779_995_712 + 60 * 1536 + 79)


@pytest.fixture(scope="module")
def inv_8l():
    from megatron_base import load_config
    from vpmoe_compile.plan import build_inventory

    return build_inventory(load_config("vpmoe-8l"))


def _toy_shape(layers=2):
    return ModelShape(hidden_size=16, num_attention_heads=2, num_query_groups=1, kv_channels=8, vocab_size=64,
                      layers=tuple(LayerSpec("qkv", "moe") for _ in range(layers)), num_moe_experts=8,
                      moe_router_topk=2, moe_ffn_hidden_size=4, moe_shared_expert_intermediate_size=0)


def _toy_inventory(replicated: ParamSplit, expert: ParamSplit, layers=2) -> ModelInventory:
    return ModelInventory("toy", 16, replicated, expert, _toy_shape(layers))


# ---- exact parameter split ---------------------------------------------------------------------


def test_split_sums_to_transformed_total(inv_vpmoe, inv_8l):
    for inv, total in ((inv_vpmoe, VPMOE_TRANSFORMED_TOTAL), (inv_8l, VPMOE_8L_TRANSFORMED_TOTAL)):
        assert inv.total_params == total
        for s in (inv.replicated, inv.expert):
            assert s.normuon + s.adamw + s.frozen == s.total
            assert s.normuon_2d <= s.normuon
    r, e = inv_vpmoe.replicated, inv_vpmoe.expert
    # experts: 3-D weight stacks (NorMuon) and their [E, out] biases (AdamW)
    assert e.total == VPMOE_ROUTED and e.adamw == VPMOE_EXPERT_BIASES and e.normuon_2d == 0
    assert r.adamw >= VPMOE_EMBEDDING_AND_OUTPUT  # embedding + output layer (+ norms, biases, sinks)
    # second moment, one per output row of each expert matrix: 79 MoE layers x 256 x (fc1 128 + fc2 1024 rows)
    assert e.second_moment == 79 * 256 * (128 + 1024)
    moe = sum(L.mlp == "moe" for L in inv_vpmoe.shape.layers)
    glob = sum(L.attention == "qkv" for L in inv_vpmoe.shape.layers)
    assert (len(inv_vpmoe.shape.layers), moe, glob) == (80, 79, 20)  # 3:1 local:global, first layer dense


# ---- bytes per category ------------------------------------------------------------------------


def test_bytes_per_category_as_documented():
    R = ParamSplit(total=1000, normuon=300, normuon_2d=300, second_moment=30, adamw=600, frozen=100)
    X = ParamSplit(total=8000, normuon=8000, normuon_2d=0, second_moment=800, adamw=0, frozen=0)
    inv = _toy_inventory(R, X)
    # replicated optimizer, EP 2 on 8 GPUs: experts halve, nothing sharded
    st = static_memory(inv, Layout(8, 2, False))
    assert st["params"] == 2 * (1000 + 4000)
    assert st["grads"] == 4 * (900 + 4000)  # frozen parameters have no gradient
    assert st["main_params"] == 4 * (900 + 4000)
    states_r = 8 * 600 + 4 * 300 + 4 * 30 + 4 * 300  # Adam 8 B; NorMuon momentum, rows, gather buffer
    states_x = 4 * 4000 + 4 * 400
    assert st["optimizer_states"] == states_r + states_x
    # distributed optimizer: replicated parameters shard over DP = 8, experts over world / EP = 4
    st = static_memory(inv, Layout(8, 2, True))
    assert st["params"] == 2 * 5000 and st["grads"] == 4 * 4900  # bf16 params and the DDP buffer stay whole
    assert st["main_params"] == 4 * 900 // 8 + 4 * 4000 // 4
    assert st["optimizer_states"] == states_r // 8 + states_x // 4


def test_activation_formula_by_hand(inv_8l):
    sh = inv_8l.shape
    tpa_moe = layer_activation_bytes_per_token(sh, LayerSpec("tpa", "moe", 1064))
    assert tpa_moe == {
        "norms": 2 * (4 * 1024 + 4),                               # 8200
        "attention": 2 * 1064 + 2 * (1024 + 512) + 2 * 1024 + 32 + 40,  # factors, q k v, out, lse, rstd
        "router": 9 * 256 + 12 * 4,
        "experts": 4 * (2 * 1024 + 2 * 128 + 4 * 128 + 4) + 24 * 4,
        "shared_expert": 4 * 512,
    }
    glob = layer_activation_bytes_per_token(sh, LayerSpec("qkv", "moe"))
    assert glob["attention"] == 2 * 1536 + 2 * 1280 + 2 * 1024 + 32 + 40
    dense = layer_activation_bytes_per_token(sh, LayerSpec("tpa", "dense", 1064))
    assert dense["mlp"] == 4 * 128 and "router" not in dense
    a = activation_memory(sh, 2, 4096)
    per_token = sum(tpa_moe.values()) * 5 + (sum(glob.values())) * 2 + sum(dense.values()) + 4 * 1024 + 4
    assert a["saved"] == 8192 * per_token
    assert a["head"] == 6 * 1024 * 201088 + 2 * 201088 * 1024 + 8 * 8192 * 1024  # chunk logits, dW, dh
    assert a["dispatch"] == 0 and activation_memory(sh, 2, 4096, ep=2)["dispatch"] == 2 * 8192 * (4 * 1024 + 5 * 256)


# ---- the recommendation rule ---------------------------------------------------------------------


def _cand(world, ep, dist, total_gib, usable_gib=70):
    mem = MemoryEstimate(int(total_gib * GIB), 0, 0, 0, 0)
    return Candidate(Layout(world, ep, dist), mem, mem.total <= usable_gib * GIB)


def test_recommend_rule_hand_example():
    cands = [_cand(8, 1, False, 90), _cand(8, 1, True, 60), _cand(8, 2, False, 50), _cand(8, 2, True, 30)]
    best, why = recommend(cands)
    assert (best.layout.ep, best.layout.distributed_optimizer) == (1, True) and "EP=1" in why
    cands[1] = _cand(8, 1, True, 75)  # EP = 1 no longer fits: the smallest EP that does
    best, why = recommend(cands)
    assert (best.layout.ep, best.layout.distributed_optimizer) == (2, True) and "EP=2" in why
    best, _ = recommend([_cand(1, 1, False, 20)])  # one GPU: the replicated optimizer is the layout
    assert (best.layout.ep, best.layout.distributed_optimizer) == (1, False)
    best, why = recommend([_cand(8, 1, False, 90), _cand(8, 2, True, 80)])
    assert best is None and "nothing fits" in why and "80.0 GiB" in why and "EP=2" in why


def test_toy_only_expert_parallel_fits():
    R = ParamSplit(total=10**8, adamw=10**8)
    X = ParamSplit(total=12 * 10**9, normuon=12 * 10**9)
    plan = plan_memory(_toy_inventory(R, X), 8, 80 * GB)  # usable 72e9 bytes
    by = {(c.layout.ep, c.layout.distributed_optimizer): c for c in plan.candidates}
    assert set(by) == {(e, d) for e in (1, 2, 4, 8) for d in (False, True)}
    # by hand, EP 1 distributed: 2 x 12.1e9 + 4 x 12.1e9 + 4 x 12.1e9 / 8 + (8e8 + 4 x 12e9) / 8 > 72e9
    assert by[1, True].memory.total - by[1, True].memory.activations == 24.2e9 + 48.4e9 + 6.05e9 + 6.1e9
    assert not by[1, True].fits and not by[1, False].fits
    # EP 2 distributed: 2 x 6.1e9 + 4 x 6.1e9 + (4e8 / 8 + 24e9 / 4) + (8e8 / 8 + 24e9 / 4) fits
    assert by[2, True].fits and not by[2, False].fits
    assert (plan.recommended.layout.ep, plan.recommended.layout.distributed_optimizer) == (2, True)
    assert "nothing with EP=1 fits" in plan.reason


# ---- vpmoe on 8 x 80 GB ------------------------------------------------------------------------


def test_vpmoe_8_gpus_80gb(inv_vpmoe):
    plan = plan_memory(inv_vpmoe, 8, 80 * GB)
    assert plan.seq_len == 2048 and plan.micro_batch == 1  # the config's max_sequence_length
    assert [(c.layout.ep, c.layout.distributed_optimizer) for c in plan.candidates] == [
        (e, d) for e in (1, 2, 4, 8) for d in (False, True)]
    r, x = inv_vpmoe.replicated, inv_vpmoe.expert
    P = inv_vpmoe.total_params
    states = 8 * (r.adamw + x.adamw) + 4 * (r.normuon + x.normuon + r.second_moment + x.second_moment + r.normuon_2d)
    act = plan.candidates[0].memory.activations
    replicated = 10 * P + states + act  # 2 + 4 + 4 bytes per parameter + optimizer state
    even = 6 * P + (4 * P + states) / 8 + act  # an even 1/8 of main params and state
    assert plan.candidates[0].memory.total == replicated
    # the distributed optimizer deals whole parameters: the most loaded rank carries at least
    # the even share and at most two of each part's largest parameters more (main + state bytes)
    dist = plan.candidates[1].memory.total
    items = inv_vpmoe.items
    assert sum(it.numel for it in items) == P - r.frozen - x.frozen
    slack = sum(2 * max(((4 * it.numel + it.state_bytes) for it in items if it.optimizer == o and it.expert == e), default=0)
                for o in ("normuon", "adamw") for e in (False, True))
    assert even - 16 <= dist <= even + slack
    # by hand for the dense AdamW part: its largest two (embedding and output layer, equal size)
    # go to different ranks, so no rank holds both
    adam = sorted((it.numel for it in items if it.optimizer == "adamw" and not it.expert), reverse=True)
    assert adam[0] == adam[1] == 201088 * 1024
    usable = 0.9 * 80e9
    assert replicated > usable > dist  # the replicated optimizer does not fit, the sharded one does
    rec = plan.recommended
    assert (rec.layout.dp, rec.layout.ep, rec.layout.distributed_optimizer) == (8, 1, True)


# ---- the measured anchor -------------------------------------------------------------------------


def test_anchor_vpmoe_8l_one_gpu(inv_8l):
    """benchmarks/results/step.json: vpmoe-8l, micro-batch 2 x 4096, replicated optimizer, one H100,
    compiled step: peak torch.cuda.max_memory_allocated 18.5 GiB."""
    step = json.loads((ROOT / "benchmarks/results/step.json").read_text())
    assert step["meta"]["config"] == "vpmoe-8l" and step["meta"]["micro_batch"] == 2 and step["meta"]["seq_len"] == 4096
    measured = next(r["peak_mem_gib"] for r in step["results"] if r["variant"] == "transformed_compiled")
    plan = plan_memory(inv_8l, 1, 80 * GIB, micro_batch=2, seq_len=4096)
    assert [c.layout for c in plan.candidates] == [Layout(1, 1, False)]
    predicted = plan.candidates[0].memory.total / GIB
    assert abs(predicted - measured) / measured < 0.35, (predicted, measured)


# ---- inputs ----------------------------------------------------------------------------------------


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("141gb") == 141 * 10**9
    assert parse_memory("0.5 TiB") == 2**39
    for bad in ("80", "eighty GB", "80XB", "-5GB", "0GB", ""):
        with pytest.raises(PlanError):
            parse_memory(bad)


def test_candidate_layouts_and_impossible_ep():
    inv = _toy_inventory(ParamSplit(total=10), ParamSplit(total=80))  # 8 experts
    assert [(L.ep, L.distributed_optimizer) for L in candidate_layouts(inv, 6)] == [
        (1, False), (1, True), (2, False), (2, True)]  # 3 and 6 do not divide 8 experts
    assert candidate_layouts(inv, 1) == [Layout(1, 1, False)]
    with pytest.raises(PlanError, match="impossible"):
        candidate_layouts(inv, 6, ep=3)
    with pytest.raises(PlanError, match="positive"):
        candidate_layouts(inv, 0)
    with pytest.raises(PlanError, match="max_sequence_length"):
        plan_memory(inv, 1, 80 * GB, seq_len=17)


def test_importable_without_distributed():
    code = ("import torch.distributed as dist, vpmoe_compile.plan as p\n"
            "inv = p.ModelInventory('t', 8, p.ParamSplit(total=4, adamw=4), p.ParamSplit(),"
            " p.ModelShape(8, 1, 1, 8, 16, (p.LayerSpec('qkv', 'dense'),), ffn_hidden_size=8))\n"
            "pl = p.plan_memory(inv, 2, p.parse_memory('1GB'))\n"
            "assert not dist.is_initialized() and pl.recommended.layout.distributed_optimizer\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# ---- command line ------------------------------------------------------------------------------------


def test_cli_plan_json_and_table(megatron_env, capsys):
    assert main(["plan", "--config", "vpmoe-8l", "--gpus", "2", "--gpu-memory", "80GiB", "--micro-batch", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_memory_bytes"] == 80 * 2**30 and out["seq_len"] == 4096 and out["micro_batch"] == 2
    assert out["parameters"]["total"] == VPMOE_8L_TRANSFORMED_TOTAL
    assert [(c["ep"], c["optimizer"]) for c in out["candidates"]] == [
        (1, "replicated"), (1, "distributed"), (2, "replicated"), (2, "distributed")]
    for c in out["candidates"]:
        b = c["bytes"]
        assert b["total"] == sum(b[k] for k in ("params", "grads", "main_params", "optimizer_states", "activations"))
    assert out["recommendation"]["ep"] == 1 and out["recommendation"]["optimizer"] == "distributed"
    assert main(["plan", "--config", "vpmoe-8l", "--gpus", "1", "--gpu-memory", "24GB"]) == 0
    text = capsys.readouterr().out
    assert "<- recommended" in text and "TP and PP are not planned" in text and "pending" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "0", "--gpu-memory", "80GB"], "--gpus must be >= 1"),
        (["--gpus", "8", "--gpu-memory", "80"], "cannot read GPU memory '80'"),
        (["--gpus", "8", "--gpu-memory", "lots"], "cannot read GPU memory"),
        (["--gpus", "6", "--gpu-memory", "80GB", "--ep", "3"], "--ep 3 is impossible"),
        (["--gpus", "8", "--gpu-memory", "80GB", "--seq-len", "100000"], "exceeds [attention] max_sequence_length"),
        (["--gpus", "8", "--gpu-memory", "80GB", "--micro-batch", "0"], "--micro-batch must be >= 1"),
        (["--config", "nope", "--gpus", "8", "--gpu-memory", "80GB"], "neither a preset"),
    ],
)
def test_cli_plan_bad_input(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line


def test_distributed_optimizer_deals_whole_parameters():
    """dealt_memory by hand: dense AdamW parameters of 100, 1 and 2 elements over DP 2 are dealt
    by size 1 -> rank 0, 2 -> rank 1, 100 -> rank 1 (ping-pong), so rank 1 carries 102 elements
    (main 4 B + state 8 B each); an expert stack of 80 elements at EP 2 is 40 per rank, all on the
    single expert-data-parallel rank (main 4 B + NorMuon momentum 4 B each)."""
    from vpmoe_compile.plan import ParamItem, dealt_memory

    items = [ParamItem("adamw", False, 100, 800), ParamItem("adamw", False, 1, 8), ParamItem("adamw", False, 2, 16),
             ParamItem("normuon", True, 80, 320)]
    main, opt = dealt_memory(items, Layout(2, 2, True))
    assert main == 4 * 102 + 4 * 40 and opt == 8 * 102 + 4 * 40
