"""Cache activations of a frozen, deterministic prefix once, through ONNX Runtime.

Whenever everything before the first trainable layer is frozen and deterministic, its
output can be computed once per image (or once per augmented view) and training runs
only the rest. PyTorch eager is slow for EfficientNet-Lite on a CPU (unfolded batch norm,
explicit padding); the exported graph runs ~10x faster. The prefix is exported to a
temporary ONNX file, checked against PyTorch on the first batch, and run over the data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.preprocess import batch_inputs
from edge_tl.spec import Preprocess
from edge_tl.train.onnx import torch_to_onnx

__all__ = ["PrefixRunner", "cache_activations"]

_ORT_SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime session config entry


class _Prefix(nn.Module):
    def __init__(self, features: nn.Module, block: int | None) -> None:
        super().__init__()
        self.features = features
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return self.features(x)[0]
        return self.features.forward_until(x, self.block)


class PrefixRunner:
    """The frozen prefix (``features`` up to ``block``; the embedding when ``None``), exported
    once and run over as many batches as needed.

    Example:
        >>> with PrefixRunner(features, 224, block=11) as run:  # doctest: +SKIP
        ...     train_acts, val_acts = run(train_batches), run(val_batches)
    """

    def __init__(
        self, features: nn.Module, size: int, block: int | None = None, use_onnx: bool = True
    ) -> None:
        self.prefix = _Prefix(features, block).eval()
        self.size, self.use_onnx = size, use_onnx
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._engine = None
        self._checked = False

    def __enter__(self) -> PrefixRunner:
        if self.use_onnx:
            from edge_tl.runtime.engine import OrtEngine

            self._tmp = tempfile.TemporaryDirectory(prefix="edge_tl_cache_")
            path = Path(self._tmp.name) / "prefix.onnx"
            torch_to_onnx(self.prefix, path, self.size, ("out",))
            # DataLoader workers decode the next batches while the engine runs: ORT threads
            # that spin after each run would take the cores from them
            self._engine = OrtEngine(path, {_ORT_SPINNING: "0"})
        return self

    def __exit__(self, *exc) -> None:
        self._engine = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __call__(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Activations ``float32[N, ...]`` for network inputs ``float32[n, 3, size, size]``.

        Raises:
            EdgeTLError: the exported prefix disagrees with PyTorch on the first batch.
        """
        chunks: list[np.ndarray] = []
        for x in batches:
            if self._engine is None:
                with torch.no_grad():
                    chunks.append(self.prefix(torch.from_numpy(x)).numpy())
                continue
            out = self._engine.run(x, ["out"])["out"]
            if not self._checked:
                with torch.no_grad():
                    ref = self.prefix(torch.from_numpy(x[:4])).numpy()
                tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
                if not np.abs(out[:4] - ref).max() <= tol:
                    raise EdgeTLError(
                        "activations from the exported prefix do not match PyTorch; "
                        "rerun with --no-onnx-cache to cache them with PyTorch"
                    )
                self._checked = True
            chunks.append(out)
        return np.concatenate(chunks)


def cache_activations(
    features: nn.Module,
    paths: Sequence[str],
    pre: Preprocess,
    block: int | None = None,
    batch_size: int = 32,
    desc: str = "caching activations",
    use_onnx: bool = True,
) -> np.ndarray:
    """Activations ``float32[N, ...]`` of the frozen prefix (up to ``block``; the pooled
    embedding when None) for image files, preprocessed as the manifest says."""
    starts = range(0, len(paths), batch_size)
    batches = (batch_inputs(paths[i : i + batch_size], pre) for i in progress(starts, desc=desc))
    with PrefixRunner(features, pre.size, block, use_onnx) as run:
        return run(batches)
