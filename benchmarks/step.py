"""Whole training step: stock eager vs transformed eager vs transformed compiled (GPU).

    PYTHONPATH=$PWD python benchmarks/step.py --out DIR             # vpmoe-8l, 2 x 4096, H100
    PYTHONPATH=$PWD python benchmarks/step.py --device cpu --path plain --config tiny \
        --seq-len 64 --micro-batch 2 --compile-backend aot_eager --out /tmp/x    # CPU smoke run

One process, the same synthetic batches (uniform random token ids, seed 0) for every variant:

  stock_eager           ``build_stock_gpt`` (stock Megatron-Core 0.16.1 GPTModel, local spec,
                        no TE), no transform
  transformed_eager     the same + ``vpmoe_compile.transform(model, cfg, progress=False)`` (the
                        default pipeline, whatever it holds: TPA, GRAPE, sink kernels, grouped
                        MoE, the fused LM head when that pass is in it)
  transformed_compiled  the same + ``vpmoe_compile.compile(top)`` after the Megatron wrapping
                        (each transformer layer one ``torch.compile(fullgraph=True)`` graph)
  fork_compiled         transformed_compiled with the reference fork's value residual and linear
                        biases on (``[model] value_residual``, ``add_bias_linear``): their cost is
                        ``speedup_vs_fork_base`` (transformed_compiled time / this time)

Every variant: bf16 parameters on the GPU (fp32 on the CPU), ``Float16Module`` + Megatron
``DistributedDataParallel`` (world size 1, fp32 grad buffer) unless ``--path plain``, the SAME
optimizer ``vpmoe_compile.build_optimizer(top, cfg)`` (NorMuon + Polar Express for matrices,
Adam for the rest) and ``finalize_model_grads`` before each optimizer step.

What is measured, per variant (all times wall clock with ``torch.cuda.synchronize`` at the
edges of what is timed):

1. **Per micro-batch** (``--warmup`` + ``--micro-steps`` micro-batches, each a full optimizer
   step): fwd+bwd = forward + loss + backward; finalize+optimizer = ``finalize_model_grads`` +
   ``optimizer.step()`` + zeroing the grads (``zero_grad_buffer`` + ``optimizer.zero_grad``). Medians over the timed micro-batches;
   ``micro_step_ms`` = the sum of the two medians.
2. **Accumulated step** (the realistic one): ``--accum`` (8) micro-batches of gradient
   accumulation (loss / accum), then one finalize + optimizer step = a global batch of
   8 x micro-batch sequences. No synchronisation between the micro-batches; one before the
   finalize so that ``finalize_optimizer_ms`` can be read too. Median over ``--accum-steps``
   steps (stock: ``--stock-accum-steps``), tokens/s.
3. **MFU** = model FLOPs / time / ``--peak-tflops`` (989.4 = H100 SXM dense bf16). FLOPs per
   token (:func:`model_flops_per_token`, of each variant's own model): 6 x active matmul
   parameters touched by a token (attention projections, dense / shared / top-k routed expert
   MLPs, router, output layer; not the embedding lookup, norms and vectors) + attention-score
   FLOPs 12 x H x d x (average visible keys: W on local layers, (s+1)/2 on global ones).
   ``mfu`` = FLOPs of one micro-batch / ``micro_step_ms``; ``accumulated_mfu`` = FLOPs of the
   8 micro-batches / the accumulated step time.
4. **Peak memory**: ``torch.cuda.max_memory_allocated`` over build + steps + profile (reset per
   variant; the isolated parts of 6. are not included).
5. **Kernel profile** of ONE more accumulated step (``torch.profiler``, CUDA activity only):
   kernels per step (CUDA kernel events; memcpy / memset counted apart), GPU-busy fraction =
   union of the kernel intervals / the profiled step's wall time, and the top-20 kernels (name,
   count, total ms). ``--trace DIR`` also writes one chrome trace per variant there (large). On
   the CPU the same is computed over the profiler's ``aten::`` CPU op events (smoke test only).
6. **Per-part breakdown**: each part timed **in isolation**, fwd+bwd on the real inputs it gets
   in the model (captured by forward pre-hooks during one no-grad forward before any timing):
   ``self_attention`` of the first local and of the first global layer (input = the
   ``input_layernorm`` output, with the rotary / mask kwargs it received), ``mlp`` of the first
   MoE layer and of the dense first layer (input = ``pre_mlp_layernorm`` output), and the head
   (the module ``vpmoe_compile.compile`` compiles as head: the fused head + loss when the
   ``fused_head`` pass installed one, else ``output_layer`` followed by
   ``compute_language_model_loss``). Eager variants run them eagerly; the compiled variant runs
   each part through ``torch.compile(fullgraph=True)`` with the same backend (the head: the very
   region ``vpmoe_compile.compile`` compiled). Each part's median x its count per micro-batch is
   reported next to the measured micro-batch fwd+bwd; the remainder is ``other`` (embedding,
   norms, residuals, loss reduction, DDP hooks, and what fusion across part boundaries wins or
   loses; negative when the isolated parts sum to more than the measured whole).
   ``optimizer`` = the median finalize+optimizer of the accumulated steps (2.).

Ratios vs ``stock_eager`` and vs ``transformed_eager`` (baseline time / variant time, same
run) and the goals (met / missed) are in the JSON; ``step.png`` plots fwd+bwd per micro-batch,
the accumulated step and the breakdown. A variant that raises is recorded with its error and
the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_PEAK_TFLOPS = 989.4
VARIANTS = ("stock_eager", "transformed_eager", "transformed_compiled", "fork_compiled")
LABELS = {  # plot legend / tick labels (the JSON keys stay the variant names)
    "stock_eager": "stock Megatron, eager",
    "transformed_eager": "vpMoE, eager",
    "transformed_compiled": "vpMoE, compiled",
    "fork_compiled": "vpMoE + value residual + biases, compiled",
}
COLORS = {"stock_eager": "#8c8c8c", "transformed_eager": "#4c72b0", "transformed_compiled": "#dd8452",
          "fork_compiled": "#937860"}
#: the variants that run vpmoe_compile.compile
COMPILED = ("transformed_compiled", "fork_compiled")


def variant_config(name: str, cfg):
    """The config a variant builds: ``fork_compiled`` turns on the reference fork's value residual
    and linear biases (configs/vpmoe.toml has them; vpmoe-8l does not), so their cost is the
    ratio to ``transformed_compiled`` in the same run."""
    if name != "fork_compiled":
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_residual=True, add_bias_linear=True))
PARTS = ("attention_local", "attention_global", "moe_layer", "dense_mlp", "head_loss")
PART_LABELS = {
    "attention_local": "attention, local layers",
    "attention_global": "attention, global layers",
    "moe_layer": "MoE layer (router + experts + shared)",
    "dense_mlp": "dense MLP (first layer)",
    "head_loss": "LM head + loss",
    "other": "other (embedding, norms, residuals, ...)",
    "optimizer": "finalize + optimizer (per step / accum)",
}
PART_COLORS = {
    "attention_local": "#4c72b0", "attention_global": "#64b5cd", "moe_layer": "#c44e52",
    "dense_mlp": "#8172b2", "head_loss": "#55a868", "other": "#cccccc", "optimizer": "#ccb974",
}
FLOP_FORMULA = (
    "FLOPs per token = 6 x (active matmul parameters touched by a token: attention projections, "
    "dense / shared / top-k routed expert MLPs, router, output layer; not the embedding lookup, "
    "norms, biases and other vectors) + 12 x H x d x (average visible keys: min(i+1, W) averaged "
    "over positions on local layers, (s+1)/2 on global layers), summed over layers; each "
    "variant's own model. mfu = FLOPs(1 micro-batch) / micro_step time / peak; accumulated_mfu = "
    "FLOPs(accum micro-batches) / accumulated step time / peak"
)
GOALS = (
    ("compiled_fwd_bwd_le_45ms", "compiled fwd+bwd per micro-batch <= 45 ms"),
    ("compiled_fwd_bwd_ge_50x_stock", "compiled fwd+bwd per micro-batch >= 50x faster than stock eager"),
    ("accumulated_mfu_ge_30pct", "accumulated MFU of the compiled variant >= 30 %"),
    ("compiled_ge_1p3x_transformed_eager", "compiled >= 1.3x transformed eager (accumulated step time)"),
)


# --------------------------------------------------------------------------------------------
# FLOP count
# --------------------------------------------------------------------------------------------


def model_flops_per_token(model, cfg, seq_len: int) -> dict:
    """Matrix FLOPs (6 x active params touched) + attention-score FLOPs, per token (fwd+bwd).

    ``model``: the bare ``GPTModel`` (stock or transformed; not the Megatron wrappers).
    See ``FLOP_FORMULA`` for the definition.
    """
    from megatron_base import count_parameters

    c = count_parameters(model)
    # active params minus the embedding lookup table (the output layer is a real matmul)
    vocab_h = model.embedding.word_embeddings.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if p.ndim < 2)
    matmul_params = c.active - vocab_h - norms
    m = cfg.model
    W = cfg.attention.window_size
    H, d = m.num_attention_heads, m.head_dim
    n_global = sum(1 for ln in range(1, m.num_layers + 1) if not cfg.is_local_layer(ln))
    n_local = m.num_layers - n_global
    avg_local = sum(min(i + 1, W) for i in range(seq_len)) / seq_len
    avg_global = (seq_len + 1) / 2
    attn = 12 * H * d * (n_local * avg_local + n_global * avg_global)
    return {"matmul_params": matmul_params, "matmul_flops": 6 * matmul_params, "attention_flops": attn,
            "total_flops_per_token": 6 * matmul_params + attn}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _now(dev: torch.device) -> float:
    _sync(dev)
    return time.perf_counter()


def _log(msg: str) -> None:
    print(msg, flush=True)


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _median_ms(xs):
    return statistics.median(xs) * 1e3 if xs else None


def head_module(gpt):
    """(name, module) of the LM head as ``vpmoe_compile.compile`` sees it: the module marked
    ``vpmoe_compile_region`` (the fused head + loss) if any, else ``output_layer``."""
    marked = [(n, m) for n, m in gpt.named_modules() if getattr(m, "vpmoe_compile_region", False)]
    if marked:
        return marked[0]
    return "output_layer", gpt.output_layer


def layer_kinds(gpt, cfg) -> dict:
    """Per kind of part: the layers holding one, in order (1-based layer numbers)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    kinds = {"attention_local": [], "attention_global": [], "moe_layer": [], "dense_mlp": []}
    for layer in gpt.decoder.layers:
        ln = layer.layer_number
        kinds["attention_local" if cfg.is_local_layer(ln) else "attention_global"].append(layer)
        kinds["moe_layer" if isinstance(layer.mlp, MoELayer) else "dense_mlp"].append(layer)
    return kinds


