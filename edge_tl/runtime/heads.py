"""Heads that learn on embeddings, in numpy only (they run on the device).

:class:`LinearHead` is a multinomial logistic regression on standardised embeddings,
fitted with L-BFGS and an L2 penalty picked from the data. :class:`PrototypeHead`
(SimpleShot: Wang et al. 2019) and :class:`KnnHead` compare centred, L2-normalised
embeddings with the support set. Classes are added to a trained linear head by
:mod:`edge_tl.runtime.imprint`; the solver is :mod:`edge_tl.runtime.softmax`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.softmax import fit_linear, softmax

__all__ = [
    "DEFAULT_L2_GRID",
    "FEWSHOT_POWER",
    "KnnHead",
    "LinearHead",
    "PrototypeHead",
    "class_means",
    "cl2n",
    "power",
    "support_centre",
    "unit_rows",
]

DEFAULT_L2_GRID = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
FEWSHOT_L2_GRID = (1e-1, 1e-2, 3e-3, 1e-3)
FEWSHOT_L2 = 3e-3
"""Few-shot linear penalty below :data:`MIN_PER_CLASS_FOR_SELECTION` examples per class
(chosen on NEU-DET and flowers5 episodes; 1e-3..1e-2 are within 0.5 pt)."""
MIN_PER_CLASS_FOR_SELECTION = 10


FEWSHOT_POWER = 0.5
"""Power transform of the few-shot heads: ``sign(x) |x| ** 0.5`` before centring.

Pooled ReLU6 embeddings are skewed (most dimensions near zero, a few large); the square
root evens them out. Measured by ``benchmarks/fewshot.py`` (200 episodes, SimpleShot with
and without it, paired): NEU-DET 6-way FP32 70.0 -> 72.0 % at 1 shot, 90.2 -> 92.2 % at 5,
92.7 -> 94.5 % at 10 (INT8 +1.5 / +1.0 / +0.6 pt); neutral on flowers5 (-0.5 to +0.3 pt).
"""


def power(x: np.ndarray, p: float) -> np.ndarray:
    """``sign(x) |x| ** p`` (identity for ``p == 1``)."""
    x = np.asarray(x, np.float32)
    if p == 1.0:
        return x
    return np.copysign(np.sqrt(np.abs(x)) if p == 0.5 else np.abs(x) ** np.float32(p), x)


def cl2n(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Centre and L2-normalise rows (SimpleShot's CL2N): ``(x - c) / |x - c|``."""
    z = np.asarray(x, np.float32) - centre
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)


def support_centre(p: np.ndarray, n_classes: int) -> np.ndarray:
    """The centre of the few-shot features ``float32[D]`` of power-transformed support
    embeddings ``p[N, D]``: their mean when there are two or more classes (SimpleShot's CL2N),
    the origin for one class (SimpleShot's L2N).

    One class's support mean is that class's own mean: centred on it, the support points
    every way, its prototype is noise and each image's leave-one-out cosine is near -1, so
    an open-set threshold learned from them rejects nothing. Uncentred, the embeddings keep
    what the class shares: 10 NEU-DET scratches as support, other scratches score 0.6-0.8
    against their prototype and flower photos 0.3-0.4.
    """
    p = np.asarray(p, np.float32)
    if n_classes >= 2 and len(p):
        return p.mean(0)
    return np.zeros(p.shape[1], np.float32)


