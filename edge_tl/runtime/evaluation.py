"""Measuring a bundle on labelled data, torch-free: classification accuracy with the
confusion matrix and each class's precision, recall and F1, and for anomaly detection
image AUROC, pixel AUROC and the figures at the stored threshold, on an MVTec-AD-layout
folder.

The MVTec AD layout (Bergmann et al. 2019): ``test/good``, ``test/<defect type>`` and,
optionally, ``ground_truth/<defect type>/<name>_mask.png`` of the same size as each image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import (
    BadImageError,
    Skipped,
    check_images,
    decoding,
    entries,
    folder_images,
    image_size,
    read_image,
)
from edge_tl.runtime.results import ClassMetrics

__all__ = [
    "GOOD",
    "PixelAuroc",
    "TestItem",
    "at_threshold",
    "auroc",
    "class_metrics",
    "confusion",
    "counts_metrics",
    "load_mask",
    "macro_averages",
    "macro_f1",
    "mvtec_test",
]

GOOD = "good"


def confusion(
    y: np.ndarray, pred: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, dict[str, ClassMetrics], list[int]]:
    """``(matrix[K, K] int64, per_class, present)`` for true class indices ``y`` and
    predictions ``pred`` (``-1``: unknown, counted wrong and left out of the matrix).

    ``per_class[name]`` (:class:`~edge_tl.runtime.results.ClassMetrics`) for each class
    present in ``y``: ``accuracy`` (= ``recall``, the older key) and ``n`` (= ``support``),
    ``precision``, ``recall`` and ``f1`` as fractions in [0, 1] (see
    :func:`class_metrics`); ``present`` lists their indices, in order.
    """
    k = len(labels)
    y = np.asarray(y)
    cm = np.zeros((k, k), np.int64)
    known = pred >= 0
    np.add.at(cm, (y[known], pred[known]), 1)
    present = sorted(set(y.tolist()))
    per_class = {labels[c]: class_metrics(cm, c, int((y == c).sum())) for c in present}
    return cm, per_class, present


def class_metrics(cm: np.ndarray, c: int, support: int) -> ClassMetrics:
    """Class ``c``'s figures from a confusion matrix ``cm[K, K]`` (rows true, columns
    predicted; images called unknown are in no column, so they count as misses) and the
    number of images of ``c``, ``support``.

    ``recall`` = TP / (images of ``c``), the share of ``c``'s images called ``c`` (also
    given as ``accuracy``, its older name); ``precision`` = TP / (images called ``c``), 0
    when none is; ``f1`` = 2 TP / (2 TP + FP + FN), their harmonic mean; ``support`` (also
    ``n``) = images of ``c``. Fractions in [0, 1]; definitions as in scikit-learn's
    ``precision_recall_fscore_support`` (a class never predicted has precision 0).
    """
    tp = int(cm[c, c])
    return counts_metrics(tp, int(cm[:, c].sum()) - tp, support)


def counts_metrics(tp: int, fp: int, support: int) -> ClassMetrics:
    """:func:`class_metrics` from counts: ``tp`` images of the class called it, ``fp``
    images of other classes called it, ``support`` images of the class."""
    fn = support - tp
    recall = tp / support if support else 0.0
    return {
        "accuracy": recall,
        "n": support,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "support": support,
    }


def macro_averages(per_class: dict[str, ClassMetrics]) -> dict[str, float]:
    """``{"macro_precision", "macro_recall", "macro_f1"}``: unweighted means over the
    classes of ``per_class`` (those present in the evaluated data), fractions in [0, 1]."""
    if not per_class:
        return {"macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0}
    return {
        f"macro_{key}": float(np.mean([m[key] for m in per_class.values()]))
        for key in ("precision", "recall", "f1")
    }


def macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes of each class's F1 (a class never predicted nor
    present counts 0)."""
    f1 = []
    for k in range(n_classes):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), ``labels`` 1 = anomalous."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), np.float64)
    # average ranks over ties
    edges = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class PixelAuroc:
    """Pixel-level AUROC accumulated image by image in a fixed histogram (bounded memory)."""

    def __init__(self, lo: float, hi: float, bins: int = 1 << 14) -> None:
        self.lo, self.hi, self.bins = lo, max(hi, lo + 1e-6), bins
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def update(self, scores: np.ndarray, mask: np.ndarray | None) -> None:
        b = ((scores - self.lo) * ((self.bins - 1) / (self.hi - self.lo))).astype(np.int64)
        np.clip(b, 0, self.bins - 1, out=b)
        if mask is None:
            self.neg += np.bincount(b.ravel(), minlength=self.bins)
        else:
            self.pos += np.bincount(b[mask], minlength=self.bins)
            self.neg += np.bincount(b[~mask], minlength=self.bins)

    def value(self) -> float | None:
        p, n = self.pos.astype(np.float64), self.neg.astype(np.float64)
        if p.sum() == 0 or n.sum() == 0:
            return None
        below = np.cumsum(n) - n
        return float(((below + 0.5 * n) * p).sum() / (p.sum() * n.sum()))


