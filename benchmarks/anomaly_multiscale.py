"""Do two banks, one of narrow and one of wide patches, localise defects on magnetic tiles
better together than either alone? One run: each pooling's bank map, and their sum and
maximum, side by side.

Wider pooling (9 x 9 instead of 3 x 3) lifts the pooled pixel AUROC by ranking the uneven
grinding bands higher, but blurs blowholes and cracks away (``anomaly_aspect.py --pools``);
a multi-scale map could keep both. Each pooling gets the shipped bank build (k-centre 50 %,
half precision, FP32 PyTorch EfficientNet-Lite0 squashed to 224, stride 16, cached under
``--work``) scored by exact search, with the raw distance (sigma one cell) as its map; the
sum and maximum combine the maps z-scored by the mean and standard deviation of each
bank's leave-one-out *training* maps, so nothing is chosen on the test set. Scoring both
banks doubles the bank's bytes and the search's time. Figures on the 665 test tiles, as
``anomaly_padim.py`` (``magnetic_tile.report``): image AUROC (map maximum), pooled pixel
AUROC split by its negatives and pixel AUROC inside the defective tiles per type.

    cd benchmarks && ../.venv/bin/python anomaly_multiscale.py [--pools 3,9]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from anomaly_sweep import lite0_224  # noqa: E402
from magnetic_tile import patches, print_table, report, zscore  # noqa: E402

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.runtime import anomaly as an  # noqa: E402

STAGES = ("features_s16",)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_a"))
    p.add_argument("--pools", default="3,9", help="','-joined odd sizes, at least two")
    args = p.parse_args()
    try:
        pools = [int(k) for k in args.pools.split(",") if k]
    except ValueError:
        p.error(f"--pools {args.pools}: give ','-joined odd sizes, e.g. 3,9")
    if len(set(pools)) < 2:
        p.error(f"--pools {args.pools}: give at least two different sizes, e.g. 3,9")
    try:
        for k in pools:
            an.check_features(STAGES, k)
    except EdgeTLError as e:
        p.error(f"--pools {args.pools}: {e}")
    tr, te, test = lite0_224(args.work)
    grid = tuple(tr[STAGES[0]].shape[-2:])

    z: dict[int, np.ndarray] = {}
    rows = []
    for k in dict.fromkeys(pools):
        t0 = time.perf_counter()
        f_tr, f_te = patches(tr, STAGES, k), patches(te, STAGES, k)
        state = an.build(f_tr, grid, STAGES, k)
        maps = state.distances(f_te, "exact")
        z[k] = zscore(maps, state.loo_maps)
        rows.append(report(f"{k} x {k}", maps, test))
        print(
            f"{k} x {k}: bank {state.bank_mb:.1f} MB, build and score "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    for a, b in itertools.combinations(z, 2):
        rows.append(report(f"sum, {a} + {b}", z[a] + z[b], test))
        rows.append(report(f"maximum, {a} and {b}", np.maximum(z[a], z[b]), test))

    print_table(rows)


if __name__ == "__main__":
    main()
