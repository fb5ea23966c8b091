"""Unsupervised domain adaptation on real shifts: no adaptation vs AdaBN vs Deep CORAL vs
DANN vs MCC, each scored on the target's held-out labelled images, and the INT8 bundle of
the best method.

The shared protocol (every figure in the README's domain-adaptation table uses it):

- ELPV A -> B (mono -> poly, poly -> mono): source ``elpv:A`` with the run's usual
  train / val / test split (seed 0); target ``target_split(open_dataset("elpv:B"))``:
  adaptation sees its ``unlabeled`` part, every method is scored on its ``test`` part.
- NEU-DET camera change: ``source, raw = split_domains(image_folder(neu_det))``; the target
  is ``write_camera_shift(raw, FOLDER)`` (gamma 0.6, blur 1 px, half resolution, noise 8)
  opened as an ImageFolder and split by ``target_split``.
- Training: efficientnet_lite0, ``--strategy finetune --train-stages 1 --epochs 5``, seed 0,
  other defaults; the method's loss weight at its default.

``none`` is the run without adaptation (scored on the target afterwards); ``adabn`` re-uses
it (AdaBN changes nothing in training: the batch-norm statistics are re-estimated on the
target after it); ``coral``, ``dann`` and ``mcc`` train with target batches. The INT8 row
exports the best method's run with ``ort-int8``, calibrated on the target's unlabelled images
(``--adapt-bn`` for AdaBN), and scores the bundle on the target test images.
The ``device`` column (feature alignment of the bundle's embeddings on the device, torch-free)
is filled in from ``--device-results`` (a JSON ``{shift: {"target_test_accuracy": ..}}``)
when given.

Each result is written to ``--results`` as soon as it exists, so a partial run keeps what it
measured; a rerun skips the runs already in ``--runs``.

Usage:
    python benchmarks/domain_adaptation.py --runs /tmp/edge_tl_da/runs \
        --results /tmp/edge_tl_da/results.json [--stage train|int8|all] [--shifts elpv-mono,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

SHIFTS = {
    "elpv-mono": ("elpv:mono", "elpv:poly", "ELPV mono -> poly"),
    "elpv-poly": ("elpv:poly", "elpv:mono", "ELPV poly -> mono"),
    "neu-source": (None, None, "NEU-DET camera change"),  # folders made by neu_folders()
}
METHODS = ("none", "adabn", "coral", "dann", "mcc")
SETTINGS = {
    "backbone": "efficientnet_lite0",
    "strategy": "finetune",
    "train_stages": 1,
    "epochs": 5,
    "seed": 0,
}
NEU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "neu_det"


def neu_folders(root: Path) -> tuple[str, str]:
    """The NEU-DET source half (an ImageFolder of symlinks) and the camera-shifted target
    (PNG), written once under ``root``."""
    from edge_tl.data import image_folder
    from edge_tl.domains import split_domains, write_camera_shift

    src_dir, tgt_dir = root / "neu-source", root / "neu-target"
    if not tgt_dir.is_dir():
        source, raw = split_domains(image_folder(NEU.resolve()), 0)
        for p, label in zip(source.paths, source.labels, strict=True):
            d = src_dir / source.classes[int(label)]
            d.mkdir(parents=True, exist_ok=True)
            (d / Path(p).name).symlink_to(Path(p).resolve())
        write_camera_shift(raw, tgt_dir)
    return str(src_dir), str(tgt_dir)


def command(source: str, target: str | None, method: str, out: Path) -> str:
    """The CLI line that makes one run."""
    adapt = f" --target-unlabeled {target} --adapt {method}" if target else ""
    return (
        f"edge-tl train {source}{adapt} --strategy finetune --train-stages 1 --epochs 5 "
        f"--seed 0 --out {out}"
    )


def score_run(run: Path, target: Any, adabn: bool = False) -> dict[str, float]:
    """Target (and source, through the same weights) test accuracy of a run folder, after
    AdaBN on the target's unlabelled images when ``adabn``."""
    from edge_tl.data import open_dataset, split
    from edge_tl.runtime.evaluation import macro_f1
    from edge_tl.spec import SplitRecord
    from edge_tl.train import load_run
    from edge_tl.train.adapt import accuracy, embed_domains
    from edge_tl.train.adapt import adabn as re_estimate

    record, features, head = load_run(run)
    cfg = record["config"]
    ds = open_dataset(record["data"])
    parts = split(ds, SplitRecord(cfg["test_frac"], cfg["val_frac"], cfg["seed"]))
    source_test = ds.subset(parts["test"])
    if adabn:
        re_estimate(features, target.unlabeled, features.spec.preprocess)
    emb = embed_domains(features, source_test, target)
    logits = head.logits(emb["target"])
    return {
        "target_test_accuracy": accuracy(logits, target.test.labels),
        "target_test_macro_f1": macro_f1(logits.argmax(1), target.test.labels, len(ds.classes)),
        "source_test_accuracy": accuracy(head.logits(emb["source"]), source_test.labels),
    }


