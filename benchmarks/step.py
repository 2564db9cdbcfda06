"""Whole training step: stock eager vs transformed eager vs transformed compiled (GPU).

    python benchmarks/step.py --config vpmoe-8l --micro-batch 2 --seq-len 4096 --out DIR

For each variant, in one process and on the same synthetic batches: build the model (bf16
params), wrap it the Megatron way (``Float16Module`` + Megatron ``DistributedDataParallel``,
world size 1) unless ``--path plain``, build the optimizer with ``vpmoe_compile.build_optimizer``
(NorMuon + Polar Express for matrices, Megatron's Adam for the rest: the SAME optimizer for all
three variants, so differences are the model), then time ``--steps`` full steps
(zero grads, forward, loss, backward, ``finalize_model_grads``, optimizer step) after
``--warmup`` steps, with ``torch.cuda.synchronize`` around each. Reports the median (and p10 /
p90) step time, tokens/s and MFU, and writes ``step.json`` and ``step.png``.

Variants:
  stock_eager         stock Megatron-Core GPTModel (local spec, no TE): RoPE, dense QKV,
                      unfused masked softmax with the sink column
  transformed_eager   after vpmoe_compile.transform (default pipeline: TPA + GRAPE + sink
                      kernels; routed experts still run Megatron's per-expert loop)
  transformed_eager_batched_experts      + the opt-in batched_experts pass
  transformed_compiled_batched_experts   the same, with vpmoe_compile.training.compile_regions
                      (inductor): attention blocks, norms, dense MLP, router, shared expert and
                      output layer compiled; the routed-expert dispatch stays eager
  (any name: stock_eager | transformed_{eager,compiled}[_batched_experts])

FLOP count used for MFU (stated in the JSON): per token, 6 x (active matrix parameters touched
by a token: attention projections, dense/shared/top-k expert MLPs, router, output layer; not
the embedding lookup) + attention-score FLOPs 12 x H x d x (average visible keys: W on local
layers, (s+1)/2 on global layers). Peak: 989.4 TFLOP/s (H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_PEAK_TFLOPS = 989.4


def model_flops_per_token(model, cfg, seq_len: int) -> dict:
    """Matrix FLOPs (6 x active params touched) + attention-score FLOPs, per token (fwd+bwd)."""
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


def run_variant(name: str, args, cfg) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    import vpmoe_compile
    from megatron_base import build_stock_gpt
    from vpmoe_compile.training import compile_regions, sync as _sync

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = build_stock_gpt(cfg, device=dev, params_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, max_sequence_length=args.seq_len)
    t0 = time.perf_counter()
    if name.startswith("transformed"):
        from vpmoe_compile.pipeline import default_pipeline

        extra = ("batched_experts",) if name.endswith("_batched_experts") else ()
        vpmoe_compile.transform(model, cfg, passes=default_pipeline(cfg, extra=extra), progress=False)
    elif name != "stock_eager":
        raise ValueError(f"unknown variant {name!r}")
    transform_s = time.perf_counter() - t0
    flops = model_flops_per_token(model, cfg, args.seq_len)
    tcfg = model.config
    if args.path == "megatron":
        f16 = Float16Module(tcfg, model)
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
        top = DistributedDataParallel(tcfg, ddp_cfg, f16)
        optimizer = vpmoe_compile.build_optimizer(top, cfg)
    else:
        optimizer = vpmoe_compile.build_optimizer(model, cfg)
        top = model
    if "_compiled" in name:
        compiled_regions = compile_regions(model)  # in place: names and wrappers unchanged
    g = torch.Generator(device="cpu").manual_seed(0)
    V = cfg.tokenizer.vocab_size
    b, s = args.micro_batch, args.seq_len
    batches = [torch.randint(0, V, (b, s + 1), generator=g).to(dev) for _ in range(4)]
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    times, losses, fb_times, opt_times = [], [], [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_total = args.warmup + args.steps
    for i in range(n_total):
        data = batches[i % len(batches)]
        _sync(dev)
        t = time.perf_counter()
        if args.path == "megatron":
            top.zero_grad_buffer()
        optimizer.zero_grad()
        per_tok = top(data[:, :-1], pos, None, labels=data[:, 1:])
        loss = per_tok.float().mean()
        loss.backward()
        _sync(dev)
        t_fb = time.perf_counter()
        if args.path == "megatron":
            finalize_model_grads([top])
        else:
            from vpmoe_compile.training import update_router_expert_bias

            update_router_expert_bias(model)
        optimizer.step()
        _sync(dev)
        dt = time.perf_counter() - t
        times.append(dt)
        fb_times.append(t_fb - t)
        opt_times.append(dt - (t_fb - t))
        losses.append(float(loss))
        print(f"  {name} step {i + 1}/{n_total}: {dt * 1e3:.1f} ms loss {losses[-1]:.4f}", flush=True)
    steady = sorted(times[args.warmup:])
    med = statistics.median(steady)
    tokens = b * s
    tflops = flops["total_flops_per_token"] * tokens / med / 1e12
    out = {
        "variant": name,
        "median_s": med,
        "p10_s": steady[int(0.1 * (len(steady) - 1))],
        "p90_s": steady[int(0.9 * (len(steady) - 1))],
        "first_step_s": times[0],
        "median_fwd_bwd_s": statistics.median(fb_times[args.warmup:]),
        "median_finalize_and_optimizer_s": statistics.median(opt_times[args.warmup:]),
        "compile_overhead_s": max(0.0, times[0] - med),
        "tokens_per_s": tokens / med,
        "model_tflops": tflops,
        "mfu": tflops / H100_PEAK_TFLOPS,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "transform_s": transform_s,
        "losses": losses,
        "flops": flops,
    }
    del top, optimizer, model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"].replace("_batched_experts", "\n+ batched experts") for r in results]
    med = [r["median_s"] * 1e3 for r in results]
    lo = [m - r["p10_s"] * 1e3 for m, r in zip(med, results)]
    hi = [r["p90_s"] * 1e3 - m for m, r in zip(med, results)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=4, color=["#888888", "#8172b2", "#4c72b0", "#55a868"][: len(names)])
    base = med[0]
    for bar_, r in zip(bars, results):
        ax.annotate(
            f"{r['median_s'] * 1e3:.0f} ms\n{base / (r['median_s'] * 1e3):.2f}x · MFU {r['mfu'] * 100:.1f}%",
            (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()), ha="center", va="bottom", fontsize=9,
        )
    ax.set_ylabel("median step time (ms, bars p10-p90), lower is better")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(med) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vpmoe-8l")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="stock_eager,transformed_eager,transformed_eager_batched_experts,transformed_compiled_batched_experts")
    p.add_argument("--path", choices=("megatron", "plain"), default="megatron")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test with --path plain)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: benchmarks/step.py needs a CUDA GPU (or --device cpu --path plain for a smoke run)", file=sys.stderr)
        return 2
    from megatron_base import init_process, load_config

    cfg = load_config(args.config)
    init_process(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants.split(","):
        print(f"[step] {name}", flush=True)
        try:
            results.append(run_variant(name, args, cfg))
        except Exception as exc:  # record and continue with the other variants
            import traceback

            traceback.print_exc()
            results.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.empty_cache()
    ok = [r for r in results if "error" not in r]
    base = next((r["median_s"] for r in ok if r["variant"] == "stock_eager"), None)
    for r in ok:
        r["speedup_vs_stock_eager"] = (base / r["median_s"]) if base else None
    meta = {
        "config": args.config, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "warmup": args.warmup, "steps": args.steps, "path": args.path,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "peak_tflops_assumed": H100_PEAK_TFLOPS,
        "flop_count": "6 x active matmul params + 12 x H x d x avg visible keys per layer, per token",
    }
    (out / "step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if ok:
        plot(ok, out / "step.png", f"{args.config}, b={args.micro_batch} x s={args.seq_len}, {meta['device']}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>22}: ERROR {r['error']}")
        else:
            print(
                f"{r['variant']:>22}: {r['median_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  "
                f"MFU {r['mfu'] * 100:5.1f}%  peak {r['peak_mem_gib'] or 0:.1f} GiB  x{r.get('speedup_vs_stock_eager') or 0:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
