"""The fused_head pass on the tiny model: stock parity (loss and every gradient), logits path,
parameter identity, one-graph compile of the head, refusals and all-or-nothing rollback."""

import dataclasses

import pytest
import torch

import vpmoe_compile
from passes.base import ModelSnapshot, Pass, PassError
from tests.conftest import make_batch

VOCAB = 201088


def _pair(cfg):
    """Two stock tiny models with identical weights (the second gets the first's state dict)."""
    from megatron_base import build_stock_gpt

    torch.manual_seed(0)
    a = build_stock_gpt(cfg, device="cpu")
    torch.manual_seed(1)
    b = build_stock_gpt(cfg, device="cpu")
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(b=2, s=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids, pos = make_batch(b=b, s=s, seed=seed)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, -3:] = -100  # padding as a data pipeline may mark it; masked below
    mask = torch.rand(b, s, generator=g)
    mask[0, -3:] = 0.0
    return ids, pos, labels, mask


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_grads(model, ids, pos, labels, mask):
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, None, labels=labels)
    (loss * mask).sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _no_stock_loss(model, monkeypatch):
    """Make the stock loss path fail loudly, to prove the fused one runs."""

    def boom(*a, **k):
        raise AssertionError("stock compute_language_model_loss was called")

    monkeypatch.setattr(model, "compute_language_model_loss", boom)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_all_gradients_equal_stock(megatron_env, tiny_cfg, tied, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, untied_embeddings=not tied))
    ours, stock = _pair(cfg)
    assert ours.share_embeddings_and_output_weights == tied
    vpmoe_compile.transform(ours, passes=["fused_head"])
    _no_stock_loss(ours, monkeypatch)
    ids, pos, labels, mask = _batch()
    got, got_g = _loss_and_grads(ours, ids, pos, labels, mask)
    want, want_g = _loss_and_grads(stock, ids, pos, labels, mask)
    assert got.shape == want.shape == (2, 24) and got.dtype == torch.float32
    assert _rel(got, want) < 1e-6
    assert set(got_g) == set(want_g)
    for name, g in want_g.items():
        if g is None:
            assert got_g[name] is None, name
            continue
        assert got_g[name] is not None and _rel(got_g[name], g) < 1e-5, name
    head_w = ours.embedding.word_embeddings.weight if tied else ours.output_layer.weight
    assert head_w.grad.abs().sum() > 0


def test_logits_path_and_parameters_unchanged(tiny_model):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from vpmoe_compile.modules.head import FusedHeadGPTModel, FusedHeadLinear

    ids, pos = make_batch(b=2, s=16)
    with torch.no_grad():
        ref = tiny_model(ids, pos, None)
    head, weight = tiny_model.output_layer, tiny_model.output_layer.weight
    weight_attrs = dict(weight.__dict__)
    params = [(n, id(p)) for n, p in tiny_model.named_parameters()]
    keys = list(tiny_model.state_dict())
    vpmoe_compile.transform(tiny_model, passes=["fused_head"])
    assert type(tiny_model) is FusedHeadGPTModel and isinstance(tiny_model, GPTModel)
    assert type(head) is FusedHeadLinear and isinstance(head, ColumnParallelLinear)
    assert tiny_model.output_layer is head and head.weight is weight and weight.__dict__ == weight_attrs
    assert [(n, id(p)) for n, p in tiny_model.named_parameters()] == params
    assert list(tiny_model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(tiny_model(ids, pos, None), ref)  # [b, s, V] logits, bit for bit
    rec = tiny_model.vpmoe_transform.results[0]
    assert [(r.path, r.new.rsplit(".", 1)[1]) for r in rec.replaced] == [
        ("output_layer", "FusedHeadLinear"),
        ("(root)", "FusedHeadGPTModel"),
    ]
    assert any("checked against the stock head" in n for n in rec.notes)


def test_fallback_cases_use_the_stock_postprocess(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["fused_head"])
    applies = tiny_model._fused_head_applies
    labels = torch.zeros(1, 4, dtype=torch.long)
    assert applies(labels, None, None)
    assert not applies(None, None, None)  # no labels: logits
    assert not applies(labels, True, None)  # MTP
    assert not applies(labels, None, object())  # inference context


def test_head_module_traces_to_one_graph(tiny_model):
    """``model.output_layer`` is the whole head; its labels path has no graph break."""
    import torch._dynamo

    from megatron_base.compat import dynamo_config

    vpmoe_compile.transform(tiny_model, passes=["fused_head"])
    hidden = torch.randn(12, 2, 64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 12))
    torch._dynamo.reset()
    try:
        with dynamo_config():
            ex = torch._dynamo.explain(tiny_model.output_layer)(hidden, labels=labels)
            torch._dynamo.reset()
            ex_logits = torch._dynamo.explain(tiny_model.output_layer)(hidden)
    finally:
        torch._dynamo.reset()
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    assert ex_logits.graph_break_count == 0 and ex_logits.graph_count == 1, ex_logits.break_reasons
    assert tiny_model.output_layer.vpmoe_compile_region  # what vpmoe_compile.compile wraps
    loss, bias = tiny_model.output_layer(hidden, labels=labels)
    assert bias is None and loss.shape == (2, 12)


