"""Image decoding and preprocessing in numpy/Pillow, rebuilt from the manifest's data.

The workstation uses these same functions, so training, export checks and the device
see identical input tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageChops

from edge_tl.errors import EdgeTLError
from edge_tl.images import decoding, read_image
from edge_tl.spec import IMAGE_EXTENSIONS, Preprocess

__all__ = ["IMAGE_EXTENSIONS", "batch_inputs", "load_image", "to_input", "to_pixels"]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

ImageLike = str | os.PathLike | Image.Image


def load_image(src: ImageLike) -> Image.Image:
    """Open any image as 8-bit RGB, or 8-bit grey (``L``), with its EXIF orientation applied.

    Grey stays grey until :func:`to_input` (3x cheaper to resize), and so does an RGB file
    whose three channels are equal; every other mode (palette, RGBA, CMYK, 16-bit, float)
    becomes RGB. The input tensor is the same either way.

    Files are opened by :func:`edge_tl.images.read_image`: the first frame, the pixel
    limit (``EDGE_TL_MAX_PIXELS``), no Pillow warning on the terminal.

    Raises:
        EdgeTLError: the file is missing or a folder.
        BadImageError: not a readable image, or over the pixel limit (a subclass of
            :class:`EdgeTLError`).
    """
    if isinstance(src, Image.Image):
        return _rgb_or_grey(src)
    img = read_image(src)
    with decoding(src):  # conversions too can fail (LAB) or warn (palette transparency)
        return _rgb_or_grey(img)


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


def to_input(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """One image -> ``float32[3, size, size]`` normalised as the manifest says.

    Grey images are replicated to three channels (the manifest's ``colour`` is RGB).
    """
    if pre.resize != "squash":
        raise EdgeTLError(f"resize mode {pre.resize!r} is not supported; re-export the bundle")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if img.size != (pre.size, pre.size):
        img = img.resize((pre.size, pre.size), _RESAMPLE[pre.interpolation])
    pixels = np.asarray(img)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # views, no copy
    out = np.empty((3, pre.size, pre.size), np.float32)
    np.subtract(pixels, np.asarray(pre.mean, np.float32)[:, None, None], out=out, dtype=np.float32)
    out *= (1.0 / np.asarray(pre.std, np.float32))[:, None, None]
    return out


def to_pixels(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """One image -> ``uint8[3, size, size]`` resized as :func:`to_input` does, not normalised.

    Training augments these pixels before normalising them.
    """
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if img.size != (pre.size, pre.size):
        img = img.resize((pre.size, pre.size), _RESAMPLE[pre.interpolation])
    pixels = np.asarray(img)
    if pixels.ndim == 2:
        return np.broadcast_to(pixels, (3, *pixels.shape)).copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def normalise_pixels(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``uint8[N, 3, size, size]`` from :func:`to_pixels` -> the model input, bit-identical to
    :func:`to_input` of the same images."""
    out = np.empty(pixels.shape, np.float32)
    np.subtract(pixels, np.asarray(pre.mean, np.float32)[:, None, None], out=out, dtype=np.float32)
    out *= (1.0 / np.asarray(pre.std, np.float32))[:, None, None]
    return out


def batch_inputs(images: Sequence[ImageLike], pre: Preprocess) -> np.ndarray:
    """Decode and preprocess a list of images into ``float32[N, 3, size, size]``."""
    return np.stack([to_input(load_image(i), pre) for i in images])
