"""The numpy side of the anomaly scorer: patch features, coreset, nearest-neighbour search
and anomaly maps. No torch, no scikit-learn: this runs on the device.

Patch features are "locally aware" (PatchCore, Roth et al. 2022): each backbone stage is
averaged over a 3x3 neighbourhood, the coarser stage is upsampled to the finer stage's grid,
and the two are concatenated, then standardised per channel on the good images. A patch's
anomaly score is its distance to the nearest patch of the memory bank.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "STAGES",
    "avg_pool",
    "blur",
    "kcenter",
    "nearest",
    "one_blas_thread",
    "patch_features",
    "resize_map",
    "upsample",
]

STAGES = ("features_s8", "features_s16")
"""Backbone outputs with patch features (strides 8 and 16)."""


def avg_pool(x: np.ndarray, k: int = 3) -> np.ndarray:
    """``k x k`` mean over each position's neighbourhood (stride 1, odd ``k``; at the border
    the mean of what exists) of ``float[N, C, H, W]``."""
    if k <= 1:
        return x.astype(np.float32, copy=False)
    r = k // 2
    n, c, h, w = x.shape
    p = np.pad(x.astype(np.float32, copy=False), ((0, 0), (0, 0), (r, r), (r, r)))
    s = np.pad(np.cumsum(np.cumsum(p, 2), 3), ((0, 0), (0, 0), (1, 0), (1, 0)))
    total = s[:, :, k:, k:] - s[:, :, :-k, k:] - s[:, :, k:, :-k] + s[:, :, :-k, :-k]
    ones = np.pad(np.cumsum(np.cumsum(np.pad(np.ones((h, w)), r), 0), 1), ((1, 0), (1, 0)))
    count = ones[k:, k:] - ones[:-k, k:] - ones[k:, :-k] + ones[:-k, :-k]
    return (total / count).astype(np.float32)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear (half-pixel centres, edge clamped) resampling as a ``[n_out, n_in]`` matrix."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upsample(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the last two axes of ``x`` to ``h x w``."""
    rows, cols = _interp_matrix(h, x.shape[-2]), _interp_matrix(w, x.shape[-1])
    return np.einsum("hi,...ij,wj->...hw", rows, x.astype(np.float32, copy=False), cols)


def patch_features(
    outputs: dict[str, np.ndarray], stages: tuple[str, ...] = STAGES, pool: int = 3
) -> np.ndarray:
    """Backbone outputs of ``N`` images -> ``float32[N, H*W, C]`` patch features on the first
    stage's ``H x W`` grid: each stage averaged over ``pool x pool`` neighbours, the others
    resized to that grid, concatenated (unstandardised)."""
    first = avg_pool(outputs[stages[0]], pool)
    n, _, h, w = first.shape
    parts = [first]
    for name in stages[1:]:
        f = avg_pool(outputs[name], pool)
        parts.append(f if f.shape[-2:] == (h, w) else upsample(f, h, w))
    feats = np.concatenate(parts, axis=1) if len(parts) > 1 else first
    return np.ascontiguousarray(feats.transpose(0, 2, 3, 1).reshape(n, h * w, -1))


def kcenter(
    x: np.ndarray, k: int, centres: np.ndarray | None = None, seed: int = 0, dim: int = 64
) -> np.ndarray:
    """Greedy k-centre coreset: indices of ``k`` rows of ``x`` chosen one at a time, each the
    row farthest from everything chosen so far (and from ``centres``, when given: growing an
    existing bank picks what it does not yet cover).

    Distances are measured after a fixed Gaussian random projection to ``dim`` dimensions
    (Johnson-Lindenstrauss; PatchCore does the same), which keeps each step one pass over
    ``N x dim`` floats.
    """
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    proj = (rng.standard_normal((x.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    if x.shape[1] <= dim:
        proj = np.eye(x.shape[1], dtype=np.float32)  # already small: distances as they are
    z = x @ proj
    zsq = np.einsum("ij,ij->i", z, z)
    if centres is not None and len(centres):
        best = nearest(z, centres @ proj, chunk=2048, rows=1024)  # 8 MB of distances at most
        first = int(best.argmax())
    else:
        best = np.full(n, np.inf, np.float32)
        first = int(rng.integers(n))
    chosen = np.empty(k, np.int64)
    nxt = first
    for i in range(k):
        chosen[i] = nxt
        c = z[nxt]
        d = zsq - 2 * (z @ c) + float(c @ c)
        np.minimum(best, d, out=best)
        best[nxt] = -1.0  # chosen rows are covered; never pick one twice
        nxt = int(best.argmax())
    return chosen


def nearest(
    q: np.ndarray,
    bank: np.ndarray,
    bank_sq: np.ndarray | None = None,
    chunk: int = 4096,
    rows: int = 4096,
) -> np.ndarray:
    """Exact squared Euclidean distance from each row of ``q`` to its nearest row of
    ``bank``; ``q`` is read in blocks of ``rows`` and ``bank`` in chunks of ``chunk`` rows,
    so memory stays ``rows x chunk`` floats whatever the sizes."""
    q = np.ascontiguousarray(q, np.float32)
    if bank_sq is None:
        bank_sq = np.einsum("ij,ij->i", bank, bank)
    best = np.full(len(q), np.inf, np.float32)
    for r in range(0, len(q), rows):
        top = best[r : r + rows]
        for s in range(0, len(bank), chunk):
            g = q[r : r + rows] @ bank[s : s + chunk].T
            g *= -2.0
            g += bank_sq[s : s + chunk]
            np.minimum(top, g.min(1), out=top)
    best += np.einsum("ij,ij->i", q, q)
    return np.maximum(best, 0.0)


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (edges replicated)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    pad = [(0, 0)] * (maps.ndim - 2)
    p = np.pad(maps, [*pad, (r, r), (0, 0)], mode="edge")
    out = sum(k[i] * p[..., i : i + maps.shape[-2], :] for i in range(len(k)))
    p = np.pad(out, [*pad, (0, 0), (r, r)], mode="edge")
    return sum(k[i] * p[..., :, i : i + maps.shape[-1]] for i in range(len(k))).astype(np.float32)


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``float[h, w]`` map bilinearly resized to an image's ``(width, height)``."""
    return np.asarray(Image.fromarray(m.astype(np.float32), "F").resize(size, Image.BILINEAR))


_CONTROLLER: list = []
_LIMIT_LOCK = threading.Lock()
_LIMIT: dict[str, Any] = {"depth": 0, "limiter": None}


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread: at batch 1 the engine and the search take turns, and
    BLAS threads that spin between calls slow the engine more than they speed the search
    (measured in benchmarks/anomaly.py). A no-op without ``threadpoolctl``.

    The limit is process-wide: with several threads scoring, the first to enter sets it and
    the last to leave restores the BLAS's own setting (nested limits restored out of order
    would leave it at one thread for good)."""
    with _LIMIT_LOCK:
        if not _CONTROLLER:
            try:
                from threadpoolctl import ThreadpoolController

                _CONTROLLER.append(ThreadpoolController())
            except ImportError:  # pragma: no cover - optional
                _CONTROLLER.append(None)
        if _CONTROLLER[0] is not None:
            if _LIMIT["depth"] == 0:
                _LIMIT["limiter"] = _CONTROLLER[0].limit(limits=1, user_api="blas")
            _LIMIT["depth"] += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            if _CONTROLLER[0] is not None:
                _LIMIT["depth"] -= 1
                if _LIMIT["depth"] == 0:
                    _LIMIT["limiter"].restore_original_limits()
                    _LIMIT["limiter"] = None
