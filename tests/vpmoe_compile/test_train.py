"""python -m vpmoe_compile train: Megatron's schedule on GPTDataset, checkpoints, bit-identical resume (CPU)."""

import json
import os

import pytest
import torch


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory):
    from megatron_base import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data"))


def _args(prefix, tmp_path, **kw):
    from vpmoe_compile.train import TrainArgs

    base = dict(config="tiny", data=[prefix], micro_batch=2, global_batch=4, seq_len=32, steps=4,
                warmup_steps=2, device="cpu", quiet=True, data_cache=str(tmp_path / "cache"))
    base.update(kw)
    return TrainArgs(**base)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_is_bit_identical(megatron_env, demo_prefix, tmp_path):
    """6 steps == 3 steps, save, load, 3 steps: the same losses, learning rates and weights."""
    from vpmoe_compile.train import train

    full = train(_args(demo_prefix, tmp_path, steps=6, log_json=str(tmp_path / "full.jsonl")))
    first = train(_args(demo_prefix, tmp_path, steps=3, lr_decay_steps=6, save=str(tmp_path / "ck"), save_interval=3,
                        log_json=str(tmp_path / "resumed.jsonl")))
    assert first["checkpoints"] == [str(tmp_path / "ck" / "iter_0000003")]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = train(_args(demo_prefix, tmp_path, steps=6, load=str(tmp_path / "ck"),
                         log_json=str(tmp_path / "resumed.jsonl")))
    a = full["records"]
    b = first["records"] + second["records"]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    wa, wb = _weights(full["model"]), _weights(second["model"])
    assert wa.keys() == wb.keys()
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    # the log of the resumed run holds all six steps (appended), and the plot is there
    lines = [json.loads(x) for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert (tmp_path / "resumed.png").stat().st_size > 1000
    # linear warm-up from 0 over 2 steps, then cosine decay, through Megatron's scheduler
    lrs = [r["lr"] for r in a]
    assert lrs[0] == 0.0 and lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_trained_checkpoint_loads_into_a_fresh_stock_model(megatron_env, demo_prefix, tmp_path):
    import vpmoe_compile
    from megatron_base import build_stock_gpt
    from vpmoe_compile.train import train

    run = train(_args(demo_prefix, tmp_path, steps=2, save=str(tmp_path / "ck")))
    stock = build_stock_gpt("tiny", device="cpu")
    info = vpmoe_compile.load_checkpoint(tmp_path / "ck", stock)
    assert info["restored"] and info["iteration"] == 2 and info["extra"]["consumed_samples"] == 8
    trained = _weights(run["model"].module)
    for n, p in stock.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_loss_masks_from_the_dataset_are_honoured(megatron_env):
    from vpmoe_compile.train import _loss_func

    per_token = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, n, report = _loss_func(mask, per_token)
    assert float(loss) == 37.0 and int(n) == 3
    assert report["lm loss"].tolist() == [37.0, 3.0]


def test_blend_and_bad_arguments(megatron_env, demo_prefix, tmp_path):
    from vpmoe_compile.train import TrainError, parse_blend, train

    assert parse_blend(["p"]) == (["p"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(TrainError, match="alternate weight and prefix"):
        parse_blend(["0.3", "a", "b"])
    with pytest.raises(TrainError, match="not a weight"):
        parse_blend(["a", "b"])
    with pytest.raises(TrainError, match="not found"):
        train(_args(str(tmp_path / "missing"), tmp_path))
    with pytest.raises(TrainError, match="multiple of --micro-batch"):
        train(_args(demo_prefix, tmp_path, global_batch=3))
    log = tmp_path / "exists.jsonl"
    log.write_text("user data\n")
    with pytest.raises(TrainError, match="exists"):
        train(_args(demo_prefix, tmp_path, log_json=str(log)))
    assert log.read_text() == "user data\n"
    with pytest.raises(TrainError, match="needs --save"):
        train(_args(demo_prefix, tmp_path, save_interval=2))
    # tensor parallelism: whole query groups per rank, with EP only under sequence parallelism
    # (as Megatron-LM requires), which needs TP > 1 and a sequence that splits over the TP ranks;
    # not with the layer-wise distributed optimizer; refused before the parallel state is touched
    with pytest.raises(TrainError, match="does not divide the 2 query groups"):
        train(_args(demo_prefix, tmp_path, tensor_parallel=4))
    with pytest.raises(TrainError, match="add --sequence-parallel"):
        train(_args(demo_prefix, tmp_path, tensor_parallel=2, expert_parallel=2))
    with pytest.raises(TrainError, match="needs --tensor-parallel > 1"):
        train(_args(demo_prefix, tmp_path, sequence_parallel=True))
    with pytest.raises(TrainError, match="--seq-len 31 is not a multiple of --tensor-parallel 2"):
        train(_args(demo_prefix, tmp_path, tensor_parallel=2, sequence_parallel=True, seq_len=31))
    with pytest.raises(TrainError, match="--distributed-optimizer with --tensor-parallel"):
        train(_args(demo_prefix, tmp_path, tensor_parallel=2, distributed_optimizer=True))


def test_cli_train_reports_bad_input_in_one_line(tmp_path, capsys):
    from vpmoe_compile.cli import main

    rc = main(["train", "--data", str(tmp_path / "nope"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --data") and "build-dataset" in err
