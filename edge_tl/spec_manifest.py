"""The bundle's ``manifest.json`` as frozen dataclasses: :class:`Manifest` and its records
(:class:`Artifact`, :class:`HeadEntry`, :class:`TaskEntry`, :class:`SelfTestSpec`,
:class:`Source`, :class:`SplitRecord`), every field checked on read, and the names in the
graph it describes.

Torch-free, a floor module; re-exported by :mod:`edge_tl.spec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_tl.errors import EdgeTLError
from edge_tl.labels import check_label, check_labels
from edge_tl.spec_fields import FIX, _fits, _from_dict, _one_of, _short
from edge_tl.spec_preprocess import Preprocess, TextPreprocess, read_preprocess
from edge_tl.spec_recipes import RECIPE_FORMATS, RECIPE_PRECISIONS, SELF_TEST_MODES

__all__ = [
    "EMBEDDING",
    "FEATURES_S8",
    "FEATURES_S16",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "Artifact",
    "HeadEntry",
    "Manifest",
    "SelfTestSpec",
    "Source",
    "SplitRecord",
    "TaskEntry",
]

FORMAT_VERSION = 1
"""Bundle and run-folder format version; readers refuse other versions."""

INPUT_NAME = "image"
EMBEDDING = "embedding"
FEATURES_S8 = "features_s8"
FEATURES_S16 = "features_s16"


@dataclass(frozen=True)
class Artifact:
    """The backbone artifact of a bundle and how to run it."""

    format: str  # "onnx" | "openvino"
    precision: str  # "fp32" | "fp16" | "int8"
    files: tuple[str, ...]  # first file is the one the engine opens
    recipe: str
    engine_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("artifact", "format", self.format, RECIPE_FORMATS)
        _one_of("artifact", "precision", self.precision, RECIPE_PRECISIONS)
        if not self.files:
            raise EdgeTLError("artifact: files is empty; it names the file the engine opens")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "artifact", fix: str = FIX) -> Artifact:
        a = _from_dict(cls, d, where, fix)
        return dataclasses.replace(a, files=tuple(a.files))


@dataclass(frozen=True)
class SplitRecord:
    """How a data set is split into train / val / test (see :func:`edge_tl.data.split`).

    Stratified per class by ``seed``; ``val_frac`` and ``test_frac`` are shares of the whole
    set; ``train_per_class`` caps the training split (0: no cap). ``data_fingerprint`` (the
    SHA-256 of class and file names, :func:`edge_tl.data.fingerprint`) says which data set
    the split belongs to: the same seed on other files is another split.
    """

    test_frac: float
    val_frac: float
    seed: int
    train_per_class: int = 0
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.seed < 0 or self.train_per_class < 0:
            raise EdgeTLError(
                f"split: seed = {_short(self.seed)} and train_per_class = "
                f"{_short(self.train_per_class)} must be 0 or more"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "split", fix: str = FIX) -> SplitRecord:
        return _from_dict(cls, d, where, fix)


SOURCE_KINDS = ("run", "imagenet", "pretrained")


@dataclass(frozen=True)
class Source:
    """Where a bundle came from: a training run (``kind="run"``), or a pretrained backbone
    exported without training: an image backbone with its ImageNet classifier
    (``kind="imagenet"``) or a text encoder without a head (``kind="pretrained"``)."""

    kind: str
    weights_sha256: str | None = None
    run: str | None = None
    strategy: str | None = None
    data: str | None = None
    split: SplitRecord | None = None
    pytorch_test_accuracy: float | None = None

    def __post_init__(self) -> None:
        _one_of("source", "kind", self.kind, SOURCE_KINDS)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "source", fix: str = FIX) -> Source:
        s = _from_dict(cls, d, where, fix)
        split = s.split
        if isinstance(split, dict):
            split = SplitRecord.from_dict(split, f"{where} split", fix)
        return dataclasses.replace(s, split=split)


@dataclass(frozen=True)
class HeadEntry:
    """The head exported with the bundle: a linear head in ``file`` (plain arrays),
    fitted on the artifact's own embeddings (``fit_on="artifact"``) or the run's own
    (``"source"``); ``exemplars`` names the artifact embeddings of a few training images
    per class that stand for the known classes when the device adds one."""

    kind: str
    file: str
    fit_on: str
    exemplars: str | None = None

    def __post_init__(self) -> None:
        _one_of("head", "kind", self.kind, ("linear",))
        _one_of("head", "fit_on", self.fit_on, ("artifact", "source"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "head", fix: str = FIX) -> HeadEntry:
        return _from_dict(cls, d, where, fix)


@dataclass(frozen=True)
class TaskEntry:
    """One task of a multi-task bundle: its name, its classes and its head (fitted on the
    bundle's shared artifact embeddings like the single head; see :class:`HeadEntry`)."""

    name: str
    labels: list[str]
    head: HeadEntry

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "task", fix: str = FIX) -> TaskEntry:
        t = _from_dict(cls, d, where, fix)
        check_label(t.name, f"{where} name", fix=fix)
        check_labels(t.labels, f"{where} {t.name} labels", fix=fix, written=True)
        return dataclasses.replace(t, head=HeadEntry.from_dict(t.head, f"{where} head", fix))


