"""Weight imprinting: new classes for a trained linear head from a few examples, without
retraining it (Qi, Brown and Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018).

Torch-free. The known rows stay as they were, so the known classes keep their decisions
among themselves; each new row points along its class's mean embedding, on a scale that
matches the head's own.
"""

from __future__ import annotations

import numpy as np

from edge_tl.runtime.heads import LinearHead, class_means, unit_rows

__all__ = ["imprint"]


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
