"""Data and expert parallelism through Megatron (DDP, token dispatcher) on CPU (gloo, 2 processes): the same global batch
trains to the same losses and weights as one process, within fp32 tolerance."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_train_worker.py")


def _run(nproc, prefix, out, steps=3, global_batch=4, micro_batch=2, ep=1, init_from=None, save=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           prefix, str(out), str(steps), str(global_batch), str(micro_batch), str(ep), str(init_from or "-")]
    if save:
        cmd.append(str(save))
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
    return _run(1, demo_prefix, tmp_path_factory.mktemp("one") / "one.pt", init_from=init_ckpt)


@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "dp2_ep2"])
def test_two_ranks_equal_one_process(megatron_env, demo_prefix, tmp_path, one_process, init_ckpt, ep):
    """DP 2 (Megatron DDP), and DP 2 with expert parallelism 2 (each rank 4 of the 8 experts,
    Megatron's token dispatcher, expert grads reduced over the expert-data-parallel group,
    the grad norm summed over the expert group)."""
    one = one_process
    two = _run(2, demo_prefix, tmp_path / "two.pt", ep=ep, init_from=init_ckpt, save=tmp_path / "ck2")
    la = [r["loss"] for r in one["records"]]
    lb = [r["loss"] for r in two["records"]]
    assert len(la) == len(lb) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    ga = [r["grad_norm"] for r in one["records"]]
    gb = [r["grad_norm"] for r in two["records"]]
    torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-4, atol=1e-6)
    assert one["weights"].keys() == two["weights"].keys()
    for n in one["weights"]:
        torch.testing.assert_close(two["weights"][n], one["weights"][n], rtol=1e-4, atol=1e-5, msg=n)
    # the two-rank checkpoint (experts split over the ranks at EP 2) loads into one process:
    # a fresh stock model takes the transform and exactly the trained weights
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    stock = build_stock_gpt("tiny", device="cpu")
    info = vpmoe_compile.load_checkpoint(tmp_path / "ck2", stock)
    assert info["restored"] and info["iteration"] == 3
    for n, p in stock.named_parameters():
        assert torch.equal(p.detach(), two["weights"][n]), n
