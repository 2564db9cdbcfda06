"""The sequence-parallel-capable torch RMSNorm that replaces the local spec's ``WrappedTorchNorm``
under sequence parallelism (the multi-rank training runs are in tests/parallel)."""

import dataclasses
import types

import pytest
import torch

from megatron_base import UnsupportedConfigError, build_stock_gpt, load_config
from megatron_base.norm import SequenceParallelTorchNorm, allow_sequence_parallel_norms


def _walk(obj, seen=None):
    """Every object reachable through a spec's ModuleSpecs, dataclasses and lists."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    yield obj
    if isinstance(obj, ModuleSpec):
        yield from _walk(obj.module)
        yield from _walk(obj.submodules)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _walk(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))


def test_spec_swap_replaces_every_torch_norm_and_leaves_the_spec_alone(megatron_env):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_base.model import transformer_config_from_vpmoe

    tcfg = transformer_config_from_vpmoe(load_config("tiny"))
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    before = [o for o in _walk(spec) if o is WrappedTorchNorm]
    # input / pre-MLP norms of 4 layers, their Q / K norms, the final norm
    assert len(before) >= 4 * 4 + 1
    swapped = allow_sequence_parallel_norms(spec)
    assert not [o for o in _walk(swapped) if o is WrappedTorchNorm]
    assert len([o for o in _walk(swapped) if o is SequenceParallelTorchNorm]) == len(before)
    # the input spec is not modified, and everything else is carried over
    assert len([o for o in _walk(spec) if o is WrappedTorchNorm]) == len(before)
    other = lambda s: [o for o in _walk(s) if isinstance(o, type) and o not in (WrappedTorchNorm, SequenceParallelTorchNorm)]
    assert other(swapped) == other(spec)


@pytest.mark.parametrize("sp", [False, True])
def test_norm_is_torch_rmsnorm_marked_for_the_tp_gradient_sum(sp):
    cfg = types.SimpleNamespace(normalization="RMSNorm", sequence_parallel=sp, layernorm_zero_centered_gamma=False,
                                persist_layer_norm=False, memory_efficient_layer_norm=False)
    norm = SequenceParallelTorchNorm(cfg, hidden_size=24, eps=1e-6)
    assert type(norm) is torch.nn.RMSNorm and norm.eps == 1e-6
    assert norm.weight.sequence_parallel is sp
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24) + 0.5)
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm.double()(x), ref)


def test_norm_refuses_what_torch_rmsnorm_cannot_do():
    base = dict(normalization="RMSNorm", sequence_parallel=True, layernorm_zero_centered_gamma=False,
                persist_layer_norm=False, memory_efficient_layer_norm=False)
    with pytest.raises(ValueError, match="RMSNorm only.*'LayerNorm'"):
        SequenceParallelTorchNorm(types.SimpleNamespace(**dict(base, normalization="LayerNorm")), 8)
    with pytest.raises(ValueError, match="layernorm_zero_centered_gamma is not supported"):
        SequenceParallelTorchNorm(types.SimpleNamespace(**dict(base, layernorm_zero_centered_gamma=True)), 8)


def test_sequence_parallel_needs_tensor_parallelism(megatron_env):
    with pytest.raises(UnsupportedConfigError, match="needs tensor parallelism > 1"):
        build_stock_gpt("tiny", device="meta", sequence_parallel=True)
