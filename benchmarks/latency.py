"""Batch-1 end-to-end predict latency per artifact vs PyTorch eager, side by side in one run.

End to end = decode + preprocess + engine + head, as `edge-tl predict` does per image. The raw
engine call on the same preprocessed tensor is timed right after each prediction, so the
runtime's overhead is a ratio measured under the same conditions. PyTorch eager FP32 runs the
same preprocessing (numpy) + the PyTorch model + the head.

Goals (issue "Vertical slice"): the fastest INT8 artifact >= 5x faster end to end than
PyTorch eager FP32; runtime overhead over the raw engine call <= 15 %.

    .venv/bin/python benchmarks/latency.py                 # trains a quick NEU-DET probe
    .venv/bin/python benchmarks/latency.py --run runs/neu  # or use your own run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.data import image_folder  # noqa: E402
from edge_tl.export import export_bundle  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.preprocess import load_image, to_input  # noqa: E402
from edge_tl.spec import EMBEDDING  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RECIPES = ("onnx-fp32", "ort-int8", "openvino-fp32", "openvino-fp16", "openvino-int8")


def _pytorch_predictor(run: Path):
    import torch

    from edge_tl.train import load_run

    _, features, head = load_run(run)
    pre = features.spec.preprocess
    w = torch.from_numpy(head.weight)
    b = torch.from_numpy(head.bias)
    mean, scale = torch.from_numpy(head.mean), torch.from_numpy(head.scale)

    @torch.inference_mode()
    def predict(path: str) -> int:
        x = torch.from_numpy(to_input(load_image(path), pre))[None]
        logits = ((features(x)[0] - mean) / scale) @ w.T + b
        return int(torch.softmax(logits, 1).argmax())

    @torch.inference_mode()
    def raw(x: np.ndarray) -> None:
        features(torch.from_numpy(x))

    return predict, raw, pre


def _worker(case: str, images: list[str], out: Path) -> None:
    """Time one case alone in this process: predict then the raw call, image by image."""
    if case.startswith("pytorch:"):
        predict, raw, pre = _pytorch_predictor(Path(case.split(":", 1)[1]))
    else:
        model = Model(case)
        pre = model.manifest.preprocess

        def predict(path):
            return model.classifier.predict([path])

        def raw(x):
            return model.engine.run(x, (EMBEDDING,))

    inputs = [to_input(load_image(i), pre)[None] for i in images]
    for path, x in zip(images[:5], inputs[:5], strict=True):  # warm-up
        predict(path)
        raw(x)
    e2e, eng, prep = [], [], []
    for path, x in zip(images, inputs, strict=True):
        t0 = time.perf_counter()
        predict(path)
        t1 = time.perf_counter()
        raw(x)
        t2 = time.perf_counter()
        to_input(load_image(path), pre)
        t3 = time.perf_counter()
        e2e.append(t1 - t0)
        eng.append(t2 - t1)
        prep.append(t3 - t2)
    out.write_text(json.dumps({"e2e": e2e, "raw": eng, "prep": prep}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run folder (default: a quick NEU-DET linear probe)")
    p.add_argument("--data", type=Path, default=SHARED / "neu_det", help="images to time on")
    p.add_argument("--images", type=int, default=40, help="images per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    paths = image_folder(args.data).paths
    images = paths[:: max(1, len(paths) // args.images)][: args.images]
    if args.worker:
        _worker(args.worker, images, args.worker_out)
        return

    with tempfile.TemporaryDirectory(prefix="edge_tl_latency_") as tmp:
        tmp = Path(tmp)
        run = args.run
        if run is None:
            from edge_tl.train import TrainConfig, train

            run = tmp / "run"
            print("training a linear probe on", args.data, flush=True)
            train(args.data, run, TrainConfig(strategy="linear-probe"))
        for recipe in RECIPES:
            print("exporting", recipe, flush=True)
            export_bundle(tmp / recipe, recipe, run=run)
        # Each case runs alone in its own process (as on a device: one engine, no other
        # thread pools spinning beside it); rounds alternate the order to spread drift.
        cases = {"pytorch-eager": f"pytorch:{run}", **{r: str(tmp / r) for r in RECIPES}}
        e2e = {k: [] for k in cases}
        raw = {k: [] for k in cases}
        prep = {k: [] for k in cases}
        for rnd in range(args.rounds):
            order = list(cases) if rnd % 2 == 0 else list(reversed(cases))
            for name in order:
                res_file = tmp / "res.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    cases[name],
                    "--worker-out",
                    str(res_file),
                    "--data",
                    str(args.data),
                    "--images",
                    str(args.images),
                ]
                subprocess.run(
                    cmd,
                    check=True,
                    env={**os.environ, "EDGE_TL_QUIET": "1"},
                    stderr=subprocess.DEVNULL,
                )
                res = json.loads(res_file.read_text())
                e2e[name] += res["e2e"]
                raw[name] += res["raw"]
                prep[name] += res["prep"]
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    med = {k: 1e3 * float(np.median(v)) for k, v in e2e.items()}
    med_raw = {k: 1e3 * float(np.median(v)) for k, v in raw.items()}
    med_prep = {k: 1e3 * float(np.median(v)) for k, v in prep.items()}
    base = med["pytorch-eager"]
    print()
    print(f"batch 1, {len(images)} images x {args.rounds} rounds, median ms; host: {_cpu()}")
    print(
        "overhead = predict / engine - 1 (decode + preprocess + head + dispatch); "
        "own = overhead less decode + preprocess"
    )
    print(
        f"{'artifact':<15}{'predict ms':>11}{'engine ms':>10}{'decode+prep':>12}"
        f"{'overhead':>10}{'own':>8}{'vs PyTorch':>11}"
    )
    for k in cases:
        over = 100 * (med[k] / med_raw[k] - 1)
        own = 100 * ((med[k] - med_prep[k]) / med_raw[k] - 1)
        print(
            f"{k:<15}{med[k]:>11.2f}{med_raw[k]:>10.2f}{med_prep[k]:>12.2f}{over:>+9.1f}%"
            f"{own:>+7.1f}%{base / med[k]:>10.1f}x"
        )
    int8 = min((k for k in cases if "int8" in k), key=lambda k: med[k])
    speedup = base / med[int8]
    over = 100 * (med[int8] / med_raw[int8] - 1)
    worst = max(100 * (med[k] / med_raw[k] - 1) for k in RECIPES)
    print(
        f"fastest INT8: {int8}, {speedup:.1f}x PyTorch eager end to end "
        f"(goal >= 5x: {'PASS' if speedup >= 5 else 'FAIL'}); its runtime overhead "
        f"{over:+.1f}% (goal <= 15%: {'PASS' if over <= 15 else 'FAIL'}); "
        f"worst overhead of any artifact {worst:+.1f}%"
    )


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
