"""Training curves as PNGs (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the train extra
        return None
    return plt


def save(fig, path: str | Path, title: str) -> None:
    """Integer epochs on every x axis, a title, tight layout; written and closed."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def plot_history(history: list[dict], path: str | Path, title: str) -> bool:
    """Loss and accuracy per epoch (train and validation), with the epoch whose weights were
    kept (best validation accuracy) marked. Returns False without matplotlib."""
    plt = pyplot()
    if plt is None:  # pragma: no cover
        return False
    epochs = [r["epoch"] for r in history]
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.axvline(best, color="grey", ls="--", lw=1, label=f"kept: epoch {best}")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(top=1.0)
    save(fig, path, title)
    return True
