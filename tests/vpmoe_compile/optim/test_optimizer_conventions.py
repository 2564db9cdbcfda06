"""Megatron's optimizer conventions in build_optimizer: OptimizerConfig fields, MegatronOptimizer's
interface on both paths, torch_dist checkpoints of the plain path, OptimizerParamScheduler.

The Megatron path needs CUDA (Megatron's wrappers and its grad clipping allocate on it): its
behavioural variants are marked ``gpu`` and skipped on a CPU machine; the interface signatures
of both classes are checked on CPU.
"""

import copy
import inspect
import math
import tempfile
from types import SimpleNamespace

import pytest
import torch

from vpmoe_compile.optim import NorMuonWithAuxAdamW, UnsupportedOptimizerSetup, build_optimizer

from ._fake import VOCAB, FakeVpMoE

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PATHS = ["plain", pytest.param("megatron", marks=[pytest.mark.gpu, GPU])]


def _OptimizerConfig(**kw):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**kw)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _twins(n=2, seed=0):
    torch.manual_seed(seed)
    first = FakeVpMoE()
    out = [first]
    for _ in range(n - 1):
        m = FakeVpMoE()  # (deepcopy would drop the tpa_factor_rows parameter attribute)
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def _step_all(pairs, tokens):
    """One step of every (model, optimizer) on the same batch; returns the step results."""
    out = []
    for model, opt in pairs:
        opt.zero_grad()
        _loss(model, tokens).backward()
        out.append(opt.step())
    return out


def _params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------------------------
# OptimizerConfig fields
# --------------------------------------------------------------------------------------------


def test_optimizer_config_fields_reach_the_groups_and_are_used():
    """lr / min_lr / weight_decay / clip_grad / Adam / Muon fields of an OptimizerConfig land in
    the [optimizer] settings and the groups, and the step uses them: it equals the step of an
    optimizer configured through the section with the same values, and differs from the default."""
    oc = _OptimizerConfig(
        lr=0.02, min_lr=0.002, weight_decay=0.05, clip_grad=0.3, adam_beta1=0.8, adam_eps=1e-6,
        muon_momentum=0.9, muon_num_ns_steps=4, log_num_zeros_in_grad=True,
    )
    before = copy.deepcopy(oc)
    m_oc, m_sec, m_def = _twins(3)
    opt = build_optimizer(m_oc, optimizer_config=oc)
    assert oc == before and oc.optimizer == "adam"  # the caller's config is not modified
    st = opt.settings
    assert (st.lr, st.min_lr, st.weight_decay, st.clip_grad) == (0.02, 0.002, 0.05, 0.3)
    assert (st.adam_beta1, st.adam_eps, st.normuon_momentum, st.polar_express_steps) == (0.8, 1e-6, 0.9, 4)
    assert st.adam_beta2 == 0.95 and st.normuon_aux_lr == 3e-4  # not set: the section's
    for g in opt.normuon.param_groups:
        assert (g["lr"], g["max_lr"], g["min_lr"], g["weight_decay"], g["momentum"]) == (
            0.02, 0.02, 0.002, 0.05, 0.9)
    for g in opt.adamw.param_groups:
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_mult"])
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    assert opt.clip_grad == 0.3 and len(opt.normuon.table) == 4 == opt.normuon.pe_record["steps"]

    same = build_optimizer(m_sec, SimpleNamespace(
        lr=0.02, min_lr=0.002, weight_decay=0.05, clip_grad=0.3, adam_beta1=0.8, adam_eps=1e-6,
        normuon_momentum=0.9, polar_express_steps=4,
    ))
    default = build_optimizer(m_def)
    tokens = torch.randint(0, VOCAB, (2, 9))
    for _ in range(2):
        (ok, norm, zeros), (ok2, norm2, zeros2), _ = _step_all(
            [(m_oc, opt), (m_sec, same), (m_def, default)], tokens)
        assert ok and ok2 and norm == norm2
        assert zeros2 is None and isinstance(zeros, float) and zeros >= 0  # log_num_zeros_in_grad
    assert norm > 0.3
    # clip_grad used: the gradients the step saw have norm 0.3
    grads = [p.grad for p in m_oc.parameters()]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(0.3, rel=1e-4)
    assert _params_equal(m_oc, m_sec)
    assert not _params_equal(m_oc, m_def)


