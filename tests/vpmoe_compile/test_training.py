"""Training utilities: the expert-bias update and bit-identical resume on CPU."""

import io

import torch

from tests.conftest import train_steps


def _build(seed=0):
    import vpmoe_compile
    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    model = build_stock_gpt("tiny", device="cpu")
    vpmoe_compile.transform(model, progress=False)
    return model, vpmoe_compile.build_optimizer(model)


def test_expert_bias_update_resets_the_token_counts(megatron_env):
    model, opt = _build()
    router = model.decoder.layers[1].mlp.router
    train_steps(model, opt, range(0, 1))
    assert torch.count_nonzero(router.expert_bias) > 0
    assert torch.count_nonzero(router.local_tokens_per_expert) == 0


def test_resume_is_bit_identical(megatron_env):
    """6 uninterrupted steps == 3 steps, save (model + optimizer), load into a fresh model, 3 steps."""
    model, opt = _build()
    uninterrupted = train_steps(model, opt, range(0, 6))
    first, opt1 = _build()
    train_steps(first, opt1, range(0, 3))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed, opt2 = _build(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    continued = train_steps(resumed, opt2, range(3, 6))
    assert continued == uninterrupted[3:]
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
