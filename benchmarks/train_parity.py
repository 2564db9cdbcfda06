"""Training parity: transformed eager vs transformed compiled, N optimizer steps (GPU).

    PYTHONPATH=$PWD python benchmarks/train_parity.py --out DIR      # vpmoe-8l, 50 steps, 1 x 4096
    PYTHONPATH=$PWD python benchmarks/train_parity.py --device cpu --config tiny --seq-len 64 \
        --steps 3 --compile-backend aot_eager --out /tmp/x                          # CPU smoke run

Two runs in one process, one after the other, identical except for ``vpmoe_compile.compile``:

* the model: ``build_stock_gpt(cfg)`` after ``torch.manual_seed(--seed)`` (so the same initial
  weights; checked: per-parameter fingerprints of both runs after transform are compared and
  recorded), ``vpmoe_compile.transform(model, cfg, progress=False)`` (default pipeline), bf16
  parameters on the GPU (fp32 on the CPU);
* the Megatron path as in ``benchmarks/step.py`` (``Float16Module`` + Megatron
  ``DistributedDataParallel``, world size 1, ``vpmoe_compile.build_optimizer(top, cfg)``,
  ``finalize_model_grads`` every step) — ``--path plain`` (the default on the CPU, where
  Megatron's optimizer wrappers need CUDA) uses the bare model, the plain optimizer and the
  router expert-bias update ``finalize_model_grads`` would do;
* the data: the shipped demo corpus (``megatron_base/sample_data/demo.jsonl``) tokenized with
  the project's o200k Harmony tokenizer through the same path ``python -m vpmoe_compile demo``
  uses (``build_demo_dataset`` -> ``.bin/.idx`` -> one token stream + loss mask), cut into
  windows of ``seq_len + 1`` by ``vpmoe_compile.training.TokenBatches`` and cycled; one
  micro-batch per optimizer step; loss = masked mean of the per-token loss (as the demo);
* one step = zero grads, forward, loss, backward, finalize, ``optimizer.step()``.

``--yardstick`` adds a third run: eager from weights with the last bit of 1 % of the elements
flipped (a 1-ulp difference, the size of the rounding changes compilation brings), recording how
far two eager runs drift apart from that alone, and a second verdict: the compiled run's
differences from eager within 2x of that drift (the project's rule for bf16 kernels: within 2x
of a reference's own error).

Recorded: both loss curves, per-step ``|l_c - l_e|`` and ``|l_c - l_e| / l_e``, the maximum
relative difference, step times, and the verdict of the tolerance rule (stated in the JSON and
the plot)::

    max over steps of |l_c - l_e| / l_e            <= 2e-2   and
    |mean over the last 10 steps of (l_c - l_e)|   <= 1e-2 x mean over those steps of l_e

(bf16: the two runs round differently — Inductor fuses and reorders — and the difference grows
as training amplifies it; the rule asks for no drift beyond that). Writes
``train_parity.json`` and ``train_parity.png``; exits 1 when the rule is not met.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: ``--yardstick``: the share of every parameter's elements whose last bit the third run flips.
YARDSTICK_FRACTION = 0.01
MAX_REL_TOL = 2e-2
FINAL_MEAN_REL_TOL = 1e-2
FINAL_WINDOW = 10
RULE = (
    f"max over steps of |l_c - l_e| / l_e <= {MAX_REL_TOL:g}, and |mean over the last {FINAL_WINDOW} steps "
    f"of (l_c - l_e)| <= {FINAL_MEAN_REL_TOL:g} x mean over those steps of l_e "
    "(l_e: eager loss, l_c: compiled loss, same step)"
)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def demo_token_stream(cache_dir=None):
    """Token ids and loss mask of the shipped demo corpus, through the demo's own path."""
    cache = Path(cache_dir or (Path(tempfile.gettempdir()) / "vpmoe_compile_demo_data"))
    try:
        from vpmoe_compile.cli import _demo_tokens
    except ImportError:  # the same steps, should the CLI's helper move
        import numpy as np

        from megatron_base.dataset import build_demo_dataset, open_dataset

        toks, masks = open_dataset(build_demo_dataset(cache))
        tokens = np.concatenate([np.asarray(toks[i]) for i in range(len(toks))])
        mask = np.concatenate([np.asarray(masks[i]) for i in range(len(masks))])
        return tokens.astype(np.int64), mask.astype(np.float32)
    return _demo_tokens(cache)


def fingerprint(model) -> list:
    """Per-parameter (name, sum, sum of squares) in float64: equal lists = same initial weights
    (up to a vanishing chance)."""
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = p.detach().double()
            out.append((name, float(d.sum()), float((d * d).sum())))
    return out


