"""The vertical slice on real images: train -> export (FP32, ORT INT8, OpenVINO INT8) ->
torch-free runtime. Slow: trains and exports real models."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_tl.data import image_folder  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.export import export_bundle  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402


def test_run_folder_holds_weights_head_metrics_and_curve_without_pickles(lp_run):
    names = {p.name for p in lp_run.iterdir()}
    assert {"model.safetensors", "head.npz", "run.json", "metrics.json", "history.csv"} <= names
    record = json.loads((lp_run / "run.json").read_text())
    assert record["config"]["strategy"] == "linear-probe"
    assert 0.9 <= record["metrics"]["test_accuracy"] <= 1.0
    assert (lp_run / "model.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_onnx_matches_pytorch_on_real_images(bundles):
    for recipe in ("onnx-fp32", "ort-int8", "openvino-int8"):
        m = Model(bundles[recipe]).manifest
        assert m.metrics["parity_max_abs_diff"]["embedding"] <= 1e-4
        assert m.outputs["embedding"] == ["batch", 1280]
    fp32 = Model(bundles["onnx-fp32"]).manifest.metrics
    assert fp32["embedding_cosine_vs_fp32"]["min"] > 0.9999


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_quantized_graphs_hold_quantization_nodes(bundles):
    ops = _ops(bundles["ort-int8"] / "backbone.onnx")
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 40
    assert "QuantizeLinear" not in _ops(bundles["onnx-fp32"] / "backbone.onnx")
    xml = (bundles["openvino-int8"] / "backbone.xml").read_text()
    assert xml.count('type="FakeQuantize"') > 20


def test_int8_bundles_keep_accuracy_on_held_out_images(bundles):
    acc = {r: Model(b).manifest.metrics["test_accuracy"] for r, b in bundles.items()}
    assert acc["onnx-fp32"] >= 0.9
    one_image = 1 / 12  # 12 held-out images; measured: no INT8 bundle loses any
    for recipe in ("ort-int8", "openvino-int8"):
        assert acc[recipe] >= acc["onnx-fp32"] - one_image - 1e-9, acc


def test_runtime_predicts_and_evaluates(bundles, neu_small):
    model = Model(bundles["ort-int8"])
    ds = image_folder(neu_small)
    res = model.evaluate(ds)
    assert 0.9 <= res.accuracy <= 1.0 and res.n == len(ds)
    assert sum(map(sum, res.confusion_matrix)) == len(ds)
    assert set(res.per_class) == set(ds.classes)
    pred = model.predict([ds.paths[0], ds.paths[-1]], top_k=2)
    assert [p.label for p in pred] == [ds.classes[0], ds.classes[-1]]
    assert len(pred[0].top_k) == 2 and pred[0].score >= pred[0].top_k[1]["score"]


def test_failed_parity_leaves_nothing_at_out(lp_run, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text('format = "onnx"\nprecision = "fp32"\nparity_atol = 1e-12\n')
    with pytest.raises(EdgeTLError, match="does not match PyTorch"):
        export_bundle(tmp_path / "b", str(strict), run=lp_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.toml"]


def test_perturbed_graph_fails_the_parity_check(tmp_path):
    """A graph that is not the model it claims to be is caught."""
    from edge_tl.backbones import build
    from edge_tl.export.graph import export_onnx, parity

    features, _ = build("efficientnet_lite0")
    export_onnx(features, tmp_path / "m.onnx", 224)
    with torch.no_grad():
        features.net._conv_head.weight.mul_(1.001)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with pytest.raises(EdgeTLError, match="embedding max abs diff"):
        parity(features, tmp_path / "m.onnx", x, 1e-4)


def test_backbone_export_without_a_run_classifies_imagenet(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    Image.fromarray(skimage_data.chelsea()).save(calib / "cat.png")
    Image.fromarray(skimage_data.astronaut()).save(calib / "astronaut.png")
    m = export_bundle(tmp_path / "b", "onnx-fp32", backbone="efficientnet_lite0", calib=calib)
    assert len(m.labels) == 1000 and m.source.kind == "imagenet"
    top = Model(tmp_path / "b").predict([calib / "cat.png"], top_k=5)[0].top_k
    assert any("cat" in t["label"] for t in top), top


@pytest.mark.slow
def test_nncf_quantizes_in_a_child_process_and_is_never_imported_here(bundles):
    """The OpenVINO INT8 bundle was quantized by NNCF, but not in this process: a process
    that had quantized with NNCF and then trained with torch crashed in long sessions."""
    import sys

    assert (bundles["openvino-int8"] / "backbone.xml").is_file()
    assert Model(bundles["openvino-int8"]).manifest.artifact.precision == "int8"
    assert not [m for m in sys.modules if m == "nncf" or m.startswith("nncf.")]
