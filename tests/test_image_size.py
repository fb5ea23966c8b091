"""``--image-size`` (train at another input side than the backbone's native one) and the
``rot90`` augmentation: bad values fail in one line, the size is recorded in the run and
survives export (the bundle preprocesses at the trained size)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.train import TrainConfig, train  # noqa: E402
from edge_tl.train.augment import augment, parse_augment  # noqa: E402
from tests.test_cli import _one_line_error, cli  # noqa: E402


@pytest.mark.parametrize("size", [-1, 16, 2000])
def test_image_size_out_of_range_is_one_line(size):
    with pytest.raises(EdgeTLError, match=r"--image-size .* outside 32\.\.1024"):
        TrainConfig(image_size=size)


def test_image_size_on_the_command_line_fails_before_writing(tmp_path, neu_small):
    out = tmp_path / "run"
    res = cli("train", neu_small, "--image-size", "8", "--out", out)
    _one_line_error(res, "--image-size 8", "32..1024")
    assert not out.exists()


def test_rot90_is_a_probability():
    with pytest.raises(EdgeTLError, match="rot90 is a probability"):
        parse_augment("inspection,rot90=2", grey=True)


def test_rot90_turns_images_by_quarter_turns_only():
    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 255  # 0..255
    aug = parse_augment("none,rot90=1", grey=True)
    y = augment(x, aug, torch.Generator().manual_seed(0))
    turns = []
    for a, b in zip(x, y, strict=True):
        k = [t for t in (1, 2, 3) if torch.equal(torch.rot90(a, t, dims=(-2, -1)), b)]
        assert len(k) == 1  # always turned (p = 1), and by a whole quarter turn
        turns += k
    assert len(set(turns)) > 1  # the turn is drawn per image
    assert torch.equal(augment(x, parse_augment("none", grey=True), torch.Generator()), x)


@pytest.mark.slow
def test_image_size_is_recorded_and_survives_export(neu_small, tmp_path):
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.train import load_run

    cfg = TrainConfig(
        strategy="finetune",
        train_stages=1,
        epochs=1,
        image_size=160,
        test_frac=0.25,
        batch_size=8,
        workers=0,
        onnx_cache=False,
    )
    run = tmp_path / "run"
    train(neu_small, run, cfg)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["image_size"] == 160 and record["preprocess"]["size"] == 160
    _, features, _ = load_run(run)
    assert features.spec.preprocess.size == 160
    bundle = tmp_path / "bundle"
    export_bundle(bundle, "onnx-fp32", run=run)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocess"]["size"] == 160
    import onnx

    graph = onnx.load(next(bundle.rglob("*.onnx"))).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[-2:] == [160, 160]  # the graph takes the trained size
    model = Model(bundle)  # and the runtime resizes images to it
    paths = sorted(str(p) for p in (neu_small / "crazing").iterdir())[:2]
    preds = model.classifier.predict(paths)
    assert len(preds) == 2 and all(np.isfinite(p.score) for p in preds)
