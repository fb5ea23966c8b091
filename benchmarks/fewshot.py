"""Few-shot heads on the device, side by side in one run: accuracy, fit time, open set, RSS.

For NEU-DET (6-way) and flowers5 (5-way): the pretrained EfficientNet-Lite0 exported as an
ONNX FP32 and an ORT INT8 bundle (INT8 calibrated on the data set's own images, unlabelled,
as a camera's would be on images of its line), every image embedded once by each
bundle, then N-way K-shot episodes (K = 1, 5, 10; 200 episodes, fixed seeds, 15 queries per
class). Every head and every reference sees the same embeddings and the same episodes:

- the shipped heads (``edge_tl.runtime.learner``): ``linear`` (the default), ``prototype``,
  ``knn`` (k = 1); each power-transforms (``sign(x) |x| ** 0.5``), centres on the support
  mean and L2-normalises (``edge_tl.runtime.heads``);
- ``sklearn LR (raw)``: scikit-learn ``LogisticRegression(max_iter=1000)`` on the raw
  embeddings (otherwise defaults: L2, ``C=1.0``, lbfgs, multinomial for more than two
  classes);
- ``sklearn LR (std)``: the same ``LogisticRegression(C=1.0, max_iter=1000)`` (multinomial)
  on embeddings standardised by ``StandardScaler`` fitted on the episode's support set (the
  only labelled data an episode has), applied to its queries;
- ``SimpleShot``: as published (Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor
  Classification for Few-Shot Learning", arXiv:1911.04623), CL2N + nearest centroid:
  subtract the mean of the support features, L2-normalise, average each class's normalised
  support features, and give each query the class of the nearest centroid by Euclidean
  distance. No power transform. (The paper centres on the mean of its base-class training
  features; a pretrained backbone on a device has no base set, so the support mean stands
  in, as in edge_tl's heads.)
- ``SimpleShot + power``: the same on ``sign(x) |x| ** 0.5`` (edge_tl's power transform):
  the ablation that separates the power transform's gain (vs ``SimpleShot``) from the other
  difference to edge_tl's ``prototype`` head, which scores by cosine to L2-normalised class
  means instead of Euclidean distance to the unnormalised means (the two agree at K = 1).

Differences are also printed paired over the same episodes (mean ± 95 % CI of the
per-episode difference): ``prototype`` vs ``SimpleShot``, ``SimpleShot + power`` vs
``SimpleShot`` (the power transform alone) and ``prototype`` vs ``SimpleShot + power`` (the
scoring alone).

Also: the linear head's accuracy at fixed L2 penalties 1e-3, 3e-3, 1e-2 where it does not
pick one (below 10 shots), the time and cosine of the self-test a bundle runs when opened,
fit time of each head for 6-way 5-shot and of adding a 6th class to a 5-way head
(median over episodes, embedding extraction excluded and reported separately), accuracy
after add-a-class vs a full refit, open-set rejection (one class held out as the unknown),
and the peak RSS of ``edge-tl predict`` with the INT8 bundle in a fresh process.

    .venv/bin/python benchmarks/fewshot.py [--episodes 200] [--work /tmp/edge_tl_fewshot]

Bundles and embeddings are cached in ``--work`` (the first run exports four bundles)."""

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

from edge_tl.data import image_folder  # noqa: E402
from edge_tl.runtime import Model, learner  # noqa: E402
from edge_tl.runtime.heads import (  # noqa: E402
    FEWSHOT_L2,
    FEWSHOT_POWER,
    MIN_PER_CLASS_FOR_SELECTION,
    LinearHead,
    cl2n,
    power,
)
from edge_tl.runtime.host import host_info  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("neu_det", "flowers5")
RECIPES = {"int8": "ort-int8", "fp32": "onnx-fp32"}
SHOTS = (1, 5, 10)
QUERIES = 15
SHIPPED = ("linear", "prototype", "knn")
REFERENCES = ("sklearn", "sklearn_std", "simpleshot", "simpleshot_power")
HEADS = SHIPPED + REFERENCES
ROW_NAMES = {
    "linear": "linear (default)",
    "prototype": "prototype",
    "knn": "k-NN (k=1)",
    "sklearn": "sklearn LR (raw)",
    "sklearn_std": "sklearn LR (std)",
    "simpleshot": "SimpleShot",
    "simpleshot_power": "SimpleShot + power",
}
PAIRED = (
    ("prototype", "simpleshot"),  # edge_tl's prototype head vs SimpleShot as published
    ("simpleshot_power", "simpleshot"),  # the power transform alone
    ("prototype", "simpleshot_power"),  # cosine to unit class means vs Euclidean to means
)
L2_SWEEP = (1e-3, 3e-3, 1e-2)


