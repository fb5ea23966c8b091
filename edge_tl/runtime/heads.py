"""Heads that learn on embeddings, in numpy only (they run on the device).

:class:`LinearHead` is a multinomial logistic regression on standardised embeddings,
fitted with L-BFGS and an L2 penalty picked from the data. :class:`PrototypeHead`
(SimpleShot) and :class:`KnnHead` compare centred, L2-normalised embeddings with the
support set. :func:`imprint` adds classes to a trained linear head without retraining it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError

DEFAULT_L2_GRID = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
FEWSHOT_L2_GRID = (1e-1, 1e-2, 3e-3, 1e-3)
FEWSHOT_L2 = 3e-3
"""Few-shot linear penalty below :data:`MIN_PER_CLASS_FOR_SELECTION` examples per class
(chosen on NEU-DET and flowers5 episodes; 1e-3..1e-2 are within 0.5 pt)."""
MIN_PER_CLASS_FOR_SELECTION = 10


FEWSHOT_POWER = 0.5
"""Power transform of the few-shot heads: ``sign(x) |x| ** 0.5`` before centring.

Pooled ReLU6 embeddings are skewed (most dimensions near zero, a few large); the square
root evens them out. Measured on NEU-DET 6-way episodes (FP32 embeddings, 100 episodes):
SimpleShot 70.7 -> 72.7 % at 1 shot, 88.7 -> 91.4 % at 5 shots (``benchmarks/fewshot.py``).
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
        return _softmax(self.logits(np.asarray(x, np.float32)))

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
        w, b, l2 = _fit_linear((x - mean) / scale, y, n_classes, l2, l2_grid, seed)
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
        centre = p.mean(0)
        z = cl2n(p, centre).astype(np.float64)
        if l2 is None and np.bincount(y, minlength=n_classes).min() < MIN_PER_CLASS_FOR_SELECTION:
            l2 = FEWSHOT_L2
        w, b, l2 = _fit_linear(z, y, n_classes, l2, l2_grid, seed, tol=1e-4)
        d = x.shape[1]
        return cls(w, b, centre, np.ones(d, np.float32), l2, FEWSHOT_POWER, True)


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise EdgeTLError(f"cannot fit a head on embeddings of shape {x.shape} and {len(y)} labels")
    return x, y


def _fit_linear(
    z, y, n_classes, l2, l2_grid, seed, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, float]:
    # Fewer examples than dimensions (few-shot): solve in the span of the examples. The
    # optimum of the L2-penalised problem lies there, so this is exact, and 30 x 30
    # instead of 30 x 1280 makes a 6-way 5-shot fit take milliseconds.
    zr, coef = _reduce(z)
    if l2 is None:
        l2 = _select_l2(zr, y, n_classes, l2_grid, seed)
    w, b = _fit_softmax(zr, y, n_classes, l2, tol=tol)
    return _map_back(w, coef, z).astype(np.float32), b.astype(np.float32), float(l2)


