"""Multi-source transfer: two pretrained backbones' embeddings concatenated vs each alone.

For NEU-DET and flowers5 and the pair efficientnet_lite0 + mobilenet_v2 (the two
architectures with offline ImageNet weights that differ most):

- every image embedded once by each backbone (frozen, the exported graph, as
  ``--strategy linear-probe`` does); the concatenation is the two side by side, which is
  exactly what the multi-source graph computes (checked end to end on NEU-DET below);
- linear probe: the run's usual split (test 20 %, validation 10 %, seed 0), a softmax head
  with its L2 penalty chosen on validation (``fit_probe_head``), test accuracy;
- few-shot: N-way K-shot episodes (K = 1, 5, 10; 100 episodes, 15 queries per class, the
  seeds of ``benchmarks/fewshot.py``) with the shipped ``linear`` and ``prototype`` heads;
- end to end on NEU-DET: ``train --backbone efficientnet_lite0+mobilenet_v2 --strategy
  linear-probe``, exported as one ONNX FP32 graph, evaluated on the held-out split by the
  torch-free runtime.

    .venv/bin/python benchmarks/multisource.py [--episodes 100] [--work /tmp/edge_tl_multi]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot import episode, fit_predict  # noqa: E402

from edge_tl.backbones import build  # noqa: E402
from edge_tl.data import image_folder, split  # noqa: E402
from edge_tl.train import TrainConfig  # noqa: E402
from edge_tl.train.cache import cache_activations  # noqa: E402
from edge_tl.train.probe import fit_probe_head  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("neu_det", "flowers5")
PAIR = ("efficientnet_lite0", "mobilenet_v2")
SHOTS = (1, 5, 10)
HEADS = ("linear", "prototype")


def embed(name: str, data: Path, work: Path) -> np.ndarray:
    cache = work / f"{data.name}.{name}.npy"
    if cache.is_file():
        return np.load(cache)
    ds = image_folder(data)
    features, _ = build(name)
    t0 = time.perf_counter()
    x = cache_activations(features, ds.paths, features.spec.preprocess, None, desc=name)
    print(f"  {data.name}: {name} embedded in {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(cache, x)
    return x


def probe(x: np.ndarray, ds, parts: dict[str, np.ndarray]) -> dict[str, float]:
    k = len(ds.classes)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    head = fit_probe_head(x[tr], ds.labels[tr], x[va], ds.labels[va], k)
    acc = {
        s: float((head.predict_proba(x[i]).argmax(1) == ds.labels[i]).mean())
        for s, i in (("val", va), ("test", te))
    }
    return acc


def fewshot(x: np.ndarray, y: np.ndarray, names: list[str], n_episodes: int) -> dict:
    out = {}
    for shots in SHOTS:
        for head in HEADS:
            accs = []
            for e in range(n_episodes):
                s, q = episode(y, len(names), shots, seed=1000 * shots + e)
                pred, _ = fit_predict(head, x[s], y[s], names, x[q])
                accs.append(float((pred == y[q]).mean()) * 100)
            a = np.asarray(accs)
            ci = 1.96 * a.std(ddof=1) / np.sqrt(len(a))
            out[f"{shots}-shot {head}"] = (float(a.mean()), float(ci))
    return out


def end_to_end(data: Path, work: Path) -> dict[str, float]:
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.train import train

    run, bundle = work / f"{data.name}-run", work / f"{data.name}-bundle"
    metrics = train(
        data, run, TrainConfig(backbone="+".join(PAIR), strategy="linear-probe"), force=True
    )
    export_bundle(bundle, "onnx-fp32", run=run, force=True)
    res = Model(bundle).evaluate(data, split="test")
    return {"train_test_accuracy": metrics["test_accuracy"], "bundle_accuracy": res.accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_multi"))
    ap.add_argument("--data", default=",".join(DATASETS))
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {}
    for key in args.data.split(","):
        data = SHARED / key
        ds = image_folder(data)
        parts = split(ds, TrainConfig().split)
        xs = {name: embed(name, data, args.work) for name in PAIR}
        xs["+".join(PAIR)] = np.concatenate([xs[n] for n in PAIR], axis=1)
        names = list(ds.classes)
        rows = {}
        for name, x in xs.items():
            rows[name] = {
                "probe": probe(x, ds, parts),
                "fewshot": fewshot(x, ds.labels, names, args.episodes),
            }
        cols = list(rows[PAIR[0]]["fewshot"])
        print(f"\n## {key} ({len(ds)} images, {len(names)} classes)\n")
        print("| source | probe val | probe test | " + " | ".join(cols) + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for name, r in rows.items():
            few = " | ".join(f"{m:.1f} ± {ci:.1f}" for m, ci in r["fewshot"].values())
            p = r["probe"]
            print(f"| {name} | {100 * p['val']:.2f} | {100 * p['test']:.2f} | {few} |")
        if key == "neu_det" and not args.no_end_to_end:
            e2e = end_to_end(data, args.work)
            rows["end_to_end"] = e2e
            print(
                f"\nend to end ({'+'.join(PAIR)}, one ONNX FP32 graph): train test accuracy "
                f"{100 * e2e['train_test_accuracy']:.2f}, bundle on the test split "
                f"{100 * e2e['bundle_accuracy']:.2f}",
                flush=True,
            )
        report[key] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
