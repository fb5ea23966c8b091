"""A head state: one head, its labels, the support it learned from, its open-set threshold.

Torch-free (numpy only). :class:`HeadState` answers (``predict_proba``, the open-set
``similarity`` and ``threshold``) and is written to and read from a head file's arrays,
each array checked by the rule of its kind on reading. The operations that change a state
are :mod:`edge_tl.runtime.learner`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.runtime.align import Alignment
from edge_tl.runtime.heads import (
    FEWSHOT_POWER,
    KnnHead,
    LinearHead,
    PrototypeHead,
    cl2n,
    class_means,
    power,
    support_centre,
    unit_rows,
)
from edge_tl.spec import check_labels

__all__ = ["DEFAULT_HEAD", "DEFAULT_QUANTILE", "HEADS", "Head", "HeadState", "fit_support"]

HEADS = ("linear", "prototype", "knn")
DEFAULT_HEAD = "linear"
DEFAULT_QUANTILE = 0.05
"""Open set: the threshold lets through all but this share of the support set (leave-one-out)."""

Head = LinearHead | PrototypeHead | KnnHead


@dataclass
class HeadState:
    """A head with its labels, support embeddings and open-set threshold.

    ``support_x`` are raw embeddings of the images the head learned from (so prototypes,
    k-NN and the threshold can be recomputed exactly when classes change). A head from the
    workstation has its classes in its weights; its support is the exemplars the export
    stored (none for bundles without them).

    ``align`` (set by ``edge-tl adapt``, :mod:`edge_tl.runtime.align`) maps the device's
    embeddings into the space the head learned in; it is applied to every embedding the
    head is asked about (:meth:`aligned`), and embeddings added to the support are stored
    aligned, so ``support_x`` is always in the head's space.
    """

    kind: str
    labels: list[str]
    head: Head
    support_x: np.ndarray
    support_y: np.ndarray
    quantile: float | None = DEFAULT_QUANTILE  # None: open set off
    threshold_override: float | None = None  # set by the user; wins over the quantile
    meta: dict[str, Any] = field(default_factory=dict)
    align: Alignment | None = None

    def __post_init__(self) -> None:
        counts = np.bincount(self.support_y, minlength=len(self.labels))
        has_prototypes = bool(len(self.labels)) and bool(counts.min() > 0)
        self._open = _open_set(self) if has_prototypes else None

    # ---- open set ---------------------------------------------------------------------
    @property
    def open_set_ready(self) -> bool:
        """Whether the support set gives a threshold: see :attr:`open_set_problem`."""
        return self.open_set_problem is None

    @property
    def open_set_problem(self) -> str | None:
        """Why the support set cannot give an open-set threshold, or None when it can.

        Every class needs a prototype (one support image or more), and some class needs two
        or more, since the threshold comes from images scored against their class's
        prototype computed without them.
        """
        counts = np.bincount(self.support_y, minlength=len(self.labels))
        if not len(self.labels):
            return "the head has no classes"
        missing = [n for n, c in zip(self.labels, counts, strict=True) if c == 0]
        if missing:
            return f"open set needs support images of every class; none for {', '.join(missing)}"
        if counts.max() < 2:
            return (
                "open set needs 2 or more support images of a class (each is scored with "
                "itself left out), every class has 1; add images with `learn --add` or set "
                "a fixed --threshold"
            )
        return None

    @property
    def threshold(self) -> float | None:
        if self.threshold_override is not None and self._open is not None:
            return self.threshold_override
        if self._open is None or self.quantile is None:
            return None
        return self._open["threshold"]

    def similarity(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        """Cosine of each embedding to its predicted class's prototype (open-set score)."""
        if self._open is None:
            return None
        z = cl2n(power(self.aligned(x), FEWSHOT_POWER), self._open["centre"])
        return np.einsum("nd,nd->n", z, self._open["prototypes"][pred])

    # ---- prediction -------------------------------------------------------------------
    def aligned(self, x: np.ndarray) -> np.ndarray:
        """The device's embeddings ``x[N, D]`` in the head's space (``float32``): through
        the alignment in force, or unchanged without one."""
        x = np.asarray(x, np.float32)
        return x if self.align is None else self.align.apply(x, self.head)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head.logits(self.aligned(x))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(self.aligned(x))

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.support_y, minlength=len(self.labels))
        return {name: int(n) for name, n in zip(self.labels, c, strict=True)}

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.meta.get("version"),
            "head": self.kind,
            "labels": list(self.labels),
            "support": self.counts(),
            "threshold": None if self.threshold is None else round(self.threshold, 4),
            "open_set": self.threshold is not None,
            **(
                {"open_set_problem": self.open_set_problem}
                if self.threshold is None and self.quantile is not None
                else {}
            ),
            **{
                k: self.meta[k]
                for k in ("op", "parent", "created", "fit_ms", SKIPPED)
                if k in self.meta
            },
            **({"alignment": self.align.describe()} if self.align is not None else {}),
        }

    # ---- persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        a: dict[str, np.ndarray] = {
            "kind": np.array(self.kind),
            "labels": np.array(self.labels, dtype=str).reshape(-1),
            "support_x": self.support_x.astype(np.float32),
            "support_y": self.support_y.astype(np.int64),
            "quantile": np.array(np.nan if self.quantile is None else self.quantile),
            "threshold_override": np.array(
                np.nan if self.threshold_override is None else self.threshold_override
            ),
            "meta": np.array(json.dumps(self.meta)),
        }
        if isinstance(self.head, LinearHead):
            a.update({f"linear_{k}": v for k, v in self.head.arrays().items()})
        elif isinstance(self.head, KnnHead):
            a["knn_k"] = np.array(self.head.k)
        if self.align is not None:
            a.update(self.align.to_arrays())
        return a

    @classmethod
    def from_arrays(cls, z: Any, where: str) -> HeadState:
        """The state in a head file's arrays ``z`` (a mapping, e.g. an open ``.npz``).

        Every array is checked by the rule of its kind before use (:func:`_head_arrays`).

        Raises:
            EdgeTLError: an array missing, of the wrong type or shape, not finite, or out
                of range; one line naming it.
        """
        try:
            a = _head_arrays(z, where)
            if a["kind"] == "linear":
                head: Head = LinearHead.from_arrays(
                    {k[len("linear_") :]: v for k, v in a.items() if k.startswith("linear_")}
                )
            else:
                k = a["knn_k"] if a["kind"] == "knn" else 1
                head = fit_support(a["kind"], a["support_x"], a["support_y"], len(a["labels"]), k)
            align = Alignment.from_arrays(z, a["support_x"].shape[1])
        except (KeyError, ValueError) as e:
            why = f"no array {e}" if isinstance(e, KeyError) else str(e)
            raise EdgeTLError(
                f"{where} is not an edge_tl head state ({why}); pass a file written by "
                "`edge-tl learn`"
            ) from None
        quantile, override = a["quantile"], a["threshold_override"]
        return cls(
            a["kind"],
            a["labels"],
            head,
            a["support_x"],
            a["support_y"],
            None if np.isnan(quantile) else quantile,
            None if np.isnan(override) else override,
            a["meta"],
            align,
        )


