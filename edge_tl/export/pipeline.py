"""``edge-tl export``: a run folder (or a pretrained backbone) -> a checked bundle.

The steps, in order: open the source and its split; decode the check images; export the
FP32 graph and check it against PyTorch; embed the check images with PyTorch (the
reference); build the recipe's artifact under accuracy control; measure PyTorch, ONNX FP32
and the artifact side by side; measure the calibration sensitivity; write the bundle (head,
exemplars, fused logits, self-test, fidelity report, manifest) atomically.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.bundle import atomic_folder, check_destination, hash_files, write_manifest
from edge_tl.errors import EdgeTLError
from edge_tl.export.accuracy_control import AccuracyControl, Candidate
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

__all__ = ["EXEMPLARS_PER_CLASS", "HEAD_FITS", "export_bundle"]

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
        ):
            if given:
                raise EdgeTLError(
                    f"{flag} is for image models; a text encoder's export does without it"
                )
        from edge_tl.export.text import export_text_bundle

        return export_text_bundle(out, rec, run, backbone, calib, head_fit, force, sign)
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
    check_destination(out, force)

    src = open_run(run, calib, head_fit) if run is not None else open_backbone(backbone, weights)
    head_fit = head_fit if src.fit_set is not None else "source"
    pre = src.features.spec.preprocess
    adapted = _adapt_bn(src, adapt_bn) if adapt_bn is not None else None
    if rec.input_size and rec.input_size != pre.size:
        raise EdgeTLError(
            f"recipe {rec.name} asks for input size {rec.input_size}, but {src.name} was built "
            f"for {pre.size}; remove input_size from the recipe"
        )
    if adapted is not None and calib is None:  # calibrate on what the bundle will see
        pool, calib_skipped = adapted.pop("_unlabeled"), []
    else:
        pool, calib_skipped = calibration_pool(calib, src.fit_set, skip_bad)
    if adapted is not None:
        adapted.pop("_unlabeled", None)
    calib_paths = calibration_sample(pool, rec.calibration_size, rec.precision == "int8")
    check, checked_on = _check_images(src, calib_paths)
    with tempfile.TemporaryDirectory(prefix="edge_tl_export_") as tmp:
        work = Path(tmp)
        graph = _export_graph(src, work, check, rec)
        reference = embed(torch_runner(src.features), check, desc="embedding with PyTorch")
        fp32_engine = OrtEngine(graph.path)
        heads = _head_fit(src, head_fit)
        fp32_head = heads.for_engine(fp32_engine)  # the head FP32 accuracy is measured with
        calib_inputs = _calibration_inputs(calib_paths, pre, rec)
        with atomic_folder(out, force) as bdir:
            _logger.info(f"building {rec.name} ({rec.format} {rec.precision})")
            control = AccuracyControl(
                graph.path, rec, calib_inputs, bdir, work, check, reference, fp32_head, heads
            )
            chosen = control.run()
            rows, cosines, preds = _side_by_side(
                src, check, reference, fp32_engine, fp32_head, chosen, bdir, graph.path
            )
            spread = control.calibration_spread(
                chosen.recipe, pool, rec.calibration_size, rec.calibration_subsets
            )
            report = _report(src, rec, control, check, checked_on, rows, preds, spread)
            metrics = _metrics(report, graph, calib_inputs, head_fit, chosen, control, len(check))
            if calib_skipped:
                metrics[CALIBRATION_SKIPPED] = [s.to_dict() for s in calib_skipped]
            if adapted is not None:
                metrics["adapt_bn"] = adapted
            if src.fit_set is not None:  # what `edge-tl adapt` aligns a new camera to
                _write_source_stats(bdir / SOURCE_STATS, src, heads, chosen.engine)
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
                head_fit,
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


def _check_images(src: ExportSource, calib_paths: list[str]) -> tuple[Images, str]:
    """The images every artifact is checked on, and what they are: the run's held-out split
    (labelled), or the calibration images when there is none."""
    pre = src.features.spec.preprocess
    if src.held_out is not None:
        held = src.held_out
        name = src.held_out_name
        return Images(list(held.paths), pre, held.labels, desc=f"decoding {name}"), name
    return Images(calib_paths, pre, desc="decoding calibration images"), "calibration images"


@dataclass(frozen=True)
class _Graph:
    path: Path
    outputs: dict[str, list[Any]]
    parity: dict[str, float]


def _export_graph(src: ExportSource, work: Path, check: Images, rec: Recipe) -> _Graph:
    """The FP32 ONNX graph, checked against PyTorch on the first check images."""
    from edge_tl.export.graph import export_onnx, parity

    path = work / "fp32.onnx"
    _logger.info(f"exporting {src.name} to ONNX")
    outputs = export_onnx(src.features, path, src.features.spec.preprocess.size)
    diffs = parity(src.features, path, check.inputs(0, 8), rec.parity_atol)
    return _Graph(path, outputs, diffs)


def _calibration_inputs(paths: list[str], pre: Any, rec: Recipe) -> np.ndarray | None:
    """Network inputs of the calibration images (INT8 recipes only)."""
    if rec.precision != "int8":
        return None
    return Images(paths, pre, desc="decoding calibration images").inputs()


def _head_fit(src: ExportSource, head_fit: str) -> HeadFit:
    """The head that ships: refit on each artifact's embeddings of the training split, or
    the source's own."""
    if head_fit == "artifact" and src.fit_set is not None:
        fit = Images(
            list(src.fit_set.paths),
            src.features.spec.preprocess,
            src.fit_set.labels,
            desc="decoding training split",
        )
        return HeadFit(src.head, len(src.labels), fit)
    return HeadFit(src.head, len(src.labels))


def _side_by_side(
    src: ExportSource,
    check: Images,
    reference: np.ndarray,
    fp32_engine: Any,
    fp32_head: LinearHead,
    chosen: Candidate,
    bdir: Path,
    fp32_path: Path,
) -> tuple[dict[str, ArtifactRow], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch FP32, ONNX FP32 and the artifact, each with the head fit the way this bundle's
    head is (own) and with the run's own head (FP32): rows, per-image cosines, predictions."""
    fp32_emb = embed(engine_runner(fp32_engine), check, desc="embedding with ONNX FP32")
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
    _logger.info("timing batch-1 latency")
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


def _write_source_stats(path: Path, src: ExportSource, heads: HeadFit, engine: Any) -> None:
    """``source_stats.npz``: mean and factored covariance of the artifact's embeddings of
    the run's training and validation images (:func:`edge_tl.runtime.align.write_source_stats`,
    about 0.35 MB), for on-device alignment to a new camera (``edge-tl adapt``). The
    embeddings the shipped head was fit on are reused when there are any."""
    emb = heads.embedded(engine)
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
