"""Image files: which files of a folder every command reads (one rule), and opening one
safely (a pixel limit, Pillow's warnings kept off the terminal, every failure one typed
error). Torch-free; a floor module, so the workstation and the device read files alike.

The folder rule, for every command that reads a folder (``train``, ``learn``, ``anomaly``,
``evaluate``, ``export --calib``):

- hidden and operating-system files and folders are ignored: names starting with ``.``
  (``.DS_Store``, macOS's ``._*`` resource forks), ``Thumbs.db``, ``ehthumbs.db``,
  ``desktop.ini``, ``__MACOSX``, ``$RECYCLE.BIN``, ``System Volume Information``;
- every other file is an image by its extension, in any case (``.JPG``, ``.Png``):
  :data:`~edge_tl.spec.IMAGE_EXTENSIONS`;
- any other file, or an image that does not decode (truncated, not an image, over the
  pixel limit), is a bad file: the command stops and names it, or with ``--skip-bad`` skips
  it and lists it (:class:`Skipped`).

The pixel limit (a guard against decompression bombs: a 200 KB PNG can claim 13,400 x
13,400 pixels, 540 MB decoded) is :data:`DEFAULT_MAX_PIXELS`, or the environment variable
``EDGE_TL_MAX_PIXELS``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageOps

from edge_tl.errors import EdgeTLError
from edge_tl.spec import IMAGE_EXTENSIONS

__all__ = [
    "DECODE_THREADS_ENV",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "SKIPPED",
    "BadImageError",
    "Skipped",
    "check_images",
    "decode_ahead",
    "decode_workers",
    "decoding",
    "entries",
    "folder_images",
    "ignored",
    "image_size",
    "is_image_name",
    "list_images",
    "max_pixels",
    "read_image",
]

SKIPPED = "skipped"
"""The key under which results list the files skipped under ``--skip-bad``."""
MAX_PIXELS_ENV = "EDGE_TL_MAX_PIXELS"
DECODE_THREADS_ENV = "EDGE_TL_DECODE_THREADS"
T = TypeVar("T")
DEFAULT_MAX_PIXELS = 120_000_000
"""Width x height above which an image is refused: every camera sensor sold (108 MP phones,
65 MP industrial cameras) fits, 360 MB as 8-bit RGB."""

_OS_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
_OS_FOLDERS = frozenset({"__macosx", "$recycle.bin", "system volume information"})


class BadImageError(EdgeTLError):
    """One file that is not a readable image (``path``, ``reason``); a folder command stops
    on it, or skips it with ``--skip-bad``."""

    def __init__(self, path: Any, reason: str, fix: str = "remove or replace the file") -> None:
        super().__init__(f"{path} {reason}; {fix}")
        self.path, self.reason, self.fix = str(path), reason, fix


@dataclass(frozen=True)
class Skipped:
    """A file a folder command skipped under ``--skip-bad``, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


# ---- the folder rule ------------------------------------------------------------------
def ignored(path: str | os.PathLike) -> bool:
    """True for hidden and operating-system files and folders (see the module docstring)."""
    name = Path(path).name
    low = name.lower()
    return name.startswith(".") or low in _OS_FILES or low in _OS_FOLDERS


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file's extension, in any case, is one of ``IMAGE_EXTENSIONS``."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def entries(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(files, folders)`` directly in ``folder``, sorted, without ignored names.

    Every command lists folders through this one function.
    """
    files, dirs = [], []
    for p in sorted(Path(folder).iterdir()):
        if ignored(p):
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            files.append(p)
    return files, dirs


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The files of ``folder`` with an image extension (ignored names left out), sorted.

    A listing only; :func:`check_images` decides which of a folder's files are usable.
    """
    return [p for p in entries(folder)[0] if is_image_name(p)]


