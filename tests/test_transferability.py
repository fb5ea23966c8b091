"""Transferability scores against values computed by hand or by their direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.transferability import evidence, h_score, leep, logme


def _max_evidence(f: np.ndarray, target: np.ndarray) -> float:
    """The maximum over (alpha, beta) of the direct evidence formula, by a generic optimiser
    from several starts: independent of LogME's SVD and fixed-point iteration."""
    from scipy.optimize import minimize

    best = -np.inf
    for a0 in (-4.0, 0.0, 4.0):
        for b0 in (-2.0, 0.0, 3.0):
            r = minimize(
                lambda p: -evidence(f, target, np.exp(p[0]), np.exp(p[1])),
                [a0, b0],
                method="Nelder-Mead",
                bounds=[(-30, 30), (-30, 30)],
                options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000},
            )
            best = max(best, -r.fun)
    return best


@pytest.mark.parametrize("shape", [(12, 3), (5, 8)])  # more samples than features, and fewer
def test_logme_is_the_mean_maximum_evidence_over_classes(shape):
    rng = np.random.default_rng(1)
    n, d = shape
    y = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + 2.0 * np.eye(3, d)[y]
    direct = np.mean([_max_evidence(f, (y == c).astype(float)) for c in range(3)])
    assert logme(f, y) == pytest.approx(direct, abs=1e-6)


def test_h_score_of_a_four_by_two_matrix_by_hand():
    # f = [1,0],[3,0] (class 0); [0,1],[0,3] (class 1). Mean (1, 1).
    # cov(f) = 1/4 [[6,-4],[-4,6]] = [[1.5,-1],[-1,1.5]]; inverse = [[1.2,0.8],[0.8,1.2]].
    # class means, centred: (1,-1), (-1,1), each with weight 1/2 -> cov = [[1,-1],[-1,1]].
    # inverse @ between = [[0.4,-0.4],[-0.4,0.4]]: trace 0.8.
    f = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert h_score(f, np.array([0, 0, 1, 1])) == pytest.approx(0.8, abs=1e-12)


def test_leep_of_a_small_case_from_its_definition():
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    y = np.array([0, 0, 1, 1])
    # joint P(y, z) = column sums per class / 4: y0 (0.3, 0.125, 0.075), y1 (0.075, 0.2, 0.225)
    # P(z) = (0.375, 0.325, 0.3); P(y0 | z) = (0.8, 5/13, 0.25), P(y1 | z) = (0.2, 8/13, 0.75)
    eep = [
        0.7 * 0.8 + 0.2 * 5 / 13 + 0.1 * 0.25,
        0.5 * 0.8 + 0.3 * 5 / 13 + 0.2 * 0.25,
        0.1 * 0.2 + 0.6 * 8 / 13 + 0.3 * 0.75,
        0.2 * 0.2 + 0.2 * 8 / 13 + 0.6 * 0.75,
    ]
    assert leep(p, y) == pytest.approx(sum(math.log(e) for e in eep) / 4, abs=1e-12)


def test_features_that_carry_the_labels_score_higher_than_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    noise = rng.normal(size=(200, 32))
    informative = noise + 2.0 * np.eye(4, 32)[y]
    assert logme(informative, y) > logme(noise, y) + 0.05
    assert h_score(informative, y) > h_score(noise, y) + 1.0
    logits = np.zeros((200, 10))
    logits[np.arange(200), y] = 4.0  # a source classifier whose classes align with the labels
    aligned = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    shuffled = aligned[rng.permutation(200)]
    assert leep(aligned, y) > leep(shuffled, y) + 0.5


def test_scores_keep_their_ranges_and_logme_ignores_the_scale():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    f = rng.normal(size=(90, 16)) + np.eye(3, 16)[y]
    assert logme(1000.0 * f, y) == pytest.approx(logme(f, y), abs=1e-6)
    assert 0.0 <= h_score(f, y) <= 2.0 + 1e-9
    p = rng.dirichlet(np.ones(7), size=90)
    assert leep(p, y) <= 0.0
    # all probabilities equal -> P(y | x) is the class prior
    prior = np.bincount(y) / len(y)
    assert leep(np.full((90, 7), 1 / 7), y) == pytest.approx(np.log(prior[y]).mean())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: logme(np.zeros((4, 2)), np.zeros(4, dtype=int)), "at least two classes"),
        (lambda: logme(np.zeros((4, 2)), np.array([0, 1, 0])), r"features \[N, D\]"),
        (lambda: h_score(np.full((2, 2), np.nan), np.array([0, 1])), "NaN"),
        (lambda: leep(np.ones((2, 3)), np.array([0, 1])), "rows summing to 1"),
        (lambda: logme(np.ones((2, 2)), np.array([0.0, 1.0])), "integer class labels"),
    ],
)
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(EdgeTLError, match=match):
        call()
