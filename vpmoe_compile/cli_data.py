"""``build-dataset`` sub-command of ``python -m vpmoe_compile``.

``vpmoe_compile/cli.py`` registers it with :func:`add_build_dataset_parser`::

    sub = parser.add_subparsers(dest="command")
    add_build_dataset_parser(sub)
    args = parser.parse_args()
    sys.exit(args.func(args))

Usage::

    python -m vpmoe_compile build-dataset --input data.jsonl --output out/data [--workers N]
        [--strict] [--force] [--auto-drop-analysis] [--mask-policy generated|assistant]
        [--no-progress]

Each JSONL line is ``{"text": ...}`` or a Harmony conversation ``{"messages": [...]}``; see
:mod:`megatron_base.dataset` for the outputs (``PREFIX.bin/.idx``,
``PREFIX_loss_mask.bin/.idx``, ``PREFIX.manifest.json``). Existing outputs of the prefix are
replaced only with ``--force``; an input without any document (empty, not UTF-8, ...) is an
error (exit status 1, the reason on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["add_build_dataset_parser", "run_build_dataset", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _input_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"input file {text!r} does not exist")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"input {text!r} is not a regular file")
    return text


def _output_prefix(text: str) -> str:
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(
            f"--output takes a file prefix such as out/mydata (got {text!r}, a directory)"
        )
    if text.endswith((".bin", ".idx")):
        raise argparse.ArgumentTypeError(
            f"--output takes the prefix without .bin/.idx (got {text!r})"
        )
    return text


def add_build_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``build-dataset`` on an ``argparse`` subparsers object; sets ``func``.

    Returns:
        The sub-command's parser.
    """
    p = subparsers.add_parser(
        "build-dataset",
        help="tokenize JSONL (text documents / Harmony conversations) into Megatron .bin/.idx",
        description=(
            "Turn a JSONL file (one {\"text\": ...} document or one Harmony conversation "
            "{\"messages\": [...]} per line) into Megatron .bin/.idx token and loss-mask "
            "datasets plus a manifest, with the o200k Harmony tokenizer. Output is "
            "byte-identical for any number of workers."
        ),
    )
    p.add_argument("--input", required=True, type=_input_file, metavar="FILE.jsonl",
                   help="input JSONL file")
    p.add_argument("--output", required=True, type=_output_prefix, metavar="PREFIX",
                   help="output prefix: writes PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, "
                        "PREFIX.manifest.json")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="parallel workers (default: all cores)")
    p.add_argument("--executor", choices=("threads", "processes"), default="threads",
                   help="'threads' (default): one process, text encodes in parallel while another thread "
                        "parses; 'processes': a process pool, also renders Harmony conversations in parallel "
                        "(better for conversation-heavy input)")
    p.add_argument("--strict", action="store_true",
                   help="abort on the first bad line (default: report it and skip it)")
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs of PREFIX (default: refuse)")
    p.add_argument("--auto-drop-analysis", action="store_true",
                   help="drop analysis messages before the first final message, as "
                        "openai-harmony's default does (default: keep the chain of thought)")
    p.add_argument("--mask-policy", choices=("generated", "assistant"), default="generated",
                   help="'generated' (default): assistant tokens except the prompt-supplied "
                        "<|start|>assistant of a turn; 'assistant': every assistant token")
    p.add_argument("--cross-check-rate", type=_rate, default=0.001, metavar="F",
                   help="fraction of conversations also rendered by openai-harmony and "
                        "compared, a mismatch aborts (default 0.001)")
    p.add_argument("--vocab", default=None, metavar="PATH",
                   help="o200k_base.tiktoken(.gz) to use instead of the vendored copy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_build_dataset)
    return p


def run_build_dataset(args: argparse.Namespace) -> int:
    """Run the build for parsed arguments; returns the process exit code."""
    from megatron_base.dataset import DatasetBuildConfig, DatasetBuildError, build_dataset
    from megatron_base.harmony import HarmonyRenderConfig
    from megatron_base.tokenizer import VocabFileError

    try:
        cfg = DatasetBuildConfig(
            input_path=args.input,
            output_prefix=args.output,
            workers=args.workers,
            executor=args.executor,
            strict=args.strict,
            render=HarmonyRenderConfig(
                auto_drop_analysis=args.auto_drop_analysis,
                mask_policy=args.mask_policy,
                cross_check_rate=args.cross_check_rate,
            ),
            vocab_path=args.vocab,
            progress=not args.no_progress,
            force=args.force,
        )
        result = build_dataset(cfg)
    except (DatasetBuildError, VocabFileError, ValueError, OSError) as exc:
        print(f"build-dataset: error: {exc}", file=sys.stderr)
        return 1
    c = result.manifest["counts"]
    print(
        f"build-dataset: wrote {result.prefix}.bin/.idx, {result.prefix}_loss_mask.bin/.idx "
        f"and {result.manifest_path}: {c['documents']} documents ({c['text_documents']} text, "
        f"{c['conversations']} conversations), {c['tokens']} tokens, {c['trained_tokens']} "
        f"trained, {c['bad_lines']} bad lines skipped; {result.mb_per_s:.2f} MB/s"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m vpmoe_compile.cli_data build-dataset ...``)."""
    from vpmoe_compile.cli_format import ArgumentParser

    parser = ArgumentParser(prog="python -m vpmoe_compile.cli_data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_dataset_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
