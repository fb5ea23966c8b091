"""Soak: tens of thousands of predictions in one process, learning as it goes, with memory
and latency watched.

For a classifier bundle and an anomaly bundle (the pretrained EfficientNet-Lite0 exported
as ONNX FP32, built once into ``--work``), one :class:`~edge_tl.runtime.Model` predicts
``--n`` times at batch 1 on real images read from disk in turn (NEU-DET steel, magnetic
tiles), and every ``--learn-every`` predictions it learns: the classifier alternately
gains a class from 4 images (``add_class``) and forgets it (``remove_class``); the detector
alternately grows its bank with 4 good images (``add``) and rolls back. Each change writes
a version to disk, as on a device; alternating keeps the learned state the same size, so
growth is the process's, not the data's.

Reported per bundle: RSS at the 1,000th prediction and at the last, its growth (goal
< 5 %), p99 latency of predictions 1,000-1,999 (after warm-up) and of the last 1,000, its
drift (goal < 10 %), and the sizes that must stay bounded (versions on disk, head classes,
bank patches, Python objects tracked by the collector).

    .venv/bin/python benchmarks/soak.py [--n 20000] [--learn-every 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.host import host_info  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FIELD = "field_class"
WINDOW = 1000
"""Predictions in the warm-up and in each latency window."""


def _learner(model: Model, task: str, images: list[str]) -> Callable[[int], None]:
    """The ``i``-th learning step: even steps learn, odd steps undo it."""

    def step(i: int) -> None:
        if task == "classify":
            if i % 2 == 0:
                model.classifier.add_class(FIELD, images)
            else:
                model.classifier.remove_class(FIELD)
        elif i % 2 == 0:
            model.detector.add(images)
        else:
            model.detector.rollback()

    return step


def _sizes(model: Model) -> dict[str, int]:
    """What must stay bounded: versions on disk, learned state, objects in the heap."""
    out = {"gc_objects": len(gc.get_objects())}
    for d in ("heads", "anomaly"):
        folder = model.path / d
        out[f"{d}_files"] = len(list(folder.iterdir())) if folder.is_dir() else 0
    if model.task == "anomaly":
        out["bank_patches"] = int(len(model.detector.require().bank))
    else:
        state = model.classifier.require()
        out["classes"] = len(state.labels)
        out["support"] = int(len(state.support_x))
    return out


def soak(
    bundle: Path,
    images: list[str],
    learn_images: list[str],
    n: int,
    learn_every: int,
    window: int = WINDOW,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict ``n`` times on ``images`` in turn, learning every ``learn_every``.

    Returns:
        ``rss_mb`` (at prediction ``window`` and at the end), ``rss_growth_pct``,
        ``p99_ms`` (the window after warm-up and the last window), ``p99_drift_pct``,
        ``p50_ms``, ``learn_ms`` (mean), ``sizes`` (at ``window`` and at the end), ``task``.
    """
    if n < 3 * window:
        raise ValueError(f"n must be at least 3 windows ({3 * window}) to compare two")
    proc = psutil.Process()
    model = Model(bundle)
    task = model.task
    step = _learner(model, task, learn_images)
    ms = np.empty(n)
    learn_ms: list[float] = []
    rss0, sizes0, trace = 0.0, {}, []
    for i in range(n):
        if i and i % learn_every == 0:
            t0 = time.perf_counter()
            step(i // learn_every - 1)
            learn_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        model.predict([images[i % len(images)]])
        ms[i] = (time.perf_counter() - t0) * 1e3
        if i + 1 == window:
            gc.collect()
            rss0, sizes0 = proc.memory_info().rss / 2**20, _sizes(model)
        if (i + 1) % window == 0:  # per window: RSS and median latency, to see a trend
            rss = proc.memory_info().rss / 2**20
            trace.append(
                [i + 1, round(rss, 1), round(float(np.median(ms[i + 1 - window : i + 1])), 2)]
            )
            if log:
                log(f"{task}: {i + 1}/{n}, RSS {rss:.1f} MB, p50 {trace[-1][2]} ms")
    gc.collect()
    rss1, sizes1 = proc.memory_info().rss / 2**20, _sizes(model)
    first, last = ms[window : 2 * window], ms[-window:]
    p99 = (float(np.percentile(first, 99)), float(np.percentile(last, 99)))
    return {
        "task": task,
        "bundle": str(bundle),
        "predictions": n,
        "learn_every": learn_every,
        "learn_steps": len(learn_ms),
        "rss_mb": [round(rss0, 1), round(rss1, 1)],
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "p50_ms": [round(float(np.median(first)), 2), round(float(np.median(last)), 2)],
        "p99_ms": [round(p99[0], 2), round(p99[1], 2)],
        "p99_drift_pct": round(100 * (p99[1] - p99[0]) / p99[0], 2),
        "learn_ms": round(float(np.mean(learn_ms)), 1) if learn_ms else None,
        "sizes": [sizes0, sizes1],
        "trace": trace,  # [predictions, RSS MB, p50 ms of the window before]
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| bundle | predictions | learning steps | RSS at 1,000th -> last (MB) | RSS growth "
        "| p99 first 1,000 after warm-up -> last 1,000 (ms) | p99 drift | p50 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['task']} | {r['predictions']:,} | {r['learn_steps']} "
            f"| {r['rss_mb'][0]} -> {r['rss_mb'][1]} | {r['rss_growth_pct']:+.2f} % "
            f"| {r['p99_ms'][0]} -> {r['p99_ms'][1]} | {r['p99_drift_pct']:+.2f} % "
            f"| {r['p50_ms'][0]} -> {r['p50_ms'][1]} |"
        )
    return "\n".join(rows)


def _images(folder: Path, n: int, pattern: str = "*") -> list[str]:
    return [str(p) for p in sorted(folder.glob(pattern)) if p.is_file()][:n]


def bundles(work: Path) -> dict[str, Path]:
    """A classifier bundle (a head learned from 3 NEU-DET classes x 10 images) and an
    anomaly bundle (a bank from 20 good magnetic tiles) of one exported backbone."""
    from edge_tl.data import image_folder

    template = work / "onnx-fp32"
    neu = SHARED / "neu_det"
    if not (template / "manifest.json").is_file():
        # in a child process: exporting loads PyTorch, which would stay in this process's
        # memory (about 1.1 GB of RSS more) and in every figure the soak reports
        print(f"exporting {template} (onnx-fp32, pretrained efficientnet_lite0)", flush=True)
        cli = "import sys\nfrom edge_tl.cli import main\nsys.exit(main(sys.argv[1:]))"
        subprocess.run(
            [sys.executable, "-c", cli, "export", "--backbone", "efficientnet_lite0"]
            + ["--recipe", "onnx-fp32", "--calib", str(neu), "--out", str(template)],
            check=True,
        )
    out = {}
    for task in ("classify", "anomaly"):
        path = out[task] = work / task
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(template, path)
        model = Model(path)
        if task == "classify":
            ds = image_folder(neu)
            keep = [
                i for c in range(3) for i in [j for j, y in enumerate(ds.labels) if y == c][:10]
            ]
            model.classifier.learn(ds.subset(np.asarray(keep)))
        else:
            good = SHARED / "magnetic_tile" / "train" / "good"
            model.detector.fit(_images(good, 20))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="predictions per bundle")
    p.add_argument("--learn-every", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_soak"))
    p.add_argument("--tasks", default="classify,anomaly")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.n < 3 * WINDOW:
        p.error(f"--n must be at least {3 * WINDOW} (warm-up and two windows of {WINDOW})")
    if args.learn_every < 1:
        p.error("--learn-every must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    paths = bundles(args.work)
    if "torch" in sys.modules:  # a device has no PyTorch: its memory must not be counted
        p.error("PyTorch was imported into the soak process; its RSS would not be a device's")
    neu, tiles = SHARED / "neu_det", SHARED / "magnetic_tile"
    data = {
        "classify": (
            [s for c in ("crazing", "patches", "scratches") for s in _images(neu / c, 20)],
            _images(neu / "inclusion", 4),
        ),
        "anomaly": (
            _images(tiles / "test" / "good", 30) + _images(tiles / "test" / "crack", 10),
            _images(tiles / "train" / "good", 24)[20:],
        ),
    }
    results = []
    for task in args.tasks.split(","):
        images, learn = data[task]
        results.append(soak(paths[task], images, learn, args.n, args.learn_every, log=print))
    host = host_info()
    print(
        f"\nsoak: {args.n:,} predictions per bundle at batch 1, learning every "
        f"{args.learn_every:,}; {host['cpu']}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    print(table(results))
    for r in results:
        print(f"  {r['task']} sizes at 1,000th -> last: {r['sizes'][0]} -> {r['sizes'][1]}")
    if args.json:
        args.json.write_text(json.dumps({"host": host, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