def perturb_last_bit(model, fraction: float, seed: int) -> int:
    """Flip the lowest mantissa bit of a random ``fraction`` of every floating parameter's
    elements (1 ulp: the size of the rounding differences compilation introduces), in place;
    returns the number of elements changed. Own generator: the global RNG is not consumed."""
    g = torch.Generator().manual_seed(seed)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype not in ints:
                continue
            flip = (torch.rand(p.shape, generator=g) < fraction).to(p.device)
            bits = p.data.view(ints[p.dtype])
            bits ^= flip.to(bits.dtype)
            changed += int(flip.sum())
    return changed


def run_mode(mode: str, args, cfg, tokens, mask) -> dict:
    import vpmoe_compile
    from megatron_base import build_stock_gpt
    from vpmoe_compile.training import TokenBatches, update_router_expert_bias

    dev = torch.device(args.device)
    megatron = args.path == "megatron"
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.cuda.reset_peak_memory_stats()
    gpt = build_stock_gpt(cfg, device=dev, params_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                          max_sequence_length=args.seq_len)
    vpmoe_compile.transform(gpt, cfg, progress=False)
    perturbed = perturb_last_bit(gpt, YARDSTICK_FRACTION, args.seed) if mode == "eager_1ulp" else None
    fp = fingerprint(gpt)
    if megatron:
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from vpmoe_compile.training import wrap_megatron

        top = wrap_megatron(gpt)
    else:
        top = gpt
    optimizer = vpmoe_compile.build_optimizer(top, cfg)
    regions = None
    if mode == "compiled":
        regions = vpmoe_compile.compile(top, backend=args.compile_backend, mode=args.compile_mode)
    batches = TokenBatches(tokens, args.micro_batch, args.seq_len, mask, device=dev)
    losses, times = [], []
    for step in range(args.steps):
        batch = next(batches)
        _sync(dev)
        t0 = time.perf_counter()
        if megatron:
            top.zero_grad_buffer()
        optimizer.zero_grad()
        per_tok = top(batch.tokens, batch.position_ids, None, labels=batch.labels)
        loss = (per_tok.float() * batch.loss_mask).sum() / batch.loss_mask.sum().clamp_min(1.0)
        loss.backward()
        if megatron:
            finalize_model_grads([top])
        else:
            update_router_expert_bias(gpt)
        optimizer.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step < 3 or (step + 1) % 10 == 0 or step + 1 == args.steps:
            _log(f"  {mode} step {step + 1}/{args.steps}: loss {losses[-1]:.5f}, {times[-1] * 1e3:.1f} ms")
    out = {
        "mode": mode, "losses": losses, "step_ms": [t * 1e3 for t in times],
        "perturbed_elements": perturbed,
        "first_step_s": times[0],
        "median_step_ms": statistics.median(times[1:] if len(times) > 1 else times) * 1e3,
        "compiled_regions": regions, "passes": list(gpt.vpmoe_transform.passes),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "batches": {"windows_in_corpus": batches.num_windows, "windows_used": batches.cursor},
    }
    del top, optimizer, gpt, batches
    return out, fp


