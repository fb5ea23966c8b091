"""ELPV to the published 88.4 % on a CPU: one training lever per row, then INT8.

Trains EfficientNet-Lite on ELPV (binary functional / defective, stratified 75/25 split,
seed 0, 656 held-out cells; ``val_frac`` 0.1 of the rest chooses the epoch) from the
demo's settings (finetune, last stage, 6 epochs, 224 px, one cached view) and changes one
setting per row; prints held-out accuracy, the defective class's recall and the training
seconds. ``--final ROW`` exports that row's run through the INT8 recipes and evaluates each
bundle with the torch-free runtime. Published: 88.4 % (Deitsch et al. 2019, VGG-19
fine-tuned on a GPU with augmentation).

Resumable in chunks: results go to ``--json`` after every row, rows already there are
skipped, and ``--budget-s`` stops before starting a row once that many seconds have passed
(each chunk then stays a few minutes long on a shared machine)::

    .venv/bin/python benchmarks/elpv.py --budget-s 420          # repeat until "all rows done"
    .venv/bin/python benchmarks/elpv.py --final defaults        # INT8 of the defaults' run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = 0.884  # Deitsch et al. 2019
DEFECTIVE = "defective"

# the demo before this benchmark: finetune, the last stage, 6 epochs, native size, 1 view
DEMO = {
    "strategy": "finetune",
    "train_stages": 1,
    "epochs": 6,
    "image_size": 0,
    "views": 1,
    "augment": "auto",
}
# one lever per row, from the demo's settings (the last rows combine the winners)
ROWS: dict[str, dict[str, Any]] = {
    "demo (1 stage, 6 epochs, 224 px, 1 view)": {},
    "train_stages=2": {"train_stages": 2},
    "train_stages=3": {"train_stages": 3},
    "epochs=12": {"epochs": 12},
    "balance=loss": {"balance": "loss"},
    "lr_backbone=1e-3": {"lr_backbone": 1e-3},
    "views=4 (inspection)": {"views": 4},
    "views=4 (dihedral: flips + rot90 only)": {
        "views": 4,
        "augment": "none,hflip=0.5,vflip=0.5,rot90=0.75",
    },
    "image_size=320": {"image_size": 320},
    "efficientnet_lite2 (260 px)": {"backbone": "efficientnet_lite2"},
    # what `edge-tl train elpv --test-frac 0.25` fine-tunes: TrainConfig's defaults
    "defaults (finetune, 2 stages, 8 epochs)": {"train_stages": 2, "epochs": 8},
}


def config_of(kw: dict[str, Any]):
    from edge_tl.train import TrainConfig

    return TrainConfig(**{**DEMO, **kw}, test_frac=0.25, val_frac=0.1, seed=0)


def run_row(name: str, kw: dict[str, Any], work: Path) -> dict[str, Any]:
    from edge_tl.train import train

    cfg = config_of(kw)
    m = train("elpv", work / _slug(name), cfg, force=True)
    return {
        "settings": kw,
        "train_seconds": m["train_seconds"],
        "cache_seconds": m["cache_seconds"],
        "seconds_per_epoch": m["seconds_per_epoch"],
        "best_epoch": m["best_epoch"],
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "defective_recall": m["test_recall"][DEFECTIVE],
    }


def final(name: str, work: Path, recipes: list[str]) -> dict[str, Any]:
    """Export the row's run through ``recipes`` and evaluate each bundle on the test split."""
    from edge_tl.data import open_dataset, split
    from edge_tl.export import iter_bundles
    from edge_tl.runtime import Model
    from edge_tl.spec import SplitRecord, load_recipe
    from edge_tl.train import load_run

    run = work / _slug(name)
    record, _, _ = load_run(run)
    c = record["config"]
    ds = open_dataset("elpv")
    test = ds.subset(split(ds, SplitRecord(c["test_frac"], c["val_frac"], c["seed"]))["test"])
    out: dict[str, Any] = {"row": name, "pytorch": record["metrics"]["test_accuracy"]}
    t0 = time.perf_counter()
    resolved = [load_recipe(r) for r in recipes]
    bundles = iter_bundles(work / "bundles", resolved, run=run, force=True)
    for rec in resolved:
        result = next(bundles)
        if result.manifest is None:
            out[rec.name] = {"refused": str(result.refused)}
            continue
        res = Model(work / "bundles" / rec.name).classifier.evaluate(test)
        out[rec.name] = {
            "accuracy": res.accuracy,
            "defective_recall": res.per_class[DEFECTIVE]["accuracy"],
            "image_size": record["preprocess"]["size"],
        }
    bundles.close()
    out["export_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def tta(name: str, work: Path) -> dict[str, Any]:
    """Test-time augmentation on the row's run, in FP32 (ONNX Runtime): held-out accuracy
    with the run's head on the mean embedding of 1, 2 (+ horizontal flip), 4 (+ vertical
    flip, both) and 8 (+ the quarter turns) symmetric views of each cell. Tells whether
    averaging views could pay for its 2-8x latency on the device."""
    import numpy as np
    import torch

    from edge_tl.data import open_dataset, split
    from edge_tl.runtime.preprocess import batch_inputs
    from edge_tl.spec import SplitRecord
    from edge_tl.train import load_run
    from edge_tl.train.cache import PrefixRunner

    record, features, head = load_run(work / _slug(name))
    c = record["config"]
    ds = open_dataset("elpv")
    test = ds.subset(split(ds, SplitRecord(c["test_frac"], c["val_frac"], c["seed"]))["test"])
    pre = features.spec.preprocess
    views = [
        lambda x: x,
        lambda x: x[..., ::-1],
        lambda x: x[..., ::-1, :],
        lambda x: x[..., ::-1, ::-1],
        *(lambda x, k=k: np.rot90(x, k, axes=(-2, -1)) for k in (1, 3)),
        lambda x: np.rot90(x[..., ::-1], 1, axes=(-2, -1)),
        lambda x: np.rot90(x[..., ::-1], 3, axes=(-2, -1)),
    ]
    paths = list(test.paths)
    embs = []
    with torch.no_grad(), PrefixRunner(features, pre.size, None) as run:
        for v in views:
            batches = (
                np.ascontiguousarray(v(batch_inputs(paths[i : i + 64], pre)))
                for i in range(0, len(paths), 64)
            )
            embs.append(run(batches))
    out: dict[str, Any] = {"row": name}
    for k in (1, 2, 4, 8):
        pred = head.logits(np.mean(embs[:k], axis=0)).argmax(1)
        d = test.classes.index(DEFECTIVE)
        out[f"views_{k}"] = {
            "accuracy": float((pred == test.labels).mean()),
            "defective_recall": float((pred[test.labels == d] == d).mean()),
        }
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.split(" (")[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="elpv-results.json", help="results file (resumed)")
    p.add_argument("--work", default="/tmp/edge_tl_elpv_bench", help="run folders and bundles")
    p.add_argument("--only", default="", help="row names separated by ';' (default: all)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no row after this")
    p.add_argument("--final", default="", help="export this row's run to INT8 and evaluate")
    p.add_argument("--tta", default="", help="measure test-time augmentation on this row's run")
    p.add_argument("--recipes", default="ort-int8-avx2,openvino-int8")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    path, work = Path(args.json), Path(args.work)
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    rows = results.setdefault("rows", {})
    if args.tta:
        results.setdefault("tta", {})[args.tta] = tta(args.tta, work)
        path.write_text(json.dumps(results, indent=2) + "\n")
    elif args.final:
        results.setdefault("int8", {})[args.final] = final(
            args.final, work, args.recipes.split(",")
        )
        path.write_text(json.dumps(results, indent=2) + "\n")
    else:
        t0 = time.perf_counter()
        names = [n.strip() for n in args.only.split(";")] if args.only else list(ROWS)
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            p.error(f"unknown row(s) {unknown}; rows: {'; '.join(ROWS)}")
        for name in names:
            if name in rows:
                continue
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                print("budget spent; run again to go on", file=sys.stderr)
                break
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows[name] = run_row(name, ROWS[name], work)
            path.write_text(json.dumps(results, indent=2) + "\n")
        else:
            print("all rows done", file=sys.stderr)
    _table(results)
    return 0


def _table(results: dict[str, Any]) -> None:
    print(
        "\nELPV, stratified 75/25, seed 0 (656 held-out cells); EfficientNet-Lite0 unless "
        f"named; published {PUBLISHED:.3f}\n"
    )
    print("| row | train s | val acc | test acc | defective recall |")
    print("|---|---|---|---|---|")
    for name, r in results.get("rows", {}).items():
        print(
            f"| {name} | {r['train_seconds']:.0f} | {r['val_accuracy']:.4f} | "
            f"{r['test_accuracy']:.4f} | {r['defective_recall']:.4f} |"
        )
    for name, f in results.get("int8", {}).items():
        for recipe, r in f.items():
            if isinstance(r, dict) and "accuracy" in r:
                print(
                    f"| {name} -> {recipe} | | | {r['accuracy']:.4f} | "
                    f"{r['defective_recall']:.4f} |"
                )
            elif isinstance(r, dict):
                print(f"| {name} -> {recipe} | refused: {r['refused'][:80]} |")
    for name, t in results.get("tta", {}).items():
        for k in (2, 4, 8):
            r = t[f"views_{k}"]
            print(
                f"| {name} + test-time mean of {k} views (FP32) | | | {r['accuracy']:.4f} | "
                f"{r['defective_recall']:.4f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
