"""Help output of ``python -m vpmoe_compile``: plain text and the defaults shown.

Descriptions are often taken from module docstrings, which mark code with reStructuredText
double backticks; :class:`HelpFormatter` prints that markup as plain text, and appends
"(default: X)" to every option whose help does not already say its default.
:class:`ArgumentParser` uses it, and so do its sub-command parsers (``add_subparsers`` builds
them with the parent's class), so a sub-command added with ``sub.add_parser(...)`` gets it too.
:func:`add_config_argument` is the one ``--config`` option of every sub-command that takes one.
"""

from __future__ import annotations

import argparse
import re

__all__ = ["ArgumentParser", "HelpFormatter", "CONFIG_PRESETS", "add_config_argument", "plain_text"]

# megatron_base.config.PRESETS (not imported: it loads megatron.core, and --help should be quick;
# tests/vpmoe_compile/test_cli.py checks that the two agree)
CONFIG_PRESETS = ("tiny", "vpmoe-8l", "vpmoe")

_DOUBLE_BACKTICKS = re.compile(r"``(.+?)``", re.DOTALL)
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`~?([^`]+)`")


def plain_text(text: str | None) -> str | None:
    """``text`` with reStructuredText inline markup removed: ````x```` and ``:func:`x``` -> x."""
    if not text:
        return text
    return _DOUBLE_BACKTICKS.sub(r"\1", _ROLE.sub(r"\1", text))


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, printing reStructuredText markup as plain text and adding
    "(default: X)" to an option's help unless the help already mentions its default, the
    option is required, or the default is ``None`` / ``False`` (an unset option, a flag)."""

    def _format_text(self, text):  # descriptions and epilogs
        return super()._format_text(plain_text(text))

    def _expand_help(self, action):  # each option's and sub-command's help
        return plain_text(super()._expand_help(action))

    def _get_help_string(self, action):
        help_text = action.help or ""
        if (
            "%(default)" in help_text
            or "default" in help_text.lower()
            or not action.option_strings
            or action.required
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return help_text
        return help_text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` as its default formatter."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_config_argument(parser: argparse.ArgumentParser, default: str | None = "tiny") -> argparse.Action:
    """Add the ``--config`` option (a preset name or a TOML path); its help shows the default."""
    return parser.add_argument(
        "--config",
        default=default,
        metavar="NAME|PATH",
        help=f"config preset ({', '.join(CONFIG_PRESETS)}) or path to a TOML file",
    )
