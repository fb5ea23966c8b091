"""Domain-shift protocols: the source / target splits every domain-adaptation measurement
uses, and a simulated camera change (torch-free; numpy and Pillow).

Unsupervised domain adaptation (Ganin & Lempitsky 2015; the protocol of thuml's
Transfer-Learning-Library) trains on labelled *source* images and unlabelled *target*
images, and is scored on labelled target images it never saw. :func:`target_split` makes
that split of a target set (stratified, by seed): ``unlabeled`` (adaptation) and ``test``
(scoring). :func:`camera_shift` makes a target domain from any image set: the same scenes
through a different imaging chain (gamma, optics blur, a lower-resolution sensor and read
noise), as when a line's camera or lens is replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from edge_tl.data import Dataset, stratified_split
from edge_tl.errors import EdgeTLError

__all__ = ["CameraShift", "camera_shift", "split_domains", "target_split", "write_camera_shift"]


class CameraShift:
    """One imaging chain: ``gamma`` (output = input ** gamma on [0, 1]), Gaussian blur of
    ``blur`` pixels (radius), down-up scaling by ``scale`` (bilinear; 0.5 = half the
    resolution), additive Gaussian read noise of ``noise`` grey levels (std, 0-255)."""

    def __init__(
        self, gamma: float = 0.6, blur: float = 1.0, scale: float = 0.5, noise: float = 8.0
    ) -> None:
        if not (gamma > 0 and blur >= 0 and 0 < scale <= 1 and noise >= 0):
            raise EdgeTLError(
                f"camera shift gamma={gamma}, blur={blur}, scale={scale}, noise={noise} is "
                "invalid; use gamma > 0, blur >= 0, 0 < scale <= 1, noise >= 0"
            )
        self.gamma, self.blur, self.scale, self.noise = gamma, blur, scale, noise

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        """The image as the other camera sees it (RGB, same size); ``seed`` draws the noise."""
        img = image.convert("RGB")
        w, h = img.size
        if self.scale < 1:
            small = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
            img = img.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
        if self.blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(self.blur))
        x = np.asarray(img, np.float32) / 255.0
        x = np.power(x, self.gamma) * 255.0
        if self.noise > 0:
            x = x + np.random.default_rng(seed).normal(0.0, self.noise, x.shape)
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def camera_shift(image: Image.Image, seed: int = 0) -> Image.Image:
    """:class:`CameraShift` with its defaults (gamma 0.6, blur 1 px, half resolution, noise 8)."""
    return CameraShift()(image, seed)


def split_domains(ds: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Two disjoint halves of ``ds`` (stratified by class, by ``seed``): the source, and the
    images that become the target after a simulated camera change."""
    idx = stratified_split(ds.labels, 0.5, 0.0, seed)
    return ds.subset(idx["train"]), ds.subset(idx["test"])


def target_split(target: Dataset, test_frac: float = 0.25, seed: int = 0) -> dict[str, Dataset]:
    """``{"unlabeled": ..., "test": ...}``: target images to adapt on (their labels unused)
    and held-out labelled target images to score on (stratified, by ``seed``)."""
    idx = stratified_split(target.labels, test_frac, 0.0, seed)
    return {"unlabeled": target.subset(idx["train"]), "test": target.subset(idx["test"])}


def write_camera_shift(
    ds: Dataset, out: str | Path, shift: CameraShift | None = None, seed: int = 0
) -> Path:
    """Write ``ds`` as seen by another camera to the ImageFolder ``out`` (``<class>/<name>.png``,
    lossless so the chain is the only change); the noise of image ``i`` is drawn with
    ``seed + i``. Returns ``out``.

    Raises:
        EdgeTLError: ``out`` exists and is not empty (nothing is overwritten).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgeTLError(f"{out} exists and is not empty; pass a new folder")
    shift = shift or CameraShift()
    for i, (path, label) in enumerate(zip(ds.paths, ds.labels, strict=True)):
        folder = out / ds.classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            shift(img, seed + i).save(folder / f"{Path(path).stem}.png")
    return out
