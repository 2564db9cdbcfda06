"""LM head + loss on the GPU: the stock Megatron head vs the fused ``linear_cross_entropy`` op.

Shape (defaults): N = b·s = 2·4096 = 8192 tokens, h = 1024, V = 201,088, bf16 hidden and weight,
per-token loss multiplied by a loss mask (so the incoming gradient is not uniform).

Variants (each fwd+bwd = per-token loss ``[b, s]``, then ``autograd.grad`` w.r.t. hidden and weight
with ``grad = loss_mask / loss_mask.sum()``):

* ``stock``: ``hidden @ Wᵀ`` in bf16 (``ColumnParallelLinear`` at TP = 1) -> bf16 logits
  ``[s, b, V]`` -> Megatron's ``vocab_parallel_cross_entropy`` (fp32 copy of the logits, softmax
  saved for backward). Megatron's own function when ``megatron.core`` imports and a one-rank
  process group can be set up (``--megatron auto``), else a line-by-line copy of it at TP = 1
  (its all-reduces are identities there); with both, the copy is checked against Megatron.
* ``fused``: ``vpmoe_compile.ops.linear_cross_entropy`` with ``--chunk`` tokens per chunk (the
  same reshapes as ``FusedHeadLinear.loss``); ``--torch-backend`` adds ``fused_torch_ops``, the
  same op with its elementwise passes as torch ops instead of the Triton kernels.
* each of the above eager and under ``torch.compile(fullgraph=True, dynamic=False)``; the compiled
  ``stock`` always uses the copy (the compiled graph may not contain Megatron's process groups).

Measured: fwd+bwd time (CUDA events, median of ``--reps`` after ``--warmup``), peak memory above
the inputs (``torch.cuda.max_memory_allocated`` minus what was allocated before the call; the
returned gradients count, for every variant alike), host-synchronisation freedom of the fused op
(``torch.cuda.set_sync_debug_mode('error')``), and bf16 accuracy at ``--acc-tokens`` tokens (full
h and V): relative error against float64 of loss, d_hidden and d_weight for the fused op, the
stock head and the fp32-math reference on the same bf16 inputs; the rule is fused <= 2x the
fp32-math reference (plus 1e-6 for the fp32 loss). ``--sweep 256,512,...`` adds the fused op
at several chunk sizes (eager; ``--sweep-compiled`` also compiled).

Writes ``OUT/head.json`` and ``OUT/head.png``::

    PYTHONPATH=$PWD python benchmarks/head.py --out OUT [--sweep 512,1024,2048,4096 --sweep-compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ops_import import import_op_module  # noqa: E402

_lce = import_op_module("linear_cross_entropy")
linear_cross_entropy = _lce.linear_cross_entropy
linear_cross_entropy_reference = _lce.linear_cross_entropy_reference
DEFAULT_CHUNK_SIZE = _lce.DEFAULT_CHUNK_SIZE

GIB = 2.0**30


# --------------------------------------------------------------------------------------------
# The stock head
# --------------------------------------------------------------------------------------------


class MegatronCrossEntropyTP1(torch.autograd.Function):
    """Megatron-Core 0.16.1 ``_VocabParallelCrossEntropy`` at one tensor-parallel rank, without
    label smoothing: the same statements in the same order, the all-reduces (identities at TP = 1)
    left out. ``logits [s, b, V]`` (any float dtype), ``target [s, b]`` -> loss ``[s, b]`` fp32."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):
        vocab_parallel_logits = vocab_parallel_logits.float()
        logits_max = torch.max(vocab_parallel_logits, dim=-1)[0]
        vocab_start_index, vocab_end_index = 0, vocab_parallel_logits.size(-1)
        vocab_parallel_logits -= logits_max.unsqueeze(dim=-1)
        target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
        masked_target = target.clone() - vocab_start_index
        masked_target[target_mask] = 0
        partition_vocab_size = vocab_parallel_logits.size()[-1]
        logits_2d = vocab_parallel_logits.view(-1, partition_vocab_size)
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(start=0, end=logits_2d.size()[0], device=logits_2d.device)
        predicted_logits_1d = logits_2d[arange_1d, masked_target_1d]
        predicted_logits_1d = predicted_logits_1d.clone().contiguous()
        predicted_logits = predicted_logits_1d.view_as(target)
        predicted_logits[target_mask] = 0.0
        exp_logits = vocab_parallel_logits
        torch.exp(vocab_parallel_logits, out=exp_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits.div_(sum_exp_logits.unsqueeze(dim=-1))
        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_input = softmax
        partition_vocab_size = softmax.size()[-1]
        grad_2d = grad_input.view(-1, partition_vocab_size)
        arange_1d = torch.arange(start=0, end=grad_2d.size()[0], device=grad_2d.device)
        softmax_update = 1.0 - target_mask.view(-1).float()
        grad_2d[arange_1d, masked_target_1d] -= softmax_update
        grad_input.mul_(grad_output.unsqueeze(dim=-1))
        return grad_input, None


def stock_head_copy(hidden, weight, labels):
    """``hidden [s, b, h]``, ``weight [V, h]``, ``labels [b, s]`` -> loss ``[b, s]`` fp32, as
    ``GPTModel._postprocess`` (output layer, then ``compute_language_model_loss``)."""
    logits = torch.matmul(hidden, weight.t())  # ColumnParallelLinear at TP=1: [s, b, V] bf16
    loss = MegatronCrossEntropyTP1.apply(logits, labels.transpose(0, 1).contiguous())
    return loss.transpose(0, 1).contiguous()


def make_stock_head_megatron():
    """Megatron's own ``vocab_parallel_cross_entropy`` behind the same signature, or ``None``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)

    def stock_head_megatron(hidden, weight, labels):
        logits = torch.matmul(hidden, weight.t())
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()

    return stock_head_megatron


def fused_head(chunk_size, backend="auto"):
    def head(hidden, weight, labels):
        """As ``FusedHeadLinear.loss``: tokens in ``[s, b]`` order, loss back to ``[b, s]``."""
        s, b, h = hidden.shape
        loss = linear_cross_entropy(
            hidden.reshape(s * b, h), weight, labels.transpose(0, 1).reshape(s * b), chunk_size=chunk_size,
            backend=backend,
        )
        return loss.view(s, b).transpose(0, 1).contiguous()

    return head


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def make_inputs(b, s, h, v, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(s, b, h, device=device, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=g) * (h**-0.5)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (b, s), device=device, generator=g)
    mask = (torch.rand(b, s, device=device, generator=g) > 0.1).float()
    labels[0, -16:] = -100  # padded tail, masked out like Megatron's data pipeline does
    mask[0, -16:] = 0.0
    grad = mask / mask.sum()
    return hidden, weight, labels, grad


def fwd_bwd(fn, hidden, weight, labels, grad):
    loss = fn(hidden, weight, labels)
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad)
    return loss, dh, dw


def measure(fn, inputs, warmup, reps):
    """(median ms, all ms, peak bytes above the inputs) of one fwd+bwd."""
    for _ in range(warmup):
        out = fwd_bwd(fn, *inputs)
        del out
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fwd_bwd(fn, *inputs)
        end.record()
        del out
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fwd_bwd(fn, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return statistics.median(times), times, peak


def host_sync_free(fn, inputs):
    """True when one fwd+bwd of ``fn`` runs with ``set_sync_debug_mode('error')``."""
    fwd_bwd(fn, *inputs)  # allocator warm, nothing lazy left
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd(fn, *inputs)
        return True, ""
    except RuntimeError as exc:
        return False, str(exc).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def accuracy(args, stock_fns):
    """Relative errors against float64 at ``--acc-tokens`` tokens (b = 1), full h and V."""
    n = args.acc_tokens
    hidden, weight, labels, grad = make_inputs(1, n, args.hidden, args.vocab, args.seed + 1)
    flat = lambda t: t.reshape(n, -1)  # noqa: E731

    def run(fn, cast=None):
        hl = (hidden if cast is None else hidden.to(cast)).detach().requires_grad_(True)
        wl = (weight if cast is None else weight.to(cast)).detach().requires_grad_(True)
        loss, dh, dw = fwd_bwd(fn, hl, wl, labels, grad.to(torch.float64 if cast is torch.float64 else torch.float32))
        return loss.detach(), dh, dw

    def ref(cd):
        def f(h, w, lab):
            return linear_cross_entropy_reference(flat(h), w, lab.reshape(-1), cd).view(1, n)

        return f

    out = {"tokens": n}
    truth = run(ref(torch.float64), torch.float64)
    cases = {"fp32_math_reference": run(ref(torch.float32)), "fused": run(fused_head(args.chunk))}
    for name, fn in stock_fns.items():
        cases[name] = run(fn)
    del_names = ("loss", "d_hidden", "d_weight")
    for name, res in cases.items():
        out[name] = {k: rel(g, t) for k, g, t in zip(del_names, res, truth)}
    refe = out["fp32_math_reference"]
    out["rule"] = "fused error <= 2 x fp32-math reference error (+1e-6), each of loss, d_hidden, d_weight"
    out["ratio_fused_to_reference"] = {k: out["fused"][k] / max(refe[k], 1e-300) for k in del_names}
    out["pass"] = all(out["fused"][k] <= 2.0 * refe[k] + 1e-6 for k in del_names)
    if "stock_megatron" in cases and "stock" in cases:
        out["stock_copy_vs_megatron_max_abs"] = {
            k: float((a.double() - b.double()).abs().max()) for k, a, b in zip(del_names, cases["stock"], cases["stock_megatron"])
        }
    del truth, cases
    torch.cuda.empty_cache()
    return out


def full_size_agreement(inputs, chunk):
    """Fused vs the fp32-math reference at the benchmark shape (loss and gradients)."""
    hidden, weight, labels, grad = inputs
    s, b, h = hidden.shape

    def ref(hl, wl, lab):
        return linear_cross_entropy_reference(hl.reshape(s * b, h), wl, lab.transpose(0, 1).reshape(-1)).view(s, b).t()

    want = fwd_bwd(ref, *inputs)
    want = tuple(t.detach() for t in want)
    torch.cuda.empty_cache()
    got = fwd_bwd(fused_head(chunk), *inputs)
    res = {k: rel(g, w) for k, g, w in zip(("loss", "d_hidden", "d_weight"), got, want)}
    del want, got
    torch.cuda.empty_cache()
    return res


def run_variant(results, name, fn, inputs, args, compiled):
    label = name + (" compiled" if compiled else " eager")
    try:
        t0 = time.time()
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        ms, times, peak = measure(fn, inputs, args.warmup, args.reps)
        row = {
            "variant": name,
            "mode": "compiled" if compiled else "eager",
            "fwd_bwd_ms": ms,
            "ms_all": times,
            "peak_gib_above_inputs": peak / GIB,
            "wall_s": time.time() - t0,
        }
        print(f"[head] {label:28s} {ms:8.2f} ms   peak {peak / GIB:6.2f} GiB   ({row['wall_s']:.0f} s)", flush=True)
    except Exception as exc:  # record and go on: one failing variant must not lose the others
        row = {"variant": name, "mode": "compiled" if compiled else "eager", "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[head] {label} ERROR {row['error']}\n{traceback.format_exc()[-2000:]}", flush=True)
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    results["rows"].append(row)
    return row


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


VARIANT_LABELS = {  # plot labels (the JSON keeps the variant names)
    "stock": "stock head (line-by-line copy)",
    "stock_megatron": "stock head (Megatron's own)",
    "fused": "fused linear_cross_entropy",
    "fused_torch_ops": "fused, elementwise as torch ops",
}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _plot import plain_log_axis

    rows = [r for r in results["rows"] if "fwd_bwd_ms" in r]
    sweep = results.get("sweep") or []
    nrows = 2 if sweep else 1
    fig, axes = plt.subplots(nrows, 2, figsize=(13, 4.2 * nrows), squeeze=False)
    sh = results["shape"]
    from matplotlib.patches import Patch

    fig.legend(
        handles=[
            Patch(facecolor="C0", edgecolor="k", label="stock: bf16 logits + Megatron fp32 cross entropy"),
            Patch(facecolor="C1", edgecolor="k", label=f"fused linear_cross_entropy (chunk {results['chunk']})"),
        ]
        + ([Patch(facecolor="C2", edgecolor="k", label="fused, elementwise as torch ops")]
           if any("torch_ops" in r["variant"] for r in rows) else [])
        + [Patch(facecolor="w", edgecolor="k", hatch="//", label="hatched: torch.compile(fullgraph=True); plain: eager")],
        loc="upper center",
        ncol=4,
        fontsize=8,
        bbox_to_anchor=(0.5, 0.965 if sweep else 0.93),
    )
    fig.suptitle(
        f"LM head fwd+bwd: logits projection + cross entropy, N={sh['tokens']} tokens (b={sh['b']}, s={sh['s']}), "
        f"h={sh['hidden']}, V={sh['vocab']}, bf16 — {results['device']}",
        fontsize=10,
    )
    names = [f"{VARIANT_LABELS.get(r['variant'], r['variant'])},\n{'torch.compile' if r['mode'] == 'compiled' else r['mode']}"
             for r in rows]
    colors = ["C0" if r["variant"].startswith("stock") else ("C2" if "torch_ops" in r["variant"] else "C1") for r in rows]
    hatches = ["" if r["mode"] == "eager" else "//" for r in rows]
    for ax, key, xlabel, fmt in (
        (axes[0, 0], "fwd_bwd_ms", "fwd+bwd time (ms, median, lower is better)", "{:.1f} ms"),
        (axes[0, 1], "peak_gib_above_inputs", "peak GPU memory above the inputs (GiB)", "{:.2f} GiB"),
    ):
        vals = [r[key] for r in rows]
        bars = ax.barh(range(len(rows)), vals, color=colors, edgecolor="k")
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        for bar, val in zip(bars, vals):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(val), va="center", fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(vals) * 1.3 if vals else 1)
    if sweep:
        for mode, marker in (("eager", "o"), ("compiled", "s")):
            pts = [p for p in sweep if p.get("mode") == mode and "fwd_bwd_ms" in p]
            if not pts:
                continue
            xs = [p["chunk"] for p in pts]
            axes[1, 0].plot(xs, [p["fwd_bwd_ms"] for p in pts], marker=marker, label=f"fused, {mode}")
            axes[1, 1].plot(xs, [p["peak_gib_above_inputs"] for p in pts], marker=marker, label=f"fused, {mode}")
        for ax, ylabel in ((axes[1, 0], "fwd+bwd time (ms, median)"), (axes[1, 1], "peak memory above inputs (GiB)")):
            ax.set_xscale("log", base=2)
            plain_log_axis(ax.xaxis, base=2, values=[p["chunk"] for p in sweep if "fwd_bwd_ms" in p])
            ax.set_xlabel("chunk size (tokens per forward chunk, log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title("fused op: chunk-size sweep", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if sweep else 0.86))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for head.json and head.png")
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--s", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="fused op: tokens per forward chunk")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acc-tokens", type=int, default=1024, help="tokens of the float64 accuracy check (0: skip)")
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--megatron", choices=["auto", "off"], default="auto", help="also time Megatron's own cross entropy")
    p.add_argument("--sweep", default="", help="comma-separated chunk sizes for the fused op, e.g. 256,512,1024,2048,4096")
    p.add_argument("--sweep-compiled", action="store_true", help="sweep the compiled fused op too")
    p.add_argument("--torch-backend", action="store_true",
                   help="also time the fused op with backend='torch' (elementwise passes as torch ops, no Triton)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/head.py needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"b": args.b, "s": args.s, "tokens": args.b * args.s, "hidden": args.hidden, "vocab": args.vocab},
        "dtype": "bfloat16",
        "chunk": args.chunk,
        "warmup": args.warmup,
        "reps": args.reps,
        "mm_out_dtype_fp32": bool(_lce.op._HAS_MM_OUT_DTYPE),
        "timing": "CUDA events around loss + autograd.grad(hidden, weight), median",
        "peak": "torch.cuda.max_memory_allocated() - memory_allocated() before the call (inputs excluded, gradients included)",
        "rows": [],
    }
    print(f"[head] {results['device']} torch {results['torch']} shape {results['shape']} chunk {args.chunk}", flush=True)

    stock_fns = {"stock": stock_head_copy}
    if args.megatron == "auto":
        try:
            stock_fns["stock_megatron"] = make_stock_head_megatron()
            results["megatron"] = "megatron.core vocab_parallel_cross_entropy (one-rank NCCL group)"
        except Exception as exc:
            results["megatron"] = f"not used ({type(exc).__name__}: {str(exc)[:200]}); stock = line-by-line copy at TP=1"
        print(f"[head] megatron: {results['megatron']}", flush=True)

    inputs = make_inputs(args.b, args.s, args.hidden, args.vocab, args.seed)
    results["input_gib"] = sum(t.numel() * t.element_size() for t in inputs) / GIB

    if args.acc_tokens:
        try:
            results["accuracy"] = accuracy(args, stock_fns)
            print(f"[head] accuracy @ {args.acc_tokens} tokens: {json.dumps(results['accuracy'])}", flush=True)
        except Exception as exc:
            results["accuracy"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[head] accuracy ERROR {traceback.format_exc()[-2000:]}", flush=True)
    try:
        results["full_size_fused_vs_fp32_reference"] = full_size_agreement(inputs, args.chunk)
        print(f"[head] full size fused vs fp32-math reference: {results['full_size_fused_vs_fp32_reference']}", flush=True)
    except Exception as exc:
        results["full_size_fused_vs_fp32_reference"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    torch.cuda.empty_cache()

    ok, why = host_sync_free(fused_head(args.chunk), inputs)
    results["fused_host_sync_free"] = ok
    if not ok:
        results["fused_host_sync"] = why
    print(f"[head] fused eager free of host syncs: {ok} {why}", flush=True)

    for name, fn in stock_fns.items():
        run_variant(results, name, fn, inputs, args, compiled=False)
    run_variant(results, "fused", fused_head(args.chunk), inputs, args, compiled=False)
    if args.torch_backend:
        run_variant(results, "fused_torch_ops", fused_head(args.chunk, "torch"), inputs, args, compiled=False)
    if not args.no_compile:
        run_variant(results, "stock", stock_head_copy, inputs, args, compiled=True)
        run_variant(results, "fused", fused_head(args.chunk), inputs, args, compiled=True)
        if args.torch_backend:
            run_variant(results, "fused_torch_ops", fused_head(args.chunk, "torch"), inputs, args, compiled=True)

    by = {(r["variant"], r["mode"]): r for r in results["rows"] if "fwd_bwd_ms" in r}
    base = by.get(("stock", "eager"))
    if base:
        results["speedup_vs_stock_eager"] = {f"{v} {m}": base["fwd_bwd_ms"] / r["fwd_bwd_ms"] for (v, m), r in by.items()}
        results["memory_vs_stock_eager"] = {
            f"{v} {m}": r["peak_gib_above_inputs"] / base["peak_gib_above_inputs"] for (v, m), r in by.items()
        }
    n, h, v = args.b * args.s, args.hidden, args.vocab
    results["matmul_tflop"] = {"stock": 3 * 2 * n * h * v / 1e12, "fused": 4 * 2 * n * h * v / 1e12}

    if args.sweep:
        sweep = []
        modes = [False] + ([True] if args.sweep_compiled and not args.no_compile else [])
        for chunk in [int(c) for c in args.sweep.split(",") if c.strip()]:
            for compiled in modes:
                row = run_variant({"rows": []}, f"fused chunk={chunk}", fused_head(chunk), inputs, args, compiled)
                row["chunk"] = chunk
                sweep.append(row)
        results["sweep"] = sweep

    with open(os.path.join(args.out, "head.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "head.png"))
    except Exception as exc:
        print(f"[head] plot failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"[head] wrote {args.out}/head.json and head.png", flush=True)


if __name__ == "__main__":
    main()
