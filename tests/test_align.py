"""On-device feature alignment (edge_tl.runtime.align, ``edge-tl adapt``): the arithmetic on
small matrices, the cross-check against skada's CORALAdapter on real embeddings, and the
command on a real bundle (versions, rollback, learning after it, bad input)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.align import (
    Alignment,
    Moments,
    fit_alignment,
    moments,
    shrinkage_reg,
)
from edge_tl.runtime.heads import LinearHead, PrototypeHead
from tests.conftest import NEU, need


def _skewed(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Non-negative, correlated rows like pooled ReLU6 embeddings."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.maximum(rng.normal(size=(n, d)) @ mix * scale + 0.3, 0).astype(np.float32)


# ---- the arithmetic ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [30, 90])  # fewer and more images than dimensions
def test_moments_factor_the_sample_covariance(n):
    x = _skewed(n, 40, 0)
    m = moments(x, rank=None)
    assert m.mean.dtype == np.float32 and m.basis.dtype == np.float32 and m.var.dtype == np.float64
    assert m.mean.shape == (40,) and m.basis.shape[0] == 40 and m.basis.shape[1] == len(m.var)
    np.testing.assert_allclose(m.covariance(), np.cov(x.T, bias=True), atol=1e-5)
    np.testing.assert_allclose(m.basis.T @ m.basis, np.eye(len(m.var)), atol=1e-5)
    cut = moments(x, rank=5)  # the rest by its mean: the trace is kept
    assert cut.basis.shape == (40, 5)
    assert np.trace(cut.covariance()) == pytest.approx(np.trace(np.cov(x.T, bias=True)), 1e-5)


def test_matrix_powers_are_the_symmetric_ones():
    x = _skewed(60, 20, 1)
    m = moments(x, rank=None)
    w, v = np.linalg.eigh(m.covariance(0.5))
    root = (v * np.sqrt(w)) @ v.T
    z = np.random.default_rng(2).normal(size=(7, 20))
    np.testing.assert_allclose(m.matpow(z, 0.5, 0.5), z @ root, atol=1e-8)
    np.testing.assert_allclose(m.matpow(m.matpow(z, 0.5, 0.5), -0.5, 0.5), z, atol=1e-8)


def test_coral_is_the_identity_when_the_target_is_the_source():
    x = _skewed(80, 30, 3)
    al = fit_alignment("coral", x, moments(x, rank=None), reg=0.1, rank=None)
    out = al.apply(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_center_replaces_the_heads_centre_with_the_targets():
    xs, xt = _skewed(50, 16, 4), _skewed(50, 16, 5, scale=2.0) + 0.5
    y = np.arange(50) % 2
    linear = LinearHead.fit(xs, y, 2, l2=1e-2)  # standardised around the source mean
    al = fit_alignment("center", xt)
    np.testing.assert_allclose(al.apply(xt, linear).mean(0), linear.mean, atol=1e-5)
    proto = PrototypeHead.fit(xs, y, 2)  # CL2N in the power space: its centre is replaced
    p = np.sign(al.apply(xt, proto)) * np.sqrt(np.abs(al.apply(xt, proto)))
    np.testing.assert_allclose(p.mean(0), proto.centre, atol=1e-5)
    assert fit_alignment("center", xs).apply(xs, linear) == pytest.approx(xs, abs=1e-5)


def test_alignment_arrays_round_trip_and_damage_is_named():
    xs, xt = _skewed(60, 12, 6), _skewed(60, 12, 7)
    al = fit_alignment("coral", xt, moments(xs))
    back = Alignment.from_arrays(al.to_arrays(), 12)
    np.testing.assert_array_equal(back.apply(xt), al.apply(xt))
    bad = {**al.to_arrays(), "align_source_basis": np.zeros((12, 99), np.float32)}
    with pytest.raises(ValueError, match="align_source_basis"):
        Alignment.from_arrays(bad, 12)
    with pytest.raises(ValueError, match="not 13 numbers"):
        Moments.from_arrays(al.to_arrays(), "align_target_", dim=13)
    with pytest.raises(EdgeTLError, match="at least 50 target images, got 20"):
        fit_alignment("coral", xt[:20], moments(xs))
    with pytest.raises(EdgeTLError, match="--reg must be a number > 0"):
        fit_alignment("coral", xt, moments(xs), reg=0.0)


# ---- real embeddings -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> dict[str, list[str]]:
    """60 real NEU-DET images (3 classes x 20, not those of ``neu_small``) and the same
    images through the simulated camera change of :mod:`edge_tl.domains`, as flat folders."""
    from PIL import Image

    from edge_tl.domains import camera_shift

    root = tmp_path_factory.mktemp("shifted")
    out: dict[str, list[str]] = {"source": [], "target": []}
    for d in ("source", "target"):
        (root / d).mkdir()
    for c in ("crazing", "patches", "scratches"):
        for i, p in enumerate(sorted((need(NEU) / c).iterdir())[16:36]):
            name = f"{c}_{p.stem}.png"
            with Image.open(p) as img:
                img.convert("RGB").save(root / "source" / name)
                camera_shift(img, i).save(root / "target" / name)
            out["source"].append(str(root / "source" / name))
            out["target"].append(str(root / "target" / name))
    return out


@pytest.fixture(scope="module")
def embedded(bundles, shifted) -> dict[str, np.ndarray]:
    from edge_tl.runtime import Model

    m = Model(bundles["onnx-fp32"])
    return {k: m.embed(v) for k, v in shifted.items()}


@pytest.mark.slow
def test_coral_matches_skada_on_real_embeddings(embedded, bundles):
    """skada's CORALAdapter adapts its source to its target; here the target (the shifted
    images) is aligned to the source, so the roles swap: skada's source is our target. With
    skada's shrinkage ``s`` turned into the same ``C + reg I`` (:func:`shrinkage_reg`) and no
    truncation, the features agree up to the source mean skada leaves out."""
    skada = pytest.importorskip("skada")
    xs, xt = embedded["source"], embedded["target"]
    head = LinearHead.load(bundles["onnx-fp32"] / "head.npz")
    for s in (0.1, 0.5):
        src, tgt = moments(xs, rank=None), moments(xt, rank=None)
        ours = fit_alignment(
            "coral", xt, src, reg=(shrinkage_reg(tgt, s), shrinkage_reg(src, s)), rank=None
        ).apply(xt)
        x = np.concatenate([xt, xs]).astype(np.float64)
        domain = np.r_[np.ones(len(xt)), -np.ones(len(xs))].astype(int)
        adapter = skada.CORALAdapter(reg=s).fit(x, sample_domain=domain)
        theirs = adapter.transform(
            xt.astype(np.float64), sample_domain=domain[: len(xt)], allow_source=True
        )
        theirs = theirs + xs.astype(np.float64).mean(0)
        np.testing.assert_allclose(ours, theirs, atol=2e-4 * np.abs(theirs).max())
        pred = head.predict_proba(ours).argmax(1)
        np.testing.assert_array_equal(pred, head.predict_proba(theirs).argmax(1))


@pytest.mark.slow
def test_coral_moves_the_target_covariance_towards_the_sources(embedded):
    xs, xt = embedded["source"], embedded["target"]
    cs = np.cov(xs.T, bias=True)
    before = np.linalg.norm(np.cov(xt.T, bias=True) - cs)
    aligned = fit_alignment("coral", xt, moments(xs)).apply(xt)
    after = np.linalg.norm(np.cov(aligned.T, bias=True) - cs)
    assert after < 0.7 * before, (before, after)
    assert np.linalg.norm(aligned.mean(0) - xs.mean(0)) < 1e-3


# ---- the command ---------------------------------------------------------------------------
def _cli(*args: str) -> int:
    from edge_tl.cli import main

    return main([str(a) for a in args])


def _listing(bundle: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(bundle)), p.stat().st_size) for p in bundle.rglob("*"))


@pytest.mark.slow
def test_adapt_versions_rolls_back_and_keeps_learning(bundles, shifted, tmp_path, capsys):
    from edge_tl.runtime import Model

    bundle = shutil.copytree(bundles["onnx-fp32"], tmp_path / "b")
    target = Path(shifted["target"][0]).parent
    probe = shifted["target"][::7]
    before = [p.top_k for p in Model(bundle).predict(probe, top_k=3)]

    assert _cli("adapt", bundle, target) == 0
    assert "aligned to the target (coral on 60 images)" in capsys.readouterr().out
    after = [p.top_k for p in Model(bundle).predict(probe, top_k=3)]
    assert after != before
    assert _cli("rollback", bundle, "--list") == 0
    assert "* v1" in capsys.readouterr().out.replace("adapt coral on 60 images", "ok")

    assert _cli("adapt", bundle, target, "--method", "center", "--json") == 0
    assert '"alignment": "center on 60 images"' in capsys.readouterr().out
    assert _cli("rollback", bundle) == 0  # back to coral
    assert [p.top_k for p in Model(bundle).predict(probe, top_k=3)] == after
    assert _cli("adapt", bundle, "--off") == 0
    assert [p.top_k for p in Model(bundle).predict(probe, top_k=3)] == before  # bit-identical

    # learning after an alignment: a new class from a few target-camera images
    assert _cli("adapt", bundle, target) == 0
    from PIL import Image

    from edge_tl.domains import camera_shift

    new = []
    for i, p in enumerate(sorted((need(NEU) / "inclusion").iterdir())[:5]):
        with Image.open(p) as img:
            camera_shift(img, i).save(tmp_path / f"inclusion_{i}.png")
        new.append(str(tmp_path / f"inclusion_{i}.png"))
    state = Model(bundle).classifier.add_class("inclusion", new)
    assert state.labels[-1] == "inclusion" and state.align is not None
    assert [p.label for p in Model(bundle).predict(new)].count("inclusion") >= 4
    ops = [h["op"] for h in Model(bundle).classifier.history()]
    assert ops == [
        "adapt coral on 60 images",
        "adapt center on 60 images",
        "adapt off",
        "adapt coral on 60 images",
        "add",
    ]


@pytest.mark.slow
def test_adapt_bad_input_one_line_nothing_written(bundles, shifted, tmp_path, capsys):
    bundle = shutil.copytree(bundles["onnx-fp32"], tmp_path / "b")
    few = tmp_path / "few"
    few.mkdir()
    for p in shifted["target"][:12]:
        shutil.copy(p, few)
    (tmp_path / "empty").mkdir()
    snapshot = _listing(bundle)
    cases = [
        ((), "adapt needs TARGET"),
        ((tmp_path / "empty",), "has no images"),
        ((tmp_path / "missing",), "does not exist"),
        ((few,), "coral needs at least 50 target images"),
        ((few, "--reg", "-1"), "--reg must be a number > 0"),
        ((few, "--off"), "--off turns the alignment off"),
        (("--off",), "has no alignment in force"),
    ]
    for args, expected in cases:
        assert _cli("adapt", bundle, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)
    assert _listing(bundle) == snapshot
    assert _cli("adapt", bundle, few, "--method", "center") == 0  # 12 >= 10 for a centre


@pytest.mark.slow
def test_adapt_refuses_old_bundles_and_text_bundles(bundles, text_fp32_bundle, shifted, tmp_path):
    """A bundle exported before the source statistics: coral names the fix (re-export),
    center still works (it needs only the head's centre). A text bundle is refused."""
    import json

    from edge_tl.runtime import Model
    from edge_tl.runtime.align import SOURCE_STATS

    old = shutil.copytree(bundles["onnx-fp32"], tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][SOURCE_STATS]
    (old / SOURCE_STATS).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    target = Path(shifted["target"][0]).parent
    with pytest.raises(EdgeTLError, match="no source statistics.*re-export it"):
        Model(old).adapt(target)
    assert Model(old).adapt(target, method="center").align is not None
    text = shutil.copytree(text_fp32_bundle, tmp_path / "text")
    with pytest.raises(EdgeTLError, match="text model.*aligns image embeddings"):
        Model(text).adapt(target)
