"""Transferability estimation: how well a frozen backbone's features suit a labelled data set,
scored in seconds instead of fine-tuning it. Torch-free numpy (so it runs on a device too).

Three estimators, each from its paper:

- :func:`logme` — LogME, You et al., "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021 (reference implementation: github.com/thuml/LogME). Per
  class, the one-hot target column is a Bayesian linear regression on the features with
  prior ``w ~ N(0, 1/alpha)`` and noise ``N(0, 1/beta)``; the log marginal likelihood
  (evidence) is maximised over ``alpha, beta`` by MacKay's fixed-point iteration, computed
  through one SVD of the features; the score is the mean over classes of the evidence per
  sample. Higher is better; it is unchanged when the features are scaled.
- :func:`leep` — LEEP, Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of
  Learned Representations", ICML 2020: the mean log-likelihood of the target labels under
  the "empirical predictor" that maps the source model's class probabilities through the
  empirical conditional ``P(y | z)``. Needs the source classifier (ImageNet's 1,000
  classes). At most 0; higher is better.
- :func:`h_score` — H-score, Bao et al., "An Information-Theoretic Approach to
  Transferability in Task Transfer Learning", ICIP 2019: ``tr(cov(f)^-1 cov(E[f | y]))``,
  the between-class share of the feature covariance (a pseudo-inverse where ``cov(f)`` is
  singular). Higher is better; at most the number of classes minus one.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(np.arange(3), 20)
    >>> f = rng.normal(size=(60, 8)) + 3 * np.eye(8)[y]  # the labels show in the features
    >>> logme(f, y) > logme(rng.normal(size=(60, 8)), y)
    True
"""

from __future__ import annotations

import numpy as np

from edge_tl.errors import EdgeTLError

__all__ = ["evidence", "h_score", "leep", "logme"]

_MAX_ITER = 100
_TOL = 1e-6


def _check(features: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        noun = "probabilities" if what == "LEEP" else "features"
        raise EdgeTLError(f"{what} needs {noun} [N, D] and labels [N]; got {f.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise EdgeTLError(f"{what} needs integer class labels 0..C-1")
    if len(np.unique(y)) < 2:
        raise EdgeTLError(f"{what} needs at least two classes in the labels")
    if not np.isfinite(f).all():
        raise EdgeTLError(f"{what}: the features hold NaN or infinity")
    return f, y.astype(np.int64)


def evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """Log marginal likelihood per sample of ``target`` under Bayesian linear regression on
    ``features`` (prior precision ``alpha``, noise precision ``beta``), by the direct formula
    (no SVD): ``target ~ N(0, F F^T / alpha + I / beta)``. LogME's evidence at its optimum.

    Args:
        features: ``float[N, D]``.
        target: ``float[N]``.

    Returns:
        ``log p(target | features, alpha, beta) / N``.
    """
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    n = len(t)
    cov = f @ f.T / alpha + np.eye(n) / beta
    sign, logdet = np.linalg.slogdet(cov)
    quad = float(t @ np.linalg.solve(cov, t))
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet + quad) / n)


def _class_evidence(
    u: np.ndarray, sigma: np.ndarray, n: int, d: int, target: np.ndarray
) -> tuple[float, float, float]:
    """Maximum evidence for one target column: ``(evidence / N, alpha, beta)``.

    ``u`` ``[N, k]`` and ``sigma = s^2`` ``[k]`` come from the thin SVD of the features;
    the ``D - k`` zero eigenvalues of ``F^T F`` enter the log-determinant as ``log(alpha)``.
    """
    x = u.T @ target  # the target in the features' left singular basis
    x2 = x * x
    rest = max(float(target @ target - x2.sum()), 0.0)  # the part no feature can explain
    alpha, beta = 1.0, 1.0
    for _ in range(_MAX_ITER):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())  # effective number of parameters
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())  # ||m||^2
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest  # ||target - F m||^2
        alpha = gamma / max(m2, 1e-12)
        beta = max(n - gamma, 1e-12) / max(res2, 1e-12)
        if abs(alpha / beta - t) <= _TOL * t:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest
    logdet = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)
    ev = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - 0.5 * logdet
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(ev / n), alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME score of ``features`` for ``labels`` (You et al., ICML 2021).

    Args:
        features: ``float[N, D]`` frozen embeddings, one row per image.
        labels: ``int[N]`` class ids ``0..C-1`` (at least two classes present).

    Returns:
        The mean over classes of the maximum evidence per sample (a log-likelihood in nats;
        compare it between backbones on the same data, not across data sets).

    Raises:
        EdgeTLError: mismatched shapes, fewer than two classes, non-finite features.
    """
    f, y = _check(features, labels, "LogME")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > (s.max() if s.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    u, sigma = u[:, keep], s[keep] ** 2  # eigenvalues of F^T F above numerical zero
    scores = [_class_evidence(u, sigma, n, d, (y == c).astype(np.float64))[0] for c in np.unique(y)]
    return float(np.mean(scores))


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP score (Nguyen et al., ICML 2020) of a source classifier for target ``labels``.

    Args:
        source_probs: ``float[N, Z]``, the source model's class probabilities (softmax over
            ImageNet's classes) for each target image; rows sum to 1.
        labels: ``int[N]`` target class ids ``0..C-1``.

    Returns:
        ``mean_i log sum_z P(y_i | z) theta(x_i)_z`` with ``P(y | z)`` the empirical
        conditional from the joint ``P(y, z) = mean_i theta(x_i)_z [y_i = y]``; in ``(-inf, 0]``.

    Raises:
        EdgeTLError: mismatched shapes, fewer than two classes, rows that are not
            probabilities.
    """
    p, y = _check(source_probs, labels, "LEEP")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise EdgeTLError("LEEP needs the source model's probabilities (rows summing to 1)")
    classes = int(y.max()) + 1
    joint = np.zeros((classes, p.shape[1]))
    np.add.at(joint, y, p)
    joint /= len(y)
    marginal = joint.sum(0, keepdims=True)
    cond = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    eep = (p * cond[y]).sum(1)  # P(y_i | x_i) under the empirical predictor
    return float(np.log(np.maximum(eep, 1e-300)).mean())


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score (Bao et al., ICIP 2019): ``tr(pinv(cov(f)) cov(E[f | y]))``.

    Args:
        features: ``float[N, D]``.
        labels: ``int[N]`` class ids.

    Returns:
        The score, in ``[0, C - 1]`` (maximum covariances, divided by ``N``; the class-mean
        covariance weights each class by its share of the samples).

    Raises:
        EdgeTLError: mismatched shapes, fewer than two classes, non-finite features.
    """
    f, y = _check(features, labels, "H-score")
    f = f - f.mean(0)
    cov = f.T @ f / len(f)
    means = np.zeros_like(f)
    for c in np.unique(y):
        means[y == c] = f[y == c].mean(0)
    between = means.T @ means / len(f)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ between))
