"""The heads of a multi-task bundle: one per task, on the one shared artifact.

Each task's head is refit on the chosen artifact's own embeddings of the run's training
and validation images (``--head-fit artifact``, as the single head is: an INT8 artifact's
embeddings differ from FP32 ones), or is the run's own head (``--head-fit source``). Each
lands in ``tasks/<task>/head.npz`` with its exemplars (``tasks/<task>/exemplars.npz``: up to
20 training images per class, artifact embeddings), so the device learns each task on its
own (:mod:`edge_tl.runtime.classifier`, ``edge-tl learn --task``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.export.fidelity import HeadFit, Images, embed, engine_runner
from edge_tl.export.source import ExportSource
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.learner import write_exemplars
from edge_tl.spec import HeadEntry, TaskEntry

__all__ = ["TASKS_DIR", "write_task_heads"]

TASKS_DIR = "tasks"
EXEMPLARS_PER_CLASS = 20


def write_task_heads(
    bdir: Path, src: ExportSource, engine: Any, check: Images, check_emb: np.ndarray, fit: HeadFit
) -> tuple[list[TaskEntry], dict[str, Any]]:
    """Write every task's head (and exemplars) into ``bdir/tasks/<task>/``.

    Args:
        engine: the chosen artifact's engine.
        check: the held-out check images (joint labels) and ``check_emb`` their artifact
            embeddings ``float32[N, D]``.
        fit: the bundle's head fit; with images, each task's head is refit on ``engine``'s
            embeddings of them.

    Returns:
        The manifest's task entries and per-task metrics (held-out accuracy on the
        artifact, and the run's PyTorch accuracy when known).
    """
    assert src.task_heads is not None and src.task_labels is not None
    table = _table(src)
    emb = None
    if fit.images is not None and table is not None:
        emb = embed(engine_runner(engine), fit.images, desc="embedding training split (tasks)")
    entries, metrics = [], {}
    for t, (name, labels) in enumerate(src.task_labels.items()):
        folder = bdir / TASKS_DIR / name
        folder.mkdir(parents=True)
        rel = f"{TASKS_DIR}/{name}"
        if emb is not None:
            y = table[np.asarray(fit.images.labels), t]
            head = LinearHead.fit(emb, y, len(labels), l2=src.task_heads[name].l2 or None)
            write_exemplars(folder / "exemplars.npz", *_exemplars(emb, y))
            entry = HeadEntry("linear", f"{rel}/head.npz", "artifact", f"{rel}/exemplars.npz")
        else:
            head = src.task_heads[name]
            entry = HeadEntry("linear", f"{rel}/head.npz", "source")
        head.save(folder / "head.npz")
        entries.append(TaskEntry(name, list(labels), entry))
        m: dict[str, Any] = {}
        if check.labels is not None and table is not None:
            truth = table[np.asarray(check.labels), t]
            m["test_accuracy"] = float((head.predict_proba(check_emb).argmax(1) == truth).mean())
            m["test_n"] = int(len(truth))
        metrics[name] = m
    return entries, metrics


def _table(src: ExportSource) -> np.ndarray | None:
    """Joint class -> class of each task, from the run's data (None when it is unreadable:
    then there are no labelled images to use it on either)."""
    for ds in (src.fit_set, src.held_out):
        if ds is not None and ds.tasks is not None:
            return ds.tasks.table
    return None


def _exemplars(emb: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[:EXEMPLARS_PER_CLASS] for c in np.unique(y)]
        )
    )
    return emb[idx], y[idx]
