"""The anomaly scorer's geometry and calibration: a map cell lands on the pixels it
covers, the threshold is calibrated with each good image left out of its own position
statistics, and a backbone exported at another input size is scored on that size's grid."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edge_tl.runtime import anomaly as an
from edge_tl.runtime import patchcore as pc
from tests.conftest import SHARED, need
from tests.test_cli import _one_line_error, cli


def test_calibration_scores_leave_each_image_out_of_its_position_statistics():
    rng = np.random.default_rng(0)
    loo = rng.gamma(4.0, 1.0, (15, 4, 5)).astype(np.float32)
    loo[3, 1, 2] += 12.0  # one good image with one unusual position
    got = an._calibration_scores(loo)
    for i in range(len(loo)):
        mu, sd = an._position_stats(np.delete(loo, i, axis=0))
        assert got[i] == pytest.approx(float(((loo[i] - mu) / sd).max()), rel=1e-4)
    mu, sd = an._position_stats(loo)  # the image in its own statistics: scored lower
    assert got[3] > float(((loo[3] - mu) / sd).max()) + 0.5
    state_scores = an.build(rng.standard_normal((6, 4, 3)).astype(np.float32), (2, 2)).loo_scores
    assert state_scores.shape == (6,) and np.isfinite(state_scores).all()


@pytest.mark.parametrize(("grid", "size"), [((14, 14), (330, 250)), ((20, 20), (114, 618))])
def test_a_map_cell_lands_on_the_pixels_it_covers(grid, size):
    """The input is the whole image squashed, so grid cell (r, c) covers the pixels
    [r H / gh, (r + 1) H / gh) x [c W / gw, (c + 1) W / gw) of the original image."""
    w, h = size
    for r, c in ((0, 0), (3, grid[1] - 2), (grid[0] - 1, 5)):
        m = np.zeros(grid, np.float32)
        m[r, c] = 1.0
        up = pc.resize_map(m, size)
        assert up.shape == (h, w)
        y, x = np.unravel_index(int(up.argmax()), up.shape)
        assert r * h / grid[0] - 1 <= y < (r + 1) * h / grid[0] + 1
        assert c * w / grid[1] - 1 <= x < (c + 1) * w / grid[1] + 1


def test_bad_export_image_size_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "b"
    res = cli("export", "--backbone", "efficientnet_lite0", "--image-size", "100", "--out", out)
    _one_line_error(res, "--image-size 100", "multiple of 32")
    run = tmp_path / "run"
    run.mkdir()
    res = cli("export", run, "--image-size", "320", "--out", out)
    _one_line_error(res, "--image-size 320", "train")
    assert not out.exists()


@pytest.mark.slow
def test_a_backbone_exported_at_another_size_is_scored_on_that_grid(tmp_path):
    from edge_tl.runtime import Model

    src = need(SHARED / "magnetic_tile") / "train" / "good"
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted(src.iterdir())[:12]:
        shutil.copy(p, good / p.name)
    bundle = tmp_path / "bundle"
    res = cli(
        "export", "--backbone", "efficientnet_lite0", "--image-size", "256", "--calib", good,
        "--out", bundle,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocess"]["size"] == 256
    assert manifest["outputs"]["features_s16"][-2:] == [16, 16]
    det = Model(bundle).detector
    state = det.fit(good)
    assert state.grid == (16, 16) and state.loo_maps.shape == (12, 16, 16)
    img = sorted(good.iterdir())[0]
    (v,) = det.predict([img], maps=True)
    with Image.open(img) as im:
        assert v.map.shape == (im.size[1], im.size[0])  # the map is at the image's size
    again = Model(bundle).detector.require()  # the bank reloads with its grid
    assert again.grid == (16, 16)
