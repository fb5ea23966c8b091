"""Training curves as PNGs (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

from edge_tl.plots import pyplot, save

__all__ = ["plot_history"]


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
