"""A loaded bundle: verified files, the engine, preprocessing and the head."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.bundle import read_manifest
from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.engine import Engine, make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.preprocess import ImageLike, batch_inputs, load_image, to_input
from edge_tl.runtime.selftest import enforce, run_self_test
from edge_tl.spec import EMBEDDING, Manifest


class Model:
    """A bundle ready to run: ``embed``, ``predict`` and ``evaluate``.

    Example:
        >>> model = Model("bundles/neu_int8")  # doctest: +SKIP
        >>> model.predict(["part_0001.jpg"])[0]["label"]  # doctest: +SKIP
        'scratches'
    """

    def __init__(
        self, bundle: str | Path, verify: bool = True, threads: int = 0, self_test: bool = True
    ) -> None:
        """Open a bundle: check file hashes (``verify``), load the engine and run the bundle's
        self-test on this host (``self_test``; refuses or warns as the recipe said)."""
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        self.engine: Engine = make_engine(self.path, self.manifest.artifact, threads)
        self.self_test = run_self_test(self.path, self.manifest, self.engine) if self_test else None
        enforce(self.path, self.self_test)
        head = self.manifest.head
        self.head = LinearHead.load(self.path / head["file"]) if head else None

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def embed(
        self, images: Sequence[ImageLike], batch_size: int = 16, desc: str | None = None
    ) -> np.ndarray:
        """Pooled embeddings ``float32[N, D]`` of image files or PIL images."""
        pre = self.manifest.preprocess
        starts = range(0, len(images), batch_size)
        it = progress(starts, desc=desc) if desc else starts
        out = [
            self.engine.run(batch_inputs(images[i : i + batch_size], pre), (EMBEDDING,))[EMBEDDING]
            for i in it
        ]
        dim = self.manifest.outputs[EMBEDDING][-1]
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def _require_head(self) -> LinearHead:
        if self.head is None:
            raise EdgeTLError(
                f"bundle {self.path} has no head; export it from a trained run, or learn one"
            )
        return self.head

    def predict(self, images: Sequence[ImageLike], top_k: int = 1) -> list[dict[str, Any]]:
        """Label, score and top-k per image (one at a time, batch 1, as a camera would)."""
        head = self._require_head()
        if top_k < 1:
            raise EdgeTLError(f"--top-k must be at least 1, not {top_k}")
        results = []
        for src in images:
            x = to_input(load_image(src), self.manifest.preprocess)[None]
            proba = head.predict_proba(self.engine.run(x, (EMBEDDING,))[EMBEDDING])[0]
            order = np.argsort(-proba)[:top_k]
            results.append(
                {
                    "image": str(src) if not hasattr(src, "size") else "<image>",
                    "label": self.labels[order[0]],
                    "score": float(proba[order[0]]),
                    "top_k": [{"label": self.labels[i], "score": float(proba[i])} for i in order],
                }
            )
        return results

    def evaluate(self, ds: Dataset, batch_size: int = 16) -> dict[str, Any]:
        """Accuracy (a fraction in [0, 1]), per-class accuracy and the confusion matrix.

        ``ds``'s class names must be among the bundle's labels.
        """
        head = self._require_head()
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
        pred = head.predict_proba(self.embed(ds.paths, batch_size, desc="evaluating")).argmax(1)
        seconds = time.perf_counter() - t0
        k = len(self.labels)
        cm = np.zeros((k, k), np.int64)
        np.add.at(cm, (y, pred), 1)
        present = sorted(set(y.tolist()))
        per_class = {
            self.labels[c]: {"accuracy": float(cm[c, c] / cm[c].sum()), "n": int(cm[c].sum())}
            for c in present
        }
        return {
            "accuracy": float((pred == y).mean()),
            "n": int(len(y)),
            "per_class": per_class,
            "labels": [self.labels[c] for c in present],
            "confusion_matrix": cm[np.ix_(present, present)].tolist(),
            "seconds": round(seconds, 2),
            "bundle": str(self.path),
            "artifact": f"{self.manifest.artifact.format}-{self.manifest.artifact.precision}",
        }
