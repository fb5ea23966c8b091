"""ONNX FP32 -> the recipe's artifact: ONNX (FP32 or ORT static INT8, QDQ) or OpenVINO IR
(FP32, FP16, or INT8 through NNCF).

Calibration data is one source (``float32[N,3,H,W]``) with two thin adapters, as ORT's
``CalibrationDataReader`` and ``nncf.Dataset`` expect. ORT calibration ranges are cached in
a work folder (ORT's own ``calibration_cache_path``), so re-quantizing with other nodes
left in FP32 (the accuracy-control ladder) does not calibrate again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edge_tl.errors import EdgeTLError, require
from edge_tl.export.isolated import quantize_nncf_isolated
from edge_tl.export.saturation import pair_safe
from edge_tl.progress import progress, step
from edge_tl.spec import EMBEDDING, INPUT_NAME, Recipe

__all__ = [
    "build_artifact",
    "conv_nodes",
    "first_convolutions",
    "ort_preprocessed",
    "quantize_nncf",
    "quantize_ort",
]

_ORT_TYPES = {"u8": "QUInt8", "s8": "QInt8"}
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def build_artifact(
    onnx_fp32: str | Path,
    recipe: Recipe,
    calib: np.ndarray | None,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Write the recipe's artifact into ``out_dir``.

    Args:
        work_dir: where calibration caches live between calls (a temporary folder if None).
        validation: ``(inputs, fp32_embeddings)``: turns NNCF quantization into NNCF's
            accuracy control, on embedding cosine (see :func:`quantize_nncf`).

    Returns:
        ``(files, engine_options)``: file names relative to ``out_dir`` (the engine opens the
        first) and the engine options the device must use.
    """
    out_dir = Path(out_dir)
    options = dict(recipe.engine_options)
    if recipe.precision == "int8" and (calib is None or len(calib) == 0):
        raise EdgeTLError(f"recipe {recipe.name} quantizes to INT8 and needs --calib images")
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="edge_tl_q_"))
        if recipe.format == "onnx":
            if recipe.precision == "fp32":
                shutil.copyfile(onnx_fp32, out_dir / "backbone.onnx")
            elif recipe.quantization == "ort-static":
                quantize_ort(onnx_fp32, out_dir / "backbone.onnx", calib, recipe, Path(work_dir))
            else:
                raise EdgeTLError(
                    f"recipe {recipe.name}: an image backbone exports to ONNX as fp32 or "
                    "ort-static int8 (ort-dynamic is for text encoders)"
                )
            return ["backbone.onnx"], options
    ov = require("openvino", "export")
    if recipe.quantization == "nncf":  # in a child process: this one never imports NNCF
        quantize_nncf_isolated(onnx_fp32, calib, recipe, validation, out_dir / "backbone.xml")
        return ["backbone.xml", "backbone.bin"], options
    if recipe.precision not in ("fp32", "fp16"):
        raise EdgeTLError(f"recipe {recipe.name}: format openvino supports fp32, fp16 or nncf int8")
    with step(f"converting to OpenVINO {recipe.precision}"):
        model = ov.convert_model(str(onnx_fp32))
        fp16 = recipe.precision == "fp16"
        ov.save_model(model, str(out_dir / "backbone.xml"), compress_to_fp16=fp16)
    return ["backbone.xml", "backbone.bin"], options


def quantize_ort(
    src: str | Path, dst: str | Path, calib: np.ndarray, recipe: Recipe, work: Path
) -> None:
    """Static INT8, QDQ format, per-channel weights, as the recipe says.

    ``recipe.nodes_to_exclude`` stay in FP32. Calibration ranges are cached in ``work`` per
    method and calibration set. ``recipe.pair_safe_weights``: the convolutions ORT runs as
    u8s8 GEMMs get weight scales no AVX2 pair sum can saturate (exact without VNNI, with
    the fast kernels; :func:`edge_tl.export.saturation.pair_safe`).
    """
    require("onnxruntime", "export")
    from onnxruntime import quantization as q

    # ORT's histogram calibrators (entropy, percentile) stack batches: keep them one size
    step = 8 if recipe.calibration_method == "minmax" else 1

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            batches = [{INPUT_NAME: calib[i : i + step]} for i in range(0, len(calib), step)]
            self.batches = iter(progress(batches, desc="calibrating (ORT)"))

        def get_next(self):
            return next(self.batches, None)

    pre = ort_preprocessed(src, work)
    key = hashlib.sha256(np.ascontiguousarray(calib[:, :, ::8, ::8]).tobytes()).hexdigest()[:12]
    cache = work / f"calib-{recipe.calibration_method}-{len(calib)}-{key}.json"
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        q.quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=getattr(q.QuantType, _ORT_TYPES[recipe.activation_type]),
            weight_type=getattr(q.QuantType, _ORT_TYPES[recipe.weight_type]),
            calibrate_method=getattr(q.CalibrationMethod, _ORT_METHODS[recipe.calibration_method]),
            nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
            calibration_cache_path=str(cache),
        )
    if recipe.pair_safe_weights:
        pair_safe(dst, pre, None, dst)


