"""How cost grows with work: four curves, measured in one run, as tables and one PNG.

1. Embedding throughput (images/s) vs batch size (1..64): the pretrained EfficientNet-Lite0
   exported as an ONNX FP32 bundle (calibrated on NEU-DET), run through the runtime's engine
   on preprocessed NEU-DET images (decode not included: the engine's own batch throughput).
2. Cached fine-tuning vs training-set size (ELPV, 250..~2,100 images; the demo's policy:
   last stage + head from cached block-15 activations): the cache build and one epoch (the
   time between two epochs' ends), next to the trained layers' forward + backward alone on
   the same cached tensors (``benchmarks/train_speed.py --ratio`` at each size).
3. Export time vs calibration size: the same backbone to ORT INT8 (the shipped recipe with
   accuracy control, the calibration-spread pass and the tolerances off, so every size
   takes the same path and only calibration grows).
4. Anomaly bank build time vs number of good images (magnetic tile ``train/good``, the
   default bank: block-s16 patches, 3x3 pooling, 10 % k-centre coreset, leave-one-out
   calibration), from backbone outputs computed once.

    .venv/bin/python benchmarks/scaling.py [--png scaling.png] [--quick]

The default run takes about 4 minutes on 2 cores; ``--quick`` (or the per-curve flags)
keeps each curve to its small end. Absolute times depend on the machine; the shapes are the
figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edge_tl.images import is_image_name  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
NEU = DATA / "neu_det"
GOOD = DATA / "magnetic_tile" / "train" / "good"
BACKBONE = "efficientnet_lite0"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _images(folder: Path, n: int) -> list[str]:
    """Up to ``n`` image paths spread evenly over ``folder`` (recursively, sorted)."""
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))
    step = max(1, len(paths) // n) if n else 1
    return paths[::step][:n]


def embedding_throughput(bundle: Path, batches: list[int], images: int) -> list[dict]:
    """Images/s of the engine alone at each batch size, on ``images`` preprocessed images
    (at least two calls per size; the best of two passes)."""
    from edge_tl.runtime import Model
    from edge_tl.runtime.preprocess import batch_inputs

    model = Model(bundle, self_test=False)
    x = batch_inputs(_images(NEU, max(images, max(batches))), model.manifest.preprocess)
    model.engine.run(x[:8])  # warm-up
    rows = []
    for b in batches:
        n = max(len(x) // b, 2) * b
        reps = np.concatenate([x] * (1 + n // len(x)))[:n]
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            for i in range(0, n, b):
                model.engine.run(reps[i : i + b])
            best = min(best, time.perf_counter() - t0)
        rows.append({"batch": b, "images": n, "img_per_s": n / best, "ms_per_img": best / n * 1e3})
        print(f"  batch {b:>3}: {n / best:6.1f} images/s", flush=True)
    return rows


def cached_epochs(sizes: list[int], epochs: int) -> list[dict]:
    """Cache build and epoch seconds at each training-set size (``0``: the whole split)."""
    from train_speed import cached_epoch_ratio

    rows = []
    for n in sizes:
        r = cached_epoch_ratio("elpv", epochs, 2, n // 2, test_frac=0.1, val_frac=0.1)
        r["ratio"] = r["epoch_seconds"] / r["bare_seconds"]
        rows.append(r)
        print(
            f"  {r['n_train']:>5} images: cache {r['cache_seconds']:.1f} s, epoch "
            f"{r['epoch_seconds']:.2f} s, fwd+bwd {r['bare_seconds']:.2f} s",
            flush=True,
        )
    return rows


def export_times(work: Path, sizes: list[int]) -> list[dict]:
    """Seconds of an ORT INT8 export of the pretrained backbone at each calibration size."""
    from edge_tl.export import export_bundle
    from edge_tl.spec import load_recipe

    base = load_recipe("ort-int8")
    rows = []
    for n in sizes:
        rec = dataclasses.replace(
            base,
            calibration_size=n,
            accuracy_control=False,
            calibration_subsets=0,
            min_cosine=0.0,
            max_top1_drop=1.0,
        )
        t0 = time.perf_counter()
        export_bundle(work / f"int8-c{n}", rec, backbone=BACKBONE, calib=NEU, force=True)
        s = time.perf_counter() - t0
        rows.append({"calibration": n, "seconds": s})
        print(f"  calibration {n:>4}: {s:.1f} s", flush=True)
    return rows


def bank_times(bundle: Path, sizes: list[int]) -> list[dict]:
    """Seconds to build the default anomaly bank from ``n`` good images' patch features."""
    from edge_tl.runtime import Model
    from edge_tl.runtime import anomaly as an
    from edge_tl.runtime import patchcore as pc
    from edge_tl.runtime.preprocess import batch_inputs

    model = Model(bundle, self_test=False)
    paths = _images(GOOD, max(sizes))
    parts = []
    for i in range(0, len(paths), 16):
        x = batch_inputs(paths[i : i + 16], model.manifest.preprocess)
        parts.append(model.engine.run(x, an.DEFAULT_STAGES)[an.DEFAULT_STAGES[0]])
    feats = pc.patch_features(
        {an.DEFAULT_STAGES[0]: np.concatenate(parts)}, an.DEFAULT_STAGES, an.DEFAULT_POOL
    )
    side = int(round(np.sqrt(feats.shape[1])))
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        state = an.build(feats[:n], (side, side))
        s = time.perf_counter() - t0
        rows.append({"good_images": n, "patches": n * feats.shape[1], "bank": len(state.bank),
                     "seconds": s})  # fmt: skip
        print(f"  {n:>4} good images: {s:.2f} s (bank {len(state.bank)} patches)", flush=True)
    return rows


