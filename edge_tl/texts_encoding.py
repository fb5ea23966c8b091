"""Reading a text file as UTF-8: a UTF-8 byte-order mark allowed; bytes that are not UTF-8,
NUL bytes and a UTF-16 byte-order mark refused in one line naming the line and the byte,
with the fix (for :mod:`edge_tl.texts`).

Torch-free, a floor module.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from edge_tl.errors import EdgeTLError

__all__: list[str] = []

_BAD_CHAR = re.compile("[\udc80-\udcff\x00]")  # undecodable bytes (surrogateescape) or NUL


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
