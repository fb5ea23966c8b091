"""Augmentation for inspection images, on batches of pixels in torch (CPU or GPU).

Presets: ``inspection`` (grey parts under a fixed camera: both flips, small rotations and
shifts, brightness/contrast, a little blur; nothing colour-based), ``natural`` (horizontal
flips only, plus saturation on colour images), ``none``. ``auto`` (the default) picks
``inspection`` for grey data and ``natural`` for colour data. Any field can be overridden:
``--augment "inspection,rotate=5,blur=0"``.

Randomness comes from a ``torch.Generator`` the caller owns, so a resumed run draws the
same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_tl.errors import EdgeTLError

__all__ = ["PRESETS", "Augment", "augment", "normalise", "parse_augment"]


@dataclass(frozen=True)
class Augment:
    """Augmentation strengths. Probabilities for flips and blur; ranges for the rest.

    ``rot90``: the probability of a quarter, half or three-quarter turn (one of the three
    at random; with both flips at 0.5 and ``rot90`` 0.75 every one of the square's eight
    symmetries is equally likely). ``rotate`` is in degrees (uniform in ±rotate), ``shift``
    a fraction of the image side, ``brightness``/``contrast``/``saturation`` relative
    (factor in 1 ± value).
    """

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    rotate: float = 0.0
    shift: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    blur: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or v < 0:
                raise EdgeTLError(f"augmentation {f.name}={v!r} must be a number >= 0")
        for name in ("hflip", "vflip", "rot90", "blur"):
            if getattr(self, name) > 1:
                raise EdgeTLError(f"augmentation {name} is a probability; use a value in 0..1")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


PRESETS = {
    "none": Augment(),
    "inspection": Augment(
        hflip=0.5, vflip=0.5, rotate=10.0, shift=0.05, brightness=0.2, contrast=0.2, blur=0.1
    ),
    "natural": Augment(
        hflip=0.5, rotate=10.0, shift=0.05, brightness=0.2, contrast=0.2, saturation=0.2
    ),
}


def parse_augment(text: str, grey: bool) -> Augment:
    """``"auto"``, a preset name, or ``"preset,key=value,..."`` -> :class:`Augment`.

    On grey data, colour jitter (saturation) is always off.

    Raises:
        EdgeTLError: unknown preset or field, or a value that is not a number.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()] or ["auto"]
    head = parts[0] if "=" not in parts[0] else "auto"
    if head == "auto":
        head = "inspection" if grey else "natural"
    if head not in PRESETS:
        raise EdgeTLError(
            f"unknown augmentation preset {head!r}; choose auto, {', '.join(PRESETS)}, "
            "optionally followed by key=value overrides"
        )
    values = dataclasses.asdict(PRESETS[head])
    for part in parts[1:] if "=" not in parts[0] else parts:
        key, _, value = part.partition("=")
        if key not in values:
            raise EdgeTLError(
                f"unknown augmentation field {key!r}; valid fields: {', '.join(values)}"
            )
        try:
            values[key] = float(value)
        except ValueError:
            raise EdgeTLError(f"augmentation {key}={value!r} is not a number") from None
    if grey:
        values["saturation"] = 0.0
    return Augment(**values)


def augment(
    x: torch.Tensor,
    aug: Augment,
    gen: torch.Generator,
    rows: slice | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Augment a batch of pixels ``float[N, 3, H, W]`` in 0..255; returns a new tensor.

    Under DDP each process holds ``rows`` of a global batch of ``total`` images: the random
    draws are made for the whole batch and sliced, so every image is augmented the same way
    whatever the number of processes.
    """
    n = x.shape[0]
    if n == 0 or not aug.active:
        return x
    total = n if total is None else total
    rows = slice(None) if rows is None else rows

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(total, *shape[1:], generator=gen)[rows].to(x.device)

    x = x.clone()
    if aug.hflip:
        m = rand(n) < aug.hflip
        x[m] = x[m].flip(-1)
    if aug.vflip:
        m = rand(n) < aug.vflip
        x[m] = x[m].flip(-2)
    if aug.rot90:  # inputs are square (resized to size x size): turns keep the shape
        m = rand(n) < aug.rot90
        k = (rand(n) * 3).long() + 1
        for turns in (1, 2, 3):
            sel = m & (k == turns)
            if sel.any():
                x[sel] = torch.rot90(x[sel], turns, dims=(-2, -1))
    if aug.rotate or aug.shift:
        angle = (rand(n) * 2 - 1) * math.radians(aug.rotate)
        shift = (rand(n, 2) * 2 - 1) * (2 * aug.shift)  # affine_grid spans -1..1
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)],
            1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.brightness:
        x = x * (1 + (rand(n, 1, 1, 1) * 2 - 1) * aug.brightness)
    if aug.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + (rand(n, 1, 1, 1) * 2 - 1) * aug.contrast) + mean
    if aug.saturation:
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device)[:, None, None]).sum(
            1, keepdim=True
        )
        x = (x - grey) * (1 + (rand(n, 1, 1, 1) * 2 - 1) * aug.saturation) + grey
    if aug.blur:
        m = rand(n) < aug.blur
        if m.any():
            x[m] = _gaussian_blur(x[m], sigma=1.0)
    return x.clamp_(0, 255)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def normalise(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], inplace: bool = False
) -> torch.Tensor:
    """Pixels 0..255 ``[N, 3, H, W]`` -> the network's input, as the manifest's preprocessing
    says. ``inplace`` (a float32 ``x`` the caller owns): written over ``x``, the same numbers
    without the two temporaries of a batch's size."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    if inplace and x.dtype == torch.float32:
        return x.sub_(m).div_(s)
    return (x.float() - m) / s