def train_stage(shift: str, runs: Path, results: dict, save, backfill: bool = False) -> None:
    from edge_tl.train import TrainConfig, train
    from edge_tl.train.adapt import open_target

    source, target_spec, _ = SHIFTS[shift]
    if source is None:
        source, target_spec = neu_folders(runs.parent)
    target = open_target(target_spec, None, 0)
    rows = results.setdefault(shift, {})
    rows["majority"] = float(np.bincount(target.test.labels).max() / len(target.test))
    none_run = runs / f"{shift}-none"
    if not (none_run / "metrics.json").is_file():
        t0 = time.perf_counter()
        train(source, none_run, TrainConfig(**SETTINGS))
        print(f"trained {none_run} in {time.perf_counter() - t0:.0f} s", flush=True)
    for method in ("none", "adabn"):
        if method not in rows or (backfill and "target_test_macro_f1" not in rows[method]):
            t0 = time.perf_counter()
            rows[method] = score_run(none_run, target, adabn=method == "adabn")
            rows[method]["seconds"] = round(time.perf_counter() - t0, 1)
            rows[method]["run"] = str(none_run)
            rows[method]["command"] = command(
                source, target_spec if method == "adabn" else None, method, none_run
            )
            save()
    for method in ("coral", "dann", "mcc"):
        if method in rows and (not backfill or "target_test_macro_f1" in rows[method]):
            continue
        out = runs / f"{shift}-{method}"
        t0 = time.perf_counter()
        if not (out / "metrics.json").is_file():
            cfg = TrainConfig(**SETTINGS, target_unlabeled=target_spec, adapt=method)
            train(source, out, cfg, force=out.exists())
        m = json.loads((out / "metrics.json").read_text())
        rows[method] = {
            "target_test_accuracy": m["target_test_accuracy"],
            "target_test_macro_f1": m["target_test_macro_f1"],
            "source_test_accuracy": m["test_accuracy"],
            "adapt_weight": m["adapt_weight"],
            "adapt_loss_last_epoch": m.get("adapt_loss_last_epoch"),
            "seconds": round(time.perf_counter() - t0, 1),
            "run": str(out),
            "command": command(source, target_spec, method, out),
        }
        save()


def int8_stage(shift: str, runs: Path, results: dict, save, recipe: str) -> None:
    """Export the best method's run with ``recipe`` and score the bundle on the target."""
    from edge_tl.errors import EdgeTLError
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.runtime.evaluation import macro_f1
    from edge_tl.runtime.heads import LinearHead
    from edge_tl.train.adapt import accuracy, open_target

    source, target_spec, _ = SHIFTS[shift]
    if source is None:
        source, target_spec = neu_folders(runs.parent)
    rows = results[shift]
    best = max((m for m in METHODS if m in rows), key=lambda m: rows[m]["target_test_accuracy"])
    key = f"int8_{best}"
    if key in rows:
        return
    target = open_target(target_spec, None, 0)
    run = Path(rows[best]["run"])
    bundle = runs.parent / "bundles" / f"{shift}-{best}-{recipe}"
    calib = None  # AdaBN calibrates on the target images it adapted on
    if best != "adabn":  # the same images, never the scored ones
        calib = runs.parent / "calib" / shift
        if not calib.is_dir():
            calib.mkdir(parents=True)
            for i, p in enumerate(target.unlabeled):
                (calib / f"{i:05d}{Path(p).suffix}").symlink_to(Path(p).resolve())
    t0 = time.perf_counter()
    try:
        export_bundle(
            bundle,
            recipe,
            run=run,
            calib=calib,
            head_fit="source",
            force=True,
            adapt_bn=target_spec if best == "adabn" else None,
        )
    except EdgeTLError as e:  # accuracy control refused the artifact: that is the result
        rows[key] = {"recipe": recipe, "refused": str(e), "run": str(run)}
        save()
        return
    model = Model(bundle)
    emb = model.embed(list(target.test.paths))
    logits = LinearHead.load(bundle / "head.npz").logits(emb)
    rows[key] = {
        "recipe": recipe,
        "target_test_accuracy": accuracy(logits, target.test.labels),
        "target_test_macro_f1": macro_f1(logits.argmax(1), target.test.labels, logits.shape[1]),
        "seconds": round(time.perf_counter() - t0, 1),
        "bundle": str(bundle),
        "command": f"edge-tl export {run} --recipe {recipe} --head-fit source"
        + (f" --adapt-bn {target_spec}" if best == "adabn" else f" --calib {calib}")
        + f" --out {bundle}",
    }
    save()


