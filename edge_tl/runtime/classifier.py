"""The classifier face of a loaded bundle: its head, learned on the device or exported.

Torch-free. The head in force is the current version in ``BUNDLE/heads/`` when there is
one, else the head the bundle was exported with. Every change (:meth:`Classifier.learn`,
:meth:`~Classifier.add`, :meth:`~Classifier.remove_class`, ...) writes a new version;
:meth:`~Classifier.rollback` goes back.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_tl.data import Dataset, image_folder, is_named_image_set
from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED, Skipped, decode_ahead, decode_workers
from edge_tl.runtime import align as alignment
from edge_tl.runtime import learner
from edge_tl.runtime.evaluation import confusion, macro_averages
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.learner import UNKNOWN, HeadState
from edge_tl.runtime.operating import (
    CAVEAT,
    ClassThreshold,
    class_figures,
    decide,
    min_recall_threshold,
    resolve,
)
from edge_tl.runtime.preprocess import ImageLike, prepare
from edge_tl.runtime.results import Evaluation, OperatingPoint, Prediction
from edge_tl.runtime.text import check_texts
from edge_tl.spec import EMBEDDING, TaskEntry, check_label

if TYPE_CHECKING:
    from edge_tl.runtime.model import Model

__all__ = ["Classifier", "HeadChange", "SupportLike"]

SupportLike = str | Path | Dataset | dict[str, list[ImageLike]] | dict[str, list[str]]
"""Support images: an ImageFolder path, a Dataset, or ``{class name: [images]}``; on a
text bundle, text data (:func:`edge_tl.texts.open_text_dataset`) or ``{class name: [texts]}``."""


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
        return learner.DEFAULT_QUANTILE if self.quantile is None else self.quantile


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
        _require_images(ds, [*(min_recall or {}), *([rule.label] if rule else [])])
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
        state = self.require()
        labels = state.labels
        y = np.asarray([labels.index(ds.classes[i]) for i in ds.labels])
        proba, pred, _ = _classify(state, emb, rule)
        seconds = time.perf_counter() - t0
        cm, per_class, present = confusion(y, pred, labels)
        points = [
            _operating_point(state, emb, proba, y, name, r)
            for name, r in (min_recall or {}).items()
        ]
        if rule is not None:
            argmax = _gate(state, emb, decide(proba, None))[0]
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
        artifact = self._model.manifest.artifact
        return Evaluation(
            accuracy=float((pred == y).mean()),
            n=int(len(y)),
            unknown_rate=float((pred < 0).mean()),
            head=state.summary(),
            per_class=per_class,
            labels=[labels[c] for c in present],
            confusion_matrix=cm[np.ix_(present, present)].tolist(),
            seconds=round(seconds, 2),
            bundle=str(self._model.path),
            artifact=f"{artifact.format}-{artifact.precision}",
            **macro_averages(per_class),
            skipped=[sk.to_dict() for sk in ds.skipped],
            class_threshold=None if rule is None else rule.to_dict(),
            operating_points=points,
        )

    # ---- learning (each change writes a new version) ----------------------------------
    def _images(self, data: str | Path, skip_bad: bool = False) -> Dataset:
        """Support images: an ImageFolder of the head's classes; for a task head also the
        task's labels from a multi-task source (elpv, a labels .csv)."""
        if self.task is not None and (
            is_named_image_set(data) or str(data).lower().endswith(".csv")
        ):
            from edge_tl.multitask import open_tasks

            return open_tasks(data, [self.task.name], skip_bad)
        return image_folder(data, skip_bad=skip_bad)

    def _support(
        self,
        data: SupportLike,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> tuple[np.ndarray, list[str], tuple[Skipped, ...]]:
        unit = "text" if self._model.modality == "text" else "image"
        desc = f"embedding support {unit}s"
        if isinstance(data, dict):
            empty = [n for n, imgs in data.items() if not imgs]
            if empty:
                raise EdgeTLError(f"class {empty[0]!r} has no {unit}s; add {unit}s or drop it")
            if unit == "text":
                for name, texts in data.items():
                    if any(not isinstance(t, str) for t in texts):
                        raise self._model.wrong_input(f"class {name!r} holds an image, not a text")
                    check_texts(texts, f"text of class {name!r}")
            names = [n for n, imgs in data.items() for _ in imgs]
            paths = [p for imgs in data.values() for p in imgs]
            return self._model.embed(paths, desc=desc), names, ()
        ds = self._model.open_data(data, skip_bad, text_column, label_column, self._images)
        x = self._model.embed(ds.paths, desc=desc)
        return x, [ds.classes[i] for i in ds.labels], ds.skipped

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
        x, names, skipped = self._support(data, skip_bad, text_column, label_column)
        # an alignment in force stays: the new head learns in the aligned space
        current = self.state
        align = current.align if current is not None else None
        if current is not None:
            x = current.aligned(x)
        state = replace(learner.learn(x, names, head, quantile, k), align=align)
        return self._commit(_noting(state, skipped), "learn")

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
        x, names, skipped = self._support(data, skip_bad, text_column, label_column)
        return self._change(lambda state: _noting(learner.add(state, x, names), skipped), "add")

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
        if change.data and not change.add:
            kind = change.head or learner.DEFAULT_HEAD
            state = self.learn(
                change.data,
                kind,
                change.effective_quantile,
                change.k,
                change.skip_bad,
                change.text_column,
                change.label_column,
            )
        elif change.data:
            state = self.add(change.data, change.skip_bad, change.text_column, change.label_column)
        elif change.remove:
            state = self.remove_class(change.remove)
        elif change.relabel:
            old, _, new = change.relabel.partition("=")
            state = self.relabel(old, new)
        elif change.import_path:
            state = self.import_head(change.import_path)
        else:
            state = self.require()
        fresh = bool(change.data) and not change.add
        if change.threshold is not None or (change.sets_open_set and not fresh):
            threshold = change.threshold if change.open_set else None
            skipped = state.meta.get(SKIPPED)
            state = self.set_threshold(threshold, change.effective_quantile)
            if skipped:  # shown with the result; recorded in the version that learned
                state = replace(state, meta={**state.meta, SKIPPED: skipped})
        return state

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
        model = self._model
        if model.modality == "text":
            raise EdgeTLError(
                f"bundle {model.path} is a text model ({model.manifest.backbone}); adapt "
                "aligns image embeddings to a new camera or line"
            )
        if method not in alignment.METHODS:
            raise EdgeTLError(
                f"--method must be one of {', '.join(alignment.METHODS)}, not {method!r}"
            )
        if method == "coral" and not (np.isfinite(reg) and reg > 0):
            raise EdgeTLError(f"--reg must be a number > 0, not {reg}")
        self.require()
        source = self._source_stats() if method == "coral" else None
        paths = alignment.target_images(target, skip_bad)
        need = alignment.MIN_TARGET[method]
        if len(paths) < need:
            raise EdgeTLError(
                f"{method} needs at least {need} target images, {_name(target)} has "
                f"{len(paths)}; "
                "add unlabelled images from the new camera or line"
            )
        x = model.embed(paths, desc="embedding target images")
        fitted = alignment.fit_alignment(method, x, source, reg)
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

    def _source_stats(self) -> alignment.Moments:
        """The export's source statistics (``source_stats.npz``, hashed in the manifest).

        Raises:
            EdgeTLError: the bundle has none (exported before they were written, or from a
                backbone without a training run).
        """
        path = self._model.path
        if alignment.SOURCE_STATS not in self._model.manifest.files:
            raise EdgeTLError(
                f"bundle {path} has no source statistics ({alignment.SOURCE_STATS}: exported "
                "by an older edge_tl, or from a backbone without a run) that coral aligns to; "
                "re-export it from its run with `edge-tl export RUN`, or use --method center"
            )
        return alignment.read_source_stats(path / alignment.SOURCE_STATS)

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


def _classify(
    state: HeadState, emb: np.ndarray, rule: ClassThreshold | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    proba = state.predict_proba(emb)
    pred, sim = _gate(state, emb, decide(proba, rule))
    return proba, pred, sim


def _gate(
    state: HeadState, emb: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(pred, similarity)``: the open set in force calls ``-1`` (unknown) where an
    embedding's similarity to its called class's prototype is below the threshold."""
    sim = state.similarity(emb, pred)
    thr = state.threshold
    if sim is not None and thr is not None:
        pred = np.where(sim >= thr, pred, -1)
    return pred, sim


def _operating_point(
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
        at_threshold=class_figures(y, _gate(state, emb, decide(proba, rule))[0], c),
        argmax=class_figures(y, _gate(state, emb, decide(proba, None))[0], c),
        n_class=int((y == c).sum()),
        n_other=int((y != c).sum()),
        caveat=CAVEAT,
    )


def _require_images(ds: Dataset, names: Sequence[str]) -> None:
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


def _name(target: alignment.TargetLike) -> str:
    if isinstance(target, (str, Path)):
        return str(target)
    return target.name if isinstance(target, Dataset) else "the list"


def _noting(state: HeadState, skipped: Sequence[Skipped]) -> HeadState:
    """``state`` with the files skipped under ``--skip-bad`` in its metadata (kept in the
    version file and shown in its summary)."""
    if not skipped:
        return state
    return replace(state, meta={**state.meta, SKIPPED: [s.to_dict() for s in skipped]})
