"""The global_attention pass: the flash kernel with the sink on global layers."""



import pytest
import torch

import vpmoe_compile
from tests.conftest import make_batch
from vpmoe_compile.modules.attention import SinkCoreAttention
from vpmoe_compile.ops.sink_attention.reference import sink_attention_reference
from tests.passes._attention import _logits, _rel


def test_global_attention_pass_alone_keeps_semantics(tiny_model):
    ids, pos = make_batch()
    with torch.no_grad():
        for l in tiny_model.decoder.layers:
            l.self_attention.core_attention.softmax_offset.normal_(0, 1.0)
    ref = _logits(tiny_model, ids, pos)
    sink = tiny_model.decoder.layers[3].self_attention.core_attention.softmax_offset
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    assert isinstance(core, SinkCoreAttention) and core.softmax_offset is sink
    assert type(tiny_model.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert _rel(_logits(tiny_model, ids, pos), ref) < 1e-5


def test_global_layer_uses_alibi_and_sink(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention", "grape"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    with torch.no_grad():
        core.softmax_offset.normal_(0, 1.0)
    q, k, v = torch.randn(20, 2, 8, 16), torch.randn(20, 2, 2, 16), torch.randn(20, 2, 2, 16)
    got = core(q, k, v, None)
    want, _ = sink_attention_reference(
        q.double(), k.double(), v.double(), core.softmax_offset.detach().double(),
        slopes=core.grape_a.slopes.double(), softmax_scale=core.softmax_scale,
    )
    assert _rel(got.double(), want.reshape(20, 2, -1)) < 1e-6


def test_global_core_ignores_causal_mask_with_one_warning(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    core = tiny_model.decoder.layers[3].self_attention.core_attention
    q, k, v = torch.randn(12, 1, 8, 16), torch.randn(12, 1, 2, 16), torch.randn(12, 1, 2, 16)
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)[None, None]
    with pytest.warns(UserWarning, match="ignores the attention_mask"):
        a = core(q, k, v, causal)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        b = core(q, k, v, causal)  # warned once only
    assert torch.equal(a, core(q, k, v, None)) and torch.equal(a, b)
