"""NNCF quantization in a fresh interpreter of its own.

A process that had quantized with NNCF (and then trained with torch) crashed with a
segfault in long test sessions. What NNCF leaves behind in a process is more than the
model: NNCF's PyTorch backend (``nncf.torch``, which loads torch's C++-extension helper
and NNCF's function hooks) is imported by NNCF's backend checks even for an OpenVINO
model, and stays imported; so does OpenVINO's TBB worker pool NNCF drives. Here the
quantization runs in a child (a fresh ``python`` running :func:`_main` on ``WORK``) that
exits when done, so the exporting process (a test session, a notebook, the demo that
trains next) never imports NNCF.

The job travels as files in ``WORK``: ``job.json`` (the ONNX path, the IR path to write,
the recipe), ``calib.npy`` and, for accuracy control, ``val_x.npy`` / ``val_ref.npy``. An
:class:`~edge_tl.errors.EdgeTLError` in the child comes back as ``error.txt`` and is
raised again here; progress bars and warnings reach the same stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import edge_tl
from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import Recipe

__all__ = ["child_failed", "quantize_nncf_isolated"]


def quantize_nncf_isolated(
    onnx_fp32: str | Path,
    calib: np.ndarray,
    recipe: Recipe,
    validation: tuple[np.ndarray, np.ndarray] | None,
    xml: Path,
) -> None:
    """Write ``xml`` (and its ``.bin``): ``onnx_fp32`` quantized to INT8 by
    :func:`~edge_tl.export.quantize.quantize_nncf` (same arguments), in a child process.

    Raises:
        EdgeTLError: what the quantization raised, as the child reported it.
        RuntimeError: the child died (a signal) or failed without a report; its traceback
            is on stderr above.
    """
    with tempfile.TemporaryDirectory(prefix="edge_tl_nncf_") as tmp:
        work = Path(tmp)
        job = {"onnx": str(onnx_fp32), "xml": str(xml), "recipe": dataclasses.asdict(recipe)}
        (work / "job.json").write_text(json.dumps(job))
        np.save(work / "calib.npy", np.ascontiguousarray(calib, np.float32))
        if validation is not None:
            np.save(work / "val_x.npy", validation[0])
            np.save(work / "val_ref.npy", validation[1])
        # the child imports this very edge_tl, wherever it was imported from
        root = str(Path(edge_tl.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(work)],
            env={**os.environ, "PYTHONPATH": path},
            check=False,
        )
        child_failed(proc.returncode, work / "error.txt")


def child_failed(returncode: int, error: Path) -> None:
    """Raise what a quantization child reported (``error``: its one-line EdgeTLError), or
    how it died; nothing when it exited 0.

    Raises:
        EdgeTLError: the child's own error.
        RuntimeError: the child died (a signal) or failed without a report.
    """
    if returncode != 0 and error.is_file():
        raise EdgeTLError(error.read_text().strip())
    if returncode != 0:
        how = (
            f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
        )
        raise RuntimeError(f"NNCF quantization stopped ({how}); see the messages above")


# not ``-m edge_tl.export.isolated``: the package imports this module first, and runpy warns
_CHILD = "import sys; from edge_tl.export.isolated import _main; sys.exit(_main(sys.argv[1]))"


def _main(work: str | Path) -> int:
    work = Path(work)
    from edge_tl.export.quantize import quantize_nncf

    job = json.loads((work / "job.json").read_text())
    validation = None
    if (work / "val_x.npy").is_file():
        validation = (np.load(work / "val_x.npy"), np.load(work / "val_ref.npy"))
    try:
        ov = require("openvino", "export")
        model = ov.convert_model(job["onnx"])
        model = quantize_nncf(
            model, np.load(work / "calib.npy"), Recipe(**job["recipe"]), validation
        )
        ov.save_model(model, job["xml"], compress_to_fp16=False)
    except EdgeTLError as e:
        (work / "error.txt").write_text(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
