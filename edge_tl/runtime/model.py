"""A loaded bundle: verified files, the engine, its self-test, and its two faces.

Torch-free. :class:`Model` opens a bundle once; :attr:`Model.classifier` (the head) and
:attr:`Model.detector` (the anomaly bank) learn and answer with the same verbs: ``fit`` /
``learn``, ``add``, ``predict``, ``evaluate``, ``rollback``, ``history``.
:meth:`Model.predict` and :meth:`Model.evaluate` pick the face the bundle is set up for
(:mod:`edge_tl.runtime.faces`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_tl.archive import is_archive, open_bundle
from edge_tl.bundle import read_manifest
from edge_tl.data import Dataset, is_named_image_set, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import is_image_name
from edge_tl.progress import progress
from edge_tl.runtime import anomaly, faces, patchcore
from edge_tl.runtime.classifier import Classifier
from edge_tl.runtime.detector import AnomalyDetector
from edge_tl.runtime.engine import Engine, Inputs, make_engine
from edge_tl.runtime.preprocess import ImageLike, batch_inputs, input_batches
from edge_tl.runtime.results import (
    AnomalyEvaluation,
    Evaluation,
    Prediction,
    TaskEvaluation,
    TaskPrediction,
    Verdict,
)
from edge_tl.runtime.selftest import enforce, run_self_test
from edge_tl.runtime.text import TextEncoder, pool
from edge_tl.runtime.versions import CURRENT
from edge_tl.signing import Trust
from edge_tl.spec import EMBEDDING, Manifest, TextPreprocess
from edge_tl.texts import NAMED_SETS, is_text_source, open_text_dataset

__all__ = ["Model", "Task"]

ORT_SPINNING = "session.intra_op.allow_spinning"
Task = Literal["classify", "anomaly"]
SPLIT_CHOICES = ("all", "train", "val", "test")


class Model:
    """A bundle ready to run.

    Example:
        >>> model = Model("bundles/neu_int8")  # doctest: +SKIP
        >>> model.predict(["part_0001.jpg"])[0].label  # doctest: +SKIP
        'scratches'
        >>> model.classifier.add_class("oil_stain", ["a.jpg", "b.jpg"])  # doctest: +SKIP
    """

    def __init__(
        self,
        bundle: str | Path,
        verify: bool = True,
        threads: int = 0,
        self_test: bool = True,
        providers: str | None = None,
        ov_device: str | None = None,
        trust: Trust | None = None,
    ) -> None:
        """Open a bundle (a folder, or an archive from ``edge-tl pack``, unpacked into a
        temporary read-only copy): check file hashes (``verify``) and, with trusted keys, the
        signature; load the engine and run the bundle's self-test on this host
        (``self_test``; refuses or warns as the recipe said).

        Args:
            trust: trusted public keys (``.pub`` paths, folders of them, or
                ``Ed25519PublicKey`` objects); None reads ``$EDGE_TL_TRUST``. With keys, an
                unsigned bundle, one signed by another key or one changed after signing is
                refused (:mod:`edge_tl.signing`).
            threads: engine threads (0: the engine's default).
            providers: ONNX Runtime execution providers, comma-separated, in order.
            ov_device: OpenVINO device string (``CPU``, ``GPU``, ``NPU``, ``AUTO:...``).

        Raises:
            EdgeTLError: not a bundle, a file missing or altered, a signature refused, an
                engine that cannot load it, or a failed self-test.
        """
        self.path = Path(bundle)
        self._rows = threading.local()  # see input_row
        self._unpacked = None  # the temporary copy of an archive lives as long as the Model
        if is_archive(self.path):
            self._unpacked, self.path = open_bundle(self.path)
        self.manifest: Manifest = read_manifest(self.path, verify=verify, trust=trust)
        artifact = self.manifest.artifact
        if artifact.format == "onnx" and (self.path / anomaly.ANOMALY_DIR / CURRENT).is_file():
            # scoring alternates the engine with numpy's search: ORT threads that spin
            # after a run take the CPU from it (benchmarks/anomaly.py: with the search on
            # one BLAS thread too, 37 -> 27 ms per image on 2 cores)
            options = {**artifact.engine_options, ORT_SPINNING: "0"}
            artifact = replace(artifact, engine_options=options)
        self.engine: Engine = make_engine(self.path, artifact, threads, providers, ov_device)
        pre = self.manifest.preprocess
        self.text: TextEncoder | None = (
            TextEncoder(self.path, pre) if isinstance(pre, TextPreprocess) else None
        )
        self.self_test: dict[str, Any] | None = None
        if self_test:
            enforce(self.path, self.check_self_test())
        self.classifier = Classifier(self)
        self.detector = AnomalyDetector(self)
        self.tasks: dict[str, Classifier] = {
            t.name: Classifier(self, t) for t in self.manifest.tasks or []
        }
        """A multi-task bundle's classifier per task (empty for one task): each learns on
        its own (``model.tasks["type"].add(...)``); :attr:`classifier` is the joint head."""

    def check_self_test(self) -> dict[str, Any] | None:
        """Run the bundle's self-test on this host (its reference images through the engine,
        compared with their FP32 embeddings); the result, also kept in :attr:`self_test`.
        None when the bundle has none. Does not refuse: see
        :func:`edge_tl.runtime.selftest.enforce`."""
        self.self_test = run_self_test(self.path, self.manifest, self.engine)
        return self.self_test

    @property
    def modality(self) -> str:
        """``text`` for a text encoder's bundle (inputs are strings), else ``image``."""
        return self.manifest.modality

    @property
    def task(self) -> Task:
        """``anomaly`` when the bundle has an anomaly bank, else ``classify``."""
        return "anomaly" if self.detector.state is not None else "classify"

    # ---- what it takes ------------------------------------------------------------------
    def wrong_input(self, what: str) -> EdgeTLError:
        """The error for inputs of the other modality; ``what`` says what was given
        (``"trec6 is text data"``)."""
        if self.modality == "text":
            return EdgeTLError(
                f"bundle {self.path} is a text model ({self.manifest.backbone}), and {what}; "
                "pass --text/--text-file or text data (.csv/.tsv/.jsonl, a folder "
                f"<class>/<file>.txt, or {', '.join(NAMED_SETS)})"
            )
        return EdgeTLError(
            f"bundle {self.path} is an image model ({self.manifest.backbone}), and {what}; "
            "pass images (files, or an ImageFolder <class>/<image>)"
        )

    def require_patches(self) -> None:
        """Refuse a text bundle where image patch features are needed (anomaly banks).

        Raises:
            EdgeTLError: a text bundle, with what it does instead.
        """
        if self.modality == "text":
            raise EdgeTLError(
                f"bundle {self.path} is a text model ({self.manifest.backbone}); anomaly "
                "banks are built from image patch features. Classify texts with `edge-tl "
                "learn` and `edge-tl predict --text`"
            )

    def open_data(
        self,
        data: str | Path | Dataset,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
        images: Callable[..., Dataset] = open_dataset,
    ) -> Dataset:
        """A labelled data set of this bundle's modality: for a text bundle read by
        :func:`edge_tl.texts.open_text_dataset` (``text_column`` / ``label_column``, default
        ``text`` / ``label``), for an image bundle by ``images`` (an ImageFolder reader; on a
        multi-task bundle also a labels ``.csv``, read by ``images`` too).

        Raises:
            EdgeTLError: data of the other modality (images for a text bundle, text for an
                image bundle), column names for an image bundle, or what the reader raises.
        """
        if isinstance(data, Dataset):
            if data.modality != self.modality:
                raise self.wrong_input(f"the data set {data.name} holds {data.unit}s")
            return data
        if self.tasks and str(data).lower().endswith(".csv"):  # a multi-task labels file
            return images(data, skip_bad=skip_bad)
        if self.modality == "text":
            if not is_text_source(data) and _holds_images(data):
                raise self.wrong_input(f"{data} holds images")
            return open_text_dataset(data, text_column or "text", label_column or "label", skip_bad)
        if is_text_source(data):
            raise self.wrong_input(f"{data} is text data")
        if text_column is not None or label_column is not None:
            flag = "--text-column" if text_column is not None else "--label-column"
            raise EdgeTLError(
                f"{flag} names a column of text data; bundle {self.path} is an image model "
                f"({self.manifest.backbone}) and reads image folders: drop it"
            )
        return images(data, skip_bad=skip_bad)

    # ---- the engine ---------------------------------------------------------------------
    def input_row(self) -> np.ndarray:
        """This thread's preallocated ``float32[3, size, size]`` for one image's input
        (batch-1 answers write into it instead of allocating per image; each thread has its
        own, so concurrent predictions never share one)."""
        row = getattr(self._rows, "row", None)
        if row is None:
            size = self.manifest.preprocess.size  # type: ignore[union-attr]
            row = self._rows.row = np.empty((3, size, size), np.float32)
        return row

    def batches(
        self,
        images: Sequence[ImageLike] | Sequence[str],
        outputs: tuple[str, ...],
        batch_size: int = 16,
        desc: str | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The engine's ``outputs`` for ``images`` (or texts, on a text bundle: ``embedding``
        is then pooled from the encoder's token vectors), ``batch_size`` at a time."""
        if self.text is None:
            # decoded by a thread pool a batch ahead of the engine (same inputs, same order)
            pre = self.manifest.preprocess
            batches = input_batches(images, pre, batch_size)
            n = -(-len(images) // batch_size)
            for x in progress(batches, desc=desc, total=n) if desc else batches:
                yield self.engine.run(x, outputs)
            return
        starts = range(0, len(images), batch_size)
        for i in progress(starts, desc=desc) if desc else starts:
            yield {EMBEDDING: self.embed_texts(images[i : i + batch_size])}

    def engine_inputs(
        self, items: Sequence[ImageLike] | Sequence[str]
    ) -> tuple[Inputs, tuple[str, ...]]:
        """``(inputs, outputs)`` of one engine call on ``items``: preprocessed images and
        ``("embedding",)``, or a text bundle's tokenized texts and its encoder output (to time
        the engine alone: ``model.engine.run(*model.engine_inputs(items))``)."""
        if self.text is None:
            return batch_inputs(items, self.manifest.preprocess), (EMBEDDING,)
        return self.text.encode(items), (self.text.pre.hidden_output,)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``float32[N, D]`` embeddings of ``texts`` in one engine call: tokenized by the
        bundle's tokenizer, pooled as its manifest says (:mod:`edge_tl.runtime.text`).

        Raises:
            EdgeTLError: an image bundle, or an empty text.
        """
        if self.text is None:
            raise EdgeTLError(
                f"bundle {self.path} is an image model ({self.manifest.backbone}); it takes "
                "images, not texts"
            )
        pre = self.text.pre
        inputs = self.text.encode(texts)
        hidden = self.engine.run(inputs, (pre.hidden_output,))[pre.hidden_output]
        return pool(hidden, inputs["attention_mask"], pre)

    def embed(
        self,
        images: Sequence[ImageLike] | Sequence[str],
        batch_size: int = 16,
        desc: str | None = None,
    ) -> np.ndarray:
        """Pooled embeddings ``float32[N, D]`` of image files or PIL images (or of texts, on
        a text bundle)."""
        out = [o[EMBEDDING] for o in self.batches(images, (EMBEDDING,), batch_size, desc)]
        dim = self.manifest.outputs[EMBEDDING][-1]
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def patch_features(
        self,
        images: Sequence[ImageLike],
        stages: tuple[str, ...] = anomaly.DEFAULT_STAGES,
        pool: int = anomaly.DEFAULT_POOL,
        batch_size: int = 16,
        desc: str | None = None,
    ) -> np.ndarray:
        """``float32[N, H*W, C]`` locally aware patch features (see :mod:`.patchcore`).

        Raises:
            EdgeTLError: a text bundle, or the bundle has no such output.
        """
        self.require_patches()
        missing = [s for s in stages if s not in self.manifest.outputs]
        if missing:
            raise EdgeTLError(
                f"bundle {self.path} has no {', '.join(missing)} output (it has "
                f"{', '.join(self.manifest.outputs)}); re-export it with `edge-tl export`"
            )
        out = [
            patchcore.patch_features(o, stages, pool)
            for o in self.batches(images, stages, batch_size, desc)
        ]
        return np.concatenate(out)

    def adapt(
        self,
        target: str | Path | Dataset | Sequence[str] | None = None,
        method: str = "coral",
        reg: float = 1.0,
        skip_bad: bool = False,
        off: bool = False,
    ) -> Any:
        """Align this bundle's embeddings to unlabelled ``target`` images (a new camera or
        line) as a new head version, or with ``off`` turn the alignment off (also a new
        version); see :meth:`Classifier.adapt` and :mod:`edge_tl.runtime.align`. Returns the
        new :class:`~edge_tl.runtime.head_state.HeadState`.

        Example:
            >>> Model("bundle").adapt("new_camera/", method="coral")  # doctest: +SKIP

        Raises:
            EdgeTLError: both or neither of ``target`` and ``off``, or what
                :meth:`Classifier.adapt` raises.
        """
        if off == (target is not None):
            raise EdgeTLError(
                "give TARGET (unlabelled images to align to) or --off, not both or neither"
            )
        if off:
            return self.classifier.adapt_off()
        return self.classifier.adapt(target, method, reg, skip_bad)

    # ---- the face the bundle is set up for ----------------------------------------------
    def predict(
        self,
        images: Sequence[ImageLike],
        top_k: int = 1,
        task: Task | None = None,
        maps_dir: str | Path | None = None,
        class_threshold: Mapping[str, float] | None = None,
    ) -> list[Prediction] | list[Verdict] | list[TaskPrediction]:
        """Classify images, or score them for anomalies on a bundle with a bank (``task``
        forces one); ``maps_dir`` writes anomaly overlays; ``class_threshold``
        (``{CLASS: T}``) calls CLASS when its probability is ``>= T``
        (:meth:`Classifier.predict`).

        Raises:
            EdgeTLError: ``maps_dir`` on a classification; ``class_threshold`` on an anomaly
                bank or a multi-task bundle.
        """
        return faces.predict(self, images, top_k, task, maps_dir, class_threshold)

    def predict_tasks(self, images: Sequence[ImageLike], top_k: int = 1) -> list[TaskPrediction]:
        """Every task's answer per image of a multi-task bundle: one engine run (batch 1),
        then each task's head.

        Raises:
            EdgeTLError: a bundle without tasks, or ``top_k`` below 1.
        """
        return faces.predict_tasks(self, images, top_k)

    def evaluate(
        self,
        data: str | Path | Dataset,
        split: str = "all",
        maps_dir: str | Path | None = None,
        skip_bad: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
        min_recall: Mapping[str, float] | None = None,
        class_threshold: Mapping[str, float] | None = None,
    ) -> Evaluation | AnomalyEvaluation | TaskEvaluation:
        """Accuracy on a labelled data set, or anomaly AUROC on an MVTec-layout folder.

        Args:
            data: a :class:`Dataset`, an ImageFolder path, ``"elpv"``, or an MVTec-layout
                folder (``test/good``, ``test/<defect>``; needs an anomaly bank); on a text
                bundle, text data (:func:`edge_tl.texts.open_text_dataset`).
            split: ``all``, or the run's ``train`` / ``val`` / ``test`` split (the split
                recorded in the manifest, on the same data set only).
            maps_dir: anomaly overlays are written here.
            skip_bad: leave bad image files of a folder (bad rows of a text file) out
                (listed in the result's ``skipped``) instead of stopping on the first.
            text_column: text data: the column holding the text (default ``text``).
            label_column: text data: the column holding the class (default ``label``).
            min_recall: classification: ``{CLASS: R}``, an operating point per class
                (:meth:`Classifier.evaluate`); choose it on ``split="val"``.
            class_threshold: classification: ``{CLASS: T}``, the rule every figure is
                measured under; check a chosen threshold on ``split="test"``.

        Raises:
            EdgeTLError: a folder the bundle cannot be evaluated on, with the reason; a
                ``min_recall`` / ``class_threshold`` on an anomaly or multi-task
                evaluation, or for a class the head lacks or ``data`` has no images of.
        """
        return faces.evaluate(
            self,
            data,
            split,
            maps_dir,
            skip_bad,
            text_column,
            label_column,
            min_recall,
            class_threshold,
        )


def _holds_images(data: str | Path) -> bool:
    """Image data by its name: ``elpv``, an image file, or a folder that is not text data."""
    path = Path(data)
    if is_named_image_set(data):
        return True
    return path.is_dir() or is_image_name(path)
