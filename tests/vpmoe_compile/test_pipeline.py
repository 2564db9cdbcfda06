"""The pass manager and transform(): ordering, refusals, all-or-nothing, records."""

import pytest
import torch

import vpmoe_compile
from passes.base import ModelSnapshot, Pass, PassError, PassManager, PassContext
from vpmoe_compile.pipeline import TransformError, default_pipeline
from tests.conftest import make_batch


def _structure(model):
    """Everything transform must leave untouched on failure."""
    mods = [(n, type(m).__name__, id(m)) for n, m in model.named_modules()]
    params = [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()]
    bufs = [(n, id(b)) for n, b in model.named_buffers()]
    return mods, params, bufs


def _assert_same(a, b):
    assert a[0] == b[0]
    assert [(n, i) for n, i, _ in a[1]] == [(n, i) for n, i, _ in b[1]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a[1], b[1]))
    assert a[2] == b[2]


class ExplodingPass(Pass):
    """Replaces some modules and adds a parameter, then fails midway."""

    name = "exploding"
    requires = ("layer_plan",)

    def run(self, ctx, result):
        for layer in ctx.plan.layers[:2]:
            self.replace_module(ctx.model, layer.mlp_path, torch.nn.Identity(), result)
        ctx.model.decoder.register_parameter("bogus", torch.nn.Parameter(torch.zeros(3)))
        ctx.model.some_flag = True
        raise RuntimeError("boom midway")


class InPlacePass(Pass):
    name = "in_place"

    def run(self, ctx, result):
        with torch.no_grad():
            ctx.model.output_layer.weight.mul_(2.0)


def test_default_transform_runs_and_records(tiny_model, tiny_cfg):
    model = vpmoe_compile.transform(tiny_model)
    assert model is tiny_model
    rec = model.vpmoe_transform
    assert rec.passes == ["layer_plan", "global_attention", "grape", "tpa", "moe", "fused_head", "optimizer_routing"]
    by = {r.name: r for r in rec.results}
    assert by["layer_plan"].replaced == () and by["layer_plan"].params_added == ()
    assert len(by["global_attention"].replaced) == 1
    tpa = by["tpa"]
    assert {p.name for p in tpa.params_removed} == {f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(3)}
    assert tpa.params_added_count == 3 * 168 * 64 and tpa.params_removed_count == 3 * 192 * 64
    assert by["grape"].params_added[0].name == "rotary_pos_emb.log_freq"
    assert all(r.time_s >= 0 and "forward" in r.verified for r in rec.results)
    ids, pos = make_batch()
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert "vpmoe_compile.transform" in rec.summary()


