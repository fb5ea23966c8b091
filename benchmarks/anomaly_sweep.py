"""Accuracy sweep of the anomaly scorer's geometry and features on magnetic tiles: input
size, stages, pooling, backbone, map smoothing and the pixel map's normalisation, every
candidate's test figures side by side (nothing is chosen on the test set by this script;
the threshold is the calibrated one, the false-alarm rate is on the 273 held-out good tiles).

Backbone outputs come from the FP32 PyTorch backbone at each input size (squashed, as the
device's preprocessing does) and are cached as float16 under ``--work``; banks are built and
scored with the shipped numpy code (``edge_tl.runtime.anomaly``).

    .venv/bin/python benchmarks/anomaly_sweep.py --sizes 224,320 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from magnetic_tile import DATA, Test, patches  # noqa: E402

from edge_tl.runtime import anomaly as an  # noqa: E402
from edge_tl.runtime import evaluation as ev  # noqa: E402
from edge_tl.runtime import patchcore as pc  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs  # noqa: E402

STAGES = ("features_s8", "features_s16")


def outputs(backbone: str, size: int, paths: list[str], work: Path, tag: str) -> dict:
    """Both stages' FP32 outputs at ``size`` x ``size`` (cached as float16)."""
    cache = work / f"{backbone}_{size}.{tag}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import torch

    from edge_tl.backbones import at_size, build

    torch.set_num_threads(2)
    features = at_size(build(backbone)[0], size)
    pre = features.spec.preprocess
    parts: dict[str, list] = {s: [] for s in STAGES}
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            x = torch.from_numpy(batch_inputs(paths[i : i + 16], pre))
            _, s8, s16 = features(x)
            parts["features_s8"].append(s8.numpy().astype(np.float16))
            parts["features_s16"].append(s16.numpy().astype(np.float16))
    out = {s: np.concatenate(v) for s, v in parts.items()}
    np.savez(cache, **out)
    return out


def lite0_224(work: Path) -> tuple[dict, dict, Test]:
    """EfficientNet-Lite0's FP32 outputs at 224 of the good training tiles and of the test
    set (cached under ``work``), and that test set: what the second-scorer benchmarks
    (``anomaly_padim.py``, ``anomaly_multiscale.py``, ``anomaly_simplenet.py``) start from."""
    work.mkdir(parents=True, exist_ok=True)
    train_paths, _ = an.good_images(DATA)
    test = Test()
    tr = outputs("efficientnet_lite0", 224, train_paths, work, "train")
    return tr, outputs("efficientnet_lite0", 224, test.paths, work, "test"), test


class Beside(NamedTuple):
    """The shipped bank and the standardised patch features a second scorer is measured
    beside (:func:`beside_bank`)."""

    test: Test
    grid: tuple[int, int]
    state: an.AnomalyState  # the default build (k-centre 50 %, half precision)
    bank_te: np.ndarray  # float32[N, h, w], its raw-distance test maps by exact search
    x_tr: np.ndarray  # float32[n, h * w, C], good training patches in the bank's space
    x_te: np.ndarray  # float32[N, h * w, C], test patches in the bank's space


def beside_bank(work: Path, stages: tuple[str, ...] = ("features_s16",)) -> Beside:
    """Lite0 at 224 (:func:`lite0_224`), 3 x 3 patches of ``stages``, the shipped bank
    built from them and its test maps: where ``anomaly_simplenet.py`` and
    ``anomaly_supervised.py`` start."""
    tr, te, test = lite0_224(work)
    pool = an.DEFAULT_POOL
    f_tr, f_te = patches(tr, stages, pool), patches(te, stages, pool)
    grid = tuple(tr[stages[0]].shape[-2:])
    state = an.build(f_tr, grid, stages, pool)
    bank_te = state.distances(f_te, "exact")
    return Beside(test, grid, state, bank_te, state.standardise(f_tr), state.standardise(f_te))


@dataclasses.dataclass(frozen=True)
class Config:
    backbone: str = "efficientnet_lite0"
    size: int = 224
    stages: tuple = ("features_s16",)
    pool: int = 3
    coreset: float = 0.10
    max_mb: float = 16.0
    sigma: float = 1.0  # grid cells

    @property
    def name(self) -> str:
        st = "+".join(s.split("_")[1] for s in self.stages)
        return (
            f"{self.backbone.split('_')[-1]} {self.size} {st} pool{self.pool} "
            f"cs{self.coreset:g} cap{self.max_mb:g} sig{self.sigma:g}"
        )


