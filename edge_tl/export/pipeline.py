"""``edge-tl export``: a run folder (or a pretrained backbone) -> a checked bundle, or
several recipes' bundles in one call (``--recipe a,b,c``, :func:`export_bundles`).

The steps, in order: open the source and its split; decode the check images; export the
FP32 graph and check it against PyTorch; embed the check images with PyTorch (the
reference); build the recipe's artifact under accuracy control; measure PyTorch, ONNX FP32
and the artifact side by side; measure the calibration sensitivity; write the bundle (head,
exemplars, fused logits, self-test, fidelity report, manifest) atomically.

Everything before the artifact is the same for every recipe of a run: one call makes it
once for all its recipes, and the run's export cache (:mod:`edge_tl.export.cache`) keeps
the FP32 graph, the decoded images and the FP32 embeddings for later calls.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.bundle import atomic_folder, check_destination, hash_files, write_manifest
from edge_tl.errors import EdgeTLError
from edge_tl.export.accuracy_control import AccuracyControl, Candidate, ToleranceError
from edge_tl.export.cache import ExportCache
from edge_tl.export.fidelity import (
    HeadFit,
    Images,
    agreement,
    embed,
    engine_runner,
    latency_ms,
    per_class,
    torch_runner,
    torch_size_mb,
)
from edge_tl.export.source import (
    ExportSource,
    calibration_pool,
    calibration_sample,
    open_backbone,
    open_run,
)
from edge_tl.export.text_source import is_text_export
from edge_tl.progress import step
from edge_tl.report import ArtifactRow, FidelityReport, Tolerance, write_report
from edge_tl.runtime.align import SOURCE_STATS, write_source_stats
from edge_tl.runtime.engine import OrtEngine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.runtime.learner import EXEMPLARS, write_exemplars
from edge_tl.runtime.selftest import write_self_test
from edge_tl.signing import Ed25519PrivateKey, sign_bundle
from edge_tl.spec import (
    FORMAT_VERSION,
    INPUT_NAME,
    HeadEntry,
    Manifest,
    Recipe,
    TaskEntry,
    load_recipe,
)

__all__ = [
    "EXEMPLARS_PER_CLASS",
    "HEAD_FITS",
    "BundleResult",
    "export_bundle",
    "export_bundles",
    "iter_bundles",
    "parse_recipes",
]

_logger = logging.getLogger(__name__)

HEAD_FITS = ("artifact", "source")
CALIBRATION_SKIPPED = "calibration_skipped"
"""Metrics key: the ``--calib`` files left out under ``--skip-bad``."""
EXEMPLARS_PER_CLASS = 20


def export_bundle(
    out: str | Path,
    recipe: str | Recipe,
    run: str | Path | None = None,
    backbone: str | None = None,
    calib: str | Path | None = None,
    head_fit: str = "artifact",
    force: bool = False,
    weights: str | Path | None = None,
    logits: bool = False,
    sign: Ed25519PrivateKey | None = None,
    skip_bad: bool = False,
    adapt_bn: str | Path | None = None,
    cache: bool = True,
    image_size: int = 0,
) -> Manifest:
    """Export a trained run (or a pretrained ``backbone``) into a bundle at ``out``.

    Args:
        out: bundle folder to create (refused if it exists, unless ``force``).
        recipe: recipe name (``ort-int8``), path to a recipe TOML, or a :class:`Recipe`.
        run: a folder written by ``edge-tl train``; or None with ``backbone``.
        backbone: export ImageNet features and classifier without training.
        calib: images for calibration and parity checks (ImageFolder or flat folder);
            defaults to the run's training and validation images.

    A text run (``run.json`` says ``"modality": "text"``) or a text backbone
    (``all-minilm-l6-v2``) goes to :func:`edge_tl.export.text.export_text_bundle` (``calib``
    then names a file of texts; ``weights``, ``logits`` and ``skip_bad`` do not apply).
        head_fit: ``artifact`` refits the run's linear head on the artifact's own embeddings
            of the training and validation images; ``source`` keeps the head trained in
            PyTorch.
        force: replace an existing ``out`` (only once the new bundle is complete).
        weights: with ``backbone``, a local pretrained weights file (torchvision nets).
        logits: also fuse the head into the graph as a ``logits`` output (FP32), for users
            who run the engine directly and need no on-device learning.
        sign: sign the manifest with this key (``manifest.sig``, :mod:`edge_tl.signing`)
            inside the temporary folder, so the bundle appears signed or not at all.
        skip_bad: leave bad files of ``calib`` out (listed in the metrics'
            ``calibration_skipped``) instead of stopping on the first.
        adapt_bn: target images (a flat folder, an ImageFolder or a named set such as
            ``elpv:poly``): AdaBN (Li et al. 2016) re-estimates every batch-norm layer's
            statistics on them before the export, so a run serves a new line or camera
            without retraining; the graph is checked against the adapted PyTorch model.
            A labelled target is split as in training (:func:`edge_tl.domains.target_split`):
            its unlabelled part is adapted on (and calibrates, without ``calib``), its
            held-out part checks every artifact. Recorded in the manifest's ``adapt_bn``.
        cache: keep the run's FP32 graph, decoded images and FP32 reference embeddings in
            ``RUN/.export_cache`` and reuse them (:mod:`edge_tl.export.cache`); False
            computes them afresh and keeps nothing.
        image_size: with ``backbone``, the input size of the graph (square, a multiple of
            32 in 32..1024; 0: the backbone's native size). The backbone is convolutional,
            so a larger input gives finer patch grids (``features_s16`` of a 320 export is
            20 x 20), which is what ``edge-tl anomaly`` on the bundle then scores at; it
            is recorded in the manifest's ``preprocess.size``. A run keeps the size it was
            trained at (``edge-tl train --image-size``).

    Returns:
        The bundle's manifest.

    Raises:
        EdgeTLError: conflicting arguments, unreadable inputs, a graph that does not match
            PyTorch, or an artifact that misses its tolerance (``ToleranceError``); nothing
            is written at ``out`` then.

    Example:
        >>> export_bundle("bundles/neu_int8", "ort-int8", run="runs/neu")  # doctest: +SKIP
    """
    out = Path(out)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if (run is None) == (backbone is None):
        raise EdgeTLError("pass either a RUN folder or --backbone NAME, not both or neither")
    if is_text_export(run, backbone):
        for flag, given in (
            ("--weights", weights),
            ("--logits", logits),
            ("--skip-bad", skip_bad),
            ("--adapt-bn", adapt_bn),
            ("--image-size", image_size),
        ):
            if given:
                raise EdgeTLError(
                    f"{flag} is for image models; a text encoder's export does without it"
                )
        from edge_tl.export.text import export_text_bundle

        return export_text_bundle(out, rec, run, backbone, calib, head_fit, force, sign)
    _check_recipe_args(rec, run, weights, head_fit, adapt_bn)
    check_destination(out, force)
    with _Work.open(
        run, backbone, calib, head_fit, weights, skip_bad, adapt_bn, cache, image_size
    ) as work:
        work.check_recipe(rec)
        return _export_one(work, out, rec, force, logits, sign)


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
class BundleResult:
    """One recipe of :func:`export_bundles`: its bundle's ``manifest`` at ``out``, or why
    accuracy control ``refused`` it (nothing written at ``out`` then)."""

    recipe: str
    out: Path
    manifest: Manifest | None
    refused: ToleranceError | None = None


def parse_recipes(recipes: str | Sequence[str | Recipe]) -> list[Recipe]:
    """Recipes from ``a,b,c`` (names or ``.toml`` paths) or a sequence, resolved and checked
    before any work.

    Raises:
        EdgeTLError: an empty list or item, an unknown recipe, or one named twice (two
            bundles would share a folder).
    """
    items = recipes.split(",") if isinstance(recipes, str) else list(recipes)
    if not items or all(isinstance(r, str) and not r.strip() for r in items):
        raise EdgeTLError("no recipe given; name one or more, e.g. --recipe onnx-fp32,ort-int8")
    out: list[Recipe] = []
    for r in items:
        if isinstance(r, str) and not r.strip():
            raise EdgeTLError(
                f"--recipe {','.join(str(i) for i in items)!r} has an empty item; separate "
                "recipe names with single commas, e.g. onnx-fp32,ort-int8"
            )
        out.append(r if isinstance(r, Recipe) else load_recipe(r.strip()))
    names = [r.name for r in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EdgeTLError(
            f"recipe {', '.join(twice)} is named twice; each recipe makes one bundle "
            "(DIR/<recipe>), so name it once"
        )
    return out


def export_bundles(
    out_dir: str | Path,
    recipes: str | Sequence[str | Recipe],
    run: str | Path | None = None,
    backbone: str | None = None,
    **options: Any,
) -> list[BundleResult]:
    """Export several recipes of one run (or backbone) into ``out_dir/<recipe>``, sharing
    the work they have in common: the FP32 graph, the decoded images and the FP32 reference
    embeddings are made once (and kept in the run's export cache).

    A recipe that accuracy control refuses is reported in its :class:`BundleResult` and
    the others are still written. ``options`` are :func:`export_bundle`'s (``calib``,
    ``head_fit``, ``force``, ``weights``, ``logits``, ``sign``, ``skip_bad``, ``adapt_bn``,
    ``cache``, ``image_size``).

    Raises:
        EdgeTLError: bad recipes (:func:`parse_recipes`), an existing bundle folder without
            ``force``, or any other argument :func:`export_bundle` refuses; all before any
            work.

    Example:
        >>> results = export_bundles("out", "onnx-fp32,ort-int8", run="runs/x")  # doctest: +SKIP
        >>> [r.recipe for r in results if r.refused is None]  # doctest: +SKIP
    """
    return list(iter_bundles(out_dir, recipes, run, backbone, **options))


def iter_bundles(
    out_dir: str | Path,
    recipes: str | Sequence[str | Recipe],
    run: str | Path | None = None,
    backbone: str | None = None,
    *,
    calib: str | Path | None = None,
    head_fit: str = "artifact",
    force: bool = False,
    weights: str | Path | None = None,
    logits: bool = False,
    sign: Ed25519PrivateKey | None = None,
    skip_bad: bool = False,
    adapt_bn: str | Path | None = None,
    cache: bool = True,
    image_size: int = 0,
) -> Iterator[BundleResult]:
    """:func:`export_bundles` one bundle at a time: each recipe's result is yielded as soon
    as it is written (the demo evaluates it before the next export starts). Arguments are
    checked at the first ``next()``, before any work."""
    recs = parse_recipes(recipes)
    out_dir = Path(out_dir)
    if (run is None) == (backbone is None):
        raise EdgeTLError("pass either a RUN folder or --backbone NAME, not both or neither")
    if is_text_export(run, backbone):  # text exports share nothing yet: one by one
        for r in recs:
            check_destination(out_dir / r.name, force)
        for r in recs:
            yield _one_or_refused(
                out_dir / r.name,
                r,
                lambda r=r: export_bundle(
                    out_dir / r.name,
                    r,
                    run,
                    backbone,
                    calib,
                    head_fit,
                    force,
                    weights=weights,
                    logits=logits,
                    sign=sign,
                    skip_bad=skip_bad,
                    adapt_bn=adapt_bn,
                    image_size=image_size,
                ),
            )
        return
    for r in recs:
        _check_recipe_args(r, run, weights, head_fit, adapt_bn)
        check_destination(out_dir / r.name, force)
    with _Work.open(
        run, backbone, calib, head_fit, weights, skip_bad, adapt_bn, cache, image_size
    ) as work:
        for r in recs:
            work.check_recipe(r)
        for r in recs:
            yield _one_or_refused(
                out_dir / r.name,
                r,
                lambda r=r: _export_one(work, out_dir / r.name, r, force, logits, sign),
            )


def _one_or_refused(out: Path, rec: Recipe, make: Callable[[], Manifest]) -> BundleResult:
    try:
        return BundleResult(rec.name, out, make())
    except ToleranceError as e:
        return BundleResult(rec.name, out, None, e)


def _check_recipe_args(
    rec: Recipe,
    run: str | Path | None,
    weights: str | Path | None,
    head_fit: str,
    adapt_bn: str | Path | None,
) -> None:
    """The argument checks of an image export that need no work (see :func:`export_bundle`)."""
    if rec.quantization == "ort-dynamic":
        raise EdgeTLError(
            f"recipe {rec.name} quantizes dynamically, which is for text encoders; use ort-int8 "
            "for an image model"
        )
    if weights is not None and run is not None:
        raise EdgeTLError("--weights goes with --backbone; a run folder carries its own weights")
    if head_fit not in HEAD_FITS:
        raise EdgeTLError(f"--head-fit must be one of {', '.join(HEAD_FITS)}, not {head_fit!r}")
    if adapt_bn is not None and run is None:
        raise EdgeTLError(
            "--adapt-bn re-estimates a trained run's batch norm for a new target; pass a RUN "
            "folder from `edge-tl train`"
        )


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


def _export_one(
    work: _Work,
    out: Path,
    rec: Recipe,
    force: bool,
    logits: bool,
    sign: Ed25519PrivateKey | None,
) -> Manifest:
    """One recipe's bundle at ``out`` from the shared ``work`` (the steps in the module
    docstring)."""
    src = work.src
    calib_paths = calibration_sample(work.pool, rec.calibration_size, rec.precision == "int8")
    check, checked_on = _check_images(work, calib_paths)
    graph = work.fp32_graph(check, rec)
    reference = work.reference(check)
    fp32_engine = work.fp32_engine
    heads, fp32_head = work.head_fit_and_fp32_head()
    calib_inputs = None
    if rec.precision == "int8":
        calib_inputs = work.images(calib_paths, desc="decoding calibration images").inputs()
    with atomic_folder(out, force) as bdir:
        _logger.info(f"building {rec.name} ({rec.format} {rec.precision})")
        control = AccuracyControl(
            graph.path,
            rec,
            calib_inputs,
            bdir,
            work.tmp,
            check,
            reference,
            fp32_head,
            heads,
            decode=work.images,
        )
        chosen = control.run()
        fit_emb = heads.embedded(chosen.engine)  # before the calibration subsets refit
        fp32_emb = work.fp32_embeddings(check, "embedding with ONNX FP32")
        rows, cosines, preds = _side_by_side(
            src, check, reference, fp32_engine, fp32_emb, fp32_head, chosen, bdir, graph.path
        )
        spread = control.calibration_spread(
            chosen.recipe, work.pool, rec.calibration_size, rec.calibration_subsets
        )
        report = _report(src, rec, control, check, checked_on, rows, preds, spread)
        metrics = _metrics(report, graph, calib_inputs, work.head_fit, chosen, control, len(check))
        if work.calib_skipped:
            metrics[CALIBRATION_SKIPPED] = [s.to_dict() for s in work.calib_skipped]
        if work.adapted is not None:
            metrics["adapt_bn"] = work.adapted
        if src.fit_set is not None:  # what `edge-tl adapt` aligns a new camera to
            _write_source_stats(bdir / SOURCE_STATS, src, fit_emb, chosen.engine)
        tasks = None
        if src.task_heads is not None:  # multi-task: one head per task, same artifact
            from edge_tl.export.tasks import write_task_heads

            tasks, metrics["tasks"] = write_task_heads(
                bdir, src, chosen.engine, check, chosen.emb, heads
            )
        manifest = _write_bundle(
            bdir,
            src,
            chosen,
            check,
            reference,
            graph,
            work.head_fit,
            logits,
            report,
            cosines,
            metrics,
            tasks,
        )
        if sign is not None:
            sign_bundle(bdir, sign)
        return manifest


# ---- the steps ---------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Graph:
    path: Path
    outputs: dict[str, list[Any]]
    parity: dict[str, float]
    peaks: dict[str, float]


def _export_graph(src: ExportSource, path: Path, check: Images) -> dict[str, Any]:
    """The FP32 ONNX graph at ``path``; its outputs, and its max abs difference from PyTorch
    (with PyTorch's peak magnitude) on the first check images."""
    from edge_tl.export.graph import export_onnx, parity_measure

    _logger.info(f"exporting {src.name} to ONNX")
    with step("exporting to ONNX"):
        outputs = export_onnx(src.features, path, src.features.spec.preprocess.size)
    diffs, peaks = parity_measure(src.features, path, check.inputs(0, 8))
    return {"outputs": outputs, "diffs": diffs, "peaks": peaks}


def _side_by_side(
    src: ExportSource,
    check: Images,
    reference: np.ndarray,
    fp32_engine: Any,
    fp32_emb: np.ndarray,
    fp32_head: LinearHead,
    chosen: Candidate,
    bdir: Path,
    fp32_path: Path,
) -> tuple[dict[str, ArtifactRow], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch FP32, ONNX FP32 (``fp32_emb``: its embeddings of ``check``) and the artifact,
    each with the head fit the way this bundle's head is (own) and with the run's own head
    (FP32): rows, per-image cosines, predictions."""
    name = chosen.recipe.name
    models = {
        "pytorch-fp32": (reference, fp32_head),
        "onnx-fp32": (fp32_emb, fp32_head),
        name: (chosen.emb, chosen.head),
    }
    sizes = {
        "pytorch-fp32": torch_size_mb(src.features),
        "onnx-fp32": fp32_path.stat().st_size / 1e6,
        name: sum((bdir / f).stat().st_size for f in chosen.artifact.files) / 1e6,
    }
    with step("timing batch-1 latency"):
        lat = latency_ms(
            {
                "pytorch-fp32": torch_runner(src.features),
                "onnx-fp32": engine_runner(fp32_engine),
                name: engine_runner(chosen.engine),
            },
            check,
        )
    rows, cosines, preds = {}, {}, {}
    for key, (emb, head) in models.items():
        a = agreement(emb, reference, head, check.labels, fp32_head)
        fp32_acc = (
            None
            if check.labels is None
            else float((src.head.predict_proba(emb).argmax(1) == check.labels).mean())
        )
        rows[key] = ArtifactRow(
            cosine_mean=a.cosine_mean,
            cosine_min=a.cosine_min,
            top1_agreement=a.top1_agreement,
            accuracy_own_head=a.accuracy,
            accuracy_fp32_head=fp32_acc,
            size_mb=round(sizes[key], 2),
            latency_ms=lat[key],
        )
        preds[key] = a.pred
        if key != "pytorch-fp32":
            cosines[key] = a.cosines
    return rows, cosines, preds


def _report(
    src: ExportSource,
    rec: Recipe,
    control: AccuracyControl,
    check: Images,
    checked_on: str,
    rows: dict[str, ArtifactRow],
    preds: dict[str, np.ndarray],
    spread: dict[str, Any] | None,
) -> FidelityReport:
    """The fidelity report: every row, per-class accuracy, each accuracy-control step."""
    labels = check.labels
    return FidelityReport(
        backbone=src.name,
        recipe=rec.name,
        verdict="pass" if control.step is None else f"pass after accuracy control ({control.step})",
        checked_on=checked_on,
        n_images=len(check),
        tolerance=Tolerance(rec.min_cosine, rec.max_top1_drop),
        host=host_info(),
        artifacts=rows,
        per_class=None
        if labels is None
        else {k: per_class(p, labels, src.labels) for k, p in preds.items()},
        accuracy_control=[a.record() for a in control.attempts] if rec.precision == "int8" else [],
        sensitive_layers=control.sensitivity[:16],
        calibration_sensitivity=spread,
    )


def _metrics(
    report: FidelityReport,
    graph: _Graph,
    calib_inputs: np.ndarray | None,
    head_fit: str,
    chosen: Candidate,
    control: AccuracyControl,
    n_checked: int,
) -> dict[str, Any]:
    """The manifest's ``metrics``: parity, calibration size, cosine and accuracy."""
    art = report.artifacts[report.recipe]
    metrics: dict[str, Any] = {
        "parity_max_abs_diff": graph.parity,
        "parity_atol": control.recipe.parity_atol,
        "calibration_images": len(calib_inputs) if calib_inputs is not None else 0,
        "head_fit": head_fit,
    }
    if head_fit == "artifact":
        metrics["head_l2"] = chosen.head.l2
    metrics["embedding_cosine_vs_fp32"] = {
        "mean": art.cosine_mean,
        "min": art.cosine_min,
        "n": n_checked,
        "on": report.checked_on,
    }
    metrics["top1_agreement_vs_fp32"] = art.top1_agreement
    if art.accuracy_own_head is not None:
        metrics["test_accuracy"] = art.accuracy_own_head
        metrics["test_n"] = n_checked
        metrics["fp32_test_accuracy"] = report.artifacts["pytorch-fp32"].accuracy_own_head
    if control.step is not None:
        metrics["accuracy_control"] = control.step
    return metrics


def _write_bundle(
    bdir: Path,
    src: ExportSource,
    chosen: Candidate,
    check: Images,
    reference: np.ndarray,
    graph: _Graph,
    head_fit: str,
    logits: bool,
    report: FidelityReport,
    cosines: dict[str, np.ndarray],
    metrics: dict[str, Any],
    tasks: list[TaskEntry] | None = None,
) -> Manifest:
    """Head, exemplars, fused logits, self-test, report and last the manifest (with every
    file's SHA-256) into ``bdir``."""
    from edge_tl.export.graph import LOGITS, append_logits

    chosen.head.save(bdir / "head.npz")
    head = HeadEntry(kind="linear", file="head.npz", fit_on=head_fit)
    if head_fit == "artifact" and src.fit_set is not None:
        _write_exemplars(bdir / EXEMPLARS, src, chosen.engine)
        head = HeadEntry(kind="linear", file="head.npz", fit_on=head_fit, exemplars=EXEMPLARS)
    outputs = dict(graph.outputs)
    if logits:
        append_logits(bdir, list(chosen.artifact.files), *chosen.head.folded())
        outputs[LOGITS] = ["batch", len(src.labels)]
    rec = chosen.recipe
    self_test = write_self_test(
        bdir,
        check.pixels,
        reference,
        chosen.artifact,
        src.features.spec.preprocess,
        rec.self_test,
        rec.self_test_margin,
    )
    write_report(bdir, report, cosines)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        edge_tl_version=__version__,
        backbone=src.name,
        input_name=INPUT_NAME,
        preprocess=src.features.spec.preprocess,
        outputs=outputs,
        artifact=chosen.artifact,
        labels=list(src.labels),
        head=head,
        metrics=metrics,
        source=src.source,
        files=hash_files(bdir),
        self_test=self_test,
        tasks=tasks,
    )
    write_manifest(bdir, manifest)
    return manifest


def _write_source_stats(path: Path, src: ExportSource, emb: np.ndarray | None, engine: Any) -> None:
    """``source_stats.npz``: mean and factored covariance of the artifact's embeddings of
    the run's training and validation images (:func:`edge_tl.runtime.align.write_source_stats`,
    about 0.35 MB), for on-device alignment to a new camera (``edge-tl adapt``). ``emb``: the
    embeddings the shipped head was fit on, when there are any (else they are made here)."""
    if emb is None:
        fit_set = src.fit_set
        assert fit_set is not None
        images = Images(list(fit_set.paths), src.features.spec.preprocess, fit_set.labels)
        emb = embed(engine_runner(engine), images, desc="embedding training split")
    write_source_stats(path, emb)


def _write_exemplars(path: Path, src: ExportSource, engine: Any, seed: int = 0) -> None:
    """Artifact embeddings of up to 20 training images per class: on the device they stand
    for the classes the head already knows when a new class is imprinted, and give the open
    set its prototypes (a few hundred KB)."""
    fit_set = src.fit_set
    assert fit_set is not None
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [
            rng.permutation(np.flatnonzero(fit_set.labels == c))[:EXEMPLARS_PER_CLASS]
            for c in np.unique(fit_set.labels)
        ]
    )
    sub = fit_set.subset(np.sort(idx))
    images = Images(list(sub.paths), src.features.spec.preprocess, sub.labels)
    x = embed(engine_runner(engine), images, desc="embedding exemplars")
    write_exemplars(path, x, sub.labels)
