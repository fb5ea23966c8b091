"""The boundary cache's data path and the benchmarks that time cached training: in-place
normalisation gives the same numbers, the exported prefix (non-spinning engine, decode in
DataLoader workers) gives PyTorch's activations, and ``benchmarks/train_speed.py --ratio``
and ``benchmarks/scaling.py`` measure what they say on real images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_tl.backbones import build  # noqa: E402
from edge_tl.data import open_dataset, split  # noqa: E402
from edge_tl.train import TrainConfig  # noqa: E402
from edge_tl.train.augment import PRESETS, augment, normalise  # noqa: E402
from edge_tl.train.batches import TrainingData  # noqa: E402
from edge_tl.train.policies import make_policy  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_normalising_in_place_gives_the_same_numbers_and_reuses_the_tensor():
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    mean, std = (0.5 * 255, 0.4 * 255, 0.3 * 255), (0.2 * 255, 0.25 * 255, 0.3 * 255)
    ref = normalise(px.float(), mean, std)
    x = px.float()
    out = normalise(x, mean, std, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(out, ref)  # bit for bit: the same two IEEE operations
    aug = augment(px.float(), PRESETS["inspection"], torch.Generator().manual_seed(1))
    assert torch.equal(normalise(aug.clone(), mean, std, inplace=True), normalise(aug, mean, std))
    # a tensor that is not float32 is never overwritten
    assert torch.equal(normalise(px, mean, std, inplace=True), ref)
    assert px.dtype == torch.uint8


@pytest.mark.slow
def test_cache_from_the_exported_prefix_matches_pytorch(neu_small):
    ds = open_dataset(neu_small)
    cfg = TrainConfig(strategy="finetune", train_stages=1, test_frac=0.25, workers=2)
    splits = split(ds, cfg.split)
    features, _ = build(cfg.backbone)
    policy = make_policy(features, cfg.strategy, cfg.train_stages)
    data = TrainingData(
        features, ds, splits, cfg, policy, torch.device("cpu"), PRESETS["none"], None
    )
    assert data.cached and data.acts["train"].shape[:2] == (1, len(splits["train"]))
    eager = TrainingData(
        features,
        ds,
        splits,
        TrainConfig(
            strategy="finetune", train_stages=1, test_frac=0.25, workers=0, onnx_cache=False
        ),
        policy,
        torch.device("cpu"),
        PRESETS["none"],
        None,
    )
    for k in ("train", "val", "test"):
        a = data.acts[k] if k != "train" else data.acts[k][0]
        b = eager.acts[k] if k != "train" else eager.acts[k][0]
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))


@pytest.mark.slow
def test_cached_epoch_ratio_times_the_run_and_the_bare_steps(neu_small, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("train_speed", None)
    import train_speed

    import edge_tl.train.loop as loop

    r = train_speed.cached_epoch_ratio(str(neu_small), epochs=2, repeats=1)
    assert loop.TrainingData is TrainingData  # the recording hook is undone
    n = r["n_train"]
    assert r["steps"] == n // 32 + (n % 32 >= 2)  # batch 32; a last batch of one is dropped
    assert r["activation"] == (192, 7, 7)  # block 15's input at 224 x 224
    assert r["epoch_seconds"] >= r["loop_seconds"] > 0 and r["bare_seconds"] > 0


def test_scaling_slope_reads_the_growth_between_the_two_largest_sizes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scaling

    assert scaling.slope([100, 200], [1.0, 2.0]) == pytest.approx(1.0)
    assert scaling.slope([1, 100, 200], [9.0, 1.0, 4.0]) == pytest.approx(2.0)
    assert np.isnan(scaling.slope([1], [1.0]))


def test_scaling_refuses_unknown_curves(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scaling

    monkeypatch.setattr(sys, "argv", ["scaling.py", "--only", "embed,speed"])
    assert scaling.main() == 2
    assert "unknown curve(s) speed" in capsys.readouterr().err