def test_optimizer_config_as_cfg_overrides_the_transform_config_and_counts_zeros():
    """An OptimizerConfig passed positionally is the optimizer_config; the config the model was
    transformed with still owns every field it does not set; num_zeros counts zero gradients."""
    model = FakeVpMoE()
    model.vpmoe_config = SimpleNamespace(lr=0.5, normuon_aux_lr=0.1, normuon_aux_min_lr=0.1)
    opt = build_optimizer(model, _OptimizerConfig(weight_decay=0.2, log_num_zeros_in_grad=True))
    assert {g["lr"] for g in opt.normuon.param_groups} == {0.5}
    assert {g["lr"] for g in opt.adamw.param_groups} == {0.1}
    assert {g["weight_decay"] for g in opt.normuon.param_groups} == {0.2}
    opt.zero_grad()
    _loss(model, torch.randint(0, VOCAB, (2, 9))).backward()
    model.decoder.layers[0].mlp.linear_fc1.weight.grad[:3] = 0.0
    expected = sum(int((p.grad == 0).sum()) for p in model.parameters() if p.grad is not None)
    assert expected >= 3 * model.decoder.layers[0].mlp.linear_fc1.weight.shape[1]
    ok, _, zeros = opt.step()
    assert ok and zeros == expected
    with pytest.raises(ValueError, match="two OptimizerConfigs"):
        build_optimizer(model, _OptimizerConfig(), optimizer_config=_OptimizerConfig())


def test_default_optimizer_config_changes_nothing():
    """An OptimizerConfig with only Megatron's defaults (and Megatron's adam_beta2 default 0.999,
    indistinguishable from unset) keeps every [optimizer] setting."""
    a, b = _twins()
    plain = build_optimizer(a)
    with_oc = build_optimizer(b, optimizer_config=_OptimizerConfig())
    assert with_oc.settings.values == plain.settings.values
    tokens = torch.randint(0, VOCAB, (2, 9))
    _step_all([(a, plain), (b, with_oc)], tokens)
    assert _params_equal(a, b)


@pytest.mark.parametrize(
    "fields, names",
    [
        (dict(use_distributed_optimizer=True), ["use_distributed_optimizer=True.*distributed optimizer"]),
        (dict(fp16=True), ["fp16=True.*not fp16"]),
        (dict(loss_scale=1024.0), ["loss_scale=1024.0.*loss scaling"]),
        (dict(optimizer_cpu_offload=True), ["optimizer_cpu_offload=True.*CPU offload"]),
        (dict(sgd_momentum=0.5), ["sgd_momentum=0.5.*SGD"]),
        (dict(optimizer="sgd"), ["optimizer='sgd'"]),
        (dict(decoupled_weight_decay=False), ["decoupled_weight_decay=False"]),
        (dict(apply_wd_to_qk_layernorm=True), ["apply_wd_to_qk_layernorm=True.*routing"]),
        (dict(muon_scale_mode="shape_scaling"), ["muon_scale_mode='shape_scaling'.*scale_mode"]),
        (dict(muon_tp_mode="duplicated"), ["muon_tp_mode='duplicated'"]),
        (dict(bf16=True), ["bf16=True.*plain path.*DistributedDataParallel"]),
        (dict(config_logger_dir="/tmp/x"), ["config_logger_dir='/tmp/x'.*plain path"]),
        (dict(use_distributed_optimizer=True, sgd_momentum=0.5, hysteresis=3),
         ["use_distributed_optimizer=True", "sgd_momentum=0.5", "hysteresis=3"]),
    ],
)
def test_unsupported_optimizer_config_fields_raise_naming_them(fields, names):
    model = FakeVpMoE()
    with pytest.raises(UnsupportedOptimizerSetup) as err:
        build_optimizer(model, optimizer_config=_OptimizerConfig(**fields))
    for name in names:
        assert err.match(name)
    # a namespace carrying the same fields (Megatron's defaults for the rest) is refused alike
    with pytest.raises(UnsupportedOptimizerSetup, match=names[0]):
        build_optimizer(model, optimizer_config=SimpleNamespace(**fields))


