"""vpmoe_compile.compile: every layer of the transformed model is one graph (TorchDynamo only,
no Inductor), no recompilation across training steps and lr changes, same numbers as eager."""

import pytest
import torch

from tests.conftest import make_batch, train_steps


def _transformed(seed=0, value_residual=False):
    import dataclasses

    import vpmoe_compile
    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("tiny")
    if value_residual:  # the fork's features: every layer reads layer 1's values through the
        # shared state, and the linear biases (grouped-expert biases gathered per sorted row)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_residual=True, value_residual_init=0.5,
                                                                 add_bias_linear=True))
    torch.manual_seed(seed)
    model = build_stock_gpt(cfg, device="cpu")
    vpmoe_compile.transform(model, cfg, progress=False)
    return model


def _layer_inputs(model, batch):
    """The real (args, kwargs) each layer / region receives in a training forward."""
    inputs = {}

    def hook(name):
        def fn(module, args, kwargs):
            inputs.setdefault(name, (args, kwargs))

        return fn

    regions = {f"decoder.layers.{i}": l for i, l in enumerate(model.decoder.layers)}
    regions["decoder.final_layernorm"] = model.decoder.final_layernorm
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in regions.items()]
    ids, pos = batch
    model.train()
    model(ids, pos, None, labels=ids)
    for h in handles:
        h.remove()
    return regions, inputs


@pytest.mark.parametrize("value_residual", [False, True], ids=["plain", "value_residual_and_biases"])
def test_every_layer_is_one_graph_without_breaks(megatron_env, value_residual):
    from megatron_base.compat import dynamo_config

    model = _transformed(value_residual=value_residual)
    regions, inputs = _layer_inputs(model, make_batch(2, 32))
    for module in model.modules():
        if hasattr(module, "prime_for_compile"):
            module.prime_for_compile()
    kinds = set()
    for name, module in regions.items():
        args, kwargs = inputs[name]
        with dynamo_config():
            explained = torch._dynamo.explain(module)(*args, **kwargs)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name
        kinds.add(type(getattr(module, "mlp", module)).__name__)
    assert {"GroupedMoELayer", "MLP"} <= kinds


@pytest.mark.parametrize("value_residual", [False, True], ids=["plain", "value_residual_and_biases"])
def test_compiled_training_matches_eager_without_recompiling(megatron_env, value_residual):
    """aot_eager (AOTAutograd, no Inductor) over 4 steps with a changing lr: graphs are made in
    the first step only (one per layer kind + final norm + head), and losses equal eager's
    (also with the value residual: layer 1's values cross the compiled layers' boundaries)."""
    import torch._dynamo.testing

    import vpmoe_compile

    torch._dynamo.reset()  # other tests' models compiled the same code objects (recompile limit)
    eager, compiled = _transformed(value_residual=value_residual), _transformed(value_residual=value_residual)
    opt_e = vpmoe_compile.build_optimizer(eager)
    opt_c = vpmoe_compile.build_optimizer(compiled)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    done = vpmoe_compile.compile(compiled, backend=counter)
    assert done[:4] == [f"decoder.layers.{i}" for i in range(4)]
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]
    losses_e = train_steps(eager, opt_e, range(1), lrs)
    losses_c = train_steps(compiled, opt_c, range(1), lrs)
    frames = counter.frame_count
    # dense local, MoE local (shared by layers 2 and 3), MoE global, final norm, head
    assert 3 <= frames <= 6
    losses_e += train_steps(eager, opt_e, range(1, 4), lrs)
    losses_c += train_steps(compiled, opt_c, range(1, 4), lrs)
    assert counter.frame_count == frames, "recompiled after the first step"
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-5, atol=1e-5)


def test_compile_refuses_a_stock_model_and_a_second_call(megatron_env, tiny_model):
    import vpmoe_compile
    from vpmoe_compile.compiler import CompileError

    with pytest.raises(CompileError, match="transform"):
        vpmoe_compile.compile(tiny_model, backend="eager")
    model = _transformed()
    vpmoe_compile.compile(model, backend="eager")
    with pytest.raises(CompileError, match="already compiled"):
        vpmoe_compile.compile(model, backend="eager")