def _refused(model, match):
    classes = [type(m) for m in model.modules()]
    with pytest.raises(PassError, match=match):
        vpmoe_compile.transform(model, passes=["fused_head"])
    assert classes == [type(m) for m in model.modules()]
    assert not hasattr(model.output_layer, "lce_chunk_size")


def test_refuses_unsupported_configurations(tiny_model, monkeypatch):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = tiny_model.config
    for attr, obj in (("tensor_model_parallel_size", cfg), ("sequence_parallel", tiny_model.output_layer)):
        # a vocab-parallel head: the pass leaves the stock head and loss and says so
        with monkeypatch.context() as m:
            m.setattr(obj, attr, 2 if attr == "tensor_model_parallel_size" else True)
            classes = [type(x) for x in tiny_model.modules()]
            vpmoe_compile.transform(tiny_model, passes=["fused_head"])
            assert classes == [type(x) for x in tiny_model.modules()]
            assert not hasattr(tiny_model.output_layer, "lce_chunk_size")
            assert "vocab-parallel" in tiny_model.vpmoe_transform.results[-1].summary
            del tiny_model.vpmoe_transform
    with monkeypatch.context() as m:
        m.setattr(cfg, "mtp_num_layers", 1)
        _refused(tiny_model, "multi-token prediction")
    with monkeypatch.context() as m:
        m.setattr(cfg, "defer_embedding_wgrad_compute", True)
        _refused(tiny_model, "defer_embedding_wgrad_compute")
    with monkeypatch.context() as m:
        m.setattr(tiny_model, "post_process", False)
        _refused(tiny_model, "post_process=False")

    class TEColumnParallelLinear(ColumnParallelLinear):
        pass

    with monkeypatch.context() as m:
        m.setattr(tiny_model.output_layer, "__class__", TEColumnParallelLinear)
        _refused(tiny_model, "not the stock")
    # and after all these refusals it still transforms
    vpmoe_compile.transform(tiny_model, passes=["fused_head"])


class _FailingPass(Pass):
    name = "failing"

    def run(self, ctx, result):
        raise RuntimeError("later pass fails")


def test_failing_later_pass_restores_classes(tiny_model, monkeypatch):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    ids, pos, labels, mask = _batch(b=1, s=8)
    with torch.no_grad():
        before = tiny_model(ids, pos, None, labels=labels)
    with pytest.raises(RuntimeError, match="later pass fails"):
        vpmoe_compile.transform(tiny_model, passes=["fused_head", _FailingPass()])
    assert type(tiny_model) is GPTModel and type(tiny_model.output_layer) is ColumnParallelLinear
    assert "lce_chunk_size" not in tiny_model.output_layer.__dict__
    assert getattr(tiny_model, "vpmoe_transform", None) is None
    calls = []
    real = tiny_model.compute_language_model_loss
    monkeypatch.setattr(tiny_model, "compute_language_model_loss", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids, pos, None, labels=labels), before)
    assert calls == [1]  # the stock loss path again


def test_snapshot_restores_swapped_classes(tiny_model):
    class Other(type(tiny_model.output_layer)):
        pass

    snap = ModelSnapshot(tiny_model)
    tiny_model.output_layer.__class__ = Other
    snap.restore()
    assert type(tiny_model.output_layer).__name__ == "ColumnParallelLinear"


def test_dump_shows_both_head_graphs(tiny_model, tmp_path):
    vpmoe_compile.transform(tiny_model, passes=["fused_head"], dump_dir=tmp_path / "d")
    page = (tmp_path / "d" / "01-fused_head.md").read_text()
    assert "FusedHeadLinear" in page and "-  output_layer: ColumnParallelLinear" in page
    loss_graph = page.split("### `output_layer (labels given: projection + loss)`")[1].split("### `output_layer`")[0]
    before, after = loss_graph.split("After (")
    assert "vocab_parallel_logits" in before and "capture failed" not in before
    assert "linear_cross_entropy" in after and "f32[16, 201088]" in after and "capture failed" not in after
    assert "### `output_layer`" in page  # the logits path, unchanged