def test_accepted_fields_do_not_raise_and_bad_lr_pair_does():
    model = FakeVpMoE()
    build_optimizer(model, optimizer_config=_OptimizerConfig(
        optimizer="muon", muon_use_nesterov=True, muon_split_qkv=True, timers=None,
        barrier_with_L1_time=True))
    fused = build_optimizer(model, optimizer_config=_OptimizerConfig(muon_split_qkv=False))
    assert fused.settings.qkv_split == "fused"
    with pytest.raises(ValueError, match=r"min_lr \(0\.0003\) is above lr \(0\.0001\).*OptimizerConfig's lr"):
        build_optimizer(model, optimizer_config=_OptimizerConfig(lr=1e-4))


def test_timers_are_reported():
    calls = []

    class _Timer:
        def __init__(self, name):
            self.name = name

        def start(self, barrier=False):
            calls.append(("start", self.name, barrier))

        def stop(self):
            calls.append(("stop", self.name))

    model = FakeVpMoE()
    opt = build_optimizer(model, optimizer_config=_OptimizerConfig(
        timers=lambda name, log_level=None: _Timer(name), barrier_with_L1_time=True))
    _step_all([(model, opt)], torch.randint(0, VOCAB, (2, 9)))
    assert ("start", "optimizer-inner-step", True) in calls and ("stop", "optimizer-inner-step") in calls
    assert ("start", "optimizer-clip-main-grad", True) in calls


def test_megatron_path_config_is_a_copy_with_the_resolved_settings():
    """The OptimizerConfig handed to Megatron's wrappers on the Megatron path (CPU: the function
    alone): the resolved lr / min_lr / weight decay / clip / betas, optimizer 'adam', bf16 from
    the model unless set, the caller's runtime fields; the caller's object unchanged."""
    from vpmoe_compile.optim.optimizer_config import megatron_optimizer_config, resolve_settings

    user = _OptimizerConfig(lr=0.02, min_lr=0.001, clip_grad=0.5, optimizer="muon",
                            log_num_zeros_in_grad=True, muon_momentum=0.9)
    snapshot = copy.deepcopy(user)
    chunk = torch.nn.Linear(4, 4).to(torch.bfloat16)
    st = resolve_settings(SimpleNamespace(normuon_aux_lr=0.003, adam_beta2=0.9), user, "megatron").settings
    got = megatron_optimizer_config([chunk], st, user)
    assert user == snapshot and got is not user
    assert (got.optimizer, got.lr, got.min_lr, got.clip_grad, got.adam_beta2) == ("adam", 0.02, 0.001, 0.5, 0.9)
    assert got.bf16 and got.params_dtype == torch.bfloat16 and got.log_num_zeros_in_grad
    assert got.use_distributed_optimizer is False
    fp32 = megatron_optimizer_config([torch.nn.Linear(4, 4)], st, None)
    assert not fp32.bf16 and fp32.params_dtype == torch.float32 and fp32.lr == 0.02
    forced = megatron_optimizer_config([torch.nn.Linear(4, 4)], st, _OptimizerConfig(bf16=True))
    assert forced.bf16
    # bf16 / params_dtype are the Megatron path's: accepted there
    resolve_settings(None, _OptimizerConfig(bf16=True, params_dtype=torch.bfloat16), "megatron")


# --------------------------------------------------------------------------------------------
# MegatronOptimizer's interface
# --------------------------------------------------------------------------------------------

#: (method, arguments of a Megatron-style call after self)
_CALLS = [
    ("step", (), {}),
    ("zero_grad", (), {"set_to_none": True}),
    ("state_dict", (), {}),
    ("load_state_dict", ({},), {}),
    ("sharded_state_dict", ({},), {"is_loading": False, "metadata": None}),
    ("get_loss_scale", (), {}),
    ("scale_loss", (torch.ones(()),), {}),
    ("reload_model_params", (), {"state_dict": None}),
    ("get_parameters", (), {}),
    ("get_main_grads_for_grad_norm", (), {}),
    ("get_grad_norm", (), {}),
    ("clip_grad_norm", (1.0,), {}),
    ("count_zeros", (), {}),
    ("prepare_grads", (), {}),
    ("step_with_ready_grads", (), {}),
]


def _classes():
    from vpmoe_compile.optim.megatron_wrappers import NorMuonChainedOptimizer

    return {"plain": NorMuonWithAuxAdamW, "megatron": NorMuonChainedOptimizer}


