"""The one torch -> ONNX call: the boundary cache and the export both go through it.

Dynamo exporter, opset 18, input ``image`` with a dynamic batch axis, weights inside the
file (no external data), the exporter's chatter kept off the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from edge_tl.spec import INPUT_NAME

__all__ = ["OPSET", "torch_to_onnx"]

OPSET = 18


def torch_to_onnx(
    module: torch.nn.Module, path: str | Path, size: int, outputs: tuple[str, ...]
) -> None:
    """Export ``module`` (input ``float32[N, 3, size, size]``) to a self-contained ``.onnx``
    at ``path`` with ``outputs`` named in order.

    Example:
        >>> torch_to_onnx(features, "fp32.onnx", 224, ("embedding",))  # doctest: +SKIP
    """
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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs progress at INFO and prints; keep the user's console clean."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)
