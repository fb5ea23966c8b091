"""How many good images an anomaly threshold needs: false alarms on held-out good tiles for
banks built from n good images, against the 1 % target.

On ``../shared/data/magnetic_tile``: 300 of the 679 good training images (a fixed random
draw) and the 273 good test images through BUNDLE's backbone once; banks of 30, 100 and 300
of those images (random draws, seed 0) built with the shipped code
(``edge_tl.runtime.anomaly.build``); each bank's threshold applied to the held-out good
tiles. ``anomaly.images_needed(0.01)`` is 299: below it every build warns.

    .venv/bin/python benchmarks/anomaly_calibration.py BUNDLE

BUNDLE: any bundle with a ``features_s16`` output, e.g. ``edge-tl export --backbone
efficientnet_lite0 --recipe openvino-int8 --calib FOLDER --out BUNDLE``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.runtime import Model, anomaly  # noqa: E402

MT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default=str(MT))
    args = ap.parse_args()
    model = Model(args.bundle)
    rng = np.random.default_rng(0)
    train = sorted((Path(args.data) / "train" / "good").iterdir())
    test = sorted((Path(args.data) / "test" / "good").iterdir())
    pool = [str(train[i]) for i in np.sort(rng.permutation(len(train))[:300])]
    held = model.patch_features([str(p) for p in test])
    feats = model.patch_features(pool)
    grid = model.detector._grid(anomaly.DEFAULT_STAGES)
    print(f"{model.manifest.artifact.recipe} on {len(test)} held-out good tiles, target 1 %")
    for n, draws in ((30, 5), (100, 3), (300, 1)):
        rates = []
        for _ in range(draws):
            idx = np.sort(rng.permutation(len(pool))[:n])
            state = anomaly.build(feats[idx], grid)
            scores, _ = state.score(held)
            rates.append(float((scores > state.threshold).mean()))
        warned = "warns" if anomaly.calibration_warning(n, 0.01) else "no warning"
        shown = ", ".join(f"{r:.1%}" for r in rates)
        print(f"bank of {n:>3} good images ({warned}): false alarms {shown}")


if __name__ == "__main__":
    main()