@pytest.mark.parametrize("path", ["plain", "megatron"])
def test_both_classes_accept_megatron_optimizer_calls(path):
    """Every MegatronOptimizer method (abstract ones included) exists and takes Megatron's call
    signature; param_groups / state are properties (CPU: classes only)."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    cls = _classes()[path]
    abstract = set(MegatronOptimizer.__abstractmethods__)
    assert abstract <= {name for name, _, _ in _CALLS}
    for name, args, kwargs in _CALLS:
        fn = getattr(cls, name, None)
        assert callable(fn), f"{cls.__name__} has no {name}"
        inspect.signature(fn).bind(None, *args, **kwargs)  # TypeError if the call does not fit
    for prop in ("param_groups", "state"):
        assert isinstance(inspect.getattr_static(cls, prop), property), prop


def test_megatron_chain_lists_parameters_and_grads_of_every_part():
    """ChainedOptimizer inherits get_parameters / get_main_grads_for_grad_norm of a single
    optimizer (they assert a chain of one); NorMuonChainedOptimizer concatenates its parts'
    (CPU: duck-typed parts, no Megatron wrapper built)."""
    from vpmoe_compile.optim.megatron_wrappers import NorMuonChainedOptimizer

    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    cfg = SimpleNamespace(clip_grad=0.0)
    parts = [
        SimpleNamespace(config=cfg, is_stub_optimizer=False, get_parameters=lambda p=p: [p],
                        get_main_grads_for_grad_norm=lambda p=p: [p.grad])
        for p in params
    ]
    chain = NorMuonChainedOptimizer(parts)
    assert chain.get_parameters() == params
    assert all(a is b for a, b in zip(chain.get_main_grads_for_grad_norm(), [p.grad for p in params]))


def _model_sharded(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {n: ShardedTensor.from_rank_offsets(n, p, replica_id=0) for n, p in model.named_parameters()}


def _plain_setup():
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(lr=0.02))

    def set_grads(seed):
        opt.zero_grad()
        torch.manual_seed(seed)
        _loss(model, torch.randint(0, VOCAB, (2, 9))).backward()

    return model, model, opt, set_grads, _model_sharded(model)


def _ddp_toy(seed, bf16=True):
    """DDP-wrapped toy (a dense matrix, a norm, a gated fc1 stack, an fc2 stack), as in
    test_normuon_gpu.py."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    E, F, H = 2, 64, 128
    dtype = torch.bfloat16 if bf16 else torch.float32
    tcfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=F,
                             gated_linear_unit=True, bf16=bf16, params_dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.nn.Module()
    m.config = tcfg
    m.experts = torch.nn.Module()
    for owner, name, shape, attrs in (
        (m, "linear_fc1", (F, H), {}), (m, "layernorm", (H,), {}),
        (m.experts, "linear_fc1", (E, 2 * F, H), dict(allreduce=False, expert_stack=True)),
        (m.experts, "linear_fc2", (E, H, F), dict(allreduce=False, expert_stack=True)),
    ):
        sub = torch.nn.Module()
        sub.weight = torch.nn.Parameter((torch.randn(*shape, generator=gen) * 0.02).cuda().to(dtype))
        for k, v in attrs.items():
            setattr(sub.weight, k, v)
        setattr(owner, name, sub)
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), m)
    return m, ddp


def _ddp_set_grads(ddp, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ddp.zero_grad_buffer()
    for p in ddp.module.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=gen) * 1e-2)


