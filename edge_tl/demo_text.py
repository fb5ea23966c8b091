"""``edge-tl demo --text``: the whole text story on TREC-6 in a few minutes on 2 CPU cores.

Fine-tune all-MiniLM-L6-v2 on TREC-6 questions (the last two transformer layers + head,
training capped per class to keep it short) -> export ONNX FP32, ORT INT8 and OpenVINO INT8
through optimum -> evaluate each on the standard 500 test questions with the torch-free
runtime -> a few predictions -> on the device, no torch: the frozen pretrained encoder
(INT8) learns the six classes from 8 questions each, as a field engineer would teach it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError

__all__ = ["TEXT_RECIPES", "run_text_demo"]

TEXT_RECIPES = ("onnx-fp32", "ort-int8", "openvino-int8")
MARKER = ".edge_tl_demo"
ANCHORS = (
    "anchors: frozen SBERT-base + logistic regression 89.6 % (Reimers & Gurevych 2019); "
    "fine-tuned BERT-base 96.8 % (Sun et al. 2019)"
)


def run_text_demo(
    out: str | Path = "demo-output-text",
    epochs: int = 3,
    train_per_class: int = 250,
    recipes: tuple[str, ...] = TEXT_RECIPES,
    shots: int = 8,
) -> dict[str, Any]:
    """Run the text demo into ``out`` (re-running replaces the previous one there); returns
    the summary it writes to ``out/summary.json``.

    Args:
        epochs: fine-tuning epochs.
        train_per_class: training questions per class (0: all 5,452; the demo caps it to
            stay within a few minutes on 2 CPU cores).
        recipes: export recipes, in order.
        shots: questions per class the device learns from in the last step.

    Raises:
        EdgeTLError: ``out`` is not a demo folder, an unknown recipe, or the TREC-6 package
            is missing (before any training).
    """
    from edge_tl.export.accuracy_control import ToleranceError
    from edge_tl.export.text import export_text_bundle
    from edge_tl.runtime import Model
    from edge_tl.runtime.bench import bundle_size_mb, latency
    from edge_tl.spec import load_recipe
    from edge_tl.texts import open_text_dataset
    from edge_tl.train.text import train_text
    from edge_tl.train.text_config import TextTrainConfig

    out = Path(out)
    if out.exists() and not (out / MARKER).exists():
        raise EdgeTLError(f"{out} exists and is not a demo folder; pass --out to a new folder")
    if not recipes:
        raise EdgeTLError("--recipes is empty; name at least one, e.g. onnx-fp32")
    resolved = [load_recipe(r) for r in recipes]
    train_ds, test = open_text_dataset("trec6:train"), open_text_dataset("trec6:test")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeTLError(f"cannot create {out} ({e.strerror}); pass another --out") from None
    (out / MARKER).touch()
    t_start = time.perf_counter()
    print(
        f"edge_tl text demo: TREC-6 question types, {len(train_ds)} training / {len(test)} "
        f"test questions in {len(test.classes)} classes"
    )
    cfg = TextTrainConfig(
        epochs=epochs, train_per_class=train_per_class, test_data="trec6:test", seed=0
    )
    cap = f", {train_per_class} per class" if train_per_class else ""
    print(
        f"[1/5] fine-tuning {cfg.backbone} ({cfg.strategy}: last {cfg.train_layers} layers + "
        f"head{cap}, {epochs} epochs) ...",
        flush=True,
    )
    metrics = train_text("trec6:train", out / "run", cfg, force=True)
    print(
        f"      PyTorch test accuracy {metrics['test_accuracy']:.4f} "
        f"in {metrics['train_seconds']:.0f} s"
    )
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(resolved):
        print(f"[2/5] exporting {rec.name} through optimum ({i + 1}/{len(resolved)}) ...")
        bundle = out / "bundles" / rec.name
        bundle.parent.mkdir(exist_ok=True)
        try:
            manifest = export_text_bundle(bundle, rec, run=out / "run", force=True)
        except ToleranceError as e:
            print(f"      refused: {e}", flush=True)
            shutil.rmtree(bundle, ignore_errors=True)
            rows.append({"artifact": rec.name, "refused": str(e)})
            continue
        cosine = manifest.metrics["embedding_cosine_vs_fp32"]["mean"]
        print(f"[3/5] evaluating {rec.name} on the 500 test questions (torch-free) ...")
        model = Model(bundle)
        res = model.classifier.evaluate(test)
        lat = latency(model, test.texts[:20], repeats=2)
        rows.append(
            {
                "artifact": rec.name,
                "accuracy": res.accuracy,
                "size_mb": bundle_size_mb(bundle),
                "predict_p50_ms": lat["predict_p50_ms"],
                "engine_p50_ms": lat["engine_p50_ms"],
                "cosine_vs_fp32": cosine,
            }
        )
        print(f"      accuracy {res.accuracy:.4f}, embedding cosine vs FP32 {cosine:.4f}")
    shipped = [r["artifact"] for r in rows if "accuracy" in r]
    if shipped:
        pick = "ort-int8" if "ort-int8" in shipped else shipped[0]
        print(f"[4/5] a few questions for the {pick} bundle:")
        model = Model(out / "bundles" / pick)
        picks = [int(np.flatnonzero(test.labels == c)[0]) for c in range(len(test.classes))]
        for r, idx in zip(model.predict([test.texts[i] for i in picks]), picks, strict=True):
            truth = test.classes[test.labels[idx]]
            mark = "ok " if r.label == truth else "MISS"
            print(f"      {mark} {test.texts[idx][:60]!r}: {r.label} ({r.score:.2f})")
    few = _few_shot(out, train_ds, test, shots)
    _table(metrics["test_accuracy"], rows, few, shots)
    print(ANCHORS)
    total = time.perf_counter() - t_start
    print(f"(n = {len(test)} test questions; total {total:.0f} s; bundles in {out / 'bundles'})")
    summary = {
        "data": "trec6",
        "pytorch_test_accuracy": metrics["test_accuracy"],
        "n_test": len(test),
        "artifacts": rows,
        "device_few_shot": few,
        "seconds": round(total, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _few_shot(out: Path, train_ds, test, shots: int) -> dict[str, Any]:
    """The frozen pretrained encoder as ORT INT8 (calibrated on 300 unlabelled training
    questions) learns the classes on the device from ``shots`` questions each."""
    from edge_tl.export.text import export_text_bundle
    from edge_tl.runtime import Model

    print(f"[5/5] on the device: the frozen pretrained encoder learns from {shots} per class")
    rng = np.random.default_rng(0)
    idx = [
        int(i)
        for c in range(len(train_ds.classes))
        for i in rng.choice(np.flatnonzero(train_ds.labels == c), shots, replace=False)
    ]
    calib = out / "calib.txt"
    rest = [i for i in rng.permutation(len(train_ds))[:300] if i not in set(idx)]
    calib.write_text("\n".join(train_ds.texts[i] for i in rest) + "\n", encoding="utf-8")
    bundle = out / "bundles" / "pretrained-ort-int8"
    export_text_bundle(bundle, "ort-int8", backbone="all-minilm-l6-v2", calib=calib, force=True)
    model = Model(bundle)
    support: dict[str, list[str]] = {}
    for i in idx:
        support.setdefault(train_ds.classes[train_ds.labels[i]], []).append(train_ds.texts[i])
    t0 = time.perf_counter()
    model.classifier.learn(support, quantile=None)
    learn_s = time.perf_counter() - t0
    res = model.classifier.evaluate(test)
    print(
        f"      learned in {learn_s:.1f} s (embedding included); accuracy {res.accuracy:.4f} "
        f"on the test questions"
    )
    return {"shots": shots, "accuracy": res.accuracy, "learn_seconds": round(learn_s, 2)}


def _table(pytorch: float, rows: list[dict[str, Any]], few: dict[str, Any], shots: int) -> None:
    print()
    print(
        f"{'artifact':<22}{'accuracy':>9}{'vs FP32':>9}{'size MB':>9}{'predict ms':>12}"
        f"{'engine ms':>11}{'cosine':>8}"
    )
    print(f"{'PyTorch FP32':<22}{pytorch:>9.4f}")
    fp32 = next((r["accuracy"] for r in rows if "accuracy" in r), pytorch)
    for r in rows:
        if "refused" in r:
            print(f"{r['artifact']:<22}  refused by accuracy control; nothing written")
            continue
        print(
            f"{r['artifact']:<22}{r['accuracy']:>9.4f}{100 * (r['accuracy'] - fp32):>+8.1f}p"
            f"{r['size_mb']:>9.1f}{r['predict_p50_ms']:>12.1f}{r['engine_p50_ms']:>11.1f}"
            f"{r['cosine_vs_fp32']:>8.3f}"
        )
    print(f"{f'device, {shots}-shot, frozen':<22}{few['accuracy']:>9.4f}")