def _head_arrays(z: Any, where: str) -> dict[str, Any]:
    """The arrays of a head file, each checked by the rule of its kind: text is a text
    scalar, numbers are numeric arrays of the stated rank whose values fit float32 and are
    finite (NaN only where it means "off"), sizes agree (``support_x[N, D]``,
    ``support_y[N]`` in ``[0, K)``, ``labels[K]`` by :func:`check_labels`, a linear head's
    ``weight[K, D]``, ``bias[K]``, ``mean[D]``, ``scale[D]``), ``meta`` is a JSON object.

    Raises:
        KeyError: an array is missing. ValueError: naming the array that breaks a rule.
        EdgeTLError: a class name breaks :data:`~edge_tl.spec.LABEL_RULE`.
    """
    f32 = float(np.finfo(np.float32).max)

    def text(key: str) -> str:
        v = np.asarray(z[key])
        if v.dtype.kind != "U" or v.ndim != 0:
            raise ValueError(f"{key} is not a text")
        return str(v)

    def numbers(key: str, ndim: int, nan_ok: bool = False) -> np.ndarray:
        v = np.asarray(z[key])
        if v.dtype.kind not in "fiu" or v.ndim != ndim:
            raise ValueError(f"{key} is not a {ndim}-D array of numbers")
        w = v.astype(np.float64)
        bad = ~np.isnan(w) if nan_ok else np.ones(w.shape, bool)
        if not (np.isfinite(w) & (np.abs(w) <= f32))[bad].all():
            raise ValueError(f"{key} holds values that are not finite float32 numbers")
        return w.astype(np.float32)

    def integer(key: str, low: int) -> int:
        v = np.asarray(z[key])
        if v.dtype.kind not in "iu" or v.ndim != 0 or int(v) < low:
            raise ValueError(f"{key} is not an integer >= {low}")
        return int(v)

    a: dict[str, Any] = {"kind": text("kind")}
    if a["kind"] not in HEADS:
        raise ValueError(f"kind {a['kind'][:40]!r} is not one of {', '.join(HEADS)}")
    labels = np.asarray(z["labels"])
    if labels.dtype.kind != "U" or labels.ndim != 1 or not len(labels):
        raise ValueError("labels is not a 1-D array of class names")
    a["labels"] = [str(s) for s in labels]
    check_labels(
        a["labels"],
        f"labels of {where}",
        fix="roll back to an earlier head or learn a new one",
        written=True,
    )
    n_classes = len(a["labels"])
    x = a["support_x"] = numbers("support_x", 2)
    y = np.asarray(z["support_y"])
    if y.dtype.kind not in "iu" or y.shape != (len(x),) or ((y < 0) | (y >= n_classes)).any():
        raise ValueError(f"support_y is not {len(x)} class indices in [0, {n_classes})")
    a["support_y"] = y.astype(np.int64)
    a["quantile"] = float(numbers("quantile", 0, nan_ok=True))
    if not (np.isnan(a["quantile"]) or 0 <= a["quantile"] <= 1):
        raise ValueError("quantile is not in [0, 1]")
    a["threshold_override"] = float(numbers("threshold_override", 0, nan_ok=True))
    try:
        a["meta"] = json.loads(text("meta"))
    except (ValueError, RecursionError):
        a["meta"] = None
    if not isinstance(a["meta"], dict):
        raise ValueError("meta is not a JSON object")
    dim = x.shape[1]
    if a["kind"] == "linear":
        shapes = {"weight": (n_classes, dim), "bias": (n_classes,), "mean": (dim,)}
        shapes["scale"] = (dim,)
        for key, shape in shapes.items():
            v = a[f"linear_{key}"] = numbers(f"linear_{key}", len(shape))
            if v.shape != shape:
                raise ValueError(f"linear_{key} has shape {v.shape}, not {shape}")
        if not a["linear_scale"].all():
            raise ValueError("linear_scale holds zeros")
        for key, low in (("l2", 0.0), ("power", 1e-6)):
            if key == "l2" or f"linear_{key}" in z:  # power and normalise came later
                v = a[f"linear_{key}"] = float(numbers(f"linear_{key}", 0))
                if v < low:
                    raise ValueError(f"linear_{key} is below {low}")
        normalise = (
            np.asarray(z["linear_normalise"]) if "linear_normalise" in z else np.array(False)
        )
        if normalise.dtype.kind != "b" or normalise.ndim != 0:
            raise ValueError("linear_normalise is not true or false")
        a["linear_normalise"] = bool(normalise)
    else:
        if np.bincount(a["support_y"], minlength=n_classes).min() == 0:
            raise ValueError(f"a {a['kind']} head needs support images for every class")
        if a["kind"] == "knn":
            a["knn_k"] = integer("knn_k", 1)
    return a


