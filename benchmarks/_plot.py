"""Small matplotlib helpers shared by the benchmark plots: plain numbers on log axes, wrapped
tick labels, room above bar labels."""

from __future__ import annotations

import math
import textwrap


def plain_number(v: float) -> str:
    """A tick value as a person writes it: 2, 50, 1,000, 0.05 (never 10^3 or 5e-2)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if abs(v) >= 1 and abs(v - round(v)) < 1e-9 * abs(v):
        return f"{int(round(v)):,}"
    digits = max(0, 2 - int(math.floor(math.log10(abs(v)))))
    return f"{v:,.{digits}f}".rstrip("0").rstrip(".")


def plain_log_axis(axis, base: float = 10, values=None) -> None:
    """Label a log-scaled ``ax.xaxis`` / ``ax.yaxis`` with plain numbers.

    Base 10: major ticks at 1, 2, 5 x 10^k (enough to read a value off an axis spanning less
    than a decade), no minor labels. Base 2: major ticks at the powers of two, or at ``values``
    when given (e.g. the swept chunk sizes).
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    if values is not None:
        axis.set_major_locator(FixedLocator(sorted(set(values))))
    elif base == 10:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        axis.set_major_locator(LogLocator(base=base))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: plain_number(v)))
    axis.set_minor_formatter(NullFormatter())


def wrap(label: str, width: int = 14) -> str:
    """A tick label broken into lines of at most ``width`` characters (at spaces)."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label
