"""The AVX2 saturation replay and pair-safe weights (edge_tl.export.saturation) on small real
ONNX Runtime QDQ graphs, and the recipe and device profile that use them. Fast: no torch,
one-convolution graphs quantized by ONNX Runtime itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.spec import builtin_recipes, load_profile, load_recipe

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_tl.export.saturation import (  # noqa: E402
    accumulators,
    columns,
    gemm_convolutions,
    pair_safe,
    saturation_report,
)


def _conv_graph(path: Path, w: np.ndarray, b: np.ndarray, strides, pads) -> Path:
    """``image -> Conv -> embedding`` (the names an edge_tl backbone graph uses)."""
    cout, cin, kh, kw = w.shape
    node = helper.make_node(
        "Conv",
        ["image", "w", "b"],
        ["embedding"],
        name="conv",
        kernel_shape=[kh, kw],
        strides=list(strides),
        pads=list(pads),
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, cin, 9, 9])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> Path:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": calib}])

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
    )
    return dst


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"image": x})[0]


@pytest.fixture(scope="module")
def saturating(tmp_path_factory) -> dict:
    """A 3x3 stride-2 convolution with asymmetric padding (an EfficientNet stem's shape) on
    signed inputs, with same-sign weights in every channel: its u8 activations sit around
    the zero point ~128 and adjacent products of the large weights overflow int16."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("saturation")
    w = np.abs(rng.normal(size=(4, 6, 3, 3))) * np.array([1, -1, 1, -1])[:, None, None, None]
    w = w.astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    fp32 = _conv_graph(root / "fp32.onnx", w, b, (2, 2), (0, 0, 1, 1))
    calib = rng.normal(size=(8, 6, 9, 9)).astype(np.float32)
    qdq = _quantize(fp32, root / "qdq.onnx", calib)
    return {"fp32": fp32, "qdq": qdq, "x": calib, "root": root}


def test_replayed_accumulator_matches_the_convolution(saturating):
    """The replay's exact accumulator, zero point removed, is the convolution of the u8
    activations (minus their zero point) with the s8 weights, as an FP32 Conv computes it
    with the same padding and strides: the im2col order and padding are right."""
    (conv,) = gemm_convolutions(onnx.load(str(saturating["qdq"])))
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(2, 6, 9, 9)).astype(np.uint8)
    cols = columns(a, conv)
    w = conv["weights"]
    exact, _ = accumulators(cols, w.transpose(0, 2, 3, 1).reshape(len(w), -1))
    exact = exact - conv["zero_point"] * w.reshape(len(w), -1).astype(np.int64).sum(1)
    ref = _conv_graph(
        saturating["root"] / "int.onnx",
        w.astype(np.float32),
        np.zeros(len(w), np.float32),
        conv["strides"],
        conv["pads"],
    )
    want = _run(ref, a.astype(np.float32) - conv["zero_point"])  # [N, Cout, Ho, Wo]
    got = exact.reshape(2, want.shape[2], want.shape[3], -1).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want.astype(np.int64))


def test_pairs_are_clipped_like_vpmaddubsw():
    cols = np.array([[255, 255, 1, 1]], np.uint8)
    w = np.array([[127, 127, 3, 4], [-128, -128, 0, 0]], np.int8)
    exact, avx2 = accumulators(cols, w)
    assert exact.tolist() == [[2 * 255 * 127 + 7, -2 * 255 * 128]]
    assert avx2.tolist() == [[32767 + 7, -32768]]


def test_pair_safe_weights_remove_saturation_and_keep_the_output(saturating, tmp_path):
    before = saturation_report(saturating["qdq"], saturating["x"])
    assert [r["name"] for r in before] == ["conv"] and before[0]["relative_error"] > 0.01
    safe = tmp_path / "safe.onnx"
    assert pair_safe(saturating["qdq"], saturating["fp32"], None, safe) == ["conv"]
    assert saturation_report(safe, saturating["x"])[0]["outputs_clipped"] == 0.0
    (conv,) = gemm_convolutions(onnx.load(str(safe)))
    q = conv["weights"].astype(np.int32).transpose(0, 2, 3, 1).reshape(4, -1)
    q = np.pad(q, ((0, 0), (0, q.shape[1] % 2)))
    for sign in (1, -1):  # the worst u8 input: 255 where the weight has that sign, else 0
        worst = 255 * (np.maximum(sign * q[:, 0::2], 0) + np.maximum(sign * q[:, 1::2], 0))
        assert worst.max() <= 32767
    ref, got = _run(saturating["fp32"], saturating["x"]), _run(safe, saturating["x"])
    cos = (ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cos > 0.999


def test_pair_safe_leaves_other_convolutions_alone(saturating, tmp_path):
    assert pair_safe(saturating["qdq"], saturating["fp32"], ["other"], tmp_path / "s.onnx") == []
    a = onnx.load(str(saturating["qdq"])).graph.initializer
    b = onnx.load(str(tmp_path / "s.onnx")).graph.initializer
    assert [numpy_helper.to_array(i).tobytes() for i in a] == [
        numpy_helper.to_array(i).tobytes() for i in b
    ]


def test_avx2_recipe_and_profile():
    """The AVX2 profile names the pair-safe recipe, which needs no session option (the
    u8u8 kernels it selects are as slow as FP32 without VNNI) and ort-int8's tolerance."""
    assert "ort-int8-avx2" in builtin_recipes()
    profile = load_profile("x86-64-avx2")
    rec = load_recipe(profile.recipe)
    assert profile.engine == "onnxruntime" and rec.format == "onnx"
    assert rec.pair_safe_weights and rec.quantization == "ort-static"
    assert "session.x64quantprecision" not in rec.engine_options
    ort_int8 = load_recipe("ort-int8")
    assert rec.min_cosine >= ort_int8.min_cosine and rec.max_top1_drop <= ort_int8.max_top1_drop
    assert not load_recipe("ort-int8").pair_safe_weights  # text encoders still use it


def test_pair_safe_weights_with_another_scheme_is_named(tmp_path):
    bad = tmp_path / "ov.toml"
    bad.write_text(
        'format = "openvino"\nprecision = "int8"\nquantization = "nncf"\npair_safe_weights = true\n'
    )
    with pytest.raises(EdgeTLError, match="pair_safe_weights applies to ORT static INT8"):
        load_recipe(str(bad))


def test_text_export_refuses_pair_safe_recipe(tmp_path):
    from edge_tl.export.text import export_text_bundle

    with pytest.raises(EdgeTLError, match="pair_safe_weights.*ort-int8"):
        export_text_bundle(tmp_path / "b", "ort-int8-avx2", backbone="all-minilm-l6-v2")
    assert not (tmp_path / "b").exists()
