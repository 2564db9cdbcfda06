"""NorMuon state in Megatron's ``torch_dist`` sharded form, on CPU (docs/design.md#the-megatron-path,
step 4; the round trip of Megatron's wrappers needs CUDA).

Megatron's mixed-precision wrappers and its ``torch_dist`` save strategy need CUDA, so this
drives the NorMuon-specific part of ``sharded_state_dict`` (momentum like Adam's moments,
``[m, 1]`` second moment as a ShardedTensor with the input axis collapsed) with the inner
optimizer, on prepended-axis (expert-like) and plain sharded params: metadata is validated and
the load is simulated by handing back each ShardedTensor's data (what ``dist_checkpointing.load``
returns). The real save/load through the wrappers runs on the GPU in test_build_optimizer_gpu.py.
"""

import pytest
import torch

from vpmoe_compile.optim import NorMuon


def _model_sharded(params):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for i, p in enumerate(params):
        if i % 2:  # expert-like: one prepended axis (layer) as SequentialMLP does
            out[f"w{i}"] = ShardedTensor.from_rank_offsets(
                f"layer.w{i}", p, (0, 0, 1), replica_id=0, prepend_axis_num=1
            )
        else:
            out[f"w{i}"] = ShardedTensor.from_rank_offsets(f"w{i}", p, replica_id=0)
    return out


def _sharded_opt(opt, params):
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    from vpmoe_compile.optim.sharded_state import optimizer_state_to_sharded

    sd = opt.state_dict()
    id_map = get_param_id_to_sharded_param_map(_model_sharded(params), params)
    optimizer_state_to_sharded(sd, id_map)
    return sd


def _simulated_load(d):
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor

    if isinstance(d, dict):
        return {k: _simulated_load(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_simulated_load(v) for v in d]
    if isinstance(d, ShardedTensor):
        return d.data.clone()
    if isinstance(d, LocalNonpersistentObject):
        return d.unwrap()
    return d


def test_torch_dist_sharded_form_round_trip(megatron_world):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    shapes = [(16, 32), (16, 32), (48, 32), (32, 8)]
    blocks = [None, None, (((0, 16),), ((16, 8), (40, 8)), ((24, 16),)), None]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    sharded = {"optimizer": _sharded_opt(opt, params)}
    keys = sorted(k for k in _flat_keys(sharded))
    assert "optimizer.state.second_moment.layer.w1" in keys
    assert "optimizer.state.momentum_buffer.w2" in keys
    st = sharded["optimizer"]["state"]
    v1 = st[1]["second_moment"]
    assert isinstance(v1, ShardedTensor)
    assert v1.local_shape == (16, 1) and v1.global_shape == (1, 16, 1) and v1.global_offset == (0, 0, 0)
    assert st[2]["second_moment"].global_shape == (48, 1)
    assert st[2]["momentum_buffer"].global_shape == (48, 32)
    saved = _simulated_load(sharded)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = NorMuon([{"params": params2, "blocks": blocks}], lr=0.5)
    opt2.init_state()  # what Megatron's init_state_fn does before loading
    target = _sharded_opt(opt2, params2)  # the structure Megatron hands to the loader
    assert sorted(_flat_keys({"optimizer": target})) == keys
    opt2.load_state_dict(saved["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert opt2.param_groups[0]["lr"] == 0.02
    for i in a["state"]:
        for k in ("momentum_buffer", "second_moment"):
            assert a["state"][i][k].shape == b["state"][i][k].shape
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    for p, q in zip(params, params2):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def _flat_keys(d):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(d, dict):
        for v in d.values():
            yield from _flat_keys(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _flat_keys(v)
    elif isinstance(d, ShardedTensor):
        yield d.key


@pytest.mark.parametrize("layer_axis", [False, True])
def test_torch_dist_expert_stack_state(megatron_world, layer_axis):
    """A 3-D expert stack has ONE model ShardedTensor (global ``[E_global, m, n]``, local experts at
    ``ep_rank * E`` on the expert axis, optionally after a prepended layer axis): its momentum
    shards like the weight and its ``[E, m, 1]`` second moment like the weight with the last
    axis collapsed; both survive the (simulated) load exactly."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    from vpmoe_compile.optim.sharded_state import optimizer_state_to_sharded

    E, F, H, ep_rank, ep_size = 3, 8, 16, 1, 2
    blocks = [(((0, F),), ((F, F),)), None]  # gated fc1 [E, 2F, H] (gate / up), fc2 [E, H, F]
    pre = 1 if layer_axis else 0
    layer = ((0, 2, 4),) if layer_axis else ()  # layer 2 of 4 on a prepended axis

    def model_sharded(params):
        return {
            f"fc{i + 1}": ShardedTensor.from_rank_offsets(
                f"decoder.layers.1.mlp.experts.experts.linear_fc{i + 1}.weight", p, *layer,
                (pre, ep_rank, ep_size), replica_id=0, prepend_axis_num=pre,
            )
            for i, p in enumerate(params)
        }

    def sharded_opt(opt, params):
        sd = opt.state_dict()
        optimizer_state_to_sharded(sd, get_param_id_to_sharded_param_map(model_sharded(params), params))
        return sd

    params = [torch.nn.Parameter(torch.randn(E, 2 * F, H)), torch.nn.Parameter(torch.randn(E, H, F))]
    opt = NorMuon([{"params": params, "blocks": blocks}], lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    sharded = {"optimizer": sharded_opt(opt, params)}
    st = sharded["optimizer"]["state"]
    lead = (4,) if layer_axis else ()
    off = (2,) if layer_axis else ()
    v1, m1 = st[0]["second_moment"], st[0]["momentum_buffer"]
    assert isinstance(v1, ShardedTensor)
    assert v1.key == "optimizer.state.second_moment.decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert v1.local_shape == (E, 2 * F, 1) and v1.global_shape == lead + (ep_size * E, 2 * F, 1)
    assert v1.global_offset == off + (ep_rank * E, 0, 0) and v1.prepend_axis_num == pre
    assert v1.axis_fragmentations == (4,) * pre + (ep_size, 1, 1)
    assert m1.global_shape == lead + (ep_size * E, 2 * F, H)
    assert m1.global_offset == off + (ep_rank * E, 0, 0)
    v2 = st[1]["second_moment"]
    assert v2.local_shape == (E, H, 1) and v2.global_shape == lead + (ep_size * E, H, 1)
    saved = _simulated_load(sharded)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = NorMuon([{"params": params2, "blocks": blocks}], lr=0.5)
    opt2.init_state()
    assert sorted(_flat_keys({"optimizer": sharded_opt(opt2, params2)})) == sorted(_flat_keys(sharded))
    opt2.load_state_dict(saved["optimizer"])
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in a:
        for k in ("momentum_buffer", "second_moment"):
            assert torch.equal(a[i][k], b[i][k])
    for p, q in zip(params, params2):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
