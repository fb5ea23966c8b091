"""Anomaly detection from good images only: a patch memory bank that lives on the device.

Torch-free. The bundle's backbone gives patch features (:mod:`edge_tl.runtime.patchcore`);
the device keeps a greedy k-centre coreset of the good images' patches in numpy and scores a
new image by each patch's distance to its nearest bank patch (exact search, chunked).

Calibration needs no separate held-out folder: every good image is scored *leave-one-out*,
against the bank without the patches it contributed itself, which is how an unseen good
image is scored. Those maps give each grid position its own normal range (the borders of a
part vary more than its middle), the anomaly map is the distance in units of that range, and
the threshold is the ``1 - false_alarm`` quantile of the good images' scores.

A bank grows in the field (``add``: new good images, a new variant or lighting); each
change is a new version in ``BUNDLE/anomaly/`` (see :class:`~edge_tl.runtime.learner.HeadStore`)
and can be rolled back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import patchcore as pc
from edge_tl.runtime.learner import HeadStore
from edge_tl.spec import IMAGE_EXTENSIONS

DEFAULT_STAGES = ("features_s16",)
"""Stride-16 features only: on magnetic tiles they beat stride 8 + 16 by 2.5 pt image AUROC
(benchmarks/anomaly.py), and their 14 x 14 grid makes the search 4x cheaper."""
DEFAULT_POOL = 3
DEFAULT_CORESET = 0.10
DEFAULT_MAX_MB = 16.0
DEFAULT_FALSE_ALARM = 0.01
DEFAULT_SIGMA = 1.0
"""Gaussian smoothing of the distance map, in grid cells."""
PRIOR_IMAGES = 10
"""Per-position statistics are shrunk towards the whole map's as if from this many images."""
ANOMALY_DIR = "anomaly"
KEEP_BANKS = 5
"""Bank versions kept on the device (a bank is megabytes, a head kilobytes)."""
GOOD, ANOMALOUS = "good", "anomalous"

Extract = Callable[[Sequence[Any]], np.ndarray]
"""Images -> ``float32[N, P, C]`` patch features (the model's engine)."""