def capture_part_inputs(top, gpt, cfg, tokens, labels, pos) -> dict:
    """One no-grad forward of the (wrapped) model with forward pre-hooks on the first module of
    each part kind; returns ``{part: {"module", "args", "kwargs", "count", "where"}}``."""
    from passes.base import detached_copy

    kinds = layer_kinds(gpt, cfg)
    parts, caps, handles = {}, {}, []

    def hook(name):
        def fn(module, args, kwargs):
            if name not in caps:
                caps[name] = (detached_copy(args), detached_copy(kwargs))

        return fn

    for part, layers in kinds.items():
        if not layers:
            continue
        layer = layers[0]
        mod = layer.self_attention if part.startswith("attention") else layer.mlp
        where = f"decoder.layers.{layer.layer_number - 1}.{'self_attention' if part.startswith('attention') else 'mlp'}"
        parts[part] = {"module": mod, "count": len(layers), "where": where, "class": type(mod).__name__}
        handles.append(mod.register_forward_pre_hook(hook(part), with_kwargs=True))
    hname, hmod = head_module(gpt)
    parts["head_loss"] = {"module": hmod, "count": 1, "where": hname, "class": type(hmod).__name__,
                          "fused": bool(getattr(hmod, "vpmoe_compile_region", False))}
    handles.append(hmod.register_forward_pre_hook(hook("head_loss"), with_kwargs=True))
    try:
        with torch.no_grad():
            top(tokens, pos, None, labels=labels)
    finally:
        for h in handles:
            h.remove()
    for part in list(parts):
        if part not in caps:
            parts.pop(part)
            continue
        parts[part]["args"], parts[part]["kwargs"] = caps[part]
    return parts


