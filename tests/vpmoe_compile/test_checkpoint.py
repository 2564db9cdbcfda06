"""vpmoe_compile.checkpoint: the transform travels with a torch_dist checkpoint (CPU, gloo)."""

import json
import os

import pytest
import torch

from tests._forward import forward as _forward




def _transformed(cfg="tiny", seed=0, **kw):
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    m = build_stock_gpt(cfg, device="cpu")
    vpmoe_compile.transform(m, cfg, progress=False, **kw)
    # move every parameter off its initial value so a load that silently keeps the fresh
    # initialisation cannot pass
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _stock(cfg="tiny", seed=1):
    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    return build_stock_gpt(cfg, device="cpu")


def test_transform_state_is_json_and_names_everything(megatron_env):
    import vpmoe_compile
    from megatron_base import o200k

    m = _transformed()
    st = vpmoe_compile.transform_state(m)
    assert json.loads(json.dumps(st)) == st
    assert st["passes"] == m.vpmoe_transform.passes and len(st["passes"]) >= 4
    assert st["config"]["model"]["num_layers"] == m.config.num_layers
    tok = st["tokenizer"]
    assert tok["vocab_sha256"] == o200k.O200K_BASE_SHA256
    assert tok["padded_vocab_size"] == m.vocab_size
    assert tok["special_token_ids"]["eod"] == 199_999
    assert set(st["versions"]) == {"vpmoe_compile", "megatron_core", "torch"}
    with pytest.raises(vpmoe_compile.CheckpointError, match="not transformed"):
        vpmoe_compile.transform_state(_stock())


def test_restore_replays_the_transform_on_a_stock_model(megatron_env):
    import vpmoe_compile

    m = _transformed()
    fresh = vpmoe_compile.restore(_stock(), vpmoe_compile.transform_state(m))
    assert fresh.vpmoe_transform.passes == m.vpmoe_transform.passes
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in m.named_parameters()]
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(_forward(fresh), _forward(m))


def test_checkpoint_into_a_fresh_stock_model_is_bit_identical(megatron_env, tmp_path):
    import vpmoe_compile

    m = _transformed()
    ref = _forward(m)
    path = tmp_path / "ckpt" / "iter_0000007"
    out = vpmoe_compile.save_checkpoint(path, m, iteration=7, extra={"consumed_samples": 56})
    assert out == path and (path / "metadata.json").is_file()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000007"]  # no partial folder or marker left
    stock = _stock(seed=5)
    assert getattr(stock, "vpmoe_transform", None) is None
    info = vpmoe_compile.load_checkpoint(path, stock)
    assert info["restored"] and info["iteration"] == 7 and info["extra"] == {"consumed_samples": 56}
    assert torch.equal(_forward(stock), ref)
    for (n, p), (_, q) in zip(m.named_parameters(), stock.named_parameters()):
        assert torch.equal(p, q), n
    # and again into the (now transformed) model: same transform, loads without replaying
    info = vpmoe_compile.load_checkpoint(path, stock)
    assert not info["restored"]


def test_homogeneous_stock_spec_saves_after_transform(megatron_env, tmp_path):
    """All layers MoE (Megatron's homogeneous layer spec): without transform's heterogeneous
    checkpoint flag Megatron keys the layers as one stack and the differing local/global
    attention cannot be saved."""
    import vpmoe_compile
    from megatron_base import load_config

    cfg = load_config("tiny")
    cfg.moe.first_layer_dense = False
    m = _transformed(cfg)
    assert m.config.hetereogenous_dist_checkpoint is True
    vpmoe_compile.save_checkpoint(tmp_path / "c", m)
    stock = _stock(cfg, seed=2)
    assert stock.config.hetereogenous_dist_checkpoint is False
    vpmoe_compile.load_checkpoint(tmp_path / "c", stock)
    assert torch.equal(_forward(stock), _forward(m))