def bundles(data: Path, work: Path) -> dict[str, Path]:
    """The two bundles of the pretrained backbone for ``data`` (exported once, then reused)."""
    out = {}
    for precision, recipe in RECIPES.items():
        path = work / f"{data.name}-{precision}"
        if not (path / "manifest.json").is_file():
            from edge_tl.export import export_bundle

            print(f"  exporting {path.name} ({recipe}, calibrated on {data.name})", flush=True)
            export_bundle(path, recipe, backbone="efficientnet_lite0", calib=data)
        out[precision] = path
    return out


def embeddings(bundle: Path, data: Path, work: Path) -> dict[str, np.ndarray]:
    cache = work / f"{bundle.name}.embeddings.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    ds = image_folder(data)
    model = Model(bundle)
    t0 = time.perf_counter()
    x = model.embed(ds.paths, batch_size=1)
    ms = (time.perf_counter() - t0) / len(ds) * 1e3
    out = {"x": x, "y": ds.labels, "classes": np.array(ds.classes), "embed_ms": np.array(ms)}
    np.savez(cache, **out)
    return out


def episode(y: np.ndarray, n_classes: int, shots: int, seed: int):
    rng = np.random.default_rng(seed)
    sup, qry = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))[: shots + QUERIES]
        sup.append(idx[:shots])
        qry.append(idx[shots:])
    return np.concatenate(sup), np.concatenate(qry)


def fit_predict(
    head: str, x_s: np.ndarray, y_s: np.ndarray, names: list[str], x_q: np.ndarray
) -> tuple[np.ndarray, float]:
    """Predicted class index per query and the fit time (ms) of one head or reference."""
    t0 = time.perf_counter()
    if head in ("sklearn", "sklearn_std"):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if head == "sklearn_std":
            scaler = StandardScaler().fit(x_s)
            x_s, x_q = scaler.transform(x_s), scaler.transform(x_q)
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(x_s, y_s)
        ms = (time.perf_counter() - t0) * 1e3
        return clf.predict(x_q), ms
    if head in ("simpleshot", "simpleshot_power"):
        p = FEWSHOT_POWER if head == "simpleshot_power" else 1.0
        pred = simpleshot(power(x_s, p), y_s, power(x_q, p))
        return pred, (time.perf_counter() - t0) * 1e3
    state = learner.learn(x_s, [names[i] for i in y_s], head)
    ms = (time.perf_counter() - t0) * 1e3
    return _to_data(state, names)[state.predict_proba(x_q).argmax(1)], ms


def simpleshot(x_s: np.ndarray, y_s: np.ndarray, x_q: np.ndarray) -> np.ndarray:
    """SimpleShot (Wang et al. 2019), CL2N: centre on the support mean, L2-normalise, nearest
    class centroid (mean of the normalised support features) by Euclidean distance."""
    centre = x_s.mean(0)
    z_s, z_q = cl2n(x_s, centre), cl2n(x_q, centre)
    classes = np.unique(y_s)
    centroids = np.stack([z_s[y_s == c].mean(0) for c in classes])
    d2 = (z_q**2).sum(1)[:, None] - 2 * z_q @ centroids.T + (centroids**2).sum(1)[None]
    return classes[d2.argmin(1)]


def _to_data(state: learner.HeadState, names: list[str]) -> np.ndarray:
    """Map the head's class indices to the data set's."""
    return np.asarray([names.index(n) for n in state.labels])


def episodes(emb: dict[str, np.ndarray], n_episodes: int) -> dict:
    x, y = emb["x"], emb["y"]
    names = [str(c) for c in emb["classes"]]
    k = len(names)
    res: dict = {}
    for shots in SHOTS:
        for head in HEADS:
            accs, ms = [], []
            for e in range(n_episodes):
                s, q = episode(y, k, shots, seed=1000 * shots + e)
                pred, t = fit_predict(head, x[s], y[s], names, x[q])
                accs.append(float((pred == y[q]).mean()))
                ms.append(t)
            a = np.asarray(accs) * 100
            res[(shots, head)] = {
                "per_episode": a,
                "acc": float(a.mean()),
                "ci95": float(1.96 * a.std(ddof=1) / np.sqrt(len(a))),
                "fit_ms": float(np.median(ms)),
            }
    return res


