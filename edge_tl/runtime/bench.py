"""Batch-1 latency of a bundle: end to end (decode + preprocess + engine + head) and the raw
engine call alone, measured in the same run so their ratio is meaningful on a noisy host."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_tl.runtime.model import Model
from edge_tl.runtime.preprocess import load_image, to_input
from edge_tl.spec import EMBEDDING


def latency(
    model: Model, images: Sequence[str | Path], repeats: int = 3, warmup: int = 3
) -> dict[str, float]:
    """p50/p95 milliseconds of ``model.predict([image])`` and of the raw engine call.

    The two are interleaved image by image, so a slow phase of the host hits both.
    """
    pre = model.manifest.preprocess
    inputs = [to_input(load_image(p), pre)[None] for p in images]
    for i in range(warmup):
        model.predict([images[i % len(images)]])
    e2e, raw = [], []
    for _ in range(repeats):
        for path, x in zip(images, inputs, strict=True):
            t0 = time.perf_counter()
            model.predict([path])
            t1 = time.perf_counter()
            model.engine.run(x, (EMBEDDING,))
            t2 = time.perf_counter()
            e2e.append(t1 - t0)
            raw.append(t2 - t1)
    ms = lambda v, q: float(np.percentile(np.asarray(v) * 1e3, q))  # noqa: E731
    return {
        "predict_p50_ms": ms(e2e, 50),
        "predict_p95_ms": ms(e2e, 95),
        "engine_p50_ms": ms(raw, 50),
        "engine_p95_ms": ms(raw, 95),
        "n": len(e2e),
    }


def bundle_size_mb(bundle: str | Path) -> float:
    """Size on disk of the bundle's artifact files (the part that ships)."""
    from edge_tl.bundle import read_manifest

    files = read_manifest(bundle, verify=False).artifact.files
    return sum((Path(bundle) / f).stat().st_size for f in files) / 1e6
