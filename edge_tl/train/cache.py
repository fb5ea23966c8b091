"""Cache activations of a frozen, deterministic prefix once, through ONNX Runtime.

PyTorch eager is slow for EfficientNet-Lite on a CPU (unfolded batch norm, explicit
padding); the exported graph runs ~10x faster. The prefix is exported to a temporary
ONNX file, checked against PyTorch on the first batch, and run over the data set.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl.errors import EdgeTLError
from edge_tl.export import onnx_export
from edge_tl.progress import progress
from edge_tl.runtime.preprocess import batch_inputs
from edge_tl.spec import Preprocess


class _Prefix(nn.Module):
    def __init__(self, features: nn.Module, block: int | None) -> None:
        super().__init__()
        self.features = features
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return self.features(x)[0]
        return self.features.forward_until(x, self.block)


def cache_activations(
    features: nn.Module,
    paths: Sequence[str],
    pre: Preprocess,
    block: int | None = None,
    batch_size: int = 32,
    desc: str = "caching activations",
    use_onnx: bool = True,
) -> np.ndarray:
    """Run the frozen prefix (``features`` up to ``block``; the embedding when ``None``).

    Returns:
        ``float32[N, ...]`` activations in the order of ``paths``.
    """
    from edge_tl.runtime.engine import OrtEngine

    prefix = _Prefix(features, block).eval()
    if not use_onnx:
        chunks = []
        with torch.no_grad():
            for i in progress(range(0, len(paths), batch_size), desc=desc):
                x = torch.from_numpy(batch_inputs(paths[i : i + batch_size], pre))
                chunks.append(prefix(x).numpy())
        return np.concatenate(chunks)
    with tempfile.TemporaryDirectory(prefix="edge_tl_cache_") as tmp:
        path = Path(tmp) / "prefix.onnx"
        onnx_export(prefix, path, pre.size, ("out",))
        engine = OrtEngine(path)
        chunks = []
        starts = range(0, len(paths), batch_size)
        for i in progress(starts, desc=desc):
            x = batch_inputs(paths[i : i + batch_size], pre)
            out = engine.run(x, ["out"])["out"]
            if i == 0:
                with torch.no_grad():
                    ref = prefix(torch.from_numpy(x[:4])).numpy()
                tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
                if not np.abs(out[:4] - ref).max() <= tol:
                    raise EdgeTLError(
                        "activations from the exported prefix do not match PyTorch; "
                        "rerun with --no-onnx-cache to cache them with PyTorch"
                    )
            chunks.append(out)
    return np.concatenate(chunks)
