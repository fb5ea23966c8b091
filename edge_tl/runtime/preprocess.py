"""Image decoding and preprocessing in numpy/Pillow, rebuilt from the manifest's data.

The workstation uses these same functions, so training, export checks and the device
see identical input tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops

from edge_tl.errors import EdgeTLError
from edge_tl.images import decode_ahead, decode_workers, decoding, read_image
from edge_tl.spec import IMAGE_EXTENSIONS, Preprocess

__all__ = [
    "IMAGE_EXTENSIONS",
    "batch_inputs",
    "input_batches",
    "load_image",
    "pixels_of",
    "prepare",
    "to_input",
    "to_pixels",
]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

ImageLike = str | os.PathLike | Image.Image


def load_image(src: ImageLike, pre: Preprocess | None = None) -> Image.Image:
    """Open any image as 8-bit RGB, or 8-bit grey (``L``), with its EXIF orientation applied.

    Grey stays grey until :func:`to_input` (3x cheaper to resize), and so does an RGB file
    whose three channels are equal; every other mode (palette, RGBA, CMYK, 16-bit, float)
    becomes RGB. The input tensor is the same either way.

    Files are opened by :func:`edge_tl.images.read_image`: the first frame, the pixel
    limit (``EDGE_TL_MAX_PIXELS``), no Pillow warning on the terminal. With ``pre`` whose
    ``draft`` is on, a JPEG at least twice the input size is decoded at reduced scale in
    the DCT domain (see :class:`~edge_tl.spec.Preprocess`); without ``pre``, or with
    ``draft`` off (every bundle exported so far), at full size.

    Raises:
        EdgeTLError: the file is missing or a folder.
        BadImageError: not a readable image, or over the pixel limit (a subclass of
            :class:`EdgeTLError`).
    """
    if isinstance(src, Image.Image):
        return _rgb_or_grey(src)
    reduce_to = pre.size if pre is not None and pre.draft else None
    with decoding(src):  # conversions too can fail (LAB) or warn (palette transparency)
        return _rgb_or_grey(read_image(src, reduce_to=reduce_to))


def _rgb_or_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Fixed scales, never the image's own range: 16/32-bit integers are 16-bit data,
        # float images are 0..1 intensities.
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB" and _is_grey(img):
        return img.convert("L")  # exact for R == G == B; resizing one channel is 3x cheaper
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _is_grey(img: Image.Image) -> bool:
    """True when every pixel has R == G == B (grey cameras often save RGB files)."""
    r, g, b = img.split()
    return ImageChops.difference(r, g).getbbox() is None and (
        ImageChops.difference(g, b).getbbox() is None
    )


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean[3, 1, 1], 1 / std[3, 1, 1])`` as float32, built once per preprocessing."""
    m = np.asarray(mean, np.float32)[:, None, None]
    inv = (1.0 / np.asarray(std, np.float32))[:, None, None]
    m.flags.writeable = inv.flags.writeable = False
    return m, inv