def run(cfg: Config, train_o: dict, test_o: dict, test: Test) -> dict:
    f_tr = pc.patch_features(
        {s: train_o[s].astype(np.float32) for s in cfg.stages}, cfg.stages, cfg.pool
    )
    f_te = pc.patch_features(
        {s: test_o[s].astype(np.float32) for s in cfg.stages}, cfg.stages, cfg.pool
    )
    grid = train_o[cfg.stages[0]].shape[-2:]
    t0 = time.perf_counter()
    state = an.build(f_tr, grid, cfg.stages, cfg.pool, cfg.coreset, cfg.max_mb, sigma=cfg.sigma)
    build_s = time.perf_counter() - t0
    raw = state.distances(f_te)
    norm = state.normalise(raw)
    scores = norm.reshape(len(norm), -1).max(1)
    raw_scores = raw.reshape(len(raw), -1).max(1)
    thr = state.threshold
    good = test.y == 0
    # threshold with each good image's own map left out of its position statistics
    loo = state.loo_maps
    n = len(loo)
    s1, s2 = loo.sum(0), (loo.astype(np.float64) ** 2).sum(0)
    w = (n - 1) / (n - 1 + an.PRIOR_IMAGES)
    mu_i = (s1 - loo) / (n - 1)
    sd_i = np.sqrt(np.maximum((s2 - loo.astype(np.float64) ** 2) / (n - 1) - mu_i**2, 0))
    mu_i = w * mu_i + (1 - w) * loo.mean()
    sd_i = np.maximum(w * sd_i + (1 - w) * loo.std(), 1e-6)
    loo_scores2 = ((loo - mu_i) / sd_i).reshape(n, -1).max(1)
    thr2 = float(np.quantile(loo_scores2, 1 - state.false_alarm))
    return {
        "config": dataclasses.asdict(cfg),
        "image_auroc": ev.auroc(scores, test.y),
        "image_auroc_raw": ev.auroc(raw_scores, test.y),
        "pixel_auroc": test.pixel_auroc(norm),
        "pixel_auroc_raw": test.pixel_auroc(raw),
        "false_alarm": float((scores[good] > thr).mean()),
        "false_alarm_loo_stats": float((scores[good] > thr2).mean()),
        "threshold": thr,
        "threshold_loo_stats": thr2,
        "f1": ev.at_threshold(scores, test.y, thr)["f1"],
        "per_defect": test.per_defect(scores),
        "bank_mb": state.bank_mb,
        "bank_patches": len(state.bank),
        "build_s": build_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_a"))
    ap.add_argument("--backbones", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="224")
    ap.add_argument("--stages", default="features_s16")  # ';'-separated sets of ','-joined
    ap.add_argument("--pools", default="3")
    ap.add_argument("--coresets", default="0.1")
    ap.add_argument("--max-mb", type=float, default=16.0)
    ap.add_argument("--sigmas", default="1")
    ap.add_argument("--extract-only", action="store_true")
    ap.add_argument("--json", type=Path, help="results appended (one JSON object a line)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_paths, _ = an.good_images(DATA)
    test = Test()
    done = set()
    if args.json and args.json.is_file():
        done = {
            json.dumps(json.loads(line)["config"])
            for line in args.json.read_text().split("\n")
            if line
        }
    for bb in args.backbones.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            tr = outputs(bb, size, train_paths, args.work, "train")
            te = outputs(bb, size, test.paths, args.work, "test")
            if args.extract_only:
                print(f"extracted {bb} {size}", flush=True)
                continue
            grid = itertools.product(
                args.stages.split(";"),
                (int(v) for v in args.pools.split(",")),
                (float(v) for v in args.coresets.split(",")),
                (float(v) for v in args.sigmas.split(",")),
            )
            for stages, pool, cs, sig in grid:
                cfg = Config(bb, size, tuple(stages.split(",")), pool, cs, args.max_mb, sig)
                if json.dumps(dataclasses.asdict(cfg)) in done:
                    continue
                r = run(cfg, tr, te, test)
                _print(cfg, r)
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps(r) + "\n")


def _print(cfg: Config, r: dict) -> None:
    pd = " ".join(f"{k[:5]} {v:.3f}" for k, v in r["per_defect"].items())
    print(
        f"{cfg.name:48s} img {r['image_auroc']:.4f} (raw {r['image_auroc_raw']:.4f}) "
        f"pix {r['pixel_auroc']:.4f} (raw {r['pixel_auroc_raw']:.4f}) "
        f"FA {r['false_alarm']:.1%} (loo stats {r['false_alarm_loo_stats']:.1%}) "
        f"F1 {r['f1']:.3f} {r['bank_mb']:.1f} MB {r['build_s']:.0f}s | {pd}",
        flush=True,
    )


if __name__ == "__main__":
    main()
