"""Domain adaptation: each loss against an independent computation (numpy), AdaBN's
statistics, the target's reading, bad input, and one small real run end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_tl.errors import EdgeTLError
from edge_tl.train import TrainConfig
from edge_tl.train.adapt import (
    DEFAULT_METHOD,
    Adapter,
    adabn,
    coral_loss,
    dann_coefficient,
    grad_reverse,
    mcc_loss,
    open_target,
)
from tests.conftest import NEU, make_image, need
from tests.test_cli import _one_line_error, cli


# ---- the losses -----------------------------------------------------------------------------
def test_coral_loss_matches_numpy_covariances():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(40, 7))
    xt = rng.normal(size=(30, 7)) @ rng.normal(size=(7, 7)) + 2.0
    want = ((np.cov(xs, rowvar=False) - np.cov(xt, rowvar=False)) ** 2).sum() / (4 * 7**2)
    got = coral_loss(torch.tensor(xs), torch.tensor(xt))
    assert float(got) == pytest.approx(want, rel=1e-10)
    assert float(coral_loss(torch.tensor(xs), torch.tensor(xs + 5.0))) == pytest.approx(
        0, abs=1e-12
    )


def _mcc_numpy(logits: np.ndarray, t: float = 2.5) -> float:
    """Jin et al. 2020 written out sample by sample (eqs. 1-6)."""
    n, k = logits.shape
    e = np.exp(logits / t)
    p = e / e.sum(1, keepdims=True)
    h = np.array([-sum(pi * np.log(pi + 1e-5) for pi in row) for row in p])
    w = 1 + np.exp(-h)
    w = n * w / w.sum()
    c = np.zeros((k, k))
    for i in range(n):
        c += w[i] * np.outer(p[i], p[i])
    c = c / c.sum(1, keepdims=True)
    return float((c.sum() - np.trace(c)) / k)


def test_mcc_loss_on_a_hand_made_prediction_matrix():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.5, 2.0]])
    got = float(mcc_loss(torch.tensor(logits)))
    assert got == pytest.approx(_mcc_numpy(logits), rel=1e-9)
    # confident, distinct predictions confuse less than uniform ones: (K - 1) / K at most
    sure = float(mcc_loss(torch.tensor(np.eye(3) * 30.0)))
    flat = float(mcc_loss(torch.zeros(4, 3)))
    assert sure < 0.01 and flat == pytest.approx(2 / 3)


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    assert dann_coefficient(0.0) == 0.0 and dann_coefficient(1.0) == pytest.approx(1, abs=1e-4)


def test_dann_adapter_trains_its_discriminator_against_the_features():
    torch.manual_seed(0)
    ad = Adapter("dann", 1.0, 8, "cpu")
    fs = torch.randn(6, 8, requires_grad=True)
    ft = torch.randn(6, 8, requires_grad=True)
    loss = ad.loss(fs, ft, torch.zeros(6, 2), progress=1.0)
    loss.backward()
    # plain gradient descent on the discriminator lowers the domain loss, while the
    # features' gradient ascends it (reversed): a step along -grad raises it
    with torch.no_grad():
        up = ad.loss(fs - 0.5 * fs.grad, ft - 0.5 * ft.grad, torch.zeros(6, 2), 1.0)
    assert float(up) > float(loss.detach())
    assert all(p.grad is not None for p in ad.parameters())


# ---- AdaBN ----------------------------------------------------------------------------------
def test_adabn_replaces_running_statistics_with_the_target_s(tmp_path):
    from edge_tl.backbones import get_spec

    pre = dataclasses.replace(get_spec("efficientnet_lite0").preprocess, size=8)
    paths = [str(make_image(tmp_path / f"{i}.png", (8, 8), seed=i)) for i in range(6)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.Dropout(0.5))
    net[1].weight.data.fill_(2.0)
    assert adabn(net, paths, pre, batch_size=64) == 1
    from edge_tl.runtime.preprocess import batch_inputs

    with torch.no_grad():
        a = net[0](torch.from_numpy(batch_inputs(paths, pre))).double()
    bn = net[1]
    assert torch.allclose(bn.running_mean.double(), a.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), a.var((0, 2, 3), unbiased=True), atol=1e-5)
    assert bn.momentum == 0.01 and not net.training and float(bn.weight[0].detach()) == 2.0
    with pytest.raises(EdgeTLError, match="at least 2"):
        adabn(net, paths[:1], pre)


# ---- the target and the settings ------------------------------------------------------------
def test_open_target_flat_folder_imagefolder_and_bad_input(tmp_path, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        make_image(flat / f"{i}.png", seed=i)
    t = open_target(flat)
    assert len(t.unlabeled) == 3 and t.test is None
    labelled = tmp_path / "lab"
    for c in ("a", "b"):
        (labelled / c).mkdir(parents=True)
        for i in range(8):
            make_image(labelled / c / f"{i}.png", seed=i)
    with caplog.at_level(logging.WARNING):
        t = open_target(labelled, ["a", "b"])
    assert len(t.unlabeled) == 12 and len(t.test) == 4
    assert "not used for adaptation" in caplog.text
    with pytest.raises(EdgeTLError, match="same class folders"):
        open_target(labelled, ["a", "c"])
    with pytest.raises(EdgeTLError, match="does not exist"):
        open_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeTLError, match="no images"):
        open_target(tmp_path / "empty")


def test_adaptation_settings_are_checked_up_front():
    assert TrainConfig(target_unlabeled="t").adapt == DEFAULT_METHOD
    cfg = TrainConfig(target_unlabeled="t", adapt="coral")
    assert cfg.adapt_weight > 0
    bad = [
        ({"adapt": "coral"}, "--target-unlabeled"),
        ({"adapt_weight": 0.5}, "--target-unlabeled"),
        ({"target_unlabeled": "t", "adapt": "cdan"}, "not one of"),
        ({"target_unlabeled": "t", "adapt": "adabn", "adapt_weight": 1.0}, "drop --adapt"),
        ({"target_unlabeled": "t", "adapt": "mcc", "adapt_weight": -1.0}, "positive"),
        ({"target_unlabeled": "t", "adapt": "dann", "strategy": "linear-probe"}, "finetune"),
    ]
    for kw, words in bad:
        with pytest.raises(EdgeTLError, match=words):
            TrainConfig(**kw)


def _two_class(root: Path, n: int = 6) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / c / f"{i}.png", seed=i)
    return root


def test_cli_refuses_bad_adaptation_input_and_writes_nothing(tmp_path):
    data = _two_class(tmp_path / "src")
    res = cli("train", data, "--adapt", "coral", "--out", tmp_path / "r1")
    _one_line_error(res, "--target-unlabeled")
    res = cli("train", data, "--target-unlabeled", tmp_path / "nope", "--out", tmp_path / "r2")
    _one_line_error(res, "target folder", "does not exist")
    res = cli(
        "export", "--backbone", "efficientnet_lite0", "--adapt-bn", data, "--out", tmp_path / "b"
    )
    _one_line_error(res, "--adapt-bn", "RUN")
    for name in ("r1", "r2", "b"):
        assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob("*.checkpoint.pt"))


def test_cli_refuses_adaptation_for_text(tmp_path):
    texts = tmp_path / "t.csv"
    texts.write_text("text,label\n" + "".join(f"hello {i},{i % 2}\n" for i in range(10)))
    res = cli("train", texts, "--target-unlabeled", tmp_path, "--out", tmp_path / "r")
    _one_line_error(res, "image data")
    assert not (tmp_path / "r").exists()


# ---- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def neu_shift(tmp_path_factory) -> tuple[Path, Path]:
    """10 NEU-DET images per class (3 classes) as the source, 10 others per class through the
    simulated camera change as the target (labelled: adapted on 8, scored on 2 per class)."""
    from edge_tl.data import image_folder
    from edge_tl.domains import write_camera_shift

    need(NEU)
    root = tmp_path_factory.mktemp("neu_shift")
    classes = ("crazing", "patches", "scratches")
    for c in classes:
        (root / "src" / c).mkdir(parents=True)
        (root / "raw" / c).mkdir(parents=True)
        files = sorted((NEU / c).iterdir())
        for p in files[:10]:
            shutil.copy(p, root / "src" / c / p.name)
        for p in files[10:20]:
            shutil.copy(p, root / "raw" / c / p.name)
    write_camera_shift(image_folder(root / "raw"), root / "tgt")
    return root / "src", root / "tgt"


@pytest.mark.slow
def test_adapted_run_records_target_accuracy_and_adabn_export(neu_shift, tmp_path):
    from edge_tl.train import load_run

    src, tgt = neu_shift
    run = tmp_path / "run"
    res = cli(
        "train", src, "--strategy", "finetune", "--train-stages", "1", "--epochs", "1",
        "--batch-size", "8", "--test-frac", "0.3", "--target-unlabeled", tgt,
        "--adapt", "mcc", "--out", run,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "target test accuracy" in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["target_test_accuracy"] <= 1 and metrics["n_target_test"] == 6
    assert metrics["adapt"] == "mcc" and metrics["n_target_unlabeled"] == 24
    assert np.isfinite(metrics["adapt_loss_last_epoch"])
    record = json.loads((run / "run.json").read_text())
    assert record["target"]["adapt"] == "mcc" and record["target"]["test_images"] == 6
    assert (run / "domains.png").stat().st_size > 10_000

    # AdaBN moves every batch-norm layer's statistics towards the target's
    _, features, _ = load_run(run)
    bns = [m for m in features.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    adabn(features, open_target(tgt).unlabeled, features.spec.preprocess)
    moved = [not torch.allclose(a, m.running_mean) for a, m in zip(before, bns, strict=True)]
    assert all(moved)

    # the same at export: parity is checked against the adapted PyTorch model
    bundle = tmp_path / "bundle"
    res = cli("export", run, "--recipe", "onnx-fp32", "--adapt-bn", tgt, "--out", bundle)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((bundle / "manifest.json").read_text())["metrics"]
    assert metrics["adapt_bn"]["images"] == 24
    assert metrics["adapt_bn"]["checked_on_target"] is True
    assert metrics["embedding_cosine_vs_fp32"]["on"] == "target held-out split"
    assert metrics["embedding_cosine_vs_fp32"]["n"] == 6
