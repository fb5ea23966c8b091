"""Text: batch-1 end-to-end latency of each artifact vs PyTorch and vs optimum, and peak RSS.

End to end = tokenize + engine + pooling + head, as `edge-tl predict BUNDLE --text` does per
text. For every artifact (all-minilm-l6-v2 exported by `edge-tl export --backbone` with each
recipe, a linear head learned on the device from 8 TREC-6 questions per class), three ways
of answering one question are timed round-robin in one process, on the same 200 real
TREC-6 test questions:

- ``edge_tl``: the torch-free runtime, ``Model(bundle).predict([text])``;
- ``optimum``: optimum's own inference class on the same artifact file
  (``ORTModelForFeatureExtraction`` for ONNX, ``OVModelForFeatureExtraction`` for OpenVINO),
  with ``transformers``' tokenizer, torch mean pooling and the same head in numpy;
- ``PyTorch``: eager FP32 ``transformers.AutoModel`` (once, not per artifact) with the same
  tokenizer, pooling and head.

Each way answers blocks of 20 questions in turn, the order of the three rotated every block
(one question each in strict turn put each engine's threads to sleep between calls and
charged the wake-up to whichever ran after PyTorch).

Ratios (PyTorch p50 / p50, optimum p50 / edge_tl p50) are computed in the same run; the
machine is shared and noisy, absolute times are not comparable between runs. Peak RSS:
`edge-tl predict BUNDLE --text ...` with the ORT INT8 bundle in a fresh process, against a
fresh process that answers the same text with optimum's ``ORTModelForFeatureExtraction`` on
the same file (torch is loaded by optimum). Goals (issue 16): edge_tl at least as fast as
optimum on every artifact; predict's peak RSS < 200 MB.

    .venv/bin/python benchmarks/text_latency.py [--work /tmp/edge_tl_text_latency] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.backbones import get_text_spec  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402
from edge_tl.texts import open_text_dataset  # noqa: E402

BACKBONE = "all-minilm-l6-v2"
RECIPES = ("onnx-fp32", "ort-int8", "ort-int8-dynamic", "openvino-fp32", "openvino-int8")
EDGE_TL = [sys.executable, "-m", "edge_tl.cli"]
BLOCK = 20


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")


def make_bundles(work: Path, support: Path, calib: Path) -> dict[str, Path]:
    """Export the frozen encoder with each recipe (cached in ``work``) and learn a head."""
    out = {}
    for recipe in RECIPES:
        bundle = work / recipe
        if not (bundle / "heads").is_dir():
            shutil.rmtree(bundle, ignore_errors=True)
            cmd = [*EDGE_TL, "export", "--backbone", BACKBONE, "--recipe", recipe]
            _run([*cmd, "--calib", str(calib), "--out", str(bundle)])
            _run([*EDGE_TL, "learn", str(bundle), str(support)])
        out[recipe] = bundle
    return out


def write_support(work: Path, per_class: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """8 TREC-6 training questions per class as a CSV (the device's support set) and 300
    other training questions, unlabelled, one per line (calibration)."""
    ds = open_text_dataset("trec6:train")
    rng = np.random.default_rng(seed)
    rows, picked = [], set()
    for c, name in enumerate(ds.classes):
        idx = rng.choice(np.flatnonzero(ds.labels == c), per_class, replace=False)
        picked |= set(idx.tolist())
        rows += [(ds.texts[i], name) for i in idx]
    import csv

    support = work / "support.csv"
    with open(support, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    rest = [i for i in rng.permutation(len(ds)) if i not in picked][:300]
    calib = work / "calib.txt"
    calib.write_text("\n".join(ds.texts[i].replace("\n", " ") for i in rest) + "\n", "utf-8")
    return support, calib


class _TorchAnswer:
    """One text -> label with a torch-side encoder (eager PyTorch or an optimum model),
    transformers' tokenizer, torch mean pooling and the bundle's learned head in numpy."""

    def __init__(self, encoder, tokenizer, model: Model) -> None:
        self.encoder, self.tokenizer, self.model = encoder, tokenizer, model
        self.pre = model.manifest.preprocess

    def __call__(self, text: str) -> str:
        import torch

        from edge_tl.train.text_encoder import pool_torch, tokenize

        with torch.inference_mode():
            enc = tokenize(self.tokenizer, [text], self.pre)
            hidden = self.encoder(**enc).last_hidden_state
            emb = pool_torch(torch.as_tensor(hidden), enc["attention_mask"], self.pre).numpy()
        _, pred, _ = self.model.classifier.classify(emb)
        return self.model.classifier.labels[pred[0]] if pred[0] >= 0 else "unknown"


def optimum_folder(bundle: Path, work: Path) -> Path:
    """The bundle's artifact file in a folder optimum can open (its config.json and
    tokenizer files beside it), the very file edge_tl runs, not a new export."""
    model_dir = get_text_spec(BACKBONE).model_dir()
    folder = work / f"optimum-{bundle.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(model_dir / f, folder / f)
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["artifact"]["files"]
    if files[0].endswith(".onnx"):
        os.symlink((bundle / files[0]).resolve(), folder / "model.onnx")
    else:
        os.symlink((bundle / files[0]).resolve(), folder / "openvino_model.xml")
        os.symlink((bundle / files[1]).resolve(), folder / "openvino_model.bin")
    return folder


def load_optimum(folder: Path):
    if (folder / "model.onnx").exists():
        from optimum.onnxruntime import ORTModelForFeatureExtraction

        return ORTModelForFeatureExtraction.from_pretrained(folder, local_files_only=True)
    from optimum.intel import OVModelForFeatureExtraction

    return OVModelForFeatureExtraction.from_pretrained(folder, local_files_only=True, compile=True)


def p50_ms(times: list[float]) -> float:
    return float(np.median(times) * 1e3)


def predict_rss_mb(bundle: Path, text: str) -> float:
    """Peak RSS (MB, VmHWM) of `edge-tl predict BUNDLE --text TEXT` in a fresh process."""
    code = (
        "import sys\nfrom edge_tl.cli import main\n"
        "from edge_tl.runtime.bench import peak_rss_mb\n"
        f"rc = main(['predict', {str(bundle)!r}, '--text', {text!r}, '--json'])\n"
        "print('RSS', peak_rss_mb())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "RSS" not in res.stdout:
        raise SystemExit(f"predict failed: {res.stderr[-1000:]}")
    return float(res.stdout.split("RSS")[-1])


def optimum_rss_mb(folder: Path, text: str) -> float:
    """Peak RSS (MB) of a fresh process answering ``text`` with optimum on the same file."""
    code = (
        "from optimum.onnxruntime import ORTModelForFeatureExtraction\n"
        "from transformers import AutoTokenizer\n"
        "from edge_tl.runtime.bench import peak_rss_mb\n"
        f"m = ORTModelForFeatureExtraction.from_pretrained({str(folder)!r}, "
        "local_files_only=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"h = m(**t([{text!r}], return_tensors='pt')).last_hidden_state.mean(1)\n"
        "print('RSS', peak_rss_mb())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "RSS" not in res.stdout:
        raise SystemExit(f"optimum failed: {res.stderr[-1000:]}")
    return float(res.stdout.split("RSS")[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_text_latency"))
    ap.add_argument("--n", type=int, default=200, help="test questions timed per artifact")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    support, calib = write_support(args.work)
    bundles = make_bundles(args.work, support, calib)
    texts = open_text_dataset("trec6:test").texts[: args.n]

    import torch

    from edge_tl.train.text_encoder import load_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    eager, tokenizer = load_encoder(get_text_spec(BACKBONE).model_dir())
    rows = []
    for recipe, bundle in bundles.items():
        model = Model(bundle)
        ways = {
            "edge_tl": lambda t, m=model: m.predict([t])[0].label,
            "optimum": _TorchAnswer(
                load_optimum(optimum_folder(bundle, args.work)), tokenizer, model
            ),
            "PyTorch": _TorchAnswer(eager, tokenizer, model),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        answers: dict[str, list[str]] = {k: [] for k in ways}
        for t in texts[:10]:  # warm-up
            for f in ways.values():
                f(t)
        names = list(ways)
        for b, start in enumerate(range(0, len(texts), BLOCK)):
            # blocks of BLOCK texts per way, the order rotated every block: the way that
            # runs first after another engine (its threads asleep, caches cold) changes
            for name in names[b % 3 :] + names[: b % 3]:
                for t in texts[start : start + BLOCK]:
                    t0 = time.perf_counter()
                    label = ways[name](t)
                    times[name].append(time.perf_counter() - t0)
                    answers[name].append(label)
        same = [a == b for a, b in zip(answers["edge_tl"], answers["optimum"], strict=True)]
        agree = sum(same)
        p = {k: p50_ms(v) for k, v in times.items()}
        rows.append((recipe, p, agree / len(texts)))
    print(
        f"\nbatch-1 end to end (tokenize + engine + pooling + head), p50 ms over {len(texts)} "
        "TREC-6 test questions; ratios from the same run\n"
    )
    print(
        "| artifact | edge_tl ms | optimum ms | PyTorch eager FP32 ms | optimum / edge_tl "
        "| PyTorch / edge_tl | same label as optimum |"
    )
    print("|---|---|---|---|---|---|---|")
    for recipe, p, agree in rows:
        print(
            f"| {recipe} | {p['edge_tl']:.2f} | {p['optimum']:.2f} | {p['PyTorch']:.2f} | "
            f"{p['optimum'] / p['edge_tl']:.2f}x | {p['PyTorch'] / p['edge_tl']:.2f}x | "
            f"{agree:.1%} |"
        )
    text = texts[0]
    rss = predict_rss_mb(bundles["ort-int8"], text)
    rss_opt = optimum_rss_mb(optimum_folder(bundles["ort-int8"], args.work), text)
    print(
        f"\npeak RSS, fresh process, ORT INT8 bundle: `edge-tl predict --text` {rss:.0f} MB; "
        f"optimum ORTModelForFeatureExtraction (torch loaded) {rss_opt:.0f} MB "
        f"({rss_opt / rss:.1f}x)"
    )


if __name__ == "__main__":
    main()
