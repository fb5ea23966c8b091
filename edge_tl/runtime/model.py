"""A loaded bundle: verified files, the engine, preprocessing and the head.

The head is the current learned head state (``heads/``, see :mod:`edge_tl.runtime.learner`)
when there is one, else the head the bundle was exported with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.bundle import read_manifest
from edge_tl.data import Dataset, image_folder
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime import anomaly, learner, patchcore
from edge_tl.runtime.anomaly import AnomalyState, AnomalyStore
from edge_tl.runtime.engine import Engine, make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.learner import UNKNOWN, HeadState, HeadStore
from edge_tl.runtime.preprocess import ImageLike, batch_inputs, load_image, to_input
from edge_tl.runtime.selftest import enforce, run_self_test
from edge_tl.spec import EMBEDDING, Manifest

SupportLike = str | Path | Dataset | dict[str, list[ImageLike]]
ORT_SPINNING = "session.intra_op.allow_spinning"


class Model:
    """A bundle ready to run: ``embed``, ``predict`` and ``evaluate``.

    Example:
        >>> model = Model("bundles/neu_int8")  # doctest: +SKIP
        >>> model.predict(["part_0001.jpg"])[0]["label"]  # doctest: +SKIP
        'scratches'
    """

    def __init__(
        self,
        bundle: str | Path,
        verify: bool = True,
        threads: int = 0,
        self_test: bool = True,
        device: str | None = None,
    ) -> None:
        """Open a bundle: check file hashes (``verify``), load the engine and run the bundle's
        self-test on this host (``self_test``; refuses or warns as the recipe said).

        ``device``: ONNX Runtime execution providers (comma-separated, in order) or an
        OpenVINO device string; default CPU. The current learned head, if any, is loaded.
        """
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        artifact = self.manifest.artifact
        if artifact.format == "onnx" and (self.path / anomaly.ANOMALY_DIR / "CURRENT").is_file():
            # scoring alternates the engine with numpy's search: ORT threads that spin
            # after a run take the CPU from it (38 -> 18 ms per image on 2 cores)
            options = {**artifact.engine_options, ORT_SPINNING: "0"}
            artifact = replace(artifact, engine_options=options)
        self.engine: Engine = make_engine(self.path, artifact, threads, device)
        self.self_test = run_self_test(self.path, self.manifest, self.engine) if self_test else None
        enforce(self.path, self.self_test)
        self.store = HeadStore(self.path, self.manifest)
        self.state: HeadState | None = self.store.load() or self._exported_head()
        self.anomaly_store = AnomalyStore(self.path, self.manifest)

    def _exported_head(self) -> HeadState | None:
        head = self.manifest.head
        if not head:
            return None
        exemplars = head.get("exemplars")
        return learner.workstation_state(
            LinearHead.load(self.path / head["file"]),
            self.manifest.labels,
            self.path / exemplars if exemplars else None,
        )

    @property
    def labels(self) -> list[str]:
        """The classes the current head knows."""
        return self.state.labels if self.state is not None else self.manifest.labels

    @property
    def head(self) -> HeadState | None:
        return self.state

    def embed(
        self, images: Sequence[ImageLike], batch_size: int = 16, desc: str | None = None
    ) -> np.ndarray:
        """Pooled embeddings ``float32[N, D]`` of image files or PIL images."""
        out = [o[EMBEDDING] for o in self._batches(images, (EMBEDDING,), batch_size, desc)]
        dim = self.manifest.outputs[EMBEDDING][-1]
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def _batches(
        self,
        images: Sequence[ImageLike],
        outputs: tuple[str, ...],
        batch_size: int,
        desc: str | None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The engine's ``outputs`` for ``images``, ``batch_size`` at a time."""
        pre = self.manifest.preprocess
        starts = range(0, len(images), batch_size)
        for i in progress(starts, desc=desc) if desc else starts:
            yield self.engine.run(batch_inputs(images[i : i + batch_size], pre), outputs)

    def _require_head(self) -> HeadState:
        if self.state is None:
            raise EdgeTLError(
                f"bundle {self.path} has no head; learn one with `edge-tl learn "
                f"{self.path} DATA`, or export the bundle from a trained run"
            )
        return self.state

    def classify(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(proba[N, K], predicted index[N], similarity[N] or None)`` for embeddings;
        index ``-1`` is unknown (similarity to the predicted class below the threshold)."""
        state = self._require_head()
        proba = state.predict_proba(emb)
        pred = proba.argmax(1)
        sim = state.similarity(emb, pred)
        thr = state.threshold
        if sim is not None and thr is not None:
            pred = np.where(sim >= thr, pred, -1)
        return proba, pred, sim

    def predict(self, images: Sequence[ImageLike], top_k: int = 1) -> list[dict[str, Any]]:
        """Label, score and top-k per image (one at a time, batch 1, as a camera would)."""
        state = self._require_head()
        if top_k < 1:
            raise EdgeTLError(f"--top-k must be at least 1, not {top_k}")
        results = []
        for src in images:
            x = to_input(load_image(src), self.manifest.preprocess)[None]
            probas, pred, sim = self.classify(self.engine.run(x, (EMBEDDING,))[EMBEDDING])
            proba = probas[0]
            order = np.argsort(-proba)[:top_k]
            results.append(
                {
                    "image": str(src) if not hasattr(src, "size") else "<image>",
                    "label": UNKNOWN if pred[0] < 0 else self.labels[order[0]],
                    "score": float(proba[order[0]]),
                    "similarity": None if sim is None else round(float(sim[0]), 4),
                    "threshold": None if state.threshold is None else round(state.threshold, 4),
                    "top_k": [{"label": self.labels[i], "score": float(proba[i])} for i in order],
                }
            )
        return results

    def evaluate(self, ds: Dataset, batch_size: int = 16) -> dict[str, Any]:
        """Accuracy (a fraction in [0, 1]), per-class accuracy and the confusion matrix.

        ``ds``'s class names must be among the bundle's labels.
        """
        state = self._require_head()
        unknown = [c for c in ds.classes if c not in self.labels]
        if unknown:
            raise EdgeTLError(
                f"class folder(s) {', '.join(unknown)} are not labels of this bundle "
                f"({', '.join(self.labels[:10])}{'...' if len(self.labels) > 10 else ''}); "
                "rename or remove them"
            )
        if len(ds) == 0:
            raise EdgeTLError("nothing to evaluate: the data set is empty")
        y = np.asarray([self.labels.index(ds.classes[i]) for i in ds.labels])
        t0 = time.perf_counter()
        _, pred, _ = self.classify(self.embed(ds.paths, batch_size, desc="evaluating"))
        seconds = time.perf_counter() - t0
        k = len(self.labels)
        cm = np.zeros((k, k), np.int64)
        known = pred >= 0
        np.add.at(cm, (y[known], pred[known]), 1)
        present = sorted(set(y.tolist()))
        per_class = {
            self.labels[c]: {"accuracy": float(cm[c, c] / (y == c).sum()), "n": int((y == c).sum())}
            for c in present
        }
        return {
            "accuracy": float((pred == y).mean()),
            "n": int(len(y)),
            "unknown_rate": float((~known).mean()),
            "head": state.summary(),
            "per_class": per_class,
            "labels": [self.labels[c] for c in present],
            "confusion_matrix": cm[np.ix_(present, present)].tolist(),
            "seconds": round(seconds, 2),
            "bundle": str(self.path),
            "artifact": f"{self.manifest.artifact.format}-{self.manifest.artifact.precision}",
        }

    # ---- on-device learning (each call writes a new head version) ---------------------
    def _support(self, data: SupportLike, desc: str = "embedding support images"):
        if isinstance(data, Dataset):
            ds = data
        elif isinstance(data, dict):
            names = [n for n, imgs in data.items() for _ in imgs]
            paths = [p for imgs in data.values() for p in imgs]
            empty = [n for n, imgs in data.items() if not imgs]
            if empty:
                raise EdgeTLError(f"class {empty[0]!r} has no images; add images or drop it")
            return self.embed(paths, desc=desc), names
        else:
            ds = image_folder(data)
        return self.embed(ds.paths, desc=desc), [ds.classes[i] for i in ds.labels]

    def learn(
        self,
        data: SupportLike,
        head: str = learner.DEFAULT_HEAD,
        quantile: float | None = learner.DEFAULT_QUANTILE,
        k: int = 1,
    ) -> HeadState:
        """Learn a new head from support images: an ImageFolder path, a
        :class:`~edge_tl.data.Dataset`, or ``{class name: [images]}``. Replaces the current
        head (the previous one stays as a version for :meth:`rollback`)."""
        x, names = self._support(data)
        return self._commit(learner.learn(x, names, head, quantile, k), "learn")

    def add(self, data: SupportLike) -> HeadState:
        """Add examples and classes to the current head (or to the exported head)."""
        state = self._require_head()
        x, names = self._support(data)
        return self._commit(learner.add(state, x, names), "add")

    def add_class(self, name: str, images: list[ImageLike]) -> HeadState:
        """Teach one new class from a few images."""
        if name in self.labels:
            raise EdgeTLError(
                f"the head already has a class {name!r}; use add() to give it more examples"
            )
        return self.add({name: list(images)})

    def remove_class(self, name: str) -> HeadState:
        return self._commit(learner.remove(self._require_head(), name), f"remove {name}")

    def relabel(self, old: str, new: str) -> HeadState:
        return self._commit(learner.relabel(self._require_head(), old, new), f"relabel {old}")

    def set_threshold(
        self, threshold: float | None = None, quantile: float | None = learner.DEFAULT_QUANTILE
    ) -> HeadState:
        """Open set: a fixed similarity ``threshold``, or the leave-one-out ``quantile``
        (``None`` for both turns rejection off)."""
        state = replace(
            self._require_head(), quantile=quantile, threshold_override=threshold, meta={}
        )
        return self._commit(state, "threshold")

    def import_head(self, path: str | Path) -> HeadState:
        """Adopt a head state learned elsewhere on the same backbone (e.g. another camera)."""
        return self._commit(self.store.read(Path(path)), "import")

    def rollback(self, to: int | None = None) -> HeadState:
        """Go back to an earlier head version (default: the one before the current)."""
        self.state = self.store.rollback(to)
        return self.state

    def head_history(self) -> list[dict[str, Any]]:
        return self.store.history()

    def _commit(self, state: HeadState, op: str) -> HeadState:
        self.state = self.store.save(state, op)
        return self.state

    # ---- anomaly detection from good images (each change writes a new bank version) ---
    @property
    def anomaly_state(self) -> AnomalyState | None:
        """The current anomaly bank, or None (``edge-tl anomaly BUNDLE GOOD_DIR`` builds one)."""
        if not hasattr(self, "_anomaly"):
            self._anomaly = self.anomaly_store.load()
        return self._anomaly

    def patch_features(
        self,
        images: Sequence[ImageLike],
        stages: tuple[str, ...] = anomaly.DEFAULT_STAGES,
        pool: int = anomaly.DEFAULT_POOL,
        batch_size: int = 16,
        desc: str | None = None,
    ) -> np.ndarray:
        """``float32[N, H*W, C]`` locally aware patch features (see :mod:`.patchcore`)."""
        missing = [s for s in stages if s not in self.manifest.outputs]
        if missing:
            raise EdgeTLError(
                f"bundle {self.path} has no {', '.join(missing)} output (it has "
                f"{', '.join(self.manifest.outputs)}); re-export it with `edge-tl export`"
            )
        out = [
            patchcore.patch_features(o, stages, pool)
            for o in self._batches(images, stages, batch_size, desc)
        ]
        return np.concatenate(out)

    def _grid(self, stages: tuple[str, ...]) -> tuple[int, int]:
        shape = self.manifest.outputs[stages[0]]
        return int(shape[-2]), int(shape[-1])

    def _require_bank(self) -> AnomalyState:
        if self.anomaly_state is None:
            raise EdgeTLError(
                f"bundle {self.path} has no anomaly bank; build one from good images with "
                f"`edge-tl anomaly {self.path} GOOD_DIR`"
            )
        return self.anomaly_state

    def fit_anomaly(
        self,
        good: str | Path | Sequence[ImageLike],
        stages: tuple[str, ...] = anomaly.DEFAULT_STAGES,
        pool: int = anomaly.DEFAULT_POOL,
        coreset: float = anomaly.DEFAULT_CORESET,
        max_mb: float = anomaly.DEFAULT_MAX_MB,
        false_alarm: float = anomaly.DEFAULT_FALSE_ALARM,
    ) -> AnomalyState:
        """Build a new anomaly bank from good images (a folder, MVTec ``train/good``, or a
        list); the previous bank stays as a version for :meth:`rollback_anomaly`."""
        anomaly.check_settings(coreset, max_mb, false_alarm)
        paths = anomaly.good_images(good) if isinstance(good, (str, Path)) else list(good)
        feats = self.patch_features(paths, stages, pool, desc="patch features of good images")
        state = anomaly.build(feats, self._grid(stages), stages, pool, coreset, max_mb, false_alarm)
        return self._commit_bank(state, "build")

    def add_good(self, good: str | Path | Sequence[ImageLike]) -> AnomalyState:
        """Grow the bank with new good images and re-calibrate its threshold."""
        state = self._require_bank()
        paths = anomaly.good_images(good) if isinstance(good, (str, Path)) else list(good)
        feats = self.patch_features(paths, state.stages, state.pool, desc="patch features")
        return self._commit_bank(anomaly.add(state, feats), "add")

    def set_false_alarm(self, false_alarm: float) -> AnomalyState:
        """Re-calibrate the threshold for another false-alarm rate on good parts."""
        state = self._require_bank()
        anomaly.check_settings(state.coreset, state.max_mb, false_alarm)
        return self._commit_bank(replace(state, false_alarm=false_alarm, meta={}), "threshold")

    def rollback_anomaly(self, to: int | None = None) -> AnomalyState:
        self._anomaly = self.anomaly_store.rollback(to)
        return self._anomaly

    def _commit_bank(self, state: AnomalyState, op: str) -> AnomalyState:
        self._anomaly = self.anomaly_store.save(state, op)
        return self._anomaly

    def score(self, images: Sequence[ImageLike], maps: bool = False) -> list[dict[str, Any]]:
        """Anomaly score, threshold and verdict per image (batch 1, as a camera would);
        with ``maps``, the anomaly map resized to the image (``float32[H, W]``, in units
        of the good images' spread; above ``threshold`` is anomalous)."""
        state = self._require_bank()
        thr = state.threshold
        out = []
        for src in images:
            img = load_image(src)
            x = to_input(img, self.manifest.preprocess)[None]
            feats = patchcore.patch_features(
                self.engine.run(x, state.stages), state.stages, state.pool
            )
            with patchcore.one_blas_thread():
                s, m = state.score(feats)
            r: dict[str, Any] = {
                "image": str(src) if not hasattr(src, "size") else "<image>",
                "score": round(float(s[0]), 4),
                "threshold": round(thr, 4),
                "verdict": anomaly.ANOMALOUS if s[0] > thr else anomaly.GOOD,
            }
            if maps:
                r["map"] = patchcore.resize_map(m[0], img.size)
                r["pil"] = img
            out.append(r)
        return out

    def evaluate_anomaly(
        self, folder: str | Path, maps_dir: str | Path | None = None, batch_size: int = 16
    ) -> dict[str, Any]:
        """Image AUROC, pixel AUROC (when masks exist), F1 and false-alarm rate at the stored
        threshold on an MVTec-layout folder; ``maps_dir`` gets one overlay PNG per image."""
        state = self._require_bank()
        items = anomaly.mvtec_test(folder)
        paths = [it.path for it in items]
        y = np.array([it.defect != anomaly.GOOD for it in items], np.int64)
        t0 = time.perf_counter()
        scores, grids = [], []
        for feats in self._batches(paths, state.stages, batch_size, "scoring"):
            s, m = state.score(patchcore.patch_features(feats, state.stages, state.pool))
            scores.append(s)
            grids.append(m)
        seconds = time.perf_counter() - t0
        score, grid = np.concatenate(scores), np.concatenate(grids)
        thr = state.threshold
        has_masks = any(it.mask for it in items)
        pix = anomaly.PixelAuroc(float(grid.min()), float(grid.max())) if has_masks else None
        if maps_dir is not None:
            maps_dir = Path(maps_dir)
            maps_dir.mkdir(parents=True, exist_ok=True)
        if pix is not None or maps_dir is not None:
            for it, g, s in zip(items, grid, score, strict=True):
                img = load_image(it.path)
                up = patchcore.resize_map(g, img.size)
                mask = anomaly.load_mask(it.mask) if it.mask else None
                if pix is not None:
                    pix.update(up, mask)
                if maps_dir is not None:
                    name = f"{it.defect}_{Path(it.path).stem}.png"
                    anomaly.overlay(img, up, thr, float(s), mask).save(maps_dir / name)
        per_defect = {
            d: round(patchcore.auroc(score[sel], y[sel]), 4)
            for d in sorted({it.defect for it in items} - {anomaly.GOOD})
            for sel in [np.array([it.defect in (d, anomaly.GOOD) for it in items])]
        }
        return {
            "image_auroc": round(patchcore.auroc(score, y), 4),
            "pixel_auroc": None if pix is None else round(pix.value() or float("nan"), 4),
            **anomaly.at_threshold(score, y, thr),
            "threshold": round(thr, 4),
            "target_false_alarm": state.false_alarm,
            "n_good": int((y == 0).sum()),
            "n_defective": int(y.sum()),
            "per_defect_auroc": per_defect,
            "bank": state.summary(),
            "ms_per_image": round(1000 * seconds / len(items), 1),
            "maps": None if maps_dir is None else str(maps_dir),
            "bundle": str(self.path),
            "artifact": f"{self.manifest.artifact.format}-{self.manifest.artifact.precision}",
        }
