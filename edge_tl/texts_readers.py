"""Labelled texts per format, for :mod:`edge_tl.texts`: the rows of a CSV/TSV table or a
JSON Lines file, a folder ``<class>/<file>.txt``, bad rows named (or left out under
``skip_bad``), and the :class:`~edge_tl.data.Dataset` they make.

Torch-free, a floor module.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import Skipped, entries
from edge_tl.labels import check_labels
from edge_tl.texts_encoding import (
    _bad_char,
    _decode,
    _encoding_problem,
    _read_bytes,
    _save_as_utf8,
)

__all__ = ["TABLE_SUFFIXES", "TEXT_SUFFIXES"]

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
"""Table files by extension, and their separator."""
JSONL = ".jsonl"
TXT = ".txt"
TEXT_SUFFIXES = (*TABLE_SUFFIXES, JSONL, TXT)
"""File extensions that hold text (``.txt``: one text per line for
:func:`edge_tl.texts.read_texts`)."""

SKIP_BAD_HINT = "or pass --skip-bad to leave bad rows out"


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
