"""Accuracy control's verdict per try: a try measured without a head refit (it already misses
on what needs none) is never a pass, and both heads' top-1 drops count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edge_tl.export.accuracy_control import AccuracyControl, Candidate
from edge_tl.export.fidelity import HeadFit, Images
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import EMBEDDING, Preprocess, load_recipe


class _Engine:
    """Returns fixed embeddings, batch after batch, whatever the input."""

    def __init__(self, emb: np.ndarray) -> None:
        self.emb, self.i = emb, 0

    def run(self, x: np.ndarray, names) -> dict[str, np.ndarray]:
        out = self.emb[self.i : self.i + len(x)]
        self.i += len(x)
        return {EMBEDDING: out}


def _control(tmp_path: Path, artifact_emb: np.ndarray, refits: list[int]):
    rng = np.random.default_rng(0)
    n, d = 200, 8
    y = np.arange(n) % 2
    ref = rng.normal(size=(n, d)).astype(np.float32)
    ref[:, 0] += 3.0 * (2 * y - 1)  # class in the first dimension
    head = LinearHead.fit(ref, y, 2, l2=1.0)
    pre = Preprocess(size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    check = Images([f"{i}.png" for i in range(n)], pre, y, pixels=np.zeros((n, 3, 4, 4), np.uint8))

    class _Heads(HeadFit):
        def for_engine(self, engine, emb=None):
            refits.append(1)
            return head

    # the FP32 artifact's refit head (the reference's) is weaker than the run's own: a drop
    # measured against it alone would hide the run's head's loss
    blind = ref.copy()
    blind[:, 0] = 0.0
    ref_head = LinearHead.fit(blind, y, 2, l2=1.0)
    rec = dataclasses.replace(load_recipe("ort-int8"), min_cosine=0.8, max_top1_drop=0.05)
    c = AccuracyControl(
        tmp_path / "g.onnx", rec, None, tmp_path, tmp_path, check, ref, ref_head, _Heads(head, 2)
    )
    engine = _Engine(artifact_emb)
    c.build = lambda recipe, calib=None, validation=None, into=None: (None, engine)
    return c, ref, y


def test_a_try_that_misses_the_cosine_floor_fails_without_a_refit(tmp_path):
    refits: list[int] = []
    rng = np.random.default_rng(1)
    c, ref, _ = _control(tmp_path, np.zeros((200, 8), np.float32), refits)
    noisy = ref + rng.normal(scale=5.0, size=ref.shape).astype(np.float32)
    c.build = lambda recipe, calib=None, validation=None, into=None: (None, _Engine(noisy))
    a = c.attempt("as written", c.recipe)
    assert a.cosine_mean < 0.8 and not a.passed
    assert refits == []  # the training split was not embedded again
    assert "without a refit" in a.note
    assert isinstance(c.last, Candidate)


def test_the_run_heads_drop_fails_a_try_whose_cosine_passes(tmp_path):
    refits: list[int] = []
    c, ref, y = _control(tmp_path, np.zeros((200, 8), np.float32), refits)
    flipped = ref.copy()
    wrong = np.flatnonzero(y == 1)[:20]  # 10 % of the images cross to the other class
    flipped[wrong, 0] = -flipped[wrong, 0]
    c.build = lambda recipe, calib=None, validation=None, into=None: (None, _Engine(flipped))
    a = c.attempt("as written", c.recipe)
    assert a.cosine_mean >= 0.8
    assert a.top1_drop is not None and a.top1_drop > 0.05
    assert not a.passed and refits == []


def test_a_try_within_both_tolerances_passes_with_the_refit_head(tmp_path):
    refits: list[int] = []
    c, ref, _ = _control(tmp_path, np.zeros((200, 8), np.float32), refits)
    close = ref + np.float32(0.01)
    c.build = lambda recipe, calib=None, validation=None, into=None: (None, _Engine(close))
    a = c.attempt("as written", c.recipe)
    assert a.passed and refits == [1]
