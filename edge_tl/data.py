"""Datasets as lists of (image path, label): ImageFolder and the ELPV package, the one image
listing and the one split every part of edge_tl uses. Torch-free. Text data sets are the
same :class:`Dataset` with ``modality="text"``, read by :mod:`edge_tl.texts`.

Folders are read by the one folder rule of :mod:`edge_tl.images` and checked up front
(missing, empty class, a file that is not a readable image), so a bad data set fails before
any work starts, or with ``skip_bad`` runs without its bad files and lists them.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import Skipped, entries, is_image_name, list_images
from edge_tl.images import check_images as decode_all
from edge_tl.spec import SplitRecord, check_labels

__all__ = [
    "ELPV",
    "ELPV_SUBSETS",
    "Dataset",
    "is_named_image_set",
    "elpv",
    "fingerprint",
    "image_folder",
    "list_images",
    "open_dataset",
    "check_split",
    "split",
    "split_sizes",
    "stratified_split",
]

ELPV = "elpv"
ELPV_SUBSETS = {"elpv:mono": "mono", "elpv:poly": "poly"}
"""Named ELPV subsets by cell type (monocrystalline / polycrystalline), from the package's
metadata: the two domains of a solar-cell line (different textures, same defect classes)."""
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """Image paths with integer labels into ``classes``; ``meta`` per sample (ELPV cell type).

    A text data set (``modality="text"``, :func:`edge_tl.texts.open_text_dataset`) holds the
    texts themselves in ``paths`` (also :attr:`texts`).
    """

    name: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    meta: list[dict[str, str]] = field(default_factory=list)
    skipped: tuple[Skipped, ...] = ()
    """Bad files (rows of a text file) left out under ``skip_bad``."""
    modality: str = "image"
    """``image`` (``paths`` are image files) or ``text`` (``paths`` are the texts)."""
    tasks: Any = None
    """A multi-task data set's :class:`edge_tl.multitask.TaskSet` (``labels`` then index the
    joint classes, one per combination of task classes); None for one task."""
    strata: np.ndarray | None = None
    """What :func:`split` stratifies by, when not ``labels`` (a task read from a multi-label
    source keeps the split of the source's joint classes: :mod:`edge_tl.multitask`)."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def texts(self) -> list[str]:
        """The texts of a text data set.

        Raises:
            EdgeTLError: an image data set.
        """
        if self.modality != "text":
            raise EdgeTLError(f"data set {self.name} holds images, not texts")
        return self.paths

    @property
    def unit(self) -> str:
        """What one sample is, for messages: ``image`` or ``text``."""
        return "text" if self.modality == "text" else "image"

    def subset(self, idx: np.ndarray | list[int]) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        meta = [self.meta[i] for i in idx] if self.meta else []
        paths = [self.paths[i] for i in idx]
        return Dataset(
            self.name,
            self.classes,
            paths,
            self.labels[idx],
            meta,
            self.skipped,
            self.modality,
            self.tasks,
            None if self.strata is None else self.strata[idx],
        )


def image_folder(root: str | Path, check_images: bool = True, skip_bad: bool = False) -> Dataset:
    """Read an ImageFolder: ``root/<class>/<image>``, by the folder rule of
    :mod:`edge_tl.images` (hidden and OS files ignored, extensions in any case).

    With ``check_images`` every image is decoded once up front, so a bad file stops the
    command before any work; ``skip_bad`` leaves bad files out instead and lists them in
    :attr:`Dataset.skipped`.

    Raises:
        EdgeTLError: missing folder, no class folders, a folder name that is not a valid class
            name (:data:`~edge_tl.spec.LABEL_RULE`), an empty class.
        BadImageError: a file that is not a readable image (not ``skip_bad``).

    Example:
        >>> ds = image_folder("../shared/data/neu_det")  # doctest: +SKIP
        >>> ds.classes[:2]  # doctest: +SKIP
        ['crazing', 'inclusion']
    """
    root = Path(root)
    if not root.is_dir():
        raise EdgeTLError(
            f"data folder {root} does not exist; pass a folder of <class>/<image> files"
        )
    class_dirs = entries(root)[1]
    if not class_dirs:
        raise EdgeTLError(
            f"{root} has no class folders; lay it out as {root}/<class name>/<image files>"
        )
    check_labels([d.name for d in class_dirs], f"class folders of {root}", fix="rename the folder")
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[Skipped] = []
    for label, d in enumerate(class_dirs):
        files = entries(d)[0]
        if not files:
            raise EdgeTLError(f"class folder {d} is empty; add images or remove the folder")
        if check_images:
            kept, bad = decode_all(files, skip_bad)
            skipped += bad
            if not kept:
                raise EdgeTLError(
                    f"class folder {d} has no readable image ({len(bad)} skipped); add images "
                    "or remove the folder"
                )
        else:
            kept = [str(p) for p in files if is_image_name(p)]
        paths += kept
        labels += [label] * len(kept)
    return Dataset(
        root.name,
        [d.name for d in class_dirs],
        paths,
        np.asarray(labels, np.int64),
        skipped=tuple(skipped),
    )


def elpv(threshold: float = 0.5, cell_type: str | None = None) -> Dataset:
    """The ELPV solar-cell electroluminescence set from the ``elpv-dataset`` package.

    2,624 300x300 cells; ``defective`` when the defect probability >= ``threshold``
    (0.5, as in Deitsch et al. 2019); the cell type (mono/poly) is kept in ``meta``.
    ``cell_type`` ``"mono"`` (1,074 cells) or ``"poly"`` (1,550) keeps that type only; its
    name is then ``elpv:mono`` / ``elpv:poly``.
    """
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeTLError("the ELPV data set needs its package: pip install 'edge_tl[train]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows = []
    with open(folder / "labels.csv") as f:
        for line in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if line and (cell_type is None or line[2] == cell_type):
                rows.append(line)
    paths = [str(folder / r[0]) for r in rows]
    labels = np.asarray([int(float(r[1]) >= threshold) for r in rows], np.int64)
    meta = [{"type": r[2], "defect_probability": r[1]} for r in rows]
    name = ELPV if cell_type is None else f"{ELPV}:{cell_type}"
    return Dataset(name, ["functional", "defective"], paths, labels, meta)


def is_named_image_set(spec: str | Path) -> bool:
    """``elpv``, ``elpv:mono`` or ``elpv:poly`` given by name (a path of that name wins)."""
    return (str(spec) == ELPV or str(spec) in ELPV_SUBSETS) and not Path(spec).exists()


def open_dataset(
    spec: str | Path, skip_bad: bool = False, tasks: Sequence[str] | None = None
) -> Dataset:
    """``"elpv"`` (or ``"elpv:mono"`` / ``"elpv:poly"``) for the ELPV package, otherwise an
    ImageFolder path (see :func:`image_folder` for ``skip_bad``). With ``tasks``, the labels
    of those tasks from a multi-label source (:func:`edge_tl.multitask.open_tasks`)."""
    if tasks:
        from edge_tl.multitask import open_tasks

        return open_tasks(spec, tasks, skip_bad)
    if is_named_image_set(spec):
        return elpv(cell_type=ELPV_SUBSETS.get(str(spec)))
    return image_folder(spec, skip_bad=skip_bad)


def fingerprint(ds: Dataset) -> str:
    """SHA-256 of the class names and file names (of a text data set: the texts), in order:
    a split by seed is only the same split when this is unchanged."""
    import hashlib

    h = hashlib.sha256()
    for path, label in zip(ds.paths, ds.labels, strict=True):
        if ds.modality == "text":  # a text may hold any character, so each is length-prefixed
            item = f"{ds.classes[label]}\0{len(path)}\0{path}\n"
        else:
            item = f"{ds.classes[label]}/{Path(path).name}\n"
        h.update(item.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def stratified_split(
    labels: np.ndarray, test_frac: float, val_frac: float = 0.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-class shuffled split into ``train``/``val``/``test`` index arrays.

    ``val_frac`` is a fraction of the whole set. Each class keeps its share in every split.
    """
    if not 0 < test_frac < 1 or not 0 <= val_frac < 1 - test_frac:
        raise EdgeTLError(
            f"split fractions test={test_frac}, val={val_frac} are invalid; "
            "use 0 < test < 1 and 0 <= val < 1 - test"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        _, n_val, n_test = split_sizes(len(idx), test_frac, val_frac)
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test : n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val :].tolist()
    return {k: np.asarray(sorted(v), np.int64) for k, v in out.items()}


def split_sizes(n: int, test_frac: float, val_frac: float = 0.0) -> tuple[int, int, int]:
    """``(train, val, test)`` counts :func:`stratified_split` gives a class of ``n``."""
    n_test, n_val = int(round(test_frac * n)), int(round(val_frac * n))
    return n - n_test - n_val, n_val, n_test


def check_split(ds: Dataset, record: SplitRecord) -> None:
    """Refuse a split that leaves a class out of the training or the test split.

    Each class needs one example to learn from and one to be measured on; with few
    examples, :func:`stratified_split`'s rounding gives it none (a class of 1, or of 2 at
    ``test_frac`` 0.2).

    Raises:
        EdgeTLError: naming the first such class, its count and the count it needs.
    """
    t, v = record.test_frac, record.val_frac

    def fits(n: int) -> bool:
        train, _, test = split_sizes(n, t, v)
        return train >= 1 and test >= 1

    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    for name, count in zip(ds.classes, counts.tolist(), strict=True):
        if count and not fits(count):
            need = next((n for n in range(count + 1, count + 10_000) if fits(n)), None)
            unit, least = ds.unit, f"at least {need}" if need else "more"
            raise EdgeTLError(
                f"class {name!r} of {ds.name} has {count} {unit}{'s' if count != 1 else ''}; "
                f"the split asked (test {t:g}, val {v:g}) needs {least} {unit}s of it, "
                f"so that the class is in both the training and the test split; add {unit}s "
                f"of {name!r}, leave the class out, or change --test-frac/--val-frac"
            )


def split(ds: Dataset, record: SplitRecord) -> dict[str, np.ndarray]:
    """The one split of ``ds`` into ``train`` / ``val`` / ``test`` index arrays.

    Training, export (head refit, held-out checks), ``evaluate --split`` and the demo all
    call this, so a split named by a :class:`~edge_tl.spec.SplitRecord` is the same
    everywhere: :func:`stratified_split` by ``record.seed``, then the training split capped
    at ``record.train_per_class`` images per class (0: no cap).

    Example:
        >>> split(ds, SplitRecord(test_frac=0.2, val_frac=0.1, seed=0))["test"]  # doctest: +SKIP
    """
    check_split(ds, record)
    strata = ds.labels if ds.strata is None else ds.strata
    splits = stratified_split(strata, record.test_frac, record.val_frac, record.seed)
    if record.train_per_class:
        tr = splits["train"]
        keep = [tr[ds.labels[tr] == k][: record.train_per_class] for k in range(len(ds.classes))]
        splits["train"] = np.sort(np.concatenate(keep))
    return splits
