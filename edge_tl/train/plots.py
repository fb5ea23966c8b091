"""Training curves as PNGs (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_tl.plots import pyplot, save

__all__ = ["pca_2d", "plot_domains", "plot_history"]


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


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of ``x[N, D]`` (centred, by SVD): ``float[N, 2]``."""
    xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T


def plot_domains(
    panels: list[tuple[str, np.ndarray]],
    domain: np.ndarray,
    labels: np.ndarray | None,
    classes: list[str],
    path: str | Path,
    title: str,
) -> bool:
    """Source vs target embeddings in 2-D (PCA of each panel's points), one panel per
    ``(name, embeddings[N, D])`` (before / after adaptation): colour by ``domain[N]``
    (0 source, 1 target), marker by class (``labels[N]``; -1 or None: unlabelled).
    Returns False without matplotlib."""
    plt = pyplot()
    if plt is None:  # pragma: no cover
        return False
    markers = "o^sDvP*X<>hp"
    colours = ("tab:blue", "tab:orange")
    labels = np.full(len(domain), -1) if labels is None else np.asarray(labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=110)
    for ax, (name, emb) in zip(np.atleast_1d(axes), panels, strict=True):
        z = pca_2d(emb)
        for d, dname in enumerate(("source", "target")):
            for c in np.unique(labels[domain == d]):
                sel = (domain == d) & (labels == c)
                cname = classes[c] if c >= 0 else "unlabelled"
                ax.scatter(
                    z[sel, 0],
                    z[sel, 1],
                    s=14,
                    alpha=0.55,
                    c=colours[d],
                    marker=markers[c % len(markers)] if c >= 0 else ".",
                    label=f"{dname}: {cname}",
                    linewidths=0,
                )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].legend(
        fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=1.5, frameon=False
    )
    save(fig, path, title, integer_x=False)
    return True
