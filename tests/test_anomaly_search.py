"""The anomaly bank's search (exact and inverted lists) against brute force, and the
bounded-memory streaming build against the all-in-memory build, on synthetic and on real
magnetic-tile features."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import anomaly as an
from edge_tl.runtime import search as bs
from edge_tl.runtime import streaming as st
from tests.conftest import SHARED, need


def _brute(q: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return ((q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1).min(1)


def _clustered(rng, n: int, dim: int = 24, k: int = 30) -> np.ndarray:
    """``n`` points around ``k`` fixed cluster centres (the same centres for every call)."""
    centres = np.random.default_rng(99).normal(size=(k, dim)) * 4
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def test_exact_search_matches_brute_force_in_blocks():
    rng = np.random.default_rng(0)
    q, bank = _clustered(rng, 300), _clustered(rng, 2000)
    got = bs.exact(q, bs.augmented(bank), chunk=256, rows=64)
    assert np.allclose(got, _brute(q, bank), rtol=1e-4, atol=1e-3)


def test_fast_search_is_exact_with_every_list_and_an_upper_bound_with_few():
    rng = np.random.default_rng(1)
    q, bank = _clustered(rng, 400), _clustered(rng, 3000)
    brute = _brute(q, bank)
    index = bs.BankIndex(bank, list_size=100)
    assert 20 <= index.lists <= 30  # 3000 / 100, less any list k-means left empty
    assert np.allclose(index.nearest(q, nprobe=index.lists), brute, rtol=1e-4, atol=1e-3)
    few = index.nearest(q, nprobe=2)
    assert np.all(few >= brute * (1 - 1e-4) - 1e-3)  # never nearer than the nearest
    # each query's answer is the exact distance to a patch of one of its probed lists: with
    # well-separated clusters the nearest patch is there for almost every query
    assert np.mean(np.isclose(few, brute, rtol=1e-4, atol=1e-3)) > 0.9
    # queries taken a block at a time give the same answers (to rounding: BLAS may sum a
    # product of another shape in another order)
    assert np.allclose(index.nearest(q, nprobe=2, rows=37), few, rtol=1e-4, atol=1e-3)
    # every row of the bank is in exactly one list
    assert sorted(index.order) == list(range(len(bank)))


def test_state_search_setting_and_unknown_search():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(12, 49, 16)).astype(np.float32)
    state = an.build(feats, (7, 7), coreset=0.5)
    exact, _ = state.score(feats[:3], "exact")
    fast, _ = state.score(feats[:3])
    assert fast.shape == exact.shape == (3,)
    with pytest.raises(EdgeTLError, match="--search 'nearest'"):
        state.score(feats[:3], "nearest")


def test_running_stats_match_numpy_over_uneven_chunks():
    rng = np.random.default_rng(3)
    x = rng.normal(5, 3, size=(1000, 7))
    stats = st.RunningStats(7)
    for a, b in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        stats.update(x[a:b])
    assert np.allclose(stats.mean, x.mean(0)) and np.allclose(stats.std, x.std(0))


def test_streaming_build_equals_in_memory_build_with_the_whole_bank(tmp_path):
    rng = np.random.default_rng(4)
    feats = (rng.normal(size=(40, 49, 16)) * rng.uniform(0.5, 3, 16) + 2).astype(np.float32)
    ref = an.build(feats, (7, 7), coreset=1.0)
    chunks = (feats[i : i + 7] for i in range(0, 40, 7))  # uneven last chunk
    got = st.build_streaming(chunks, (7, 7), coreset=1.0, work_dir=tmp_path)
    assert np.allclose(got.mean, ref.mean, atol=1e-5) and np.allclose(got.scale, ref.scale)
    # equal up to one step of half precision (the running mean differs in the last bits)
    half = float(np.finfo(np.float16).eps)
    assert np.allclose(got.bank, ref.bank, rtol=half, atol=half)
    assert np.array_equal(got.owner, ref.owner)
    assert np.allclose(got.loo_maps, ref.loo_maps, atol=4 * half)
    assert got.threshold == pytest.approx(ref.threshold, abs=4 * half)
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def test_streaming_build_keeps_the_coreset_share_and_the_cap():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(30, 49, 32)).astype(np.float32)
    state = st.build_streaming((feats[i : i + 4] for i in range(0, 30, 4)), (7, 7), coreset=0.1)
    assert len(state.bank) == round(0.1 * 30 * 49)
    assert set(np.unique(state.owner)) <= set(range(30))
    cap_mb = 100 * 32 * 2 / 1e6  # 100 half-precision patches
    capped = st.build_streaming(
        (feats[i : i + 4] for i in range(0, 30, 4)), (7, 7), coreset=0.5, max_mb=cap_mb
    )
    assert len(capped.bank) == 100 and capped.bank_mb <= cap_mb
    with pytest.raises(EdgeTLError, match="at least 2 good images"):
        st.build_streaming(iter([feats[:1]]), (7, 7))
    with pytest.raises(EdgeTLError, match="same grid"):
        st.build_streaming(iter([feats[:3], feats[:3, :25]]), (7, 7))


# ---- real features -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tile_features(bundles) -> tuple[np.ndarray, np.ndarray]:
    """Stride-16 patch features of 48 good training tiles and 24 test tiles (8 good,
    16 defective) through the ORT INT8 bundle."""
    from edge_tl.runtime import Model

    src = need(SHARED / "magnetic_tile")
    good = sorted((src / "train/good").iterdir())[::14][:48]
    test = sorted((src / "test/good").iterdir())[:8]
    test += (
        sorted((src / "test/blowhole").iterdir())[:8] + sorted((src / "test/break").iterdir())[:8]
    )
    m = Model(bundles["ort-int8"])
    return m.patch_features([str(p) for p in good]), m.patch_features([str(p) for p in test])


@pytest.mark.slow
def test_fast_search_agrees_with_exact_on_real_tiles(tile_features):
    train, test = tile_features
    state = an.build(train, (14, 14))
    q = state.standardise(test).reshape(-1, test.shape[-1])
    exact, fast = np.sqrt(state.nearest(q, "exact")), np.sqrt(state.nearest(q, "fast"))
    assert np.all(fast >= exact - 1e-3)
    # measured: 97 % of the 4,704 test patches get the exact nearest distance, mean
    # excess 0.1 %; the image scores move by well under the gap to the threshold
    assert np.mean(np.isclose(fast, exact, rtol=1e-4)) > 0.85
    assert np.mean((fast - exact) / exact) < 0.01
    s_exact, _ = state.score(test, "exact")
    s_fast, _ = state.score(test, "fast")
    assert np.allclose(s_fast, s_exact, atol=0.05 * np.ptp(s_exact))


@pytest.mark.slow
def test_streaming_build_is_close_to_the_in_memory_build_on_real_tiles(tile_features, tmp_path):
    train, _ = tile_features
    ref = an.build(train, (14, 14))
    got = st.build_streaming((train[i : i + 10] for i in range(0, 48, 10)), (14, 14))
    assert len(got.bank) == len(ref.bank)
    assert np.allclose(got.mean, ref.mean, rtol=1e-3, atol=1e-3)
    # another coreset (chunk by chunk): the good images' leave-one-out distances stay close
    ratio = np.median(got.loo_maps / ref.loo_maps)
    assert 0.95 < ratio < 1.05
    assert got.threshold == pytest.approx(ref.threshold, rel=0.15)