def compare(eager: list, compiled: list) -> dict:
    n = min(len(eager), len(compiled))
    le, lc = eager[:n], compiled[:n]
    abs_diff = [abs(c - e) for e, c in zip(le, lc)]
    rel_diff = [abs(c - e) / abs(e) if e else float("inf") for e, c in zip(le, lc)]
    w = min(FINAL_WINDOW, n)
    final_mean_diff = sum(c - e for e, c in zip(le[-w:], lc[-w:])) / w
    final_mean_eager = sum(le[-w:]) / w
    final_rel = abs(final_mean_diff) / abs(final_mean_eager) if final_mean_eager else float("inf")
    max_rel = max(rel_diff)
    finite = all(x == x and abs(x) != float("inf") for x in le + lc)
    ok = finite and max_rel <= MAX_REL_TOL and final_rel <= FINAL_MEAN_REL_TOL
    return {
        "rule": RULE,
        "max_rel_tol": MAX_REL_TOL, "final_mean_rel_tol": FINAL_MEAN_REL_TOL, "final_window": w,
        "abs_diff": abs_diff, "rel_diff": rel_diff,
        "max_abs_diff": max(abs_diff), "max_rel_diff": max_rel,
        "max_rel_diff_step": rel_diff.index(max_rel) + 1,
        "final_mean_diff": final_mean_diff, "final_mean_rel_diff": final_rel,
        "all_finite": finite,
        "within_bf16_tolerance": bool(ok),
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, le, lc, cmp_ = res["meta"], res["eager"]["losses"], res["compiled"]["losses"], res["comparison"]
    steps = list(range(1, len(le) + 1))
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.plot(steps, le, "-", color="#4c72b0", lw=2.2, label="vpMoE, eager")
    ax.plot(steps, lc, "--", color="#dd8452", lw=1.8, label="vpMoE, compiled")
    ly = (res.get("eager_1ulp") or {}).get("losses")
    if ly:
        ax.plot(steps[: len(ly)], ly, ":", color="#555555", lw=1.6, label="vpMoE, eager from 1-ulp-perturbed weights")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (masked mean over the micro-batch)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.bar(steps, cmp_["abs_diff"], color="#c44e52", alpha=0.35, width=0.8, label="|compiled - eager| (right axis)")
    ax2.set_ylabel("|loss difference|", color="#c44e52")
    ax2.tick_params(axis="y", colors="#c44e52")
    top = max(cmp_["abs_diff"]) if max(cmp_["abs_diff"]) > 0 else 1e-6
    ax2.set_ylim(0, top * 3.0)  # keep the bars in the lower third, under the curves' legend
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=9)
    verdict = "WITHIN" if cmp_["within_bf16_tolerance"] else "OUTSIDE"
    rule = (f"rule: max_t |l_c - l_e| / l_e <= {MAX_REL_TOL:g}  (measured {cmp_['max_rel_diff']:.2e} at step "
            f"{cmp_['max_rel_diff_step']})\n      |mean of last {cmp_['final_window']} (l_c - l_e)| / mean l_e <= "
            f"{FINAL_MEAN_REL_TOL:g}  (measured {cmp_['final_mean_rel_diff']:.2e})  ->  {verdict} tolerance")
    y = res.get("yardstick")
    if y:
        rule += (f"\nyardstick: eager vs eager from 1-ulp-perturbed weights drifts max {y['max_rel_diff']:.2e}, "
                 f"final mean {y['final_mean_rel_diff']:.2e}\n      compiled vs eager within 2x of that  ->  "
                 f"{'WITHIN' if y['compiled_within_2x'] else 'OUTSIDE'}")
    fig.text(0.01, 0.01, rule, fontsize=8.5, family="monospace", va="bottom", ha="left",
             bbox=dict(boxstyle="round", facecolor="white", alpha=0.9, edgecolor="#999999"))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = min(le + lc), max(le + lc)
    pad = (hi - lo) * 0.1 or 0.1
    # curves above the difference bars, legend on top; a loss is never negative
    ax.set_ylim(max(0.0, lo - 3.5 * pad), hi + 2.5 * pad)
    same = cmp_.get("same_initial_weights")
    fig.suptitle(
        f"Training parity, eager vs compiled: config {meta['config']}, {meta['steps']} steps, micro-batch "
        f"{meta['micro_batch']} x {meta['seq_len']} (demo corpus), {meta['path']} path\n"
        f"{meta['device']}, torch {meta['torch']}, compile backend {meta['compile_backend']}; same seed and batches, "
        f"same initial weights: {'yes' if same else 'NO' if same is not None else '?'}",
        fontsize=10.5)
    fig.tight_layout(rect=(0, 0.14 if y else 0.09, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vpmoe-8l")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--path", choices=("auto", "megatron", "plain"), default="auto",
                   help="auto: megatron on CUDA, plain on the CPU")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-cache", default=None, help="where the tokenized demo corpus is cached (default: the demo's)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--yardstick", action="store_true",
                   help="also train eager from weights with the last bit of 1%% of the elements flipped: how far "
                        "two eager runs drift apart from a 1-ulp difference (the size of compilation's rounding "
                        "changes); the compiled run is then also judged against 2x that drift")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNG beside an existing JSON")
    args = p.parse_args(argv)
    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"[parity] wrote {src.with_suffix('.png')}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: benchmarks/train_parity.py needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if args.path == "auto":
        args.path = "megatron" if args.device == "cuda" else "plain"
    if args.path == "megatron" and args.device != "cuda":
        print("error: the Megatron path needs CUDA; use --path plain on the CPU", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from megatron_base import init_process, load_config

    cfg = load_config(args.config)
    init_process(seed=args.seed)
    dev = torch.device(args.device)
    t_run = time.perf_counter()
    tokens, mask = demo_token_stream(args.data_cache)
    _log(f"[parity] {args.device}, config {args.config}, {args.steps} steps of {args.micro_batch} x {args.seq_len}; "
         f"demo corpus {tokens.size:,} tokens ({int(mask.sum()):,} with loss)")
    meta = {
        "config": args.config, "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "path": args.path, "dtype": "bf16 params" if dev.type == "cuda" else "fp32 params",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "compile_backend": args.compile_backend, "compile_mode": args.compile_mode, "seed": args.seed,
        "command": "python benchmarks/train_parity.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": {"corpus": "megatron_base/sample_data/demo.jsonl", "tokenizer": "o200k Harmony (megatron_base)",
                 "path": "vpmoe_compile.cli._demo_tokens (build_demo_dataset + open_dataset) -> vpmoe_compile.training.TokenBatches",
                 "tokens": int(tokens.size), "loss_tokens": int(mask.sum())},
        "loss": "masked mean of the per-token loss of the micro-batch (as the demo)",
    }
    res = {"meta": meta}
    fps = {}
    modes = ("eager", "compiled") + (("eager_1ulp",) if args.yardstick else ())
    for mode in modes:
        _log(f"[parity] {mode}, {time.perf_counter() - t_run:.0f} s into the run")
        try:
            res[mode], fps[mode] = run_mode(mode, args, cfg, tokens, mask)
        except KeyboardInterrupt:  # e.g. the driver's time limit: record and stop
            res[mode] = {"mode": mode, "error": "KeyboardInterrupt (time limit?)"}
            break
        except Exception as exc:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            res[mode] = {"mode": mode, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-4000:]}
            del exc
        gc.collect()
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta["run_wall_s"] = time.perf_counter() - t_run
    for mode in modes:
        res.setdefault(mode, {"mode": mode, "error": "not run (interrupted)"})
    ok = "error" not in res["eager"] and "error" not in res["compiled"]
    if ok:
        res["comparison"] = compare(res["eager"]["losses"], res["compiled"]["losses"])
        res["comparison"]["same_initial_weights"] = fps["eager"] == fps["compiled"]
        res["comparison"]["compiled_speedup_median_step"] = res["eager"]["median_step_ms"] / res["compiled"]["median_step_ms"]
        if args.yardstick and "error" not in res["eager_1ulp"]:
            y = compare(res["eager"]["losses"], res["eager_1ulp"]["losses"])
            c = res["comparison"]
            res["yardstick"] = {
                "what": (f"eager vs eager from weights with the last bit of {YARDSTICK_FRACTION:.0%} of the elements "
                         "flipped; the compiled run is within the yardstick when its max and final-mean relative "
                         "differences from eager are at most 2x the yardstick's (the project's bf16 rule: within 2x "
                         "of a reference's own error)"),
                "initial_weights_differ": fps["eager"] != fps["eager_1ulp"],
                "max_rel_diff": y["max_rel_diff"], "final_mean_rel_diff": y["final_mean_rel_diff"],
                "rel_diff": y["rel_diff"],
                "compiled_within_2x": bool(c["all_finite"] and c["max_rel_diff"] <= 2 * y["max_rel_diff"]
                                           and c["final_mean_rel_diff"] <= 2 * y["final_mean_rel_diff"]),
            }
    else:
        res["comparison"] = {"rule": RULE, "within_bf16_tolerance": None, "error": "a run failed"}
    (out / "train_parity.json").write_text(json.dumps(res, indent=1))
    if ok:
        try:
            plot(res, out / "train_parity.png")
        except Exception:
            traceback.print_exc()
    for mode in ("eager", "compiled"):
        r = res[mode]
        if "error" in r:
            print(f"{mode:>9}: ERROR {r['error']}")
        else:
            print(f"{mode:>9}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, median step {r['median_step_ms']:.1f} ms, "
                  f"first step {r['first_step_s']:.1f} s")
    c = res["comparison"]
    if ok:
        print(f"max |diff| {c['max_abs_diff']:.3e}, max rel diff {c['max_rel_diff']:.3e} (step {c['max_rel_diff_step']}), "
              f"final-{c['final_window']} mean diff {c['final_mean_diff']:+.3e} (rel {c['final_mean_rel_diff']:.3e}); "
              f"same initial weights: {c['same_initial_weights']}")
        print(f"rule: {RULE}\n-> {'WITHIN' if c['within_bf16_tolerance'] else 'OUTSIDE'} tolerance")
        if "yardstick" in res:
            y = res["yardstick"]
            print(f"yardstick (eager vs 1-ulp-perturbed eager): max rel diff {y['max_rel_diff']:.3e}, final-mean rel "
                  f"diff {y['final_mean_rel_diff']:.3e} -> compiled {'WITHIN' if y['compiled_within_2x'] else 'OUTSIDE'} 2x")
    _log(f"[parity] wrote {out / 'train_parity.json'} and {out / 'train_parity.png'} ({meta['run_wall_s']:.0f} s)")
    return 0 if ok and c["within_bf16_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
