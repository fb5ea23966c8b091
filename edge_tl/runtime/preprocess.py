"""Image decoding and preprocessing in numpy/Pillow, rebuilt from the manifest's data.

The workstation uses these same functions, so training, export checks and the device
see identical input tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_tl.errors import EdgeTLError
from edge_tl.spec import IMAGE_EXTENSIONS, Preprocess

__all__ = ["IMAGE_EXTENSIONS", "batch_inputs", "load_image", "to_input"]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

ImageLike = str | os.PathLike | Image.Image


def load_image(src: ImageLike) -> Image.Image:
    """Open any image as 8-bit RGB with its EXIF orientation applied.

    Raises:
        EdgeTLError: the file is missing or is not a readable image.
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            with Image.open(src) as f:
                img = ImageOps.exif_transpose(f)
                img.load()
        except FileNotFoundError:
            raise EdgeTLError(f"image {src} does not exist; check the path") from None
        except (UnidentifiedImageError, OSError) as e:
            raise EdgeTLError(
                f"{src} is not a readable image ({type(e).__name__}); remove or replace the file"
            ) from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB") if img.mode != "RGB" else img


def to_input(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """One RGB image -> ``float32[3, size, size]`` normalised as the manifest says."""
    if pre.resize != "squash":
        raise EdgeTLError(f"resize mode {pre.resize!r} is not supported; re-export the bundle")
    img = img.resize((pre.size, pre.size), _RESAMPLE[pre.interpolation])
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def batch_inputs(images: Sequence[ImageLike], pre: Preprocess) -> np.ndarray:
    """Decode and preprocess a list of images into ``float32[N, 3, size, size]``."""
    return np.stack([to_input(load_image(i), pre) for i in images])
