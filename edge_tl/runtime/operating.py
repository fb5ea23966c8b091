"""A class's operating point: trading its recall against its precision with a threshold.

Torch-free (numpy only). For a defect camera, missing a defective part costs more than a
false alarm, so the arg-max of the head's probabilities is not always the rule to ship.
The rule here, for one class ``c`` and a threshold ``t`` on its softmax probability:

    predict ``c`` when ``P(c) >= t``, else the arg-max of the other classes.

``t = 0`` calls everything ``c``; with two classes ``t = 0.5`` is the arg-max (up to ties).
:func:`min_recall_threshold` finds the largest ``t`` whose recall of ``c`` on labelled
images is at least ``R`` (the point of the precision-recall curve a user asks for: the
highest precision this rule gets at that recall, as in scikit-learn's
``precision_recall_curve``, whose thresholds are the scores themselves). A threshold
chosen on the images it is measured on is optimistic there: choose it on a validation
split (``edge-tl evaluate BUNDLE DATA --split val --min-recall c=R``) and check it on the
test split (``--split test --class-threshold c=T``).

An open-set head (``edge-tl learn --quantile``) still gates the class the rule picks: an
image whose similarity to that class's prototype is below the open-set threshold is
called unknown (counted wrong), as in prediction.

Example:
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], np.float32)
    >>> decide(p, ClassThreshold("defective", 1, 0.35)).tolist()
    [0, 1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.results import ClassFigures

__all__ = [
    "CAVEAT",
    "ClassThreshold",
    "class_figures",
    "decide",
    "min_recall_threshold",
    "parse_class_values",
    "resolve",
]

CAVEAT = (
    "threshold chosen on the evaluated images, so its figures here are optimistic; choose it "
    "on a validation split (--split val) and check it on the test split (--split test "
    "--class-threshold CLASS=T)"
)


@dataclass(frozen=True)
class ClassThreshold:
    """The rule "call ``label`` (index ``index`` in the head's labels) when its probability
    is ``>= threshold``, else the arg-max of the other classes"; ``threshold`` in [0, 1]."""

    label: str
    index: int
    threshold: float

    def to_dict(self) -> dict[str, float | str]:
        return {"label": self.label, "threshold": self.threshold}


def decide(proba: np.ndarray, rule: ClassThreshold | None) -> np.ndarray:
    """Class indices ``int64[N]`` for probabilities ``proba[N, K]`` under ``rule`` (None:
    the arg-max). Ties between other classes go to the lower index, as ``argmax``."""
    if rule is None:
        return proba.argmax(1)
    c = rule.index
    others = np.array(proba, copy=True)
    others[:, c] = -np.inf
    # the threshold in the probabilities' own precision: a threshold found among them
    # (min_recall_threshold) is then met exactly by the image it came from
    t = np.asarray(rule.threshold, proba.dtype)
    return np.where(proba[:, c] >= t, c, others.argmax(1)).astype(np.int64)


def class_figures(y: np.ndarray, pred: np.ndarray, c: int) -> ClassFigures:
    """Class ``c``'s precision and recall, the overall accuracy and the false-alarm rate
    (other classes' images called ``c``) for true indices ``y[N]`` and predictions
    ``pred[N]`` (``-1``: unknown, a miss). Fractions in [0, 1]; precision is 0 when nothing
    is called ``c``, the false-alarm rate 0 when there are no other images."""
    is_c, called = y == c, pred == c
    tp = int((is_c & called).sum())
    fp = int((~is_c & called).sum())
    return ClassFigures(
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / max(1, int(is_c.sum())),
        accuracy=float((pred == y).mean()) if len(y) else 0.0,
        false_alarm_rate=fp / max(1, int((~is_c).sum())),
    )


def min_recall_threshold(
    score: np.ndarray, positive: np.ndarray, r: float, passes: np.ndarray | None = None
) -> float:
    """The largest threshold ``t`` with ``mean(score[positive] >= t [and passes]) >= r``.

    Args:
        score: the class's probability per image, ``float[N]``.
        positive: ``bool[N]``, the images of the class.
        r: the recall asked for, in (0, 1].
        passes: ``bool[N]``, the images the open set lets through when called the class
            (None: all).

    Returns:
        ``t``, one of ``score``'s values (in its dtype's precision, as a Python float), so
        that calling the class at ``>= t`` reaches recall ``r`` and any larger ``t`` does not.

    Raises:
        EdgeTLError: no image of the class, or ``r`` is out of reach (the open set calls
            too many of them unknown whatever the threshold).
    """
    n = int(positive.sum())
    if n == 0:
        raise EdgeTLError("no image of the class to measure its recall on")
    eligible = positive if passes is None else positive & passes
    ranked = np.sort(score[eligible])[::-1]
    # the fewest hits k with k / n >= r, computed as the recall is reported
    hits = np.arange(1, n + 1)
    k = int(hits[hits / n >= r][0])
    if k > len(ranked):
        raise EdgeTLError(
            f"recall {r:g} is out of reach: the open set calls {n - len(ranked)} of its {n} "
            f"images unknown at any threshold (best recall {len(ranked) / n:.4f}); lower R, "
            "or turn the open set off with `edge-tl learn BUNDLE --no-open-set`"
        )
    return float(ranked[k - 1])


def parse_class_values(
    specs: Iterable[str], flag: str, what: str, low_open: bool, form: str = "CLASS=V"
) -> dict[str, float]:
    """``{"CLASS": value}`` from ``CLASS=V`` items (each item may hold several,
    comma-separated), for ``flag`` (named in errors).

    Args:
        what: the value's meaning, for errors (``"the recall asked for"``).
        low_open: values must lie in (0, 1] when true, in [0, 1] otherwise.
        form: the item's form as the flag's help writes it (``CLASS=R``).

    Example:
        >>> parse_class_values(["defective=0.95"], "--min-recall", "a recall", True)
        {'defective': 0.95}

    Raises:
        EdgeTLError: an item without ``=`` or a class name, a value that is not a number
            in range, or a class given twice.
    """
    out: dict[str, float] = {}
    interval = "(0, 1]" if low_open else "[0, 1]"
    for item in specs:
        for part in item.split(","):
            name, eq, value = part.strip().rpartition("=")
            name = name.strip()
            if not eq or not name:
                raise EdgeTLError(
                    f"{flag} takes {form} (e.g. {flag} defective=0.9), not {part.strip()!r}"
                )
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and (v > 0 if low_open else v >= 0) and v <= 1):
                raise EdgeTLError(
                    f"{flag} {name}={value.strip()}: {what} is a fraction in {interval}, "
                    f"e.g. {name}=0.9"
                )
            if name in out:
                raise EdgeTLError(f"{flag} gives class {name!r} twice; give it once")
            out[name] = v
    return out


def resolve(name: str, labels: Sequence[str], flag: str) -> int:
    """The index of class ``name`` in the head's ``labels``.

    Raises:
        EdgeTLError: naming the known classes.
    """
    if name not in labels:
        known = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise EdgeTLError(f"{flag}: the head has no class {name!r}; its classes are {known}")
    return list(labels).index(name)
