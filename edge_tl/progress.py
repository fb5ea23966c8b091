"""A dependency-free progress bar on stderr (the device side has no tqdm)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield ``items`` while drawing ``desc [####----] i/n  elapsed`` on stderr.

    Silent when ``EDGE_TL_QUIET=1`` or stderr is not a terminal and CI is set.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    quiet = os.environ.get("EDGE_TL_QUIET") == "1"
    start = time.perf_counter()
    last = 0.0
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if not quiet and (now - last > 0.25 or i == total):
            last = now
            _draw(desc, i, total, now - start)
    if not quiet and i:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _draw(desc: str, i: int, total: int | None, elapsed: float) -> None:
    rate = i / elapsed if elapsed > 0 else 0.0
    if total:
        filled = int(24 * i / total)
        bar = "#" * filled + "-" * (24 - filled)
        eta = (total - i) / rate if rate else 0.0
        line = f"\r{desc:<22} [{bar}] {i}/{total}  {elapsed:5.1f}s  eta {eta:5.1f}s"
    else:
        line = f"\r{desc:<22} {i}  {elapsed:5.1f}s"
    sys.stderr.write(line)
    sys.stderr.flush()