def _ddp_sharded(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for name, p in model.named_parameters():
        off = ((0, 0, 1),) if p.ndim == 3 else ()  # expert axis 0, ep_rank 0 of 1
        out[name] = ShardedTensor.from_rank_offsets(name, p, *off, replica_id=0)
    return out


def _megatron_setup():
    model, ddp = _ddp_toy(0)
    opt = build_optimizer(ddp, SimpleNamespace(lr=0.02, compile=False))
    return model, ddp, opt, lambda seed: _ddp_set_grads(ddp, seed), _ddp_sharded(model)


@pytest.mark.parametrize("path", PATHS)
def test_both_paths_expose_the_megatron_optimizer_interface(megatron_world, path):
    """Each method of MegatronOptimizer's interface called on a built optimizer of each path."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model, top, opt, set_grads, model_sharded = (_plain_setup if path == "plain" else _megatron_setup)()
    assert opt.path == path
    n_routed = sum(1 for r in opt.routes if r.optimizer != "frozen")
    assert len(opt.get_parameters()) == n_routed
    groups = opt.param_groups
    assert groups and all({"lr", "max_lr", "min_lr", "weight_decay", "wd_mult"} <= set(g) for g in groups)
    scale = opt.get_loss_scale()
    assert isinstance(scale, torch.Tensor) and scale.float().flatten().tolist() == [1.0]
    x = torch.full((), 3.0, device=scale.device)
    assert opt.scale_loss(x).item() == 3.0

    set_grads(1)
    assert opt.prepare_grads() is False
    norm = opt.get_grad_norm()
    assert math.isfinite(norm) and norm > 0
    assert len(opt.get_main_grads_for_grad_norm()) == n_routed
    zeros = opt.count_zeros()
    if path == "plain":
        assert zeros == sum(int((p.grad == 0).sum()) for p in model.parameters())
    else:  # Megatron's chain counts only parts with log_num_zeros_in_grad when groups differ
        assert zeros >= 0
    before = [p.detach().clone() for p in model.parameters()]
    ok, got_norm, zeros = opt.step()
    assert ok is True and got_norm == pytest.approx(norm) and zeros is None
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.zero_grad(set_to_none=True)
    if path == "plain":
        assert all(p.grad is None for p in model.parameters())

    after = [p.detach().clone() for p in model.parameters()]
    opt.reload_model_params()
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))

    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    sharded = opt.sharded_state_dict(model_sharded)
    flat = []

    def walk(d):
        if isinstance(d, dict):
            for v in d.values():
                walk(v)
        elif isinstance(d, (list, tuple)):
            for v in d:
                walk(v)
        elif isinstance(d, ShardedTensor):
            flat.append(d.key)

    walk(sharded)
    assert any(".second_moment." in k for k in flat) and any(".momentum_buffer." in k for k in flat)
    assert any(".exp_avg." in k for k in flat)

    set_grads(2)
    if path == "plain":
        assert opt.step_with_ready_grads() is True
    else:
        assert opt.step()[0] is True


def test_plain_clip_grad_norm_and_empty_optimizer():
    model = FakeVpMoE()
    opt = build_optimizer(model, SimpleNamespace(clip_grad=0.0))
    _loss(model, torch.randint(0, VOCAB, (2, 9))).backward()
    norm = opt.clip_grad_norm(0.1)
    assert norm > 0.1
    assert opt.get_grad_norm() == pytest.approx(0.1, rel=1e-4)
    frozen = FakeVpMoE()
    for p in frozen.parameters():
        p.requires_grad_(False)
    empty = build_optimizer(frozen)
    assert empty.is_stub_optimizer and empty.get_parameters() == []
    assert empty.step() == (True, 0.0, None)


# --------------------------------------------------------------------------------------------
# torch_dist checkpoint of the plain path
# --------------------------------------------------------------------------------------------


def test_plain_sharded_state_dict_round_trips_through_dist_checkpointing(megatron_world):
    """A transformed tiny model on CPU: the plain optimizer's sharded_state_dict saves with
    dist_checkpointing (torch_dist) and loads into a fresh optimizer of a fresh model, whose next
    steps are bit-identical to the original's (a fresh optimizer without the load is not)."""
    import vpmoe_compile
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_base import build_stock_gpt, load_config

    cfg = load_config("tiny")

    def make(seed):
        torch.manual_seed(seed)
        m = build_stock_gpt(cfg, device="cpu")
        vpmoe_compile.transform(m, cfg, progress=False)
        return m

    pos = torch.arange(16).unsqueeze(0).expand(2, -1)

    def step(m, o, seed):
        t = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(seed))
        o.zero_grad()
        m(t[:, :-1], pos, None, labels=t[:, 1:]).float().mean().backward()
        ok, _, _ = o.step()
        assert ok

    a = make(0)
    opt_a = build_optimizer(a)
    for s in range(2):
        step(a, opt_a, s)
    sharded = opt_a.sharded_state_dict(a.sharded_state_dict())
    assert set(sharded) == {"normuon", "adamw"}
    v = [t for t in sharded["normuon"]["state"].values() if isinstance(t.get("second_moment"), ShardedTensor)]
    assert v and all(t["second_moment"].global_shape[-1] == 1 for t in v)
    assert int(sharded["adamw"]["state"]["common_step"]) == 2
    with tempfile.TemporaryDirectory() as d:
        dist_checkpointing.save({"optimizer": sharded}, d)
        b, c = make(5), make(6)
        b.load_state_dict(a.state_dict())
        c.load_state_dict(a.state_dict())
        opt_b = build_optimizer(b)
        opt_c = build_optimizer(c)  # control: not loaded
        loaded = dist_checkpointing.load(
            {"optimizer": opt_b.sharded_state_dict(b.sharded_state_dict(), is_loading=True)}, d)
        opt_b.load_state_dict(loaded["optimizer"])
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for part in ("normuon", "adamw"):
        assert sa[part]["state"].keys() == sb[part]["state"].keys()
        for i, st in sa[part]["state"].items():
            for k, val in st.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(sb[part]["state"][i][k])), (part, i, k)
    for s in (7, 8):
        for m, o in ((a, opt_a), (b, opt_b), (c, opt_c)):
            step(m, o, s)
    assert _params_equal(a, b)
    assert not _params_equal(a, c)


