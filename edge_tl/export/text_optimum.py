"""The optimum calls of a text export: a Hugging Face folder -> ONNX, OpenVINO IR, INT8.

One function per artifact, each a short call into optimum (Hugging Face's export and
quantization toolkit for transformers: ``optimum-onnx`` for ONNX and ONNX Runtime,
``optimum-intel`` for OpenVINO and NNCF):

- :func:`export_onnx`: ``optimum.exporters.onnx.main_export``, task ``feature-extraction``
  (inputs ``input_ids`` / ``attention_mask`` / ``token_type_ids``, output
  ``last_hidden_state``, dynamic batch and sequence axes).
- :func:`quantize_ort`: ``ORTQuantizer`` with a ``QuantizationConfig``: static (QDQ, ranges
  calibrated on the user's texts, ``quantization = "ort-static"``) or dynamic
  (``MatMulInteger`` with activation ranges taken per batch at run time,
  ``quantization = "ort-dynamic"``). Calibration ranges are kept per calibration set, so
  accuracy control re-quantizes with other nodes left in FP32 without calibrating again.
- :func:`export_openvino`: ``optimum.exporters.openvino.main_export`` with an ``OVConfig``
  of ``dtype`` fp32 or fp16 (weights compressed to FP16).
- :func:`quantize_openvino`: ``OVQuantizer`` + ``OVQuantizationConfig`` (NNCF post-training
  INT8, ``model_type="transformer"``).

Both OpenVINO builds run in a child process (:func:`openvino_isolated`), as
:mod:`edge_tl.export.isolated` does for images: optimum-intel imports NNCF even to convert,
and the exporting process never imports NNCF.

Calibration data is one list of ``{input name: int64[1, T]}`` (one text each, unpadded), which
ORT's calibration reader and ``nncf.Dataset`` both take as it is. Every function writes the
artifact under the bundle's names (``backbone.onnx``, ``backbone.xml`` + ``backbone.bin``);
optimum's own names (``model.onnx``, ``openvino_model.xml``) and side files stay in ``work``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import edge_tl
from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import Recipe

__all__ = [
    "FFN_OUTPUT_ONNX",
    "FFN_OUTPUT_OPENVINO",
    "CalibInputs",
    "RangeCache",
    "export_onnx",
    "export_openvino",
    "ffn_output_matmuls",
    "matmul_nodes",
    "quantize_openvino",
    "openvino_isolated",
    "quantize_ort",
]

CalibInputs = list[dict[str, np.ndarray]]
"""Calibration inputs: one ``{input name: int64[1, T]}`` per text, unpadded."""

OPTIMUM_ONNX = "model.onnx"
OPTIMUM_OV = "openvino_model"
QUANTIZED_OPS = ("MatMul", "Gather")
"""The operators INT8 recipes quantize in a transformer encoder: the MatMuls (the dense
projections, the feed-forward layers and the attention products) hold nearly all of its
arithmetic, and the embedding lookups (``Gather``) half of its weights (all-MiniLM-L6-v2:
the INT8 file is 23 MB with them, 59 MB without; embedding cosine vs FP32 0.9940 vs 0.9943
on 600 real texts, ORT dynamic). LayerNorm, Softmax, GELU and the residual additions stay in
FP32, as ONNX Runtime's transformer quantization guide advises."""
FFN_OUTPUT_ONNX = r"/encoder/layer\.\d+/output/dense/MatMul"
"""optimum's ONNX names of the feed-forward output MatMuls of a BERT-family encoder (HF
module ``encoder.layer.N.output.dense``; the attention's is ``attention.output.dense``)."""
FFN_OUTPUT_OPENVINO = r".*encoder\.layer\.\d+\.output\.dense/.*MatMul"
"""The same MatMuls in optimum-intel's OpenVINO IR (an NNCF ignored-scope pattern, matched
from the start of the name)."""
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ORT_TYPES = {"u8": "QUInt8", "s8": "QInt8"}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """optimum, torch's tracer and ORT's calibrators print progress on stdout (which may be
    ``--json``) and warn about what does not concern the user here (the tracer's constant
    folding, accelerate missing for a weight-deduplication check on models over 2 GB):
    drop both for the call."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "nncf", "openvino")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model_dir: str | Path, work: Path) -> Path:
    """ONNX FP32 of a Hugging Face encoder folder through optimum; returns the ``.onnx`` path
    (in ``work/onnx``, beside optimum's copy of the config, which ``ORTQuantizer`` reads).

    Raises:
        EdgeTLError: optimum-onnx is not installed, or the export fails (the first line of
            its error).
    """
    require("optimum.exporters.onnx", "nlp")
    from optimum.exporters.onnx import main_export

    out = work / "onnx"
    try:
        with quiet():
            main_export(
                str(model_dir),
                output=str(out),
                task="feature-extraction",
                library_name="transformers",  # not sentence-transformers: the bundle pools
                do_validation=False,  # the export checks the pooled embeddings itself
                device="cpu",
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise EdgeTLError(f"optimum cannot export {model_dir} to ONNX: {_first_line(e)}") from None
    return out / OPTIMUM_ONNX


def ffn_output_matmuls(onnx_path: str | Path) -> tuple[str, ...]:
    """Names of the feed-forward output MatMuls (:data:`FFN_OUTPUT_ONNX`) of an ONNX encoder."""
    import re

    return tuple(
        n["name"] for n in matmul_nodes(onnx_path) if re.fullmatch(FFN_OUTPUT_ONNX, n["name"])
    )


def matmul_nodes(onnx_path: str | Path) -> list[dict[str, Any]]:
    """The quantizable MatMuls of an ONNX encoder graph, in order: name, index and a readable
    shape (``dense 384->1536`` for a weight, ``attention`` for two activations)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        w = inits.get(n.input[1])
        shape = f"dense {w[0]}->{w[1]}" if w is not None and len(w) == 2 else "attention"
        out.append({"name": n.name, "index": len(out), "shape": shape})
    return out


class RangeCache:
    """ORT calibration ranges per (method, calibration set): calibrating runs the whole
    calibration set through an augmented graph, quantizing with the ranges is a second."""

    def __init__(self) -> None:
        self._ranges: dict[str, Any] = {}

    def get(self, quantizer: Any, recipe: Recipe, calib: CalibInputs, work: Path) -> Any:
        from onnxruntime.quantization import CalibrationMethod
        from optimum.onnxruntime.configuration import CalibrationConfig

        h = hashlib.sha256()
        for item in calib:
            h.update(item["input_ids"].tobytes())
        key = f"{recipe.calibration_method}-{len(calib)}-{h.hexdigest()[:12]}"
        if key not in self._ranges:
            config = CalibrationConfig(
                dataset_name="edge_tl calibration texts",
                dataset_config_name="",
                dataset_split="",
                dataset_num_samples=len(calib),
                method=getattr(CalibrationMethod, _ORT_METHODS[recipe.calibration_method]),
                num_bins=2048 if recipe.calibration_method != "minmax" else None,
                num_quantized_bins=128 if recipe.calibration_method == "entropy" else None,
                percentile=99.999 if recipe.calibration_method == "percentile" else None,
            )
            with quiet():
                self._ranges[key] = quantizer.fit(
                    # any iterable of {name: one sample}: optimum's reader adds the batch axis
                    # (so no `datasets` package is needed)
                    dataset=[{k: v[0] for k, v in item.items()} for item in calib],
                    calibration_config=config,
                    onnx_augmented_model_name=str(work / "augmented.onnx"),
                    operators_to_quantize=list(QUANTIZED_OPS),
                )
        return self._ranges[key]


def quantize_ort(
    onnx_fp32: Path,
    dst: Path,
    recipe: Recipe,
    calib: CalibInputs | None,
    work: Path,
    ranges: RangeCache | None = None,
) -> None:
    """INT8 ONNX by optimum's ``ORTQuantizer``: static QDQ (``ort-static``: activation ranges
    calibrated on ``calib``) or dynamic (``ort-dynamic``: ``MatMulInteger`` with ranges per
    batch at run time, no calibration), per-channel and ``reduce_range`` (7-bit weights, safe
    from the u8s8 saturation of CPUs without VNNI) as the recipe says; ``recipe.nodes_to_exclude``
    stay in FP32. Writes ``dst``.

    Raises:
        EdgeTLError: a static recipe without calibration inputs.
    """
    from onnxruntime.quantization import QuantFormat, QuantizationMode, QuantType
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import QuantizationConfig

    static = recipe.quantization == "ort-static"
    if static and not calib:
        raise EdgeTLError(f"recipe {recipe.name} calibrates INT8 on texts: pass --calib TEXTS")
    quantizer = ORTQuantizer.from_pretrained(onnx_fp32.parent, file_name=onnx_fp32.name)
    config = QuantizationConfig(
        is_static=static,
        format=QuantFormat.QDQ if static else QuantFormat.QOperator,
        mode=QuantizationMode.QLinearOps if static else QuantizationMode.IntegerOps,
        # dynamic quantization takes u8 activations only (ORT's MatMulInteger)
        activations_dtype=getattr(
            QuantType, _ORT_TYPES[recipe.activation_type if static else "u8"]
        ),
        weights_dtype=getattr(QuantType, _ORT_TYPES[recipe.weight_type]),
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        nodes_to_exclude=list(recipe.nodes_to_exclude),
        operators_to_quantize=list(QUANTIZED_OPS),
    )
    tensor_ranges = None
    if static:
        assert calib is not None
        tensor_ranges = (ranges or RangeCache()).get(quantizer, recipe, calib, work)
    out = work / "ort_quantized"
    shutil.rmtree(out, ignore_errors=True)
    with quiet():
        quantizer.quantize(
            quantization_config=config,
            save_dir=out,
            file_suffix="quantized",
            calibration_tensors_range=tensor_ranges,
        )
    shutil.move(out / f"{onnx_fp32.stem}_quantized.onnx", dst)


def export_openvino(model_dir: str | Path, out_dir: Path, precision: str, work: Path) -> None:
    """OpenVINO IR of a Hugging Face encoder folder through optimum-intel (FP32 weights, or
    FP16-compressed with ``precision="fp16"``): ``backbone.xml`` + ``backbone.bin`` in
    ``out_dir``.

    Raises:
        EdgeTLError: optimum-intel is not installed, or the conversion fails.
    """
    require("optimum.intel", "nlp")
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    tmp = work / f"openvino-{precision}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet():
            main_export(
                str(model_dir),
                output=str(tmp),
                task="feature-extraction",
                library_name="transformers",
                ov_config=OVConfig(dtype=precision),
                convert_tokenizer=False,
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise EdgeTLError(
            f"optimum-intel cannot convert {model_dir} to OpenVINO: {_first_line(e)}"
        ) from None
    _move_ir(tmp, out_dir)


def _move_ir(src: Path, out_dir: Path) -> None:
    """optimum-intel's ``openvino_model.xml``/``.bin`` -> the bundle's ``backbone.xml``/``.bin``
    (the XML names its weights file by offset only, so a rename keeps the pair intact)."""
    for ext in ("xml", "bin"):
        shutil.move(src / f"{OPTIMUM_OV}.{ext}", out_dir / f"backbone.{ext}")


def quantize_openvino(
    model_dir: str | Path, calib: CalibInputs, recipe: Recipe, out_dir: Path, work: Path
) -> None:
    """NNCF post-training INT8 through optimum-intel's ``OVQuantizer`` (in this process; the
    export calls :func:`openvino_isolated`): the encoder converted to OpenVINO,
    calibrated on ``calib``; overflow fix, bias correction and ignored nodes as the recipe
    says. Writes ``backbone.xml`` + ``backbone.bin`` into ``out_dir``."""
    # importing nncf loads torch's C++-extension helper, which warns that no CUDA runtime
    # exists on a CPU-only workstation: true, and not the user's concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    require("optimum.intel", "nlp")
    require("nncf", "export")
    import nncf
    from optimum.intel import (
        OVConfig,
        OVModelForFeatureExtraction,
        OVQuantizationConfig,
        OVQuantizer,
    )

    tmp = work / "openvino-int8"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet():
        model = OVModelForFeatureExtraction.from_pretrained(
            str(model_dir), export=True, compile=False, library_name="transformers"
        )
        config = OVQuantizationConfig(
            num_samples=len(calib),
            model_type="transformer",
            fast_bias_correction=recipe.fast_bias_correction,
            overflow_fix=recipe.overflow_fix,
            ignored_scope=_ignored_scope(recipe.nodes_to_exclude),
        )
        OVQuantizer.from_pretrained(model).quantize(
            calibration_dataset=nncf.Dataset(calib),
            ov_config=OVConfig(quantization_config=config),
            save_directory=str(tmp),
        )
    _move_ir(tmp, out_dir)


def _ignored_scope(nodes: tuple[str, ...]) -> dict[str, Any] | None:
    """NNCF's ignored scope for ``nodes``: names, and ``re:PATTERN`` entries as patterns."""
    if not nodes:
        return None
    names = [n for n in nodes if not n.startswith("re:")]
    patterns = [n[3:] for n in nodes if n.startswith("re:")]
    return {"names": names, "patterns": patterns, "validate": False}


def openvino_isolated(
    model_dir: str | Path, recipe: Recipe, out_dir: Path, calib: CalibInputs | None = None
) -> None:
    """The recipe's OpenVINO IR (:func:`export_openvino`, or :func:`quantize_openvino` for
    INT8) built in a fresh interpreter that exits when done: optimum-intel imports NNCF and
    NNCF's PyTorch backend even to convert a model, and the exporting process must not keep
    them (why: the docstring of :mod:`edge_tl.export.isolated`). The job travels as files:
    ``job.json`` and ``calib.npz`` (each text's inputs as ``<i>/<name>``).

    Raises:
        EdgeTLError: what the conversion raised, as the child reported it.
        RuntimeError: the child died or failed without a report (its traceback is on stderr).
    """
    import dataclasses

    from edge_tl.export.isolated import child_failed

    with tempfile.TemporaryDirectory(prefix="edge_tl_openvino_") as tmp:
        job_dir = Path(tmp)
        job = {"model": str(model_dir), "out": str(out_dir), "recipe": dataclasses.asdict(recipe)}
        (job_dir / "job.json").write_text(json.dumps(job))
        if calib is not None:
            np.savez(
                job_dir / "calib.npz",
                **{f"{i}/{k}": v for i, item in enumerate(calib) for k, v in item.items()},
            )
        root = str(Path(edge_tl.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(job_dir)],
            env={**os.environ, "PYTHONPATH": path},
            check=False,
        )
        child_failed(proc.returncode, job_dir / "error.txt")


_CHILD = "import sys; from edge_tl.export.text_optimum import _main; sys.exit(_main(sys.argv[1]))"


def _main(job_dir: str | Path) -> int:
    """The child's side of :func:`openvino_isolated`."""
    # optimum-intel imports NNCF, which loads torch's C++-extension helper, which warns that
    # no CUDA runtime exists on a CPU-only workstation: true, and not the user's concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    recipe = Recipe(**job["recipe"])
    calib: dict[int, dict[str, np.ndarray]] = {}
    if (job_dir / "calib.npz").is_file():
        with np.load(job_dir / "calib.npz", allow_pickle=False) as z:
            for key in z.files:
                i, name = key.split("/")
                calib.setdefault(int(i), {})[name] = z[key]
    try:
        with tempfile.TemporaryDirectory(prefix="edge_tl_openvino_work_") as work:
            if recipe.precision == "int8":
                inputs = [calib[i] for i in sorted(calib)]
                quantize_openvino(job["model"], inputs, recipe, Path(job["out"]), Path(work))
            else:
                export_openvino(job["model"], Path(job["out"]), recipe.precision, Path(work))
    except EdgeTLError as e:
        (job_dir / "error.txt").write_text(str(e))
        return 2
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
