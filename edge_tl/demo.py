"""``edge-tl demo``: the whole story on the embedded default data set, ELPV (or on yours).

Train -> export ONNX FP32, ORT INT8, OpenVINO INT8 -> evaluate each on the held-out split
with the torch-free runtime -> a few predictions -> one table of accuracy, size, latency.
An artifact that accuracy control refuses is part of the story: the demo says what was
tried and goes on with the others.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from edge_tl.data import ELPV, open_dataset, split
from edge_tl.errors import EdgeTLError

__all__ = ["RECIPES", "run_demo"]

# ort-int8-avx2: ORT INT8 with pair-safe weights, exact on every x86-64 CPU and faster than
# FP32 with or without VNNI (ort-int8's exact-requantization option is not: benchmarks/
# ort_int8_speed.py)
RECIPES = ("onnx-fp32", "ort-int8-avx2", "openvino-int8")
PUBLISHED = 0.884  # Deitsch et al. 2019, VGG-19 fine-tuned on a GPU, binary ELPV
MARKER = ".edge_tl_demo"
DEFECT = "defective"  # ELPV's defect class: the table shows its recall beside accuracy


def run_demo(
    out: str | Path = "demo-output",
    strategy: str = "finetune",
    epochs: int = 6,
    train_stages: int = 1,
    latency_images: int = 20,
    data: str | Path = ELPV,
    recipes: tuple[str, ...] = RECIPES,
) -> dict[str, Any]:
    """Run the demo into ``out`` (re-running replaces the previous demo there); returns the
    summary it writes to ``out/summary.json``.

    Args:
        data: ``elpv`` (the default, from its PyPI package) or an ImageFolder.
        recipes: the export recipes to build and compare, in order.

    Raises:
        EdgeTLError: ``out`` is not a demo folder, bad data, or an unknown recipe (before any
            training).
    """
    from edge_tl.export import iter_bundles
    from edge_tl.report import read_report
    from edge_tl.runtime import Model
    from edge_tl.runtime.bench import bundle_size_mb, latency
    from edge_tl.spec import load_recipe
    from edge_tl.train import TrainConfig, train

    out = Path(out)
    if out.exists() and not (out / MARKER).exists():
        raise EdgeTLError(f"{out} exists and is not a demo folder; pass --out to a new folder")
    if not recipes:
        raise EdgeTLError("--recipes is empty; name at least one, e.g. onnx-fp32")
    resolved = [load_recipe(r) for r in recipes]  # an unknown name fails now, not after training
    ds = open_dataset(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeTLError(f"cannot create {out} ({e.strerror}); pass another --out") from None
    (out / MARKER).touch()
    t_start = time.perf_counter()
    cfg = TrainConfig(
        strategy=strategy,
        epochs=epochs,
        train_stages=train_stages,
        test_frac=0.25,
        val_frac=0.1,
        seed=0,
    )
    if ds.name == ELPV:
        print(
            f"edge_tl demo: ELPV, {len(ds)} electroluminescence images of solar cells, "
            f"{int(ds.labels.sum())} defective (p >= 0.5); stratified 75/25 split, seed 0"
        )
    else:
        print(
            f"edge_tl demo: {ds.name}, {len(ds)} images in {len(ds.classes)} classes; "
            "stratified 75/25 split, seed 0"
        )
    print(
        f"[1/4] training {cfg.backbone} ({strategy}, {epochs} epoch{'s' * (epochs != 1)}) ...",
        flush=True,
    )
    metrics = train(data, out / "run", cfg, force=True)
    print(
        f"      PyTorch held-out accuracy {metrics['test_accuracy']:.4f} "
        f"in {metrics['train_seconds']:.0f} s"
    )

    test = ds.subset(split(ds, cfg.split)["test"])
    rows: list[dict[str, Any]] = []
    # one export call for every recipe: the FP32 graph, decoded images and FP32 reference
    # embeddings are made once; each bundle is evaluated as soon as it is written
    bundles = iter_bundles(out / "bundles", resolved, run=out / "run", force=True)
    for i, rec in enumerate(resolved):
        recipe = rec.name
        print(f"[2/4] exporting {recipe} ({i + 1}/{len(resolved)}) ...", flush=True)
        bundle = out / "bundles" / recipe
        result = next(bundles)
        if result.manifest is None:
            e = result.refused
            assert e is not None
            best = max(e.attempts, key=lambda a: a.cosine_mean)
            print(f"      refused: {e}", flush=True)
            shutil.rmtree(bundle, ignore_errors=True)  # an earlier demo's bundle is not this one
            rows.append(
                {
                    "artifact": recipe,
                    "refused": str(e),
                    "tries": len(e.attempts),
                    "best_cosine_vs_fp32": best.cosine_mean,
                }
            )
            continue
        manifest = result.manifest
        report = read_report(bundle)
        verdict = report.verdict if report is not None else "no report"
        print(
            f"      fidelity vs FP32 PyTorch: embedding cosine "
            f"{manifest.metrics['embedding_cosine_vs_fp32']['mean']:.4f}, {verdict} "
            f"(report: {bundle / 'fidelity.md'})",
            flush=True,
        )
        print(
            f"[3/4] evaluating {recipe} on the held-out split (torch-free runtime) ...", flush=True
        )
        model = Model(bundle)
        res = model.classifier.evaluate(test)
        lat = latency(model, test.paths[:latency_images], repeats=2)
        rows.append(
            {
                "artifact": recipe,
                "accuracy": res.accuracy,
                "per_class": res.per_class,
                "size_mb": bundle_size_mb(bundle),
                "predict_p50_ms": lat["predict_p50_ms"],
                "engine_p50_ms": lat["engine_p50_ms"],
                "cosine_vs_fp32": manifest.metrics["embedding_cosine_vs_fp32"]["mean"],
            }
        )
    bundles.close()  # the export's temporary folder goes now

    shipped = [r["artifact"] for r in rows if "accuracy" in r]
    if shipped:
        pick = next((r for r in shipped if r.startswith("ort-int8")), shipped[0])
        print(f"[4/4] a few predictions with the {pick} bundle:")
        model = Model(out / "bundles" / pick)
        picks = [
            int(i) for c in range(len(test.classes)) for i in (test.labels == c).nonzero()[0][:2]
        ]
        preds = model.classifier.predict([test.paths[i] for i in picks])
        for r, idx in zip(preds, picks, strict=True):
            truth = test.classes[test.labels[idx]]
            mark = "ok " if r.label == truth else "MISS"
            print(f"      {mark} {Path(r.image).name}: {r.label} ({r.score:.2f}), truth {truth}")
    else:
        print("[4/4] no bundle passed its recipe's tolerance; nothing to predict with")

    _table(metrics["test_accuracy"], rows, DEFECT if DEFECT in ds.classes else None)
    if ds.name == ELPV:
        print(f"published: {PUBLISHED:.3f} (Deitsch et al. 2019, VGG-19 fine-tuned on a GPU)")
        int8 = [r for r in rows if "accuracy" in r and "int8" in r["artifact"]]
        if int8:
            best = max(int8, key=lambda r: r["accuracy"])
            recall = best["per_class"].get("defective", {}).get("accuracy")
            print(
                f"best INT8 here: {best['accuracy']:.3f} ({best['artifact']}, "
                f"{100 * (best['accuracy'] - PUBLISHED):+.1f} pt vs published"
                + (f"; defective recall {recall:.3f}" if recall is not None else "")
                + "); no training lever measured on 2 CPU cores closes the gap within the "
                "demo's budget: benchmarks/elpv.py"
            )
    print(
        f"(n = {len(test)} held-out images; latency = batch-1 p50 on this host; "
        f"total {time.perf_counter() - t_start:.0f} s; bundles in {out / 'bundles'})"
    )
    summary = {
        "data": str(data),
        "pytorch_test_accuracy": metrics["test_accuracy"],
        "n_test": len(test),
        "artifacts": rows,
        "published_accuracy": PUBLISHED if ds.name == ELPV else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _table(
    pytorch_accuracy: float, rows: list[dict[str, Any]], recall_of: str | None = None
) -> None:
    """Accuracy (and class ``recall_of``'s recall: for a defect camera, the share of
    defective parts caught), size, latency and cosine per artifact; refused artifacts say
    so."""
    fp32 = next((r["accuracy"] for r in rows if "accuracy" in r), pytorch_accuracy)
    recall = f"recall {recall_of}" if recall_of else ""
    width = len(recall) + 2 if recall else 0
    print()
    print(
        f"{'artifact':<15}{'accuracy':>9}{recall:>{width}}{'vs FP32':>9}{'size MB':>9}"
        f"{'predict ms':>12}{'engine ms':>11}{'cosine':>8}"
    )
    print(f"{'PyTorch FP32':<15}{pytorch_accuracy:>9.4f}")
    for r in rows:
        if "refused" in r:
            print(
                f"{r['artifact']:<15}  refused by accuracy control after {r['tries']} tries "
                f"(best cosine {r['best_cosine_vs_fp32']:.3f}); nothing written"
            )
            continue
        caught = f"{r['per_class'][recall_of]['recall']:>{width}.4f}" if recall_of else ""
        drop = 100 * (r["accuracy"] - fp32)
        print(
            f"{r['artifact']:<15}{r['accuracy']:>9.4f}{caught}{drop:>+8.1f}p"
            f"{r['size_mb']:>9.1f}{r['predict_p50_ms']:>12.1f}{r['engine_p50_ms']:>11.1f}"
            f"{r['cosine_vs_fp32']:>8.3f}"
        )
