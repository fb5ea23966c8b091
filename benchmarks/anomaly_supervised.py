"""What would a few labelled defect masks buy on magnetic tiles? A ceiling check for the
good-images-only bank: a linear probe on the same patch features, trained on some defective
tiles' masks, next to the shipped bank's map, one run.

The bank ranks marked defect pixels far above good tiles' pixels but not above the
defective tiles' own unmarked stains and chipped edges (``magnetic_tile.Test.pooled_parts``).
This script asks whether the *features* can tell the two apart when told which is which:
a logistic-regression linear probe (scikit-learn, ``C = 1``, class-balanced) per patch on
the frozen backbone's standardised patch features, trained with each grid cell's marked
fraction as a soft label (a cell counts as a defect with weight ``f`` and as defect-free with
weight ``1 - f``), on every good training tile's patches and on the defective tiles of one
half of the test set (split by tile, stratified by type, ``--seed``), and scored on the other
half; the two halves swap, so every test tile is scored by a probe that never saw it. With
``--per-type N`` only ``N`` labelled defective tiles of each type (drawn at random) train
each half's probe: what a field engineer could mark by hand. This leaves the
good-images-only setting: it measures the ceiling, it is not a scorer the device ships.

Same features as ``anomaly_padim.py`` (FP32 PyTorch EfficientNet-Lite0 squashed to 224,
stride 16, 3 x 3 mean, cached under ``--work``); the bank is the shipped default build scored
by exact search; every map is smoothed by sigma one cell. The sum adds both maps z-scored
on their good *training* maps (the bank's leave-one-out maps, each probe's maps of the good
training tiles).

    cd benchmarks && ../.venv/bin/python anomaly_supervised.py [--per-type 5,20]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("EDGE_TL_QUIET", "1")

from anomaly_sweep import beside_bank  # noqa: E402
from magnetic_tile import Test, numbers, print_table, report, zscore  # noqa: E402

from edge_tl.runtime import patchcore as pc  # noqa: E402

STAGES = ("features_s16",)
FOLDS = 2


def cell_fractions(test: Test, grid: tuple[int, int]) -> np.ndarray:
    """``float32[N, h * w]``: the marked fraction of each grid cell of each test tile, its
    mask squashed to the grid as the backbone sees the tile (area average); 0 for good."""
    h, w = grid
    out = np.zeros((len(test.masks), h * w), np.float32)
    for i, mask in enumerate(test.masks):
        if mask is not None:
            box = Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BOX)
            out[i] = np.clip(np.asarray(box, np.float32).ravel(), 0, 1)
    return out


def halves(defects: np.ndarray, seed: int = 0) -> np.ndarray:
    """``int64[N]``: each test tile's half (0 or 1), every type split evenly at random."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(defects), np.int64)
    for d in sorted(set(defects)):
        idx = rng.permutation(np.flatnonzero(defects == d))
        fold[idx[1::2]] = 1
    return fold


def choose(idx: np.ndarray, defects: np.ndarray, n: int | None, rng) -> np.ndarray:
    """``n`` of the tiles ``idx`` of each defect type, drawn at random; all of them if ``None``."""
    if n is None:
        return idx
    types = defects[idx]
    return np.concatenate([rng.permutation(idx[types == d])[:n] for d in sorted(set(types))])


def fit_probe(good: np.ndarray, x: np.ndarray, frac: np.ndarray):
    """Logistic regression on good patches ``float32[G, C]`` (label 0) and labelled tiles'
    cells ``float32[M, C]`` with marked fractions ``frac[M]`` (soft labels as weights),
    the defect class weighted up to the defect-free class's total weight."""
    from sklearn.linear_model import LogisticRegression

    pos, neg = frac > 0, frac < 1
    feats = np.concatenate([good, x[neg], x[pos]])
    labels = np.r_[np.zeros(len(good) + neg.sum()), np.ones(pos.sum())]
    weights = np.r_[np.ones(len(good)), 1 - frac[neg], frac[pos]].astype(np.float64)
    weights[labels == 1] *= weights[labels == 0].sum() / weights[labels == 1].sum()
    return LogisticRegression(C=1.0, max_iter=2000).fit(feats, labels, sample_weight=weights)


def probe_maps(
    x_tr: np.ndarray, x_te: np.ndarray, frac: np.ndarray, fold: np.ndarray, labelled, grid, sigma
) -> tuple[np.ndarray, np.ndarray]:
    """Both halves' probes, half ``k``'s trained on the test tiles ``labelled[k]``: smoothed
    test maps ``float32[N, h, w]`` (each tile scored by the probe of the other half) and the
    z-scored version against each probe's good training maps."""
    c = x_tr.shape[-1]
    good = x_tr.reshape(-1, c)
    maps = np.zeros((len(x_te), *grid), np.float32)
    zmaps = np.zeros_like(maps)
    for k, lab in enumerate(labelled):
        probe = fit_probe(good, x_te[lab].reshape(-1, c), frac[lab].ravel())

        def score(x: np.ndarray, probe=probe) -> np.ndarray:
            s = probe.decision_function(x.reshape(-1, c)).astype(np.float32)
            return pc.blur(s.reshape(len(x), *grid), sigma)

        out = fold != k
        maps[out] = score(x_te[out])
        zmaps[out] = zscore(maps[out], score(x_tr))
    return maps, zmaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_a"))
    p.add_argument(
        "--per-type",
        default="5,20",
        help="labelled defective tiles of each type per half, ','-joined (every one is added)",
    )
    p.add_argument("--seed", type=int, default=0, help="the halves' and the picks' draw")
    args = p.parse_args()
    try:
        counts = numbers(args.per_type, int, "--per-type")
    except ValueError as e:
        p.error(str(e))
    test, grid, state, bank_te, x_tr, x_te = beside_bank(args.work, STAGES)
    bank_z = zscore(bank_te, state.loo_maps)
    frac, fold = cell_fractions(test, grid), halves(test.defects, args.seed)

    rows = [report("bank, raw distance (shipped build)", bank_te, test)]
    for n in [*counts, None]:
        rng = np.random.default_rng(args.seed)
        masked = frac.max(1) > 0
        labelled = [
            choose(np.flatnonzero((fold == k) & masked), test.defects, n, rng) for k in range(FOLDS)
        ]
        used = sum(len(lab) for lab in labelled)
        t0 = time.perf_counter()
        maps, zmaps = probe_maps(x_tr, x_te, frac, fold, labelled, grid, state.sigma)
        label = "every" if n is None else f"{n} per type"
        took = time.perf_counter() - t0
        name = f"linear probe, {label} ({used} labelled tiles in all, {took:.0f} s)"
        alone = report(name, maps, test)
        both = report(f"sum: bank + probe, {label}", bank_z + zmaps, test)
        rows += [alone, both]
        print(
            f"  {name}: pixel AUROC {alone['pixel_auroc']:.4f}, sum {both['pixel_auroc']:.4f}",
            flush=True,
        )
    print(
        f"features {'+'.join(STAGES)} pool {state.pool}, grid {grid[0]}x{grid[1]}, "
        f"{x_tr.shape[-1]} channels; {int((frac.max(1) > 0).sum())} defective test tiles "
        f"with a mask, split in {FOLDS} halves; bank {state.bank_mb:.1f} MB"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
