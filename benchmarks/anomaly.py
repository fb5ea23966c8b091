"""Anomaly detection from good images, side by side in one run: AUROC, bank size, latency,
field update.

On ``../shared/data/magnetic_tile`` (MVTec layout; 679 good training images, 273 good and
392 defective test images with pixel masks): the pretrained EfficientNet-Lite0 exported as an
ONNX FP32 and an ORT INT8 bundle at each input size of ``--sizes`` (224, its own, and 320 by
``edge-tl export --image-size 320``; INT8 calibrated on ``train/good``: the camera's own good
parts), every image's backbone outputs computed once per bundle, then memory banks built and
scored with the shipped code (``edge_tl.runtime.anomaly``):

- image and pixel AUROC (also for the raw distance map, before the per-position
  normalisation), F1 and the false-alarm rate on the 273 held-out good test tiles at the
  threshold calibrated for 1 % on ``train/good``, FP32 vs INT8 at each size; then (not with
  ``--core``) the full bank, k-centre 10 %, a 2 MB cap, two stages (strides 8 + 16) instead
  of one, and the reference pipeline (two stages, random 10 % of the patches, raw
  distances, no calibration);
- image AUROC per defect type (blowhole, break, crack, fray, uneven; each type's test
  tiles against the 273 good ones) for every bank;
- pixel AUROC inside defective tiles per defect type (each tile's defect pixels against its
  own other pixels, for the normalised and the raw-distance map): where localisation is lost;
  and the pooled pixel AUROC split by its negatives (every defect pixel against the good
  tiles' pixels alone, and against the defective tiles' defect-free pixels alone) with each
  type's background AUROC (its tiles' defect-free pixels against the good tiles' pixels:
  0.5 when the surface around a defect scores as good surface does);
- latency per image at batch 1 (INT8, 224): decode + resize, engine, search + map, map
  resized to the image, against the engine alone (the shipped fast search and ``--search
  exact``; every search candidate side by side: ``benchmarks/anomaly_search.py``);
- field update: a bank built without the wide tiles (an unseen product variant), then
  ``add`` of 30 wide good images: false alarms on the wide good test images and AUROC
  before and after.

    .venv/bin/python benchmarks/anomaly.py [--core] [--sizes 224,320] [--skip-latency]
        [--work /tmp/edge_tl_anomaly] [--json out.json]

Reference to beat (hand-written pipeline, same weights, FP32, two stages, 3x3 pooling,
random 10 % bank): image AUROC 0.940, pixel AUROC 0.839; with a 10 % greedy coreset
0.967 / 0.851; its k-NN search about 460 ms per image against 14-27 ms for the backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("EDGE_TL_QUIET", "1")

from magnetic_tile import DATA, RECIPES, Test, bundles  # noqa: E402

from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime import anomaly as an  # noqa: E402
from edge_tl.runtime import evaluation as ev  # noqa: E402
from edge_tl.runtime import patchcore as pc  # noqa: E402
from edge_tl.runtime.engine import make_engine  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs, load_image, to_input  # noqa: E402

STAGES = ("features_s8", "features_s16")


def outputs(bundle: Path, paths: list[str], work: Path, tag: str) -> dict[str, np.ndarray]:
    """Both stages' outputs for ``paths`` (cached as float16)."""
    cache = work / f"{bundle.name}.{tag}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    model = Model(bundle)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
    for i in range(0, len(paths), 16):
        r = model.engine.run(batch_inputs(paths[i : i + 16], model.manifest.preprocess), STAGES)
        for s in STAGES:
            parts[s].append(r[s].astype(np.float16))
    out = {s: np.concatenate(v) for s, v in parts.items()}
    np.savez(cache, **out)
    return out


def feats(o: dict[str, np.ndarray], stages: tuple[str, ...], idx=slice(None)) -> np.ndarray:
    return pc.patch_features({s: o[s][idx].astype(np.float32) for s in stages}, stages, 3)