def compile_part(module, backend: str, mode):
    """``torch.compile(fullgraph=True, dynamic=False)`` of one module call, run under the same
    dynamo flags as ``vpmoe_compile.compile`` (``megatron_base.compat.dynamo_config``)."""
    from megatron_base.compat import dynamo_config

    def region(*args, **kwargs):  # our frame: dynamo skips torch.nn's own frames as roots
        return module(*args, **kwargs)

    compiled = torch.compile(region, backend=backend, mode=mode, fullgraph=True, dynamic=False)

    def call(*args, **kwargs):
        with dynamo_config():
            return compiled(*args, **kwargs)

    return call


def time_part(part: dict, gpt, labels, dev, *, compiled: bool, backend: str, mode, reps: int, warmup: int) -> dict:
    """Median fwd+bwd of one part in isolation (see the module docstring, 6.)."""
    mod, args, kwargs = part["module"], list(part["args"]), dict(part["kwargs"])
    x = args[0].detach().clone().requires_grad_(True)
    args[0] = x
    is_head = "fused" in part  # only the head part carries it
    if is_head:
        # the head of a compiled model is already the region vpmoe_compile.compile compiled
        call = mod
        if not part["fused"]:
            def call(*a, **k):  # noqa: E306 - output_layer then the stock loss
                logits = _first_tensor(mod(*a, **k))
                return gpt.compute_language_model_loss(labels, logits)
    else:
        call = compile_part(mod, backend, mode) if compiled else mod
    grad = {}

    # the value residual: an attention part alone reads layer 1's values from the model's shared
    # state; give it a leaf copy (no graph into an earlier, already backpropagated forward)
    state = getattr(mod, "value_residual", None)
    v1 = state.value.detach().clone() if state is not None and state.value is not None else None

    def run():
        x.grad = None
        if v1 is not None:
            state.value = v1.detach().requires_grad_(True)
        out = _first_tensor(call(*args, **kwargs))
        if "g" not in grad:
            if is_head:  # d(mean loss)/d(per-token loss)
                grad["g"] = torch.full_like(out, 1.0 / out.numel())
            else:
                grad["g"] = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=torch.Generator(device=out.device).manual_seed(0))
        torch.autograd.backward(out, grad["g"])

    times, first = [], None
    for i in range(warmup + reps):
        t0 = _now(dev)
        run()
        dt = _now(dev) - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    med = statistics.median(times)
    compiled_regions = getattr(gpt, "vpmoe_compiled", None) or ()
    return {
        "where": part["where"], "class": part["class"], "count_per_micro_batch": part["count"],
        **({"fused_head": part["fused"], "in_vpmoe_compiled": part["where"] in compiled_regions} if is_head else {}),
        "median_ms": med * 1e3, "ms_per_micro_batch": med * 1e3 * part["count"],
        "first_call_s": first, "reps": reps, "mode": ("compiled" if compiled and not is_head else
                                                        "compiled (vpmoe_compile.compile region)" if compiled else "eager"),
    }


# --------------------------------------------------------------------------------------------
# Profiler
# --------------------------------------------------------------------------------------------

_NOT_KERNELS = ("Memcpy", "Memset", "memcpy", "memset")


def _events(prof):
    """(name, is_device, activity, start_ns, dur_ns) of every raw profiler event."""
    from torch.autograd import DeviceType

    res = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    out = []
    if res is not None:
        for e in res.events():
            act = e.activity_type() if hasattr(e, "activity_type") else ""
            start = e.start_ns() if hasattr(e, "start_ns") else e.start_us() * 1000
            dur = e.duration_ns() if hasattr(e, "duration_ns") else e.duration_us() * 1000
            out.append((e.name(), e.device_type() == DeviceType.CUDA, act, start, dur))
        return out
    for e in prof.events():  # fallback: parsed FunctionEvents
        out.append((e.name, e.device_type == DeviceType.CUDA, "", e.time_range.start * 1000, (e.time_range.end - e.time_range.start) * 1000))
    return out


