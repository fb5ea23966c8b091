"""The classifier face of a loaded bundle: its head, learned on the device or exported.

Torch-free. The head in force is the current version in ``BUNDLE/heads/`` when there is
one, else the head the bundle was exported with. Every change (:meth:`Classifier.learn`,
:meth:`~Classifier.add`, :meth:`~Classifier.remove_class`, ...) writes a new version;
:meth:`~Classifier.rollback` goes back.
What ``edge-tl learn`` asks for is a :class:`~edge_tl.runtime.head_change.HeadChange`;
support data is embedded by :mod:`edge_tl.runtime.support`, answers are decided and
measured by :mod:`edge_tl.runtime.scoring`.

Example:
    >>> from edge_tl.runtime import Model
    >>> clf = Model("bundle").classifier  # doctest: +SKIP
    >>> clf.learn("support/")  # doctest: +SKIP
    >>> clf.predict(["part.jpg"])[0].label  # doctest: +SKIP
    'scratches'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import decode_ahead, decode_workers
from edge_tl.runtime import align as alignment
from edge_tl.runtime import learner
from edge_tl.runtime.head_change import HeadChange, apply_change
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.learner import UNKNOWN, HeadState
from edge_tl.runtime.operating import ClassThreshold, resolve
from edge_tl.runtime.preprocess import ImageLike, prepare
from edge_tl.runtime.results import Evaluation, Prediction
from edge_tl.runtime.scoring import classify as _classify
from edge_tl.runtime.scoring import evaluation, require_images
from edge_tl.runtime.support import (
    SupportLike,
    check_adapt,
    embed_support,
    noting,
    target_alignment,
)
from edge_tl.runtime.text import check_texts
from edge_tl.spec import EMBEDDING, TaskEntry

if TYPE_CHECKING:
    from edge_tl.runtime.model import Model

__all__ = ["Classifier", "HeadChange", "SupportLike"]


class Classifier:
    """Classification with a bundle's head (see the module docstring); with ``task``, one
    task's head of a multi-task bundle (its versions in ``BUNDLE/heads/<task>/``, learned
    without touching the other tasks' heads)."""

    def __init__(self, model: Model, task: TaskEntry | None = None) -> None:
        self._model = model
        self.task = task
        self.store = learner.head_store(model.path, model.manifest, task and task.name)
        self.state: HeadState | None = self.store.load() or self._exported()

    def _exported(self) -> HeadState | None:
        entry = self._model.manifest.head if self.task is None else self.task.head
        if entry is None:
            return None
        path = self._model.path
        return learner.exported_state(
            LinearHead.load(path / entry.file),
            self._exported_labels,
            path / entry.exemplars if entry.exemplars else None,
        )

    @property
    def _exported_labels(self) -> list[str]:
        return self._model.manifest.labels if self.task is None else self.task.labels

    @property
    def labels(self) -> list[str]:
        """The classes the current head knows."""
        return self.state.labels if self.state is not None else self._exported_labels

    def require(self) -> HeadState:
        """The head in force.

        Raises:
            EdgeTLError: the bundle has no head.
        """
        state = self.state
        if state is None:
            raise self._no_head()
        return state

    def _no_head(self) -> EdgeTLError:
        path = self._model.path
        return EdgeTLError(
            f"bundle {path} has no head; learn one with `edge-tl learn {path} DATA`, or "
            "export the bundle from a trained run"
        )

    # ---- answering --------------------------------------------------------------------
    def classify(
        self, emb: np.ndarray, rule: ClassThreshold | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(proba[N, K], predicted index[N], similarity[N] or None)`` for embeddings
        ``float32[N, D]``; index ``-1`` is unknown (similarity below the threshold).
        ``rule``: a class threshold (:mod:`edge_tl.runtime.operating`) instead of the
        arg-max."""
        return _classify(self.require(), emb, rule)

    def operating_rule(
        self,
        class_threshold: Mapping[str, float] | None = None,
        min_recall: Mapping[str, float] | None = None,
    ) -> ClassThreshold | None:
        """The decision rule ``{CLASS: T}`` asks for (None: the arg-max), after checking
        ``class_threshold`` and ``min_recall`` (``{CLASS: R}``) against the head's classes.

        Raises:
            EdgeTLError: a class the head does not know (naming those it knows), R outside
                (0, 1] or T outside [0, 1], more than one class threshold, or both
                arguments (a recall target is sought from the arg-max; check the threshold
                it gives with ``class_threshold`` alone).
        """
        labels = self.require().labels
        for name, r in (min_recall or {}).items():
            resolve(name, labels, "--min-recall")
            if not 0 < r <= 1:  # also false for NaN
                raise EdgeTLError(f"--min-recall {name}={r}: the recall asked for is in (0, 1]")
        for name, t in (class_threshold or {}).items():
            if not 0 <= t <= 1:
                raise EdgeTLError(
                    f"--class-threshold {name}={t}: a probability threshold is in [0, 1]"
                )
        if not class_threshold:
            return None
        if min_recall:
            raise EdgeTLError(
                "--min-recall finds a class threshold and --class-threshold gives one; use "
                "--min-recall CLASS=R with --split val, then --class-threshold CLASS=T (the T "
                "it found) with --split test"
            )
        if len(class_threshold) > 1:
            raise EdgeTLError(
                f"--class-threshold takes one class, not {len(class_threshold)} "
                f"({', '.join(class_threshold)}); the rule thresholds one class against the rest"
            )
        [(name, t)] = class_threshold.items()
        return ClassThreshold(name, resolve(name, labels, "--class-threshold"), float(t))

    def predict(
        self,
        images: Sequence[ImageLike] | Sequence[str],
        top_k: int = 1,
        class_threshold: Mapping[str, float] | None = None,
    ) -> list[Prediction]:
        """Label, score and top-k per image (one at a time, batch 1, as a camera would), or
        per text on a text bundle. ``class_threshold`` (``{CLASS: T}``, T in [0, 1]) calls
        CLASS when its probability is ``>= T``, else the arg-max of the others
        (:mod:`edge_tl.runtime.operating`); ``label`` and ``score`` are then the class
        called, which may not be ``top_k``'s first.

        Raises:
            EdgeTLError: ``top_k`` below 1, input of the other modality, or a bad
                ``class_threshold`` (:meth:`operating_rule`).
        """
        self.require()
        rule = self.operating_rule(class_threshold)
        if top_k < 1:
            raise EdgeTLError(f"--top-k must be at least 1, not {top_k}")
        engine, pre = self._model.engine, self._model.manifest.preprocess
        text = self._model.text is not None
        if text:
            if any(not isinstance(src, str) for src in images):
                raise self._model.wrong_input("it was given an image, not a text")
            check_texts(images)
        if text:
            return [self.prediction(s, self._model.embed_texts([s]), top_k, rule) for s in images]
        if len(images) == 1:  # into this thread's preallocated row
            inputs: Iterable[np.ndarray] = [prepare(images[0], pre, self._model.input_row())]
        else:  # the next image decodes while the engine runs this one
            inputs = decode_ahead(
                images, lambda src: prepare(src, pre), decode_workers(beside_engine=True), 2
            )
        results = []
        for src, x in zip(images, inputs, strict=True):
            emb = engine.run(x[None], (EMBEDDING,))[EMBEDDING]
            results.append(self.prediction(src, emb, top_k, rule))
        return results

    def prediction(
        self,
        src: ImageLike | str,
        emb: np.ndarray,
        top_k: int = 1,
        rule: ClassThreshold | None = None,
    ) -> Prediction:
        """The :class:`Prediction` for one input ``src`` (an image, or a text on a text
        bundle) from its embedding ``float32[1, D]``, by the arg-max or ``rule``."""
        text = self._model.text is not None
        state = self.require()  # one head for the whole answer, even if learning swaps it
        labels = state.labels
        probas, pred, sim = _classify(state, emb, rule)
        proba = probas[0]
        order = np.argsort(-proba)[:top_k]
        called = int(order[0]) if pred[0] < 0 else int(pred[0])
        return Prediction(
            image=None if text else str(src) if not hasattr(src, "size") else "<image>",
            text=src if text else None,
            label=UNKNOWN if pred[0] < 0 else labels[called],
            score=float(proba[called]),
            similarity=None if sim is None else round(float(sim[0]), 4),
            threshold=None if state.threshold is None else round(state.threshold, 4),
            top_k=[{"label": labels[i], "score": float(proba[i])} for i in order],
        )

    def evaluate(
        self,
        ds: Dataset | str | Path,
        batch_size: int = 16,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
        min_recall: Mapping[str, float] | None = None,
        class_threshold: Mapping[str, float] | None = None,
    ) -> Evaluation:
        """Accuracy, per-class precision / recall / F1 and the confusion matrix on ``ds`` (a
        Dataset, an ImageFolder path or ``"elpv"``; on a text bundle, text data read by
        :func:`edge_tl.texts.open_text_dataset` with ``text_column`` / ``label_column``;
        ``skip_bad`` leaves bad files or rows out and lists them in ``skipped``).

        Args:
            min_recall: ``{CLASS: R}``, R in (0, 1]: for each, the largest threshold on
                CLASS's probability whose recall of CLASS on ``ds`` is ``>= R``, with its
                figures beside the arg-max's (:class:`OperatingPoint`, in
                ``operating_points``). Chosen on ``ds``, so optimistic on ``ds``.
            class_threshold: ``{CLASS: T}``: every figure is measured under the rule "CLASS
                when its probability ``>= T``, else the arg-max of the others" (to check on
                the test split a threshold chosen on the validation split).

        Raises:
            EdgeTLError: a class of ``ds`` is not a label of the head, ``ds`` is empty,
                ``ds`` is data of the other modality (images for a text bundle), or a
                ``min_recall`` / ``class_threshold`` class the head does not know or that
                has no images in ``ds`` (before anything is embedded).
        """
        rule = self.operating_rule(class_threshold, min_recall)
        ds = self._model.open_data(ds, skip_bad, text_column, label_column)
        self.check_classes(ds)
        require_images(ds, [*(min_recall or {}), *([rule.label] if rule else [])])
        t0 = time.perf_counter()
        emb = self._model.embed(ds.paths, batch_size, desc="evaluating")
        return self.evaluation(ds, emb, t0, min_recall, rule)

    def check_classes(self, ds: Dataset) -> None:
        """Refuse a data set with a class the head does not know, or none at all.

        Raises:
            EdgeTLError: naming the classes, or an empty data set.
        """
        labels = self.require().labels
        unknown = [c for c in ds.classes if c not in labels]
        if unknown:
            what = "class(es)" if ds.modality == "text" else "class folder(s)"
            raise EdgeTLError(
                f"{what} {', '.join(unknown)} of {ds.name} are not labels of this bundle "
                f"({', '.join(labels[:10])}{'...' if len(labels) > 10 else ''}); "
                "rename or remove them"
            )
        if len(ds) == 0:
            raise EdgeTLError("nothing to evaluate: the data set is empty")

    def evaluation(
        self,
        ds: Dataset,
        emb: np.ndarray,
        t0: float,
        min_recall: Mapping[str, float] | None = None,
        rule: ClassThreshold | None = None,
    ) -> Evaluation:
        """The :class:`Evaluation` of the head on ``ds`` from its embeddings ``emb[N, D]``
        (``t0``: when embedding began, for ``seconds``), by the arg-max or ``rule``, with an
        operating point per ``min_recall`` class (see :meth:`evaluate`)."""
        state, artifact = self.require(), self._model.manifest.artifact
        kind = f"{artifact.format}-{artifact.precision}"
        return evaluation(state, ds, emb, t0, str(self._model.path), kind, min_recall, rule)

    # ---- learning (each change writes a new version) ----------------------------------
    def learn(
        self,
        data: SupportLike,
        head: str = learner.DEFAULT_HEAD,
        quantile: float | None = learner.DEFAULT_QUANTILE,
        k: int = 1,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> HeadState:
        """A new head from support images (or texts, on a text bundle; ``text_column`` /
        ``label_column`` name the columns of text data) (``head``: linear, prototype or
        knn). The previous head stays as a version for :meth:`rollback`. ``skip_bad``
        leaves bad files of a folder (bad rows of a text file) out; they are listed in the
        version's ``skipped``."""
        x, names, skipped = embed_support(
            self._model, data, self.task, skip_bad, text_column, label_column
        )
        # an alignment in force stays: the new head learns in the aligned space
        current = self.state
        align = current.align if current is not None else None
        if current is not None:
            x = current.aligned(x)
        state = replace(learner.learn(x, names, head, quantile, k), align=align)
        return self._commit(noting(state, skipped), "learn")

    def add(
        self,
        data: SupportLike,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> HeadState:
        """Add examples and classes to the current head (or to the exported head)."""
        self.require()  # before the images are embedded: no head, no work
        # outside the lock: only the arithmetic waits
        x, names, skipped = embed_support(
            self._model, data, self.task, skip_bad, text_column, label_column
        )
        return self._change(lambda state: noting(learner.add(state, x, names), skipped), "add")

    def add_class(self, name: str, images: list[ImageLike]) -> HeadState:
        """Teach one new class from a few images."""
        if name in self.labels:
            raise EdgeTLError(
                f"the head already has a class {name!r}; use add() to give it more examples"
            )
        return self.add({name: list(images)})

    def remove_class(self, name: str) -> HeadState:
        """Forget class ``name``: its weights, prototype and support images."""
        return self._change(lambda state: learner.remove(state, name), f"remove {name}")

    def relabel(self, old: str, new: str) -> HeadState:
        """Rename class ``old`` to ``new``."""
        return self._change(lambda state: learner.relabel(state, old, new), f"relabel {old}")

    def set_threshold(
        self, threshold: float | None = None, quantile: float | None = learner.DEFAULT_QUANTILE
    ) -> HeadState:
        """Open set: a fixed similarity ``threshold``, or the leave-one-out ``quantile``
        (``None`` for both turns rejection off)."""
        return self._change(
            lambda state: replace(state, quantile=quantile, threshold_override=threshold, meta={}),
            "threshold",
        )

    def import_head(self, path: str | Path) -> HeadState:
        """Adopt a head state learned elsewhere on the same backbone (e.g. another camera)."""
        return self._commit(self.store.read(Path(path)), "import")

    def apply(self, change: HeadChange) -> HeadState:
        """Carry out one :class:`HeadChange` (what ``edge-tl learn`` does).

        A new head takes the change's open-set quantile; a fixed threshold, or an open-set
        setting given with another change, is one more version after it.
        """
        return apply_change(self, change)

    def adapt(
        self,
        target: alignment.TargetLike,
        method: str = "coral",
        reg: float = alignment.DEFAULT_REG,
        skip_bad: bool = False,
    ) -> HeadState:
        """Align the device's embeddings to unlabelled ``target`` images (a new camera or
        line): ``coral`` (covariance alignment to the export's source statistics) or
        ``center`` (the head's centre replaced by the target's); see
        :mod:`edge_tl.runtime.align`. The head is unchanged; the alignment is a new head
        version (``rollback`` undoes it, :meth:`adapt_off` turns it off), applied to every
        embedding the head sees from then on (predict, evaluate, learn). A second ``adapt``
        replaces the first (both are fitted on the device's raw embeddings).

        Raises:
            EdgeTLError: a text bundle, no head, an unknown method, target images missing or
                too few (:data:`~edge_tl.runtime.align.MIN_TARGET`), or, for ``coral``, a
                bundle exported without source statistics (re-export it). Nothing is
                written then.
        """
        check_adapt(self._model, method, reg)
        self.require()
        fitted = target_alignment(self._model, target, method, reg, skip_bad)
        return self._change(
            lambda state: replace(state, align=fitted, meta={}), f"adapt {fitted.describe()}"
        )

    def adapt_off(self) -> HeadState:
        """A new version without the alignment in force (the head as exported or learned).

        Raises:
            EdgeTLError: no alignment is in force.
        """

        def off(state: HeadState) -> HeadState:
            if state.align is None:
                raise EdgeTLError(
                    f"bundle {self._model.path} has no alignment in force; nothing to turn off"
                )
            return replace(state, align=None, meta={})

        off(self.require())  # refused before the store's lock (which makes heads/)
        return self._change(off, "adapt off")

    def rollback(self, to: int | None = None) -> HeadState:
        """Go back to an earlier head version (default: the one before the current)."""
        self.state = self.store.rollback(to)
        return self.state

    def history(self) -> list[dict[str, Any]]:
        """Every head version's summary, oldest first."""
        return self.store.history()

    def _commit(self, state: HeadState, op: str) -> HeadState:
        """Write a state that does not depend on the current one (a new or imported head)."""
        self.state = self.store.save(state, op)
        return self.state

    def _change(self, change: Callable[[HeadState], HeadState], op: str) -> HeadState:
        """Apply ``change`` to the head in force on disk, under the store's lock (another
        process's change made since this model was loaded is kept, not overwritten). The
        new state replaces :attr:`state` in one assignment: a thread predicting meanwhile
        uses the old head or the new one, never a mix."""

        def on_current(current: HeadState | None) -> HeadState:
            base = current if current is not None else self._exported()
            if base is None:
                raise self._no_head()
            return change(base)

        self.state = self.store.update(on_current, op)
        return self.state
