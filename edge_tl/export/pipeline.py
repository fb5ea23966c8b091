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

The shared work is :mod:`edge_tl.export.work`; the side-by-side measurement, the report and
the metrics :mod:`edge_tl.export.side_by_side`; the bundle's files :mod:`edge_tl.export.write`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_tl.bundle import atomic_folder, check_destination
from edge_tl.errors import EdgeTLError
from edge_tl.export.accuracy_control import AccuracyControl, ToleranceError
from edge_tl.export.side_by_side import _side_by_side, artifact_metrics, fidelity_report
from edge_tl.export.source import calibration_sample
from edge_tl.export.text_source import is_text_export
from edge_tl.export.work import _check_images, _Work
from edge_tl.export.work import check_image_size as check_image_size
from edge_tl.export.write import EXEMPLARS_PER_CLASS, _write_bundle, _write_source_stats
from edge_tl.runtime.align import SOURCE_STATS
from edge_tl.signing import Ed25519PrivateKey, sign_bundle
from edge_tl.spec import Manifest, Recipe, load_recipe

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
        report = fidelity_report(
            src.name,
            rec,
            control,
            checked_on,
            len(check),
            check.labels,
            src.labels,
            rows,
            preds,
            spread,
        )
        n_calib = len(calib_inputs) if calib_inputs is not None else 0
        metrics = artifact_metrics(
            report,
            graph.parity,
            control,
            ("calibration_images", n_calib),
            work.head_fit,
            chosen.head,
            len(check),
        )
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