def fit_support(kind: str, x: np.ndarray, y: np.ndarray, n_classes: int, k: int = 1) -> Head:
    """A head of ``kind`` fitted on support embeddings ``x[N, D]`` with class indices ``y``."""
    if kind == "prototype":
        return PrototypeHead.fit(x, y, n_classes)
    if kind == "knn":
        return KnnHead.fit(x, y, n_classes, k=k)
    return LinearHead.fit_fewshot(x, y, n_classes)


def _open_set(state: HeadState) -> dict[str, Any]:
    """Prototypes of the support set and the leave-one-out threshold.

    Each support embedding is scored against its class's prototype computed without it;
    the threshold is the ``quantile`` of those scores, so about that share of images like
    the support set would be called unknown. A class with one example cannot be left out
    (it is still gated by the threshold the others give); with no class of two or more the
    threshold is None (:attr:`HeadState.open_set_problem` says why). The features
    are centred by :func:`~edge_tl.runtime.heads.support_centre`: on the support mean for
    two or more classes, not at all for one (centred on its own mean, one class's
    leave-one-out cosines are near -1 and the threshold would reject nothing).
    """
    x, y, k = state.support_x, state.support_y, len(state.labels)
    p = power(x, FEWSHOT_POWER)
    centre = support_centre(p, k)
    z = cl2n(p, centre)
    counts = np.bincount(y, minlength=k)
    sums = class_means(z, y, k) * counts[:, None]
    # leave-one-out in closed form: |S - z|^2 = |S|^2 - 2 z.S + 1 for unit z
    dots = np.einsum("nd,nd->n", z, sums[y])
    sq = np.maximum((sums * sums).sum(1)[y] - 2 * dots + 1.0, 1e-12)
    scores = ((dots - 1.0) / np.sqrt(sq))[counts[y] >= 2]
    q = state.quantile if state.quantile is not None else DEFAULT_QUANTILE
    threshold = float(np.quantile(scores, q)) if len(scores) else None
    return {"centre": centre, "prototypes": unit_rows(sums), "threshold": threshold}
