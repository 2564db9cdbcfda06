"""Data, expert, pipeline, tensor and sequence parallelism through Megatron (DDP, token dispatcher, 1F1B schedule,
Column/RowParallelLinear) on CPU (gloo, 2-4 processes): the same global batch trains to the same losses and
weights as one process, within fp32 tolerance, and checkpoints reshard between the layouts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_train_worker.py")


def _run(nproc, prefix, out, steps=3, global_batch=4, micro_batch=2, ep=1, init_from=None, save=None, load=None,
         distopt=False, pp=1, tp=1, sp=False, save_interval=0):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           prefix, str(out), str(steps), str(global_batch), str(micro_batch), str(ep), str(init_from or "-"),
           str(save or "-"), str(load or "-")] + (["--distopt"] if distopt else []) + (["--pp", str(pp)] if pp > 1 else []) \
        + (["--tp", str(tp)] if tp > 1 else []) + (["--sp"] if sp else []) \
        + (["--save-interval", str(save_interval)] if save_interval else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory):
    from megatron_base import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def init_ckpt(demo_prefix, tmp_path_factory):
    """Common starting weights: Megatron initialises experts per expert-parallel rank from its
    own RNG stream, so an EP 2 model built from the same seed has other expert weights than one
    process. Both runs start from this one-process checkpoint (EP 2 loads it resharded)."""
    d = tmp_path_factory.mktemp("init")
    _run(1, demo_prefix, d / "x.pt", steps=1, save=d / "ck")
    return d / "ck"


@pytest.fixture(scope="module")
def one_process(demo_prefix, tmp_path_factory, init_ckpt):
    """3 steps in one process from the common start, saved at step 3 (``ck``)."""
    d = tmp_path_factory.mktemp("one")
    run = _run(1, demo_prefix, d / "one.pt", init_from=init_ckpt, save=d / "ck")
    run["ck"] = d / "ck"
    return run


def _assert_same_run(a, b, steps):
    la = [r["loss"] for r in a["records"]]
    lb = [r["loss"] for r in b["records"]]
    assert len(la) == len(lb) == steps
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    ga = [r["grad_norm"] for r in a["records"]]
    gb = [r["grad_norm"] for r in b["records"]]
    torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-4, atol=1e-6)
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        torch.testing.assert_close(b["weights"][n], a["weights"][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("ep,distopt", [(1, False), (2, False), (2, True)], ids=["dp2", "dp2_ep2", "dp2_ep2_distopt"])
def test_two_ranks_equal_one_process(megatron_env, demo_prefix, tmp_path, one_process, init_ckpt, ep, distopt):
    """DP 2 (Megatron DDP), and DP 2 with expert parallelism 2 (each rank 4 of the 8 experts,
    Megatron's token dispatcher, expert grads reduced over the expert-data-parallel group,
    the grad norm summed over the expert group); with the layer-wise distributed optimizer too
    (the replicated parameters dealt over the 2 data-parallel ranks, the experts, whose
    expert-data-parallel group has one rank, kept whole on each rank)."""
    one = one_process
    two = _run(2, demo_prefix, tmp_path / "two.pt", ep=ep, init_from=init_ckpt, save=tmp_path / "ck2",
               distopt=distopt)
    _assert_same_run(one, two, 3)
    assert two["ranks_equal"]
    # the two-rank checkpoint (experts split over the ranks at EP 2) loads into one process:
    # a fresh stock model takes the transform and exactly the trained weights
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    stock = build_stock_gpt("tiny", device="cpu")
    info = vpmoe_compile.load_checkpoint(tmp_path / "ck2", stock)
    assert info["restored"] and info["iteration"] == 3
    for n, p in stock.named_parameters():
        assert torch.equal(p.detach(), two["weights"][n]), n


# ---------------------------------------------------------------------------------------------
# DP 2 with the layer-wise distributed optimizer (whole parameters sharded over the ranks)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dp2_distopt(demo_prefix, tmp_path_factory, init_ckpt):
    d = tmp_path_factory.mktemp("distopt")
    run = _run(2, demo_prefix, d / "two.pt", init_from=init_ckpt, save=d / "ck", distopt=True)
    run["ck"] = d / "ck"
    return run


@pytest.fixture(scope="module")
def one_process_six(demo_prefix, tmp_path_factory, init_ckpt):
    """The reference for the resumed runs: 6 steps in one process, straight."""
    return _run(1, demo_prefix, tmp_path_factory.mktemp("six") / "six.pt", steps=6, init_from=init_ckpt)


def test_distributed_optimizer_equals_one_process(megatron_env, one_process, dp2_distopt):
    """Each rank keeps optimizer state for about half of the parameters (whole tensors, every
    parameter owned by exactly one rank), steps them and broadcasts them: losses, grad norms and
    weights equal one process with the replicated optimizer, and both ranks hold the same weights."""
    _assert_same_run(one_process, dp2_distopt, 3)
    assert dp2_distopt["ranks_equal"]
    owned = dp2_distopt["owned"]
    assert len(owned) == 2 and all(o["params"] > 0 for o in owned)
    assert sum(o["params"] for o in owned) == dp2_distopt["num_params"]
    assert all(o["params"] < dp2_distopt["num_params"] for o in owned)


@pytest.mark.parametrize("direction", ["dp2_distopt_to_one", "one_to_dp2_distopt"])
def test_distributed_optimizer_checkpoint_reshards(megatron_env, demo_prefix, tmp_path, one_process, dp2_distopt,
                                                   one_process_six, direction):
    """A checkpoint saved at step 3 with the optimizer sharded over 2 ranks resumes in one process,
    and one saved by one process resumes sharded over 2 ranks: steps 4-6 (losses, grad norms,
    weights) equal 6 straight steps in one process, so every optimizer state tensor (NorMuon
    momentum and second moment, AdamW moments and step) reached its new owner."""
    if direction == "dp2_distopt_to_one":
        run = _run(1, demo_prefix, tmp_path / "r.pt", steps=6, load=dp2_distopt["ck"], save=tmp_path / "ck")
    else:
        run = _run(2, demo_prefix, tmp_path / "r.pt", steps=6, load=one_process["ck"], save=tmp_path / "ck",
                   distopt=True)
        assert run["ranks_equal"]
    ref = dict(one_process_six, records=one_process_six["records"][3:])
    _assert_same_run(ref, run, 3)


# ---------------------------------------------------------------------------------------------
# PP 2: the layers over two pipeline stages (Megatron's 1F1B schedule, gloo send / receive)
# ---------------------------------------------------------------------------------------------

def test_pipeline_parallel_equals_one_process(megatron_env, demo_prefix, tmp_path, one_process, init_ckpt):
    """Layers 1-2 on stage 0 (with the embedding), 3-4 on stage 1 (with the fused head): the
    transform runs per stage (the layer plan by global layer number, the 3:1 local:global schedule
    intact, the head fused on the last stage only), GRAPE-M's shared log_freq stays equal on both
    stages (its gradient all-reduced over the pipeline group), the grad norm sums both stages.
    Same losses and grad norms as one process; the PP 2 checkpoint loads into one process
    (PP 2 -> 1) with the weights one process trained, within fp32 tolerance."""
    two = _run(2, demo_prefix, tmp_path / "pp.pt", init_from=init_ckpt, save=tmp_path / "ck", pp=2)
    la = [r["loss"] for r in one_process["records"]]
    lb = [r["loss"] for r in two["records"]]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in two["records"]]),
                               torch.tensor([r["grad_norm"] for r in one_process["records"]]), rtol=1e-4, atol=1e-6)
    assert two["ranks_equal"]  # log_freq equal on both stages
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    stock = build_stock_gpt("tiny", device="cpu")
    info = vpmoe_compile.load_checkpoint(tmp_path / "ck", stock)
    assert info["restored"] and info["iteration"] == 3
    for n, p in stock.named_parameters():
        torch.testing.assert_close(p.detach(), one_process["weights"][n], rtol=1e-4, atol=1e-5, msg=n)


def test_pipeline_parallel_four_stages_resume_bit_identically(megatron_env, demo_prefix, tmp_path, init_ckpt):
    """PP 4 (one layer per stage: the two middle stages hold neither the embedding nor the head,
    so their AdamW parameters need other groups than the first and last stage's): every stage
    builds the same optimizer groups, so resuming from the step-2 checkpoint of a 3-step run
    (saved every 2 steps) gives its step 3 bit for bit (loss and grad norm)."""
    straight = _run(4, demo_prefix, tmp_path / "s.pt", steps=3, init_from=init_ckpt, save=tmp_path / "ck", pp=4,
                    save_interval=2)
    resumed = _run(4, demo_prefix, tmp_path / "b.pt", steps=3, load=tmp_path / "ck" / "iter_0000002", pp=4)
    assert [r["loss"] for r in resumed["records"]] == [r["loss"] for r in straight["records"][2:]]
    assert [r["grad_norm"] for r in resumed["records"]] == [r["grad_norm"] for r in straight["records"][2:]]
    assert straight["ranks_equal"] and resumed["ranks_equal"]


# ---------------------------------------------------------------------------------------------
# TP 2: heads, MLPs and vocabulary split over two ranks (Megatron's Column/RowParallelLinear)
# ---------------------------------------------------------------------------------------------

def _assert_same_records(a, b):
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in b]), torch.tensor([r["grad_norm"] for r in a]),
                               rtol=1e-4, atol=1e-6)


def _loaded_weights(ck):
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    stock = build_stock_gpt("tiny", device="cpu")
    info = vpmoe_compile.load_checkpoint(ck, stock)
    assert info["restored"]
    return {n: p.detach() for n, p in stock.named_parameters()}


@pytest.fixture(scope="module")
def tp2(demo_prefix, tmp_path_factory, init_ckpt):
    d = tmp_path_factory.mktemp("tp2")
    run = _run(2, demo_prefix, d / "tp.pt", init_from=init_ckpt, save=d / "ck", tp=2)
    run["ck"] = d / "ck"
    return run


def test_tensor_parallel_equals_one_process(megatron_env, one_process, tp2):
    """TP 2: each rank holds 4 of the 8 heads (1 of the 2 query groups), their ALiBi slopes and
    sinks, the TPA head factors of its heads and all token factors (their gradient summed over
    TP), half of the dense / shared-expert MLP and of the vocabulary; the routed experts whole
    (expert TP 1, sort-based dispatch of all tokens on each rank); GRAPE-M's log_freq replicated
    (gradient summed over TP); NorMuon orthogonalises every TP-split matrix whole; the grad norm
    sums the split elements over TP and counts the replicated ones once (the fused head is left
    out: the stock vocab-parallel loss). Same losses and grad norms as one process, the
    replicated elements equal on both ranks, and the TP 2 checkpoint loads into one process
    (TP 2 -> 1) with the weights one process trained, within fp32 tolerance."""
    _assert_same_records(one_process["records"], tp2["records"])
    assert tp2["ranks_equal"]
    weights = _loaded_weights(tp2["ck"])
    assert weights.keys() == one_process["weights"].keys()
    for n, w in weights.items():
        torch.testing.assert_close(w, one_process["weights"][n], rtol=1e-4, atol=1e-5, msg=n)


RESHARD_LAYOUTS = {"tp2": dict(tp=2), "tp2_ep2_sp": dict(tp=2, ep=2, sp=True)}


@pytest.mark.parametrize("layout,direction", [("tp2_ep2_sp", "from_one"), ("tp2", "to_one")])
def test_tensor_parallel_checkpoint_reshards(megatron_env, demo_prefix, tmp_path, request, one_process,
                                             one_process_six, layout, direction):
    """A checkpoint saved at step 3 by one process resumes at TP 2 x EP 2 with sequence
    parallelism (the experts split over the ranks too), and one saved at TP 2 resumes in one
    process: steps 4-6 equal 6 straight steps in one process (losses, grad norms, and the weights
    of the final checkpoint), so the model (the TPA factor blocks, the split and replicated
    tensors, the expert stacks) and the optimizer state (AdamW's split moments, NorMuon's
    whole-matrix state saved once in the one-rank layout, the experts' state by global expert)
    reach the other layout. (The two other pairs ran the same resharding code in the same
    directions; they were dropped for CI time.)"""
    split = request.getfixturevalue(layout)  # the 3-step run saved at that layout
    if direction == "from_one":
        run = _run(2, demo_prefix, tmp_path / "r.pt", steps=6, load=one_process["ck"], save=tmp_path / "ck",
                   **RESHARD_LAYOUTS[layout])
        assert run["ranks_equal"]
    else:
        run = _run(1, demo_prefix, tmp_path / "r.pt", steps=6, load=split["ck"], save=tmp_path / "ck")
    _assert_same_records(one_process_six["records"][3:], run["records"])
    for n, w in _loaded_weights(tmp_path / "ck").items():
        torch.testing.assert_close(w, one_process_six["weights"][n], rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: TP 2 with SP, and TP 2 x EP 2 (which Megatron runs only with SP)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_ep2_sp(demo_prefix, tmp_path_factory, init_ckpt):
    d = tmp_path_factory.mktemp("tp2ep2")
    run = _run(2, demo_prefix, d / "tpep.pt", init_from=init_ckpt, save=d / "ck", tp=2, ep=2, sp=True)
    run["ck"] = d / "ck"
    return run


@pytest.mark.parametrize("ep", [1, 2], ids=["tp2_sp", "tp2_ep2_sp"])
def test_sequence_parallel_equals_one_process(megatron_env, demo_prefix, tmp_path, one_process, init_ckpt,
                                              tp2_ep2_sp, ep):
    """TP 2 with Megatron's sequence parallelism on 2 ranks: the norms, residual stream and router
    see 16 of the 32 tokens per rank (the norm weights' gradients summed over TP by
    ``finalize_model_grads``), the TPA factor projection all-gathers the sequence (its backward
    reduce-scatters), the routed experts go behind Megatron's all-gather dispatcher. At EP 1 both
    ranks hold all 8 experts and their gradients are summed over the TP ranks (each routed other
    tokens); at EP 2 (TP x EP on the same 2 ranks, expert-TP 1) each rank holds 4 of them. Same
    losses and grad norms as one process, the replicated elements equal on both ranks, and the
    checkpoint loads into one process with the weights one process trained."""
    run = tp2_ep2_sp if ep == 2 else _run(2, demo_prefix, tmp_path / "sp.pt", init_from=init_ckpt,
                                          save=tmp_path / "ck", tp=2, sp=True)
    _assert_same_records(one_process["records"], run["records"])
    assert run["ranks_equal"]
    weights = _loaded_weights(tp2_ep2_sp["ck"] if ep == 2 else tmp_path / "ck")
    assert weights.keys() == one_process["weights"].keys()
    for n, w in weights.items():
        torch.testing.assert_close(w, one_process["weights"][n], rtol=1e-4, atol=1e-5, msg=n)
