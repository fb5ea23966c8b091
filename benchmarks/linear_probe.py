"""Linear-probe bundles vs scikit-learn, and INT8 vs FP32, side by side in one run.

For each data set (stratified 80/20, seed 0): `edge-tl train --strategy linear-probe`, then
bundles for onnx-fp32, ort-int8 and openvino-int8, each evaluated on the held-out 20 % by the
torch-free runtime. Reference: scikit-learn's LogisticRegression (defaults, max_iter raised)
on the FP32 bundle's embeddings of the same train/test split.

Goals (issue "Vertical slice"): FP32 bundle >= sklearn - 0.5 pt; each INT8 bundle within
1.0 pt of the FP32 bundle. A recipe that accuracy control refuses is reported as refused,
with its best try (the table's verdict then fails).

    .venv/bin/python benchmarks/linear_probe.py            # NEU-DET and flowers5
    .venv/bin/python benchmarks/linear_probe.py --data ../shared/data/neu_det
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.data import image_folder, split  # noqa: E402
from edge_tl.export import ToleranceError, export_bundle  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.heads import LinearHead  # noqa: E402
from edge_tl.spec import SplitRecord  # noqa: E402
from edge_tl.train import TrainConfig, train  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RECIPES = ("onnx-fp32", "ort-int8", "openvino-int8")


def run(data: Path, work: Path) -> dict:
    ds = image_folder(data)
    parts = split(ds, SplitRecord(test_frac=0.2, val_frac=0.0, seed=0))
    t0 = time.perf_counter()
    train(data, work / "run", TrainConfig(strategy="linear-probe", test_frac=0.2, val_frac=0.0))
    print(f"  {data.name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    test = ds.subset(parts["test"])
    acc: dict[str, float | None] = {}
    refused: dict[str, str] = {}
    for recipe in RECIPES:
        try:
            export_bundle(work / recipe, recipe, run=work / "run")
        except ToleranceError as e:
            best = max(e.attempts, key=lambda a: a.cosine_mean)
            refused[recipe] = (
                f"{recipe} refused after {len(e.attempts)} tries (best: {best.step}, cosine "
                f"{best.cosine_mean:.4f}, top-1 drop {100 * (best.top1_drop or 0):.1f} pt)"
            )
            acc[recipe] = None
            print(f"  {data.name}: {refused[recipe]}", flush=True)
            continue
        acc[recipe] = Model(work / recipe).evaluate(test).accuracy
        print(f"  {data.name}: {recipe} {acc[recipe]:.4f}", flush=True)

    from sklearn.linear_model import LogisticRegression

    fp32 = Model(work / "onnx-fp32")
    x_train = fp32.embed(ds.subset(parts["train"]).paths)
    x_test = fp32.embed(test.paths)
    y_train, y_test = ds.labels[parts["train"]], test.labels
    t0 = time.perf_counter()
    sk = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    sk_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = LinearHead.fit(x_train, y_train, len(ds.classes))
    ours_fit = time.perf_counter() - t0
    return {
        "data": data.name,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "sklearn_lr": float((sk.predict(x_test) == y_test).mean()),
        "sklearn_fit_s": sk_fit,
        "edge_tl_head_same_embeddings": float(
            (ours.predict_proba(x_test).argmax(1) == y_test).mean()
        ),
        "edge_tl_fit_s": ours_fit,
        **acc,
        "refused": refused,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", nargs="*", type=Path, default=[SHARED / "neu_det", SHARED / "flowers5"]
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edge_tl_bench_") as tmp:
        for data in args.data:
            rows.append(run(data, Path(tmp) / data.name))
    print()
    print(
        f"{'data':<10}{'n test':>7}{'sklearn LR':>11}{'FP32':>8}{'ORT INT8':>10}{'OV INT8':>9}"
        f"{'FP32-LR':>9}{'ORT-FP32':>10}{'OV-FP32':>9}  verdict"
    )

    def acc(v: float | None, width: int) -> str:
        return f"{'refused':>{width}}" if v is None else f"{v:>{width}.4f}"

    def diff(a: float | None, b: float | None, width: int) -> str:
        return f"{'-':>{width}} " if a is None or b is None else f"{100 * (a - b):>+{width}.1f}p"

    for r in rows:
        fp32, ort, ov = r["onnx-fp32"], r["ort-int8"], r["openvino-int8"]
        ok = (
            None not in (fp32, ort, ov)
            and 100 * (fp32 - r["sklearn_lr"]) >= -0.5
            and abs(100 * (ort - fp32)) <= 1.0
            and abs(100 * (ov - fp32)) <= 1.0
        )
        print(
            f"{r['data']:<10}{r['n_test']:>7}{r['sklearn_lr']:>11.4f}{acc(fp32, 8)}"
            f"{acc(ort, 10)}{acc(ov, 9)}{diff(fp32, r['sklearn_lr'], 8)}{diff(ort, fp32, 9)}"
            f"{diff(ov, fp32, 8)}  {'PASS' if ok else 'FAIL'}"
        )
        for why in r["refused"].values():
            print(f"  {why}")
    print(
        "head fit on the same FP32 embeddings (seconds): "
        + ", ".join(
            f"{r['data']}: edge_tl {r['edge_tl_fit_s']:.2f} "
            f"({r['edge_tl_head_same_embeddings']:.4f}) vs sklearn "
            f"{r['sklearn_fit_s']:.2f}"
            for r in rows
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