def _resized(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """``uint8[1 or 3, size, size]`` channel-first view of ``img`` resized as ``pre`` says."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if img.size != (pre.size, pre.size):
        img = img.resize((pre.size, pre.size), _RESAMPLE[pre.interpolation])
    pixels = np.asarray(img)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # views, no copy


def to_input(img: Image.Image, pre: Preprocess, out: np.ndarray | None = None) -> np.ndarray:
    """One image -> ``float32[3, size, size]`` normalised as the manifest says.

    Grey images are replicated to three channels (the manifest's ``colour`` is RGB).

    Args:
        out: a preallocated ``float32[3, size, size]`` (e.g. one row of a batch) written in
            place and returned; by default a new array.

    Raises:
        EdgeTLError: a resize mode this runtime does not know, or ``out`` of another shape.
    """
    if pre.resize != "squash":
        raise EdgeTLError(f"resize mode {pre.resize!r} is not supported; re-export the bundle")
    shape = (3, pre.size, pre.size)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise EdgeTLError(f"to_input writes float32{list(shape)}, not {out.dtype}{list(out.shape)}")
    mean, inv_std = _affine(pre.mean, pre.std)
    pixels = _resized(img, pre)
    if pixels.shape[0] == 1 and _same_channels(pre):  # grey: one plane computed, copied
        np.subtract(pixels[0], mean[0], out=out[0], dtype=np.float32)
        out[0] *= inv_std[0]
        out[1:] = out[0]
        return out
    np.subtract(pixels, mean, out=out, dtype=np.float32)
    out *= inv_std
    return out


def _same_channels(pre: Preprocess) -> bool:
    return len(set(pre.mean)) == 1 and len(set(pre.std)) == 1


def prepare(src: ImageLike, pre: Preprocess, out: np.ndarray | None = None) -> np.ndarray:
    """``to_input(load_image(src, pre), pre, out)``: a file (or PIL image) -> its model input
    ``float32[3, size, size]``, decoded as ``pre`` says (``draft``)."""
    return to_input(load_image(src, pre), pre, out)


def to_pixels(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """One image -> ``uint8[3, size, size]`` resized as :func:`to_input` does, not normalised.

    Training augments these pixels before normalising them.
    """
    pixels = _resized(img, pre)
    if pixels.shape[0] == 1:
        return np.broadcast_to(pixels, (3, *pixels.shape[1:])).copy()
    return np.ascontiguousarray(pixels)


def pixels_of(src: ImageLike, pre: Preprocess) -> np.ndarray:
    """``to_pixels(load_image(src, pre), pre)``: a file -> ``uint8[3, size, size]`` decoded
    as ``pre`` says (``draft``), for training and export checks."""
    return to_pixels(load_image(src, pre), pre)


def normalise_pixels(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``uint8[N, 3, size, size]`` from :func:`to_pixels` -> the model input, bit-identical to
    :func:`to_input` of the same images."""
    mean, inv_std = _affine(pre.mean, pre.std)
    out = np.empty(pixels.shape, np.float32)
    np.subtract(pixels, mean, out=out, dtype=np.float32)
    out *= inv_std
    return out


def batch_inputs(
    images: Sequence[ImageLike], pre: Preprocess, out: np.ndarray | None = None
) -> np.ndarray:
    """Decode and preprocess a list of images into ``float32[N, 3, size, size]`` (into
    ``out`` when given, a preallocated array of that shape), decoded by a thread pool
    (:func:`edge_tl.images.decode_ahead`).

    Raises:
        EdgeTLError: ``out`` of another shape, or a file that does not decode (the first in
            order).
    """
    shape = (len(images), 3, pre.size, pre.size)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise EdgeTLError(
            f"batch_inputs writes float32{list(shape)}, not {out.dtype}{list(out.shape)}"
        )
    rows = list(enumerate(images))
    for _ in decode_ahead(rows, lambda row: prepare(row[1], pre, out[row[0]])):
        pass
    return out


def input_batches(
    images: Sequence[ImageLike], pre: Preprocess, batch_size: int, workers: int | None = None
) -> Iterator[np.ndarray]:
    """Model inputs ``float32[<=batch_size, 3, size, size]`` for ``images``, in order, decoded
    by a thread pool that runs ahead of the consumer: while the engine runs one batch the
    next ones are decoded (Pillow releases the GIL), so a folder goes through at close to
    the engine's own batch throughput. Identical to :func:`batch_inputs` of each chunk.

    A yielded array's memory is reused a few batches later: copy it to keep it.

    Raises:
        EdgeTLError: a file that does not decode (the first in order), raised when its batch
            is reached; decoding queued behind it is cancelled.
    """
    n = len(images)
    workers = decode_workers(beside_engine=True) if workers is None else workers
    ahead = batch_size + 2 * workers  # the next batch decodes while the engine runs this one
    # the slots a batch's rows may be written to while it is in the engine's hands: this
    # one, and every batch the pool may reach ``ahead`` images past the last one consumed
    ring = [
        np.empty((min(batch_size, n), 3, pre.size, pre.size), np.float32)
        for _ in range(2 + -(-ahead // batch_size))
    ]

    def decode(i: int) -> int:
        prepare(images[i], pre, ring[(i // batch_size) % len(ring)][i % batch_size])
        return i

    done = decode_ahead(range(n), decode, workers, ahead)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        for _ in range(start, stop):
            next(done)
        yield ring[(start // batch_size) % len(ring)][: stop - start]