@dataclass
class PrototypeHead:
    """SimpleShot: power transform, centre on the support mean, L2-normalise; the nearest
    class mean by cosine wins. ``logits`` are ``temperature x cosine`` to each prototype.

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
        centre = p.mean(0)
        return cls(centre, unit_rows(class_means(cl2n(p, centre), y, n_classes)))

    def features(self, x: np.ndarray) -> np.ndarray:
        return cl2n(power(x, self.power), self.centre)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.temperature * (self.features(x) @ self.prototypes.T)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x))


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
        centre = p.mean(0)
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
        return _softmax(self.logits(x))


def imprint(
    head: LinearHead,
    x: np.ndarray,
    y: np.ndarray,
    n_new: int,
    x_ref: np.ndarray | None = None,
    y_ref: np.ndarray | None = None,
) -> LinearHead:
    """Add ``n_new`` classes to a trained linear head by weight imprinting (Qi et al. 2018).

    Each new class's row points along the mean of its examples ``x`` (``y`` in
    ``0..n_new-1``): in the head's own normalised features for a few-shot head, and in
    centred embedding space for a standardised workstation head (whose near-constant
    dimensions would otherwise dominate). The existing rows are untouched, so the known
    classes keep their decisions among themselves. A few-shot head's new rows take its rows'
    mean norm and bias. A workstation head's rows are on a scale of their own, so one scale
    and one bias for the new rows are fitted (2-parameter softmax regression, all rows in
    the softmax, classes weighted equally) on the new examples and reference examples of
    the known classes (``x_ref``, ``y_ref``: the exemplars the bundle ships); without
    references, the scale puts the new examples at 90 % probability.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    if head.normalise:
        direction = unit_rows(class_means(unit_rows(head.features(x)), y, n_new))
        rows = direction
    else:
        centred = unit_rows(x - head.mean)
        direction = unit_rows(class_means(centred, y, n_new))
        rows = direction * head.scale  # features(x) @ rows.T == (x - mean) @ direction.T
    k = head.n_classes

    def parts(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return head.logits(xs).astype(np.float64), (head.features(xs) @ rows.T).astype(np.float64)

    if head.normalise:
        # a few-shot head's rows live on one scale already (unit features): the new rows
        # take the known rows' mean norm and bias. Measured on NEU-DET 6-way 5-shot: 95.5 %
        # after adding a class, vs 94.3 % with the scale and bias fitted as below.
        alpha = float(np.linalg.norm(head.weight, axis=1).mean()) if k else 1.0
        beta = float(head.bias.mean()) if k else 0.0
    elif x_ref is not None and len(x_ref):
        xs = np.concatenate([np.asarray(x_ref, np.float32), x])
        labels = np.concatenate([np.asarray(y_ref, np.int64), y + k])
        alpha, beta = _fit_scale_bias(*parts(xs), labels)
    else:
        old, t = parts(x)
        own = t[np.arange(len(x)), y]
        beta = float(head.bias.mean()) if k else 0.0
        alpha = float(np.median((old.max(1) + np.log(9.0) - beta) / np.maximum(own, 1e-6)))
        alpha = max(alpha, 1e-6)
    return LinearHead(
        np.concatenate([head.weight, alpha * rows]),
        np.concatenate([head.bias, np.full(n_new, beta, np.float32)]),
        head.mean,
        head.scale,
        head.l2,
        head.power,
        head.normalise,
    )


def _fit_scale_bias(old: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Newton on ``(a, b)`` for logits ``[old, a * t + b]``: mean cross-entropy + 1e-4 a^2."""
    n, k = old.shape
    onehot = np.zeros((n, k + t.shape[1]))
    onehot[np.arange(n), y] = 1.0
    # every class weighs the same: 5 new examples against 20 exemplars of each known class
    counts = onehot.sum(0)
    wts = (1.0 / counts[y]) * (n / np.count_nonzero(counts))
    onehot *= wts[:, None]
    theta = np.array([1.0, 0.0])
    scale = max(float(np.abs(old).max()), 1.0) / max(float(np.abs(t).max()), 1e-6)
    theta[0] = scale  # start with new logits on the old logits' scale

    def f(th):
        logits = np.concatenate([old, th[0] * t + th[1]], 1)
        logits -= logits.max(1, keepdims=True)
        lse = np.log(np.exp(logits).sum(1))
        ce = (wts * lse - (logits * onehot).sum(1)).mean()
        return float(ce + 1e-4 * th[0] ** 2), logits, lse

    loss, logits, lse = f(theta)
    for _ in range(50):
        p = np.exp(logits - lse[:, None])[:, k:]
        r = p * wts[:, None] - onehot[:, k:]
        g = np.array([(r * t).sum() / n + 2e-4 * theta[0], r.sum() / n])
        # Hessian of the (weighted) log-sum-exp part restricted to the new rows
        pt, p1 = (p * t).sum(1), p.sum(1)
        h_aa = (wts * ((p * t * t).sum(1) - pt * pt)).mean() + 2e-4
        h_ab = (wts * ((p * t).sum(1) - pt * p1)).mean()
        h_bb = (wts * (p1 - p1 * p1)).mean() + 1e-9
        h = np.array([[h_aa, h_ab], [h_ab, h_bb]])
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = g
        lr = 1.0
        while lr > 1e-4:
            cand = theta - lr * step
            c_loss, c_logits, c_lse = f(cand)
            if c_loss <= loss:
                break
            lr *= 0.5
        else:
            break
        converged = loss - c_loss < 1e-9
        theta, loss, logits, lse = cand, c_loss, c_logits, c_lse
        if converged:
            break
    return max(float(theta[0]), 1e-6), float(theta[1])


def _reduce(z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(z', coef)`` with ``z' @ C.T == z @ W.T`` and ``|W| == |C|`` for ``W = C @ coef @ z``.

    ``z'`` holds the rows' coordinates in an orthonormal basis of their span, so a linear
    model with an L2 penalty fitted on ``z'`` maps back to the same optimum on ``z``.
    ``coef`` is None (``z' = z``) when there are at least as many rows as columns.
    """
    n, d = z.shape
    if n >= d:
        return z, None
    vals, u = np.linalg.eigh(z @ z.T)
    keep = vals > 1e-10 * max(float(vals[-1]), 1e-30)
    s, u = np.sqrt(vals[keep]), u[:, keep]
    return u * s, (u / s).T


def _map_back(w: np.ndarray, coef: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    """Weights fitted on ``_reduce(z)[0]`` as weights on ``z``."""
    return w if coef is None else (w @ coef) @ z


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _select_l2(z, y, k, grid, seed) -> float:
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), bool)
    for c in range(k):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val[idx[: int(round(0.2 * len(idx)))]] = True
    if val.sum() == 0 or (~val).sum() == 0 or len(np.unique(y[~val])) < 2:
        return grid[len(grid) // 2]
    best, best_key, init = grid[0], None, None
    for lam in grid:  # strongest penalty first; warm start the next
        w, b = _fit_softmax(z[~val], y[~val], k, lam, init)
        init = (w, b)
        p = _softmax(z[val] @ w.T + b)
        acc = float((p.argmax(1) == y[val]).mean())
        nll = float(-np.log(p[np.arange(val.sum()), y[val]] + 1e-12).mean())
        key = (acc, -nll)
        if best_key is None or key > best_key:
            best, best_key = lam, key
    return best


def _fit_softmax(z, y, k, lam, init=None, max_iter: int = 500, tol: float = 1e-6):
    """Minimise ``mean CE + lam/2 |W|^2`` with L-BFGS (memory 10, Armijo backtracking).

    Written for small problems too (a 6-way 5-shot fit is ~20 iterations on 31 x 6
    parameters), where numpy's per-call overhead, not arithmetic, sets the time: the bias
    rides as a last, unpenalised input column and the history is kept as arrays.
    """
    n, d = z.shape
    d1 = d + 1
    z1 = np.empty((n, d1))
    z1[:, :d] = z
    z1[:, d] = 1.0
    rows = np.arange(n)
    pen = np.full((k, d1), lam)
    pen[:, d] = 0.0
    pen = pen.ravel()

    def f_g(theta):
        logits = z1 @ theta.reshape(k, d1).T
        logits -= logits.max(1)[:, None]
        e = np.exp(logits)
        tot = e.sum(1)
        loss = (np.log(tot).sum() - logits[rows, y].sum()) / n + 0.5 * float(theta @ (pen * theta))
        e /= tot[:, None]
        e[rows, y] -= 1.0
        e /= n
        return loss, (e.T @ z1).ravel() + pen * theta

    theta = np.zeros(k * d1)
    if init is not None:
        theta.reshape(k, d1)[:, :d] = init[0]
        theta.reshape(k, d1)[:, d] = init[1]
    loss, g = f_g(theta)
    m = 10
    s_hist = np.zeros((m, k * d1))
    y_hist = np.zeros((m, k * d1))
    rho = np.zeros(m)
    used = 0  # entries 0..used-1 of the history, oldest first
    alphas = np.zeros(m)
    for it in range(max_iter):
        if np.abs(g).max() < tol:
            break
        q = g.copy()
        for i in range(used - 1, -1, -1):
            alphas[i] = a = rho[i] * (s_hist[i] @ q)
            q -= a * y_hist[i]
        if used:
            q *= 1.0 / (rho[used - 1] * (y_hist[used - 1] @ y_hist[used - 1]))
        else:
            q /= max(1.0, float(np.sqrt(q @ q)))
        for i in range(used):
            q += s_hist[i] * (alphas[i] - rho[i] * (y_hist[i] @ q))
        direction = -q
        slope = g @ direction
        if slope >= 0:  # not a descent direction: restart from steepest descent
            used = 0
            direction, slope = -g, -(g @ g)
        step = 1.0
        for _ in range(30):
            new_theta = theta + step * direction
            new_loss, new_g = f_g(new_theta)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        sv, yv = new_theta - theta, new_g - g
        sy = sv @ yv
        if sy > 1e-10:
            if used == m:
                s_hist[:-1], y_hist[:-1], rho[:-1] = s_hist[1:], y_hist[1:], rho[1:]
                used -= 1
            s_hist[used], y_hist[used], rho[used] = sv, yv, 1.0 / sy
            used += 1
        converged = abs(loss - new_loss) < 1e-10 * max(1.0, abs(loss))
        theta, loss, g = new_theta, new_loss, new_g
        if converged and it > 5:
            break
    w = theta.reshape(k, d1)
    return w[:, :d].copy(), w[:, d].copy()
