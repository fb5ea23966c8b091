"""On-device learning: a head state that grows with the field.

Torch-free (numpy only). A :class:`HeadState` is one head (prototype, linear or k-NN), its
labels, the support embeddings it was learned from, and the open-set threshold. The
operations (:func:`learn`, :func:`add`, :func:`remove`, :func:`relabel`) are pure: each
returns a new state. Versions are kept in ``BUNDLE/heads/`` by
:class:`~edge_tl.runtime.versions.VersionedStore` (:func:`head_store`).

The exported head starts from the workstation's linear head; ``exemplars.npz`` (written
by the export, read here) holds artifact embeddings of a few training images per class,
which stand for the known classes when a new one is imprinted.

Example:
    >>> from edge_tl.runtime import Model
    >>> model = Model("bundle")  # doctest: +SKIP
    >>> model.classifier.learn("support/", head="prototype")  # doctest: +SKIP
    >>> model.classifier.add_class("oil_stain", ["a.jpg", "b.jpg"])  # doctest: +SKIP
    >>> model.classifier.rollback()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.runtime.heads import (
    FEWSHOT_POWER,
    KnnHead,
    LinearHead,
    PrototypeHead,
    cl2n,
    class_means,
    power,
    unit_rows,
)
from edge_tl.runtime.imprint import imprint
from edge_tl.runtime.versions import StoreKind, VersionedStore
from edge_tl.spec import Manifest

__all__ = [
    "DEFAULT_HEAD",
    "DEFAULT_QUANTILE",
    "HEADS",
    "HEAD_VERSIONS",
    "UNKNOWN",
    "HeadState",
    "add",
    "check_labels",
    "exported_state",
    "head_store",
    "learn",
    "read_exemplars",
    "relabel",
    "remove",
    "write_exemplars",
]

HEADS = ("linear", "prototype", "knn")
DEFAULT_HEAD = "linear"
UNKNOWN = "unknown"
"""The label ``predict`` gives an image that is like none of the known classes."""
DEFAULT_QUANTILE = 0.05
"""Open set: the threshold lets through all but this share of the support set (leave-one-out)."""
KEEP_VERSIONS = 20
EXEMPLARS = "exemplars.npz"

Head = LinearHead | PrototypeHead | KnnHead


@dataclass
class HeadState:
    """A head with its labels, support embeddings and open-set threshold.

    ``support_x`` are raw embeddings of the images the head learned from (so prototypes,
    k-NN and the threshold can be recomputed exactly when classes change). A head from the
    workstation has its classes in its weights; its support is the exemplars the export
    stored (none for bundles without them).
    """

    kind: str
    labels: list[str]
    head: Head
    support_x: np.ndarray
    support_y: np.ndarray
    quantile: float | None = DEFAULT_QUANTILE  # None: open set off
    threshold_override: float | None = None  # set by the user; wins over the quantile
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._open = _open_set(self) if self.open_set_ready else None

    # ---- open set ---------------------------------------------------------------------
    @property
    def open_set_ready(self) -> bool:
        counts = np.bincount(self.support_y, minlength=len(self.labels))
        return bool(len(self.labels)) and bool(counts.min() > 0)

    @property
    def threshold(self) -> float | None:
        if self.threshold_override is not None:
            return self.threshold_override
        if self._open is None or self.quantile is None:
            return None
        return self._open["threshold"]

    def similarity(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        """Cosine of each embedding to its predicted class's prototype (open-set score)."""
        if self._open is None:
            return None
        z = cl2n(power(x, FEWSHOT_POWER), self._open["centre"])
        return np.einsum("nd,nd->n", z, self._open["prototypes"][pred])

    # ---- prediction -------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head.logits(np.asarray(x, np.float32))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(np.asarray(x, np.float32))

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
            **{
                k: self.meta[k]
                for k in ("op", "parent", "created", "fit_ms", SKIPPED)
                if k in self.meta
            },
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
        return a

    @classmethod
    def from_arrays(cls, z: Any, where: str) -> HeadState:
        try:
            kind = str(z["kind"])
            labels = [str(s) for s in z["labels"]]
            support_x = np.asarray(z["support_x"], np.float32)
            support_y = np.asarray(z["support_y"], np.int64)
            quantile = float(z["quantile"])
            override = float(z["threshold_override"])
            meta = json.loads(str(z["meta"]))
            if kind == "linear":
                head: Head = LinearHead.from_arrays(
                    {k[len("linear_") :]: z[k] for k in z.files if k.startswith("linear_")}
                )
            elif kind in ("prototype", "knn"):
                k = int(z["knn_k"]) if kind == "knn" else 1
                head = _fit_support(kind, support_x, support_y, len(labels), k)
            else:
                raise KeyError(f"head kind {kind!r}")
        except (KeyError, ValueError) as e:
            raise EdgeTLError(
                f"{where} is not an edge_tl head state ({e}); pass a file written by "
                "`edge-tl learn`"
            ) from None
        return cls(
            kind,
            labels,
            head,
            support_x,
            support_y,
            None if np.isnan(quantile) else quantile,
            None if np.isnan(override) else override,
            meta,
        )


