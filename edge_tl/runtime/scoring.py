"""How a head's answers are decided and measured: the arg-max or a class threshold, the
open-set gate, operating points, and the :class:`~edge_tl.runtime.results.Evaluation` of a
labelled set.

Torch-free (numpy only). The :class:`~edge_tl.runtime.classifier.Classifier` answers
through :func:`classify` and is measured by :func:`evaluation`; the rule and the recall
search are :mod:`edge_tl.runtime.operating`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.evaluation import confusion, macro_averages
from edge_tl.runtime.head_state import HeadState
from edge_tl.runtime.operating import (
    CAVEAT,
    ClassThreshold,
    class_figures,
    decide,
    min_recall_threshold,
)
from edge_tl.runtime.results import Evaluation, OperatingPoint

__all__ = ["classify", "evaluation", "gate", "operating_point", "require_images"]


def classify(
    state: HeadState, emb: np.ndarray, rule: ClassThreshold | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(proba[N, K], predicted index[N], similarity[N] or None)`` of ``state`` for
    embeddings ``float32[N, D]``, by the arg-max or ``rule``; index ``-1`` is unknown."""
    proba = state.predict_proba(emb)
    pred, sim = gate(state, emb, decide(proba, rule))
    return proba, pred, sim


def gate(
    state: HeadState, emb: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(pred, similarity)``: the open set in force calls ``-1`` (unknown) where an
    embedding's similarity to its called class's prototype is below the threshold."""
    sim = state.similarity(emb, pred)
    thr = state.threshold
    if sim is not None and thr is not None:
        pred = np.where(sim >= thr, pred, -1)
    return pred, sim


def operating_point(
    state: HeadState, emb: np.ndarray, proba: np.ndarray, y: np.ndarray, name: str, r: float
) -> OperatingPoint:
    """The largest threshold on class ``name``'s probability with recall ``>= r`` on these
    images, and its figures beside the arg-max's."""
    c = state.labels.index(name)
    passes = None
    if state.threshold is not None:  # the open set gates the class the rule calls
        sim = state.similarity(emb, np.full(len(emb), c))
        passes = None if sim is None else sim >= state.threshold
    try:
        t = min_recall_threshold(proba[:, c], y == c, r, passes)
    except EdgeTLError as e:
        raise EdgeTLError(f"--min-recall {name}={r:g}: {e}") from None
    rule = ClassThreshold(name, c, t)
    return OperatingPoint(
        label=name,
        min_recall=r,
        threshold=t,
        at_threshold=class_figures(y, gate(state, emb, decide(proba, rule))[0], c),
        argmax=class_figures(y, gate(state, emb, decide(proba, None))[0], c),
        n_class=int((y == c).sum()),
        n_other=int((y != c).sum()),
        caveat=CAVEAT,
    )


def require_images(ds: Dataset, names: Sequence[str]) -> None:
    """Refuse a class threshold or recall target for a class with no images in ``ds``.

    Raises:
        EdgeTLError: naming the class and the classes ``ds`` has.
    """
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    have = {c for c, n in zip(ds.classes, counts, strict=True) if n}
    for name in names:
        if name not in have:
            raise EdgeTLError(
                f"class {name!r} has no {ds.unit}s in the evaluated data ({ds.name}: "
                f"{', '.join(sorted(have))}); its recall cannot be measured there, evaluate "
                "on data (or a --split) that has some"
            )


def evaluation(
    state: HeadState,
    ds: Dataset,
    emb: np.ndarray,
    t0: float,
    bundle: str,
    artifact: str,
    min_recall: Mapping[str, float] | None = None,
    rule: ClassThreshold | None = None,
) -> Evaluation:
    """The :class:`Evaluation` of ``state`` on ``ds`` from its embeddings ``emb[N, D]``
    (``t0``: when embedding began, for ``seconds``; ``bundle`` and ``artifact`` are
    reported), by the arg-max or ``rule``, with an operating point per ``min_recall``
    class."""
    labels = state.labels
    y = np.asarray([labels.index(ds.classes[i]) for i in ds.labels])
    proba, pred, _ = classify(state, emb, rule)
    seconds = time.perf_counter() - t0
    cm, per_class, present = confusion(y, pred, labels)
    points = [
        operating_point(state, emb, proba, y, name, r) for name, r in (min_recall or {}).items()
    ]
    if rule is not None:
        argmax = gate(state, emb, decide(proba, None))[0]
        points.append(
            OperatingPoint(
                label=rule.label,
                min_recall=None,
                threshold=rule.threshold,
                at_threshold=class_figures(y, pred, rule.index),
                argmax=class_figures(y, argmax, rule.index),
                n_class=int((y == rule.index).sum()),
                n_other=int((y != rule.index).sum()),
            )
        )
    return Evaluation(
        accuracy=float((pred == y).mean()),
        n=int(len(y)),
        unknown_rate=float((pred < 0).mean()),
        head=state.summary(),
        per_class=per_class,
        labels=[labels[c] for c in present],
        confusion_matrix=cm[np.ix_(present, present)].tolist(),
        seconds=round(seconds, 2),
        bundle=bundle,
        artifact=artifact,
        **macro_averages(per_class),
        skipped=[sk.to_dict() for sk in ds.skipped],
        class_threshold=None if rule is None else rule.to_dict(),
        operating_points=points,
    )