@dataclass(frozen=True)
class SelfTestSpec:
    """The bundle's self-test: reference images with FP32 embeddings in ``file``; the device
    refuses (``on_fail="refuse"``) or warns when its own embeddings of them reach a mean
    cosine below ``min_cosine`` (``export_cosine`` was reached on ``export_host``)."""

    file: str
    min_cosine: float
    export_cosine: float
    export_host: str
    on_fail: str = "refuse"

    def __post_init__(self) -> None:
        _one_of("self_test", "on_fail", self.on_fail, SELF_TEST_MODES)
        if not (-1 <= self.min_cosine <= 1 and -1 <= self.export_cosine <= 1):
            raise EdgeTLError(
                f"self_test: min_cosine = {_short(self.min_cosine)} and export_cosine = "
                f"{_short(self.export_cosine)} are cosines, in [-1, 1]"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "self_test", fix: str = FIX) -> SelfTestSpec:
        return _from_dict(cls, d, where, fix)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle (see DESIGN: the bundle contract).

    ``tasks`` (multi-task bundles only; absent from the file otherwise, and a bundle without
    it is one task): one :class:`TaskEntry` per task, each with its own head on the one
    shared artifact. ``labels`` and ``head`` are then the joint classes (one per combination
    of task classes, ``defective+mono``) and their head, which the export's accuracy
    control checked; the device answers per task.
    """

    format_version: int
    edge_tl_version: str
    backbone: str
    input_name: str
    preprocess: Preprocess | TextPreprocess
    outputs: dict[str, list[Any]]
    artifact: Artifact
    labels: list[str]
    head: HeadEntry | None
    metrics: dict[str, Any]
    source: Source
    files: dict[str, str]
    self_test: SelfTestSpec | None = None
    tasks: list[TaskEntry] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["tasks"] is None:  # a one-task manifest is written as before
            del d["tasks"]
        if d["preprocess"].get("draft") is False:  # so is one that decodes at full size
            del d["preprocess"]["draft"]
        return d

    @property
    def modality(self) -> str:
        """``text`` for a text encoder's bundle, else ``image``."""
        return "text" if isinstance(self.preprocess, TextPreprocess) else "image"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in ``d`` (parsed ``manifest.json``), every field checked.

        Raises:
            EdgeTLError: another format version, or a field missing, unknown, of the wrong
                type or against a rule (:meth:`check`); one line naming the field.
        """
        if not isinstance(d, dict):
            raise EdgeTLError(
                f"manifest.json holds {_short(d)}, not a table of fields; re-export the bundle"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeTLError(
                f"bundle format version {version!r} is not supported by this edge_tl "
                f"(reads version {FORMAT_VERSION}); re-export the bundle with this version"
            )
        where, fix = "manifest.json", "re-export the bundle"
        m = _from_dict(cls, d, where, fix)
        check_labels(m.labels, "labels of manifest.json", fix=fix, written=True)
        m = dataclasses.replace(
            m,
            preprocess=read_preprocess(m.preprocess, f"{where} preprocess", fix),
            artifact=Artifact.from_dict(m.artifact, f"{where} artifact", fix),
            head=None if m.head is None else HeadEntry.from_dict(m.head, f"{where} head", fix),
            source=Source.from_dict(m.source, f"{where} source", fix),
            self_test=None
            if m.self_test is None
            else SelfTestSpec.from_dict(m.self_test, f"{where} self_test", fix),
            tasks=None
            if m.tasks is None
            else [TaskEntry.from_dict(t, f"{where} task", fix) for t in m.tasks],
        )
        m.check()
        return m

    def check(self) -> None:
        """The rules across fields: every output is ``["batch", dims...]`` with an
        ``embedding``; every file is a relative path inside the bundle with a SHA-256; every
        file the manifest names is one of them (so its hash is checked).

        Raises:
            EdgeTLError: naming the first field that breaks a rule.
        """
        where = "manifest.json"
        if EMBEDDING not in self.outputs:
            raise EdgeTLError(f"{where}: outputs has no {EMBEDDING!r}; re-export the bundle")
        for name, shape in self.outputs.items():
            if not (
                len(shape) >= 2
                and shape[0] == "batch"
                and all(_fits(n, int) and n > 0 for n in shape[1:])
            ):
                raise EdgeTLError(
                    f"{where}: outputs {_short(name)} = {_short(shape)} is not "
                    "['batch', positive sizes...]"
                )
        for rel, digest in self.files.items():
            parts = rel.split("/")
            if rel.startswith("/") or "\\" in rel or "\0" in rel or {"", ".", ".."} & set(parts):
                raise EdgeTLError(
                    f"{where}: files names {_short(rel)}, which is not a relative path inside "
                    "the bundle; re-export the bundle"
                )
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise EdgeTLError(
                    f"{where}: files {_short(rel)} = {_short(digest)} is not a SHA-256 "
                    "(64 hex digits); re-export the bundle"
                )
        named = [*self.artifact.files]
        if isinstance(self.preprocess, TextPreprocess):
            named.append(self.preprocess.tokenizer)
        if self.head is not None:
            named += [self.head.file, *([self.head.exemplars] if self.head.exemplars else [])]
        if self.self_test is not None:
            named.append(self.self_test.file)
        for task in self.tasks or []:
            named += [task.head.file, *([task.head.exemplars] if task.head.exemplars else [])]
        if self.tasks is not None and (
            len(self.tasks) < 2 or len({t.name for t in self.tasks}) != len(self.tasks)
        ):
            raise EdgeTLError(
                f"{where}: tasks must name two or more different tasks; re-export the bundle"
            )
        for rel in named:
            if rel not in self.files:
                raise EdgeTLError(
                    f"{where}: {_short(rel)} is named but has no SHA-256 in files; "
                    "re-export the bundle"
                )
