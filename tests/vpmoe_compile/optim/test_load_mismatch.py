"""Optimizer checkpoints of another model are refused before anything changes.

The scenarios of the issue: the tiny model (``build_stock_gpt`` + ``vpmoe_compile.transform``)
against the stock (untransformed) tiny model and tiny variants with ``expert_ffn_hidden_size``,
``hidden_size`` or ``[tpa] tpa_rank`` changed; one step each, ``state_dict()`` of one, loaded into
the optimizer of another. The load must raise naming the first mismatching parameter (model
name) and both shapes, leave ``state_dict()`` bitwise as it was, and a ``step()`` must work.
Covered: :class:`NorMuon` itself, :class:`NorMuonWithAuxAdamW` (both parts, also when only the
AdamW part does not fit) and the Megatron path's chained loader (pure Python: Megatron's wrapper
classes around the same inner optimizers, built without their CUDA-only ``__init__``).
"""

import copy
import math

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _set(section, key, value):
    def edit(cfg):
        setattr(getattr(cfg, section), key, value)

    return edit


VARIANTS = {
    "base": (None, True),
    "stock": (None, False),
    "expert_ffn": (_set("moe", "expert_ffn_hidden_size", 48), True),
    "hidden": (_set("model", "hidden_size", 96), True),
    "tpa_rank": (_set("tpa", "tpa_rank", 4), True),
}


def _train_step(model, opt):
    tokens = torch.randint(0, 1000, (2, 9))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    opt.zero_grad()
    model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
    _step(opt)


def _step(opt):
    """``opt.step()`` on the gradients present (those of the last backward): the optimizer works."""
    ok, norm, _ = opt.step()
    assert ok and math.isfinite(norm)


@pytest.fixture(scope="module")
def tiny(megatron_world):
    """``tiny(name) -> (model, optimizer)``: built on first use (one step taken), then shared."""
    import vpmoe_compile
    from megatron_base import build_stock_gpt, load_config

    cache = {}

    def get(name):
        if name not in cache:
            edit, transform = VARIANTS[name]
            cfg = load_config("tiny")
            if edit is not None:
                edit(cfg)
            torch.manual_seed(0)
            model = build_stock_gpt(cfg, device="cpu")
            if transform:
                vpmoe_compile.transform(model, cfg, progress=False)
            opt = vpmoe_compile.build_optimizer(model, cfg)
            _train_step(model, opt)
            cache[name] = (model, opt)
        return cache[name]

    return get


def _frozen(obj):
    """Deep copy with every tensor cloned (a state_dict returns live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _frozen(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_frozen(v) for v in obj)
    return copy.deepcopy(obj)


def _bits(t):
    t = t.detach().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise(a, b, where="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# What the refusal must name: the first mismatching parameter and both shapes (the live
# parameter's, the checkpoint's), for (checkpoint of, loaded into).
_QKV = r"'decoder\.layers\.0\.self_attention\.linear_qkv\.weight' "
_FC1 = r"'decoder\.layers\.1\.mlp\.experts\.linear_fc1\.weight' "
EXPECTED = {
    ("base", "stock"): (
        r"NorMuon group 0: the checkpoint has 25 parameters, this optimizer 67; first "
        r"mismatching parameter: 'decoder\.layers\.0\.self_attention\.linear_proj\.weight' "
        r".*shape \(64, 128\).*momentum_buffer there has shape \(168, 64\)"
    ),
    ("stock", "base"): (
        r"NorMuon group 0: the checkpoint has 67 parameters, this optimizer 25; first "
        r"mismatching parameter: " + _QKV + r".*shape \(168, 64\).*momentum_buffer there has "
        r"shape \(64, 128\)"
    ),
    ("base", "expert_ffn"): _FC1 + r".*shape \(8, 48, 64\).*momentum_buffer has shape \(8, 32, 64\)",
    ("expert_ffn", "base"): _FC1 + r".*shape \(8, 32, 64\).*momentum_buffer has shape \(8, 48, 64\)",
    ("base", "hidden"): _QKV + r".*shape \(168, 96\).*momentum_buffer has shape \(168, 64\)",
    ("hidden", "base"): _QKV + r".*shape \(168, 64\).*momentum_buffer has shape \(168, 96\)",
    ("base", "tpa_rank"): _QKV + r".*shape \(240, 64\).*momentum_buffer has shape \(168, 64\)",
    ("tpa_rank", "base"): _QKV + r".*shape \(168, 64\).*momentum_buffer has shape \(240, 64\)",
}


def _refused(opt, saved, match, before=None, state_of=None):
    """``opt.load_state_dict(saved)`` raises naming the parameter and shapes, and
    ``state_of()`` (default ``opt.state_dict()``) is bitwise ``before`` (default: taken now)."""
    state_of = state_of or opt.state_dict
    before = _frozen(state_of()) if before is None else before
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(saved)
    assert type(err.value).__name__ == "StateDictMismatch"
    _assert_bitwise(before, state_of())
    return before


@pytest.mark.parametrize("other", ["stock", "expert_ffn", "hidden", "tpa_rank"])
def test_checkpoint_of_another_model_is_refused_unchanged(tiny, other):
    """The tiny model's checkpoint into the optimizer of ``other`` (stock model, or
    expert_ffn_hidden_size / hidden_size / tpa_rank changed) through NorMuon itself, the plain
    chain (NorMuon + AdamW) and the Megatron chain; and ``other``'s NorMuon checkpoint into the
    tiny model's. Each refused with the state bitwise unchanged; the refused optimizer steps."""
    _, base = tiny("base")
    model, opt = tiny(other)
    match = EXPECTED[("base", other)]
    full = _frozen(opt.state_dict())  # NorMuon + AdamW: what every path below must leave alone
    _refused(opt.normuon, base.normuon.state_dict(), match)
    _refused(opt, base.state_dict(), match, before=full)
    chain = _megatron_chain(opt)  # the same inner optimizers (fp32 "main params" = the params)
    _refused(chain, _megatron_chain(base).state_dict(), match, before=full, state_of=opt.state_dict)
    _refused(base.normuon, opt.normuon.state_dict(), EXPECTED[(other, "base")])
    _step(opt)


