"""On-device learning: a head state that grows with the field.

Torch-free (numpy only). A :class:`~edge_tl.runtime.head_state.HeadState` is one head
(prototype, linear or k-NN), its labels, the support embeddings it was learned from, and
the open-set threshold (:mod:`edge_tl.runtime.head_state`). The operations here
(:func:`learn`, :func:`add`, :func:`remove`, :func:`relabel`) are pure: each returns a new
state. Versions are kept in ``BUNDLE/heads/`` by
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

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.head_state import (
    DEFAULT_HEAD,
    DEFAULT_QUANTILE,
    HEADS,
    Head,
    HeadState,
    fit_support,
)
from edge_tl.runtime.heads import KnnHead, LinearHead
from edge_tl.runtime.imprint import imprint
from edge_tl.runtime.versions import StoreKind, VersionedStore
from edge_tl.spec import UNKNOWN, Manifest, check_labels

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

KEEP_VERSIONS = 20
EXEMPLARS = "exemplars.npz"


def _refit(state: HeadState, x: np.ndarray, y: np.ndarray, n_classes: int) -> Head:
    """A prototype or k-NN head (same k) recomputed from a changed support set."""
    k = state.head.k if isinstance(state.head, KnnHead) else 1
    return fit_support(state.kind, x, y, n_classes, k)


# ---- operations (pure: each returns a new state) -----------------------------------------
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
    check_labels(labels, "support classes")
    if len(labels) < 2 and kind == "linear":
        raise EdgeTLError(
            f"a linear head needs at least 2 classes, DATA has {len(labels)}; add class "
            "folders, or use --head prototype"
        )
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to learn from; add images to the class folders")
    y = np.asarray([labels.index(n) for n in names], np.int64)
    t0 = time.perf_counter()
    head = fit_support(kind, x, y, len(labels), k)
    fit_ms = (time.perf_counter() - t0) * 1e3
    return HeadState(
        kind, labels, head, np.asarray(x, np.float32), y, quantile, None, {"fit_ms": fit_ms}
    )


def add(state: HeadState, x: np.ndarray, names: list[str]) -> HeadState:
    """Add examples (to known classes) and classes (new names) to ``state``: ``x[N, D]`` are
    the device's embeddings, stored in the head's space (through ``state``'s alignment).

    Prototype and k-NN heads are recomputed from the grown support set (exact, cheap). A
    linear head gains each new class by weight imprinting, calibrated against the support
    of the known classes; its existing rows stay. A few-shot linear head given examples of a
    class it already had is refitted from the whole support set; a workstation head keeps
    its trained rows (the new examples join the support for the open set and later classes).
    """
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to add; add images to the class folders")
    x = state.aligned(x)  # the support lives in the head's space
    new = sorted(set(names) - set(state.labels))
    check_labels(new, "classes to add", state.labels)
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
    clash = [n for n in others if n.casefold() == str(new).casefold()]
    if clash:
        raise EdgeTLError(
            f"cannot relabel {old!r} as {new!r}: the head already has a class {clash[0]!r}; "
            f"remove one of them first (learn --remove)"
        )
    check_labels([new], "the new name of --relabel", others)
    labels = [new if n == old else n for n in state.labels]
    return replace(state, labels=labels, meta={})


def _read_state(z: Any, where: str) -> HeadState:
    return HeadState.from_arrays(z, where)


HEAD_VERSIONS = StoreKind("heads", "head", "edge-tl learn", "", _read_state, KEEP_VERSIONS)
"""Head versions: ``BUNDLE/heads/vNNNN.npz`` + ``CURRENT``, the last 20 kept."""


def head_store(bundle: str | Path, manifest: Manifest, task: str | None = None) -> VersionedStore:
    """The versions of ``bundle``'s learned head; of a multi-task bundle's ``task`` head in
    ``BUNDLE/heads/<task>/`` (each task's versions on their own)."""
    if task is None:
        return VersionedStore(bundle, manifest, HEAD_VERSIONS)
    kind = replace(
        HEAD_VERSIONS,
        dirname=f"{HEAD_VERSIONS.dirname}/{task}",
        noun=f"{task} head",
        command=f"edge-tl learn --task {task}",
        rollback_flag=f" --task {task}",
    )
    return VersionedStore(bundle, manifest, kind)


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