def test_save_never_overwrites_and_cleans_only_its_own_partial(megatron_env, tmp_path):
    import vpmoe_compile
    from vpmoe_compile.checkpoint import _PARTIAL_MARKER

    m = _transformed()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(vpmoe_compile.CheckpointError, match="never overwrites"):
        vpmoe_compile.save_checkpoint(user, m)
    assert (user / "notes.txt").read_text() == "keep me" and os.listdir(user) == ["notes.txt"]
    # a folder that happens to be called <path>.partial but is not ours: refused, untouched
    foreign = tmp_path / "c.partial"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(vpmoe_compile.CheckpointError, match="not an unfinished checkpoint"):
        vpmoe_compile.save_checkpoint(tmp_path / "c", m)
    assert (foreign / "data.bin").read_bytes() == b"x"
    # an interrupted save of ours (marker beside it): replaced
    stale = tmp_path / "d.partial"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / ("d" + _PARTIAL_MARKER)).write_text("{}")
    vpmoe_compile.save_checkpoint(tmp_path / "d", m)
    assert not stale.exists() and not (tmp_path / ("d" + _PARTIAL_MARKER)).exists()
    assert (tmp_path / "d" / "metadata.json").is_file()


def test_another_tokenizer_is_refused_with_both_identities(megatron_env, tmp_path, monkeypatch):
    import vpmoe_compile
    from vpmoe_compile import checkpoint as ck

    m = _transformed()
    real = ck.tokenizer_identity

    def other(name="o200k_harmony", padded_vocab_size=None):
        ident = real(name, padded_vocab_size)
        ident["vocab_sha256"] = "0" * 64
        return ident

    monkeypatch.setattr(ck, "tokenizer_identity", other)
    vpmoe_compile.save_checkpoint(tmp_path / "c", m)
    monkeypatch.setattr(ck, "tokenizer_identity", real)
    stock = _stock()
    with pytest.raises(vpmoe_compile.CheckpointError) as e:
        vpmoe_compile.load_checkpoint(tmp_path / "c", stock)
    msg = str(e.value)
    assert "0" * 64 in msg and real()["vocab_sha256"] in msg and "vocab_sha256" in msg
    assert getattr(stock, "vpmoe_transform", None) is None  # nothing applied
    with pytest.raises(vpmoe_compile.CheckpointError, match="another tokenizer"):
        vpmoe_compile.load_checkpoint(tmp_path / "c", m)


def test_another_transform_is_refused(megatron_env, tmp_path):
    import vpmoe_compile

    partial = _transformed(passes=["layer_plan", "moe"])
    vpmoe_compile.save_checkpoint(tmp_path / "c", partial)
    full = _transformed()
    with pytest.raises(vpmoe_compile.CheckpointError, match="another transform"):
        vpmoe_compile.load_checkpoint(tmp_path / "c", full)


def test_load_paths_and_errors(megatron_env, tmp_path):
    import vpmoe_compile
    from vpmoe_compile.checkpoint import TRACKER_FILE, iteration_dir, resolve_checkpoint_dir

    m = _transformed()
    save = tmp_path / "run"
    vpmoe_compile.save_checkpoint(iteration_dir(save, 3), m, iteration=3)
    vpmoe_compile.save_checkpoint(iteration_dir(save, 6), m, iteration=6)
    (save / TRACKER_FILE).write_text("3\n")
    assert resolve_checkpoint_dir(save) == iteration_dir(save, 3)
    assert vpmoe_compile.load_checkpoint(save, _stock())["iteration"] == 3
    with pytest.raises(vpmoe_compile.CheckpointError, match="does not exist"):
        vpmoe_compile.load_checkpoint(tmp_path / "nope", _stock())
    (tmp_path / "empty").mkdir()
    with pytest.raises(vpmoe_compile.CheckpointError, match="neither metadata.json"):
        vpmoe_compile.load_checkpoint(tmp_path / "empty", _stock())
    with pytest.raises(vpmoe_compile.CheckpointError, match="no optimizer state"):
        vpmoe_compile.load_checkpoint(iteration_dir(save, 6), m, optimizer=object())
    state = vpmoe_compile.read_transform_state(save)
    assert state["passes"] == m.vpmoe_transform.passes
    with pytest.raises(vpmoe_compile.CheckpointError, match="format"):
        vpmoe_compile.restore(_stock(), {"config": {}})


def test_optimizer_state_found_under_megatron_chained_prefixes():
    """The Megatron path's ChainedOptimizer saves each part under ``chained_<i>.``; the plain path
    under ``optimizer.``; a model-only checkpoint has neither."""
    from vpmoe_compile.checkpoint import _has_optimizer_state

    assert _has_optimizer_state({"decoder", "embedding", "optimizer"})
    assert _has_optimizer_state({"decoder", "chained_0", "chained_1", "rng_state"})
    assert not _has_optimizer_state({"decoder", "embedding", "output_layer", "rng_state"})
    assert not _has_optimizer_state({"chained_x", "optimizers"})