def _adamw_slot(opt, name):
    """Position of the AdamW parameter ``name`` in the AdamW part of ``opt.state_dict()``."""
    flat = [p for g in opt.adamw.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(flat) if opt._names[id(p)] == name)


def test_partial_failure_leaves_both_parts_unchanged(tiny, monkeypatch):
    """Checkpoints whose NorMuon part fits (an older one of the same model) but not the rest:

    * the AdamW part (torch's AdamW loader does not check shapes at all), plain and Megatron
      chain; on the Megatron chain also an fp32 main parameter: refused before NorMuon loads;
    * an unexpected error after NorMuon has loaded (AdamW's loader raising): NorMuon's state,
      banks and re-homed parameters are rolled back (state and parameters bitwise, a step runs).
    """
    model, opt = tiny("base")
    chain = _megatron_chain(opt)
    saved, saved_chain = _frozen(opt.state_dict()), _frozen(chain.state_dict())
    _step(opt)  # the live NorMuon state now differs from the checkpoints'
    slot = _adamw_slot(opt, "output_layer.weight")
    adam = (r"AdamW parameter 'output_layer\.weight' .*exp_avg has shape \(3, 5\), this "
            r"optimizer needs \(201088, 64\)")

    bad = _frozen(saved)
    bad["adamw"]["state"][slot]["exp_avg"] = torch.zeros(3, 5)
    full = _refused(opt, bad, adam)
    bad = _frozen(saved_chain)
    bad[1]["state"][slot]["exp_avg"] = torch.zeros(3, 5)
    _refused(chain, bad, r"AdamW \(chain part 1\) parameter" + adam[len("AdamW parameter"):],
             before=full, state_of=opt.state_dict)
    bad = _frozen(saved_chain)
    bad[0]["fp32_from_fp16_params"][0][0] = torch.zeros(3, 5)
    _refused(chain, bad, _QKV + r".*fp32 main parameter has shape \(3, 5\), this optimizer "
             r"needs \(168, 64\)", before=full, state_of=opt.state_dict)

    params = _params_of(model)

    def boom(sd):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(opt.adamw, "load_state_dict", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        opt.load_state_dict(saved)
    monkeypatch.undo()
    _assert_bitwise(full, opt.state_dict())
    _assert_bitwise(params, _params_of(model), "parameters")
    _step(opt)
    opt.load_state_dict(saved)  # the same checkpoint loads once nothing fails
    _assert_bitwise(saved, _frozen(opt.state_dict()))


def test_normuon_refuses_blocks_that_do_not_fit():
    """Same shapes, but the checkpoint's blocks (adopted by the load) do not tile the rows."""
    from vpmoe_compile.optim import NorMuon

    w = torch.nn.Parameter(torch.randn(48, 32))
    u = torch.nn.Parameter(torch.randn(16, 32))
    split = (((0, 16),), ((16, 32),))
    opt = NorMuon([{"params": [u, w], "blocks": [None, split]}], lr=0.02)
    opt.param_names = {id(u): "u.weight", id(w): "qkv.weight"}
    for p in (u, w):
        p.grad = torch.randn_like(p)
    opt.step()
    saved = _frozen(opt.state_dict())
    saved["param_groups"][0]["blocks"][1] = (((0, 16),), ((16, 16),))
    _refused(opt, saved, r"'qkv\.weight' .*blocks / layout .*cover 32 of 48 rows")
    saved["param_groups"][0]["blocks"][1] = split
    saved["state"][1]["second_moment"] = torch.zeros(1, 32)
    _refused(opt, saved, r"'qkv\.weight' .*second_moment has shape \(1, 32\).*needs \(48, 1\)")
    opt.step()


# --------------------------------------------------------------------------- Megatron path
def _megatron_chain(opt):
    """Megatron's wrappers around the plain path's inner optimizers, as ``build_megatron_optimizer``
    chains them (NorMuon in ``NorMuonFloat16Optimizer``, AdamW in ``NorMuonFP32Optimizer``),
    without the CUDA-only ``__init__``: ``load_state_dict`` / ``state_dict`` are Megatron's own.
    The Float16 wrapper's "main params" are NorMuon's params themselves."""
    from megatron.core.optimizer import OptimizerConfig

    from vpmoe_compile.optim.megatron_wrappers import (
        NorMuonChainedOptimizer,
        NorMuonFloat16Optimizer,
        NorMuonFP32Optimizer,
    )

    config = OptimizerConfig(clip_grad=1.0)
    nm = object.__new__(NorMuonFloat16Optimizer)
    nm.optimizer, nm.config, nm.grad_scaler, nm.is_stub_optimizer = opt.normuon, config, None, False
    nm.float16_groups = [list(g["params"]) for g in opt.normuon.param_groups]
    nm.fp32_from_float16_groups = [list(g["params"]) for g in opt.normuon.param_groups]
    nm.fp32_from_fp32_groups = [[] for _ in opt.normuon.param_groups]
    aw = object.__new__(NorMuonFP32Optimizer)
    aw.optimizer, aw.config, aw.is_stub_optimizer = opt.adamw, config, False
    return NorMuonChainedOptimizer([nm, aw], nan_policy="skip", names=opt._names)
