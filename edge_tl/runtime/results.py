"""What the runtime answers, as typed records (:meth:`to_dict` gives the JSON the CLI prints).

Torch-free. Fractions are in [0, 1]; times in milliseconds or seconds as named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

__all__ = [
    "AnomalyEvaluation",
    "ClassFigures",
    "ClassMetrics",
    "Evaluation",
    "OperatingPoint",
    "Prediction",
    "TaskEvaluation",
    "TaskPrediction",
    "Verdict",
]


@dataclass(frozen=True)
class Prediction:
    """One image classified by the head.

    ``label`` is ``unknown`` when open-set rejection is on and ``similarity`` (cosine to
    the predicted class's prototype) is below ``threshold``. ``score`` is the softmax
    probability of the top class; ``top_k`` lists ``{"label", "score"}`` best first.
    """

    image: str | None
    label: str
    score: float
    similarity: float | None
    threshold: float | None
    top_k: list[dict[str, Any]]
    text: str | None = None
    """The text classified (a text bundle); ``image`` is then None."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("image", "text"):  # the one that names the input stays
            if d[key] is None:
                del d[key]
        return d


class ClassMetrics(TypedDict):
    """One class's figures in :attr:`Evaluation.per_class` (fractions in [0, 1], counts of
    images; :func:`edge_tl.runtime.evaluation.class_metrics` gives the definitions).

    ``recall`` is the share of the class's images called the class (images called
    ``unknown`` count as misses); ``precision`` the share of images called the class that
    are of it (0 when none is); ``f1`` their harmonic mean; ``support`` the class's images.
    ``accuracy`` (= ``recall``) and ``n`` (= ``support``) are the older names, kept.
    """

    accuracy: float
    n: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassFigures:
    """One class under one decision rule, on the evaluated images (fractions in [0, 1]):
    the class's ``precision`` and ``recall``, the overall ``accuracy`` (every class, images
    called unknown wrong) and ``false_alarm_rate``, the share of the other classes' images
    called this class."""

    precision: float
    recall: float
    accuracy: float
    false_alarm_rate: float


@dataclass(frozen=True)
class OperatingPoint:
    """A class threshold and what it does, next to the arg-max rule (``edge-tl evaluate
    --min-recall CLASS=R`` or ``--class-threshold CLASS=T``).

    The rule (:func:`edge_tl.runtime.operating.decide`): call ``label`` when its softmax
    probability is ``>= threshold``, else the arg-max of the other classes. With
    ``min_recall`` (R in (0, 1]), ``threshold`` is the largest one whose recall of
    ``label`` on the evaluated images is ``>= min_recall`` (a probability in [0, 1]);
    ``min_recall`` is None for a threshold given by the user. ``at_threshold`` gives the
    figures under the rule, ``argmax`` under the plain arg-max; ``n_class`` / ``n_other``
    count the evaluated images of ``label`` / of the other classes. A threshold chosen on
    the images it is measured on is optimistic there (``caveat`` says so): choose it on a
    validation split and check it on the test split.
    """

    label: str
    min_recall: float | None
    threshold: float
    at_threshold: ClassFigures
    argmax: ClassFigures
    n_class: int
    n_other: int
    caveat: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """A head measured on a labelled data set.

    ``skipped`` lists the files left out under ``--skip-bad`` (``{"path", "reason"}``).
    ``accuracy`` counts images called ``unknown`` as wrong; ``unknown_rate`` is their
    share. ``per_class`` gives each class present its :class:`ClassMetrics` (precision,
    recall, F1, support); ``macro_precision``, ``macro_recall`` and ``macro_f1`` are their
    unweighted means over those classes (fractions in [0, 1]). ``confusion_matrix`` is
    over ``labels`` (the classes present), rows true, columns predicted; ``seconds`` is the
    wall time of embedding and classifying.

    ``class_threshold`` is the decision rule in force, ``{"label", "threshold"}`` (None:
    the arg-max), under which every figure above is measured; ``operating_points`` holds
    one :class:`OperatingPoint` per ``--min-recall`` class (or the ``--class-threshold``).
    """

    accuracy: float
    n: int
    unknown_rate: float
    head: dict[str, Any]
    per_class: dict[str, ClassMetrics]
    labels: list[str]
    confusion_matrix: list[list[int]]
    seconds: float
    bundle: str
    artifact: str
    macro_precision: float
    macro_recall: float
    macro_f1: float
    skipped: list[dict[str, str]] = field(default_factory=list)  # under --skip-bad
    class_threshold: dict[str, Any] | None = None
    operating_points: list[OperatingPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskPrediction:
    """One image classified by every task of a multi-task bundle (one embedding, one
    head per task). JSON: ``{"image": ..., "tasks": {"defect": {"label", "score", ...},
    "type": {...}}}``, each task as a :class:`Prediction` without the image."""

    image: str | None
    tasks: dict[str, Prediction]

    def to_dict(self) -> dict[str, Any]:
        tasks = {}
        for name, p in self.tasks.items():
            d = p.to_dict()
            d.pop("image", None)
            tasks[name] = d
        return {"image": self.image, "tasks": tasks}


@dataclass(frozen=True)
class TaskEvaluation:
    """A multi-task bundle measured on a labelled multi-task data set: one
    :class:`Evaluation` per task (the same images, each task's labels) and the mean of the
    tasks' accuracies. ``seconds`` is the wall time of embedding (once) and classifying."""

    tasks: dict[str, Evaluation]
    mean_accuracy: float
    n: int
    seconds: float
    bundle: str
    artifact: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # under --skip-bad

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for t in d["tasks"].values():  # said once, at the top
            for key in ("bundle", "artifact", "skipped", "seconds"):
                del t[key]
        return d


@dataclass(frozen=True)
class Verdict:
    """One image scored by the anomaly bank: ``anomalous`` when ``score > threshold``.

    ``map`` (``float32[H, W]`` at the image's size, in units of the good images' spread)
    is filled when asked for; ``map_png`` names the overlay written for it.
    """

    image: str
    score: float
    threshold: float
    verdict: str
    map_png: str | None = None
    map: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("image", "score", "threshold", "verdict")}
        if self.map_png is not None:
            out["map_png"] = self.map_png
        return out


@dataclass(frozen=True)
class AnomalyEvaluation:
    """An anomaly bank measured on an MVTec-layout test folder.

    ``image_auroc`` over good vs defective images; ``pixel_auroc`` over mask pixels (None
    without masks); F1, precision, recall and ``false_alarm_rate`` (good images flagged) at
    the stored ``threshold``, whose target rate is ``target_false_alarm``; ``skipped`` lists
    the files left out under ``--skip-bad`` (``{"path", "reason"}``).
    """

    image_auroc: float
    pixel_auroc: float | None
    f1: float
    precision: float
    recall: float
    false_alarm_rate: float
    threshold: float
    target_false_alarm: float
    n_good: int
    n_defective: int
    per_defect_auroc: dict[str, float]
    bank: dict[str, Any]
    ms_per_image: float
    maps: str | None
    bundle: str
    artifact: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # under --skip-bad

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