def at_threshold(scores: np.ndarray, y: np.ndarray, thr: float) -> dict[str, float]:
    """F1, precision, recall and false-alarm rate (good images flagged) when images with
    ``scores > thr`` are called anomalous; ``y`` 1 = anomalous."""
    flagged = scores > thr
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    fn = int((~flagged & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": round(f1, 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "false_alarm_rate": round(fp / max(1, int((y == 0).sum())), 4),
    }


@dataclass(frozen=True)
class TestItem:
    """One test image: its path, ``good`` or its defect type, and its mask (or None)."""

    path: str
    defect: str  # "good" or the defect type
    mask: str | None


def mvtec_test(folder: str | Path, skip_bad: bool = False) -> tuple[list[TestItem], list[Skipped]]:
    """``(items, skipped)``: ``test/<good|defect>/*`` of an MVTec-layout folder with
    ``ground_truth`` masks when present, by the folder rule of :mod:`edge_tl.images`.

    Every image and mask is decoded and checked (mask exists, same size as its image)
    before anything runs; with ``skip_bad`` a bad image, or an image whose mask does not
    decode, is left out and listed.

    Raises:
        EdgeTLError: no ``test/good`` or no defect folder, an empty folder, a missing mask,
            a mask of another size than its image.
        BadImageError: a bad image or mask (not ``skip_bad``).
    """
    root = Path(folder)
    test = root / "test"
    if not test.is_dir():
        raise EdgeTLError(
            f"{root} has no test folder; lay it out as {root}/test/good and "
            f"{root}/test/<defect type> (MVTec AD layout)"
        )
    classes = entries(test)[1]
    if not any(c.name == GOOD for c in classes) or len(classes) < 2:
        raise EdgeTLError(
            f"{test} needs a good folder and at least one defect folder (found "
            f"{[c.name for c in classes]}); AUROC compares the two"
        )
    gt = root / "ground_truth"
    items: list[TestItem] = []
    skipped: list[Skipped] = []
    for c in classes:
        files, bad = folder_images(c, skip_bad)
        skipped += bad
        if not files:
            raise EdgeTLError(
                f"{c} has no readable images ({len(bad)} skipped); add some or remove the folder"
            )
        for f in files:
            mask = _mask_of(Path(f), c.name, gt)
            if mask is not None:
                try:
                    check_images([mask])
                except BadImageError as e:
                    if not skip_bad:
                        raise
                    skipped.append(Skipped(f, f"its mask {mask} {e.reason}"))
                    continue
                (a, b), (am, bm) = image_size(f), image_size(mask)
                if (a, b) != (am, bm):
                    raise EdgeTLError(
                        f"mask {mask} is {am}x{bm} but its image {f} is {a}x{b}; masks must "
                        "match their images pixel for pixel"
                    )
            items.append(TestItem(f, c.name, mask))
    return items, skipped


def _mask_of(f: Path, defect: str, gt: Path) -> str | None:
    if defect == GOOD or not gt.is_dir():
        return None
    m = gt / defect / f"{f.stem}_mask.png"
    if not m.is_file():
        raise EdgeTLError(f"{f} has no mask {m}; add it, or remove {gt} to skip pixel metrics")
    return str(m)


def load_mask(path: str) -> np.ndarray:
    """A mask image as ``bool[H, W]``: every non-zero pixel is defect (0/255 masks, 0/1
    masks, 16-bit masks and masks with one value per defect all read alike).

    Raises:
        BadImageError: the mask does not decode.
    """
    img = read_image(path)
    with decoding(path):
        if img.mode not in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F"):
            img = img.convert("L")
        return np.asarray(img) > 0
