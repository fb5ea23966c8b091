"""torch -> ONNX with fixed names, a dynamic batch axis and a parity check on real images."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from edge_tl.backbones import FeatureModel
from edge_tl.errors import EdgeTLError
from edge_tl.spec import EMBEDDING, FEATURES_S8, FEATURES_S16, INPUT_NAME

OUTPUT_NAMES = (EMBEDDING, FEATURES_S8, FEATURES_S16)
OPSET = 18


def export_onnx(model: FeatureModel, path: str | Path, size: int) -> dict[str, list]:
    """Export ``model`` to a self-contained ``.onnx`` (input ``image``, dynamic batch).

    Returns:
        The output shapes, with ``"batch"`` for the dynamic axis.
    """
    model = model.eval()
    onnx_export(model, path, size, OUTPUT_NAMES)
    with torch.no_grad():
        outs = model(torch.zeros(2, 3, size, size))
    return {n: ["batch", *o.shape[1:]] for n, o in zip(OUTPUT_NAMES, outs, strict=True)}


def onnx_export(module: torch.nn.Module, path: str | Path, size: int, outputs: tuple[str, ...]):
    """The one ONNX export call: dynamo, opset 18, input ``image`` with a dynamic batch axis,
    weights inside the file, the exporter's chatter kept off the console."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, size, size),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_shapes={"x": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


class _quiet_exporter:
    """The dynamo exporter logs progress at INFO and prints; keep the user's console clean."""

    def __enter__(self):
        self.level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        import contextlib
        import io

        self.redirect = contextlib.redirect_stdout(io.StringIO())
        self.redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)
        logging.getLogger("torch.onnx").setLevel(self.level)
        return False


def parity(
    model: FeatureModel, onnx_path: str | Path, inputs: np.ndarray, atol: float
) -> dict[str, float]:
    """Max abs difference per output between PyTorch and ONNX Runtime on ``inputs``.

    An output passes when its max abs difference is within ``atol`` times its peak
    magnitude (at least 1).

    Raises:
        EdgeTLError: listing every output over ``atol``.
    """
    from edge_tl.runtime.engine import OrtEngine

    engine = OrtEngine(onnx_path)
    with torch.no_grad():
        ref = [o.numpy() for o in model.eval()(torch.from_numpy(inputs))]
    got = engine.run(inputs, OUTPUT_NAMES)
    diffs, bad = {}, {}
    for name, r in zip(OUTPUT_NAMES, ref, strict=True):
        # atol on values of magnitude <= 1; relative to the peak for larger activations
        tol = atol * max(1.0, float(np.abs(r).max()))
        diffs[name] = float(np.abs(got[name] - r).max())
        if not diffs[name] <= tol:
            bad[name] = diffs[name]
    if bad:
        listing = ", ".join(f"{n} max abs diff {d:.2e}" for n, d in bad.items())
        raise EdgeTLError(
            f"ONNX export does not match PyTorch (tolerance {atol:.0e}): {listing}; "
            "report this with the backbone name, or loosen parity_atol in the recipe"
        )
    return diffs
