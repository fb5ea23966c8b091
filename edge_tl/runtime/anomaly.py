"""Anomaly detection from good images only: a patch memory bank that lives on the device.

Torch-free. The bundle's backbone gives patch features (:mod:`edge_tl.runtime.patchcore`);
the device keeps a greedy k-centre coreset of the good images' patches in numpy and scores a
new image by each patch's distance to its nearest bank patch (searched over inverted lists,
or exactly: :mod:`edge_tl.runtime.search`). :func:`build` takes every image's features at
once; :func:`edge_tl.runtime.streaming.build_streaming` (what a device runs) one chunk at a
time.

Calibration needs no separate held-out folder: every good image is scored *leave-one-out*,
against the bank without the patches it contributed itself, which is how an unseen good
image is scored. Those maps give each grid position its own normal range (the borders of a
part vary more than its middle), the anomaly map is the distance in units of that range, and
the threshold is the ``1 - false_alarm`` quantile of the good images' scores.

Two things make that threshold wrong without an error, and both are reported:

* **Too few good images for the rate** (:func:`images_needed`): a quantile at false-alarm
  rate ``r`` is only located when some calibration images lie beyond it. Of ``n`` good
  images, none does with probability ``(1 - r) ** n``; keeping that below 5 % needs
  ``n >= ln 0.05 / ln(1 - r)``, about ``3 / r`` (the "rule of three"): 299 images for 1 %,
  59 for 5 %. With fewer, the threshold is about the highest score seen and the realised
  rate is several times the target (``benchmarks/anomaly_calibration.py``, magnetic tiles,
  1 % target, false alarms on 273 held-out good tiles: 4.4-18.3 % for banks of 30 good
  images, 1.5-2.9 % for 100, 0.7 % for 300). Every build, ``--add`` and ``--false-alarm``
  with too few images says so, with the count needed and the rate the images support.
* **Duplicate images** (:func:`image_digest`): an image scored "leave-one-out" against a
  bank that still holds its copy's patches scores near zero, so copies pull the threshold
  down (magnetic tiles: 4.55 -> 2.85 with 10 copies among 40). Images are compared by the
  SHA-256 of their decoded pixels (byte-identical files, and the same picture in another
  file format or with other metadata); a copy of an image seen before, in the folder or
  in the bank, is dropped with a note naming both, and the bank keeps the first.

A bank grows in the field (``add``: new good images, a new variant or lighting); each
change is a new version in ``BUNDLE/anomaly/`` (:class:`~edge_tl.runtime.versions.VersionedStore`,
:func:`bank_store`) and can be rolled back. Metrics and the MVTec test layout live in
:mod:`edge_tl.runtime.evaluation`, heat-map overlays in :mod:`edge_tl.runtime.overlay`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.runtime import patchcore as pc
from edge_tl.runtime import search as bs
from edge_tl.runtime.good_images import (
    GOOD,
    calibration_warning,
    good_images,
    image_digest,
    images_needed,
    supported_false_alarm,
    unique_images,
)
from edge_tl.runtime.versions import StoreKind, VersionedStore
from edge_tl.spec import Manifest

__all__ = [
    "ANOMALOUS",
    "BANK_VERSIONS",
    "DEFAULT_CORESET",
    "DEFAULT_FALSE_ALARM",
    "DEFAULT_MAX_MB",
    "DEFAULT_POOL",
    "DEFAULT_SEARCH",
    "DEFAULT_STAGES",
    "GOOD",
    "AnomalyState",
    "add",
    "bank_store",
    "build",
    "calibration_warning",
    "check_features",
    "check_search",
    "check_settings",
    "good_images",
    "image_digest",
    "images_needed",
    "supported_false_alarm",
    "unique_images",
]

DEFAULT_STAGES = ("features_s16",)
"""Stride-16 features only: on magnetic tiles they beat stride 8 + 16 by 2.5 pt image AUROC
(benchmarks/anomaly.py), and their 14 x 14 grid makes the search 4x cheaper."""
DEFAULT_POOL = 3
DEFAULT_CORESET = 0.5
"""Share of the good images' patches kept in the bank (within ``max_mb``). On magnetic tiles
(679 good images, stride-16 features, FP32, ``benchmarks/anomaly_sweep.py``) image AUROC
rises with it: 10 % 0.971, 20 % 0.974, 27 % 0.977, 40 % 0.980, 55 % 0.981, all 0.982."""
BANK_DTYPE = np.float16
"""The bank is kept and stored in half precision: twice the patches in the same megabytes
(standardised features lose nothing that moves AUROC; scoring computes in float32)."""
DEFAULT_MAX_MB = 16.0
DEFAULT_FALSE_ALARM = 0.01
DEFAULT_SEARCH = "fast"
"""Scoring searches the bank's inverted lists (:mod:`edge_tl.runtime.search`); ``"exact"``
compares every bank patch (``--search exact``)."""
DEFAULT_SIGMA = 1.0
"""Gaussian smoothing of the distance map, in grid cells."""
PRIOR_IMAGES = 10
"""Per-position statistics are shrunk towards the whole map's as if from this many images."""
ANOMALY_DIR = "anomaly"
KEEP_BANKS = 5
"""Bank versions kept on the device (a bank is megabytes, a head kilobytes)."""
ANOMALOUS = "anomalous"


