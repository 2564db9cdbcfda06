"""Log records and warnings go through tqdm.write while a progress bar is live."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest
import tqdm.std

from megatron_base.progress import progress_logging


@pytest.fixture()
def tqdm_writes(monkeypatch):
    """Every message tqdm.write prints (tqdm's logging handler calls tqdm.std.tqdm.write)."""
    written = []
    monkeypatch.setattr(tqdm.std.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    return written


def test_warning_and_log_record_go_around_the_bar(tqdm_writes, caplog):
    log = logging.getLogger("vpmoe.test_progress")
    handlers, showwarning = list(logging.root.handlers), warnings.showwarning
    bar_out = io.StringIO()
    with progress_logging(), tqdm.std.tqdm(total=3, file=bar_out) as bar:
        bar.update(1)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a warning during the bar", UserWarning)
        log.warning("a log record during the bar")
        log.info("below the last-resort level")  # not shown, as without the bar
        bar.update(2)
    assert any("a warning during the bar" in m and "UserWarning" in m for m in tqdm_writes)
    assert "a log record during the bar" in tqdm_writes
    assert not any("below the last-resort level" in m for m in tqdm_writes)
    # the warning became a logging record (py.warnings), so file handlers and pytest see it
    assert any(r.name == "py.warnings" and "a warning during the bar" in r.getMessage() for r in caplog.records)
    assert "a warning during the bar" not in bar_out.getvalue()
    # everything restored
    assert logging.root.handlers == handlers and warnings.showwarning is showwarning
    tqdm_writes.clear()
    with pytest.warns(UserWarning, match="after the bar"):
        warnings.warn("after the bar", UserWarning)
    assert tqdm_writes == []


def test_configured_console_handler_keeps_its_format_and_level(tqdm_writes):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    handler.setLevel(logging.ERROR)
    logging.root.addHandler(handler)
    try:
        with progress_logging():
            assert handler not in logging.root.handlers  # replaced while the bar is live
            logging.getLogger("x").warning("under the handler's level")
            logging.getLogger("x").error("shown")
        assert handler in logging.root.handlers
    finally:
        logging.root.removeHandler(handler)
    assert tqdm_writes == ["[ERROR] x: shown"]


def test_outer_capture_warnings_stays_on():
    logging.captureWarnings(True)
    try:
        outer = warnings.showwarning
        with progress_logging():
            pass
        assert warnings.showwarning is outer
    finally:
        logging.captureWarnings(False)


def test_a_second_bar_still_routes_warnings(tqdm_writes):
    """Leaving a bar must undo logging's warning capture fully: the next bar captures again."""
    for i in range(2):
        with progress_logging(), tqdm.std.tqdm(total=1, file=io.StringIO()):
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn(f"warning in bar {i}", UserWarning)
    assert [i for i in range(2) if any(f"warning in bar {i}" in m for m in tqdm_writes)] == [0, 1]