def _fit_support(kind: str, x: np.ndarray, y: np.ndarray, n_classes: int, k: int = 1) -> Head:
    if kind == "prototype":
        return PrototypeHead.fit(x, y, n_classes)
    if kind == "knn":
        return KnnHead.fit(x, y, n_classes, k=k)
    return LinearHead.fit_fewshot(x, y, n_classes)


def _refit(state: HeadState, x: np.ndarray, y: np.ndarray, n_classes: int) -> Head:
    """A prototype or k-NN head (same k) recomputed from a changed support set."""
    k = state.head.k if isinstance(state.head, KnnHead) else 1
    return _fit_support(state.kind, x, y, n_classes, k)


def _open_set(state: HeadState) -> dict[str, Any]:
    """Prototypes of the support set and the leave-one-out threshold.

    Each support embedding is scored against its class's prototype computed without it;
    the threshold is the ``quantile`` of those scores, so about that share of images like
    the support set would be called unknown. A class with one example cannot be left out;
    with no class of two or more, the threshold is ``-1`` (nothing is rejected).
    """
    x, y, k = state.support_x, state.support_y, len(state.labels)
    p = power(x, FEWSHOT_POWER)
    centre = p.mean(0)
    z = cl2n(p, centre)
    counts = np.bincount(y, minlength=k)
    sums = class_means(z, y, k) * counts[:, None]
    # leave-one-out in closed form: |S - z|^2 = |S|^2 - 2 z.S + 1 for unit z
    dots = np.einsum("nd,nd->n", z, sums[y])
    sq = np.maximum((sums * sums).sum(1)[y] - 2 * dots + 1.0, 1e-12)
    scores = ((dots - 1.0) / np.sqrt(sq))[counts[y] >= 2]
    q = state.quantile if state.quantile is not None else DEFAULT_QUANTILE
    threshold = float(np.quantile(scores, q)) if len(scores) else -1.0
    return {"centre": centre, "prototypes": unit_rows(sums), "threshold": threshold}


# ---- operations (pure: each returns a new state) -----------------------------------------
def check_labels(names: list[str], existing: list[str] | None = None) -> None:
    """Refuse label names that collide: ``unknown``, empty, or equal ignoring case."""
    seen: dict[str, str] = {}
    for name in [*(existing or []), *names]:
        key = name.strip().casefold()
        if not key:
            raise EdgeTLError("a class name is empty; name every class folder")
        if key == UNKNOWN:
            raise EdgeTLError(
                f"class name {name!r} is reserved for open-set rejection; rename the class"
            )
        if key in seen and seen[key] != name:
            raise EdgeTLError(
                f"class names {seen[key]!r} and {name!r} differ only in case; rename one"
            )
        seen[key] = name


def learn(
    x: np.ndarray,
    names: list[str],
    kind: str = DEFAULT_HEAD,
    quantile: float | None = DEFAULT_QUANTILE,
    k: int = 1,
) -> HeadState:
    """A new head from support embeddings ``x[N, D]`` labelled by class name."""
    if kind not in HEADS:
        raise EdgeTLError(f"--head must be one of {', '.join(HEADS)}, not {kind!r}")
    labels = sorted(set(names))
    check_labels(labels)
    if len(labels) < 2 and kind == "linear":
        raise EdgeTLError(
            f"a linear head needs at least 2 classes, DATA has {len(labels)}; add class "
            "folders, or use --head prototype"
        )
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to learn from; add images to the class folders")
    y = np.asarray([labels.index(n) for n in names], np.int64)
    t0 = time.perf_counter()
    head = _fit_support(kind, x, y, len(labels), k)
    fit_ms = (time.perf_counter() - t0) * 1e3
    return HeadState(
        kind, labels, head, np.asarray(x, np.float32), y, quantile, None, {"fit_ms": fit_ms}
    )


