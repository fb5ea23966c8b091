"""The linear probe's head vs scikit-learn's logistic regression, on the same embeddings.

For NEU-DET, flowers5, ELPV and the magnetic-tile defect types (the five folders
``magnetic_tile/test/<defect>`` as classes): the pretrained EfficientNet-Lite0's FP32
embeddings, computed once per data set by the code the linear probe uses
(``edge_tl.train.cache.cache_activations``) and kept in ``--work``; the edge_tl split
``split(ds, SplitRecord(test_frac=0.2, val_frac=0.1, seed=0))`` (stratified, seed 0), at
10, 30 and 100 training images per class (``train_per_class``; the validation split keeps
its size) and the full training split. Train + val is what every column learns from; the
held-out test split only measures. Columns (test accuracy, %):

- ``sk C=1``: scikit-learn ``LogisticRegression(C=1, max_iter=10000)`` on embeddings
  standardised by ``StandardScaler`` (fitted on train + val);
- ``sk CV``: ``LogisticRegressionCV`` on the same, ``StratifiedKFold(5, shuffle=True,
  random_state=0)``, its ``Cs`` the penalty grid ``DEFAULT_L2_GRID`` in scikit-learn's units
  (``C = 1 / (l2 n)`` for the ``n`` rows a fold learns from: scikit-learn sums the loss, ours
  averages it);
- ``val``: the penalty chosen on the validation split, the head fitted on the training split
  alone (``fit_probe_head`` before cross-validation);
- ``val+``: the same choice, refitted on train + val;
- ``cv nll``, ``cv``: 5-fold stratified cross-validation on train + val
  (``edge_tl.runtime.softmax.select_l2_cv``), the penalty with the lowest out-of-fold
  log-loss (the library's rule) or with the best out-of-fold accuracy (ties: log-loss),
  refitted on train + val;
- ``1/n``: no choice, ``l2 = 1 / n`` (scikit-learn's ``C = 1`` in our units: a check that
  the two solvers agree);
- the transform in front: ``std`` standardised (today's workstation head), ``cl2n`` the
  device's few-shot features (``sign(x) |x| ** 0.5``, centred on the mean, L2-normalised:
  SimpleShot's CL2N, Wang et al. 2019, plus the power transform), ``pstd`` the power
  transform then standardised; ``cl2n`` searches a grid 1000x weaker (unit-norm rows are
  ~36x shorter than standardised ones);
- ``fit_probe_head``: the library's rule as shipped (``edge_tl.train.probe.fit_probe_head``
  given the train and val splits): ``std cv nll``.

``cl2n cv nll`` measured best in every cell (0.0 to +3.4 pt over the better scikit-learn
column, README) but is not the workstation default yet: its head (power transform and L2
normalisation before the matmul) no longer folds into one matmul (``LinearHead.folded``:
``export --logits``, the multi-task joint head), and ``learn --add`` refits a normalised
head from its support as a few-shot head; those paths come first.

Fit time (seconds, one run, this machine) of the whole rule, selection included, is kept in
the JSON. The transforms are fitted on train + val before cross-validation (as the
scikit-learn columns' ``StandardScaler``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/probe_vs_sklearn.py [--data neu_det ...]
        [--sizes 10 30 100 0] [--json out.json] [--work /tmp/edge_tl_probe_vs_sklearn]

Embeddings and finished cells are cached in ``--work/cells.json`` (``--fresh`` recomputes
the cells): a long run can be split into several and resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.data import Dataset, fingerprint, image_folder, open_dataset, split  # noqa: E402
from edge_tl.images import list_images  # noqa: E402
from edge_tl.runtime.heads import DEFAULT_L2_GRID, cl2n, power  # noqa: E402
from edge_tl.runtime.softmax import fit_softmax, select_l2_cv, softmax  # noqa: E402
from edge_tl.spec import SplitRecord  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("neu_det", "flowers5", "elpv", "magnetic_tile_types")
SIZES = (10, 30, 100, 0)
CL2N_GRID = tuple(g * 1e-3 for g in DEFAULT_L2_GRID)
CANDIDATES = (
    "std val",
    "std val+",
    "std cv",
    "std cv nll",
    "std 1/n",
    "cl2n cv",
    "cl2n cv nll",
    "pstd cv",
)


def load(name: str) -> Dataset:
    if name == "elpv":
        return open_dataset("elpv")
    if name == "magnetic_tile_types":
        root = SHARED / "magnetic_tile" / "test"
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "good")
        paths, labels = [], []
        for k, c in enumerate(classes):
            files = sorted(str(f) for f in list_images(root / c))
            paths += files
            labels += [k] * len(files)
        return Dataset(name, classes, paths, np.asarray(labels, np.int64))
    return image_folder(SHARED / name)


def embeddings(ds: Dataset, work: Path) -> np.ndarray:
    """Pretrained efficientnet_lite0 FP32 embeddings ``float32[N, 1280]``, cached."""
    cache = work / f"{ds.name}.npz"
    fp = fingerprint(ds)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fp:
                return z["x"]
    from edge_tl.backbones import build
    from edge_tl.train.cache import cache_activations

    features, _ = build("efficientnet_lite0")
    t0 = time.perf_counter()
    x = cache_activations(features, ds.paths, features.spec.preprocess, None, desc=ds.name)
    print(f"  {ds.name}: {len(x)} images embedded in {time.perf_counter() - t0:.0f} s", flush=True)
    np.savez(cache, x=x, fingerprint=np.array(fp))
    return x


def _std(fit: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    m, s = fit.mean(0), fit.std(0) + 1e-6
    return lambda x: (x - m) / s


def transform(kind: str, fit: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> features`` with statistics of ``fit`` (float64)."""
    fit = fit.astype(np.float64)
    if kind == "std":
        return _std(fit)
    if kind == "pstd":
        inner = _std(power(fit, 0.5).astype(np.float64))
        return lambda x: inner(power(x, 0.5).astype(np.float64))
    if kind == "cl2n":
        c = power(fit, 0.5).mean(0)
        return lambda x: cl2n(power(x, 0.5), c).astype(np.float64)
    raise ValueError(kind)


