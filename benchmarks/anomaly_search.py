"""The anomaly bank's nearest-neighbour search, candidates side by side in one run: latency
at batch 1 next to the engine, and image / pixel AUROC against the exact search.

On ``../shared/data/magnetic_tile`` with the pretrained EfficientNet-Lite0 exported as ORT
INT8 (calibrated on ``train/good``), the default bank (stride-16 features, k-centre 50 %:
66,542 patches of 112 half-precision floats) built by ``edge_tl.runtime.anomaly.build``.
Each candidate replaces the bank search inside the shipped scoring loop (the search on one
BLAS thread, as ``AnomalyDetector.predict`` runs it):

- ``exact (before)``: the previous exact search (product, ``*= -2``, ``+= |b|^2``, min);
- ``exact``: the shipped exact search, norms folded into the product (``--search exact``);
- ``fast``: the shipped inverted lists (k-means, ``LIST_SIZE`` patches a list, exact
  distances to every patch of the ``nprobe`` nearest lists; the default);
- ``pca32 + top-8 exact``: a 32-d PCA prefilter, the 8 nearest candidates re-ranked exactly;
- ``float16 bank`` / ``int8 bank``: numpy products in those types (no BLAS for them);
- ``hnswlib`` / ``faiss`` (when importable: ``pip install hnswlib faiss-cpu``): HNSW graphs
  and faiss's flat and IVF indexes, one thread.

The search parameter (``nprobe``) is chosen on the good training images alone: a bank built
on half of ``train/good``, the other half as queries, the distance error against exact.

    .venv/bin/python benchmarks/anomaly_search.py [--work /tmp/edge_tl_anomaly] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from magnetic_tile import DATA, Test, bundle  # noqa: E402

from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime import anomaly as an  # noqa: E402
from edge_tl.runtime import evaluation as ev  # noqa: E402
from edge_tl.runtime import patchcore as pc  # noqa: E402
from edge_tl.runtime import search as bs  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs, load_image, to_input  # noqa: E402

STAGE = ("features_s16",)

Search = Callable[[np.ndarray], np.ndarray]


def features(path: Path, paths: list[str], work: Path, tag: str) -> np.ndarray:
    """Stride-16 patch features ``float32[N, 196, 112]`` (the outputs cached as float16)."""
    cache = work / f"{path.name}.{tag}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            o = z[STAGE[0]]
    else:
        model = Model(path)
        parts = [
            model.engine.run(batch_inputs(paths[i : i + 16], model.manifest.preprocess), STAGE)[
                STAGE[0]
            ].astype(np.float16)
            for i in range(0, len(paths), 16)
        ]
        o = np.concatenate(parts)
        np.savez(cache, **{STAGE[0]: o})
    return pc.patch_features({STAGE[0]: o.astype(np.float32)}, STAGE, an.DEFAULT_POOL)


# ---- candidates: each gives squared distances float32[M] of standardised rows -----------
def candidates(bank: np.ndarray) -> dict[str, tuple[Search, float]]:
    """``name -> (search, seconds to prepare it)``."""
    out: dict[str, tuple[Search, float]] = {}

    def timed(name: str, make: Callable[[], Search]) -> None:
        t0 = time.perf_counter()
        f = make()
        out[name] = (f, time.perf_counter() - t0)

    bank_sq = np.einsum("ij,ij->i", bank, bank)
    timed("exact (before)", lambda: lambda q: pc.nearest(q, bank, bank_sq))
    aug = bs.augmented(bank)
    timed("exact", lambda: lambda q: bs.exact(q, aug))
    index = bs.BankIndex(bank)
    for nprobe in (2, 4, 6, 8, 12):
        timed(f"fast, nprobe {nprobe}", lambda n=nprobe: lambda q: index.nearest(q, n))

    def pca(dim: int = 32, top: int = 8) -> Search:
        mu = bank.mean(0)
        _, _, vt = np.linalg.svd(bank - mu, full_matrices=False)
        v = vt[:dim].T.astype(np.float32)
        low = bs.augmented((bank - mu) @ v)

        def f(q: np.ndarray) -> np.ndarray:
            ql = (q - mu) @ v
            g = np.concatenate([ql, np.ones((len(q), 1), np.float32)], 1) @ low
            cand = np.argpartition(-g, top - 1, axis=1)[:, :top]
            diff = bank[cand] - q[:, None]
            return np.einsum("ijk,ijk->ij", diff, diff).min(1)

        return f

    timed("pca32 + top-8 exact", pca)
    b16 = bank.astype(np.float16)
    timed(
        "float16 bank",
        lambda: (
            lambda q: np.maximum(
                np.einsum("ij,ij->i", q, q)[:, None]
                + (bank_sq - 2 * (q.astype(np.float16) @ b16.T).astype(np.float32)),
                0,
            ).min(1)
        ),
    )
    scale8 = np.abs(bank).max() / 127
    b8 = np.round(bank / scale8).astype(np.int8)
    timed(
        "int8 bank",
        lambda: (
            lambda q: np.maximum(
                np.einsum("ij,ij->i", q, q)[:, None]
                + bank_sq
                - 2
                * scale8
                * scale8
                * (np.round(q / scale8).astype(np.int32) @ b8.T.astype(np.int32)),
                0,
            ).min(1)
        ),
    )
    try:
        import hnswlib

        def hnsw() -> Search:
            ix = hnswlib.Index("l2", bank.shape[1])
            ix.init_index(len(bank), M=16, ef_construction=100, random_seed=0)
            ix.add_items(bank, num_threads=1)
            ix.set_num_threads(1)
            return ix

        ix = hnsw()
        for ef in (16, 32):

            def hq(q: np.ndarray, ef: int = ef) -> np.ndarray:
                ix.set_ef(ef)
                return ix.knn_query(q, k=1, num_threads=1)[1][:, 0]

            timed(f"hnswlib ef {ef}", lambda f=hq: f)
    except ImportError:
        print("  (hnswlib not installed: skipped)")
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        flat = faiss.IndexFlatL2(bank.shape[1])
        flat.add(bank)
        timed("faiss flat", lambda: lambda q: flat.search(q, 1)[0][:, 0])
        h = faiss.IndexHNSWFlat(bank.shape[1], 16)
        h.add(bank)
        h.hnsw.efSearch = 32
        timed("faiss hnsw ef 32", lambda: lambda q: h.search(q, 1)[0][:, 0])
        lists = index.lists
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], lists)
        ivf.train(bank)
        ivf.add(bank)
        ivf.nprobe = bs.DEFAULT_NPROBE
        timed(f"faiss ivf nprobe {bs.DEFAULT_NPROBE}", lambda: lambda q: ivf.search(q, 1)[0][:, 0])
    except ImportError:
        print("  (faiss not installed: skipped)")
    return out


SLOW = ("float16 bank", "int8 bank")
"""Candidates timed on a few images only (no BLAS: seconds per image)."""


# ---- measurements -------------------------------------------------------------------
def choose_nprobe(train: np.ndarray) -> dict:
    """Distance error of the fast search against exact with a bank of half the good
    training images and the other half as queries (no test image involved)."""
    half = len(train) // 2
    state = an.build(train[:half], (14, 14))
    q = state.standardise(train[half:]).reshape(-1, train.shape[-1])
    ex = np.sqrt(state.nearest(q, "exact"))
    index = bs.BankIndex(state.bank)
    out = {}
    for nprobe in (2, 4, 6, 8, 12, 16):
        d = np.sqrt(index.nearest(q, nprobe))
        out[nprobe] = {
            "exact_share": float(np.mean(d <= ex * (1 + 1e-5) + 1e-6)),
            "mean_rel_error": float(np.mean((d - ex) / np.maximum(ex, 1e-6))),
            "p99_rel_error": float(np.quantile((d - ex) / np.maximum(ex, 1e-6), 0.99)),
        }
    return {"lists": index.lists, "by_nprobe": out}


def latency(
    model: Model, state: an.AnomalyState, search: Search, images: list[str], repeats: int
) -> dict:
    pre = model.manifest.preprocess
    parts: dict[str, list[float]] = {"decode": [], "engine": [], "search": [], "map": []}
    part = {"resize": []}
    for _ in range(repeats):
        for p in images:
            t0 = time.perf_counter()
            img = load_image(p)
            x = to_input(img, pre)[None]
            t1 = time.perf_counter()
            o = model.engine.run(x, state.stages)
            t2 = time.perf_counter()
            with pc.one_blas_thread():
                f = pc.patch_features(o, state.stages, state.pool)
                q = state.standardise(f.reshape(-1, f.shape[-1]))
                d = search(q)
                t3 = time.perf_counter()
                m = state.normalise(pc.blur(np.sqrt(d).reshape(1, *state.grid), state.sigma))
                m.reshape(1, -1).max(1)
            t4 = time.perf_counter()
            pc.resize_map(m[0], img.size)
            t5 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[k].append(v * 1e3)
            part["resize"].append((t5 - t4) * 1e3)
    r = {k: float(np.median(v)) for k, v in {**parts, **part}.items()}
    r["search_map"] = r["search"] + r["map"]
    r["total"] = r["decode"] + r["engine"] + r["search_map"] + r["resize"]
    return r


def engine_alone(model: Model, images: list[str], repeats: int) -> float:
    pre = model.manifest.preprocess
    out = []
    for _ in range(repeats):
        for p in images:
            x = to_input(load_image(p), pre)[None]
            t0 = time.perf_counter()
            model.engine.run(x, STAGE)
            out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def accuracy(
    state: an.AnomalyState, search: Search, test_f: np.ndarray, test: Test, lo_hi
) -> tuple[dict, np.ndarray]:
    q = state.standardise(test_f.reshape(-1, test_f.shape[-1]))
    d2 = np.concatenate([search(q[i : i + 3136]) for i in range(0, len(q), 3136)])
    dist = pc.blur(np.sqrt(d2).reshape(len(test_f), *state.grid), state.sigma)
    maps = state.normalise(dist)
    scores = maps.reshape(len(maps), -1).max(1)
    lo, hi = lo_hi or (float(maps.min()), float(maps.max()))
    far = ev.at_threshold(scores, test.y, state.threshold)["false_alarm_rate"]
    return {
        "image_auroc": ev.auroc(scores, test.y),
        "pixel_auroc": test.pixel_auroc(maps, (lo, hi)),
        "false_alarm_rate": far,
        "lo": lo,
        "hi": hi,
    }, d2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly"))
    ap.add_argument("--images", type=int, default=40, help="test images timed at batch 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path = bundle(args.work)
    train_paths, _ = an.good_images(DATA)
    test = Test()
    train = features(path, train_paths, args.work, "train")
    test_f = features(path, test.paths, args.work, "test")
    res: dict = {"choose_nprobe_on_train": choose_nprobe(train)}
    state = an.build(train, (14, 14))
    res["bank_patches"] = len(state.bank)
    Model(path, self_test=False).detector.store.save(state, "build")
    model = Model(path)  # a bundle with a bank: the engine opened as shipped (no spinning)
    images = test.paths[:: len(test.paths) // args.images][: args.images]
    cands = candidates(state.bank.astype(np.float32))  # kept in half precision
    exact_search = cands["exact"][0]
    ex_acc, ex_d = accuracy(state, exact_search, test_f, test, None)
    lo_hi = (ex_acc.pop("lo"), ex_acc.pop("hi"))
    res["engine_alone"] = engine_alone(model, images[:20], args.repeats)
    res["candidates"] = {}
    for name, (search, prep_s) in cands.items():
        slow = name in SLOW
        print(f"  {name}", flush=True)
        r = latency(
            model, state, search, images[:2] if slow else images, 1 if slow else args.repeats
        )
        r["prepare_s"] = prep_s
        if not slow:
            acc, d = accuracy(state, search, test_f, test, lo_hi)
            err = (np.sqrt(d) - np.sqrt(ex_d)) / np.maximum(np.sqrt(ex_d), 1e-6)
            r.update({k: v for k, v in acc.items() if k not in ("lo", "hi")})
            r["exact_share"] = float(np.mean(np.abs(err) <= 1e-4))
            r["mean_rel_error"] = float(err.mean())
            r["d_image_auroc"] = acc["image_auroc"] - ex_acc["image_auroc"]
            r["d_pixel_auroc"] = acc["pixel_auroc"] - ex_acc["pixel_auroc"]
        res["candidates"][name] = r
    res["engine_alone_after"] = engine_alone(model, images[:20], args.repeats)

    ch = res["choose_nprobe_on_train"]
    print(f"\nnprobe on train/good (bank of half, other half as queries; {ch['lists']} lists)")
    print("| nprobe | exact share | mean rel. error | p99 rel. error |")
    print("|---|---|---|---|")
    for k, v in ch["by_nprobe"].items():
        print(
            f"| {k} | {v['exact_share']:.3f} | {v['mean_rel_error']:.2e} | "
            f"{v['p99_rel_error']:.2e} |"
        )
    eng = (res["engine_alone"] + res["engine_alone_after"]) / 2
    print(
        f"\nbatch 1, INT8, bank {res['bank_patches']} patches, median ms over "
        f"{args.images} test images x {args.repeats}; engine alone {eng:.2f} ms "
        f"(before {res['engine_alone']:.2f}, after {res['engine_alone_after']:.2f})"
    )
    print(
        "| search | decode | engine | search | map | search+map | to image | total "
        "| (search+map) / engine alone | image AUROC | pixel AUROC | false alarms "
        "| exact share | d image | d pixel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res["candidates"].items():
        acc = (
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['false_alarm_rate']:.1%} | "
            f"{r['exact_share']:.3f} | {r['d_image_auroc']:+.4f} | {r['d_pixel_auroc']:+.4f}"
            if "image_auroc" in r
            else "- | - | - | - | - | -"
        )
        print(
            f"| {name} | {r['decode']:.2f} | {r['engine']:.2f} | {r['search']:.2f} | "
            f"{r['map']:.2f} | {r['search_map']:.2f} | {r['resize']:.2f} | {r['total']:.2f} | "
            f"{r['search_map'] / eng:.2f} | {acc} |"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