def test_failing_pass_leaves_model_exactly_as_before(tiny_model):
    ids, pos = make_batch()
    with torch.no_grad():
        ref = tiny_model(ids, pos, None)
    before = _structure(tiny_model)
    with pytest.raises(RuntimeError, match="boom midway"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention", "grape", ExplodingPass()])
    _assert_same(before, _structure(tiny_model))
    assert not hasattr(tiny_model, "some_flag") and getattr(tiny_model, "vpmoe_transform", None) is None
    with torch.no_grad():
        assert torch.equal(tiny_model(ids, pos, None), ref)
    # and it can still be transformed afterwards
    vpmoe_compile.transform(tiny_model)


def test_failing_dump_also_rolls_back(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = _structure(tiny_model)
    with pytest.raises(OSError):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"], dump_dir=blocker / "dump")
    _assert_same(before, _structure(tiny_model))


class DataRebindPass(Pass):
    """Rebinds a parameter's .data (not an in-place op), then fails."""

    name = "rebind"

    def run(self, ctx, result):
        ctx.model.output_layer.weight.data = torch.zeros(3, 3)
        raise RuntimeError("after a rebind")


class ViewWritePass(Pass):
    """Writes through a view of an existing parameter (a different tensor, the same storage)."""

    name = "view_write"

    def run(self, ctx, result):
        with torch.no_grad():
            ctx.model.decoder.layers[0].self_attention.linear_proj.weight[0].fill_(7.0)


def _values(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("bad_pass", [InPlacePass, ViewWritePass, DataRebindPass])
def test_in_place_modification_is_refused_and_every_tensor_bit_identical(tiny_model, bad_pass):
    before = _structure(tiny_model)
    values = _values(tiny_model)
    with pytest.raises((PassError, RuntimeError), match="in place|after a rebind"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", bad_pass()])
    _assert_same(before, _structure(tiny_model))
    after = _values(tiny_model)
    assert after.keys() == values.keys()
    for name in values:
        assert after[name].dtype == values[name].dtype and torch.equal(after[name], values[name]), name


def test_missing_prerequisite_refused_before_any_change(tiny_model):
    before = _structure(tiny_model)
    with pytest.raises(PassError, match=r"'tpa' requires \['layer_plan', 'grape'\]"):
        vpmoe_compile.transform(tiny_model, passes=["tpa"])
    with pytest.raises(PassError, match="requires"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "grape"])
    _assert_same(before, _structure(tiny_model))


def test_refuses_already_transformed(tiny_model):
    vpmoe_compile.transform(tiny_model, passes=["layer_plan", "global_attention"])
    with pytest.raises(TransformError, match="already transformed"):
        vpmoe_compile.transform(tiny_model)


def test_refuses_non_gpt_and_wrapped(tiny_model):
    with pytest.raises(TransformError, match="needs a megatron.core.models.gpt.GPTModel"):
        vpmoe_compile.transform(torch.nn.Linear(4, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model)
    with pytest.raises(TransformError, match="BEFORE DDP"):
        vpmoe_compile.transform(ddp)

    class Float16Module(torch.nn.Module):  # same name as Megatron's wrapper
        def __init__(self, m):
            super().__init__()
            self.module = m

    with pytest.raises(TransformError, match="before the optimizer"):
        vpmoe_compile.transform(Float16Module(tiny_model))


def test_config_mismatch_and_unknown_pass(tiny_model):
    with pytest.raises(TransformError, match="does not describe this model"):
        vpmoe_compile.transform(tiny_model, "vpmoe-8l")
    with pytest.raises(TransformError, match="unknown pass 'nope'"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", "nope"])


def test_unsupported_config_refused_before_touching(tiny_model, tiny_cfg):
    import dataclasses

    bad = dataclasses.replace(tiny_cfg, tpa=dataclasses.replace(tiny_cfg.tpa, tpa_rank=3))
    before = _structure(tiny_model)
    with pytest.raises(PassError, match="power-of-two rank"):
        vpmoe_compile.transform(tiny_model, bad)
    _assert_same(before, _structure(tiny_model))
    per_head = dataclasses.replace(tiny_cfg, grape=dataclasses.replace(tiny_cfg.grape, grapem_share_across_heads=False))
    with pytest.raises(PassError, match="per-head GRAPE-M"):
        vpmoe_compile.transform(tiny_model, per_head)
    _assert_same(before, _structure(tiny_model))


def test_meta_device_transform_counts(megatron_env):
    from megatron_base import build_stock_gpt, count_parameters

    m = build_stock_gpt("tiny", device="meta")
    vpmoe_compile.transform(m, verify="params")
    assert all(p.is_meta for p in m.parameters())
    assert "parameter accounting" in m.vpmoe_transform.results[-1].verified
    with pytest.raises(PassError, match="meta"):
        PassManager([], verify="forward")._do_forward(PassContext(model=m, cfg=None))


def test_snapshot_restores_detached_submodules(tiny_model):
    snap = ModelSnapshot(tiny_model)
    old = tiny_model.decoder.layers[0].mlp
    tiny_model.decoder.layers[0].mlp = torch.nn.Identity()
    old.linear_fc1 = torch.nn.Identity()
    snap.restore()
    assert tiny_model.decoder.layers[0].mlp is old and type(old.linear_fc1).__name__ == "ColumnParallelLinear"


def test_transformed_model_checkpoint_keys(tiny_model):
    """Megatron's sharded_state_dict (torch_dist checkpoints) covers every parameter of the
    transformed model under its state_dict name; plain state_dict round-trips exactly."""
    from megatron_base import build_stock_gpt

    vpmoe_compile.transform(tiny_model)
    sharded = tiny_model.sharded_state_dict()
    params = {n for n, _ in tiny_model.named_parameters()}
    assert params <= set(sharded)
    assert "rotary_pos_emb.log_freq" in sharded and "decoder.layers.0.self_attention.linear_qkv.weight" in sharded
    other = vpmoe_compile.transform(build_stock_gpt("tiny"))
    missing, unexpected = other.load_state_dict(tiny_model.state_dict(), strict=True)
    assert not missing and not unexpected
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), other.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n


def test_init_process_is_idempotent(megatron_env):
    from megatron.core import parallel_state

    from megatron_base import init_process

    init_process()
    init_process()
    assert torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()
    assert torch.distributed.get_world_size() == 1


def test_refuses_a_model_whose_parameters_an_optimizer_holds(tiny_model, tiny_cfg):
    """An optimizer built before transform would keep updating the removed weights and never the
    new ones: refused, nothing changed; once that optimizer is gone the transform runs."""
    import gc

    opt = vpmoe_compile.build_optimizer(tiny_model, tiny_cfg)
    names = {n: p for n, p in tiny_model.named_parameters()}
    with pytest.raises(TransformError, match="already holds this model's parameters"):
        vpmoe_compile.transform(tiny_model, tiny_cfg)
    assert {n: p for n, p in tiny_model.named_parameters()} == names
    del opt
    gc.collect()
    vpmoe_compile.transform(tiny_model, tiny_cfg, progress=False)


def test_a_pass_name_string_is_refused_with_a_hint(tiny_model):
    with pytest.raises(TransformError, match=r"passes=\[\.\.\.\]"):
        vpmoe_compile.transform(tiny_model, passes="tpa")
    assert type(tiny_model.decoder.layers[0].self_attention).__name__ == "SelfAttention"


def test_new_parameters_follow_a_frozen_model(tiny_model):
    """A frozen model stays frozen: the parameters transform creates (TPA factors, GRAPE-M
    frequencies, expert stacks) take the replaced parameters' requires_grad."""
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    vpmoe_compile.transform(tiny_model, progress=False)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable == []


# ---------------------------------------------------------------------------------------------
# Declared passes, their order, user passes
# ---------------------------------------------------------------------------------------------


class ScaleNormsPass(Pass):
    """A user's toy pass: every layer's input RMSNorm becomes a scaled copy (new module, new
    parameter), enabled by the config's [meta] name."""

    name = "scale_norms"
    requires = ("layer_plan",)
    after = ("grape",)
    installs = ("RMSNorm",)

    @classmethod
    def enabled(cls, cfg):
        return cfg.meta.name == "tiny"

    def sites(self, ctx):
        return [f"decoder.layers.{l.index}.input_layernorm" for l in ctx.plan.layers]

    def run(self, ctx, result):
        for path in self.sites(ctx):
            old = ctx.model.get_submodule(path)
            new = torch.nn.RMSNorm(old.weight.shape[0], eps=1e-5)
            with torch.no_grad():
                new.weight.copy_(old.weight * 0.5)
            self.replace_module(ctx.model, path, new, result)
            result.sites.append(path)
        result.summary = f"{len(result.sites)} input norms scaled by 0.5"


@pytest.fixture()
def user_pass():
    from passes import register_pass, unregister_pass

    register_pass(ScaleNormsPass)
    yield ScaleNormsPass
    unregister_pass(ScaleNormsPass.name)


def test_default_pipeline_is_ordered_from_the_declarations(tiny_cfg, user_pass):
    """A registered user pass joins the default pipeline where its declarations put it (after
    grape, before the routing pass that must see every parameter)."""
    names = [p.name for p in default_pipeline(tiny_cfg)]
    assert names.index("scale_norms") > names.index("grape")
    assert names[-1] == "optimizer_routing" and names[0] == "layer_plan"
    tiny_cfg.meta.name = "other"
    assert "scale_norms" not in [p.name for p in default_pipeline(tiny_cfg)]


def test_a_user_pass_runs_all_or_nothing_with_its_own_dump_page(tiny_model, tiny_cfg, tmp_path, user_pass):
    vpmoe_compile.transform(tiny_model, tiny_cfg, dump_dir=tmp_path / "d", progress=False)
    assert type(tiny_model.decoder.layers[0].input_layernorm) is torch.nn.RMSNorm
    rec = {r.name: r for r in tiny_model.vpmoe_transform.results}["scale_norms"]
    assert len(rec.params_added) == 4 and len(rec.params_removed) == 4
    page = next((tmp_path / "d").glob("*-scale_norms.md")).read_text()
    assert "input norms scaled" in page and "decoder.layers.0.input_layernorm" in page
    with pytest.raises(Exception):
        rec.summary = "changed"  # records are immutable


def test_order_passes_honours_requires_and_after_and_refuses_cycles():
    from passes import AFTER_ALL, order_passes

    def make(name, requires=(), after=()):
        return type(name, (Pass,), {"name": name, "requires": requires, "after": after, "run": lambda s, c, r: None})()

    a, b, c, last = make("a"), make("b", requires=("a",)), make("c", after=("b",)), make("z", after=(AFTER_ALL,))
    assert [p.name for p in order_passes([last, c, b, a])] == ["a", "b", "c", "z"]
    assert [p.name for p in order_passes([b, a, make("x")])] == ["a", "b", "x"]
    with pytest.raises(PassError, match="cycle"):
        order_passes([make("p", after=("q",)), make("q", after=("p",))])


def test_undeclared_installs_are_refused(tiny_model):
    class Sneaky(ScaleNormsPass):
        name = "sneaky"
        installs = ("SomethingElse",)

    before = _structure(tiny_model)
    with pytest.raises(PassError, match="declares installs"):
        vpmoe_compile.transform(tiny_model, passes=["layer_plan", Sneaky()])
    _assert_same(before, _structure(tiny_model))


def test_tensors_only_snapshot_sees_in_place_changes_and_cannot_restore(tiny_model):
    """Each pass's guard snapshot (``structure=False``) records the tensors only: it still names
    a parameter changed in place, and it refuses to restore (only the pipeline's full snapshot
    restores a model)."""
    snap = ModelSnapshot(tiny_model, structure=False)
    assert snap.modules == [] and len(snap.tensors) >= len(list(tiny_model.parameters()))
    name, p = next(iter(tiny_model.named_parameters()))
    with torch.no_grad():
        p.add_(1.0)
    assert snap.changed_in_place() == [name]
    with pytest.raises(RuntimeError, match="cannot restore"):
        snap.restore()
