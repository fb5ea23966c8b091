"""Multinomial logistic regression with an L2 penalty, in numpy: the solver behind
:class:`~edge_tl.runtime.heads.LinearHead`.

L-BFGS (memory 10, Armijo backtracking) on mean cross-entropy + ``lam/2 |W|^2`` (Nocedal
and Wright 2006, algorithm 7.4), written for small problems: a 6-way 5-shot fit is ~20
iterations on 31 x 6 parameters, where numpy's per-call overhead, not arithmetic, sets the
time. With fewer examples than dimensions the problem is solved in the span of the
examples (exact for an L2 penalty: the representer theorem), and the penalty is picked on a
stratified hold-out. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CvScores",
    "fit_linear",
    "fit_softmax",
    "map_back",
    "reduce_to_span",
    "select_l2",
    "select_l2_cv",
    "softmax",
    "stratified_folds",
]


def fit_linear(
    z, y, n_classes, l2, l2_grid, seed, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(W[K, D], b[K], l2)`` for features ``z[N, D]`` and labels ``y[N]``; ``l2=None``
    picks the penalty from ``l2_grid`` (see :func:`select_l2`)."""
    # Fewer examples than dimensions (few-shot): solve in the span of the examples. The
    # optimum of the L2-penalised problem lies there, so this is exact, and 30 x 30
    # instead of 30 x 1280 makes a 6-way 5-shot fit take milliseconds.
    zr, coef = reduce_to_span(z)
    if l2 is None:
        l2 = select_l2(zr, y, n_classes, l2_grid, seed)
    w, b = fit_softmax(zr, y, n_classes, l2, tol=tol)
    return map_back(w, coef, z).astype(np.float32), b.astype(np.float32), float(l2)


def reduce_to_span(z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
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


def map_back(w: np.ndarray, coef: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    """Weights fitted on ``reduce_to_span(z)[0]`` as weights on ``z``."""
    return w if coef is None else (w @ coef) @ z


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits[N, K]``."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def select_l2(z, y, k, grid, seed) -> float:
    """The penalty of ``grid`` with the best accuracy (ties: log-loss) on a stratified 20 %
    hold-out; the grid's middle when the data cannot be split."""
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
        w, b = fit_softmax(z[~val], y[~val], k, lam, init)
        init = (w, b)
        p = softmax(z[val] @ w.T + b)
        acc = float((p.argmax(1) == y[val]).mean())
        nll = float(-np.log(p[np.arange(val.sum()), y[val]] + 1e-12).mean())
        key = (acc, -nll)
        if best_key is None or key > best_key:
            best, best_key = lam, key
    return best


def stratified_folds(y: np.ndarray, k: int, folds: int, seed: int) -> np.ndarray:
    """Fold number ``int64[N]`` in ``0..folds-1`` of each row: each class shuffled by ``seed``
    and dealt round-robin, the deal carried on from one class to the next, so folds differ in
    size by at most one row and hold each class's share (scikit-learn's ``StratifiedKFold``
    with ``shuffle=True`` makes the same kind of split)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    start = 0
    for c in range(k):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (start + np.arange(len(idx))) % folds
        start += len(idx)
    return fold


@dataclass(frozen=True)
class CvScores:
    """What :func:`select_l2_cv` measured: the chosen penalty, the number of folds, and the
    pooled out-of-fold accuracy and mean log-loss of each penalty of the grid."""

    l2: float
    folds: int
    grid: tuple[float, ...]
    accuracy: tuple[float, ...]
    log_loss: tuple[float, ...]

    @property
    def best_accuracy(self) -> float:
        """The chosen penalty's out-of-fold accuracy."""
        return self.accuracy[self.grid.index(self.l2)]


def select_l2_cv(z, y, k, grid, seed, folds: int = 5, tol: float = 1e-4) -> CvScores | None:
    """The penalty of ``grid`` with the lowest out-of-fold log-loss (ties: the higher
    accuracy, then the earlier in ``grid``) by stratified ``folds``-fold cross-validation on
    ``z[N, D]``, ``y[N]`` (:func:`stratified_folds`); fewer folds when the smallest class has
    fewer rows.

    Every row is scored once, by the head fitted on the other folds, so a small data set
    gives all its examples to both learning and choosing (one small validation split can
    point far from the best penalty). Log-loss rather than accuracy: a few hundred rows give
    accuracy ties and jumps of one image, the log-loss moves smoothly; measured by
    ``benchmarks/probe_vs_sklearn.py`` (4 data sets x 4 sizes) the two disagreed in 5 cells:
    log-loss 0.4-2.0 pt better in 3, 0.3-0.4 pt worse in 2. Each fold walks ``grid`` in its
    order (strongest penalty first), warm-starting each fit from the last (Friedman, Hastie
    and Tibshirani 2010, the regularisation path); the fits stop at a gradient of ``tol``
    (scikit-learn's default for L-BFGS).

    Returns:
        The scores, or None when fewer than two classes have two or more rows (nothing to
        cross-validate).
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=k)
    folds = min(folds, int(counts[counts > 0].min()))
    if folds < 2 or (counts > 0).sum() < 2:
        return None
    fold = stratified_folds(y, k, folds, seed)
    correct = np.zeros(len(grid))
    loss = np.zeros(len(grid))
    for f in range(folds):
        tr, va = fold != f, fold == f
        init = None
        for i, lam in enumerate(grid):
            w, b = fit_softmax(z[tr], y[tr], k, lam, init, tol=tol)
            init = (w, b)
            p = softmax(z[va] @ w.T + b)
            correct[i] += float((p.argmax(1) == y[va]).sum())
            loss[i] -= float(np.log(p[np.arange(int(va.sum())), y[va]] + 1e-12).sum())
    n = len(y)
    acc = tuple(float(c / n) for c in correct)
    nll = tuple(float(v / n) for v in loss)
    best = max(range(len(grid)), key=lambda i: (-round(nll[i], 12), acc[i], -i))
    return CvScores(float(grid[best]), folds, tuple(float(g) for g in grid), acc, nll)


def fit_softmax(z, y, k, lam, init=None, max_iter: int = 500, tol: float = 1e-6):
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
