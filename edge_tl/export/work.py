"""What every recipe of one export call shares (:class:`_Work`): the source, opened (and
AdaBN-adapted, and set to its input size), its images decoded once, the FP32 graph exported
and checked against PyTorch once, the FP32 engine and head; kept across calls by the run's
export cache (:mod:`edge_tl.export.cache`). Each recipe's bundle is then made from it by
:mod:`edge_tl.export.pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.export.cache import ExportCache
from edge_tl.export.fidelity import HeadFit, Images, embed, engine_runner, torch_runner
from edge_tl.export.source import ExportSource, calibration_pool, open_backbone, open_run
from edge_tl.progress import step
from edge_tl.runtime.engine import OrtEngine
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import Recipe

__all__ = ["check_image_size"]

_logger = logging.getLogger(__name__)


def check_image_size(image_size: int, run: str | Path | None) -> None:
    """Refuse an export input size the graph cannot take: ``image_size`` must be 0 (the
    native size) or a multiple of 32 in 32..1024 (the backbone's coarsest stride, so every
    feature grid covers the input exactly), and only with ``--backbone``.

    Raises:
        EdgeTLError: naming the value and the fix.
    """
    if not image_size:
        return
    if run is not None:
        raise EdgeTLError(
            f"--image-size {image_size} sets a pretrained backbone's input size; a run keeps "
            "the size it was trained at: train with `edge-tl train ... --image-size N`"
        )
    if not 32 <= image_size <= 1024 or image_size % 32:
        raise EdgeTLError(
            f"--image-size {image_size}: pass a multiple of 32 between 32 and 1024 (e.g. 224, "
            "320, 384), so the stride-16 and stride-32 feature grids cover the input exactly"
        )


@dataclass(frozen=True)
class _Graph:
    path: Path
    outputs: dict[str, list[Any]]
    parity: dict[str, float]
    peaks: dict[str, float]


@dataclass
class _Work:
    """What every recipe of one export call shares: the source and its images, the FP32
    graph, the FP32 engine and head, and the cache that keeps them across calls
    (:class:`~edge_tl.export.cache.ExportCache`). Made by :meth:`open`; each recipe's bundle
    is then made by :func:`_export_one`."""

    src: ExportSource
    head_fit: str
    pool: list[str]
    calib_skipped: list[Any]
    adapted: dict[str, Any] | None
    cache: ExportCache
    tmp: Path
    graph: _Graph | None = None
    heads: HeadFit | None = None
    fp32_engine: Any = None
    fp32_head: LinearHead | None = None
    _images: dict[tuple[tuple[str, ...], bool], Images] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        run: str | Path | None,
        backbone: str | None,
        calib: str | Path | None,
        head_fit: str,
        weights: str | Path | None,
        skip_bad: bool,
        adapt_bn: str | Path | None,
        cache: bool,
        image_size: int = 0,
    ) -> Iterator[_Work]:
        """Open the source (and AdaBN it, and set a backbone's input size), list the
        calibration pool; a temporary work folder lives as long as the context."""
        check_image_size(image_size, run)
        if run is not None:
            src = open_run(run, calib, head_fit)
        else:
            src = open_backbone(backbone, weights)  # type: ignore[arg-type]
            if image_size:
                from edge_tl.backbones import at_size

                at_size(src.features, image_size)
        head_fit = head_fit if src.fit_set is not None else "source"
        adapted = _adapt_bn(src, adapt_bn) if adapt_bn is not None else None
        if adapted is not None and calib is None:  # calibrate on what the bundle will see
            pool, calib_skipped = adapted.pop("_unlabeled"), []
        else:
            pool, calib_skipped = calibration_pool(calib, src.fit_set, skip_bad)
        if adapted is not None:
            adapted.pop("_unlabeled", None)
        # AdaBN changes the weights the run's files hold; a backbone has no run folder
        store = ExportCache.in_memory()
        if cache and run is not None and adapted is None:
            store = ExportCache.for_run(run)
        with tempfile.TemporaryDirectory(prefix="edge_tl_export_") as tmp:
            yield cls(src, head_fit, pool, calib_skipped, adapted, store, Path(tmp))

    def check_recipe(self, rec: Recipe) -> None:
        """Refuse a recipe this source cannot take (before any work)."""
        pre = self.src.features.spec.preprocess
        if rec.input_size and rec.input_size != pre.size:
            raise EdgeTLError(
                f"recipe {rec.name} asks for input size {rec.input_size}, but {self.src.name} "
                f"was built for {pre.size}; remove input_size from the recipe"
            )

    def images(
        self, paths: list[str], labels: np.ndarray | None = None, desc: str | None = None
    ) -> Images:
        """``paths`` decoded once per call (and per run, through the cache)."""
        key = (tuple(paths), labels is not None)
        if key not in self._images:
            pre = self.src.features.spec.preprocess
            self._images[key] = self.cache.images(paths, pre, labels, desc)
        return self._images[key]

    def fp32_graph(self, check: Images, rec: Recipe) -> _Graph:
        """The FP32 ONNX graph (exported once), its parity checked at ``rec.parity_atol``."""
        from edge_tl.export.graph import check_parity

        if self.graph is None:
            path, record = self.cache.graph(lambda p: _export_graph(self.src, p, check), self.tmp)
            self.graph = _Graph(path, record["outputs"], record["diffs"], record["peaks"])
            self.fp32_engine = OrtEngine(path)
        check_parity(self.graph.parity, self.graph.peaks, rec.parity_atol)
        return self.graph

    def reference(self, check: Images) -> np.ndarray:
        """FP32 PyTorch embeddings of ``check``: what every artifact is measured against."""
        run = torch_runner(self.src.features)
        return self.cache.embeddings(
            "pytorch", check, lambda: embed(run, check, desc="embedding with PyTorch")
        )

    def fp32_embeddings(self, images: Images, desc: str) -> np.ndarray:
        """The FP32 engine's embeddings of ``images``."""
        run = engine_runner(self.fp32_engine)
        return self.cache.embeddings("onnx-fp32", images, lambda: embed(run, images, desc=desc))

    def head_fit_and_fp32_head(self) -> tuple[HeadFit, LinearHead]:
        """How the shipped head is made, and the head FP32 accuracy is measured with (fit on
        the FP32 engine's embeddings of the training split, once)."""
        if self.heads is None:
            src = self.src
            if self.head_fit == "artifact" and src.fit_set is not None:
                fit = self.images(
                    list(src.fit_set.paths), src.fit_set.labels, desc="decoding training split"
                )
                self.heads = HeadFit(src.head, len(src.labels), fit)
                emb = self.fp32_embeddings(fit, "embedding training split")
                self.fp32_head = self.heads.for_engine(self.fp32_engine, emb)
            else:
                self.heads = HeadFit(src.head, len(src.labels))
                self.fp32_head = self.heads.for_engine(self.fp32_engine)
        assert self.fp32_head is not None
        return self.heads, self.fp32_head


def _adapt_bn(src: ExportSource, target_spec: str | Path) -> dict[str, Any]:
    """AdaBN on ``src.features`` in place; a labelled target's held-out part becomes the
    check images. Returns the manifest record (with the adapted-on paths under
    ``_unlabeled``, for calibration)."""
    from edge_tl.train.adapt import adabn, open_target

    seed = src.source.split.seed if src.source.split is not None else 0
    target = open_target(target_spec, src.labels, seed)
    _logger.info(f"AdaBN: re-estimating batch norm on {len(target.unlabeled)} target images")
    layers = adabn(src.features, target.unlabeled, src.features.spec.preprocess)
    if target.test is not None:
        src.held_out = target.test
        src.held_out_name = "target held-out split"
    return {
        "method": "adabn",
        "target": target.spec,
        "images": len(target.unlabeled),
        "layers": layers,
        "checked_on_target": target.test is not None,
        "_unlabeled": list(target.unlabeled),
    }


def _check_images(work: _Work, calib_paths: list[str]) -> tuple[Images, str]:
    """The images every artifact is checked on, and what they are: the run's held-out split
    (labelled), or the calibration images when there is none."""
    src = work.src
    if src.held_out is not None:
        held = src.held_out
        name = src.held_out_name
        return work.images(list(held.paths), held.labels, desc=f"decoding {name}"), name
    return work.images(calib_paths, desc="decoding calibration images"), "calibration images"


def _export_graph(src: ExportSource, path: Path, check: Images) -> dict[str, Any]:
    """The FP32 ONNX graph at ``path``; its outputs, and its max abs difference from PyTorch
    (with PyTorch's peak magnitude) on the first check images."""
    from edge_tl.export.graph import export_onnx, parity_measure

    _logger.info(f"exporting {src.name} to ONNX")
    with step("exporting to ONNX"):
        outputs = export_onnx(src.features, path, src.features.spec.preprocess.size)
    diffs, peaks = parity_measure(src.features, path, check.inputs(0, 8))
    return {"outputs": outputs, "diffs": diffs, "peaks": peaks}