def folder_images(
    folder: str | os.PathLike, skip_bad: bool = False
) -> tuple[list[str], list[Skipped]]:
    """The usable images of a flat folder (``(paths, skipped)``): its files by the folder
    rule, each decoded once by :func:`check_images`. Subfolders are not looked into.

    Raises:
        BadImageError: a file that is not a readable image (not ``skip_bad``).
    """
    return check_images(entries(folder)[0], skip_bad)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file's header (nothing decoded).

    Raises:
        BadImageError: not an image.
    """
    with decoding(path), Image.open(path) as f:
        return f.size


SKIP_BAD_HINT = "or pass --skip-bad to leave bad files out"


def check_images(
    files: Sequence[str | os.PathLike], skip_bad: bool = False
) -> tuple[list[str], list[Skipped]]:
    """Decode every file once, before any work: ``(usable paths, skipped files)``.

    A file without an image extension, or one that does not decode (see
    :func:`read_image`), stops the check with :class:`BadImageError` naming it, or with
    ``skip_bad`` is left out and listed. JPEGs are decoded at 1/8 scale (libjpeg reads the
    whole stream either way, so truncation is still found; about 0.5 ms for 200 x 200), by
    a thread pool (:func:`decode_ahead`).

    Raises:
        BadImageError: the first bad file, when not ``skip_bad``.
    """
    kept: list[str] = []
    skipped: list[Skipped] = []
    # decoded by a thread pool; the verdicts come back in file order, so the file named is
    # the first bad one, as in a loop
    for f, bad in zip(files, decode_ahead(files, _check_one), strict=True):
        if bad is not None:
            if not skip_bad:
                raise BadImageError(bad.path, bad.reason, f"{bad.fix}, {SKIP_BAD_HINT}")
            skipped.append(Skipped(str(f), bad.reason))
            continue
        kept.append(str(f))
    return kept, skipped


def _check_one(f: str | os.PathLike) -> BadImageError | None:
    """The reason ``f`` is a bad file, or None."""
    try:
        if not is_image_name(f):
            raise BadImageError(
                f,
                f"is not an image file (extension {Path(f).suffix or '(none)'}; images "
                f"are {', '.join(IMAGE_EXTENSIONS)} in any case)",
                "move it out of the folder",
            )
        read_image(f, draft=True)
    except BadImageError as e:
        return e
    return None


# ---- opening one image ----------------------------------------------------------------
def max_pixels() -> int:
    """The pixel limit in force: ``EDGE_TL_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        EdgeTLError: the variable is not a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    if not raw.isdigit() or int(raw) < 1:
        raise EdgeTLError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a pixel count; set it to "
            f"a positive integer (default {DEFAULT_MAX_PIXELS:,})"
        )
    return int(raw)


@contextmanager
def _pillow_quiet(limit: int) -> Iterator[None]:
    """Pillow's own warnings (size, corrupt EXIF, palette transparency) stay off the
    terminal: an image decodes correctly or is refused by :func:`read_image`, so the
    warnings add nothing a user can act on. edge_tl's limit is checked by
    :func:`read_image`; Pillow's own (an error above twice ``Image.MAX_IMAGE_PIXELS``) is
    raised only when ``EDGE_TL_MAX_PIXELS`` asks for more than it allows."""
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        # module-scoped, so that were catch_warnings' restore to interleave across threads,
        # only Pillow's warnings would stay silenced
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        yield


