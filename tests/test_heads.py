"""The numpy linear head: the optimiser reaches the optimum, and it saves without pickles."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.softmax import fit_softmax


def _blobs(n=60, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, d))
    y = np.repeat(np.arange(k), n)
    return centres[y] + rng.normal(0, 1.0, (len(y), d)), y


def test_lbfgs_reaches_the_same_optimum_as_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    x, y = _blobs()
    z = (x - x.mean(0)) / x.std(0)
    k, d, lam = 3, z.shape[1], 1e-2
    w, b = fit_softmax(z, y, k, lam)

    def loss(theta):
        W, B = theta[: k * d].reshape(k, d), theta[k * d :]
        lg = z @ W.T + B
        lg = lg - lg.max(1, keepdims=True)
        return (
            np.mean(np.log(np.exp(lg).sum(1)) - lg[np.arange(len(y)), y])
            + 0.5 * lam * (W * W).sum()
        )

    ref = scipy_opt.minimize(loss, np.zeros(k * d + k), method="L-BFGS-B", options={"gtol": 1e-9})
    ours = loss(np.concatenate([w.ravel(), b]))
    assert ours <= ref.fun + 1e-6


def test_fit_predicts_and_round_trips_through_npz(tmp_path):
    x, y = _blobs(seed=1)
    head = LinearHead.fit(x[::2], y[::2], n_classes=3)
    assert (head.predict_proba(x[1::2]).argmax(1) == y[1::2]).mean() > 0.95
    head.save(tmp_path / "head.npz")
    again = LinearHead.load(tmp_path / "head.npz")  # allow_pickle=False inside
    np.testing.assert_allclose(again.predict_proba(x), head.predict_proba(x), rtol=1e-6)
    with np.load(tmp_path / "head.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
