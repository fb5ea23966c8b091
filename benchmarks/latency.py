"""Batch-1 end-to-end predict latency per artifact vs PyTorch eager, side by side in one run.

End to end = decode + preprocess + engine + head, as `edge-tl predict` does per image. The raw
engine call on the same preprocessed tensor is timed right after each prediction, so the
runtime's overhead is a ratio measured under the same conditions. PyTorch eager FP32 runs the
same preprocessing (numpy) + the PyTorch model + the head.

Folder throughput: the engine alone on pre-decoded batches of 16 (its own batch throughput)
vs `evaluate` of the same folder (listing, checking, decoding, engine, head), images/s.

With ``--before TREE`` (another checkout of edge_tl, e.g. the main branch) every runtime case
is timed with that tree's code too, in the same rounds, so before and after are a ratio
under the same conditions; ``--profile`` adds the cProfile top entries of ``predict``.

Goals: the fastest INT8 artifact >= 5x faster end to end than PyTorch eager FP32; end to end
<= 1.15x the raw engine call; folder evaluation >= 0.9x the engine's own batch throughput.

    .venv/bin/python benchmarks/latency.py                 # trains a quick NEU-DET probe
    .venv/bin/python benchmarks/latency.py --run runs/neu  # or use your own run
    .venv/bin/python benchmarks/latency.py --run R --bundles B --before ../main --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
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
RECIPES = (
    "onnx-fp32",
    "ort-int8",
    "ort-int8-avx2",
    "openvino-fp32",
    "openvino-fp16",
    "openvino-int8",
)
FOLDER_RECIPES = ("onnx-fp32", "ort-int8", "openvino-int8")
FOLDER_BATCH = 16


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


def _worker(case: str, images: list[str], out: Path, folder: Path | None, profile: bool) -> None:
    """Time one case alone in this process: predict then the raw call, image by image;
    then, for a bundle with ``folder``, the engine alone on pre-decoded batches vs
    ``evaluate`` of the folder; with ``profile``, predict under cProfile."""
    if case.startswith("pytorch:"):
        predict, raw, pre = _pytorch_predictor(Path(case.split(":", 1)[1]))
    else:
        model = Model(case)
        pre = model.manifest.preprocess

        def predict(path):
            return model.classifier.predict([path])

        def stream(paths):  # one call, as `edge-tl predict BUNDLE *.jpg`
            return model.classifier.predict(paths)

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
    res: dict = {"e2e": e2e, "raw": eng, "prep": prep, "stream": []}
    if not case.startswith("pytorch:"):
        for _ in range(3):
            t0 = time.perf_counter()
            stream(images)
            res["stream"].append((time.perf_counter() - t0) / len(images))
    if folder is not None and not case.startswith("pytorch:"):
        from edge_tl.runtime.preprocess import batch_inputs

        paths = image_folder(folder).paths
        batches = [
            batch_inputs(paths[i : i + FOLDER_BATCH], pre)
            for i in range(0, len(paths), FOLDER_BATCH)
        ]
        t0 = time.perf_counter()
        for x in batches:
            raw(x)
        engine_s = time.perf_counter() - t0
        del batches
        t0 = time.perf_counter()
        ev = model.evaluate(folder)
        evaluate_s = time.perf_counter() - t0
        res["folder"] = {
            "n": len(paths),
            "engine_s": engine_s,
            "evaluate_s": evaluate_s,
            "accuracy": ev.accuracy,
        }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for path in images:
            predict(path)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        res["profile"] = text.getvalue()
    out.write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run folder (default: a quick NEU-DET linear probe)")
    p.add_argument(
        "--bundles",
        type=Path,
        help="folder of bundles <recipe>/ exported from --run (missing ones are exported "
        "there and kept; default: a temporary folder)",
    )
    p.add_argument("--data", type=Path, default=SHARED / "neu_det", help="images to time on")
    p.add_argument("--images", type=int, default=40, help="images per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--folder-images",
        type=int,
        default=80,
        help="images per class of the folder evaluated for throughput (0: no folder test)",
    )
    p.add_argument("--before", type=Path, help="another edge_tl checkout timed alongside")
    p.add_argument("--profile", action="store_true", help="cProfile top entries of predict")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    paths = image_folder(args.data).paths
    images = paths[:: max(1, len(paths) // args.images)][: args.images]
    if args.worker:
        _worker(args.worker, images, args.worker_out, args.worker_folder, args.profile)
        return

    with tempfile.TemporaryDirectory(prefix="edge_tl_latency_") as tmp:
        tmp = Path(tmp)
        run = args.run
        if run is None:
            from edge_tl.train import TrainConfig, train

            run = tmp / "run"
            print("training a linear probe on", args.data, flush=True)
            train(args.data, run, TrainConfig(strategy="linear-probe"))
        where = args.bundles or tmp
        for recipe in RECIPES:
            if not (where / recipe / "manifest.json").is_file():
                print("exporting", recipe, flush=True)
                export_bundle(where / recipe, recipe, run=run)
        folder = None
        if args.folder_images:
            folder = tmp / "folder"
            for cls in sorted(d for d in args.data.iterdir() if d.is_dir()):
                (folder / cls.name).mkdir(parents=True)
                files = [q for q in paths if Path(q).parent == cls][: args.folder_images]
                for f in files:
                    shutil.copy(f, folder / cls.name / Path(f).name)
        trees = {"": Path(__file__).resolve().parents[1]}
        if args.before is not None:
            trees = {"before ": args.before.resolve(), "": trees[""]}
        # Each case runs alone in its own process (as on a device: one engine, no other
        # thread pools spinning beside it); rounds alternate the order to spread drift.
        cases = {"pytorch-eager": ("", f"pytorch:{run}")}
        for recipe in RECIPES:
            for tag, _ in trees.items():
                cases[tag + recipe] = (tag, str(where / recipe))
        res: dict[str, dict] = {
            k: {"e2e": [], "raw": [], "prep": [], "stream": [], "folder": []} for k in cases
        }
        profiles = {}
        folder_rounds = {1, 2} if args.rounds >= 3 else {0}
        for rnd in range(args.rounds):
            order = list(cases) if rnd % 2 == 0 else list(reversed(cases))
            for name in order:
                tag, case = cases[name]
                res_file = tmp / "res.json"
                recipe = name.removeprefix(tag)
                cmd = [sys.executable, __file__, "--worker", case, "--worker-out", str(res_file)]
                cmd += ["--data", str(args.data), "--images", str(args.images)]
                # the folder test once per case, in the middle rounds; the profile in the last
                if folder is not None and recipe in FOLDER_RECIPES and rnd in folder_rounds:
                    cmd += ["--worker-folder", str(folder)]
                if args.profile and rnd == args.rounds - 1 and recipe in ("ort-int8", "onnx-fp32"):
                    cmd += ["--profile"]
                env = {**os.environ, "EDGE_TL_QUIET": "1", "PYTHONPATH": str(trees[tag])}
                subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
                got = json.loads(res_file.read_text())
                for key in ("e2e", "raw", "prep", "stream"):
                    res[name][key] += got[key]
                if "folder" in got:
                    res[name]["folder"].append(got["folder"])
                if "profile" in got:
                    profiles[name] = got["profile"]
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    med = {k: 1e3 * float(np.median(v["e2e"])) for k, v in res.items()}
    med_raw = {k: 1e3 * float(np.median(v["raw"])) for k, v in res.items()}
    med_prep = {k: 1e3 * float(np.median(v["prep"])) for k, v in res.items()}
    med_stream = {k: 1e3 * float(np.median(v["stream"])) for k, v in res.items() if v["stream"]}
    base = med["pytorch-eager"]
    print()
    print(f"batch 1, {len(images)} images x {args.rounds} rounds, median ms; host: {_cpu()}")
    print(
        "predict / engine = end to end over the raw engine call (decode + preprocess + head "
        "+ dispatch); own = the same less decode + preprocess; stream = per image of one "
        "predict call on all the images (the next decodes while the engine runs one)"
    )
    print(
        f"{'artifact':<22}{'predict ms':>11}{'engine ms':>10}{'decode+prep':>12}"
        f"{'pred/eng':>9}{'own':>8}{'vs PyTorch':>11}{'stream ms':>10}{'str/eng':>8}"
    )
    for k in cases:
        ratio = med[k] / med_raw[k]
        own = (med[k] - med_prep[k]) / med_raw[k]
        print(
            f"{k:<22}{med[k]:>11.2f}{med_raw[k]:>10.2f}{med_prep[k]:>12.2f}{ratio:>8.2f}x"
            f"{own:>7.2f}x{base / med[k]:>10.1f}x"
            + (
                f"{med_stream[k]:>10.2f}{med_stream[k] / med_raw[k]:>7.2f}x"
                if k in med_stream
                else ""
            )
        )
    verdicts = []
    for tag in trees:
        mine = [k for k in cases if cases[k][0] == tag and k != "pytorch-eager"]
        int8 = min((k for k in mine if "int8" in k), key=lambda k: med[k])
        speedup = base / med[int8]
        ratio = med[int8] / med_raw[int8]
        worst = max(med[k] / med_raw[k] for k in mine)
        verdicts.append(
            f"{tag or 'this tree '}fastest INT8: {int8}, {speedup:.1f}x PyTorch eager end to "
            f"end (goal >= 5x: {'PASS' if speedup >= 5 else 'FAIL'}); end to end "
            f"{ratio:.2f}x its engine call (goal <= 1.15x: {'PASS' if ratio <= 1.15 else 'FAIL'}"
            f"); worst of any artifact {worst:.2f}x"
        )
    if folder is not None:
        print()
        runs = next(v["folder"] for v in res.values() if v["folder"])
        print(
            f"folder throughput, images/s ({runs[0]['n']} images, batch {FOLDER_BATCH}; median "
            f"of {len(runs)} runs): engine alone on pre-decoded batches vs `evaluate` of the folder"
        )
        print(f"{'artifact':<22}{'engine':>9}{'evaluate':>10}{'ratio':>8}{'accuracy':>10}")
        for k in cases:
            runs = res[k]["folder"]
            if not runs:
                continue
            eng = float(np.median([r["n"] / r["engine_s"] for r in runs]))
            ev = float(np.median([r["n"] / r["evaluate_s"] for r in runs]))
            ratios = [r["engine_s"] / r["evaluate_s"] for r in runs]
            ratio = float(np.median(ratios))
            print(f"{k:<22}{eng:>9.1f}{ev:>10.1f}{ratio:>7.2f}x{runs[0]['accuracy']:>10.4f}")
            if "int8" in k or k.endswith("fp32"):
                res[k]["folder_ratio"] = ratio
        for tag in trees:
            worst = min(
                v["folder_ratio"]
                for k, v in res.items()
                if "folder_ratio" in v and cases[k][0] == tag
            )
            verdicts.append(
                f"{tag or 'this tree '}folder evaluation: worst {worst:.2f}x the engine's own "
                f"batch throughput (goal >= 0.9x: {'PASS' if worst >= 0.9 else 'FAIL'})"
            )
    print()
    print("\n".join(verdicts))
    for name, text in profiles.items():
        print(f"\ncProfile of predict, {name} ({len(images)} images, by own time):")
        print("\n".join(line for line in text.splitlines()[:24] if line.strip()))


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
