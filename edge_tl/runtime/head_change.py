"""One change to a bundle's head as ``edge-tl learn`` asks for it, checked when it is made
and carried out with the classifier's verbs.

Torch-free. :class:`HeadChange` holds exactly one change (new data, more data, a class
removed or renamed, a head imported) and/or an open-set setting; :func:`apply_change`
(:meth:`Classifier.apply <edge_tl.runtime.classifier.Classifier.apply>`) makes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.runtime.head_state import DEFAULT_HEAD, DEFAULT_QUANTILE, HeadState
from edge_tl.runtime.support import SupportLike
from edge_tl.spec import check_label

if TYPE_CHECKING:
    from edge_tl.runtime.classifier import Classifier

__all__ = ["HeadChange", "apply_change"]


@dataclass(frozen=True)
class HeadChange:
    """One change to a bundle's head, as ``edge-tl learn`` asks for it.

    Exactly one of ``data`` (learn a new head; with ``add``, grow the current one),
    ``remove``, ``relabel`` (``"OLD=NEW"``) or ``import_path``, and/or an open-set setting:
    ``quantile`` (the leave-one-out share the threshold may reject; default
    :data:`~edge_tl.runtime.learner.DEFAULT_QUANTILE`), a fixed ``threshold``, or
    ``open_set=False``.

    Raises:
        EdgeTLError: on construction, for a change that asks for two things, nothing, or a
            setting out of range.
    """

    data: SupportLike | None = None
    add: bool = False
    remove: str | None = None
    relabel: str | None = None
    import_path: str | Path | None = None
    head: str | None = None  # a new head's kind (default: linear)
    k: int = 1
    quantile: float | None = None
    threshold: float | None = None
    open_set: bool = True
    skip_bad: bool = False  # leave bad files of DATA out (listed in the summary's "skipped")
    text_column: str | None = None  # text data: the column of DATA with the text ("text")
    label_column: str | None = None  # text data: the column of DATA with the class ("label")

    def __post_init__(self) -> None:
        given = [
            name
            for name, value in (
                ("DATA", self.data),
                ("--remove", self.remove),
                ("--relabel", self.relabel),
                ("--import", self.import_path),
            )
            if value
        ]
        if len(given) > 1:
            raise EdgeTLError(f"give one of {', '.join(given)} per call; run learn once for each")
        if not given and not self.sets_open_set:
            raise EdgeTLError(
                "nothing to learn: give DATA (an ImageFolder of support images), --remove, "
                "--relabel, --import, or an open-set setting (--quantile/--threshold/--no-open-set)"
            )
        if self.add and not self.data:
            raise EdgeTLError("--add needs DATA, the images to add")
        if self.skip_bad and not self.data:
            raise EdgeTLError("--skip-bad leaves bad files of DATA out; it needs DATA")
        for flag, value in (
            ("--text-column", self.text_column),
            ("--label-column", self.label_column),
        ):
            if value is not None and not self.data:
                raise EdgeTLError(f"{flag} names a column of DATA, the text data; it needs DATA")
        if self.head is not None and not (self.data and not self.add):
            raise EdgeTLError(
                "--head chooses the kind of a new head learned from DATA; --add and the other "
                "changes keep the current head's kind"
            )
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise EdgeTLError(
                f"--threshold is a cosine similarity in [-1, 1], not {self.threshold}"
            )
        settings = [
            n
            for n, v in (
                ("--quantile", self.quantile is not None),
                ("--threshold", self.threshold is not None),
                ("--no-open-set", not self.open_set),
            )
            if v
        ]
        if len(settings) > 1:
            raise EdgeTLError(
                f"{' and '.join(settings)} set the open set in different ways; give one"
            )
        if self.quantile is not None and not 0 <= self.quantile < 1:
            raise EdgeTLError(f"--quantile must be in [0, 1), not {self.quantile}")
        if self.k < 1:
            raise EdgeTLError(f"--k must be at least 1, not {self.k}")
        if self.relabel is not None:
            names = self.relabel.split("=")
            if len(names) != 2 or not all(names):
                raise EdgeTLError(
                    f"--relabel takes OLD=NEW with one '=' (class names cannot contain '='), "
                    f"not {self.relabel!r}"
                )
            check_label(names[1], "the new name of --relabel")

    @property
    def sets_open_set(self) -> bool:
        return self.quantile is not None or self.threshold is not None or not self.open_set

    @property
    def effective_quantile(self) -> float | None:
        """The open-set quantile this change leaves in force (None: rejection off)."""
        if not self.open_set:
            return None
        return DEFAULT_QUANTILE if self.quantile is None else self.quantile


def apply_change(clf: Classifier, change: HeadChange) -> HeadState:
    """Carry out ``change`` on ``clf``'s head (see :meth:`Classifier.apply
    <edge_tl.runtime.classifier.Classifier.apply>`)."""
    if change.data and not change.add:
        kind = change.head or DEFAULT_HEAD
        state = clf.learn(
            change.data,
            kind,
            change.effective_quantile,
            change.k,
            change.skip_bad,
            change.text_column,
            change.label_column,
        )
    elif change.data:
        state = clf.add(change.data, change.skip_bad, change.text_column, change.label_column)
    elif change.remove:
        state = clf.remove_class(change.remove)
    elif change.relabel:
        old, _, new = change.relabel.partition("=")
        state = clf.relabel(old, new)
    elif change.import_path:
        state = clf.import_head(change.import_path)
    else:
        state = clf.require()
    fresh = bool(change.data) and not change.add
    if change.threshold is not None or (change.sets_open_set and not fresh):
        threshold = change.threshold if change.open_set else None
        skipped = state.meta.get(SKIPPED)
        state = clf.set_threshold(threshold, change.effective_quantile)
        if skipped:  # shown with the result; recorded in the version that learned
            state = replace(state, meta={**state.meta, SKIPPED: skipped})
    return state