@dataclass(frozen=True)
class AnomalyState:
    """A memory bank with everything needed to score: standardisation, bank, calibration."""

    stages: tuple[str, ...]
    pool: int
    grid: tuple[int, int]
    mean: np.ndarray  # float32[C]
    scale: np.ndarray  # float32[C], 1 / std
    bank: np.ndarray  # float32[K, C], standardised
    owner: np.ndarray  # int32[K], which good image each bank patch came from
    calib: np.ndarray  # float32[n, h, w], leave-one-out smoothed distance maps of good images
    coreset: float
    max_mb: float
    false_alarm: float
    sigma: float = DEFAULT_SIGMA
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bank_sq", np.einsum("ij,ij->i", self.bank, self.bank))
        mu, sd = _position_stats(self.calib)
        object.__setattr__(self, "_pos", (mu, sd))
        scores = self.normalise(self.calib).reshape(len(self.calib), -1).max(1)
        object.__setattr__(self, "calib_scores", scores)

    # ---- scoring ----------------------------------------------------------------------
    def distances(self, feats: np.ndarray) -> np.ndarray:
        """``float32[N, P, C]`` raw patch features -> smoothed distance maps ``[N, h, w]``."""
        n = len(feats)
        q = (feats.reshape(-1, feats.shape[-1]) - self.mean) * self.scale
        d = np.sqrt(pc.nearest(q, self.bank, self._bank_sq))  # type: ignore[attr-defined]
        return pc.blur(d.reshape(n, *self.grid), self.sigma)

    def normalise(self, dist: np.ndarray) -> np.ndarray:
        """Distance maps -> anomaly maps: distance above the position's normal, in its spreads."""
        mu, sd = self._pos  # type: ignore[attr-defined]
        return (dist - mu) / sd

    def score(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(image scores[N], anomaly maps[N, h, w])``."""
        maps = self.normalise(self.distances(feats))
        return maps.reshape(len(maps), -1).max(1), maps

    @property
    def threshold(self) -> float:
        """The ``1 - false_alarm`` quantile of the good images' leave-one-out scores."""
        return float(np.quantile(self.calib_scores, 1.0 - self.false_alarm))  # type: ignore[attr-defined]

    @property
    def bank_mb(self) -> float:
        return self.bank.nbytes / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.meta.get("version"),
            "kind": "anomaly",
            "images": int(len(self.calib)),
            "bank_patches": int(len(self.bank)),
            "bank_mb": round(self.bank_mb, 2),
            "max_mb": self.max_mb,
            "coreset": self.coreset,
            "stages": list(self.stages),
            "false_alarm": self.false_alarm,
            "threshold": round(self.threshold, 4),
            **{k: self.meta[k] for k in ("op", "parent", "created", "fit_s") if k in self.meta},
        }

    # ---- persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "kind": np.array("anomaly"),
            "stages": np.array(self.stages, dtype=str),
            "settings": np.array(
                [self.pool, *self.grid, self.coreset, self.max_mb, self.false_alarm, self.sigma],
                np.float64,
            ),
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "bank": self.bank.astype(np.float32),
            "owner": self.owner.astype(np.int32),
            "calib": self.calib.astype(np.float32),
            "meta": np.array(json.dumps(self.meta)),
        }

    @classmethod
    def from_arrays(cls, z: Any, where: str) -> AnomalyState:
        try:
            if str(z["kind"]) != "anomaly":
                raise ValueError(f"kind {str(z['kind'])!r}")
            pool, h, w, coreset, max_mb, far, sigma = (float(v) for v in z["settings"])
            return cls(
                tuple(str(s) for s in z["stages"]),
                int(pool),
                (int(h), int(w)),
                np.asarray(z["mean"], np.float32),
                np.asarray(z["scale"], np.float32),
                np.asarray(z["bank"], np.float32),
                np.asarray(z["owner"], np.int32),
                np.asarray(z["calib"], np.float32),
                coreset,
                max_mb,
                far,
                sigma,
                json.loads(str(z["meta"])),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise EdgeTLError(
                f"{where} is not an edge_tl anomaly bank ({e}); pass a file written by "
                "`edge-tl anomaly`"
            ) from None


class AnomalyStore(HeadStore):
    """Versions of a bundle's anomaly bank: ``anomaly/vNNNN.npz`` and ``anomaly/CURRENT``."""

    dirname = ANOMALY_DIR
    noun = "anomaly bank"
    command = "edge-tl anomaly"
    rollback_flag = " --anomaly"

    def __init__(self, bundle: str | Path, manifest: Any, keep: int = KEEP_BANKS) -> None:
        super().__init__(bundle, manifest, keep)

    @property
    def state_cls(self) -> Any:
        return AnomalyState


# ---- building and growing -------------------------------------------------------------
def _position_stats(calib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each grid position's mean and spread of good images' distances, shrunk towards the
    whole map's (few images give noisy per-position figures)."""
    n = len(calib)
    w = n / (n + PRIOR_IMAGES)
    mu = w * calib.mean(0) + (1 - w) * calib.mean()
    sd = w * calib.std(0) + (1 - w) * calib.std()
    return mu.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)


def _cap_rows(max_mb: float, dim: int) -> int:
    return max(1, int(max_mb * 1e6 // (4 * dim)))


def _leave_one_out(
    x: np.ndarray, ids: np.ndarray, bank: np.ndarray, owner: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """Distance maps of standardised images ``x[N, P, C]`` (image ids ``ids``) to the bank
    without each image's own patches."""
    bank_sq = np.einsum("ij,ij->i", bank, bank)
    out = np.empty((len(x), grid[0] * grid[1]), np.float32)
    for i, (q, own) in enumerate(zip(x, ids, strict=True)):
        g = q @ bank.T
        g *= -2.0
        g += bank_sq
        g[:, owner == own] = np.inf
        d = g.min(1) + np.einsum("ij,ij->i", q, q)
        out[i] = np.sqrt(np.maximum(d, 0.0))
    return out.reshape(len(x), *grid)


def build(
    feats: np.ndarray,
    grid: tuple[int, int],
    stages: tuple[str, ...] = DEFAULT_STAGES,
    pool: int = DEFAULT_POOL,
    coreset: float = DEFAULT_CORESET,
    max_mb: float = DEFAULT_MAX_MB,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    sigma: float = DEFAULT_SIGMA,
) -> AnomalyState:
    """A bank from the patch features ``float32[N, P, C]`` of ``N`` good images."""
    check_settings(coreset, max_mb, false_alarm)
    n, p, c = feats.shape
    if n < 2:
        raise EdgeTLError(
            f"an anomaly bank needs at least 2 good images (got {n}); each one is scored "
            "against the others to calibrate the threshold"
        )
    t0 = time.perf_counter()
    flat = feats.reshape(-1, c)
    mean = flat.mean(0).astype(np.float32)
    scale = (1.0 / (flat.std(0) + 1e-6)).astype(np.float32)
    x = ((feats - mean) * scale).astype(np.float32)
    flat = x.reshape(-1, c)
    k = min(max(1, round(coreset * len(flat))), _cap_rows(max_mb, c))
    idx = np.sort(pc.kcenter(flat, k)) if k < len(flat) else np.arange(len(flat))
    bank, owner = flat[idx], (idx // p).astype(np.int32)
    calib = pc.blur(_leave_one_out(x, np.arange(n), bank, owner, grid), sigma)
    meta = {"images_added": n, "fit_s": round(time.perf_counter() - t0, 2)}
    settings = {"coreset": coreset, "max_mb": max_mb, "false_alarm": false_alarm}
    return AnomalyState(
        stages, pool, grid, mean, scale, bank, owner, calib, **settings, sigma=sigma, meta=meta
    )


def add(state: AnomalyState, feats: np.ndarray) -> AnomalyState:
    """The bank grown with new good images' patches (those the bank does not yet cover, as
    many as ``coreset`` of them, within ``max_mb``) and re-calibrated.

    The new images are calibrated leave-one-out against the grown bank. The earlier images'
    calibration maps are kept as they were: added patches could only lower them, so the
    threshold errs towards fewer false alarms.
    """
    t0 = time.perf_counter()
    m, _, c = feats.shape
    if c != state.bank.shape[1]:
        raise EdgeTLError(
            f"the new images give {c}-channel patches, the bank has {state.bank.shape[1]}; "
            "build a new bank with `edge-tl anomaly BUNDLE GOOD_DIR`"
        )
    ids = np.arange(len(state.calib), len(state.calib) + m)  # images 0..n-1 are the bank's
    x = ((feats - state.mean) * state.scale).astype(np.float32)
    flat = x.reshape(-1, c)
    k = max(1, round(state.coreset * len(flat)))
    new = pc.kcenter(flat, k, centres=state.bank)
    bank = np.concatenate([state.bank, flat[new]])
    owner = np.concatenate([state.owner, ids[new // feats.shape[1]].astype(np.int32)])
    cap = _cap_rows(state.max_mb, c)
    if len(bank) > cap:  # over the cap: one coreset of the union, old and new compete
        keep = np.sort(pc.kcenter(bank, cap))
        bank, owner = bank[keep], owner[keep]
    calib_new = pc.blur(_leave_one_out(x, ids, bank, owner, state.grid), state.sigma)
    meta = {"images_added": m, "fit_s": round(time.perf_counter() - t0, 2)}
    return replace(
        state, bank=bank, owner=owner, calib=np.concatenate([state.calib, calib_new]), meta=meta
    )


def check_settings(coreset: float, max_mb: float, false_alarm: float) -> None:
    if not 0 < coreset <= 1:
        raise EdgeTLError(f"--coreset must be in (0, 1], a share of the patches, not {coreset}")
    if not max_mb > 0:
        raise EdgeTLError(f"--max-mb must be positive, not {max_mb}")
    if not 0 < false_alarm < 1:
        raise EdgeTLError(
            f"--false-alarm must be in (0, 1), e.g. 0.01 for 1 % of good parts, not {false_alarm}"
        )


# ---- folders --------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def good_images(folder: str | Path) -> list[str]:
    """The good images of a flat folder, or of an MVTec-layout folder's ``train/good``."""
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
    paths = _images_in(root)
    if not paths:
        raise EdgeTLError(
            f"{root} has no images ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of good images"
        )
    return [str(p) for p in paths]


@dataclass(frozen=True)
class TestItem:
    path: str
    defect: str  # "good" or the defect type
    mask: str | None


def mvtec_test(folder: str | Path) -> list[TestItem]:
    """``test/<good|defect>/*`` of an MVTec-layout folder with ``ground_truth`` masks when
    present. Masks are checked (exist, same size as their image) before anything runs."""
    root = Path(folder)
    test = root / "test"
    if not test.is_dir():
        raise EdgeTLError(
            f"{root} has no test folder; lay it out as {root}/test/good and "
            f"{root}/test/<defect type> (MVTec AD layout)"
        )
    classes = sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not any(c.name == GOOD for c in classes) or len(classes) < 2:
        raise EdgeTLError(
            f"{test} needs a good folder and at least one defect folder (found "
            f"{[c.name for c in classes]}); AUROC compares the two"
        )
    gt = root / "ground_truth"
    items = []
    for c in classes:
        files = _images_in(c)
        if not files:
            raise EdgeTLError(f"{c} has no images; add some or remove the folder")
        for f in files:
            mask = None
            if c.name != GOOD and gt.is_dir():
                m = gt / c.name / f"{f.stem}_mask.png"
                if not m.is_file():
                    raise EdgeTLError(
                        f"{f} has no mask {m}; add it, or remove {gt} to skip pixel metrics"
                    )
                with Image.open(f) as a, Image.open(m) as b:
                    if a.size != b.size:
                        raise EdgeTLError(
                            f"mask {m} is {b.size[0]}x{b.size[1]} but its image {f} is "
                            f"{a.size[0]}x{a.size[1]}; masks must match their images pixel "
                            "for pixel"
                        )
                mask = str(m)
            items.append(TestItem(str(f), c.name, mask))
    return items


def load_mask(path: str) -> np.ndarray:
    with Image.open(path) as m:
        return np.asarray(m.convert("L")) > 127


# ---- metrics --------------------------------------------------------------------------
class PixelAuroc:
    """Pixel-level AUROC accumulated image by image in a fixed histogram (bounded memory)."""

    def __init__(self, lo: float, hi: float, bins: int = 1 << 14) -> None:
        self.lo, self.hi, self.bins = lo, max(hi, lo + 1e-6), bins
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def update(self, scores: np.ndarray, mask: np.ndarray | None) -> None:
        b = ((scores - self.lo) * ((self.bins - 1) / (self.hi - self.lo))).astype(np.int64)
        np.clip(b, 0, self.bins - 1, out=b)
        if mask is None:
            self.neg += np.bincount(b.ravel(), minlength=self.bins)
        else:
            self.pos += np.bincount(b[mask], minlength=self.bins)
            self.neg += np.bincount(b[~mask], minlength=self.bins)

    def value(self) -> float | None:
        p, n = self.pos.astype(np.float64), self.neg.astype(np.float64)
        if p.sum() == 0 or n.sum() == 0:
            return None
        below = np.cumsum(n) - n
        return float(((below + 0.5 * n) * p).sum() / (p.sum() * n.sum()))


def at_threshold(scores: np.ndarray, y: np.ndarray, thr: float) -> dict[str, float]:
    flagged = scores > thr
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    fn = int((~flagged & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": round(f1, 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "false_alarm_rate": round(fp / max(1, int((y == 0).sum())), 4),
    }


# ---- pictures -------------------------------------------------------------------------
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
    """The image beside itself under the anomaly map (opaque where the map passes the
    threshold), the true defect outlined in green when a mask is given."""
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
