"""Command line: ``python -m vpmoe_compile {demo,dump,params,build-dataset} ...``.

* ``demo``   build the stock model (GPU if present, else CPU), transform it (printing the pass
             summary and the dump location), then train N steps eager and N steps under
             ``torch.compile`` on the shipped demo corpus; prints loss and median step time.
* ``dump``   write the debug dump of a config's transform, no code needed.
* ``params`` total / active parameter counts of a config, stock and transformed (meta device).
* ``build-dataset``  JSONL -> Megatron ``.bin/.idx`` with the o200k Harmony tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import List, Optional


class CLIError(Exception):
    """A bad argument; printed as ``error: ...`` with exit status 2."""


def _quiet_imports() -> None:
    # Megatron warns loudly about missing TE/Apex at import; the CLI says so once itself.
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # megatron-core 0.16.1's torch_dist loader calls torch.distributed.checkpoint's deprecated
    # load_state_dict on every checkpoint load (train --load, the demo's resume)
    warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated.*", category=FutureWarning)


def _load_cfg(name: str):
    from megatron_base.config import ConfigError, load_config

    try:
        return load_config(name)
    except ConfigError as exc:
        raise CLIError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------


def cmd_params(args) -> int:
    import torch

    import vpmoe_compile
    from megatron_base import build_stock_gpt, count_parameters, init_process

    cfg = _load_cfg(args.config)
    init_process()
    model = build_stock_gpt(cfg, device="meta")
    sc = count_parameters(model).as_dict()
    vpmoe_compile.transform(model, cfg, verify="params", progress=False)
    tc = count_parameters(model).as_dict()
    out = {"config": cfg.source, "stock": sc, "transformed": tc}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"parameter counts for config {cfg.source!r} (meta device, nothing allocated)")
    print(f"{'':28}{'stock GPTModel':>18}{'after transform':>18}")
    for key in ("total", "active", "embedding_and_output", "routed_experts", "routed_experts_active", "total_no_embedding", "active_no_embedding"):
        print(f"{key:28}{sc[key]:>18,}{tc[key]:>18,}")
    return 0


# --------------------------------------------------------------------------------------------
# dump
# --------------------------------------------------------------------------------------------


def _check_writable_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output path that cannot be written as a file."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {p} is a directory; give a file name")
    if not p.parent.is_dir():
        raise CLIError(f"{flag} {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise CLIError(f"{flag} {p}: the folder {p.parent} is not writable")


def cmd_dump(args) -> int:
    import vpmoe_compile
    from megatron_base import build_stock_gpt, init_process

    from vpmoe_compile.dump import check_dump_dir

    cfg = _load_cfg(args.config)
    out = check_dump_dir(args.out)  # a file, or a folder of someone else's, is refused here
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CLIError(f"--out {out} holds an earlier dump; pass --force to replace it")
    init_process()
    device = args.device or ("meta" if cfg.model.num_layers > 8 else None)
    model = build_stock_gpt(cfg, device=device)
    vpmoe_compile.transform(model, cfg, dump_dir=out, progress=True)
    print(model.vpmoe_transform.summary())
    return 0


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _demo_tokens(cache_dir: Path):
    """Token ids and loss mask of the shipped demo corpus (built once, cached by input hash)."""
    import numpy as np

    from megatron_base.dataset import build_demo_dataset, open_dataset

    prefix = build_demo_dataset(cache_dir)
    toks, masks = open_dataset(prefix)  # Megatron IndexedDatasets, documents end with EOD
    tokens = np.concatenate([np.asarray(toks[i]) for i in range(len(toks))])
    mask = np.concatenate([np.asarray(masks[i]) for i in range(len(masks))])
    return tokens.astype(np.int64), mask.astype(np.float32)


def cmd_demo(args) -> int:
    """A preset over ``train``: the shipped corpus (built into Megatron ``.bin/.idx`` and read
    through ``GPTDataset``), eager for --steps steps with a checkpoint, then the same model
    resumed from that checkpoint under ``vpmoe_compile.compile`` for --steps more."""
    import shutil

    import torch

    from megatron_base.dataset import build_demo_dataset
    from vpmoe_compile.checkpoint import CheckpointError
    from vpmoe_compile.train import TrainArgs, TrainError, train

    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.json_out:
        _check_writable_file(args.json_out, "--json-out")
    if args.dump_dir is not None:
        from vpmoe_compile.dump import check_dump_dir

        check_dump_dir(args.dump_dir)
    if args.seq_len < 2 or args.batch_size < 1:
        raise CLIError("--seq-len must be >= 2 and --batch-size >= 1")
    cfg = _load_cfg(args.config)
    if args.seq_len > cfg.attention.max_sequence_length:
        raise CLIError(
            f"--seq-len {args.seq_len} exceeds [attention] max_sequence_length "
            f"{cfg.attention.max_sequence_length} of config {cfg.source!r}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda given but no CUDA device is available")
    if args.device == "cpu" and torch.cuda.is_available():
        raise CLIError(
            "--device cpu with a visible GPU: stock megatron-core 0.16.1 hardcodes CUDA inside "
            "forward; run with CUDA_VISIBLE_DEVICES='' for a CPU demo"
        )
    on_gpu = torch.cuda.is_available()
    print(f"[demo] config {cfg.source!r} on {'cuda' if on_gpu else 'cpu'} "
          f"({torch.cuda.get_device_name() if on_gpu else 'CPU'})")
    cache = Path(args.data_cache or (Path(tempfile.gettempdir()) / "vpmoe_compile_demo_data"))
    prefix = build_demo_dataset(cache)
    print(f"[demo] demo corpus: {prefix}.bin/.idx (o200k Harmony, loss masks beside it), read through GPTDataset")
    ckpt = tempfile.mkdtemp(prefix="vpmoe_demo_ckpt_")
    base = TrainArgs(
        config=args.config, data=[prefix], micro_batch=args.batch_size, global_batch=args.batch_size,
        seq_len=args.seq_len, steps=args.steps, lr_decay_steps=2 * args.steps, seed=args.seed,
        device=args.device or "auto", data_cache=str(cache / ".gpt_dataset_cache"), dump_dir=args.dump_dir,
        progress=sys.stderr.isatty(),
    )
    phases = [("eager", base.__class__(**{**vars(base), "save": ckpt}))]
    if not args.no_compile:
        phases.append(("compiled", base.__class__(**{
            **vars(base), "steps": 2 * args.steps, "load": ckpt, "dump_dir": None, "compile": True,
            "compile_backend": args.compile_backend})))
    results = {}
    try:
        for mode, targs in phases:
            if mode == "compiled":
                print(f"[demo] resuming the eager-trained model from its checkpoint under vpmoe_compile.compile "
                      f"(backend={args.compile_backend}, each transformer layer one graph); the first step compiles")
            try:
                run = train(targs)
            except (TrainError, CheckpointError) as exc:
                raise CLIError(str(exc)) from None
            if mode == "eager":
                print(run["model"].module.vpmoe_transform.summary() if hasattr(run["model"], "module")
                      else run["model"].vpmoe_transform.summary())
                if args.dump_dir is not None:
                    print(f"[demo] debug dump written to {Path(args.dump_dir).resolve()}/index.md")
            recs = run["records"]
            times = [r["step_s"] for r in recs]
            steady = times[1:] if len(times) > 1 else times
            results[mode] = {
                "first_step": recs[0]["step"],
                "last_step": recs[-1]["step"],
                "first_loss": recs[0]["loss"],
                "last_loss": recs[-1]["loss"],
                "median_step_s": statistics.median(steady),
                "first_step_s": times[0],
            }
            print(f"[demo] {mode:>8}: loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}; median step "
                  f"{statistics.median(steady) * 1e3:.1f} ms (first step {times[0]:.2f} s)")
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # the demo's own temporary checkpoint
    if "compiled" in results:
        ratio = results["eager"]["median_step_s"] / results["compiled"]["median_step_s"]
        print(f"[demo] compiled / eager speed-up: {ratio:.2f}x (median step time, this machine)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from vpmoe_compile.cli_format import ArgumentParser, add_config_argument

    # cli_format.ArgumentParser's help formatter prints reStructuredText markup as plain text and
    # shows every option's default; sub-command parsers (sub.add_parser) inherit it.
    p = ArgumentParser(
        prog="python -m vpmoe_compile",
        description="vpmoe-compile: transform a stock Megatron-Core GPT model into vpMoE, and the "
        "tools around it. Run python -m vpmoe_compile COMMAND --help for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    about = "build, transform, and train eager vs compiled on the demo corpus"
    d = sub.add_parser("demo", help=about, description=(
        "Build the stock model of a config (GPU if present, else CPU), transform it (printing the "
        "pass summary and where the debug dump went), then train --steps steps eager and --steps "
        "steps under torch.compile on the shipped demo corpus; prints the loss and the median "
        "step time."))
    add_config_argument(d, default="tiny")
    d.add_argument("--steps", type=int, default=20, help="steps per mode")
    d.add_argument("--batch-size", type=int, default=2, help="micro-batch size")
    d.add_argument("--seq-len", type=int, default=64, help="sequence length")
    d.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    d.add_argument("--dump-dir", default="vpmoe-demo-dump", help="where the debug dump goes")
    d.add_argument("--data-cache", default=None,
                   help="where the tokenized demo corpus is cached (default: a folder in the system temp dir)")
    d.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    d.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    d.add_argument("--seed", type=int, default=1234, help="random seed for weight initialisation")
    d.add_argument("--json-out", default=None, help="also write the results as JSON")
    d.set_defaults(func=cmd_demo)

    about = "write the debug dump of a config's transform"
    u = sub.add_parser("dump", help=about, description=f"{about[0].upper()}{about[1:]} (no code needed).")
    add_config_argument(u, default="tiny")
    u.add_argument("--out", required=True, help="output directory")
    u.add_argument("--device", choices=("cpu", "cuda", "meta"), default=None,
                   help="default: meta for configs over 8 layers (no graphs), else cpu/cuda")
    u.add_argument("--force", action="store_true", help="write into a non-empty directory")
    u.set_defaults(func=cmd_dump)

    about = "total / active parameter counts (stock and transformed)"
    q = sub.add_parser("params", help=about, description=(
        f"{about[0].upper()}{about[1:]} of a config, counted on the meta device (nothing allocated)."))
    add_config_argument(q, default="vpmoe")
    q.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    q.set_defaults(func=cmd_params)

    try:
        from vpmoe_compile.cli_data import add_build_dataset_parser
    except ImportError:  # pragma: no cover - tokenizer not installed
        add_build_dataset_parser = None
    if add_build_dataset_parser is not None:
        add_build_dataset_parser(sub)
    from vpmoe_compile.cli_train import add_train_parser

    add_train_parser(sub)
    from vpmoe_compile.cli_plan import add_plan_parser

    add_plan_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    _quiet_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    from vpmoe_compile.checkpoint import CheckpointError
    from vpmoe_compile.dump import DumpDirError
    from vpmoe_compile.plan import PlanError
    from vpmoe_compile.train import TrainError

    try:
        return int(args.func(args) or 0)
    except (CLIError, DumpDirError, TrainError, CheckpointError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