def add(state: HeadState, x: np.ndarray, names: list[str]) -> HeadState:
    """Add examples (to known classes) and classes (new names) to ``state``.

    Prototype and k-NN heads are recomputed from the grown support set (exact, cheap). A
    linear head gains each new class by weight imprinting, calibrated against the support
    of the known classes; its existing rows stay. A few-shot linear head given examples of a
    class it already had is refitted from the whole support set; a workstation head keeps
    its trained rows (the new examples join the support for the open set and later classes).
    """
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to add; add images to the class folders")
    new = sorted(set(names) - set(state.labels))
    check_labels(new, state.labels)
    labels = [*state.labels, *new]
    y_add = np.asarray([labels.index(n) for n in names], np.int64)
    support_x = np.concatenate([state.support_x, np.asarray(x, np.float32)])
    support_y = np.concatenate([state.support_y, y_add])
    t0 = time.perf_counter()
    head = state.head
    if isinstance(head, LinearHead):
        x = np.asarray(x, np.float32)
        to_known = bool((y_add < len(state.labels)).any())
        if to_known and head.normalise and np.bincount(support_y, minlength=len(labels)).min():
            # a few-shot head with support for every class: refit (a few ms)
            head = LinearHead.fit_fewshot(support_x, support_y, len(labels))
        elif new:
            is_new = y_add >= len(state.labels)
            known = support_y < len(state.labels)  # references: support of known classes
            head = imprint(
                head,
                x[is_new],
                y_add[is_new] - len(state.labels),
                len(new),
                support_x[known],
                support_y[known],
            )
    else:
        head = _refit(state, support_x, support_y, len(labels))
    fit_ms = (time.perf_counter() - t0) * 1e3
    return replace(
        state,
        labels=labels,
        head=head,
        support_x=support_x,
        support_y=support_y,
        meta={"fit_ms": fit_ms},
    )


def remove(state: HeadState, name: str) -> HeadState:
    """Forget class ``name``: its weights, prototype and support images."""
    if name not in state.labels:
        raise EdgeTLError(
            f"class {name!r} is not in the head ({', '.join(state.labels)}); check the name"
        )
    if len(state.labels) <= 1:
        raise EdgeTLError(f"{name!r} is the head's only class; learn a new head instead")
    c = state.labels.index(name)
    keep = state.support_y != c
    support_y = state.support_y[keep]
    support_y = support_y - (support_y > c)
    labels = [n for n in state.labels if n != name]
    head = state.head
    if isinstance(head, LinearHead):
        rows = np.arange(head.n_classes) != c
        head = replace(head, weight=head.weight[rows], bias=head.bias[rows])
    else:
        head = _refit(state, state.support_x[keep], support_y, len(labels))
    return replace(
        state,
        labels=labels,
        head=head,
        support_x=state.support_x[keep],
        support_y=support_y,
        meta={},
    )


def relabel(state: HeadState, old: str, new: str) -> HeadState:
    """Rename class ``old`` to ``new`` (a name no other class has)."""
    if old not in state.labels:
        raise EdgeTLError(
            f"class {old!r} is not in the head ({', '.join(state.labels)}); check the name"
        )
    others = [n for n in state.labels if n != old]
    clash = [n for n in others if n.strip().casefold() == new.strip().casefold()]
    if clash:
        raise EdgeTLError(
            f"cannot relabel {old!r} as {new!r}: the head already has a class {clash[0]!r}; "
            f"remove one of them first (learn --remove)"
        )
    check_labels([new], others)
    labels = [new if n == old else n for n in state.labels]
    return replace(state, labels=labels, meta={})


def _read_state(z: Any, where: str) -> HeadState:
    return HeadState.from_arrays(z, where)


HEAD_VERSIONS = StoreKind("heads", "head", "edge-tl learn", "", _read_state, KEEP_VERSIONS)
"""Head versions: ``BUNDLE/heads/vNNNN.npz`` + ``CURRENT``, the last 20 kept."""


def head_store(bundle: str | Path, manifest: Manifest) -> VersionedStore:
    """The versions of ``bundle``'s learned head."""
    return VersionedStore(bundle, manifest, HEAD_VERSIONS)


def write_exemplars(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """``exemplars.npz``: artifact embeddings ``x[N, D]`` (float32) of training images with
    their class indices ``y[N]`` (int64); plain arrays."""
    np.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))


def read_exemplars(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x[N, D] float32, y[N] int64)`` from :func:`write_exemplars`."""
    with np.load(path, allow_pickle=False) as z:
        return z["x"].astype(np.float32), z["y"].astype(np.int64)


def exported_state(head: LinearHead, labels: list[str], exemplars: Path | None = None) -> HeadState:
    """The bundle's own head (trained on the workstation) as a state. Its support is the
    exemplars the export stored (artifact embeddings of some training images per class),
    or nothing for bundles without them. Open-set rejection starts off."""
    d = head.weight.shape[1]
    x, y = np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    if exemplars is not None and exemplars.is_file():
        x, y = read_exemplars(exemplars)
    # open set off: the exported head answers as it did at export (evaluate matches the
    # export's figures); `edge-tl learn BUNDLE --quantile 0.05` turns it on
    return HeadState("linear", list(labels), head, x, y, quantile=None, meta={"op": "export"})
