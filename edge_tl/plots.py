"""Figures as PNG files: matplotlib on the Agg backend (no display), optional everywhere.

Torch-free. The training curves, the comparison curves and the fidelity report draw
through these two helpers; without matplotlib (a device install) nothing is drawn and the
JSON / Markdown beside each figure still say everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the train and dev extras
        return None
    return plt


def save(
    fig: Any,
    path: str | Path,
    title: str,
    integer_x: bool = True,
    dpi: float | None = None,
    fontsize: float | None = None,
) -> None:
    """A title, tight layout, integer ticks on every x axis (epochs) unless ``integer_x`` is
    off; written to ``path`` (at the figure's dpi unless ``dpi``) and closed."""
    from matplotlib.ticker import MaxNLocator

    if integer_x:
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi if dpi is not None else "figure")
    pyplot().close(fig)
