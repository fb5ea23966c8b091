"""ONNX FP32 -> the recipe's artifact: ONNX (FP32 or ORT static INT8, QDQ) or OpenVINO IR
(FP32, FP16, or INT8 through NNCF).

Calibration data is one source (``float32[N,3,H,W]``) with two thin adapters, as ORT's
``CalibrationDataReader`` and ``nncf.Dataset`` expect.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import INPUT_NAME, Recipe

_ORT_TYPES = {"u8": "QUInt8", "s8": "QInt8"}
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def build_artifact(
    onnx_fp32: str | Path, recipe: Recipe, calib: np.ndarray | None, out_dir: str | Path
) -> tuple[list[str], dict[str, str]]:
    """Write the recipe's artifact into ``out_dir``.

    Returns:
        ``(files, engine_options)``: file names relative to ``out_dir`` (the engine opens the
        first) and the engine options the device must use.
    """
    out_dir = Path(out_dir)
    options = dict(recipe.engine_options)
    if recipe.precision == "int8" and (calib is None or len(calib) == 0):
        raise EdgeTLError(f"recipe {recipe.name} quantizes to INT8 and needs --calib images")
    if recipe.format == "onnx":
        if recipe.precision == "fp32":
            shutil.copyfile(onnx_fp32, out_dir / "backbone.onnx")
        elif recipe.quantization == "ort-static":
            quantize_ort(onnx_fp32, out_dir / "backbone.onnx", calib, recipe)
        else:
            raise EdgeTLError(f"recipe {recipe.name}: format onnx supports fp32 or ort-static int8")
        return ["backbone.onnx"], options
    ov = require("openvino", "export")
    model = ov.convert_model(str(onnx_fp32))
    if recipe.quantization == "nncf":
        model = quantize_nncf(model, calib, recipe)
    elif recipe.precision not in ("fp32", "fp16"):
        raise EdgeTLError(f"recipe {recipe.name}: format openvino supports fp32, fp16 or nncf int8")
    ov.save_model(model, str(out_dir / "backbone.xml"), compress_to_fp16=recipe.precision == "fp16")
    return ["backbone.xml", "backbone.bin"], options


def quantize_ort(src: str | Path, dst: str | Path, calib: np.ndarray, recipe: Recipe) -> None:
    """Static INT8, QDQ format, per-channel weights, as the recipe says."""
    require("onnxruntime", "export")
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="edge_tl_ort_") as tmp:
        pre = Path(tmp) / "pre.onnx"
        q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=q.QuantFormat.QDQ,
                per_channel=recipe.per_channel,
                activation_type=getattr(q.QuantType, _ORT_TYPES[recipe.activation_type]),
                weight_type=getattr(q.QuantType, _ORT_TYPES[recipe.weight_type]),
                calibrate_method=getattr(
                    q.CalibrationMethod, _ORT_METHODS[recipe.calibration_method]
                ),
            )


def quantize_nncf(model, calib: np.ndarray, recipe: Recipe):
    """NNCF post-training INT8 of an OpenVINO model (overflow fix as the recipe says)."""
    nncf = require("nncf", "export")
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    # NNCF draws its progress on stdout; keep stdout clean for --json output.
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(
            model,
            dataset,
            subset_size=len(calib),
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix(recipe.overflow_fix)
            ),
        )
