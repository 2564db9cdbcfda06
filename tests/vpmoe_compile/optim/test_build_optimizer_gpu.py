"""``build_optimizer`` on the Megatron path, on one GPU (docs/design.md#the-megatron-path): the GPU
parts of the step, clipping, NaN-policy and checkpoint checks.

The tiny vpMoE config as a stock Megatron-Core GPTModel in bf16 and as the transformed model (TPA
factor weights, GRAPE ``log_freq``; head_dim 32, the TPA kernels need ``head_dim / 2 >= 16``),
wrapped in Megatron's ``DistributedDataParallel`` (world size 1), each without and with
``optimizer.cuda_graph``:

1. ``build_optimizer`` -> a chain of ``NorMuonFloat16Optimizer`` wrappers (NorMuon and AdamW);
   one training step (forward/backward through DDP, global grad norm, clip, step): every param
   changes, the bf16 model params equal the fp32 main params rounded;
2. clipping: the main grads after the step have global norm ``min(norm, clip_grad)``;
3. NaN policy: a NaN in one expert's main grad -> ``(False, nan, ...)``; model params, main
   params and the NorMuon and AdamW state bitwise unchanged;
4. ``torch`` checkpoint format: ``state_dict`` -> ``torch.save/load`` -> a fresh model + optimizer
   ``load_state_dict`` -> identical state and an identical next step (fixed synthetic grads);
5. ``torch_dist`` format: ``sharded_state_dict`` -> ``dist_checkpointing.save`` -> a fresh
   model/optimizer ``sharded_state_dict(is_loading=True)`` -> ``dist_checkpointing.load`` ->
   ``load_state_dict`` -> identical state (the ``[m, 1]`` second moments included), main params
   and next step.

Plus: with CUDA graphs, five steps (gradients written into the DDP buffers, lr changing) equal the
eager steps bitwise, with the compute graph (and the gather graph, if any bank gathers) captured
once. Formerly ``benchmarks/check_megatron_optimizer.py`` (its last records:
``benchmarks/results/check_megatron_optimizer*.json``). Skipped without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MODELS = pytest.mark.parametrize("transform", [False, True], ids=["stock", "transformed"])


def _cfg(transform: bool, cuda_graph: bool):
    from megatron_base import load_config

    cfg = load_config("tiny")
    cfg.optimizer.compile = False
    cfg.optimizer.cuda_graph = cuda_graph
    if transform:  # the TPA Triton kernels need head_dim / 2 >= 16 (tiny has head_dim 16)
        cfg.model.head_dim = 32
    return cfg


def _build(cfg, transform: bool, seed: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_base import build_stock_gpt

    torch.manual_seed(seed)
    model = build_stock_gpt(cfg, device="cuda", params_dtype=torch.bfloat16)
    if transform:
        import vpmoe_compile

        model = vpmoe_compile.transform(model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    return model, DistributedDataParallel(model.config, ddp_cfg, model)


def _all_params(opt):
    """The (fp32 main) params of every chained optimizer."""
    return [p for o in opt.chained_optimizers for p in o.get_parameters()]


def _states_cpu(opt):
    snap = []
    for o in opt.chained_optimizers:
        sd = o.optimizer.state_dict()
        snap.append({i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                     for i, st in sd["state"].items()})
    return snap


def _state_diffs(a, b):
    bad = []
    for oi, (sa, sb) in enumerate(zip(a, b)):
        if set(sa) != set(sb):
            bad.append((oi, "keys"))
            continue
        for i in sa:
            for k in sa[i]:
                va, vb = sa[i][k], sb[i][k]
                if torch.is_tensor(va):
                    if va.shape != vb.shape or not torch.equal(va, vb):
                        bad.append((oi, i, k))
                elif va != vb:
                    bad.append((oi, i, k))
    return bad


def _fixed_grads(ddp, seed):
    ddp.zero_grad_buffer()
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p in ddp.module.parameters():
        if p.requires_grad:
            p.main_grad.copy_(torch.randn(p.shape, generator=g, device="cuda") * 1e-2)


def _same_params(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _sharded_keys(d):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(d, dict):
        for v in d.values():
            yield from _sharded_keys(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _sharded_keys(v)
    elif isinstance(d, ShardedTensor):
        yield d.key


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
@MODELS
def test_megatron_path_step_clip_nan_skip_and_checkpoints(megatron_world, tmp_path, transform, cuda_graph):
    from megatron.core import dist_checkpointing

    from vpmoe_compile.optim import build_optimizer

    cfg = _cfg(transform, cuda_graph)
    model, ddp = _build(cfg, transform, seed=1)
    opt = build_optimizer(ddp, cfg)
    assert opt.path == "megatron"
    kinds = [type(o.optimizer).__name__ for o in opt.chained_optimizers]
    assert "NorMuon" in kinds and len(kinds) >= 2, kinds  # NorMuon + the AdamW part

    # 1. one real training step
    tokens = torch.randint(0, 1000, (2, 33), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    pos = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    ddp(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
    ddp.finish_grad_sync()
    ok, norm, _ = opt.step()
    torch.cuda.synchronize()
    assert ok and math.isfinite(norm), (ok, norm)
    unchanged = [n for (n, p), b in zip(model.named_parameters(), before) if torch.equal(p, b)]
    assert not unchanged, f"params not updated by the step: {unchanged}"
    for o in opt.chained_optimizers:
        for mg, fg in zip(getattr(o, "float16_groups", []), getattr(o, "fp32_from_float16_groups", [])):
            for mp, fp in zip(mg, fg):
                assert torch.equal(mp.detach(), fp.detach().to(mp.dtype)), "bf16 param != its rounded main param"

    # 2. clipping to the global norm
    grads = [p.grad for p in _all_params(opt) if p.grad is not None]
    after = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()
    clip = opt.config.clip_grad
    assert abs(after - min(norm, clip)) <= 1e-3 * max(1.0, clip), (norm, after, clip)

    # a second step so that every state (AdamW's included) is non-trivial
    _fixed_grads(ddp, 11)
    ok2, _, _ = opt.step()
    assert ok2

    # 3. NaN policy: the step is skipped with everything untouched
    _fixed_grads(ddp, 13)
    # expert 1's fc1: a SequentialMLP matrix (stock) or row 1 of the [E, 2F, h] stack (transformed)
    name, expert = next((n, p) for n, p in model.named_parameters() if ".experts." in n and "linear_fc1" in n
                        and ("local_experts.1." in n or p.ndim == 3))
    expert.main_grad[(1, 0, 0) if expert.ndim == 3 else (0, 0)] = float("nan")
    snap_p = [p.detach().clone() for p in model.parameters()]
    snap_main = [p.detach().clone() for p in _all_params(opt)]
    snap_s = _states_cpu(opt)
    ok3, norm3, _ = opt.step()
    assert ok3 is False and not math.isfinite(norm3), (name, ok3, norm3)
    assert all(torch.equal(a, b) for a, b in zip(snap_p, model.parameters())), "model params changed"
    assert all(torch.equal(a, b) for a, b in zip(snap_main, _all_params(opt))), "main params changed"
    assert not _state_diffs(snap_s, _states_cpu(opt)), "optimizer state changed"

    # 4. torch format round trip
    path = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model2, ddp2 = _build(cfg, transform, seed=2)
    opt2 = build_optimizer(ddp2, cfg)
    ck = torch.load(path, weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    bad = _state_diffs(_states_cpu(opt), _states_cpu(opt2))
    assert not bad, f"torch format: state differs after load: {bad[:5]}"
    for d, o in ((ddp, opt), (ddp2, opt2)):
        _fixed_grads(d, 17)
        o.step()
    assert _same_params(model, model2), "torch format: next step differs"

    # 5. torch_dist round trip
    ckdir = tmp_path / "dist"
    ckdir.mkdir()
    sharded = {"optimizer": opt.sharded_state_dict(model.sharded_state_dict())}
    n_second_moments = sum(1 for k in _sharded_keys(sharded) if "second_moment" in k)
    assert n_second_moments > 0
    dist_checkpointing.save(sharded, str(ckdir))
    model3, ddp3 = _build(cfg, transform, seed=3)
    model3.load_state_dict(model.state_dict())
    opt3 = build_optimizer(ddp3, cfg)
    loaded = dist_checkpointing.load(
        {"optimizer": opt3.sharded_state_dict(model3.sharded_state_dict(), is_loading=True)}, str(ckdir)
    )
    opt3.load_state_dict(loaded["optimizer"])
    bad = _state_diffs(_states_cpu(opt), _states_cpu(opt3))
    assert not bad, f"torch_dist: state differs after load: {bad[:5]}"
    assert all(torch.equal(a, b) for a, b in zip(_all_params(opt), _all_params(opt3))), "torch_dist: main params"
    for d, o in ((ddp, opt), (ddp3, opt3)):
        _fixed_grads(d, 19)
        o.step()
    assert _same_params(model, model3), "torch_dist: next step differs"


@MODELS
def test_cuda_graph_steps_equal_eager(megatron_world, transform):
    from vpmoe_compile.optim import build_optimizer

    runs = []
    for use_graph in (True, False):
        cfg = _cfg(transform, use_graph)
        model, ddp = _build(cfg, transform, seed=5)
        opt = build_optimizer(ddp, cfg)
        for step in range(5):
            for g in opt.param_groups:
                g["lr"] = g["max_lr"] * (1.0 - 0.1 * step)
            _fixed_grads(ddp, 100 + step)
            opt.step()
        normuon = [o.optimizer for o in opt.chained_optimizers if type(o.optimizer).__name__ == "NorMuon"]
        runs.append((model, [o.graph_captures for o in normuon]))
    (graphed, captures), (eager, _) = runs
    assert _same_params(graphed, eager), "CUDA-graph steps differ from eager steps"
    # the compute graph, plus the gather graph where a bank gathers its gradients: captured once
    assert captures and all(c in (1, 2) for c in captures), captures
