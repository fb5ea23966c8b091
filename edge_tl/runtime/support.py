"""What a head learns from on the device: labelled support data, and unlabelled target images
for an alignment, each checked and embedded by the bundle.

Torch-free. The :class:`~edge_tl.runtime.classifier.Classifier` learns from
:func:`embed_support` (``learn``, ``add``) and aligns with :func:`target_alignment`
(``adapt``); the head arithmetic is :mod:`edge_tl.runtime.learner`'s, the alignment
:mod:`edge_tl.runtime.align`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_tl.data import Dataset, image_folder, is_named_image_set
from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED, Skipped
from edge_tl.runtime import align as alignment
from edge_tl.runtime.head_state import HeadState
from edge_tl.runtime.preprocess import ImageLike
from edge_tl.runtime.text import check_texts
from edge_tl.spec import TaskEntry

if TYPE_CHECKING:
    from edge_tl.runtime.model import Model

__all__ = [
    "SupportLike",
    "check_adapt",
    "embed_support",
    "noting",
    "target_alignment",
    "task_images",
]

SupportLike = str | Path | Dataset | dict[str, list[ImageLike]] | dict[str, list[str]]
"""Support images: an ImageFolder path, a Dataset, or ``{class name: [images]}``; on a
text bundle, text data (:func:`edge_tl.texts.open_text_dataset`) or ``{class name: [texts]}``."""


def task_images(task: TaskEntry | None, data: str | Path, skip_bad: bool = False) -> Dataset:
    """Support images: an ImageFolder of the head's classes; for a ``task`` head also the
    task's labels from a multi-task source (elpv, a labels .csv)."""
    if task is not None and (is_named_image_set(data) or str(data).lower().endswith(".csv")):
        from edge_tl.multitask import open_tasks

        return open_tasks(data, [task.name], skip_bad)
    return image_folder(data, skip_bad=skip_bad)


def embed_support(
    model: Model,
    data: SupportLike,
    task: TaskEntry | None = None,
    skip_bad: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[np.ndarray, list[str], tuple[Skipped, ...]]:
    """``(embeddings[N, D], class name per row, files skipped)`` of support ``data`` for a
    head of ``model`` (``task``: a multi-task bundle's task head).

    Raises:
        EdgeTLError: a class without examples, input of the other modality, or what
            reading the data raises.
    """
    unit = "text" if model.modality == "text" else "image"
    desc = f"embedding support {unit}s"
    if isinstance(data, dict):
        empty = [n for n, imgs in data.items() if not imgs]
        if empty:
            raise EdgeTLError(f"class {empty[0]!r} has no {unit}s; add {unit}s or drop it")
        if unit == "text":
            for name, texts in data.items():
                if any(not isinstance(t, str) for t in texts):
                    raise model.wrong_input(f"class {name!r} holds an image, not a text")
                check_texts(texts, f"text of class {name!r}")
        names = [n for n, imgs in data.items() for _ in imgs]
        paths = [p for imgs in data.values() for p in imgs]
        return model.embed(paths, desc=desc), names, ()
    ds = model.open_data(data, skip_bad, text_column, label_column, partial(task_images, task))
    x = model.embed(ds.paths, desc=desc)
    return x, [ds.classes[i] for i in ds.labels], ds.skipped


def noting(state: HeadState, skipped: Sequence[Skipped]) -> HeadState:
    """``state`` with the files skipped under ``--skip-bad`` in its metadata (kept in the
    version file and shown in its summary)."""
    if not skipped:
        return state
    return replace(state, meta={**state.meta, SKIPPED: [s.to_dict() for s in skipped]})


def check_adapt(model: Model, method: str, reg: float) -> None:
    """Refuse an alignment before any work: a text bundle, an unknown ``method``, a bad
    ``reg``.

    Raises:
        EdgeTLError: naming the problem and what to do instead.
    """
    if model.modality == "text":
        raise EdgeTLError(
            f"bundle {model.path} is a text model ({model.manifest.backbone}); adapt "
            "aligns image embeddings to a new camera or line"
        )
    if method not in alignment.METHODS:
        raise EdgeTLError(f"--method must be one of {', '.join(alignment.METHODS)}, not {method!r}")
    if method == "coral" and not (np.isfinite(reg) and reg > 0):
        raise EdgeTLError(f"--reg must be a number > 0, not {reg}")


def target_alignment(
    model: Model,
    target: alignment.TargetLike,
    method: str,
    reg: float,
    skip_bad: bool = False,
) -> alignment.Alignment:
    """The alignment of ``model``'s embeddings to unlabelled ``target`` images by ``method``
    (checked first by :func:`check_adapt`).

    Raises:
        EdgeTLError: target images missing or too few
            (:data:`~edge_tl.runtime.align.MIN_TARGET`), or, for ``coral``, a bundle
            exported without source statistics.
    """
    source = _source_stats(model) if method == "coral" else None
    paths = alignment.target_images(target, skip_bad)
    need = alignment.MIN_TARGET[method]
    if len(paths) < need:
        raise EdgeTLError(
            f"{method} needs at least {need} target images, {_name(target)} has "
            f"{len(paths)}; "
            "add unlabelled images from the new camera or line"
        )
    x = model.embed(paths, desc="embedding target images")
    return alignment.fit_alignment(method, x, source, reg)


def _source_stats(model: Model) -> alignment.Moments:
    """The export's source statistics (``source_stats.npz``, hashed in the manifest).

    Raises:
        EdgeTLError: the bundle has none (exported before they were written, or from a
            backbone without a training run).
    """
    path = model.path
    if alignment.SOURCE_STATS not in model.manifest.files:
        raise EdgeTLError(
            f"bundle {path} has no source statistics ({alignment.SOURCE_STATS}: exported "
            "by an older edge_tl, or from a backbone without a run) that coral aligns to; "
            "re-export it from its run with `edge-tl export RUN`, or use --method center"
        )
    return alignment.read_source_stats(path / alignment.SOURCE_STATS)


def _name(target: alignment.TargetLike) -> str:
    if isinstance(target, (str, Path)):
        return str(target)
    return target.name if isinstance(target, Dataset) else "the list"
