"""Training strategies, discriminative learning rates, augmentation, checkpoints and resume,
torchvision backbones from local weights, DDP under torchrun, and ``compare``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_tl.backbones import build  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.train import TrainConfig, checkpoint_path, train  # noqa: E402
from edge_tl.train.augment import Augment, augment, parse_augment  # noqa: E402
from edge_tl.train.compare import negative_transfer  # noqa: E402
from edge_tl.train.loop import ClassifierNet, _param_groups  # noqa: E402
from edge_tl.train.policies import make_policy  # noqa: E402

# Small, fast settings for tests that train: PyTorch caching (no ONNX export), no workers.
FAST = {"test_frac": 0.25, "batch_size": 8, "workers": 0, "onnx_cache": False}


@pytest.fixture(scope="module")
def lite0():
    return build("efficientnet_lite0")[0]


def _trainable(features) -> set[str]:
    return {k for k, p in features.named_parameters() if p.requires_grad}


def test_strategies_choose_the_parameters_they_name(lite0):
    names = dict(lite0.named_parameters())
    ft = make_policy(lite0, "finetune", train_stages=2)
    assert ft.boundary == lite0.stage_starts[-2] == 11
    assert _trainable(lite0) == {
        k
        for k in names
        if k.startswith(("net._conv_head", "net._bn1"))
        or any(k.startswith(f"net._blocks.{b}.") for b in range(11, 16))
    }
    full = make_policy(lite0, "full")
    assert full.boundary is None and _trainable(lite0) == set(names)
    bn = make_policy(lite0, "bn-only")
    assert (
        bn.boundary is None
        and _trainable(lite0)
        and all("bn" in k.rsplit(".", 2)[-2] for k in _trainable(lite0))
    )
    bias = make_policy(lite0, "bias-only")
    assert _trainable(lite0) == {k for k in names if k.endswith(".bias")}
    assert bias.train_modes == []  # statistics frozen
    sel = make_policy(lite0, "selective", stages=(-1,))
    assert sel.boundary == 15
    assert _trainable(lite0) == {
        k for k in names if k.startswith(("net._blocks.15.", "net._conv_head", "net._bn1"))
    }
    pat = make_policy(lite0, "selective", params=("net._blocks.13.*",))
    assert pat.boundary == 13 and all(k.startswith("net._blocks.13.") for k in _trainable(lite0))
    grad = make_policy(lite0, "gradual", train_stages=3, unfreeze_every=2)
    epochs = {u.name: u.unfreeze_epoch for u in grad.units if u.params}
    assert epochs == {"head_modules": 1, "stage6": 3, "stage5": 5, "stage4": 7}


def test_selection_that_matches_nothing_names_real_parameters(lite0):
    with pytest.raises(EdgeTLError, match="matched no parameter.*names look like: net."):
        make_policy(lite0, "selective", params=("net.layer9.*",))
    with pytest.raises(EdgeTLError, match="--stages 9 is outside 0..6"):
        make_policy(lite0, "selective", stages=(9,))
    with pytest.raises(EdgeTLError, match="unknown strategy 'magic'"):
        TrainConfig(strategy="magic")


def test_learning_rates_decay_towards_the_input_and_norms_skip_weight_decay(lite0):
    policy = make_policy(lite0, "full")
    cfg = TrainConfig(strategy="full", layer_decay=0.5)
    groups = _param_groups(ClassifierNet(lite0, None, 3, 0.2), policy, cfg)
    lr = {g["unit"]: g["lr"] for g in groups}
    assert lr["head"] == cfg.lr_head
    assert lr["head_modules"] == lr["stage6"] == cfg.lr_backbone
    assert lr["stage5"] == pytest.approx(cfg.lr_backbone * 0.5)
    assert lr["stem"] == pytest.approx(cfg.lr_backbone * 0.5**7)
    for g in groups:
        assert (g["weight_decay"] == 0) == all(p.ndim <= 1 for p in g["params"])
    scratch = _param_groups(
        ClassifierNet(lite0, None, 3, 0.2), make_policy(lite0, "from-scratch"), cfg
    )
    assert {g["lr"] for g in scratch} == {cfg.lr_head}


def test_augmentation_presets_and_grey_data():
    assert parse_augment("auto", grey=True) == parse_augment("inspection", grey=True)
    assert parse_augment("auto", grey=False).saturation > 0
    assert parse_augment("natural", grey=True).saturation == 0  # nothing colour-based
    custom = parse_augment("inspection,rotate=5,blur=0", grey=True)
    assert custom.rotate == 5 and custom.blur == 0 and custom.vflip == 0.5
    with pytest.raises(EdgeTLError, match="unknown augmentation field 'spin'"):
        parse_augment("inspection,spin=3", grey=True)
    with pytest.raises(EdgeTLError, match="hflip is a probability"):
        Augment(hflip=2)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) % 255
    flipped = augment(x, Augment(hflip=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(-1))
    aug = parse_augment("inspection", grey=True)
    a = augment(x, aug, torch.Generator().manual_seed(3))
    b = augment(x, aug, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 255


def test_negative_transfer_is_flagged():
    rows = [
        {"strategy": "linear-probe", "test_accuracy": 0.80},
        {"strategy": "finetune", "test_accuracy": 0.91},
        {"strategy": "from-scratch", "test_accuracy": 0.90},
    ]
    flags = negative_transfer(rows, threshold=0.02)
    assert any("from-scratch (0.9000) matches or beats linear-probe" in f for f in flags)
    assert any("gains only 1.0 pt" in f for f in flags)
    rows[2]["test_accuracy"] = 0.5
    assert negative_transfer(rows, 0.02) == []


def test_torchvision_backbone_from_a_local_weights_file(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = tvm.resnet18()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "r18.pth")
    features, fc = build("resnet18", weights=tmp_path / "r18.pth")
    assert torch.equal(fc.weight, net.fc.weight)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        net.eval()
        assert torch.allclose(fc(features(x)[0]), net(x), atol=1e-5)
    torch.save(tvm.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(EdgeTLError, match=r"does not fit: .*layer1\.0\.conv3\.weight"):
        build("resnet18", weights=tmp_path / "r50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EdgeTLError, match="cannot be read"):
        build("resnet18", weights=tmp_path / "junk.pth")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "mobilenet_v3_large", "vgg16"])
def test_torchvision_backbones_split_exactly(name):
    features, _ = build(name, pretrained=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        emb, s8, s16 = features(x)
        for block in features.stage_starts:
            again = features.forward_from(features.forward_until(x, block), block)
            assert torch.allclose(again, emb, atol=1e-4)
    assert s8.shape[-1] == 28 and s16.shape[-1] == 14 and emb.shape[1] == features.num_features


@pytest.mark.slow
def test_interrupted_run_resumed_twice_matches_an_uninterrupted_one(neu_small, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(strategy="finetune", epochs=4, train_stages=1, **FAST)
    train(neu_small, tmp_path / "ref", cfg)

    def stop_at(epoch):
        def hook(row):
            if row["epoch"] == epoch:
                raise KeyboardInterrupt

        return hook

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(neu_small, out, cfg, on_epoch_end=stop_at(1))
    assert not out.exists() and checkpoint_path(out).is_file()
    with pytest.raises(EdgeTLError, match="pass --resume to continue it or --force"):
        train(neu_small, out, cfg)
    with pytest.raises(EdgeTLError, match="other settings: epochs=4"):
        train(
            neu_small,
            out,
            TrainConfig(strategy="finetune", epochs=5, train_stages=1, **FAST),
            resume=True,
        )
    with pytest.raises(KeyboardInterrupt):
        train(neu_small, out, cfg, resume=True, on_epoch_end=stop_at(3))
    train(neu_small, out, cfg, resume=True)
    assert not checkpoint_path(out).exists()
    a, b = (
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_hist = (tmp_path / "ref" / "history.csv").read_text().splitlines()
    hist = (out / "history.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in hist] == [r.split(",")[:5] for r in ref_hist]
    with pytest.raises(EdgeTLError, match="no checkpoint to resume"):
        train(neu_small, tmp_path / "other", cfg, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bn-only", "gradual", "selective", "bias-only"])
def test_each_strategy_trains_and_moves_only_its_parameters(neu_small, tmp_path, strategy):
    from safetensors.torch import load_file

    cfg = TrainConfig(strategy=strategy, epochs=2, stages=(-1,), views=2, **FAST)
    m = train(neu_small, tmp_path / strategy, cfg)
    ref = build("efficientnet_lite0")[0]
    policy = make_policy(ref, strategy, stages=(-1,))
    allowed = {k for k, p in ref.named_parameters() if p.requires_grad}
    state = load_file(str(tmp_path / strategy / "model.safetensors"))
    ref_state = ref.state_dict()
    params = dict(ref.named_parameters())
    moved = {k for k in params if not torch.equal(state[k], ref_state[k])}
    assert moved and moved <= allowed, sorted(moved - allowed)[:3]
    assert m["test_accuracy"] > 0.5 and m["trainable_parameters"] > 0
    assert m["freeze_boundary_block"] == policy.boundary


@pytest.mark.slow
def test_resnet18_run_exports_and_runs_without_torch_classes(neu_small, tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model

    torch.manual_seed(0)
    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    cfg = TrainConfig(
        strategy="finetune",
        backbone="resnet18",
        weights=str(tmp_path / "r18.pth"),
        epochs=1,
        **FAST,
    )
    train(neu_small, tmp_path / "run", cfg)
    m = export_bundle(tmp_path / "b", "onnx-fp32", run=tmp_path / "run")
    assert m.backbone == "resnet18" and m.outputs["embedding"][-1] == 512
    res = Model(tmp_path / "b")
    out = res.predict([next((neu_small / "crazing").iterdir())])
    assert out[0].label in m.labels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(neu_small, tmp_path):
    """DDP with gloo on the CPU: 2 processes x half batches == 1 process x whole batches."""
    from safetensors.torch import load_file

    common = [
        "train", str(neu_small), "--strategy", "finetune", "--epochs", "2", "--train-stages", "1",
        "--batch-size", "8",
        "--test-frac", "0.25", "--workers", "0", "--no-onnx-cache", "--freeze-bn",
        "--dropout", "0", "--augment", "none", "--json",
    ]  # fmt: skip
    env = {**os.environ, "EDGE_TL_QUIET": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", *common, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", "edge_tl.cli", *common, "--out", str(tmp_path / "two"),
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    ref = build("efficientnet_lite0")[0].state_dict()
    moved = sum(float((a[k].double() - ref[k].double()).norm() ** 2) for k in a) ** 0.5
    apart = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    # Same updates up to float summation order (Adam amplifies it where gradients vanish).
    assert moved > 0.01 and apart < 1e-3 * moved, (apart, moved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 0 wrote once


@pytest.mark.slow
def test_compare_writes_table_curves_and_flags(neu_small, tmp_path):
    from edge_tl.cli import main

    out = tmp_path / "cmp"
    args = [
        "compare", str(neu_small), "--strategies", "linear-probe,finetune,from-scratch",
        "--epochs", "2", "--batch-size", "8", "--test-frac", "0.25", "--workers", "0",
        "--no-onnx-cache", "--threshold", "200", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in result["rows"]] == ["linear-probe", "finetune", "from-scratch"]
    acc = {r["strategy"]: r["test_accuracy"] for r in result["rows"]}
    # pretrained features on 3 defect classes vs random weights after 2 epochs on 36 images
    assert acc["linear-probe"] >= 0.9 and acc["from-scratch"] < acc["linear-probe"] - 0.2, acc
    for r in result["rows"]:
        assert r["trainable_parameters"] > 0 and r["peak_rss_mb"] > 100
    # transfer beats from-scratch (no "negative transfer" flag), but by less than the
    # --threshold of 200 pt asked for here: exactly that flag, in the JSON and the table
    flags = result["flags"]
    assert len(flags) == 1 and flags[0].startswith("transfer gains only"), flags
    assert "below the 200.0 pt threshold" in flags[0] and result["threshold"] == 2.0
    md = (out / "compare.md").read_text()
    assert "| finetune |" in md and f"- {flags[0]}" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        ["linear-probe", "finetune", "from-scratch"]
    )
    assert main(args) == 2  # exists, no --force
    assert np.isfinite(result["rows"][1]["seconds_per_epoch"])


def test_compare_rejects_unknown_strategies(tmp_path, capsys):
    from edge_tl.cli import main

    assert (
        main(["compare", "x", "--strategies", "finetune,magic", "--out", str(tmp_path / "c")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown strategy magic" in err
    assert not (tmp_path / "c").exists()


def test_resnet_weights_path_without_internet_asks_for_a_local_file(monkeypatch, tmp_path):
    pytest.importorskip("torchvision")
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EdgeTLError, match="pass --weights PATH"):
        build("resnet18")


def test_balanced_sampler_evens_out_a_rare_class():
    from edge_tl.train.loop import _epoch_batches

    y = np.array([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    plain = np.concatenate(_epoch_batches(y, TrainConfig(batch_size=10), gen, 1))
    assert sorted(plain.tolist()) == list(range(100))  # a permutation: each image once
    drawn = np.concatenate(
        [
            np.concatenate(_epoch_batches(y, TrainConfig(balance="sampler", batch_size=10), gen, 1))
            for _ in range(20)
        ]
    )
    share = float((y[drawn] == 1).mean())
    assert 0.45 < share < 0.55, share


@pytest.mark.slow
def test_finetune_trains_only_after_the_boundary(neu_small, tmp_path):
    from safetensors.torch import load_file

    from edge_tl.backbones import build
    from edge_tl.train import TrainConfig, train

    metrics = train(
        neu_small,
        tmp_path / "ft",
        TrainConfig(strategy="finetune", epochs=2, train_stages=1, test_frac=0.25),
    )
    block = metrics["freeze_boundary_block"]
    state = load_file(str(tmp_path / "ft" / "model.safetensors"))
    ref = build("efficientnet_lite0")[0].state_dict()
    frozen = [k for k in ref if k.startswith(("net._conv_stem", "net._bn0", "net._blocks.0."))]
    assert frozen and all(torch.equal(state[k], ref[k]) for k in frozen)
    moved = [k for k in ref if k.startswith(f"net._blocks.{block}.") and k.endswith("weight")]
    assert moved and any(not torch.equal(state[k], ref[k]) for k in moved)
    history = (tmp_path / "ft" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 3
    assert (tmp_path / "ft" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"label_smoothing": 2.0}, "--label-smoothing"),
        ({"lr_head": -1.0}, "--lr-head"),
    ],
)
def test_training_settings_out_of_range_are_refused_before_any_work(settings, words):
    with pytest.raises(EdgeTLError, match=words):
        TrainConfig(**settings)
