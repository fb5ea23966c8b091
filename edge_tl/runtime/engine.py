"""Inference engines behind one call: ONNX Runtime and OpenVINO, imported lazily.

Where an engine runs: ONNX Runtime takes *execution providers* (``CUDAExecutionProvider``,
``TensorrtExecutionProvider``, ...; the CPU provider always last), OpenVINO a *device
string* (``CPU``, ``GPU``, ``NPU``, ``AUTO:NPU,CPU``). Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import EMBEDDING, INPUT_NAME, Artifact

__all__ = [
    "CPU_PROVIDER",
    "DISABLED_OPTIMIZERS",
    "Engine",
    "Inputs",
    "OpenVinoEngine",
    "OrtEngine",
    "make_engine",
    "openvino_device",
    "ort_providers",
]

DISABLED_OPTIMIZERS = "disabled_optimizers"
"""ONNX Runtime engine option: comma-separated graph optimizers to leave off."""


Inputs = np.ndarray | Mapping[str, np.ndarray]
"""An image batch ``float32[N,3,H,W]`` (the bundle's one input), or named inputs (a text
encoder's ``input_ids``, ``attention_mask``, ... as int64 ``[N, tokens]``)."""


class Engine(Protocol):
    """Runs the backbone: an image batch or named inputs -> named outputs."""

    def run(self, x: Inputs, outputs: Sequence[str] = (EMBEDDING,)) -> dict[str, np.ndarray]: ...


class OrtEngine:
    """ONNX Runtime CPU (or another execution provider) session over an ``.onnx`` file."""

    def __init__(
        self,
        path: str | Path,
        options: dict[str, str] | None = None,
        threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        ort = require("onnxruntime", "ort")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        options = dict(options or {})
        # not a config entry: graph optimizers to leave off. An INT8 graph that keeps some
        # convolutions in FP32 needs WeightBiasQuantization off, or ORT quantizes them again.
        disabled = [o for o in options.pop(DISABLED_OPTIMIZERS, "").split(",") if o]
        for key, value in options.items():
            so.add_session_config_entry(key, str(value))
        try:
            self.session = ort.InferenceSession(
                str(path), so, providers=list(providers), disabled_optimizers=disabled or None
            )
        except Exception as e:  # ORT raises its own exception types
            raise EdgeTLError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: Inputs, outputs: Sequence[str] = (EMBEDDING,)) -> dict[str, np.ndarray]:
        feed = dict(x) if isinstance(x, Mapping) else {INPUT_NAME: x}
        res = self.session.run(list(outputs), feed)
        return dict(zip(outputs, res, strict=True))


class OpenVinoEngine:
    """OpenVINO compiled model over an IR ``.xml`` (+ ``.bin``)."""

    def __init__(
        self,
        path: str | Path,
        options: dict[str, str] | None = None,
        threads: int = 0,
        device: str = "CPU",
    ) -> None:
        ov = require("openvino", "openvino")
        core = ov.Core()
        config = dict(options or {})
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), device, config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses
            raise EdgeTLError(f"OpenVINO cannot load {path}: {e}") from None
        self._local = threading.local()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    @property
    def request(self) -> Any:
        """This thread's infer request: one request is not safe to share between threads
        (the compiled model is), so each thread that runs the engine gets its own."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, x: Inputs, outputs: Sequence[str] = (EMBEDDING,)) -> dict[str, np.ndarray]:
        res = self.request.infer(dict(x) if isinstance(x, Mapping) else {0: x})
        by_name = {k.get_any_name(): v for k, v in res.items()}
        return {name: np.array(by_name[name]) for name in outputs}


def make_engine(
    bundle: str | Path,
    artifact: Artifact,
    threads: int = 0,
    providers: str | None = None,
    ov_device: str | None = None,
) -> Engine:
    """Open the bundle's artifact with the engine its format needs.

    Args:
        threads: engine threads (0: the engine's default).
        providers: ONNX Runtime execution providers, comma-separated, in order of
            preference (those this host lacks are skipped; the CPU provider is always last).
        ov_device: OpenVINO device string (default ``CPU``).

    Raises:
        EdgeTLError: an unknown format, or the engine cannot load the file.
    """
    path = Path(bundle) / artifact.files[0]
    if artifact.format == "onnx":
        return OrtEngine(path, artifact.engine_options, threads, ort_providers(providers)[0])
    if artifact.format == "openvino":
        return OpenVinoEngine(path, artifact.engine_options, threads, ov_device or "CPU")
    raise EdgeTLError(f"artifact format {artifact.format!r} is unknown; re-export the bundle")


CPU_PROVIDER = "CPUExecutionProvider"


def ort_providers(providers: str | None) -> tuple[list[str], list[str]]:
    """``(providers to use, providers asked for that this host's ONNX Runtime lacks)``."""
    ort = require("onnxruntime", "ort")
    asked = [p.strip() for p in (providers or CPU_PROVIDER).split(",") if p.strip()]
    have = set(ort.get_available_providers())
    use = [p for p in asked if p in have and p != CPU_PROVIDER] + [CPU_PROVIDER]
    return use, [p for p in asked if p not in have]


def openvino_device(device: str | None) -> tuple[str, list[str]]:
    """``(device string to use, devices asked for that this host's OpenVINO lacks)``.

    ``AUTO:NPU,GPU,CPU`` keeps the devices present; a plain device that is missing falls
    back to ``CPU``.
    """
    ov = require("openvino", "openvino")
    have = set(ov.Core().available_devices)
    device = device or "CPU"
    prefix, _, rest = device.partition(":")
    names = [d.strip() for d in (rest if rest else prefix).split(",") if d.strip()]
    present = [d for d in names if d.split(".")[0] in have or d in have]
    missing = [d for d in names if d not in present]
    if not present:
        return "CPU", missing
    if rest:
        return f"{prefix}:{','.join(present)}", missing
    return present[0], missing
