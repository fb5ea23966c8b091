"""Anomaly heat maps drawn over their images, for a person to look at. Torch-free (Pillow).

The PNG holds the image beside itself under the anomaly map (15 % opaque where the map is
0, up to 75 % at 1.5x the threshold), the verdict and score printed above, and the true
defect outlined in green when a mask is known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["overlay", "write_overlay"]

GOOD, ANOMALOUS = "good", "anomalous"


def _heat(v: np.ndarray) -> np.ndarray:
    """``v`` in [0, 1] -> RGB uint8 (dark blue -> cyan -> yellow -> red)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [230, 0, 0]], np.float32)
    pos = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def overlay(
    image: Image.Image, amap: np.ndarray, threshold: float, score: float, mask: np.ndarray | None
) -> Image.Image:
    """The image beside itself under the anomaly map (``float[H, W]`` at the image's size;
    15 % opaque at 0, up to 75 % at 1.5x ``threshold``), the true defect outlined in green
    when a mask (``bool[H, W]``) is given."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    v = np.clip(amap / (1.5 * max(threshold, 1e-6)), 0, 1)
    alpha = (0.15 + 0.6 * v)[..., None]
    blend = rgb * (1 - alpha) + _heat(v).astype(np.float32) * alpha
    if mask is not None:
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        blend[mask & ~inner] = (0, 255, 0)
    w, h = image.size
    out = Image.new("RGB", (2 * w + 4, h + 16), "white")
    out.paste(Image.fromarray(rgb.astype(np.uint8)), (0, 16))
    out.paste(Image.fromarray(blend.astype(np.uint8)), (w + 4, 16))
    verdict = ANOMALOUS if score > threshold else GOOD
    ImageDraw.Draw(out).text((2, 2), f"{verdict}  score {score:.2f} / {threshold:.2f}", "black")
    return out


def write_overlay(
    path: Path,
    image: Image.Image,
    amap: np.ndarray,
    threshold: float,
    score: float,
    mask: np.ndarray | None = None,
) -> Path:
    """:func:`overlay` saved as a PNG at ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, amap, threshold, score, mask).save(path)
    return path