def _acc(w: np.ndarray, b: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    return float((softmax(z @ w.T + b).argmax(1) == y).mean())


def _val_choice(zt, yt, zv, yv, k, grid) -> float:
    scores = []
    for lam in grid:
        w, b = fit_softmax(zt, yt, k, lam)
        p = softmax(zv @ w.T + b)
        acc = float((p.argmax(1) == yv).mean())
        nll = float(-np.log(p[np.arange(len(yv)), yv] + 1e-12).mean())
        scores.append((acc, -nll, lam))
    return max(scores)[2]


def candidate(name: str, x, y, parts, k, cvs: dict) -> dict[str, float]:
    """One of :data:`CANDIDATES`: test accuracy, the chosen l2 and the fit time (``cv nll``
    reuses ``cv``'s cross-validation, kept in ``cvs``, and its time)."""
    kind, rule = name.split(" ", 1)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    tv = np.sort(np.concatenate([tr, va]))
    grid = CL2N_GRID if kind == "cl2n" else DEFAULT_L2_GRID
    t0 = time.perf_counter()
    if rule == "val":  # fitted on train alone, as fit_probe_head did
        f = transform(kind, x[tr])
        lam = _val_choice(f(x[tr]), y[tr], f(x[va]), y[va], k, grid)
        w, b = fit_softmax(f(x[tr]), y[tr], k, lam)
    else:
        f = transform(kind, x[tv])
        z = f(x[tv])
        if rule == "val+":
            lam = _val_choice(f(x[tr]), y[tr], f(x[va]), y[va], k, grid)
        elif rule == "1/n":
            lam = 1.0 / len(tv)
        elif rule in ("cv", "cv nll"):
            if kind not in cvs:
                cvs[kind] = (select_l2_cv(z, y[tv], k, grid, seed=0), time.perf_counter() - t0)
            cv, t_cv = cvs[kind]
            t0 -= 0.0 if rule == "cv" else t_cv  # cv nll: the shared cross-validation counts too
            by_acc = max(range(len(cv.grid)), key=lambda i: (cv.accuracy[i], -cv.log_loss[i], -i))
            lam = cv.l2 if rule == "cv nll" else cv.grid[by_acc]
        else:
            raise ValueError(rule)
        w, b = fit_softmax(z, y[tv], k, lam)
    seconds = time.perf_counter() - t0
    return {"acc": _acc(w, b, f(x[te]), y[te]), "l2": lam, "s": seconds}


def sklearn_columns(x, y, parts) -> dict[str, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    tv = np.sort(np.concatenate([parts["train"], parts["val"]]))
    te = parts["test"]
    out = {}
    t0 = time.perf_counter()
    sc = StandardScaler().fit(x[tv])
    c1 = LogisticRegression(C=1.0, max_iter=10000).fit(sc.transform(x[tv]), y[tv])
    out["sk C=1"] = {
        "acc": float((c1.predict(sc.transform(x[te])) == y[te]).mean()),
        "s": time.perf_counter() - t0,
    }
    folds = min(5, int(np.bincount(y[tv]).min()))
    n_fold = len(tv) * (folds - 1) / folds
    t0 = time.perf_counter()
    sc = StandardScaler().fit(x[tv])
    cv = LogisticRegressionCV(
        scoring="accuracy",
        Cs=[1.0 / (lam * n_fold) for lam in DEFAULT_L2_GRID],
        cv=StratifiedKFold(folds, shuffle=True, random_state=0),
        max_iter=10000,
    ).fit(sc.transform(x[tv]), y[tv])
    out["sk CV"] = {
        "acc": float((cv.predict(sc.transform(x[te])) == y[te]).mean()),
        "C": float(np.ravel(cv.C_)[0]),
        "s": time.perf_counter() - t0,
    }
    return out


def shipped(x, y, parts, k) -> dict[str, float]:
    """``fit_probe_head`` as the library ships it, given the train and val splits."""
    from edge_tl.train.probe import fit_probe_head

    tr, va, te = parts["train"], parts["val"], parts["test"]
    t0 = time.perf_counter()
    head = fit_probe_head(x[tr], y[tr], x[va], y[va], k, 0)
    s = time.perf_counter() - t0
    acc = float((head.predict_proba(x[te]).argmax(1) == y[te]).mean())
    return {"acc": acc, "l2": head.l2, "s": s}


def cell(x, ds, size: int, columns: tuple[str, ...]) -> dict:
    parts = split(ds, SplitRecord(test_frac=0.2, val_frac=0.1, seed=0, train_per_class=size))
    k, y = len(ds.classes), ds.labels
    out = {
        "data": ds.name,
        "train_per_class": size,
        "n_train": len(parts["train"]),
        "n_val": len(parts["val"]),
        "n_test": len(parts["test"]),
    }
    out.update(sklearn_columns(x, y, parts))
    cvs: dict = {}
    for c in columns:
        out[c] = candidate(c, x, y, parts, k, cvs)
    out["fit_probe_head"] = shipped(x, y, parts, k)
    return out


def table(rows: list[dict], columns: tuple[str, ...]) -> str:
    cols = ("sk C=1", "sk CV", *columns, "fit_probe_head")
    head = f"{'per class':>9} {'train':>5} {'val':>4} {'test':>4} " + " ".join(
        f"{c:>{max(7, len(c))}}" for c in cols
    )
    lines = [head]
    for r in rows:
        size = r["train_per_class"] or "full"
        line = f"{size:>9} {r['n_train']:>5} {r['n_val']:>4} {r['n_test']:>4} "
        line += " ".join(
            f"{100 * r[c]['acc']:>{max(7, len(c))}.1f}" if c in r else f"{'-':>{max(7, len(c))}}"
            for c in cols
        )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="*", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    p.add_argument("--columns", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_probe_vs_sklearn"))
    p.add_argument("--json", type=Path, help="also write every cell here")
    p.add_argument("--fresh", action="store_true", help="recompute cached cells")
    p.add_argument(
        "--fresh-shipped",
        action="store_true",
        help="recompute only the fit_probe_head column of cached cells (after a library change)",
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # LogisticRegressionCV's 1.10 notes
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "cells.json"
    cells = json.loads(store.read_text()) if store.is_file() else {}
    if args.fresh:  # only the data sets asked for
        cells = {k: v for k, v in cells.items() if k.split("/")[0] not in args.data}
    columns = tuple(args.columns)
    rows = []
    for name in args.data:
        ds = load(name)
        x = embeddings(ds, args.work)
        for size in args.sizes:
            key = f"{name}/{size}"
            if key not in cells or any(c not in cells[key] for c in columns):
                cells[key] = cell(x, ds, size, columns)
                store.write_text(json.dumps(cells, indent=1) + "\n")
            elif args.fresh_shipped:
                parts = split(ds, SplitRecord(0.2, 0.1, 0, train_per_class=size))
                cells[key]["fit_probe_head"] = shipped(x, ds.labels, parts, len(ds.classes))
                store.write_text(json.dumps(cells, indent=1) + "\n")
            rows.append(cells[key])
        print(f"\n{name} (efficientnet_lite0 FP32; split test 0.2 / val 0.1, seed 0; test acc %)")
        print(table([r for r in rows if r["data"] == ds.name], columns))
    print("\nfit seconds (one run, this machine), full training split:")
    for r in rows:
        if r["train_per_class"] == 0:
            times = {c: r[c]["s"] for c in ("sk C=1", "sk CV", *columns, "fit_probe_head")}
            print(f"  {r['data']}: " + ", ".join(f"{c} {s:.2f}" for c, s in times.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
