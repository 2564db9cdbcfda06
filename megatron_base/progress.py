"""Log records and warnings routed around a live tqdm progress bar.

A message written straight to the terminal while a tqdm bar is drawn there lands in the middle
of the bar's line and leaves a stale copy of the bar behind. Inside :func:`progress_logging`
every console log record and every ``warnings.warn`` goes through ``tqdm.write`` instead, which
clears the bar, prints the message on its own line and redraws the bar::

    with progress_logging(), tqdm(total=n, file=sys.stderr) as bar:
        ...   # logger.warning(...) / warnings.warn(...) print above the bar

Used by the dataset builder (:func:`megatron_base.dataset.build_dataset`) and the
``python -m vpmoe_compile demo`` training loop.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

__all__ = ["progress_logging"]


@contextlib.contextmanager
def progress_logging() -> Iterator[None]:
    """Route console logging and warnings through ``tqdm.write`` for the duration.

    * The root logger's console handlers (stream stdout / stderr) are replaced by one that
      writes through ``tqdm.write`` with their format, stream, filters and level
      (``tqdm.contrib.logging.logging_redirect_tqdm``); other handlers (files, pytest's
      capture) are left alone. With no handler configured, the replacement mirrors Python's
      last-resort handler (WARNING and above, bare message, stderr).
    * ``warnings.warn`` goes to the ``py.warnings`` logger (``logging.captureWarnings``), and
      from there through the same handler; the warning filters still decide what is shown.

    Everything is restored on exit (handlers, and ``warnings.showwarning`` as it was, so an
    outer ``logging.captureWarnings(True)`` stays in force).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    before = list(root.handlers)
    consoles = [h for h in before if _is_console(h)]
    saved_showwarning = warnings.showwarning
    with logging_redirect_tqdm():
        level = consoles[0].level if consoles else (logging.lastResort.level if logging.lastResort else logging.WARNING)
        for handler in root.handlers:
            if handler not in before:
                handler.setLevel(level)
        logging.captureWarnings(True)
        turned_on = warnings.showwarning is not saved_showwarning  # else an outer capture was on
        try:
            yield
        finally:
            if turned_on:
                # undo our captureWarnings(True) through logging itself: restoring showwarning
                # alone would leave logging believing it still captures, and the next
                # captureWarnings(True) (the next bar) would then do nothing
                logging.captureWarnings(False)
            warnings.showwarning = saved_showwarning


def _is_console(handler: logging.Handler) -> bool:
    import sys

    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