# --------------------------------------------------------------------------------------------
# OptimizerParamScheduler
# --------------------------------------------------------------------------------------------


def _scheduler(opt, max_lr, min_lr, wd):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=wd, end_wd=wd, wd_incr_steps=10, wd_incr_style="constant",
    )


@pytest.mark.parametrize("path", PATHS)
def test_scheduler_drives_the_lr_the_step_uses(megatron_world, path):
    """OptimizerParamScheduler writes each group's lr from its own max_lr (NorMuon: lr, AdamW:
    normuon_aux_lr, a separate ratio); at warm-up step 0 (lr 0) a step changes no parameter, at
    step 1 of 2 the step equals that of an optimizer built with half the learning rates (and
    differs from one built with the full ones)."""
    lr, aux, wd = 0.02, 0.004, 0.1
    base = dict(lr=lr, min_lr=0.0, normuon_aux_lr=aux, normuon_aux_min_lr=0.0, weight_decay=wd,
                clip_grad=0.0, compile=False)
    half = dict(base, lr=lr / 2, normuon_aux_lr=aux / 2)
    if path == "plain":
        models = _twins(4)
        tops = models
        tokens = torch.randint(0, VOCAB, (2, 9))

        def set_grads(top, opt):
            opt.zero_grad()
            _loss(top, tokens).backward()
    else:
        pairs = [_ddp_toy(0) for _ in range(4)]
        models, tops = [m for m, _ in pairs], [d for _, d in pairs]

        def set_grads(top, opt):
            _ddp_set_grads(top, 3)

    frozen_opt = build_optimizer(tops[0], SimpleNamespace(**base))
    sched_opt = build_optimizer(tops[1], SimpleNamespace(**base))
    half_opt = build_optimizer(tops[2], SimpleNamespace(**half))
    full_opt = build_optimizer(tops[3], SimpleNamespace(**base))
    # before any scheduler each group already runs at its peak lr and decays as the scheduler
    # would (Megatron's own groups carry only max_lr / wd_mult until its scheduler runs)
    for opt, peak in ((half_opt, half), (full_opt, base)):
        assert all(g["weight_decay"] == wd * g["wd_mult"] for g in opt.param_groups)
        assert {g["lr"] for g in opt.param_groups} == {peak["lr"], peak["normuon_aux_lr"]}
    assert {g["wd_mult"] for g in full_opt.param_groups} == {0.0, 1.0}
    _scheduler(frozen_opt, lr, 0.0, wd)  # warm-up step 0: lr 0 everywhere
    assert {g["lr"] for g in frozen_opt.param_groups} == {0.0}
    sched = _scheduler(sched_opt, lr, 0.0, wd)
    sched.step(1)
    nm = [g for g in sched_opt.param_groups if g.get("use_normuon")]
    adam = [g for g in sched_opt.param_groups if not g.get("use_normuon") and g["params"]]
    assert nm and adam
    assert {g["lr"] for g in nm} == {lr / 2} and {g["lr"] for g in adam} == {aux / 2}
    assert all(g["weight_decay"] == wd * g["wd_mult"] for g in sched_opt.param_groups)

    before = [p.detach().clone() for p in models[0].parameters()]
    for top, opt in zip(tops, (frozen_opt, sched_opt, half_opt, full_opt)):
        set_grads(top, opt)
        ok, _, _ = opt.step()
        assert ok
    assert all(torch.equal(a, p) for a, p in zip(before, models[0].parameters()))
    assert _params_equal(models[1], models[2])
    assert not _params_equal(models[1], models[3])
