"""Anomaly detection from good images: the numerics against brute force, a bank learned on
real magnetic-tile images that finds real defects, field updates, versions, and the CLI's
one-line errors that leave the bank as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import anomaly as an
from edge_tl.runtime import evaluation as ev
from edge_tl.runtime import patchcore as pc
from tests.conftest import SHARED, need
from tests.test_cli import _one_line_error, cli

MT = SHARED / "magnetic_tile"


# ---- the numerics ---------------------------------------------------------------------
def test_neighbourhood_mean_and_resize_match_direct_computation():
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 7)).astype(np.float32)
    y = pc.avg_pool(x, 3)
    assert np.allclose(y[:, :, 2, 3], x[:, :, 1:4, 2:5].mean((2, 3)), atol=1e-5)
    assert np.allclose(y[:, :, 0, 6], x[:, :, 0:2, 5:7].mean((2, 3)), atol=1e-5)  # corner
    up = pc.upsample(x, 12, 14)
    assert up.shape == (2, 3, 12, 14)
    # a constant map stays constant; 2x upsampling puts samples a quarter pixel either side
    assert np.allclose(pc.upsample(np.ones((1, 1, 3, 3)), 7, 5), 1.0)
    a, b = 0.75, 0.25  # output 5 of 12 (and of 14) sits at input 2.25 of 6 (and of 7)
    want = a * a * x[..., 2, 2] + a * b * x[..., 2, 3] + b * a * x[..., 3, 2] + b * b * x[..., 3, 3]
    assert np.allclose(up[..., 5, 5], want, atol=1e-5)


def test_chunked_search_is_exact():
    rng = np.random.default_rng(1)
    q, bank = rng.normal(size=(50, 16)), rng.normal(size=(1000, 16))
    brute = ((q[:, None] - bank[None]) ** 2).sum(-1).min(1)
    got = pc.nearest(q.astype(np.float32), bank.astype(np.float32), chunk=64)
    assert np.allclose(got, brute, rtol=1e-4, atol=1e-4)


def test_kcenter_covers_every_cluster_and_grows_into_what_is_missing():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(5, 8)) * 50
    x = np.concatenate([c + rng.normal(size=(200, 8)) for c in centres]).astype(np.float32)
    picked = pc.kcenter(x, 5, dim=8)
    assert sorted(set(picked // 200)) == [0, 1, 2, 3, 4]  # one per cluster, random would not
    # a bank already covering clusters 0-3: growing it picks from cluster 4 first
    grown = pc.kcenter(x, 1, centres=x[[0, 200, 400, 600]], dim=8)
    assert grown[0] // 200 == 4


def test_auroc_counts_ties_as_half_and_histogram_auroc_agrees():
    assert ev.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert ev.auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.normal(0, 1, 5000), rng.normal(1, 1, 500)])
    y = np.r_[np.zeros(5000), np.ones(500)].astype(bool)
    h = ev.PixelAuroc(float(s.min()), float(s.max()))
    h.update(s[:2000], None)
    h.update(s[2000:], y[2000:])
    assert abs(h.value() - ev.auroc(s, y)) < 1e-3


def test_calibration_scores_each_good_image_without_its_own_patches():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(6, 9, 4)).astype(np.float32)
    state = an.build(feats, (3, 3), coreset=1.0, sigma=0.0)
    x = state.standardise(feats)
    for i in range(6):
        others = np.concatenate([x[j] for j in range(6) if j != i])
        others = others.astype(an.BANK_DTYPE).astype(np.float32)  # as the bank keeps them
        d = np.sqrt(((x[i][:, None] - others[None]) ** 2).sum(-1).min(1))
        assert np.allclose(state.loo_maps[i].ravel(), d, atol=1e-4)
    # the threshold lets through all but the target share of those leave-one-out scores,
    # each normalised by the position statistics of the other images
    scores = []
    for i in range(6):
        mu, sd = an._position_stats(np.delete(state.loo_maps, i, axis=0))
        scores.append(float(((state.loo_maps[i] - mu) / sd).max()))
    assert state.threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)


def test_cap_bounds_the_bank_and_add_keeps_it():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(20, 49, 32)).astype(np.float32)
    cap_mb = 100 * 32 * 2 / 1e6  # 100 half-precision patches
    state = an.build(feats, (7, 7), coreset=0.5, max_mb=cap_mb)
    assert len(state.bank) == 100 and state.bank_mb <= cap_mb
    grown = an.add(state, rng.normal(size=(5, 49, 32)).astype(np.float32) + 3)
    assert len(grown.bank) == 100 and len(grown.loo_maps) == 25
    with pytest.raises(EdgeTLError, match="at least 2 good images"):
        an.build(feats[:1], (7, 7))


def test_bank_is_kept_in_half_precision_and_older_single_precision_banks_still_score(tmp_path):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(8, 25, 16)).astype(np.float32)
    state = an.build(feats, (5, 5), coreset=0.5)
    assert state.bank.dtype == np.float16 and state.bank_mb == len(state.bank) * 16 * 2 / 1e6
    np.savez(tmp_path / "v.npz", **state.to_arrays())
    with np.load(tmp_path / "v.npz") as z:
        again = an.AnomalyState.from_arrays(z, "v.npz")
    assert again.bank.dtype == np.float16 and np.array_equal(again.bank, state.bank)
    # a bank written in single precision before loads as it was and scores the same
    old = {**state.to_arrays(), "bank": state.bank.astype(np.float32)}
    np.savez(tmp_path / "old.npz", **old)
    with np.load(tmp_path / "old.npz") as z:
        single = an.AnomalyState.from_arrays(z, "old.npz")
    q = rng.normal(size=(3, 25, 16)).astype(np.float32)
    assert single.bank.dtype == np.float32
    assert np.allclose(single.score(q, "exact")[1], state.score(q, "exact")[1], atol=1e-5)
    grown = an.add(single, q)  # growing it keeps its precision
    assert grown.bank.dtype == np.float32 and len(grown.bank) > len(single.bank)
    with np.load(tmp_path / "old.npz") as z:
        bad = {**{k: z[k] for k in z.files}, "bank": z["bank"].astype(np.int8)}
    with pytest.raises(EdgeTLError, match="not an edge_tl anomaly bank"):
        an.AnomalyState.from_arrays(bad, "bad.npz")


# ---- real images ----------------------------------------------------------------------
def _wide(p: Path) -> bool:
    with Image.open(p) as im:
        return im.size[0] > 1.5 * im.size[1]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> dict[str, Path]:
    """Real magnetic tiles: an MVTec-layout folder (60 good training images, none of them
    wide; 16 good test images of each shape, 8 of each of three defects with masks), and 20
    good wide tiles (an unseen variant) to add."""
    src = need(MT)
    root = tmp_path_factory.mktemp("tiles")
    mv = root / "mt"
    train = [p for p in sorted((src / "train/good").iterdir()) if not _wide(p)][:60]
    wide_train = [p for p in sorted((src / "train/good").iterdir()) if _wide(p)][:20]
    good = sorted((src / "test/good").iterdir())
    test_good = [p for p in good if not _wide(p)][:16] + [p for p in good if _wide(p)][:16]
    for dst, files in (("train/good", train), ("test/good", test_good)):
        (mv / dst).mkdir(parents=True)
        for p in files:
            shutil.copy(p, mv / dst / p.name)
    for defect in ("blowhole", "break", "uneven"):
        (mv / "test" / defect).mkdir(parents=True)
        (mv / "ground_truth" / defect).mkdir(parents=True)
        for p in sorted((src / "test" / defect).iterdir())[:8]:
            shutil.copy(p, mv / "test" / defect / p.name)
            m = f"{p.stem}_mask.png"
            shutil.copy(src / "ground_truth" / defect / m, mv / "ground_truth" / defect / m)
    (root / "wide").mkdir()
    for p in wide_train:
        shutil.copy(p, root / "wide" / p.name)
    wide_test = [mv / "test/good" / p.name for p in test_good if _wide(p)]
    return {"mvtec": mv, "wide": root / "wide", "wide_test": wide_test}


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    """A private copy of the ORT INT8 bundle (the bank is written into it)."""
    return Path(shutil.copytree(bundles["ort-int8"], tmp_path / "bundle"))


def _bank_bytes(bundle: Path) -> dict[str, bytes]:
    d = bundle / "anomaly"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


@pytest.mark.slow
def test_bank_from_good_tiles_finds_real_defects_and_writes_maps(bundle, tiles, tmp_path):
    res = cli("anomaly", bundle, tiles["mvtec"], "--json")  # MVTec root: uses train/good
    assert res.returncode == 0, res.stderr
    bank = json.loads(res.stdout)
    assert bank["images"] == 60 and bank["version"] == 1
    assert bank["bank_patches"] == round(an.DEFAULT_CORESET * 60 * 14 * 14)
    maps = tmp_path / "maps"
    res = cli("evaluate", bundle, tiles["mvtec"], "--json", "--maps", maps)
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    # 32 good vs 24 defective real tiles, chance 0.5; the bank has 60 tiles and none of the
    # wide variant that half the good test tiles are (the field-update test adds them).
    # Measured on this subset: image AUROC 0.788, pixel 0.755 (with a 10 % coreset 0.831 /
    # 0.710: on 60 or 150 good tiles the coreset share moves AUROC by under 1 pt either
    # way, on all 679 it adds 1 pt; the full set: 0.981 / 0.811)
    assert ev["image_auroc"] >= 0.75, ev
    assert ev["pixel_auroc"] >= 0.68, ev
    assert ev["n_good"] == 32 and ev["n_defective"] == 24
    # at the threshold calibrated for 1 % on 60 good training tiles (too few for 1 %: the
    # threshold is about the highest leave-one-out score; each image now also left out of
    # its position statistics, which raises it): measured 3 of 32 good test tiles flagged
    # (the wide variant the bank has not seen) and 8 of 24 defects found
    assert ev["false_alarm_rate"] <= 0.2 and ev["recall"] >= 0.25, ev
    pngs = sorted(maps.iterdir())
    assert len(pngs) == 56 and pngs[0].name.startswith("blowhole_")
    src = tiles["mvtec"] / "test/blowhole" / f"{pngs[0].stem[len('blowhole_') :]}.jpg"
    with Image.open(pngs[0]) as im, Image.open(src) as orig:
        assert im.size == (2 * orig.size[0] + 4, orig.size[1] + 16)

    # predict on an anomaly bundle: score, threshold, verdict; a restarted process agrees
    img = sorted((tiles["mvtec"] / "test/break").iterdir())[0]
    one = json.loads(cli("predict", bundle, img, "--json", "--maps", tmp_path / "p").stdout)[0]
    assert one["verdict"] in ("good", "anomalous") and one["threshold"] == ev["threshold"]
    assert (one["verdict"] == "anomalous") == (one["score"] > one["threshold"])
    assert Path(one["map_png"]).is_file()
    again = json.loads(cli("predict", bundle, img, "--json").stdout)[0]
    assert again["score"] == one["score"]
    res = cli("predict", bundle, img, "--classify", "--json")
    assert res.returncode == 0 and "label" in json.loads(res.stdout)[0]

    # --search exact compares every bank patch: a score at least as low as the fast one's
    # (the fast search's distances are upper bounds), and evaluate says which it used
    exact = json.loads(cli("predict", bundle, img, "--json", "--search", "exact").stdout)[0]
    assert exact["score"] <= one["score"] + 1e-4 and exact["threshold"] == one["threshold"]
    res = cli("evaluate", bundle, tiles["mvtec"], "--json", "--search", "exact")
    assert res.returncode == 0, res.stderr
    ev_exact = json.loads(res.stdout)
    assert ev["bank"]["search"] == "fast" and ev_exact["bank"]["search"] == "exact"
    assert abs(ev_exact["image_auroc"] - ev["image_auroc"]) <= 0.05, (ev, ev_exact)


@pytest.mark.slow
def test_field_update_flags_an_unseen_good_variant_less_and_rolls_back(bundle, tiles):
    from edge_tl.runtime import Model

    assert cli("anomaly", bundle, tiles["mvtec"]).returncode == 0

    def measure() -> tuple[float, float]:
        m = Model(bundle)
        flagged = np.mean(
            [r.verdict == "anomalous" for r in m.detector.predict(tiles["wide_test"])]
        )
        return float(flagged), m.detector.evaluate(tiles["mvtec"]).image_auroc

    flagged0, auroc0 = measure()
    res = cli("anomaly", bundle, tiles["wide"], "--add", "--json")
    assert res.returncode == 0, res.stderr
    grown = json.loads(res.stdout)
    assert grown["images"] == 80 and grown["parent"] == 1
    flagged1, auroc1 = measure()
    assert flagged1 < flagged0, (flagged0, flagged1)
    assert auroc1 >= auroc0, (auroc0, auroc1)

    # re-calibrating for more false alarms lowers the threshold; rollback restores v2, then v1
    t2 = grown["threshold"]
    t3 = json.loads(cli("anomaly", bundle, "--false-alarm", "0.2", "--json").stdout)["threshold"]
    assert t3 < t2
    assert cli("rollback", bundle, "--anomaly").returncode == 0
    assert Model(bundle).detector.state.threshold == pytest.approx(t2, abs=1e-4)
    res = cli("rollback", bundle, "--anomaly", "--to", "1", "--json")
    assert json.loads(res.stdout)["images"] == 60
    listing = json.loads(cli("rollback", bundle, "--anomaly", "--list", "--json").stdout)
    assert [h["version"] for h in listing] == [1, 2, 3] and listing[0]["current"]


@pytest.mark.slow
def test_bad_folders_get_one_line_and_leave_the_bank_intact(bundle, tiles, tmp_path):
    assert cli("anomaly", bundle, tiles["wide"]).returncode == 0
    before = _bank_bytes(bundle)

    no_train = tmp_path / "no_train"
    shutil.copytree(tiles["mvtec"] / "test", no_train / "test")
    _one_line_error(cli("anomaly", bundle, no_train), "no train/good")

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(cli("anomaly", bundle, empty), "has no images")
    _one_line_error(cli("anomaly", bundle, empty, "--add"), "has no images")

    broken = tmp_path / "broken"
    shutil.copytree(tiles["wide"], broken)
    (broken / "zz_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _one_line_error(cli("anomaly", bundle, broken, "--add"), "zz_truncated.jpg")

    _one_line_error(cli("anomaly", bundle, tiles["wide"], "--coreset", "0"), "--coreset")
    _one_line_error(cli("anomaly", bundle, tiles["wide"], "--false-alarm", "1"), "--false-alarm")
    _one_line_error(cli("anomaly", bundle, tiles["wide"], "--stages", "nope"), "nope")
    _one_line_error(cli("anomaly", bundle, tiles["wide"], "--stages", "embedding"), "embedding")
    _one_line_error(cli("anomaly", bundle, tiles["wide"], "--pool", "2"), "--pool", "odd")
    _one_line_error(
        cli("anomaly", bundle, tiles["wide"], "--add", "--stages", "features_s8"), "--add keeps"
    )
    _one_line_error(
        cli("anomaly", bundle, "--false-alarm", "0.05", "--coreset", "0.5"), "--coreset"
    )
    _one_line_error(cli("anomaly", bundle, tiles["mvtec"] / "test"), "pass", "good")
    maps_file = tmp_path / "maps.txt"
    maps_file.write_text("not a folder")
    img = next((tiles["mvtec"] / "test/break").iterdir())
    _one_line_error(cli("predict", bundle, img, "--maps", maps_file), "is a file")
    _one_line_error(cli("predict", bundle, img, "--top-k", "3"), "--top-k", "--classify")
    _one_line_error(cli("predict", bundle, img, "--classify", "--maps", tmp_path / "m"), "--maps")
    assert _bank_bytes(bundle) == before

    # masks whose size differs from their images: refused before anything is scored
    bad_masks = tmp_path / "bad_masks"
    shutil.copytree(tiles["mvtec"], bad_masks)
    mask = next((bad_masks / "ground_truth/break").iterdir())
    with Image.open(mask) as m:
        m.resize((m.size[0] // 2, m.size[1])).save(mask)
    _one_line_error(cli("evaluate", bundle, bad_masks, "--maps", tmp_path / "m"), mask.name)
    assert not (tmp_path / "m").exists()
    assert _bank_bytes(bundle) == before

    _one_line_error(cli("evaluate", bundle, tiles["mvtec"], "--split", "test"), "--split")


@pytest.mark.slow
def test_bundle_without_a_bank_says_how_to_build_one(bundles, tiles):
    calls = (
        ("evaluate", tiles["mvtec"]),
        ("anomaly", tiles["wide"], "--add"),
        ("rollback", "--anomaly"),
    )
    for args in calls:
        _one_line_error(cli(args[0], bundles["ort-int8"], *args[1:]), "edge-tl anomaly")
    img = next((tiles["mvtec"] / "test/break").iterdir())
    _one_line_error(
        cli("predict", bundles["ort-int8"], img, "--search", "exact"), "--search", "has none"
    )
    assert not (bundles["ort-int8"] / "anomaly").exists()