def _union_ns(intervals) -> int:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def kernel_profile(step_fn, dev: torch.device, trace_path=None, top_n: int = 20) -> dict:
    """Run ``step_fn()`` (one accumulated step) under ``torch.profiler``; see docstring, 5."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        t0 = _now(dev)
        step_fn()
        wall = _now(dev) - t0
    t1 = time.perf_counter()
    evs = _events(prof)
    if dev.type == "cuda":
        kernels, other = [], []
        for e in evs:
            if not e[1]:
                continue
            if (e[2] == "kernel") if e[2] else not e[0].startswith(_NOT_KERNELS):
                kernels.append(e)
            elif e[2].startswith("gpu_mem") or e[0].startswith(_NOT_KERNELS):
                other.append(e)
        source = "CUDA kernel events (torch.profiler, CUDA activity)"
    else:
        kernels = [e for e in evs if e[0].startswith("aten::")]
        other = []
        source = "CPU smoke run: aten:: op events (nested ops counted), not kernels"
    union = _union_ns((s, s + d) for _, _, _, s, d in kernels)
    by_name = {}
    for name, _, _, _, d in kernels:
        c = by_name.setdefault(name, [0, 0])
        c[0] += 1
        c[1] += d
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top_n]
    out = {
        "source": source,
        "kernels_per_step": len(kernels),
        "memcpy_memset_per_step": len(other),
        "distinct_kernels": len(by_name),
        "kernel_time_ms": sum(d for *_, d in kernels) / 1e6,
        "gpu_busy_ms": union / 1e6,
        "profiled_step_wall_ms": wall * 1e3,
        "gpu_busy_fraction": union / 1e9 / wall if wall > 0 else None,
        "top_kernels": [{"name": n[:300], "count": c, "total_ms": t / 1e6} for n, (c, t) in top],
    }
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
        out["trace"] = str(trace_path)
    out["analysis_s"] = time.perf_counter() - t1
    del prof
    return out


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------


def _counts(name: str, args) -> tuple:
    stock = name == "stock_eager"
    pick = lambda s, d: d if s is None else s  # noqa: E731
    if stock:
        return (pick(args.stock_warmup, args.warmup), pick(args.stock_micro_steps, args.micro_steps),
                pick(args.stock_accum_steps, args.accum_steps))
    return args.warmup, args.micro_steps, args.accum_steps


def run_variant(name: str, args, cfg, batches) -> dict:
    from megatron_base import build_stock_gpt

    import vpmoe_compile
    from vpmoe_compile.training import update_router_expert_bias

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    cfg = variant_config(name, cfg)
    dev = torch.device(args.device)
    megatron = args.path == "megatron"
    warmup, micro_steps, accum_steps = _counts(name, args)
    out = {"variant": name, "label": LABELS[name], "counts": {"warmup": warmup, "micro_steps": micro_steps,
                                                           "accum": args.accum, "accum_steps": accum_steps}}
    t_variant = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    gpt = build_stock_gpt(cfg, device=dev, params_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                          max_sequence_length=args.seq_len)
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if name != "stock_eager":
        vpmoe_compile.transform(gpt, cfg, progress=False)
        out["passes"] = list(gpt.vpmoe_transform.passes)
    out["transform_s"] = time.perf_counter() - t0
    _log(f"  built in {out['build_s']:.1f} s, transform {out['transform_s']:.1f} s"
         + (f" (passes: {', '.join(out['passes'])})" if "passes" in out else ""))
    flops = model_flops_per_token(gpt, cfg, args.seq_len)
    if megatron:
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from vpmoe_compile.training import wrap_megatron

        top = wrap_megatron(gpt)
    else:
        top = gpt
    optimizer = vpmoe_compile.build_optimizer(top, cfg)
    b, s = args.micro_batch, args.seq_len
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s).contiguous()

    # real inputs of each part, captured before any compilation (hooks inside compiled layers
    # would be traced)
    parts_in = None
    if args.parts == "all" or (args.parts == "eager" and name not in COMPILED):
        tok0, lab0 = batches[0]
        parts_in = capture_part_inputs(top, gpt, cfg, tok0, lab0, pos)
    if name in COMPILED:
        t0 = time.perf_counter()
        out["compiled_regions"] = vpmoe_compile.compile(top, backend=args.compile_backend, mode=args.compile_mode)
        out["compile_call_s"] = time.perf_counter() - t0

    def zero():
        if megatron:
            top.zero_grad_buffer()
        optimizer.zero_grad()

    def fwd_bwd(tokens, labels, scale=None):
        per_tok = top(tokens, pos, None, labels=labels)
        loss = per_tok.float().mean()
        (loss if scale is None else loss * scale).backward()
        return loss.detach()

    def finalize_and_step():  # ... and zero the grads for the next step (as training.train_step)
        if megatron:
            finalize_model_grads([top])
        else:
            update_router_expert_bias(gpt)
        optimizer.step()
        zero()

    # 1. per micro-batch
    fb, opt, losses = [], [], []
    first_fb = None
    n = warmup + micro_steps
    zero()
    for i in range(n):
        tokens, labels = batches[i % len(batches)]
        t0 = _now(dev)
        loss = fwd_bwd(tokens, labels)
        t1 = _now(dev)
        finalize_and_step()
        t2 = _now(dev)
        losses.append(float(loss))
        if i == 0:
            first_fb = t1 - t0
        if i >= warmup:
            fb.append(t1 - t0)
            opt.append(t2 - t1)
        _log(f"  {name} micro-batch {i + 1}/{n}{' (warm-up)' if i < warmup else ''}: fwd+bwd {(t1 - t0) * 1e3:.1f} ms, "
             f"finalize+opt {(t2 - t1) * 1e3:.1f} ms, loss {losses[-1]:.4f}")
    fb_ms, opt_ms = _median_ms(fb), _median_ms(opt)
    micro_ms = fb_ms + opt_ms
    tokens_mb = b * s
    flops_mb = flops["total_flops_per_token"] * tokens_mb

    # 2. accumulated steps
    def accumulated_step(k: int):
        t0 = _now(dev)
        for j in range(args.accum):
            tokens, labels = batches[(k * args.accum + j) % len(batches)]
            loss = fwd_bwd(tokens, labels, scale=1.0 / args.accum)
        t1 = _now(dev)
        finalize_and_step()
        t2 = _now(dev)
        return t2 - t0, t1 - t0, t2 - t1, loss

    acc, acc_fb, acc_opt = [], [], []
    for k in range(accum_steps):
        dt, dfb, dopt, loss = accumulated_step(k)
        acc.append(dt)
        acc_fb.append(dfb)
        acc_opt.append(dopt)
        _log(f"  {name} accumulated step {k + 1}/{accum_steps} ({args.accum} micro-batches): {dt * 1e3:.1f} ms "
             f"(finalize+opt {dopt * 1e3:.1f} ms), loss {float(loss):.4f}")
    acc_ms = _median_ms(acc)
    tokens_acc = tokens_mb * args.accum
    peak = args.peak_tflops * 1e12

    # 5. profile one more accumulated step
    prof = None
    if not args.no_profile:
        try:
            trace = Path(args.trace) / f"trace_{name}.json" if args.trace else None
            if trace is not None:
                trace.parent.mkdir(parents=True, exist_ok=True)
            prof = kernel_profile(lambda: accumulated_step(accum_steps), dev, trace)
            _log(f"  {name} profile: {prof['kernels_per_step']} kernels per accumulated step, GPU busy "
                 f"{prof['gpu_busy_fraction'] * 100:.1f} % of {prof['profiled_step_wall_ms']:.1f} ms "
                 f"(analysis {prof['analysis_s']:.1f} s)")
        except Exception as exc:  # keep the timings
            traceback.print_exc()
            prof = {"error": _err(exc)}
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None

    # 6. parts in isolation
    breakdown = None
    if parts_in is not None:
        compiled = name in COMPILED
        rows = {}
        for part in PARTS:
            if part not in parts_in:
                continue
            try:
                rows[part] = time_part(parts_in[part], gpt, batches[0][1], dev, compiled=compiled, backend=args.compile_backend,
                                       mode=args.compile_mode, reps=args.parts_reps, warmup=args.parts_warmup)
                r = rows[part]
                _log(f"  {name} part {part} ({r['where']}, {r['mode']}): {r['median_ms']:.2f} ms x {r['count_per_micro_batch']}"
                     f" = {r['ms_per_micro_batch']:.2f} ms per micro-batch (first call {r['first_call_s']:.1f} s)")
            except Exception as exc:
                traceback.print_exc()
                rows[part] = {"error": _err(exc), "where": parts_in[part]["where"]}
        summed = sum(r["ms_per_micro_batch"] for r in rows.values() if "error" not in r)
        opt_step = _median_ms(acc_opt)
        breakdown = {
            "parts": rows,
            "micro_batch_fwd_bwd_ms": fb_ms,
            "sum_parts_ms": summed,
            "other_ms": fb_ms - summed,
            "optimizer_ms": opt_step,
            "optimizer_source": "median finalize+optimizer of the accumulated steps",
            "accum": args.accum,
            "accumulated_step_ms": acc_ms,
            "note": "parts timed in isolation (fwd+bwd, real captured inputs) x count per micro-batch; "
                    "other = measured micro-batch fwd+bwd - sum of parts (negative: the isolated parts "
                    "cost more than inside the whole, e.g. fusion across part boundaries)",
        }
        del parts_in

    out.update({
        "fwd_bwd_ms": fb_ms,
        "finalize_optimizer_ms": opt_ms,
        "micro_step_ms": micro_ms,
        "accumulated_step_ms": acc_ms,
        "tokens_per_s": tokens_acc / (acc_ms / 1e3),
        "mfu": flops_mb / (micro_ms / 1e3) / peak,
        "accumulated_mfu": flops_mb * args.accum / (acc_ms / 1e3) / peak,
        "model_tflops_per_s_micro": flops_mb / (micro_ms / 1e3) / 1e12,
        "model_tflops_per_s_accumulated": flops_mb * args.accum / (acc_ms / 1e3) / 1e12,
        "peak_mem_gib": peak_mem,
        "micro_batch": {
            "fwd_bwd_ms": [x * 1e3 for x in fb], "finalize_optimizer_ms": [x * 1e3 for x in opt],
            "first_fwd_bwd_s": first_fb, "losses": losses,
            "tokens": tokens_mb, "flops": flops_mb,
        },
        "accumulated": {
            "micro_batches": args.accum, "global_batch": f"{args.accum * b} x {s}",
            "step_ms": [x * 1e3 for x in acc], "fwd_bwd_ms": [x * 1e3 for x in acc_fb],
            "finalize_optimizer_ms": [x * 1e3 for x in acc_opt], "tokens": tokens_acc, "flops": flops_mb * args.accum,
        },
        "first_fwd_bwd_overhead_s": max(0.0, first_fb - fb_ms / 1e3),
        "profile": prof,
        "breakdown": breakdown,
        "flops": flops,
    })
    del top, optimizer, gpt
    out["variant_wall_s"] = time.perf_counter() - t_variant
    return out


def _cleanup(dev: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Ratios and goals
# --------------------------------------------------------------------------------------------


def add_ratios(results: list) -> None:
    ok = {r["variant"]: r for r in results if "error" not in r}
    def ratio(b, r):
        return None if b is None else {
            "fwd_bwd": b["fwd_bwd_ms"] / r["fwd_bwd_ms"],
            "micro_step": b["micro_step_ms"] / r["micro_step_ms"],
            "accumulated_step": b["accumulated_step_ms"] / r["accumulated_step_ms"],
        }

    for r in ok.values():
        for base in ("stock_eager", "transformed_eager"):
            r[f"speedup_vs_{base}"] = ratio(ok.get(base), r)
    if "fork_compiled" in ok:  # the value residual's and the biases' cost: < 1 = slower
        ok["fork_compiled"]["speedup_vs_fork_base"] = ratio(ok.get("transformed_compiled"), ok["fork_compiled"])


def evaluate_goals(results: list) -> list:
    ok = {r["variant"]: r for r in results if "error" not in r}
    c, st, te = ok.get("transformed_compiled"), ok.get("stock_eager"), ok.get("transformed_eager")
    vals = {
        "compiled_fwd_bwd_le_45ms": (c["fwd_bwd_ms"] if c else None, "ms", lambda v: v <= 45.0),
        "compiled_fwd_bwd_ge_50x_stock": (st["fwd_bwd_ms"] / c["fwd_bwd_ms"] if c and st else None, "x", lambda v: v >= 50.0),
        "accumulated_mfu_ge_30pct": (c["accumulated_mfu"] * 100 if c else None, "%", lambda v: v >= 30.0),
        "compiled_ge_1p3x_transformed_eager": (te["accumulated_step_ms"] / c["accumulated_step_ms"] if c and te else None, "x",
                                               lambda v: v >= 1.3),
    }
    goals = []
    for key, text in GOALS:
        v, unit, test = vals[key]
        met = None if v is None else bool(test(v))
        goals.append({"id": key, "goal": text, "value": v, "unit": unit,
                      "status": "not measured" if met is None else ("met" if met else "missed"), "met": met})
    return goals


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float) -> list:
    import math

    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks


def _fmt_ms(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _bar_panel(ax, rows, key: str, title: str, extra=None) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    vals = [r[key] for r in rows]
    x = list(range(len(rows)))
    ax.bar(x, vals, width=0.62, color=[COLORS[r["variant"]] for r in rows], edgecolor="black", linewidth=0.6)
    by = {r["variant"]: r for r in rows}
    log = max(vals) / max(min(vals), 1e-9) > 20
    if log:
        ax.set_yscale("log")
        lo, hi = min(vals) / 3, max(vals) * 15
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(_nice_ticks(lo, hi)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, max(vals) * (1.3 + 0.1 * (3 + (extra is not None))))
    for xi, r, v in zip(x, rows, vals):
        lines = [f"{_fmt_ms(v)} ms"]
        if "stock_eager" in by and r["variant"] != "stock_eager":
            lines.append(f"{by['stock_eager'][key] / v:.1f}x vs stock")
        if "transformed_eager" in by and r["variant"] == "transformed_compiled":
            lines.append(f"{by['transformed_eager'][key] / v:.2f}x vs eager")
        if extra:
            lines.append(extra(r))
        y = v * 1.12 if log else v + max(vals) * 0.02
        ax.text(xi, y, "\n".join(lines), ha="center", va="bottom", fontsize=8.5, clip_on=True)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS[r["variant"]].replace(" (", "\n(").replace(" + ", "\n+ ") for r in rows], fontsize=8.5)
    ax.set_ylabel("ms (lower is better)" + (", log scale" if log else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="major")


def _breakdown_segments(bd: dict, accum: int) -> list:
    """(part, ms per micro-batch, count) in stacking order; ``other`` clipped at 0."""
    segs = []
    for p in PARTS:
        row = bd["parts"].get(p)
        if row and "error" not in row:
            segs.append((p, row["ms_per_micro_batch"], row["count_per_micro_batch"]))
    segs.append(("other", max(0.0, bd["other_ms"]), None))
    segs.append(("optimizer", (bd["optimizer_ms"] or 0.0) / accum, None))
    return segs


def _breakdown_panel(ax, rows, accum: int) -> None:
    x = list(range(len(rows)))
    segs = [_breakdown_segments(r["breakdown"], accum) for r in rows]
    totals = [sum(v for _, v, _ in sg) for sg in segs]
    measured = [r["accumulated_step_ms"] / accum for r in rows]
    ymax = max(totals + measured)
    seen = set()
    for xi, r, sg, total, meas in zip(x, rows, segs, totals, measured):
        bottom = 0.0
        for p, v, cnt in sg:
            ax.bar(xi, v, bottom=bottom, width=0.55, color=PART_COLORS[p], edgecolor="white", linewidth=0.6,
                   hatch="//" if p == "optimizer" else None, label=PART_LABELS[p] if p not in seen else None)
            seen.add(p)
            if v >= 0.05 * ymax:
                txt = _fmt_ms(v) + (f" ({cnt}x)" if cnt and cnt > 1 else "")
                ax.text(xi, bottom + v / 2, txt, ha="center", va="center", fontsize=7.5, clip_on=True)
            bottom += v
        ax.hlines(meas, xi - 0.36, xi + 0.36, colors="black", linestyles="--", linewidth=1.2,
                  label=f"measured accumulated step / {accum}" if xi == 0 else None)
        bd = r["breakdown"]
        note = f"sum {_fmt_ms(total)} ms\nmeasured {_fmt_ms(meas)} ms"
        if bd["other_ms"] < 0:
            note += f"\nparts exceed fwd+bwd by\n{_fmt_ms(-bd['other_ms'])} ms (other shown as 0)"
        ax.text(xi, max(total, meas) + 0.02 * ymax, note, ha="center", va="bottom", fontsize=7.5, clip_on=True)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS[r["variant"]].replace(" (", "\n(").replace(" + ", "\n+ ") for r in rows], fontsize=8.5)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, ymax * 2.0)
    ax.set_ylabel("ms per micro-batch")
    ax.set_title(f"where a micro-batch's time goes: parts timed in isolation x count,\n"
                 f"other = measured fwd+bwd - parts, optimizer amortised over {accum}", fontsize=10)
    ax.legend(loc="upper center", fontsize=7, ncol=2, frameon=True)
    ax.grid(axis="y", alpha=0.3)


def plot(results: list, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in results if "error" not in r]
    if not rows:
        return
    bd_rows = [r for r in rows if r["variant"] != "stock_eager" and r.get("breakdown")]
    ncols = 3 if bd_rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 6.6), gridspec_kw={"width_ratios": [1, 1, 0.9][:ncols]})
    b, s, a = meta["micro_batch"], meta["seq_len"], meta["accum"]
    _bar_panel(axes[0], rows, "fwd_bwd_ms", f"forward + backward per micro-batch ({b} x {s} tokens)",
               extra=None)
    _bar_panel(axes[1], rows, "accumulated_step_ms",
               f"accumulated step: {a} micro-batches + finalize + optimizer\n(global batch {a * b} x {s})",
               extra=lambda r: f"MFU {r['accumulated_mfu'] * 100:.1f} %")
    if bd_rows:
        _breakdown_panel(axes[2], bd_rows, a)
    errs = [r["variant"] for r in results if "error" in r]
    fig.suptitle(
        f"vpMoE training step: config {meta['config']}, micro-batch {b} x {s}, accumulation {a}, "
        f"{meta['path']} path, {meta['dtype']}\n{meta['device']}, torch {meta['torch']}, {meta['date'][:16]} UTC"
        + (f"   (failed: {', '.join(errs)})" if errs else ""), fontsize=11)
    handles = [Patch(facecolor=COLORS[r["variant"]], edgecolor="black", label=LABELS[r["variant"]]) for r in rows]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vpmoe-8l")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2, help="warm-up micro-batches (each a full step) [2]")
    p.add_argument("--micro-steps", "--steps", dest="micro_steps", type=int, default=10, help="timed micro-batches [10]")
    p.add_argument("--accum", type=int, default=8, help="micro-batches per accumulated step [8]")
    p.add_argument("--accum-steps", type=int, default=2, help="timed accumulated steps [2]")
    p.add_argument("--stock-warmup", type=int, default=1, help="stock_eager override of --warmup [1]")
    p.add_argument("--stock-micro-steps", type=int, default=3, help="stock_eager override of --micro-steps [3]")
    p.add_argument("--stock-accum-steps", type=int, default=1, help="stock_eager override of --accum-steps [1]")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--path", choices=("megatron", "plain"), default="megatron")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for the CPU smoke run)")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--parts", choices=("all", "eager", "none"), default="all",
                   help="the per-part breakdown: all variants, eager variants only (no extra compilation), none [all]")
    p.add_argument("--parts-reps", type=int, default=5)
    p.add_argument("--parts-warmup", type=int, default=2)
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step")
    p.add_argument("--trace", default=None, metavar="DIR", help="also write one chrome trace per variant to DIR")
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-batches", type=int, default=8, help="distinct synthetic micro-batches, cycled [8]")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test, with --path plain)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw step.png from an existing step.json")
    return p


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot(data["results"], data["meta"], out / "step.png")
        print(f"wrote {out / 'step.png'}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: benchmarks/step.py needs a CUDA GPU (or --device cpu --path plain for a smoke run)", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.path == "megatron":
        print("error: the Megatron path (Float16Module + DDP + Megatron optimizer) needs CUDA; use --path plain on the CPU",
              file=sys.stderr)
        return 2
    counts = {k: getattr(args, k) for k in ("micro_steps", "accum", "accum_steps", "parts_reps", "num_batches")}
    counts.update({k: getattr(args, k) for k in ("stock_micro_steps", "stock_accum_steps") if getattr(args, k) is not None})
    bad = [f"--{k.replace('_', '-')}" for k, v in counts.items() if v < 1]
    if bad or args.warmup < 0 or args.parts_warmup < 0:
        print(f"error: {', '.join(bad) or '--warmup / --parts-warmup'} must be >= 1 (warm-ups >= 0)", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    from megatron_base import init_process, load_config

    cfg = load_config(args.config)
    init_process(seed=args.seed)
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    V = cfg.tokenizer.vocab_size
    batches = []
    for _ in range(args.num_batches):
        chunk = torch.randint(0, V, (args.micro_batch, args.seq_len + 1), generator=g)
        batches.append((chunk[:, :-1].contiguous().to(dev), chunk[:, 1:].contiguous().to(dev)))
    meta = {
        "config": args.config, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "accum": args.accum,
        "global_batch": f"{args.accum * args.micro_batch} x {args.seq_len}", "path": args.path,
        "dtype": "bf16 params" if dev.type == "cuda" else "fp32 params",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": _version("triton"), "megatron_core": _version("megatron.core"),
        "command": "python benchmarks/step.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
        "peak_tflops_assumed": args.peak_tflops,
        "flop_count": FLOP_FORMULA,
        "definitions": {
            "fwd_bwd_ms": "median over the timed micro-batches of forward + loss + backward (synchronised before and after)",
            "finalize_optimizer_ms": "median of finalize_model_grads (plain path: router bias update) + optimizer.step() + zero grads",
            "micro_step_ms": "fwd_bwd_ms + finalize_optimizer_ms",
            "accumulated_step_ms": "median over the accumulated steps of accum x (fwd + loss/accum + bwd) + finalize + optimizer + zero grads",
            "tokens_per_s": "accum x micro_batch x seq_len / accumulated_step_ms",
            "mfu": "FLOPs(1 micro-batch) / micro_step_ms / peak",
            "accumulated_mfu": "FLOPs(accum micro-batches) / accumulated_step_ms / peak",
            "peak_mem_gib": "torch.cuda.max_memory_allocated over build + steps + profiled step (reset per variant)",
            "profile": "one further accumulated step under torch.profiler: kernels_per_step = CUDA kernel events, "
                       "gpu_busy_fraction = union of kernel intervals / that step's wall time",
            "breakdown": "parts in isolation (fwd+bwd on captured real inputs, median of --parts-reps) x count per "
                         "micro-batch; other = fwd_bwd_ms - sum; optimizer = median finalize+optimizer of the accumulated steps",
            "speedup_vs_*": "baseline time / this variant's time (same run)",
        },
    }
    _log(f"[step] {meta['device']}, torch {meta['torch']}, config {args.config}, micro-batch {args.micro_batch} x "
         f"{args.seq_len}, accumulation {args.accum}, variants {names}")
    results = []
    t_run = time.perf_counter()

    def write(final: bool) -> None:
        add_ratios(results)
        meta["goals"] = evaluate_goals(results)
        meta["run_wall_s"] = time.perf_counter() - t_run
        meta["complete"] = final and len(results) == len(names) and not interrupted
        (out / "step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    interrupted = False
    for name in names:
        _log(f"[step] {name} ({LABELS.get(name, '?')}), {time.perf_counter() - t_run:.0f} s into the run")
        try:
            results.append(run_variant(name, args, cfg, batches))
        except KeyboardInterrupt:  # e.g. the driver's timeout: keep what was measured
            results.append({"variant": name, "label": LABELS.get(name, name), "error": "KeyboardInterrupt (time limit?)"})
            interrupted = True
        except Exception as exc:  # record and continue with the other variants
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            results.append({"variant": name, "label": LABELS.get(name, name), "error": _err(exc), "traceback": tb[-4000:]})
            del exc
        _cleanup(dev)
        _log(f"[step] {name} done, {time.perf_counter() - t_run:.0f} s into the run")
        write(final=False)
        if interrupted:
            break
    write(final=True)
    try:
        plot(results, meta, out / "step.png")
    except Exception:  # the JSON is the record; a plotting bug must not lose it
        traceback.print_exc()
    print_summary(results, meta)
    _log(f"[step] wrote {out / 'step.json'} and {out / 'step.png'} ({meta['run_wall_s']:.0f} s)")
    return 130 if interrupted else 0


def _version(mod: str):
    try:
        import importlib

        if mod == "megatron.core":
            from importlib.metadata import version

            return version("megatron-core")
        return importlib.import_module(mod).__version__
    except Exception:
        return None


def print_summary(results: list, meta: dict) -> None:
    print(f"\n{'variant':<22}{'fwd+bwd':>10}{'fin+opt':>10}{'micro':>10}{'accum':>11}{'tok/s':>11}{'MFU':>7}{'accMFU':>8}"
          f"{'peak GiB':>9}{'kern/step':>10}{'busy':>6}  vs stock (fwd+bwd / accum)", flush=True)
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<22}ERROR {r['error']}")
            continue
        p = r.get("profile") or {}
        vs = r.get("speedup_vs_stock_eager")
        print(
            f"{r['variant']:<22}{r['fwd_bwd_ms']:>8.1f}ms{r['finalize_optimizer_ms']:>8.1f}ms{r['micro_step_ms']:>8.1f}ms"
            f"{r['accumulated_step_ms']:>9.1f}ms{r['tokens_per_s']:>11.0f}{r['mfu'] * 100:>6.2f}%{r['accumulated_mfu'] * 100:>7.2f}%"
            f"{(r['peak_mem_gib'] or 0):>9.1f}{p.get('kernels_per_step', '-'):>10}"
            f"{(p['gpu_busy_fraction'] * 100 if p.get('gpu_busy_fraction') is not None else float('nan')):>5.0f}%"
            + (f"  {vs['fwd_bwd']:.2f}x / {vs['accumulated_step']:.2f}x" if vs else "")
        )
    for r in results:
        bd = r.get("breakdown")
        if not bd:
            continue
        cells = ", ".join(f"{k} {v['ms_per_micro_batch']:.2f}" for k, v in bd["parts"].items() if "error" not in v)
        errs = [k for k, v in bd["parts"].items() if "error" in v]
        print(f"  {r['variant']} breakdown (ms per micro-batch): {cells}, other {bd['other_ms']:.2f} "
              f"(of {bd['micro_batch_fwd_bwd_ms']:.2f} measured); optimizer {bd['optimizer_ms']:.2f} per step"
              + (f"; failed parts: {errs}" if errs else ""))
    print("goals:")
    for g in meta["goals"]:
        v = "n/a" if g["value"] is None else f"{g['value']:.2f} {g['unit']}"
        print(f"  [{g['status']:>12}] {g['goal']}: {v}")


if __name__ == "__main__":
    sys.exit(main())