def l2_sweep(emb: dict[str, np.ndarray], n_episodes: int) -> dict[tuple[int, float], float]:
    """Accuracy (%) of the few-shot linear head at fixed L2 penalties, at the shots below
    ``MIN_PER_CLASS_FOR_SELECTION`` (where the head uses ``FEWSHOT_L2`` instead of picking
    one); the same episodes as :func:`episodes`."""
    x, y = emb["x"], emb["y"]
    k = len(emb["classes"])
    out = {}
    for shots in (s for s in SHOTS if s < MIN_PER_CLASS_FOR_SELECTION):
        for l2 in L2_SWEEP:
            accs = []
            for e in range(n_episodes):
                s, q = episode(y, k, shots, seed=1000 * shots + e)
                head = LinearHead.fit_fewshot(x[s], y[s], k, l2=l2)
                accs.append(float((head.logits(x[q]).argmax(1) == y[q]).mean()))
            out[(shots, l2)] = 100 * float(np.mean(accs))
    return out


def self_test_ms(bundle: Path) -> dict[str, float]:
    """What opening the bundle costs for its self-test (four reference images, one batch,
    on a fresh engine), and the cosine it found on this host."""
    st = Model(bundle).self_test or {}
    return {
        "ms": float(st.get("ms", float("nan"))),
        "cosine": float(st.get("cosine", float("nan"))),
    }


def add_class(emb: dict[str, np.ndarray], n_episodes: int, shots: int = 5) -> dict:
    """Learn N-1 classes, then add the last one; vs a full N-way fit on the same support."""
    x, y = emb["x"], emb["y"]
    names = [str(c) for c in emb["classes"]]
    k = len(names)
    out = {}
    for head in ("linear", "prototype", "knn"):
        ms, acc_add, acc_full = [], [], []
        for e in range(n_episodes):
            s, q = episode(y, k, shots, seed=7000 + e)
            base = s[y[s] != k - 1]
            new = s[y[s] == k - 1]
            state = learner.learn(x[base], [names[i] for i in y[base]], head)
            t0 = time.perf_counter()
            grown = learner.add(state, x[new], [names[i] for i in y[new]])
            ms.append((time.perf_counter() - t0) * 1e3)
            full = learner.learn(x[s], [names[i] for i in y[s]], head)
            for st, acc in ((grown, acc_add), (full, acc_full)):
                pred = _to_data(st, names)[st.predict_proba(x[q]).argmax(1)]
                acc.append(float((pred == y[q]).mean()))
        out[head] = {
            "add_ms": float(np.median(ms)),
            "acc_after_add": 100 * float(np.mean(acc_add)),
            "acc_full_fit": 100 * float(np.mean(acc_full)),
        }
    return out