def ort_preprocessed(src: str | Path, work: Path) -> Path:
    """ORT's quantization pre-processing (shape inference, Conv+BN fusion), done once."""
    from onnxruntime import quantization as q

    pre = work / "pre.onnx"
    if not pre.is_file():
        q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    return pre


def conv_nodes(onnx_path: str | Path) -> list[dict[str, object]]:
    """The quantizable convolutions of an ONNX graph, in order: name and a readable shape."""
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        w = inits.get(n.input[1], ())
        groups = next((a.i for a in n.attribute if a.name == "group"), 1)
        kind = "depthwise" if groups > 1 and len(w) == 4 and w[1] == 1 else "conv"
        shape = f"{kind} {w[2]}x{w[3]} {w[1] * groups}->{w[0]}" if len(w) == 4 else kind
        out.append({"name": n.name, "index": len(out), "shape": shape})
    return out


def quantize_nncf(
    model, calib: np.ndarray, recipe: Recipe, validation: tuple[np.ndarray, np.ndarray] | None
):
    """NNCF post-training INT8 of an OpenVINO model.

    With ``validation = (inputs, fp32_embeddings)`` NNCF's ``quantize_with_accuracy_control``
    ranks the quantized layers by what they cost and keeps the worst in FP32 until the mean
    embedding cosine vs FP32 is within ``1 - recipe.min_cosine`` of the FP32 model's (1.0).
    """
    # importing nncf loads torch's C++-extension helper, which warns that no CUDA runtime
    # exists on a CPU-only workstation: true, and not the user's concern here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    nncf = require("nncf", "export")
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    dataset = nncf.Dataset(_Counted([calib[i : i + 1] for i in range(len(calib))], "calibrating"))
    params = AdvancedQuantizationParameters(overflow_fix=OverflowFix(recipe.overflow_fix))
    ignored = (
        nncf.IgnoredScope(names=list(recipe.nodes_to_exclude), validate=False)
        if recipe.nodes_to_exclude
        else None
    )
    # NNCF draws progress bars on stdout and logs each step at INFO: the export prints its
    # own one line per accuracy-control step, and stdout may be --json
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    with _quiet_stdout(), warnings.catch_warnings(), _restore(nncf_log, level):
        warnings.simplefilter("ignore")
        if validation is None:
            return nncf.quantize(
                model,
                dataset,
                subset_size=len(calib),
                fast_bias_correction=recipe.fast_bias_correction,
                ignored_scope=ignored,
                advanced_parameters=params,
            )
        from nncf.parameters import DropType

        def cosine(compiled, items) -> tuple[float, list[float]]:
            per_item = []
            for x, ref in items:
                got = np.asarray(compiled(x)[compiled.output(EMBEDDING)])[0]
                per_item.append(
                    float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-12))
                )
            return float(np.mean(per_item)), per_item

        inputs, refs = validation
        items = [(inputs[i : i + 1], refs[i]) for i in range(len(inputs))]
        return nncf.quantize_with_accuracy_control(
            model,
            dataset,
            nncf.Dataset(items),
            validation_fn=cosine,
            max_drop=1.0 - recipe.min_cosine,
            drop_type=DropType.ABSOLUTE,
            subset_size=len(calib),
            fast_bias_correction=recipe.fast_bias_correction,
            ignored_scope=ignored,
            advanced_quantization_parameters=params,
        )


class _Counted:
    """A list whose every pass draws a progress bar (NNCF iterates its dataset once per
    statistics pass)."""

    def __init__(self, items: list, desc: str) -> None:
        self.items, self.desc = items, desc

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(progress(self.items, desc=self.desc))


@contextlib.contextmanager
def _restore(logger: logging.Logger, level: int):
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_stdout():
    """ORT's calibrators print their progress on stdout (which may be --json): drop it."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def first_convolutions(onnx_path: Path, n: int) -> list[str]:
    """OpenVINO names of the first ``n`` convolutions (NNCF ignored-scope names)."""
    ov = require("openvino", "export")
    ops = ov.convert_model(str(onnx_path)).get_ordered_ops()
    return [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() in ("Convolution", "GroupConvolution")
    ][:n]
