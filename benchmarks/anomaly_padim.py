"""Does a second scorer, PaDiM's per-position Gaussian, help pixel AUROC on magnetic tiles?
One run: the shipped bank's raw-distance map, the PaDiM map, and their sum side by side.

PaDiM (Defard et al. 2021, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization"; anomalib's ``Padim``) fits, at every grid position, a Gaussian
to the good images' patch features there (mean and covariance + 0.01 I) and scores a test
patch by its Mahalanobis distance to its own position's Gaussian. Where the bank asks "has
any good tile looked like this anywhere?", PaDiM asks "have good tiles looked like this
*here*?", which could tell a tile's edges and middle apart. Same features as the sweep
(FP32 PyTorch EfficientNet-Lite0 squashed to 224, ``k x k`` mean, cached under ``--work``);
the bank is the shipped default build (k-centre 50 %, half precision) scored by exact
search; every map is smoothed by sigma one cell. The sum adds each map z-scored by the mean
and standard deviation of its good *training* maps (the bank's leave-one-out maps,
PaDiM's in-sample maps): nothing is chosen on the test set. Figures on the 665 test tiles:
image AUROC (map maximum), pooled pixel AUROC split by its negatives
(``magnetic_tile.Test.pooled_parts``) and pixel AUROC inside the defective tiles per type.

    cd benchmarks && ../.venv/bin/python anomaly_padim.py [--stages features_s16] [--pool 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from anomaly_sweep import lite0_224  # noqa: E402
from magnetic_tile import patches, print_table, report, zscore  # noqa: E402

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.runtime import anomaly as an  # noqa: E402
from edge_tl.runtime import patchcore as pc  # noqa: E402

EPS = 0.01  # PaDiM's covariance regulariser (times the identity)


def padim_fit(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``float32[N, P, C]`` good patch features -> per-position ``(mean[P, C],
    inverse covariance[P, C, C])`` (covariance + ``EPS`` I, as PaDiM)."""
    x = feats.astype(np.float64)
    mu = x.mean(0)
    d = x - mu
    cov = np.einsum("npc,npd->pcd", d, d) / (len(x) - 1)
    cov += EPS * np.eye(x.shape[-1])
    return mu.astype(np.float32), np.linalg.inv(cov).astype(np.float32)


def padim_maps(feats: np.ndarray, mu: np.ndarray, inv: np.ndarray, grid) -> np.ndarray:
    """Mahalanobis distance of each patch to its position's Gaussian -> ``float32[N, h, w]``."""
    d = feats - mu
    m = np.einsum("npc,pcd,npd->np", d, inv, d)
    return np.sqrt(np.maximum(m, 0)).reshape(len(feats), *grid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_a"))
    p.add_argument(
        "--stages", default="features_s16", help="','-joined, e.g. features_s8,features_s16"
    )
    p.add_argument("--pool", type=int, default=an.DEFAULT_POOL)
    args = p.parse_args()
    stages = tuple(s for s in args.stages.split(",") if s)
    try:
        an.check_features(stages, args.pool)
    except EdgeTLError as e:
        p.error(str(e))
    tr, te, test = lite0_224(args.work)
    f_tr, f_te = patches(tr, stages, args.pool), patches(te, stages, args.pool)
    grid = tuple(tr[stages[0]].shape[-2:])

    t0 = time.perf_counter()
    state = an.build(f_tr, grid, stages, args.pool)
    bank_s = time.perf_counter() - t0
    bank_te = state.distances(f_te, "exact")
    bank_tr = state.loo_maps

    t0 = time.perf_counter()
    x_tr, x_te = state.standardise(f_tr), state.standardise(f_te)
    mu, inv = padim_fit(x_tr)
    pad_tr = pc.blur(padim_maps(x_tr, mu, inv, grid), state.sigma)
    pad_te = pc.blur(padim_maps(x_te, mu, inv, grid), state.sigma)
    padim_s = time.perf_counter() - t0
    padim_mb = (mu.nbytes + inv.nbytes) / 2**20

    rows = [
        report("bank, raw distance (shipped build)", bank_te, test),
        report("PaDiM, Mahalanobis", pad_te, test),
        report(
            "sum of both, z-scored on train",
            zscore(bank_te, bank_tr) + zscore(pad_te, pad_tr),
            test,
        ),
    ]
    print(
        f"features {'+'.join(stages)} pool {args.pool}, grid {grid[0]}x{grid[1]}, "
        f"{x_tr.shape[-1]} channels; bank {state.bank_mb:.1f} MB ({bank_s:.0f} s), "
        f"PaDiM {padim_mb:.1f} MB float32 ({padim_s:.0f} s)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
