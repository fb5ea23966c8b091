"""The linear probe's head: its L2 penalty chosen by cross-validation on train + val, the
choice recorded, reproducible by seed, one-line errors, and a head the device reads as is."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.heads import DEFAULT_L2_GRID, LinearHead
from edge_tl.runtime.softmax import select_l2_cv, stratified_folds
from edge_tl.train.probe import fit_probe, fit_probe_head


def _blobs(n=40, d=24, k=3, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (k, d))
    y = np.repeat(np.arange(k), n)
    return centres[y] + rng.normal(0, noise, (len(y), d)), y


def _split(x, y, val_every=4):
    va = np.arange(len(y)) % val_every == 0
    return x[~va], y[~va], x[va], y[va]


def test_stratified_folds_deal_each_class_evenly():
    y = np.repeat(np.arange(3), [17, 9, 5])
    fold = stratified_folds(y, 3, 5, seed=0)
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c, n in enumerate((17, 9, 5)):
        per = np.bincount(fold[y == c], minlength=5)
        assert per.max() - per.min() <= 1 and per.sum() == n
    assert (stratified_folds(y, 3, 5, seed=0) == fold).all()
    assert not (stratified_folds(y, 3, 5, seed=1) == fold).all()


def test_cv_picks_the_penalty_with_the_lowest_out_of_fold_log_loss():
    x, y = _blobs(noise=3.0)  # overlapping classes: the weakest penalty overfits
    z = (x - x.mean(0)) / x.std(0)
    cv = select_l2_cv(z, y, 3, DEFAULT_L2_GRID, seed=0)
    assert cv is not None and cv.folds == 5 and cv.grid == DEFAULT_L2_GRID
    assert cv.l2 == DEFAULT_L2_GRID[int(np.argmin(cv.log_loss))]
    assert cv.log_loss[-1] > min(cv.log_loss)  # the choice mattered
    assert 0 <= cv.best_accuracy <= 1


def test_probe_learns_from_train_and_val_and_records_its_choice():
    x, y = _blobs(seed=1)
    xt, yt, xv, yv = _split(x, y)
    fit = fit_probe(xt, yt, xv, yv, 3, seed=0)
    assert fit.n_fit == len(y)
    assert fit.head.l2 == fit.cv.l2 and fit.head.l2 in DEFAULT_L2_GRID
    s = fit.summary()
    assert s["rule"].startswith("5-fold cross-validation") and s["folds"] == 5
    assert s["cv_accuracy"] == fit.cv_accuracy and s["l2"] == fit.head.l2
    # the same as fitting train + val at the chosen penalty
    again = LinearHead.fit(np.concatenate([xt, xv]), np.concatenate([yt, yv]), 3, l2=fit.head.l2)
    np.testing.assert_allclose(fit.head.weight, again.weight, atol=1e-6)


def test_probe_is_deterministic_by_seed_and_fit_probe_head_is_its_head():
    x, y = _blobs(noise=2.5, seed=2)
    a = fit_probe(*_split(x, y), 3, seed=0)
    b = fit_probe(*_split(x, y), 3, seed=0)
    assert a.head.l2 == b.head.l2 and a.cv == b.cv
    np.testing.assert_array_equal(a.head.weight, b.head.weight)
    head = fit_probe_head(*_split(x, y), 3, 0)
    np.testing.assert_array_equal(head.weight, a.head.weight)


def test_probe_without_a_validation_split_and_with_a_single_example_class():
    x, y = _blobs(n=12, seed=3)
    fit = fit_probe(x, y, np.empty((0, x.shape[1])), np.empty(0), 3)
    assert fit.cv is not None and fit.n_fit == len(y)
    y1 = y.copy()
    y1[:11] = 1  # class 0 keeps one example: nothing to cross-validate
    fit = fit_probe(x, y1, np.empty((0, x.shape[1])), np.empty(0), 3)
    assert fit.cv is None and fit.cv_accuracy is None and "hold-out" in fit.rule
    assert fit.head.l2 in DEFAULT_L2_GRID


@pytest.mark.parametrize(
    "args, words",
    [
        ((np.zeros((5, 4)), np.zeros(4, int)), "4 labels"),
        ((np.zeros((6, 4)), np.array([0, 1, 2, 0, 1, 3])), "0..2"),
        ((np.full((6, 4), np.nan), np.array([0, 1, 2, 0, 1, 2])), "NaN"),
        ((np.zeros((6, 4)), np.zeros(6, int)), "at least 2 classes"),
    ],
)
def test_bad_input_is_one_line_error(args, words):
    x, y = args
    with pytest.raises(EdgeTLError) as e:
        fit_probe(x, y, np.empty((0, 4)), np.empty(0), 3)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_train_and_val_of_different_widths_is_one_line_error():
    with pytest.raises(EdgeTLError, match="differ in width") as e:
        fit_probe(np.zeros((6, 4)), np.arange(6) % 2, np.zeros((2, 5)), np.arange(2), 2)
    assert "\n" not in str(e.value)


def test_probe_head_round_trips_and_predicts_the_same_on_the_device(tmp_path):
    x, y = _blobs(seed=4)
    head = fit_probe_head(*_split(x, y), 3)
    head.save(tmp_path / "head.npz")
    device = LinearHead.load(tmp_path / "head.npz")  # what the runtime reads
    assert device.l2 == head.l2 and not device.normalise
    np.testing.assert_array_equal(device.predict_proba(x), head.predict_proba(x))
    w, b = device.folded()  # a probe head still folds into the graph (export --logits)
    np.testing.assert_allclose(x.astype(np.float32) @ w + b, head.logits(x), atol=1e-4)


def test_export_refit_keeps_the_probe_penalty():
    from edge_tl.backbones import get_spec
    from edge_tl.export.fidelity import HeadFit, Images

    x, y = _blobs(seed=5)
    source = fit_probe_head(*_split(x, y), 3)
    pre = get_spec("efficientnet_lite0").preprocess
    images = Images([f"{i}.png" for i in range(len(y))], pre, y, pixels=np.zeros((len(y), 1)))
    refit = HeadFit(source, 3, images).for_engine(engine=None, emb=x + 0.01)
    assert refit.l2 == source.l2
    fine_tuned = LinearHead.from_logits_layer(source.weight, source.bias)  # l2 = 0
    refit = HeadFit(fine_tuned, 3, images).for_engine(engine=None, emb=x)
    assert refit.l2 in DEFAULT_L2_GRID  # chosen by the head's own hold-out, as before
