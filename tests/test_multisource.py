"""Multi-source transfer: two pretrained backbones, one graph, concatenated embeddings."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_tl.backbones import MultiSourceModel, build, get_spec  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.train import TrainConfig  # noqa: E402
from edge_tl.train.probe import multi_source_note  # noqa: E402

PAIR = "efficientnet_lite0+mobilenet_v2"


def test_the_concatenation_is_each_source_on_its_own_preprocessing():
    torch.manual_seed(0)
    both, fc = build("efficientnet_lite1+mobilenet_v2", pretrained=False)
    assert isinstance(both, MultiSourceModel) and fc is None
    a, b = both.parts
    assert both.spec.preprocess == get_spec("efficientnet_lite1").preprocess
    assert both.num_features == sum(both.source_dims) == 1280 + 1280
    x = torch.randn(2, 3, 240, 240)  # lite1's input: (pixel - 127) / 128
    pixels = x * 128 + 127
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    x_b = torch.nn.functional.interpolate((pixels - mean) / std, size=(224, 224), mode="bilinear")
    with torch.no_grad():
        emb, s8, s16 = both(x)
        assert torch.allclose(emb[:, :1280], a(x)[0], atol=1e-5)
        assert torch.allclose(emb[:, 1280:], b(x_b)[0], atol=1e-4)
        assert torch.equal(s8, a(x)[1])


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("efficientnet_lite0+efficientnet_lite0", "two or more different image backbones"),
        ("efficientnet_lite0+", "two or more different image backbones"),
        ("efficientnet_lite0+resnet9", "unknown backbone 'resnet9'"),
        ("efficientnet_lite0+all-minilm-l6-v2", "text encoder"),
    ],
)
def test_bad_multi_source_names(name, words):
    with pytest.raises(EdgeTLError, match=words):
        get_spec(name)


def test_multi_source_is_a_linear_probe_without_a_weights_file():
    with pytest.raises(EdgeTLError, match="use --strategy linear-probe"):
        TrainConfig(backbone=PAIR, strategy="finetune")
    with pytest.raises(EdgeTLError, match="--weights takes one file"):
        build(PAIR, weights="w.pth")


def test_the_note_recommends_the_best_single_source():
    srcs = {
        "a": {"val_accuracy": 0.9, "test_accuracy": 0.8},
        "b": {"val_accuracy": 0.7, "test_accuracy": 0.9},
        "a+b": {"val_accuracy": 0.9, "test_accuracy": 0.95},
    }
    assert "does not beat a alone (0.9000) on the validation split" in multi_source_note(
        "a+b", srcs
    )
    srcs["a+b"]["val_accuracy"] = 0.95
    assert multi_source_note("a+b", srcs) == ""


@pytest.mark.slow
def test_multi_source_probe_exports_one_graph(neu_small, tmp_path, caplog):
    import onnx

    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.train import train

    run = tmp_path / "run"
    cfg = TrainConfig(backbone=PAIR, strategy="linear-probe", test_frac=0.25, val_frac=0.25)
    metrics = train(neu_small, run, cfg)
    assert set(metrics["sources"]) == {"efficientnet_lite0", "mobilenet_v2", PAIR}
    assert metrics["sources"][PAIR]["test_accuracy"] == metrics["test_accuracy"]
    with caplog.at_level(logging.WARNING):
        export_bundle(tmp_path / "b", "onnx-fp32", run=run)
    said = any("does not beat" in r.getMessage() for r in caplog.records)
    s = metrics["sources"]
    assert said == (s[PAIR]["val_accuracy"] <= max(s[k]["val_accuracy"] for k in s if k != PAIR))
    graph = onnx.load(str(tmp_path / "b" / "backbone.onnx"), load_external_data=False).graph
    assert len(graph.input) == 1
    model = Model(tmp_path / "b")
    emb = model.embed([str(p) for p in sorted(neu_small.rglob("*.jpg"))[:2]])
    assert emb.shape == (2, 2560) and np.isfinite(emb).all()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["backbone"] == PAIR
