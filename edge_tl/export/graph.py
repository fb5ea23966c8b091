"""torch -> ONNX with fixed names and a dynamic batch axis, checked against PyTorch on real
images; and the fused ``logits`` output for users who run the engine directly.

The graph's contract (as optimum's ``OnnxConfig``): input ``image`` ``float32[batch, 3, S,
S]``; outputs ``embedding`` ``[batch, D]``, ``features_s8`` and ``features_s16`` (spatial maps
at strides 8 and 16); opset 18; parity within the recipe's ``parity_atol``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from edge_tl.backbones import FeatureModel
from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import EMBEDDING, FEATURES_S8, FEATURES_S16
from edge_tl.train.onnx import torch_to_onnx

__all__ = [
    "LOGITS",
    "OUTPUT_NAMES",
    "append_logits",
    "check_parity",
    "export_onnx",
    "parity",
    "parity_measure",
]

OUTPUT_NAMES = (EMBEDDING, FEATURES_S8, FEATURES_S16)


def export_onnx(model: FeatureModel, path: str | Path, size: int) -> dict[str, list]:
    """Export ``model`` to a self-contained ``.onnx`` (input ``image``, dynamic batch).

    Returns:
        The output shapes, with ``"batch"`` for the dynamic axis.
    """
    model = model.eval()
    torch_to_onnx(model, path, size, OUTPUT_NAMES)
    with torch.no_grad():
        outs = model(torch.zeros(2, 3, size, size))
    return {n: ["batch", *o.shape[1:]] for n, o in zip(OUTPUT_NAMES, outs, strict=True)}


def parity(
    model: FeatureModel, onnx_path: str | Path, inputs: np.ndarray, atol: float
) -> dict[str, float]:
    """Max abs difference per output between PyTorch and ONNX Runtime on ``inputs``.

    An output passes when its max abs difference is within ``atol`` times its peak
    magnitude (at least 1).

    Raises:
        EdgeTLError: listing every output over ``atol``.
    """
    diffs, peaks = parity_measure(model, onnx_path, inputs)
    check_parity(diffs, peaks, atol)
    return diffs


def parity_measure(
    model: FeatureModel, onnx_path: str | Path, inputs: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    """``(diffs, peaks)`` per output: max abs difference between PyTorch and ONNX Runtime on
    ``inputs``, and PyTorch's peak magnitude (what :func:`check_parity` scales ``atol`` by)."""
    from edge_tl.runtime.engine import OrtEngine

    engine = OrtEngine(onnx_path)
    with torch.no_grad():
        ref = [o.numpy() for o in model.eval()(torch.from_numpy(inputs))]
    got = engine.run(inputs, OUTPUT_NAMES)
    diffs = {n: float(np.abs(got[n] - r).max()) for n, r in zip(OUTPUT_NAMES, ref, strict=True)}
    peaks = {n: float(np.abs(r).max()) for n, r in zip(OUTPUT_NAMES, ref, strict=True)}
    return diffs, peaks


def check_parity(diffs: dict[str, float], peaks: dict[str, float], atol: float) -> None:
    """Refuse a graph whose outputs differ from PyTorch by more than ``atol`` (times the
    output's peak magnitude when above 1).

    Raises:
        EdgeTLError: listing every output over ``atol``.
    """
    # atol on values of magnitude <= 1; relative to the peak for larger activations
    bad = {n: d for n, d in diffs.items() if not d <= atol * max(1.0, peaks[n])}
    if bad:
        listing = ", ".join(f"{n} max abs diff {d:.2e}" for n, d in bad.items())
        raise EdgeTLError(
            f"ONNX export does not match PyTorch (tolerance {atol:.0e}): {listing}; "
            "report this with the backbone name, or loosen parity_atol in the recipe"
        )


LOGITS = "logits"


def append_logits(folder: Path, files: list[str], weight_t: np.ndarray, bias: np.ndarray) -> None:
    """Fuse a linear head into the artifact as a ``logits`` output (``embedding @ W + b``),
    in FP32, next to the existing outputs; for users who need no on-device learning."""
    path = folder / files[0]
    weight_t = np.ascontiguousarray(weight_t, np.float32)
    bias = np.ascontiguousarray(bias, np.float32)
    if path.suffix == ".onnx":
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(path))
        g = model.graph
        g.initializer.extend(
            [
                numpy_helper.from_array(weight_t, "head_weight"),
                numpy_helper.from_array(bias, "head_bias"),
            ]
        )
        g.node.extend(
            [
                helper.make_node(
                    "MatMul", [EMBEDDING, "head_weight"], ["head_matmul"], "head_MatMul"
                ),
                helper.make_node("Add", ["head_matmul", "head_bias"], [LOGITS], "head_Add"),
            ]
        )
        g.output.append(
            helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, ["batch", len(bias)])
        )
        onnx.save(model, str(path))
        return
    ov = require("openvino", "export")
    from openvino import opset13 as ops

    core = ov.Core()
    model = core.read_model(str(path))
    emb = model.output(EMBEDDING).get_node().input_value(0)  # what feeds the Result node
    logits = ops.add(ops.matmul(emb, ops.constant(weight_t), False, False), ops.constant(bias))
    logits.output(0).set_names({LOGITS})
    model.add_outputs([logits.output(0)])
    tmp = folder / "with_logits.xml"  # the .bin being replaced may be memory-mapped
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    del model, core
    os.replace(tmp, path)
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
