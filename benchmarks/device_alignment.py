"""On-device feature alignment (``edge-tl adapt``): target accuracy before and after, per
shift, for the exported bundles of the shared no-adaptation runs.

The protocol (the same for every domain-adaptation figure of the project): the bundle is
the run trained on the source (efficientnet_lite0, ``--strategy finetune --train-stages 1
--epochs 5``, seed 0); the target is ``target_split(T)``: ``unlabeled`` is what ``adapt``
sees (labels unused), ``test`` what every row is scored on.

- ELPV mono -> poly: run ``elpv-mono-none``, T = ``elpv:poly``; poly -> mono likewise.
- NEU-DET camera change: run ``neu-source-none`` (one stratified half of NEU-DET), T = the
  other half through :func:`edge_tl.domains.camera_shift` (an ImageFolder on disk).

Each bundle is copied (``adapt`` writes a head version into it), evaluated as exported,
adapted with ``coral`` and evaluated, adapted with ``center`` and evaluated, all through
the torch-free runtime (:class:`edge_tl.runtime.Model`). Balanced accuracy (mean recall over
classes) is printed beside accuracy: ELPV's classes are 70/30. One more row per bundle
checks learning after an alignment: with ``coral`` in force, the last class is removed and
added back from 5 labelled target images per class of it (imprinting), then scored.

Bundles missing under ``--bundles`` are exported first (``onnx-fp32``; ``--int8`` adds that
recipe for the cases named in ``--int8-cases``). It reads the runs and the NEU-DET target
that ``benchmarks/domain_adaptation.py`` writes (the same ``/tmp/edge_tl_da``); run that first:

    .venv/bin/python benchmarks/device_alignment.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")

import numpy as np  # noqa: E402

from edge_tl.data import Dataset, image_folder, open_dataset  # noqa: E402
from edge_tl.domains import target_split  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402

DA = Path("/tmp/edge_tl_da")
CASES = {
    "elpv mono->poly": ("elpv-mono-none", "elpv:poly"),
    "elpv poly->mono": ("elpv-poly-none", "elpv:mono"),
    "neu camera": ("neu-source-none", str(DA / "neu-target")),
}


def _target(spec: str) -> dict[str, Dataset]:
    ds = open_dataset(spec) if spec.startswith("elpv") else image_folder(spec)
    return target_split(ds)


def _scores(model: Model, test: Dataset) -> dict[str, float]:
    ev = model.classifier.evaluate(test)
    recalls = [c["accuracy"] for c in ev.per_class.values()]
    return {"accuracy": round(ev.accuracy, 4), "balanced": round(float(np.mean(recalls)), 4)}


def _bundle(bundles: Path, run: str, recipe: str, runs: Path) -> Path:
    out = bundles / f"{run.removesuffix('-none')}-{recipe}"
    if not (out / "manifest.json").is_file():
        from edge_tl.export import export_bundle

        export_bundle(out, recipe, run=runs / run)
    return out


def measure(bundle: Path, parts: dict[str, Dataset], work: Path) -> dict:
    """Accuracy on ``parts["test"]``: as exported, after coral, after center, and after
    coral then a class removed and re-added from 5 labelled target images."""
    copy = shutil.copytree(bundle, work / bundle.name)
    model = Model(copy)
    row: dict = {"bundle": str(bundle), "n_unlabeled": len(parts["unlabeled"])}
    row["n_test"] = len(parts["test"])
    row["none"] = _scores(model, parts["test"])
    for method in ("coral", "center"):
        t0 = time.perf_counter()
        state = model.adapt(parts["unlabeled"], method=method)
        row[f"{method}_adapt_s"] = round(time.perf_counter() - t0, 1)
        row[method] = _scores(model, parts["test"])
        row[f"{method}_version_kb"] = round(
            (copy / "heads" / f"v{state.meta['version']:04d}.npz").stat().st_size / 1e3, 1
        )
    model.classifier.rollback()  # back to coral: learning after an alignment
    un = parts["unlabeled"]
    last = model.classifier.labels[-1]
    c = un.classes.index(last)
    model.classifier.remove_class(last)
    shots = [p for p, y in zip(un.paths, un.labels, strict=True) if y == c][:5]
    model.classifier.add_class(last, shots)
    row["coral_then_readd"] = {"class": last, **_scores(model, parts["test"])}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=DA / "runs")
    ap.add_argument("--bundles", type=Path, default=DA / "device" / "bundles")
    ap.add_argument("--out", type=Path, default=DA / "device_results.json")
    ap.add_argument("--int8", default="ort-int8", help="the INT8 recipe ('' for none)")
    ap.add_argument("--int8-cases", default="elpv mono->poly", help="comma-separated cases")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    args = ap.parse_args()
    if not (args.runs / "BASELINES_DONE").is_file():
        raise SystemExit(f"{args.runs}/BASELINES_DONE is missing: the shared runs are not done")
    results = []
    with tempfile.TemporaryDirectory(prefix="edge_tl_align_") as tmp:
        for name in [c.strip() for c in args.cases.split(",")]:
            run, target = CASES[name]
            parts = _target(target)
            recipes = ["onnx-fp32"]
            if args.int8 and name in args.int8_cases.split(","):
                recipes.append(args.int8)
            for recipe in recipes:
                bundle = _bundle(args.bundles, run, recipe, args.runs)
                work = Path(tmp) / f"{name.replace(' ', '_').replace('>', '')}-{recipe}"
                work.mkdir()
                row = {"case": name, "recipe": recipe, **measure(bundle, parts, work)}
                results.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"\n{'case':<17} {'bundle':<10} {'none':>13} {'coral':>13} {'center':>13} "
        f"{'coral+re-add':>13}   (accuracy / balanced, %)"
    )
    for r in results:
        cells = [
            f"{100 * r[k]['accuracy']:5.1f} / {100 * r[k]['balanced']:5.1f}"
            for k in ("none", "coral", "center", "coral_then_readd")
        ]
        print(f"{r['case']:<17} {r['recipe']:<10} " + " ".join(f"{c:>13}" for c in cells))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
