"""The console: a dependency-free progress bar on stderr (the device side has no tqdm),
and how edge_tl's log lines look there.

Library modules report through :mod:`logging` (``edge_tl.*`` loggers); the command line
decides what a user reads by calling :func:`log_to_stderr`. ``EDGE_TL_QUIET=1`` silences
the bars and the status lines (warnings still show).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["log_to_stderr", "logging_to_stderr", "progress", "quiet", "step"]

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield ``items`` while drawing ``desc [####----] i/n  elapsed  eta`` on stderr.

    On a terminal the bar redraws in place; in a log (no TTY) it writes a line at every
    quarter. ``EDGE_TL_QUIET=1`` silences it.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    silent = quiet()
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    last, next_quarter, i = 0.0, 1, 0
    for i, item in enumerate(items, 1):
        yield item
        if silent:
            continue
        now = time.perf_counter()
        if tty and (now - last > 0.25 or i == total):
            last = now
            sys.stderr.write("\r" + _line(desc, i, total, now - start))
        elif not tty and total and i * 4 >= next_quarter * total:
            next_quarter = i * 4 // total + 1
            sys.stderr.write(_line(desc, i, total, now - start) + "\n")
        sys.stderr.flush()
    if not silent and tty and i:
        sys.stderr.write("\n")
        sys.stderr.flush()


@contextmanager
def step(desc: str, every: float = 1.0) -> Iterator[None]:
    """A bar for one long call that reports no progress of its own (an ONNX export, a
    quantization): ``desc [working] 12.0s`` redrawn every ``every`` seconds on a terminal,
    one line with the time taken when done. ``EDGE_TL_QUIET=1`` silences it.

    Example:
        >>> with step("exporting to ONNX"):  # doctest: +SKIP
        ...     export()
    """
    if quiet():
        yield
        return
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            sys.stderr.write(f"\r{desc:<22} [working] {time.perf_counter() - start:5.1f}s")
            sys.stderr.flush()

    ticker = threading.Thread(target=tick, daemon=True) if tty else None
    if ticker is not None:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
        elapsed = time.perf_counter() - start
        sys.stderr.write(("\r" if tty else "") + f"{desc:<22} [done] {elapsed:5.1f}s\n")
        sys.stderr.flush()


def _line(desc: str, i: int, total: int | None, elapsed: float) -> str:
    if not total:
        return f"{desc:<22} {i}  {elapsed:5.1f}s"
    rate = i / elapsed if elapsed > 0 else 0.0
    filled = int(24 * i / total)
    bar = "#" * filled + "-" * (24 - filled)
    eta = (total - i) / rate if rate else 0.0
    return f"{desc:<22} [{bar}] {i}/{total}  {elapsed:5.1f}s  eta {eta:5.1f}s"


def quiet() -> bool:
    """True when ``EDGE_TL_QUIET=1``: no bars, no status lines."""
    return os.environ.get("EDGE_TL_QUIET") == "1"


class _Console(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"warning: {msg}"


def log_to_stderr() -> None:
    """Show edge_tl's status lines (INFO, unless :func:`quiet`) and warnings
    (``warning: ...``) on stderr, one line each. Idempotent."""
    log = logging.getLogger("edge_tl")
    if not logging_to_stderr():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Console())
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet() else logging.INFO)
    log.propagate = False


def logging_to_stderr() -> bool:
    """Whether :func:`log_to_stderr` is in force in this process (a child process started
    for a long job, e.g. one strategy of ``compare``, calls it again when so)."""
    return any(isinstance(h.formatter, _Console) for h in logging.getLogger("edge_tl").handlers)