def class_means(z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class mean of ``z`` (a class with no rows gets zeros)."""
    y = np.asarray(y, np.int64)
    onehot = (y[None, :] == np.arange(n_classes)[:, None]).astype(z.dtype)
    counts = onehot.sum(1, keepdims=True)
    return (onehot @ z / np.maximum(counts, 1)).astype(np.float32)


def unit_rows(a: np.ndarray) -> np.ndarray:
    return (a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


@dataclass
class LinearHead:
    """``softmax(features(x) @ weight.T + bias)``.

    ``features(x)`` is ``(x - mean) / scale`` for a head trained on the workstation (the
    standardisation folds into one matmul), or, for a few-shot head learned on the device
    (``normalise=True``), the power transform, centring and L2 normalisation of
    :class:`PrototypeHead` (then ``scale`` is 1).

    Example:
        >>> head = LinearHead.fit(x_train, y_train, n_classes=6)  # doctest: +SKIP
        >>> head.predict_proba(x_test).argmax(1)  # doctest: +SKIP
    """

    weight: np.ndarray  # [K, D]
    bias: np.ndarray  # [K]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    l2: float = 0.0
    power: float = 1.0
    normalise: bool = False

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, np.float32)
        self.bias = np.asarray(self.bias, np.float32)
        # Standardisation folded into one matmul: ((x - m) / s) @ W.T + b == x @ W'.T + b'.
        w = (self.weight / self.scale).astype(np.float32)
        self._w_t = np.ascontiguousarray(w.T)
        self._b = (self.bias - w @ self.mean).astype(np.float32)

    @property
    def n_classes(self) -> int:
        return len(self.weight)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W[D, K], b[K])`` with the standardisation folded in: logits = x @ W + b."""
        if self.normalise or self.power != 1.0:
            raise EdgeTLError("a few-shot head (normalised embeddings) cannot be folded")
        return self._w_t, self._b

    def features(self, x: np.ndarray) -> np.ndarray:
        """The embeddings as this head sees them (before the matmul)."""
        if self.normalise:
            return cl2n(power(x, self.power), self.mean)
        return (np.asarray(x, np.float32) - self.mean) / self.scale

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.normalise:
            return self.features(x) @ self.weight.T + self.bias
        return np.asarray(x, np.float32) @ self._w_t + self._b

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(np.asarray(x, np.float32)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "l2": np.array(self.l2),
            "power": np.array(self.power),
            "normalise": np.array(self.normalise),
        }

    @classmethod
    def from_arrays(cls, z: Any) -> LinearHead:
        return cls(
            z["weight"],
            z["bias"],
            z["mean"],
            z["scale"],
            float(z["l2"]),
            float(z["power"]) if "power" in z else 1.0,
            bool(z["normalise"]) if "normalise" in z else False,
        )

    def save(self, path: str | Path) -> None:
        np.savez(path, kind=np.array("linear"), **self.arrays())

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as z:
            if str(z["kind"]) != "linear":
                raise EdgeTLError(f"{path} holds a {z['kind']} head, not a linear head")
            return cls.from_arrays(z)

    @classmethod
    def from_logits_layer(cls, weight: np.ndarray, bias: np.ndarray) -> LinearHead:
        """Wrap a trained ``nn.Linear``'s weights (no standardisation)."""
        d = weight.shape[1]
        return cls(weight, bias, np.zeros(d, np.float32), np.ones(d, np.float32))

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        l2: float | None = None,
        l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
        seed: int = 0,
    ) -> LinearHead:
        """Fit on standardised embeddings ``x[N, D]`` with integer labels ``y[N]``.

        With ``l2=None`` the penalty is chosen from ``l2_grid`` by accuracy on a stratified
        20 % hold-out (ties: lower log-loss), then the head is refitted on all of ``x``.
        """
        x, y = _check_xy(x, y)
        mean = x.mean(0)
        scale = x.std(0) + 1e-6
        w, b, l2 = fit_linear((x - mean) / scale, y, n_classes, l2, l2_grid, seed)
        return cls(w, b, mean.astype(np.float32), scale.astype(np.float32), l2)

    @classmethod
    def fit_fewshot(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        l2: float | None = None,
        l2_grid: tuple[float, ...] = FEWSHOT_L2_GRID,
        seed: int = 0,
    ) -> LinearHead:
        """Fit on the few-shot features (power transform, centred on the support mean,
        L2-normalised), the representation :class:`PrototypeHead` uses.

        With ``l2=None`` the penalty is picked from ``l2_grid`` on a stratified hold-out
        when every class has at least :data:`MIN_PER_CLASS_FOR_SELECTION` examples, and is
        :data:`FEWSHOT_L2` below that (too few examples to hold any out).
        """
        x, y = _check_xy(x, y)
        p = power(x, FEWSHOT_POWER)
        centre = support_centre(p, n_classes)
        z = cl2n(p, centre).astype(np.float64)
        if l2 is None and np.bincount(y, minlength=n_classes).min() < MIN_PER_CLASS_FOR_SELECTION:
            l2 = FEWSHOT_L2
        w, b, l2 = fit_linear(z, y, n_classes, l2, l2_grid, seed, tol=1e-4)
        d = x.shape[1]
        return cls(w, b, centre, np.ones(d, np.float32), l2, FEWSHOT_POWER, True)


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise EdgeTLError(f"cannot fit a head on embeddings of shape {x.shape} and {len(y)} labels")
    return x, y


@dataclass
class PrototypeHead:
    """Nearest class mean after SimpleShot's CL2N (Wang et al. 2019: centre on the support
    mean, L2-normalise), with two changes: the power transform (:data:`FEWSHOT_POWER`)
    first, and cosine to the normalised class means instead of Euclidean distance to the
    means. ``logits`` are ``temperature x cosine`` to each prototype. SimpleShot as
    published is a reference in ``benchmarks/fewshot.py``: the power transform gains up to
    2 pt on NEU-DET; the cosine scoring costs 0.2-1.0 pt at 5-10 shots there.

    Example:
        >>> head = PrototypeHead.fit(x_support, y_support, n_classes=6)  # doctest: +SKIP
    """

    centre: np.ndarray  # [D]
    prototypes: np.ndarray  # [K, D], unit rows
    power: float = FEWSHOT_POWER
    temperature: float = 10.0

    @property
    def n_classes(self) -> int:
        return len(self.prototypes)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> PrototypeHead:
        p = power(x, FEWSHOT_POWER)
        centre = support_centre(p, n_classes)
        return cls(centre, unit_rows(class_means(cl2n(p, centre), y, n_classes)))

    def features(self, x: np.ndarray) -> np.ndarray:
        return cl2n(power(x, self.power), self.centre)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.temperature * (self.features(x) @ self.prototypes.T)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))


@dataclass
class KnnHead:
    """k nearest support embeddings by cosine, in the features of :class:`PrototypeHead`.

    A class's score is the mean cosine of its ``k`` most similar support embeddings (fewer
    when it has fewer), so a class with many examples does not win by numbers alone.
    """

    centre: np.ndarray  # [D]
    support: np.ndarray  # [N, D], unit rows
    support_y: np.ndarray  # [N]
    n_classes: int
    k: int = 1
    power: float = FEWSHOT_POWER
    temperature: float = 10.0

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int, k: int = 1) -> KnnHead:
        p = power(x, FEWSHOT_POWER)
        centre = support_centre(p, n_classes)
        return cls(centre, cl2n(p, centre), np.asarray(y, np.int64), n_classes, k)

    def features(self, x: np.ndarray) -> np.ndarray:
        return cl2n(power(x, self.power), self.centre)

    def logits(self, x: np.ndarray) -> np.ndarray:
        sim = self.features(x) @ self.support.T  # [M, N]
        out = np.full((len(sim), self.n_classes), -1.0, np.float32)
        for c in range(self.n_classes):
            s = sim[:, self.support_y == c]
            if s.shape[1]:
                k = min(self.k, s.shape[1])
                out[:, c] = -np.partition(-s, k - 1, axis=1)[:, :k].mean(1)
        return self.temperature * out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))
