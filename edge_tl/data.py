"""Datasets as lists of (image path, label): ImageFolder and the ELPV package, the one image
listing and the one split every part of edge_tl uses. Torch-free.

Folders are checked up front (missing, empty class, non-image file), so a bad data set
fails before any work starts.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_tl.errors import EdgeTLError
from edge_tl.spec import IMAGE_EXTENSIONS, SplitRecord, check_labels

__all__ = [
    "ELPV",
    "Dataset",
    "elpv",
    "fingerprint",
    "image_folder",
    "list_images",
    "open_dataset",
    "split",
    "stratified_split",
]

ELPV = "elpv"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """Image paths with integer labels into ``classes``; ``meta`` per sample (ELPV cell type)."""

    name: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    meta: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray | list[int]) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        meta = [self.meta[i] for i in idx] if self.meta else []
        return Dataset(
            self.name, self.classes, [self.paths[i] for i in idx], self.labels[idx], meta
        )


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (by extension, hidden files skipped), sorted.

    Every flat folder of images edge_tl reads (calibration images, good images for an
    anomaly bank, an MVTec ``test/<type>`` folder) is listed by this one function.
    """
    return [p for p in _visible_files(Path(folder)) if p.suffix.lower() in IMAGE_EXTENSIONS]


def image_folder(root: str | Path, check_images: bool = True) -> Dataset:
    """Read an ImageFolder: ``root/<class>/<image>``. Hidden files are ignored.

    Raises:
        EdgeTLError: missing folder, no class folders, a folder name that is not a valid class
            name (:data:`~edge_tl.spec.LABEL_RULE`), an empty class, a non-image file.

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
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise EdgeTLError(
            f"{root} has no class folders; lay it out as {root}/<class name>/<image files>"
        )
    check_labels([d.name for d in class_dirs], f"class folders of {root}", fix="rename the folder")
    paths, labels = [], []
    for label, d in enumerate(class_dirs):
        files = _visible_files(d)
        if not files:
            raise EdgeTLError(f"class folder {d} is empty; add images or remove the folder")
        for p in files:
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                raise EdgeTLError(
                    f"{p} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                    "move it out of the data folder"
                )
            if check_images:
                _check_header(p)
            paths.append(str(p))
            labels.append(label)
    return Dataset(root.name, [d.name for d in class_dirs], paths, np.asarray(labels, np.int64))


def _check_header(p: Path) -> None:
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018 - reading the header is the check
    except (UnidentifiedImageError, OSError) as e:
        raise EdgeTLError(
            f"{p} is not a readable image ({type(e).__name__}); remove or replace the file"
        ) from None


def elpv(threshold: float = 0.5) -> Dataset:
    """The ELPV solar-cell electroluminescence set from the ``elpv-dataset`` package.

    2,624 300x300 cells; ``defective`` when the defect probability >= ``threshold``
    (0.5, as in Deitsch et al. 2019); the cell type (mono/poly) is kept in ``meta``.
    """
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeTLError("the ELPV data set needs its package: pip install 'edge_tl[train]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows = []
    with open(folder / "labels.csv") as f:
        for line in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if line:
                rows.append(line)
    paths = [str(folder / r[0]) for r in rows]
    labels = np.asarray([int(float(r[1]) >= threshold) for r in rows], np.int64)
    meta = [{"type": r[2], "defect_probability": r[1]} for r in rows]
    return Dataset(ELPV, ["functional", "defective"], paths, labels, meta)


def open_dataset(spec: str | Path) -> Dataset:
    """``"elpv"`` for the ELPV package, otherwise an ImageFolder path."""
    if str(spec) == ELPV and not Path(spec).exists():
        return elpv()
    return image_folder(spec)


def fingerprint(ds: Dataset) -> str:
    """SHA-256 of the class names and file names, in order: a split by seed is only the same
    split when this is unchanged."""
    import hashlib

    h = hashlib.sha256()
    for path, label in zip(ds.paths, ds.labels, strict=True):
        h.update(f"{ds.classes[label]}/{Path(path).name}\n".encode())
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
        n_test = int(round(test_frac * len(idx)))
        n_val = int(round(val_frac * len(idx)))
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test : n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val :].tolist()
    return {k: np.asarray(sorted(v), np.int64) for k, v in out.items()}


def split(ds: Dataset, record: SplitRecord) -> dict[str, np.ndarray]:
    """The one split of ``ds`` into ``train`` / ``val`` / ``test`` index arrays.

    Training, export (head refit, held-out checks), ``evaluate --split`` and the demo all
    call this, so a split named by a :class:`~edge_tl.spec.SplitRecord` is the same
    everywhere: :func:`stratified_split` by ``record.seed``, then the training split capped
    at ``record.train_per_class`` images per class (0: no cap).

    Example:
        >>> split(ds, SplitRecord(test_frac=0.2, val_frac=0.1, seed=0))["test"]  # doctest: +SKIP
    """
    splits = stratified_split(ds.labels, record.test_frac, record.val_frac, record.seed)
    if record.train_per_class:
        tr = splits["train"]
        keep = [tr[ds.labels[tr] == k][: record.train_per_class] for k in range(len(ds.classes))]
        splits["train"] = np.sort(np.concatenate(keep))
    return splits
