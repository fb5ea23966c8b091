"""Which face answers a bundle: predictions and evaluations routed to the head, the
multi-task heads or the anomaly bank, with the flags each face refuses.

Torch-free. :meth:`Model.predict <edge_tl.runtime.model.Model.predict>` and
:meth:`Model.evaluate <edge_tl.runtime.model.Model.evaluate>` are these functions; the
faces themselves are :mod:`edge_tl.runtime.classifier` and :mod:`edge_tl.runtime.detector`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_tl.data import Dataset, fingerprint, open_dataset
from edge_tl.data import split as split_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import entries
from edge_tl.runtime.preprocess import ImageLike
from edge_tl.runtime.results import (
    AnomalyEvaluation,
    Evaluation,
    Prediction,
    TaskEvaluation,
    TaskPrediction,
    Verdict,
)

if TYPE_CHECKING:
    from edge_tl.runtime.model import Model, Task

__all__ = ["SPLIT_CHOICES", "evaluate", "predict", "predict_tasks"]

SPLIT_CHOICES = ("all", "train", "val", "test")


def predict(
    model: Model,
    images: Sequence[ImageLike],
    top_k: int = 1,
    task: Task | None = None,
    maps_dir: str | Path | None = None,
    class_threshold: Mapping[str, float] | None = None,
) -> list[Prediction] | list[Verdict] | list[TaskPrediction]:
    """``model``'s answers for ``images`` by the face it is set up for (see
    :meth:`Model.predict <edge_tl.runtime.model.Model.predict>`)."""
    if class_threshold and ((task or model.task) == "anomaly" or model.tasks):
        raise EdgeTLError(
            "--class-threshold is for a classifier with one task"
            + ("" if model.tasks else "; add --classify to use this bundle's head")
        )
    if (task or model.task) == "anomaly":
        if top_k != 1:
            raise EdgeTLError(
                "--top-k is for classification; this bundle answers with its anomaly bank "
                "(add --classify to use its head)"
            )
        return model.detector.predict(images, maps_dir=maps_dir)
    if maps_dir is not None and model.detector.state is not None:
        raise EdgeTLError("--maps draws anomaly maps; it does not go with --classify")
    if maps_dir is not None:
        raise EdgeTLError(
            f"--maps needs an anomaly bank; build one with `edge-tl anomaly {model.path} GOOD_DIR`"
        )
    if model.tasks:
        return model.predict_tasks(images, top_k)
    return model.classifier.predict(images, top_k, class_threshold)


def predict_tasks(
    model: Model, images: Sequence[ImageLike], top_k: int = 1
) -> list[TaskPrediction]:
    """Every task's answer per image of a multi-task bundle (see
    :meth:`Model.predict_tasks <edge_tl.runtime.model.Model.predict_tasks>`)."""
    if not model.tasks:
        raise EdgeTLError(f"bundle {model.path} has one task; use predict()")
    if top_k < 1:
        raise EdgeTLError(f"--top-k must be at least 1, not {top_k}")
    for clf in model.tasks.values():
        clf.require()
    out = []
    for src in images:
        emb = model.embed([src])
        answers = {name: clf.prediction(src, emb, top_k) for name, clf in model.tasks.items()}
        image = next(iter(answers.values())).image
        out.append(TaskPrediction(image=image, tasks=answers))
    return out


def evaluate(
    model: Model,
    data: str | Path | Dataset,
    split: str = "all",
    maps_dir: str | Path | None = None,
    skip_bad: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
    min_recall: Mapping[str, float] | None = None,
    class_threshold: Mapping[str, float] | None = None,
) -> Evaluation | AnomalyEvaluation | TaskEvaluation:
    """``model`` measured on ``data`` by the face it is set up for (see
    :meth:`Model.evaluate <edge_tl.runtime.model.Model.evaluate>`)."""
    if split not in SPLIT_CHOICES:
        raise EdgeTLError(f"--split must be one of {', '.join(SPLIT_CHOICES)}")
    operating = bool(min_recall or class_threshold)
    if operating and model.tasks:
        raise EdgeTLError(
            "--min-recall and --class-threshold are for a bundle with one task; this one "
            f"answers tasks {', '.join(model.tasks)}"
        )
    if model.modality == "image" and not isinstance(data, Dataset) and _is_mvtec(Path(data)):
        if model.detector.state is None:
            raise EdgeTLError(
                f"{data} is an MVTec-layout folder but {model.path} has no anomaly bank; "
                f"build one with `edge-tl anomaly {model.path} {data}`"
            )
        if split != "all":
            raise EdgeTLError("--split is for classification; an MVTec folder has its own test/")
        if operating:
            raise EdgeTLError(
                "--min-recall and --class-threshold are for classification; on an MVTec "
                "folder the anomaly bank reports recall and precision at its threshold"
            )
        return model.detector.evaluate(data, maps_dir, skip_bad=skip_bad)
    if maps_dir is not None:
        raise EdgeTLError(
            "--maps draws anomaly maps, on an MVTec-layout folder (test/good, "
            "test/<defect>) with a bundle that has an anomaly bank; drop --maps here"
        )
    if operating:  # a misspelt class fails before any data is read
        model.classifier.operating_rule(class_threshold, min_recall)
    reader = open_dataset
    if model.tasks:  # each task's labels from the multi-task source
        reader = partial(open_dataset, tasks=list(model.tasks))
    ds = model.open_data(data, skip_bad, text_column, label_column, reader)
    if split != "all":
        ds = _run_split(model, ds, split, str(data))
    if model.tasks:
        return _evaluate_tasks(model, ds)
    res = model.classifier.evaluate(ds, min_recall=min_recall, class_threshold=class_threshold)
    seen = _head_saw(model, split)
    if seen is None:
        return res
    points = [
        p if p.caveat is None else replace(p, caveat=f"{p.caveat}; {seen}")
        for p in res.operating_points
    ]
    return replace(res, operating_points=points)


def _head_saw(model: Model, split: str) -> str | None:
    """Why the exported head in force has learned from ``split``'s images (None: it
    has not, or the head is not the exported one): ``train`` holds its training
    images, and the export's artifact refit (``head.fit_on == "artifact"``) fits on the
    training and validation images."""
    head = model.manifest.head
    if head is None or model.classifier.require().meta.get("op") != "export":
        return None
    if split == "train":
        return "--split train holds the images this head was trained on"
    if split == "val" and head.fit_on == "artifact":
        return (
            "this bundle's head was refitted at export on the run's training and "
            "validation images (head fit: artifact), so --split val is not held out for it "
            "either: expect a lower recall on --split test, or choose on labelled images "
            "it never saw"
        )
    return None


def _evaluate_tasks(model: Model, ds: Dataset) -> TaskEvaluation:
    """Each task's accuracy on ``ds`` (labelled for every task), embedded once."""
    from edge_tl.multitask import task_dataset

    if ds.tasks is None or set(ds.tasks.names) != set(model.tasks):
        have = "no tasks" if ds.tasks is None else f"tasks {', '.join(ds.tasks.names)}"
        raise EdgeTLError(
            f"{ds.name} has {have}; bundle {model.path} answers tasks "
            f"{', '.join(model.tasks)}: pass data labelled for each"
        )
    views = {name: task_dataset(ds, name) for name in model.tasks}
    for name, clf in model.tasks.items():
        clf.check_classes(views[name])
    t0 = time.perf_counter()
    emb = model.embed(ds.paths, desc="evaluating")
    results = {name: clf.evaluation(views[name], emb, t0) for name, clf in model.tasks.items()}
    artifact = model.manifest.artifact
    return TaskEvaluation(
        tasks=results,
        mean_accuracy=float(np.mean([r.accuracy for r in results.values()])),
        n=len(ds),
        seconds=round(time.perf_counter() - t0, 2),
        bundle=str(model.path),
        artifact=f"{artifact.format}-{artifact.precision}",
        skipped=[sk.to_dict() for sk in ds.skipped],
    )


def _run_split(model: Model, ds: Dataset, name: str, where: str) -> Dataset:
    """The part ``name`` of the split ``model``'s run was trained with."""
    record = model.manifest.source.split
    if record is None:
        raise EdgeTLError(f"bundle {model.path} records no training split; use --split all")
    if record.data_fingerprint and fingerprint(ds) != record.data_fingerprint:
        raise EdgeTLError(
            f"{where} is not the data set this bundle was trained on (other classes or "
            f"{ds.unit}s), so --split {name} would not be its held-out split; use --split all"
            + (
                ""
                if model.tasks or model.modality == "text"
                else " (or --tasks NAME if it was trained with --tasks)"
            )
        )
    return ds.subset(split_dataset(ds, record)[name])


def _is_mvtec(folder: Path) -> bool:
    """An MVTec-layout folder: ``test/`` holding one folder per kind (``good``, defects); an
    ImageFolder with a class named ``test`` holds images there instead."""
    test = folder / "test"
    return test.is_dir() and bool(entries(test)[1])
