"""A dependency-free progress bar on stderr (the device side has no tqdm)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield ``items`` while drawing ``desc [####----] i/n  elapsed  eta`` on stderr.

    On a terminal the bar redraws in place; in a log (no TTY) it writes a line at every
    quarter. ``EDGE_TL_QUIET=1`` silences it.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    quiet = os.environ.get("EDGE_TL_QUIET") == "1"
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    last, next_quarter, i = 0.0, 1, 0
    for i, item in enumerate(items, 1):
        yield item
        if quiet:
            continue
        now = time.perf_counter()
        if tty and (now - last > 0.25 or i == total):
            last = now
            sys.stderr.write("\r" + _line(desc, i, total, now - start))
        elif not tty and total and i * 4 >= next_quarter * total:
            next_quarter = i * 4 // total + 1
            sys.stderr.write(_line(desc, i, total, now - start) + "\n")
        sys.stderr.flush()
    if not quiet and tty and i:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _line(desc: str, i: int, total: int | None, elapsed: float) -> str:
    if not total:
        return f"{desc:<22} {i}  {elapsed:5.1f}s"
    rate = i / elapsed if elapsed > 0 else 0.0
    filled = int(24 * i / total)
    bar = "#" * filled + "-" * (24 - filled)
    eta = (total - i) / rate if rate else 0.0
    return f"{desc:<22} [{bar}] {i}/{total}  {elapsed:5.1f}s  eta {eta:5.1f}s"


def say(line: str) -> None:
    """One status line on stderr (silenced by ``EDGE_TL_QUIET=1``)."""
    if os.environ.get("EDGE_TL_QUIET") != "1":
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
