"""Building an anomaly bank in bounded memory: the good images' features streamed in chunks.

Torch-free. :func:`edge_tl.runtime.anomaly.build` takes every good image's patch features
at once (``N x P x C`` floats, three copies while standardising: 180 MB per 679 images of
196 x 112 patches, and growing with ``N``). :func:`build_streaming` holds one chunk at a
time and gives the same kind of bank in three passes:

1. the chunks as they come from the engine: a running per-channel mean and variance
   (Chan, Golub & LeVeque's pairwise update, "Algorithms for computing the sample
   variance", 1983; Welford's for one chunk), each chunk spilled to an unlinked temporary
   file (float32 by default, so that up to :data:`CHUNK_IMAGES` images the bank is the
   all-in-memory build's; ``spill_dtype=np.float16`` halves the file at a relative error
   of 5e-4 on the features);
2. the spilled chunks, standardised: the k-centre coreset grown chunk by chunk, each chunk
   started from the bank so far (as :func:`~edge_tl.runtime.anomaly.add` grows a bank),
   with a share of the total ``min(coreset x N x P, --max-mb)`` patches proportional to
   its size, so the bank never exceeds the cap and no re-selection of the union is needed;
3. the spilled chunks again: leave-one-out calibration against the final bank.

Memory: one chunk (:data:`CHUNK_IMAGES` images) plus the bank and a block of distances,
whatever ``N``; the spill file lives on disk (``N x P x C`` float32: 60 MB for 679 images)
and is gone when the build ends. ``benchmarks/anomaly_memory.py`` measures peak RSS against
``N`` and the AUROC against the all-in-memory build.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import anomaly as an
from edge_tl.runtime import patchcore as pc
from edge_tl.runtime import search as bs
from edge_tl.runtime.anomaly import AnomalyState

__all__ = ["CHUNK_IMAGES", "RunningStats", "build_streaming"]

CHUNK_IMAGES = 128
"""Good images per chunk (128 x 196 x 112 float32 = 11 MB at the default geometry): up to
this many images the bank is the all-in-memory build's (up to float rounding); beyond,
it is chosen chunk by chunk (with chunks of 32 images, a bank of 60 real tiles lost 4 pt
image AUROC on a 56-image test subset: 0.816 -> 0.775)."""


class RunningStats:
    """Per-channel mean and standard deviation of rows seen in chunks (float64 sums;
    Chan et al.'s pairwise merge of each chunk's mean and sum of squared deviations)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros(dim, np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add rows ``x[M, C]``."""
        m = len(x)
        if m == 0:
            return
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        delta = mean - self.mean
        total = self.n + m
        self.mean += delta * (m / total)
        self.m2 += m2 + delta**2 * (self.n * m / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (as ``numpy.std``), ``float64[C]``."""
        return np.sqrt(self.m2 / max(self.n, 1))


class _Spill:
    """Chunks of ``float[m, P, C]`` written to an unlinked temporary file and read back one
    at a time (plain reads: the pages stay in the OS cache, not in the process)."""

    def __init__(self, work_dir: str | Path | None, dtype: type) -> None:
        # closed by close(), in build_streaming's finally
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=work_dir, prefix="bank-build-")  # noqa: SIM115
        self.dtype = np.dtype(dtype)
        self.shapes: list[tuple[int, ...]] = []

    def write(self, chunk: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(chunk, self.dtype).tobytes())
        self.shapes.append(chunk.shape)

    def chunks(self) -> Iterable[np.ndarray]:
        self.file.flush()
        self.file.seek(0)
        for shape in self.shapes:
            x = np.fromfile(self.file, self.dtype, int(np.prod(shape)))
            yield x.reshape(shape).astype(np.float32, copy=False)

    def close(self) -> None:
        self.file.close()


def _quotas(sizes: list[int], k: int) -> list[int]:
    """``k`` split over chunks in proportion to their ``sizes`` (summing to exactly ``k``)."""
    cum = np.round(k * np.cumsum(sizes) / max(sum(sizes), 1)).astype(int)
    return list(np.diff(np.concatenate([[0], cum])))


def build_streaming(
    chunks: Iterable[np.ndarray],
    grid: tuple[int, int],
    stages: tuple[str, ...] = an.DEFAULT_STAGES,
    pool: int = an.DEFAULT_POOL,
    coreset: float = an.DEFAULT_CORESET,
    max_mb: float = an.DEFAULT_MAX_MB,
    false_alarm: float = an.DEFAULT_FALSE_ALARM,
    sigma: float = an.DEFAULT_SIGMA,
    digests: np.ndarray | None = None,
    work_dir: str | Path | None = None,
    spill_dtype: type = np.float32,
) -> AnomalyState:
    """A bank from good images' patch features given as chunks ``float32[m, P, C]`` (any
    iterable: features are computed as they are asked for), in bounded memory (see the
    module). ``work_dir``: where the temporary spill file goes (default: the system's).

    Raises:
        EdgeTLError: settings out of range, fewer than 2 images, or chunks of unequal
            patch shape.
    """
    an.check_settings(coreset, max_mb, false_alarm)
    t0 = time.perf_counter()
    spill = _Spill(work_dir, spill_dtype)
    try:
        stats: RunningStats | None = None
        for feats in chunks:
            if stats is None:
                stats = RunningStats(feats.shape[-1])
            elif feats.shape[1:] != spill.shapes[0][1:]:
                raise EdgeTLError(
                    f"patch features of shape {feats.shape[1:]} after {spill.shapes[0][1:]}; "
                    "every good image must give the same grid and channels"
                )
            stats.update(feats.reshape(-1, feats.shape[-1]))
            spill.write(feats)
        n = sum(s[0] for s in spill.shapes)
        an.check_image_count(n)
        assert stats is not None  # two or more images came through
        _, p, c = spill.shapes[0]
        mean, scale = an.standardiser(stats.mean, stats.std)
        k = min(max(1, round(coreset * n * p)), an._cap_rows(max_mb, c))
        quotas = _quotas([s[0] * p for s in spill.shapes], k)
        bank = np.empty((k, c), an.BANK_DTYPE)  # filled in place: no growing copies
        owner = np.empty(k, np.int32)
        first = filled = 0
        for feats, quota in zip(spill.chunks(), quotas, strict=True):
            flat = ((feats - mean) * scale).reshape(-1, c)
            if quota >= len(flat):
                pick = np.arange(len(flat))
            else:
                pick = np.sort(pc.kcenter(flat, quota, centres=bank[:filled] if filled else None))
            bank[filled : filled + len(pick)] = flat[pick]
            owner[filled : filled + len(pick)] = first + pick // p
            filled += len(pick)
            first += len(feats)
        aug = bs.augmented(bank)
        loo, first = [], 0
        for feats in spill.chunks():
            x = ((feats - mean) * scale).astype(np.float32)
            loo.append(bs.leave_one_out(x, np.arange(first, first + len(x)), aug, owner, grid))
            first += len(x)
    finally:
        spill.close()
    loo_maps = pc.blur(np.concatenate(loo), sigma)
    return an.new_state(
        (stages, pool, grid),
        (mean, scale),
        bank,
        owner,
        loo_maps,
        {"coreset": coreset, "max_mb": max_mb, "false_alarm": false_alarm, "sigma": sigma},
        {"images_added": n, "fit_s": round(time.perf_counter() - t0, 2), "build": "streaming"},
        digests,
    )