@dataclass(frozen=True)
class AnomalyState:
    """A memory bank with everything needed to score: standardisation, bank, calibration."""

    stages: tuple[str, ...]
    pool: int
    grid: tuple[int, int]
    mean: np.ndarray  # float32[C]
    scale: np.ndarray  # float32[C], 1 / std
    bank: np.ndarray  # float16[K, C] (float32 in banks written before), standardised
    owner: np.ndarray  # int32[K], which good image each bank patch came from
    loo_maps: np.ndarray  # float32[n, h, w], leave-one-out smoothed distance maps of good images
    coreset: float
    max_mb: float
    false_alarm: float
    sigma: float = DEFAULT_SIGMA
    meta: dict[str, Any] = field(default_factory=dict)
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))
    """``uint8[n, 32]``: SHA-256 of each good image's decoded pixels (:func:`image_digest`),
    in ``loo_maps`` order; empty for banks written before they were kept."""

    def __post_init__(self) -> None:
        mu, sd = _position_stats(self.loo_maps)
        object.__setattr__(self, "_pos", (mu, sd))
        object.__setattr__(self, "loo_scores", _calibration_scores(self.loo_maps))
        object.__setattr__(self, "_search", {})

    # ---- scoring ----------------------------------------------------------------------
    def nearest(self, q: np.ndarray, search: str = DEFAULT_SEARCH) -> np.ndarray:
        """Squared distance ``float32[M]`` from standardised patches ``q[M, C]`` to the bank:
        ``search="exact"`` over every bank patch, ``"fast"`` over the inverted lists of
        :class:`~edge_tl.runtime.search.BankIndex` (an upper bound, equal when the nearest
        patch lies in a probed list). Each is prepared once per bank, on first use.

        Raises:
            EdgeTLError: an unknown ``search``.
        """
        check_search(search)
        cache = self._search  # type: ignore[attr-defined]
        if search == "exact":
            if "exact" not in cache:
                cache["exact"] = bs.augmented(self.bank)
            return bs.exact(q, cache["exact"])
        if "fast" not in cache:
            cache["fast"] = bs.BankIndex(self.bank)
        return cache["fast"].nearest(q)

    def standardise(self, feats: np.ndarray) -> np.ndarray:
        """Raw patch features ``[..., C]`` -> the bank's space, ``float32[..., C]``: minus the
        good patches' per-channel mean, times 1 / their standard deviation."""
        return ((feats - self.mean) * self.scale).astype(np.float32, copy=False)

    def distances(self, feats: np.ndarray, search: str = DEFAULT_SEARCH) -> np.ndarray:
        """``float32[N, P, C]`` raw patch features -> smoothed distance maps ``[N, h, w]``."""
        n = len(feats)
        q = self.standardise(feats.reshape(-1, feats.shape[-1]))
        d = np.sqrt(self.nearest(q, search))
        return pc.blur(d.reshape(n, *self.grid), self.sigma)

    def normalise(self, dist: np.ndarray) -> np.ndarray:
        """Distance maps -> anomaly maps: distance above the position's normal, in its spreads."""
        mu, sd = self._pos  # type: ignore[attr-defined]
        return (dist - mu) / sd

    def score(
        self, feats: np.ndarray, search: str = DEFAULT_SEARCH
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(image scores[N], anomaly maps[N, h, w])`` (``search``: see :meth:`nearest`)."""
        maps = self.normalise(self.distances(feats, search))
        return maps.reshape(len(maps), -1).max(1), maps

    @property
    def threshold(self) -> float:
        """The ``1 - false_alarm`` quantile of the good images' leave-one-out scores."""
        return float(np.quantile(self.loo_scores, 1.0 - self.false_alarm))  # type: ignore[attr-defined]

    @property
    def bank_mb(self) -> float:
        return self.bank.nbytes / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.meta.get("version"),
            "kind": "anomaly",
            "images": int(len(self.loo_maps)),
            "bank_patches": int(len(self.bank)),
            "bank_mb": round(self.bank_mb, 2),
            "max_mb": self.max_mb,
            "coreset": self.coreset,
            "stages": list(self.stages),
            "false_alarm": self.false_alarm,
            "threshold": round(self.threshold, 4),
            "images_needed": images_needed(self.false_alarm),
            "calibration_warning": calibration_warning(len(self.loo_maps), self.false_alarm),
            **{
                k: self.meta[k]
                for k in ("op", "parent", "created", "fit_s", "duplicates", SKIPPED)
                if k in self.meta
            },
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
            "bank": self.bank,
            "owner": self.owner.astype(np.int32),
            "loo_maps": self.loo_maps.astype(np.float32),
            "meta": np.array(json.dumps(self.meta)),
            "digests": self.digests.astype(np.uint8),
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
                _stored_bank(z["bank"]),
                np.asarray(z["owner"], np.int32),
                np.asarray(z["loo_maps" if "loo_maps" in z else "calib"], np.float32),
                coreset,
                max_mb,
                far,
                sigma,
                json.loads(str(z["meta"])),
                np.asarray(z["digests"], np.uint8).reshape(-1, 32)
                if "digests" in z
                else np.zeros((0, 32), np.uint8),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise EdgeTLError(
                f"{where} is not an edge_tl anomaly bank ({e}); pass a file written by "
                "`edge-tl anomaly`"
            ) from None


BANK_VERSIONS = StoreKind(
    ANOMALY_DIR,
    "anomaly bank",
    "edge-tl anomaly",
    " --anomaly",
    AnomalyState.from_arrays,
    KEEP_BANKS,
)
"""Bank versions: ``BUNDLE/anomaly/vNNNN.npz`` + ``CURRENT``, the last 5 kept."""


def bank_store(bundle: str | Path, manifest: Manifest) -> VersionedStore:
    """The versions of ``bundle``'s anomaly bank."""
    return VersionedStore(bundle, manifest, BANK_VERSIONS)


# ---- building and growing -------------------------------------------------------------
def _position_stats(loo_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each grid position's mean and spread of good images' distances, shrunk towards the
    whole map's (few images give noisy per-position figures)."""
    n = len(loo_maps)
    w = n / (n + PRIOR_IMAGES)
    mu = w * loo_maps.mean(0) + (1 - w) * loo_maps.mean()
    sd = w * loo_maps.std(0) + (1 - w) * loo_maps.std()
    return mu.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)


def _calibration_scores(loo_maps: np.ndarray) -> np.ndarray:
    """``float32[n]``: each good image's score with its own map left out of the position
    statistics as well as out of the bank, i.e. as an unseen good image is scored.

    Normalising an image by statistics that include it pulls its extreme positions towards
    the mean (its own outlier widens the spread it is divided by), so the scores, and the
    ``1 - false_alarm`` quantile taken of them, come out low and more good parts than the
    target are flagged (magnetic tiles, 1 % target, 273 held-out good tiles: 2.2 % with
    the image in its own statistics, 1.8 % without; ``benchmarks/anomaly.py``). The
    leave-one-out mean and spread follow from the sums in closed form.
    """
    n = len(loo_maps)
    if n < 3:  # one other image gives no spread: fall back to the shared statistics
        mu, sd = _position_stats(loo_maps)
        return ((loo_maps - mu) / sd).reshape(n, -1).max(1).astype(np.float32)
    x = loo_maps.astype(np.float64)
    s1, s2 = x.sum(0), (x * x).sum(0)
    m = n - 1
    mu_i = (s1 - x) / m
    sd_i = np.sqrt(np.maximum((s2 - x * x) / m - mu_i * mu_i, 0.0))
    tot1, tot2, size = x.sum(), (x * x).sum(), x[0].size
    rest = (tot1 - x.reshape(n, -1).sum(1)) / (m * size)  # the whole map's, without image i
    rest_sd = np.sqrt(
        np.maximum((tot2 - (x * x).reshape(n, -1).sum(1)) / (m * size) - rest * rest, 0.0)
    )
    w = m / (m + PRIOR_IMAGES)
    mu = w * mu_i + (1 - w) * rest[:, None, None]
    sd = np.maximum(w * sd_i + (1 - w) * rest_sd[:, None, None], 1e-6)
    return ((x - mu) / sd).reshape(n, -1).max(1).astype(np.float32)


def _cap_rows(max_mb: float, dim: int) -> int:
    """Bank patches of ``dim`` channels that fit in ``max_mb`` megabytes as :data:`BANK_DTYPE`."""
    return max(1, int(max_mb * 1e6 // (np.dtype(BANK_DTYPE).itemsize * dim)))


def _stored_bank(bank: Any) -> np.ndarray:
    """A bank as read from a file: half precision, or single in banks written before."""
    bank = np.asarray(bank)
    if bank.dtype not in (np.float16, np.float32) or bank.ndim != 2:
        raise ValueError(f"bank of dtype {bank.dtype} and shape {bank.shape}")
    return bank


def _leave_one_out(
    x: np.ndarray, ids: np.ndarray, bank: np.ndarray, owner: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """Distance maps of standardised images ``x[N, P, C]`` (image ids ``ids``) to the bank
    without each image's own patches (:func:`~edge_tl.runtime.search.leave_one_out`)."""
    return bs.leave_one_out(x, ids, bs.augmented(bank), owner, grid)


def build(
    feats: np.ndarray,
    grid: tuple[int, int],
    stages: tuple[str, ...] = DEFAULT_STAGES,
    pool: int = DEFAULT_POOL,
    coreset: float = DEFAULT_CORESET,
    max_mb: float = DEFAULT_MAX_MB,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    sigma: float = DEFAULT_SIGMA,
    digests: np.ndarray | None = None,
) -> AnomalyState:
    """A bank from the patch features ``float32[N, P, C]`` of ``N`` good images
    (``digests``: their :func:`image_digest`, ``uint8[N, 32]``, kept to spot copies later)."""
    check_settings(coreset, max_mb, false_alarm)
    n, p, c = feats.shape
    check_image_count(n)
    t0 = time.perf_counter()
    flat = feats.reshape(-1, c)
    mean, scale = standardiser(flat.mean(0), flat.std(0))
    x = ((feats - mean) * scale).astype(np.float32)
    flat = x.reshape(-1, c)
    k = min(max(1, round(coreset * len(flat))), _cap_rows(max_mb, c))
    idx = np.sort(pc.kcenter(flat, k)) if k < len(flat) else np.arange(len(flat))
    bank, owner = flat[idx].astype(BANK_DTYPE), (idx // p).astype(np.int32)
    loo_maps = pc.blur(_leave_one_out(x, np.arange(n), bank, owner, grid), sigma)
    return new_state(
        (stages, pool, grid),
        (mean, scale),
        bank,
        owner,
        loo_maps,
        {"coreset": coreset, "max_mb": max_mb, "false_alarm": false_alarm, "sigma": sigma},
        {"images_added": n, "fit_s": round(time.perf_counter() - t0, 2)},
        digests,
    )


def check_image_count(n: int) -> None:
    """Raises ``EdgeTLError`` for fewer than the 2 good images calibration needs."""
    if n < 2:
        raise EdgeTLError(
            f"an anomaly bank needs at least 2 good images (got {n}); each one is scored "
            "against the others to calibrate the threshold"
        )


def standardiser(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, 1 / std)`` as float32, from the good patches' mean and spread."""
    return mean.astype(np.float32), (1.0 / (std + 1e-6)).astype(np.float32)


def new_state(
    features: tuple[tuple[str, ...], int, tuple[int, int]],
    standard: tuple[np.ndarray, np.ndarray],
    bank: np.ndarray,
    owner: np.ndarray,
    loo_maps: np.ndarray,
    settings: dict[str, float],
    meta: dict[str, Any],
    digests: np.ndarray | None,
) -> AnomalyState:
    """A freshly built bank's state (``features``: stages, pool, grid; ``standard``: mean,
    scale; ``settings``: coreset, max_mb, false_alarm, sigma); one digest per image or none."""
    return AnomalyState(
        *features,
        *standard,
        bank,
        owner,
        loo_maps,
        **settings,
        meta=meta,
        digests=_digests(digests, len(loo_maps)),
    )


def _digests(digests: np.ndarray | None, n: int) -> np.ndarray:
    if digests is None:
        return np.zeros((0, 32), np.uint8)
    d = np.asarray(digests, np.uint8).reshape(-1, 32)
    if len(d) != n:
        raise EdgeTLError(f"{len(d)} image digests for {n} images; pass one per image")
    return d


def add(state: AnomalyState, feats: np.ndarray, digests: np.ndarray | None = None) -> AnomalyState:
    """The bank grown with new good images' patches (those the bank does not yet cover, as
    many as ``coreset`` of them, within ``max_mb``) and re-calibrated. ``digests`` are the
    new images' :func:`image_digest` (kept when the bank has every earlier image's).

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
    ids = np.arange(len(state.loo_maps), len(state.loo_maps) + m)  # images 0..n-1: the bank's
    x = state.standardise(feats)
    flat = x.reshape(-1, c)
    k = max(1, round(state.coreset * len(flat)))
    new = pc.kcenter(flat, k, centres=state.bank)
    bank = np.concatenate([state.bank, flat[new].astype(state.bank.dtype)])
    owner = np.concatenate([state.owner, ids[new // feats.shape[1]].astype(np.int32)])
    cap = _cap_rows(state.max_mb, c)
    if len(bank) > cap:  # over the cap: one coreset of the union, old and new compete
        keep = np.sort(pc.kcenter(bank, cap))
        bank, owner = bank[keep], owner[keep]
    loo_new = pc.blur(_leave_one_out(x, ids, bank, owner, state.grid), state.sigma)
    meta = {"images_added": m, "fit_s": round(time.perf_counter() - t0, 2)}
    loo_maps = np.concatenate([state.loo_maps, loo_new])
    known = len(state.digests) == len(state.loo_maps)
    kept = (
        np.concatenate([state.digests, _digests(digests, m)])
        if known and digests is not None
        else np.zeros((0, 32), np.uint8)
    )
    return replace(state, bank=bank, owner=owner, loo_maps=loo_maps, meta=meta, digests=kept)


def check_features(stages: tuple[str, ...], pool: int) -> None:
    """Refuse patch-feature settings the scorer cannot use: ``stages`` must be backbone
    outputs with spatial maps, ``pool`` an odd neighbourhood size."""
    unknown = [s for s in stages if s not in pc.STAGES]
    if not stages or unknown:
        raise EdgeTLError(
            f"--stages {','.join(stages) or '(none)'}: "
            + (f"unknown stage {unknown[0]!r}; " if unknown else "")
            + f"use one or both of {', '.join(pc.STAGES)}"
        )
    if pool < 1 or pool % 2 == 0:
        raise EdgeTLError(f"--pool must be an odd neighbourhood size (1, 3, 5, ...), not {pool}")


def check_search(search: str) -> None:
    """Refuse a search other than ``fast`` and ``exact``."""
    if search not in bs.SEARCHES:
        raise EdgeTLError(f"--search {search!r}: use one of {', '.join(bs.SEARCHES)}")


def check_settings(coreset: float, max_mb: float, false_alarm: float) -> None:
    """Refuse bank settings out of range (each named with its valid range)."""
    if not 0 < coreset <= 1:
        raise EdgeTLError(f"--coreset must be in (0, 1], a share of the patches, not {coreset}")
    if not max_mb > 0:
        raise EdgeTLError(f"--max-mb must be positive, not {max_mb}")
    if not 0 < false_alarm < 1:
        raise EdgeTLError(
            f"--false-alarm must be in (0, 1), e.g. 0.01 for 1 % of good parts, not {false_alarm}"
        )