def workstation_imprint(emb: dict[str, np.ndarray], shots: int = 5, seed: int = 0) -> dict:
    """A head trained on all classes but one (half of their images, standardised linear
    head, as ``edge-tl train --strategy linear-probe`` fits it), 20 exemplars per class as
    the export stores them; then the held-out class is imprinted from ``shots`` images.
    Accuracy on the other half, each class in turn the new one."""
    from edge_tl.runtime.heads import LinearHead
    from edge_tl.runtime.imprint import imprint

    x, y = emb["x"], emb["y"]
    k = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(np.flatnonzero(y == c)) for c in range(k)]
    train = [h[: len(h) // 2] for h in halves]
    test = [h[len(h) // 2 :] for h in halves]
    old_before, old_after, new_acc, ms = [], [], [], []
    for new in range(k):
        known = [c for c in range(k) if c != new]
        remap = {c: i for i, c in enumerate(known)}
        tr = np.concatenate([train[c] for c in known])
        head = LinearHead.fit(x[tr], np.asarray([remap[c] for c in y[tr]]), k - 1)
        ex = np.concatenate([train[c][:20] for c in known])
        t0 = time.perf_counter()
        grown = imprint(
            head,
            x[train[new][:shots]],
            np.zeros(shots, np.int64),
            1,
            x[ex],
            np.asarray([remap[c] for c in y[ex]]),
        )
        ms.append((time.perf_counter() - t0) * 1e3)
        te = np.concatenate([test[c] for c in known])
        y_te = np.asarray([remap[c] for c in y[te]])
        old_before.append(float((head.logits(x[te]).argmax(1) == y_te).mean()))
        old_after.append(float((grown.logits(x[te]).argmax(1) == y_te).mean()))
        new_acc.append(float((grown.logits(x[test[new]]).argmax(1) == k - 1).mean()))
    return {
        "known_before": 100 * float(np.mean(old_before)),
        "known_after": 100 * float(np.mean(old_after)),
        "new_class": 100 * float(np.mean(new_acc)),
        "imprint_ms": float(np.median(ms)),
    }


def open_set(emb: dict[str, np.ndarray], n_episodes: int, shots: int = 5) -> dict:
    """Each class in turn is the unknown: learn the others, score the others' queries and
    the unknown class's images. Rates at the leave-one-out threshold (quantile 0.05)."""
    x, y = emb["x"], emb["y"]
    names = [str(c) for c in emb["classes"]]
    k = len(names)
    known_ok, unknown_rej, aurocs = [], [], []
    for e in range(n_episodes):
        s, q = episode(y, k, shots, seed=9000 + e)
        out_cls = e % k
        s, qk = s[y[s] != out_cls], q[y[q] != out_cls]
        qu = q[y[q] == out_cls]
        state = learner.learn(x[s], [names[i] for i in y[s]], "linear")
        sims = []
        for part in (qk, qu):
            pred = state.predict_proba(x[part]).argmax(1)
            sims.append(state.similarity(x[part], pred))
        thr = state.threshold
        known_ok.append(float((sims[0] >= thr).mean()))
        unknown_rej.append(float((sims[1] < thr).mean()))
        aurocs.append(_auroc(sims[0], sims[1]))
    return {
        "known_accepted": 100 * float(np.mean(known_ok)),
        "unknown_rejected": 100 * float(np.mean(unknown_rej)),
        "auroc": float(np.mean(aurocs)),
    }


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a known image > score of an unknown one)."""
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def predict_rss_mb(bundle: Path, image: str) -> float:
    """Peak RSS (MB) of `edge-tl predict BUNDLE IMAGE` in a fresh process (VmHWM: the
    high-water mark of this program alone; ``ru_maxrss`` would carry the forking parent's)."""
    code = (
        "import sys\n"
        "from edge_tl.cli import main\n"
        "from edge_tl.runtime.bench import peak_rss_mb\n"
        "rc = main(['predict', sys.argv[1], sys.argv[2]])\n"
        "print('RSS', peak_rss_mb())\n"
        "sys.exit(rc)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(bundle), image], capture_output=True, text=True
    )
    if res.returncode:
        raise RuntimeError(res.stderr)
    return float(res.stdout.split("RSS")[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=200, help="episodes per K (default 200)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/edge_tl_fewshot"),
        help="bundles and embeddings are cached here (default /tmp/edge_tl_fewshot)",
    )
    ap.add_argument(
        "--data",
        nargs="*",
        default=list(DATASETS),
        help="data set names under ../shared/data or ImageFolder paths (default: both)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    host = host_info()
    print(f"host: {host['cpu']}, {host['cores']} cores, {host['cpu_class']} ({host['int8_isa']})")
    report: dict = {"episodes": args.episodes, "host": host, "datasets": {}}
    for name in args.data:
        data = SHARED / name if not Path(name).is_dir() else Path(name)
        print(f"{data.name}:", flush=True)
        paths = bundles(data, args.work)
        emb = {p: embeddings(b, data, args.work) for p, b in paths.items()}
        t0 = time.perf_counter()
        res = {p: episodes(e, args.episodes) for p, e in emb.items()}
        print(f"  episodes: {time.perf_counter() - t0:.0f} s", flush=True)
        k = len(emb["int8"]["classes"])
        print(f"\n{data.name} {k}-way, {args.episodes} episodes, {QUERIES} queries per class:")
        print("| head | K | INT8 acc ± 95 % CI | FP32 acc ± 95 % CI | INT8 − FP32 |")
        print("|---|---|---|---|---|")
        for head in HEADS:
            for shots in SHOTS:
                a, b = res["int8"][(shots, head)], res["fp32"][(shots, head)]
                print(
                    f"| {ROW_NAMES[head]} | {shots} | {a['acc']:.1f} ± {a['ci95']:.1f} | "
                    f"{b['acc']:.1f} ± {b['ci95']:.1f} | {a['acc'] - b['acc']:+.1f} |"
                )
        print("\nthe same, one row per head (accuracy %, INT8 ± 95 % CI / FP32):")
        print("| head | " + " | ".join(f"K={s} INT8 / FP32" for s in SHOTS) + " |")
        print("|---|" + "---|" * len(SHOTS))
        for head in HEADS:
            cells = [
                f"{res['int8'][(s, head)]['acc']:.1f} ± {res['int8'][(s, head)]['ci95']:.1f}"
                f" / {res['fp32'][(s, head)]['acc']:.1f}"
                for s in SHOTS
            ]
            print(f"| {ROW_NAMES[head]} | " + " | ".join(cells) + " |")
        print("\npaired over the same episodes, accuracy difference in pt (mean ± 95 % CI):")
        paired = {}
        for a_head, b_head in PAIRED:
            for prec in RECIPES:
                cells = []
                for shots in SHOTS:
                    d = (
                        res[prec][(shots, a_head)]["per_episode"]
                        - res[prec][(shots, b_head)]["per_episode"]
                    )
                    ci = float(1.96 * d.std(ddof=1) / np.sqrt(len(d)))
                    paired[f"{a_head}-{b_head}@{prec}@{shots}"] = (float(d.mean()), ci)
                    cells.append(f"K={shots} {d.mean():+.1f} ± {ci:.1f}")
                print(
                    f"  {ROW_NAMES[a_head]} − {ROW_NAMES[b_head]}, {prec.upper()}: "
                    + ", ".join(cells)
                )
        sweep = {p: l2_sweep(e, args.episodes) for p, e in emb.items()}
        print(
            f"\nlinear head at a fixed L2 penalty (the default below "
            f"{MIN_PER_CLASS_FOR_SELECTION} shots is {FEWSHOT_L2:g}), accuracy %, same episodes:"
        )
        for prec, r in sweep.items():
            for shots in sorted({s for s, _ in r}):
                cells = " / ".join(f"{l2:g} {r[(shots, l2)]:.1f}" for l2 in L2_SWEEP)
                spread = max(r[(shots, v)] for v in L2_SWEEP) - min(r[(shots, v)] for v in L2_SWEEP)
                print(f"  {prec.upper()} K={shots}: {cells} (spread {spread:.1f} pt)")
        selftest = {p: self_test_ms(b) for p, b in paths.items()}
        print(
            "self-test on opening a bundle (4 images, one batch, fresh engine): "
            + ", ".join(
                f"{p.upper()} {v['ms']:.0f} ms (cosine {v['cosine']:.4f})"
                for p, v in selftest.items()
            )
        )
        fit = {h: res["int8"][(5, h)]["fit_ms"] for h in HEADS}
        adds = add_class(emb["int8"], min(args.episodes, 100))
        osr = open_set(emb["int8"], min(args.episodes, 100))
        ws = workstation_imprint(emb["int8"])
        print(f"\nfit, {k}-way 5-shot (median ms, INT8 embeddings):")
        print("  " + "  ".join(f"{h} {v:.2f}" for h, v in fit.items()))
        print(
            f"add a {k}th class to a {k - 1}-way 5-shot head (median ms; accuracy after add "
            "vs full refit):"
        )
        for h, v in adds.items():
            print(
                f"  {h}: {v['add_ms']:.2f} ms, {v['acc_after_add']:.1f} vs "
                f"{v['acc_full_fit']:.1f} %"
            )
        print(
            f"imprint a class into a workstation head ({k - 1} classes, half the images; 5 "
            f"shots, 20 exemplars per class; each class in turn): known classes "
            f"{ws['known_before']:.1f} -> {ws['known_after']:.1f} %, new class "
            f"{ws['new_class']:.1f} %, {ws['imprint_ms']:.2f} ms"
        )
        print(
            f"embedding extraction (batch 1, engine + preprocessing): INT8 "
            f"{float(emb['int8']['embed_ms']):.1f} ms/image, FP32 "
            f"{float(emb['fp32']['embed_ms']):.1f} ms/image (5-shot support of {k} classes: "
            f"{5 * k * float(emb['int8']['embed_ms']):.0f} ms INT8)"
        )
        print(
            f"open set (one class unknown, 5-shot, linear head, LOO quantile 0.05): known "
            f"accepted {osr['known_accepted']:.1f} %, unknown rejected "
            f"{osr['unknown_rejected']:.1f} %, AUROC {osr['auroc']:.3f}\n"
        )
        image = image_folder(data).paths[0]
        rss = predict_rss_mb(paths["int8"], image)
        print(f"peak RSS of `edge-tl predict` (INT8 bundle, fresh process): {rss:.0f} MB\n")
        report["datasets"][data.name] = {
            "episodes": {
                p: {
                    f"{h}@{s}": {f: v for f, v in r[(s, h)].items() if f != "per_episode"}
                    for (s, h) in r
                }
                for p, r in res.items()
            },
            "paired_differences": paired,
            "l2_sweep": {
                p: {f"{l2:g}@{s}": v for (s, l2), v in r.items()} for p, r in sweep.items()
            },
            "self_test": selftest,
            "fit_ms_5shot": fit,
            "add_class": adds,
            "open_set": osr,
            "workstation_imprint": ws,
            "embed_ms": {p: float(e["embed_ms"]) for p, e in emb.items()},
            "predict_peak_rss_mb": rss,
        }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
