"""An image bundle's files, written into its (temporary) folder: the head, exemplars, fused
logits, self-test, fidelity report, the source statistics for ``edge-tl adapt``, and last
the manifest with every file's SHA-256 (for :mod:`edge_tl.export.pipeline`); how every
bundle, image or text, ends (:func:`seal_bundle`, also for :mod:`edge_tl.export.text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.bundle import hash_files, write_manifest
from edge_tl.export.accuracy_control import Candidate
from edge_tl.export.fidelity import Images, embed, engine_runner
from edge_tl.export.source import ExportSource
from edge_tl.export.work import _Graph
from edge_tl.report import FidelityReport, write_report
from edge_tl.runtime.align import write_source_stats
from edge_tl.runtime.learner import EXEMPLARS, write_exemplars
from edge_tl.runtime.selftest import write_self_test
from edge_tl.spec import (
    FORMAT_VERSION,
    INPUT_NAME,
    HeadEntry,
    Manifest,
    Preprocess,
    Source,
    TaskEntry,
    TextPreprocess,
)

__all__ = ["EXEMPLARS_PER_CLASS", "seal_bundle"]

EXEMPLARS_PER_CLASS = 20


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
    return seal_bundle(
        bdir,
        src.name,
        INPUT_NAME,
        src.features.spec.preprocess,
        outputs,
        chosen,
        src.labels,
        head,
        metrics,
        src.source,
        (check.pixels, reference),
        report,
        cosines,
        tasks,
    )


def seal_bundle(
    bdir: Path,
    backbone: str,
    input_name: str,
    preprocess: Preprocess | TextPreprocess,
    outputs: dict[str, list],
    chosen: Candidate,
    labels: Sequence[str],
    head: HeadEntry | None,
    metrics: dict[str, Any],
    source: Source,
    self_test: tuple[np.ndarray, np.ndarray],
    report: FidelityReport,
    cosines: dict[str, np.ndarray],
    tasks: list[TaskEntry] | None = None,
) -> Manifest:
    """What every bundle ends with, image or text: the self-test (``self_test``: the check
    inputs, pixels or texts, and their FP32 embeddings), the fidelity report, and last the
    manifest with every file's SHA-256 (written last: a folder without it is not a bundle)."""
    rec = chosen.recipe
    entry = write_self_test(
        bdir, *self_test, chosen.artifact, preprocess, rec.self_test, rec.self_test_margin
    )
    write_report(bdir, report, cosines)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        edge_tl_version=__version__,
        backbone=backbone,
        input_name=input_name,
        preprocess=preprocess,
        outputs=outputs,
        artifact=chosen.artifact,
        labels=list(labels),
        head=head,
        metrics=metrics,
        source=source,
        files=hash_files(bdir),
        self_test=entry,
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