def slope(x: list[float], y: list[float]) -> float:
    """Log-log slope between the two largest sizes: 1 linear, < 1 sub-linear, 2 quadratic."""
    return float(np.log(y[-1] / y[-2]) / np.log(x[-1] / x[-2])) if len(x) > 1 else float("nan")


def plot(res: dict, path: Path) -> None:
    from edge_tl.plots import pyplot, save

    plt = pyplot()
    if plt is None:  # pragma: no cover
        print("no matplotlib: no PNG", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    ax = axes[0][0]
    if res.get("embed"):
        r = res["embed"]
        ax.plot([v["batch"] for v in r], [v["img_per_s"] for v in r], "o-")
        ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size", ylabel="images / s", title="embedding throughput (ONNX FP32)")
    ax = axes[0][1]
    if res.get("train"):
        r = res["train"]
        n = [v["n_train"] for v in r]
        ax.plot(n, [v["cache_seconds"] for v in r], "o-", label="cache build (train+val+test)")
        ax.plot(n, [v["epoch_seconds"] for v in r], "s-", label="cached epoch")
        ax.plot(n, [v["bare_seconds"] for v in r], "^--", label="fwd+bwd alone")
        ax.legend()
    ax.set(xlabel="training images (ELPV)", ylabel="seconds", title="cached fine-tuning")
    ax = axes[1][0]
    if res.get("export"):
        r = res["export"]
        ax.plot([v["calibration"] for v in r], [v["seconds"] for v in r], "o-")
    ax.set(xlabel="calibration images", ylabel="seconds", title="ORT INT8 export")
    ax = axes[1][1]
    if res.get("bank"):
        r = res["bank"]
        ax.plot([v["good_images"] for v in r], [v["seconds"] for v in r], "o-")
    ax.set(xlabel="good images", ylabel="seconds", title="anomaly bank build (default bank)")
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
    save(fig, path, "edge_tl scaling (EfficientNet-Lite0, CPU)", integer_x=False)


def report(res: dict) -> None:
    if res.get("embed"):
        r = res["embed"]
        print("\n| batch | images/s | ms / image |\n|---|---|---|")
        for v in r:
            print(f"| {v['batch']} | {v['img_per_s']:.1f} | {v['ms_per_img']:.2f} |")
    if res.get("train"):
        r = res["train"]
        print(
            "\n| training images | images cached | cache build s | cached epoch s | "
            "fwd+bwd alone s | epoch / fwd+bwd |\n|---|---|---|---|---|---|"
        )
        for v in r:
            print(
                f"| {v['n_train']} | {v['cached_images']} | {v['cache_seconds']:.1f} | "
                f"{v['epoch_seconds']:.2f} | "
                f"{v['bare_seconds']:.2f} | {v['ratio']:.2f}x |"
            )
        n = [v["n_train"] for v in r]
        print(
            f"log-log slope at the large end: cache {slope(n, [v['cache_seconds'] for v in r]):.2f}"
            f", epoch {slope(n, [v['epoch_seconds'] for v in r]):.2f}"
        )
    if res.get("export"):
        r = res["export"]
        print("\n| calibration images | export s |\n|---|---|")
        for v in r:
            print(f"| {v['calibration']} | {v['seconds']:.1f} |")
        c = [v["calibration"] for v in r]
        print(f"log-log slope at the large end: {slope(c, [v['seconds'] for v in r]):.2f}")
    if res.get("bank"):
        r = res["bank"]
        print("\n| good images | patches | bank patches | build s |\n|---|---|---|---|")
        for v in r:
            print(f"| {v['good_images']} | {v['patches']} | {v['bank']} | {v['seconds']:.2f} |")
        g = [v["good_images"] for v in r]
        print(f"log-log slope at the large end: {slope(g, [v['seconds'] for v in r]):.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--png", type=Path, default=Path("scaling.png"), help="figure to write")
    p.add_argument("--work", type=Path, help="keep bundles here (default: a temporary folder)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="embedding batch sizes")
    p.add_argument("--embed-images", type=int, default=128, help="images per batch size")
    p.add_argument(
        "--train-sizes", default="250,500,1000,0", help="ELPV training images (0: all, ~2,100)"
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs per size (>= 2)")
    p.add_argument("--calib-sizes", default="25,50,100,200", help="calibration images")
    p.add_argument("--bank-sizes", default="25,50,100,200,400", help="good images")
    p.add_argument(
        "--only", default="embed,train,export,bank", help="curves to measure, comma-separated"
    )
    p.add_argument("--quick", action="store_true", help="small ends only (about 3 minutes)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.embed_images, args.train_sizes = "1,4,16,64", 64, "250,500"
        args.calib_sizes, args.bank_sizes, args.epochs = "25,50", "25,50,100", 2
    only = {w.strip() for w in args.only.split(",")}
    unknown = only - {"embed", "train", "export", "bank"}
    if unknown:
        print(f"--only: unknown curve(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for need, folder in (("embed", NEU), ("export", NEU), ("bank", GOOD)):
        if need in only and not folder.is_dir():
            print(f"no data at {folder}; it is needed for {need}", file=sys.stderr)
            return 2
    if args.epochs < 2:
        print("--epochs must be at least 2 (the first epoch also warms up)", file=sys.stderr)
        return 2
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "fp32"
        if only & {"embed", "bank"} and not (fp32 / "manifest.json").is_file():
            from edge_tl.export import export_bundle

            print("exporting the FP32 bundle ...", flush=True)
            export_bundle(fp32, "onnx-fp32", backbone=BACKBONE, calib=NEU, force=True)
        if "embed" in only:
            print("embedding throughput vs batch size", flush=True)
            res["embed"] = embedding_throughput(fp32, _ints(args.batches), args.embed_images)
        if "train" in only:  # before any INT8 export: torch training in a clean process
            print("cached fine-tuning vs training-set size", flush=True)
            res["train"] = cached_epochs(_ints(args.train_sizes), args.epochs)
        if "export" in only:
            print("ORT INT8 export vs calibration size", flush=True)
            res["export"] = export_times(work, _ints(args.calib_sizes))
        if "bank" in only:
            print("anomaly bank build vs good images", flush=True)
            res["bank"] = bank_times(fp32, _ints(args.bank_sizes))
    report(res)
    plot(res, args.png)
    print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
