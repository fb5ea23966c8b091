"""The good images a memory bank learns from: the folder they come from, whether there are
enough of them for the false-alarm rate asked for, and which are copies of another.

Torch-free. Why both matter (the threshold is wrong without an error otherwise) is told in
:mod:`edge_tl.runtime.anomaly`'s docstring; the figures are from
``benchmarks/anomaly_calibration.py``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import Skipped, decode_ahead, folder_images
from edge_tl.runtime.preprocess import ImageLike, load_image
from edge_tl.spec import IMAGE_EXTENSIONS

__all__ = [
    "CALIBRATION_CONFIDENCE",
    "GOOD",
    "calibration_warning",
    "good_images",
    "image_digest",
    "images_needed",
    "supported_false_alarm",
    "unique_images",
]

GOOD = "good"
CALIBRATION_CONFIDENCE = 0.95
"""The chance, at least, that some good image lies beyond the target quantile."""


# ---- how many good images, and which are copies --------------------------------------------
def images_needed(false_alarm: float, confidence: float = CALIBRATION_CONFIDENCE) -> int:
    """Good images needed to calibrate a threshold for ``false_alarm``: the smallest ``n``
    with ``(1 - false_alarm) ** n <= 1 - confidence``, i.e. at least one of them lies beyond
    the true ``1 - false_alarm`` quantile with probability ``confidence`` (about
    ``3 / false_alarm`` at 95 %: 299 for 0.01, 59 for 0.05, 29 for 0.1)."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-false_alarm))


def supported_false_alarm(n: int, confidence: float = CALIBRATION_CONFIDENCE) -> float:
    """The lowest false-alarm rate ``n`` good images calibrate (the inverse of
    :func:`images_needed`): ``1 - (1 - confidence) ** (1 / n)``."""
    return 1.0 - (1.0 - confidence) ** (1.0 / max(n, 1))


def calibration_warning(n: int, false_alarm: float, bundle: str = "BUNDLE") -> str | None:
    """A one-line warning when ``n`` good images are too few for ``false_alarm`` (see the
    module docstring), else None; ``bundle`` is named in the fix."""
    need = images_needed(false_alarm)
    if n >= need:
        return None
    can = math.ceil(supported_false_alarm(n) * 1000) / 1000
    return (
        f"the threshold for {false_alarm:.1%} false alarms is calibrated on {n} good images; "
        f"that rate needs at least {need} (with fewer, no good image may lie beyond it and "
        f"the threshold falls to about the highest score seen, so more good parts are "
        f"flagged): add good images with `edge-tl anomaly {bundle} MORE_GOOD --add`, or set "
        f"--false-alarm {can:g} (what {n} images calibrate)"
    )


def image_digest(src: ImageLike) -> bytes:
    """SHA-256 of an image's decoded pixels (mode, size and bytes, after EXIF orientation):
    equal for byte-identical files and for the same picture in another format or with
    other metadata; 32 bytes.

    Raises:
        EdgeTLError: the image cannot be read.
    """
    img = load_image(src)
    h = hashlib.sha256(f"{img.mode} {img.size[0]}x{img.size[1]}\n".encode())
    h.update(img.tobytes())
    return h.digest()


def unique_images(
    images: list[Any], known: np.ndarray | None = None
) -> tuple[list[Any], np.ndarray, list[dict[str, str]]]:
    """The images that are not copies of an earlier one (in ``images``, or among the
    ``known`` digests ``uint8[K, 32]`` of a bank's images).

    Returns:
        ``(kept images, their digests uint8[M, 32], [{"image", "same_as"}] dropped)``.
    """
    bank = () if known is None else known
    seen: dict[bytes, str] = {bytes(d): "an image already in the bank" for d in bank}
    kept, digests, dropped = [], [], []
    # hashed by a thread pool (decoding is most of it), compared in order
    for src, d in zip(images, decode_ahead(images, image_digest), strict=True):
        name = str(src) if not hasattr(src, "size") else "<image>"
        if d in seen:
            dropped.append({"image": name, "same_as": seen[d]})
            continue
        seen[d] = name
        kept.append(src)
        digests.append(np.frombuffer(d, np.uint8))
    return kept, np.array(digests, np.uint8).reshape(-1, 32), dropped


# ---- input ----------------------------------------------------------------------------
def good_images(folder: str | Path, skip_bad: bool = False) -> tuple[list[str], list[Skipped]]:
    """``(paths, skipped)``: the good images of a flat folder, or of an MVTec-layout folder's
    ``train/good``, by the folder rule of :mod:`edge_tl.images` (each decoded once; with
    ``skip_bad`` bad files are left out and listed).

    Raises:
        EdgeTLError: no such folder, or no images in it.
        BadImageError: a file that is not a readable image (not ``skip_bad``).
    """
    root = Path(folder)
    if not root.is_dir():
        raise EdgeTLError(f"good-image folder {root} does not exist; pass a folder of images")
    if (root / "train").is_dir() or (root / "test").is_dir():
        good = root / "train" / "good"
        if not good.is_dir():
            raise EdgeTLError(
                f"{root} looks like an MVTec folder but has no train/good; put the good "
                f"training images in {good}, or pass a flat folder of good images"
            )
        root = good
    paths, skipped = folder_images(root, skip_bad)
    if not paths and not skipped and (root / GOOD).is_dir():
        raise EdgeTLError(
            f"{root} has no images but a {GOOD} folder; pass {root / GOOD} (or the MVTec root "
            f"above {root.name})"
        )
    if not paths:
        raise EdgeTLError(
            f"{root} has no "
            + (f"readable images ({len(skipped)} skipped)" if skipped else "images")
            + f" ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of good images"
        )
    return paths, skipped