def table(shift: str, rows: dict, device: dict | None) -> str:
    """One Markdown table: target and source test accuracy per method."""
    title = SHIFTS[shift][2]
    none = rows.get("none", {}).get("target_test_accuracy")
    majority = rows.get("majority")
    lines = [
        f"### {title}",
        "",
        f"(majority class of the target test part: {majority:.4f})" if majority else "",
        "",
        "| method | target test acc | vs none (pt) | target macro F1 | source test acc |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        if m not in rows:
            continue
        r = rows[m]
        gain = "" if none is None else f"{100 * (r['target_test_accuracy'] - none):+.1f}"
        lines.append(
            f"| {m} | {r['target_test_accuracy']:.4f} | {gain} | "
            f"{r.get('target_test_macro_f1', float('nan')):.4f} | "
            f"{r['source_test_accuracy']:.4f} |"
        )
    dev = (device or {}).get(shift)
    lines.append(
        "| device feature alignment | "
        + (
            f"{dev['target_test_accuracy']:.4f} |  |  |  |"
            if dev
            else "(not measured here) |  |  |  |"
        )
    )
    for k, r in rows.items():
        if k.startswith("int8_") and "refused" in r:
            lines.append(
                f"| {k[5:]} as {r['recipe']} bundle | refused by accuracy control |  |  |  |"
            )
        elif k.startswith("int8_"):
            lines.append(
                f"| {k[5:]} as {r['recipe']} bundle | {r['target_test_accuracy']:.4f} | "
                + ("" if none is None else f"{100 * (r['target_test_accuracy'] - none):+.1f}")
                + f" | {r.get('target_test_macro_f1', float('nan')):.4f} |  |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("/tmp/edge_tl_da/runs"))
    p.add_argument("--results", type=Path, default=Path("/tmp/edge_tl_da/results.json"))
    p.add_argument("--stage", choices=["train", "int8", "all", "table"], default="all")
    p.add_argument("--shifts", default=",".join(SHIFTS))
    p.add_argument("--recipe", default="ort-int8")
    p.add_argument("--backfill", action="store_true", help="add macro F1 to older results")
    p.add_argument("--device-results", type=Path, help="JSON of the on-device alignment")
    args = p.parse_args()
    results: dict = json.loads(args.results.read_text()) if args.results.is_file() else {}

    def save() -> None:
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.results)

    shifts = [s for s in args.shifts.split(",") if s]
    args.runs.mkdir(parents=True, exist_ok=True)
    for shift in shifts:
        if args.stage in ("train", "all"):
            train_stage(shift, args.runs, results, save, args.backfill)
    for shift in shifts:
        if args.stage in ("int8", "all") and "none" in results.get(shift, {}):
            int8_stage(shift, args.runs, results, save, args.recipe)
    device = json.loads(args.device_results.read_text()) if args.device_results else None
    for shift in shifts:
        if shift in results:
            print(table(shift, results[shift], device), "\n")
    gains = {
        s: {
            m: round(100 * (r[m]["target_test_accuracy"] - r["none"]["target_test_accuracy"]), 1)
            for m in METHODS
            if m in r and "none" in r
        }
        for s, r in results.items()
        if s in shifts
    }
    print("gain over none (pt):", json.dumps(gains))


if __name__ == "__main__":
    main()
