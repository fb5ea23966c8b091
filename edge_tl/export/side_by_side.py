"""PyTorch FP32, ONNX FP32 and a recipe's artifact measured side by side on the check
images, and what an image or a text bundle records of such a comparison: the fidelity report and
the manifest's ``metrics`` (for :mod:`edge_tl.export.pipeline` and
:mod:`edge_tl.export.text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.export.accuracy_control import Candidate
from edge_tl.export.control_base import ControlLadder
from edge_tl.export.fidelity import (
    Images,
    agreement,
    engine_runner,
    latency_ms,
    per_class,
    torch_runner,
    torch_size_mb,
)
from edge_tl.export.source import ExportSource
from edge_tl.progress import step
from edge_tl.report import ArtifactRow, FidelityReport, Tolerance
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.spec import Recipe

__all__ = ["artifact_metrics", "fidelity_report"]


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


def fidelity_report(
    backbone: str,
    rec: Recipe,
    control: ControlLadder,
    checked_on: str,
    n_checked: int,
    labels: np.ndarray | None,
    class_names: Sequence[str],
    rows: dict[str, ArtifactRow],
    preds: dict[str, np.ndarray],
    spread: dict[str, Any] | None,
    unit: str = "images",
) -> FidelityReport:
    """The fidelity report of an image or text export: every row, per-class accuracy (when
    the check set is labelled and a head predicts), each accuracy-control step."""
    return FidelityReport(
        backbone=backbone,
        recipe=rec.name,
        verdict="pass" if control.step is None else f"pass after accuracy control ({control.step})",
        checked_on=checked_on,
        n_images=n_checked,
        tolerance=Tolerance(rec.min_cosine, rec.max_top1_drop),
        host=host_info(),
        artifacts=rows,
        per_class=None
        if labels is None or not preds
        else {k: per_class(p, labels, list(class_names)) for k, p in preds.items()},
        accuracy_control=[a.record() for a in control.attempts] if rec.precision == "int8" else [],
        sensitive_layers=control.sensitivity[:16],
        calibration_sensitivity=spread,
        unit=unit,
    )


def artifact_metrics(
    report: FidelityReport,
    parity: dict[str, float],
    control: ControlLadder,
    calibration: tuple[str, int],
    head_fit: str,
    head: LinearHead | None,
    n_checked: int,
) -> dict[str, Any]:
    """The manifest's ``metrics`` of an image or text export: parity (max abs difference per
    output), the calibration count (``(key, count)``, e.g. ``("calibration_images", 300)``),
    cosine to FP32 on the ``n_checked`` check inputs, top-1 agreement and accuracy when a
    head predicts, and the accuracy-control step that passed."""
    art = report.artifacts[report.recipe]
    metrics: dict[str, Any] = {
        "parity_max_abs_diff": parity,
        "parity_atol": control.recipe.parity_atol,
        calibration[0]: calibration[1],
        "head_fit": head_fit,
    }
    if head_fit == "artifact" and head is not None:
        metrics["head_l2"] = head.l2
    metrics["embedding_cosine_vs_fp32"] = {
        "mean": art.cosine_mean,
        "min": art.cosine_min,
        "n": n_checked,
        "on": report.checked_on,
    }
    if art.top1_agreement is not None:
        metrics["top1_agreement_vs_fp32"] = art.top1_agreement
    if art.accuracy_own_head is not None:
        metrics["test_accuracy"] = art.accuracy_own_head
        metrics["test_n"] = n_checked
        metrics["fp32_test_accuracy"] = report.artifacts["pytorch-fp32"].accuracy_own_head
    if control.step is not None:
        metrics["accuracy_control"] = control.step
    return metrics
