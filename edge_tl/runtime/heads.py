"""Heads that learn on embeddings, in numpy only (they run on the device).

:class:`LinearHead` is a multinomial logistic regression on standardised embeddings,
fitted with L-BFGS and an L2 penalty picked on a stratified hold-out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_tl.errors import EdgeTLError

DEFAULT_L2_GRID = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


@dataclass
class LinearHead:
    """``softmax(((x - mean) / scale) @ weight.T + bias)``.

    Example:
        >>> head = LinearHead.fit(x_train, y_train, n_classes=6)  # doctest: +SKIP
        >>> head.predict_proba(x_test).argmax(1)  # doctest: +SKIP
    """

    weight: np.ndarray  # [K, D]
    bias: np.ndarray  # [K]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    l2: float = 0.0

    def __post_init__(self) -> None:
        # Standardisation folded into one matmul: ((x - m) / s) @ W.T + b == x @ W'.T + b'.
        w = (self.weight / self.scale).astype(np.float32)
        self._w_t = np.ascontiguousarray(w.T)
        self._b = (self.bias - w @ self.mean).astype(np.float32)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W[D, K], b[K])`` with the standardisation folded in: logits = x @ W + b."""
        return self._w_t, self._b

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self._w_t + self._b

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(np.asarray(x, np.float32)))

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            kind=np.array("linear"),
            weight=self.weight.astype(np.float32),
            bias=self.bias.astype(np.float32),
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            l2=np.array(self.l2),
        )

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as z:
            if str(z["kind"]) != "linear":
                raise EdgeTLError(f"{path} holds a {z['kind']} head, not a linear head")
            return cls(z["weight"], z["bias"], z["mean"], z["scale"], float(z["l2"]))

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
        """Fit on embeddings ``x[N, D]`` with integer labels ``y[N]``.

        With ``l2=None`` the penalty is chosen from ``l2_grid`` by accuracy on a stratified
        20 % hold-out (ties: lower log-loss), then the head is refitted on all of ``x``.
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.int64)
        if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
            raise EdgeTLError(
                f"cannot fit a head on embeddings of shape {x.shape} and {len(y)} labels"
            )
        mean = x.mean(0)
        scale = x.std(0) + 1e-6
        z = (x - mean) / scale
        if l2 is None:
            l2 = _select_l2(z, y, n_classes, l2_grid, seed)
        w, b = _fit_softmax(z, y, n_classes, l2)
        return cls(
            w.astype(np.float32),
            b.astype(np.float32),
            mean.astype(np.float32),
            scale.astype(np.float32),
            float(l2),
        )


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
    """Minimise ``mean CE + lam/2 |W|^2`` with L-BFGS (memory 10, Armijo backtracking)."""
    n, d = z.shape
    onehot = np.eye(k)[y]

    def f_g(theta):
        w = theta[: k * d].reshape(k, d)
        b = theta[k * d :]
        logits = z @ w.T + b
        logits -= logits.max(1, keepdims=True)
        lse = np.log(np.exp(logits).sum(1))
        loss = float((lse - (logits * onehot).sum(1)).mean() + 0.5 * lam * (w * w).sum())
        p = np.exp(logits - lse[:, None])
        r = (p - onehot) / n
        gw = r.T @ z + lam * w
        return loss, np.concatenate([gw.ravel(), r.sum(0)])

    theta = np.concatenate([init[0].ravel(), init[1]]) if init is not None else np.zeros(k * d + k)
    loss, g = f_g(theta)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for it in range(max_iter):
        if np.abs(g).max() < tol:
            break
        q = g.copy()
        alphas = []
        for s, yv in zip(reversed(s_hist), reversed(y_hist), strict=True):
            a = (s @ q) / (yv @ s)
            alphas.append(a)
            q -= a * yv
        if s_hist:
            q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, np.linalg.norm(q))
        for s, yv, a in zip(s_hist, y_hist, reversed(alphas), strict=True):
            q += s * (a - (yv @ q) / (yv @ s))
        direction = -q
        slope = g @ direction
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
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
        s, yv = new_theta - theta, new_g - g
        if s @ yv > 1e-10:
            s_hist.append(s)
            y_hist.append(yv)
            if len(s_hist) > 10:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(loss - new_loss) < 1e-10 * max(1.0, abs(loss))
        theta, loss, g = new_theta, new_loss, new_g
        if converged and it > 5:
            break
    return theta[: k * d].reshape(k, d), theta[k * d :]
