"""Is the artifact still the model? Measurement on the user's own images.

Embedding cosine (mean and min per image) against FP32 PyTorch, top-1 agreement, accuracy
with a given head, per-class accuracy, size, and batch-1 latency interleaved across
models. Also the images themselves (decoded once, kept as resized ``uint8`` pixels) and the
head that ships with an artifact (:class:`HeadFit`). What these numbers decide is
:mod:`edge_tl.export.accuracy_control`; how they are written down is :mod:`edge_tl.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_tl.progress import progress, step
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.preprocess import load_image, normalise_pixels, to_pixels
from edge_tl.spec import EMBEDDING, Preprocess

__all__ = [
    "Agreement",
    "HeadFit",
    "Images",
    "Runner",
    "accuracy",
    "agreement",
    "cosine",
    "embed",
    "engine_runner",
    "latency_ms",
    "per_class",
    "torch_runner",
    "torch_size_mb",
]

Runner = Callable[[np.ndarray], np.ndarray]
"""``float32[N, 3, H, W]`` network inputs -> ``float32[N, D]`` pooled embeddings."""


@dataclass
class Images:
    """Images decoded once and kept as resized ``uint8`` pixels (a quarter of float32)."""

    paths: list[str]
    pre: Preprocess
    labels: np.ndarray | None = None
    desc: str | None = None  # progress bar label; None decodes silently
    pixels: np.ndarray | None = field(default=None, repr=False)
    """``uint8[N, 3, S, S]``; given (decoded earlier, e.g. by the export cache) or decoded
    here."""

    def __post_init__(self) -> None:
        if self.pixels is not None:
            return
        paths = progress(self.paths, desc=self.desc) if self.desc else self.paths
        self.pixels = np.stack([to_pixels(load_image(p), self.pre) for p in paths])

    def inputs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Network inputs ``float32[n, 3, S, S]`` of images ``start:stop``."""
        return normalise_pixels(self.pixels[start:stop], self.pre)

    def __len__(self) -> int:
        return len(self.paths)


def embed(run: Runner, images: Images, batch: int = 32, desc: str | None = None) -> np.ndarray:
    """Pooled embeddings ``float32[N, D]`` of ``images`` through ``run``; ``desc`` draws a
    progress bar."""
    starts = range(0, len(images), batch)
    return np.concatenate(
        [
            run(images.inputs(i, i + batch))
            for i in (progress(starts, desc=desc) if desc else starts)
        ]
    ).astype(np.float32)


def engine_runner(engine: Any) -> Runner:
    """The engine's ``embedding`` output as a :data:`Runner`."""
    return lambda x: engine.run(x, (EMBEDDING,))[EMBEDDING]


def torch_runner(features: Any) -> Runner:
    """FP32 PyTorch embeddings (the reference every artifact is measured against)."""
    import torch

    features = features.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return features(torch.from_numpy(x))[0].numpy()

    return run


def torch_size_mb(features: Any) -> float:
    """Size of a PyTorch model's state in MB (1e6 bytes)."""
    return sum(t.numel() * t.element_size() for t in features.state_dict().values()) / 1e6


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``a[N, D]`` and ``b[N, D]``."""
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def accuracy(head: LinearHead, emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (a fraction) of ``head`` on embeddings ``emb``."""
    return float((head.predict_proba(emb).argmax(1) == labels).mean())


@dataclass(frozen=True)
class Agreement:
    """One model's embeddings against the reference's: per-image ``cosines`` and ``pred``
    (its head's top-1), their summary, and with labels ``accuracy`` (else None)."""

    cosines: np.ndarray
    pred: np.ndarray
    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    accuracy: float | None


def agreement(
    emb: np.ndarray,
    ref: np.ndarray,
    head: LinearHead,
    labels: np.ndarray | None,
    ref_head: LinearHead | None = None,
) -> Agreement:
    """Cosine vs the reference embeddings, top-1 agreement with the reference's predictions
    (``ref_head`` on ``ref``; ``head`` if None) and, with labels, ``head``'s accuracy."""
    cos = cosine(emb, ref)
    pred = head.predict_proba(emb).argmax(1)
    ref_pred = (ref_head or head).predict_proba(ref).argmax(1)
    return Agreement(
        cosines=cos,
        pred=pred,
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        top1_agreement=float((pred == ref_pred).mean()),
        accuracy=None if labels is None else float((pred == labels).mean()),
    )


def per_class(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy per class present in ``labels``, by class name."""
    return {
        classes[c]: float((pred[labels == c] == c).mean())
        for c in range(len(classes))
        if (labels == c).any()
    }


def latency_ms(runners: dict[str, Runner], images: Images, n: int = 20) -> dict[str, float]:
    """Batch-1 median latency in ms per runner, interleaved image by image (fair on a noisy
    host)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    xs = [images.inputs(i, i + 1) for i in range(min(n, len(images)))]
    for run in runners.values():  # warm-up
        for x in xs[:3]:
            run(x)
    for x in xs:
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


@dataclass
class HeadFit:
    """The head that ships with an artifact.

    With ``images`` (the run's training and validation images, labelled) a linear head is
    refit on each artifact's own embeddings of them (``--head-fit artifact``: INT8
    embeddings differ from FP32 ones, and a head that learned on them keeps its accuracy);
    without, the run's ``source`` head ships unchanged (``--head-fit source``, or a backbone
    export).
    """

    source: LinearHead
    n_classes: int
    images: Images | None = None
    last: tuple[Any, np.ndarray] | None = None
    """The last engine the head was fit for, with its embeddings of ``images``."""

    def for_engine(self, engine: Any, emb: np.ndarray | None = None) -> LinearHead:
        """The head that ships with ``engine``'s artifact; ``emb``: its embeddings of
        ``images`` when already known (the export cache's FP32 ones)."""
        if self.images is None:
            return self.source
        if emb is None:
            emb = embed(engine_runner(engine), self.images, desc="embedding training split")
        self.last = (engine, emb)
        with step("fitting the head"):
            # a linear probe's penalty was cross-validated on these images: keep it (a
            # fine-tuned head has none, l2 = 0: the hold-out picks one)
            l2 = self.source.l2 or None
            return LinearHead.fit(emb, self.images.labels, self.n_classes, l2=l2)

    def embedded(self, engine: Any) -> np.ndarray | None:
        """``engine``'s embeddings of ``images`` when the last head was fit for it."""
        return self.last[1] if self.last is not None and self.last[0] is engine else None