def _over_limit(src: Any, pixels: int, limit: int, size: str = "") -> BadImageError:
    needed = -(-pixels // 1_000_000) * 1_000_000
    return BadImageError(
        src,
        f"is {size}{pixels:,} pixels, over edge_tl's limit of {limit:,} (a guard against "
        "decompression bombs)",
        f"if the image is genuine, raise the limit with {MAX_PIXELS_ENV}={needed}",
    )


@contextmanager
def decoding(src: Any) -> Iterator[None]:
    """Decoding or converting ``src`` within: Pillow quiet (see :func:`_pillow_quiet`) and
    every failure one typed error naming ``src``.

    Raises:
        EdgeTLError: ``src`` does not exist or is a folder.
        BadImageError: anything else Pillow raises on it.
    """
    try:
        with _pillow_quiet(max_pixels()):
            yield
    except (EdgeTLError, KeyboardInterrupt):
        raise
    except FileNotFoundError:
        raise EdgeTLError(f"image {src} does not exist; check the path") from None
    except IsADirectoryError:
        raise EdgeTLError(f"{src} is a folder; pass image files (e.g. {src}/*.jpg)") from None
    except Image.DecompressionBombError as e:  # Pillow's check (at twice its own limit) ran
        # first, in Image.open; it names the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
        raise _over_limit(src, pixels, max_pixels()) from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on bad data
        # (OSError, SyntaxError, ValueError, struct.error, IndexError, EOFError, ...)
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        reason = f"is not a readable image ({type(e).__name__}{': ' + detail if detail else ''})"
        raise BadImageError(src, reason) from None


def read_image(
    src: str | os.PathLike | Any, draft: bool = False, reduce_to: int | None = None
) -> Image.Image:
    """Decode an image file (or a binary file object): its first frame, EXIF orientation
    applied, in the file's own mode (``RGB``, ``L``, ``I;16``, ``P``, ``CMYK``, ...).

    Args:
        draft: JPEGs decoded at reduced scale, orientation not applied (a check only).
        reduce_to: a JPEG at least twice this size on both sides is decoded at 1/2, 1/4
            or 1/8 scale in the DCT domain (libjpeg's scaled IDCT, through Pillow's
            ``Image.draft``), the strongest reduction that keeps both sides at least
            ``reduce_to`` pixels; other files and smaller JPEGs decode at full size. The
            pixels differ from a full decode followed by a resize (the scaled IDCT is a
            box filter in the DCT domain), so this is a preprocessing choice that the
            workstation and the device must share (:attr:`edge_tl.spec.Preprocess.draft`).

    Raises:
        EdgeTLError: the file does not exist or is a folder.
        BadImageError: not an image, truncated or damaged, or over the pixel limit (the
            message says how to raise it).
    """
    limit = max_pixels()
    with decoding(src), Image.open(src) as f:
        w, h = f.size
        if w * h > limit:
            raise _over_limit(src, w * h, limit, f"{w:,} x {h:,} = ")
        if draft:
            if f.format == "JPEG":
                f.draft(f.mode, (max(1, w // 8), max(1, h // 8)))
            f.load()
            return f
        if reduce_to is not None and f.format == "JPEG" and min(w, h) >= 2 * reduce_to:
            f.draft(f.mode, (reduce_to, reduce_to))
        # in place: no copy of the decoded pixels when there is nothing to turn
        ImageOps.exif_transpose(f, in_place=True)
        return f


def decode_ahead(
    files: Sequence[Any],
    decode: Callable[[Any], T],
    workers: int | None = None,
    ahead: int | None = None,
) -> Iterator[T]:
    """``decode(f)`` for every file, in order, computed by a thread pool a few files ahead
    of the consumer (Pillow releases the GIL while it decodes and resizes, so decoding
    overlaps the consumer's work and runs on several cores).

    The first exception in file order is raised where its result would have been yielded;
    work queued behind it is cancelled. Pillow's warnings stay quiet in every worker (see
    :func:`decoding`). ``workers`` defaults to :func:`decode_workers`; with 0 (or one file)
    the files are decoded one after another in the calling thread, as they are consumed.
    ``ahead`` (default ``4 x workers``): at most this many files are queued or decoded
    beyond the last one consumed.
    """
    workers = decode_workers() if workers is None else workers
    if workers < 1 or len(files) <= 1:
        yield from map(decode, files)
        return
    # one filter set around the pool: each worker's own ``decoding`` nests inside it, so
    # however their enter/exit interleave, every state restored still silences Pillow
    with _pillow_quiet(max_pixels()), ThreadPoolExecutor(workers) as pool:
        ahead = max(1, 4 * workers if ahead is None else ahead)
        pending: deque[Future[T]] = deque()
        it = iter(files)
        try:
            for f in it:
                pending.append(pool.submit(decode, f))
                if len(pending) >= ahead:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(pool.submit(decode, nxt))
                yield result
        finally:
            for fut in pending:
                fut.cancel()


_END = object()


def decode_workers(beside_engine: bool = False) -> int:
    """Decoding threads: ``EDGE_TL_DECODE_THREADS`` when set (0: decode in the calling
    thread), else from the cores this process may use: all of them (at most 8) for decoding
    alone (checking a folder, hashing images, one batch), half of them (1 to 4) beside an
    engine that uses every core itself (``beside_engine``; a 16-image batch decodes several
    times faster than the engine runs it, so one thread keeps ahead of it on 2 cores, and
    more would only take cores from the engine).

    Raises:
        EdgeTLError: the variable is not a whole number.
    """
    raw = os.environ.get(DECODE_THREADS_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise EdgeTLError(
                f"{DECODE_THREADS_ENV}={raw!r} is not a thread count; set it to a whole number "
                "(0 decodes in the calling thread)"
            )
        return int(raw)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2)) if beside_engine else max(1, min(8, cores))