def run_bank(train: np.ndarray, test_f: np.ndarray, test: Test, grid, **kw) -> dict:
    t0 = time.perf_counter()
    state = an.build(train, grid, **kw)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = state.score(test_f)
    score_ms = (time.perf_counter() - t0) / len(test_f) * 1e3
    raw = state.distances(test_f)  # the distance map before the per-position normalisation
    return {
        **test.metrics(scores, maps, state.threshold),
        "pixel_auroc_raw_map": test.pixel_auroc(raw),
        "within_image": test.within_image(maps),
        "within_image_raw_map": test.within_image(raw),
        "pooled_parts": test.pooled_parts(maps),
        "pooled_parts_raw_map": test.pooled_parts(raw),
        "bank_patches": len(state.bank),
        "bank_mb": state.bank_mb,
        "build_s": build_s,
        "search_ms_batched": score_ms,
    }


def reference(train: np.ndarray, test_f: np.ndarray, test: Test, grid) -> dict:
    """The reference pipeline: random 10 % of the raw patches, max raw distance."""
    flat = train.reshape(-1, train.shape[-1])
    idx = np.random.default_rng(0).permutation(len(flat))[: len(flat) // 10]
    bank = flat[idx]
    d = np.sqrt(pc.nearest(test_f.reshape(-1, flat.shape[1]), bank)).reshape(len(test_f), *grid)
    d = pc.blur(d, 2.0 * grid[0] / 28)
    return {
        **test.metrics(d.reshape(len(d), -1).max(1), d, None),
        "bank_patches": len(bank),
        "bank_mb": bank.nbytes / 1e6,
    }


def latency(bundle: Path, train: np.ndarray, test: Test, repeats: int = 3) -> dict:
    """Batch-1 scoring of 40 test images, part by part, as ``Model.score`` does it (ORT
    threads not spinning, the search on one BLAS thread), next to the engine alone and to
    the same loop with both libraries' default threading."""
    state = an.build(train, (14, 14))
    Model(bundle, self_test=False).detector.store.save(state, "build")
    model = Model(bundle)  # a bundle with a bank: the engine is opened without spinning
    plain = Model(bundle, self_test=False)
    plain.engine = make_engine(bundle, plain.manifest.artifact)  # ORT defaults
    pre = model.manifest.preprocess
    images = test.paths[:: len(test.paths) // 40][:40]
    out: dict = {"bank_patches": len(state.bank)}
    runs = (
        ("shipped", model, pc.one_blas_thread, an.DEFAULT_SEARCH),
        ("shipped, --search exact", model, pc.one_blas_thread, "exact"),
        ("defaults", plain, None, an.DEFAULT_SEARCH),
    )
    for tag, m, blas, search in runs:
        parts: dict[str, list[float]] = {"decode": [], "engine": [], "search": [], "resize": []}
        for _ in range(repeats):
            for p in images:
                t0 = time.perf_counter()
                img = load_image(p)
                x = to_input(img, pre)[None]
                t1 = time.perf_counter()
                o = m.engine.run(x, state.stages)
                t2 = time.perf_counter()
                with blas() if blas else contextlib.nullcontext():
                    _, amap = state.score(pc.patch_features(o, state.stages, state.pool), search)
                t3 = time.perf_counter()
                pc.resize_map(amap[0], img.size)
                t4 = time.perf_counter()
                for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    parts[k].append(v * 1e3)
        r = {k: float(np.median(v)) for k, v in parts.items()}
        r["total"] = sum(r.values())
        alone = []
        for _ in range(repeats):
            for p in images[:20]:
                x = to_input(load_image(p), pre)[None]
                t0 = time.perf_counter()
                m.engine.run(x, state.stages)
                alone.append((time.perf_counter() - t0) * 1e3)
        r["engine_alone"] = float(np.median(alone))
        r["search_over_engine_alone"] = r["search"] / r["engine_alone"]
        out[tag] = r
    t0 = time.perf_counter()
    model.detector.predict(images)
    out["model_score_ms"] = (time.perf_counter() - t0) / len(images) * 1e3
    return out


def field_update(o_train, o_test, test: Test, train_paths: list[str], n_add: int = 30) -> dict:
    """Bank without the wide tiles, then ``add`` of ``n_add`` wide good images."""

    def wide(paths):
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(im.size[0] > 1.5 * im.size[1])
        return np.array(out)

    w_train, w_test = wide(train_paths), wide(test.paths)
    stages = ("features_s16",)
    base = an.build(feats(o_train, stages, ~w_train), (14, 14))
    test_f = feats(o_test, stages)
    wide_good = w_test & (test.y == 0)
    rng = np.random.default_rng(0)
    add_idx = np.sort(rng.permutation(np.flatnonzero(w_train))[:n_add])
    t0 = time.perf_counter()
    grown = an.add(base, feats(o_train, stages, add_idx))
    add_s = time.perf_counter() - t0
    out = {"n_base": int((~w_train).sum()), "n_added": n_add, "add_s": add_s}
    for tag, state in (("before", base), ("after", grown)):
        s, m = state.score(test_f)
        out[tag] = {
            "wide_good_flagged": float((s[wide_good] > state.threshold).mean()),
            "other_good_flagged": float((s[~w_test & (test.y == 0)] > state.threshold).mean()),
            "image_auroc": ev.auroc(s, test.y),
            "wide_image_auroc": ev.auroc(s[w_test], test.y[w_test]),
            "threshold": state.threshold,
            "bank_patches": len(state.bank),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[224, 320],
        help="input sizes to export and score at (bundles exported with --image-size)",
    )
    ap.add_argument(
        "--core",
        action="store_true",
        help="only the default bank at each size (FP32 and INT8) and the field update",
    )
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_paths, _ = an.good_images(DATA)
    test = Test()
    res: dict = {"banks": {}}
    o = {}
    for size in args.sizes:
        for precision, bundle in bundles(args.work, size).items():
            o[size, precision] = (
                outputs(bundle, train_paths, args.work, "train"),
                outputs(bundle, test.paths, args.work, "test"),
            )
    paths = bundles(args.work)
    if not args.skip_latency:
        print("  latency", flush=True)
        s16 = ("features_s16",)
        res["latency_int8"] = latency(paths["int8"], feats(o[224, "int8"][0], s16), test)
    s16 = ("features_s16",)
    configs = [
        (f"{size} px, k-centre {an.DEFAULT_CORESET:.0%} (default)", size, precision, s16, {})
        for size in args.sizes
        for precision in RECIPES
    ]
    if not args.core:
        configs += [
            ("224 px, full bank", 224, "int8", s16, {"coreset": 1.0, "max_mb": 1e4}),
            ("224 px, k-centre 10 %", 224, "int8", s16, {"coreset": 0.1}),
            ("224 px, cap 2 MB", 224, "int8", s16, {"max_mb": 2.0}),
            ("224 px, two stages s8+s16, k-centre 10 %", 224, "int8", STAGES, {"coreset": 0.1}),
        ]
    for name, size, precision, stages, kw in configs:
        tr, te = o[size, precision]
        grid = tuple(tr[stages[0]].shape[-2:])
        print(f"  {name} ({precision})", flush=True)
        r = run_bank(feats(tr, stages), feats(te, stages), test, grid, stages=stages, **kw)
        res["banks"][f"{name} | {precision}"] = r
    if not args.core:
        for precision in ("fp32", "int8"):
            tr, te = o[224, precision]
            print(f"  reference pipeline ({precision})", flush=True)
            res["banks"][f"reference: 2 stages, random 10 %, raw distance | {precision}"] = (
                reference(feats(tr, STAGES), feats(te, STAGES), test, (28, 28))
            )
    print("  field update", flush=True)
    res["field_update_int8"] = field_update(*o[224, "int8"], test, train_paths)

    print(
        "\n| bank | artifact | image AUROC | pixel AUROC | pixel AUROC, raw-distance map "
        "| F1 | false alarms, 273 held-out good (target 1 %) | patches | MB | build s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in res["banks"].items():
        name, precision = key.split(" | ")
        f1 = f"{r['f1']:.3f}" if "f1" in r else "-"
        far = f"{r['false_alarm_rate']:.1%}" if "false_alarm_rate" in r else "-"
        build = f"{r['build_s']:.0f}" if "build_s" in r else "-"
        raw = f"{r['pixel_auroc_raw_map']:.4f}" if "pixel_auroc_raw_map" in r else "-"
        print(
            f"| {name} | {precision} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {raw} "
            f"| {f1} | {far} | {r['bank_patches']} | {r['bank_mb']:.1f} | {build} |"
        )
    defects = sorted(next(iter(res["banks"].values()))["per_defect"])
    print("\nimage AUROC per defect type (each defect's test tiles against the 273 good ones)")
    print("| bank | artifact | " + " | ".join(defects) + " |")
    print("|---|---|" + "---|" * len(defects))
    for key, r in res["banks"].items():
        name, precision = key.split(" | ")
        cells = " | ".join(f"{r['per_defect'][d]:.4f}" for d in defects)
        print(f"| {name} | {precision} | {cells} |")
    print(
        "\npixel AUROC inside defective tiles (defect pixels against the same tile's other "
        "pixels, mean over each type's tiles)"
    )
    print("| bank | artifact | map | " + " | ".join(defects) + " |")
    print("|---|---|---|" + "---|" * len(defects))
    for key, r in res["banks"].items():
        name, precision = key.split(" | ")
        for tag, field in (
            ("normalised", "within_image"),
            ("raw distance", "within_image_raw_map"),
        ):
            if field in r:
                cells = " | ".join(f"{r[field][d]:.3f}" for d in defects)
                print(f"| {name} | {precision} | {tag} | {cells} |")
    _print_pooled_parts(res, defects)
    _print_rest(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


def _print_pooled_parts(res: dict, defects: list[str]) -> None:
    """The pooled pixel AUROC split by its negatives, and each type's background AUROC."""
    print(
        "\npooled pixel AUROC by its negatives (all defect pixels against the good tiles' "
        "pixels, or against the defective tiles' defect-free pixels), and each type's "
        "background AUROC (its tiles' defect-free pixels against the good tiles' pixels)"
    )
    print("| bank | artifact | map | vs good tiles | vs defective tiles' background | "
          + " | ".join(defects) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(defects))
    for key, r in res["banks"].items():
        name, precision = key.split(" | ")
        for tag, field in (
            ("normalised", "pooled_parts"),
            ("raw distance", "pooled_parts_raw_map"),
        ):
            if field in r:
                p = r[field]
                cells = " | ".join(f"{p['background'][d]:.3f}" for d in defects)
                print(
                    f"| {name} | {precision} | {tag} | {p['vs_good']:.3f} | "
                    f"{p['vs_defective_background']:.3f} | {cells} |"
                )


def _print_rest(res: dict) -> None:
    """The latency and field-update tables."""
    if "latency_int8" not in res:
        _print_field_update(res)
        return
    lat = res["latency_int8"]
    print(f"\nlatency per image, INT8, batch 1, median ms (bank {lat['bank_patches']} patches)")
    print("| threading | decode+resize | engine | search+map | map to image | total "
          "| engine alone | search / engine alone |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for tag in ("shipped", "shipped, --search exact", "defaults"):
        r = lat[tag]
        print(
            f"| {tag} | {r['decode']:.1f} | {r['engine']:.1f} | {r['search']:.1f} | "
            f"{r['resize']:.1f} | {r['total']:.1f} | {r['engine_alone']:.1f} | "
            f"{r['search_over_engine_alone']:.2f} |"
        )
    print(f"Model.score end to end: {lat['model_score_ms']:.1f} ms per image")
    _print_field_update(res)


def _print_field_update(res: dict) -> None:
    fu = res["field_update_int8"]
    b, a = fu["before"], fu["after"]
    print(
        f"\nfield update (INT8): bank on {fu['n_base']} good images without the wide tiles, "
        f"then add {fu['n_added']} wide ones ({fu['add_s']:.1f} s)"
    )
    print("| | wide good flagged | other good flagged | image AUROC | wide AUROC | patches |")
    print("|---|---|---|---|---|---|")
    for tag, r in (("before", b), ("after add", a)):
        print(
            f"| {tag} | {r['wide_good_flagged']:.1%} | {r['other_good_flagged']:.1%} | "
            f"{r['image_auroc']:.4f} | {r['wide_image_auroc']:.4f} | {r['bank_patches']} |"
        )


if __name__ == "__main__":
    main()
