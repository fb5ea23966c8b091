"""What an export starts from: a training run folder, or a pretrained backbone with its
ImageNet classifier; and the images it calibrates and checks on.

A run brings its trained network and head, and (when its data is still readable and
unchanged) the very split it was trained with: the training + validation images refit the
head on each artifact's embeddings and are the default calibration images; the held-out
split checks every artifact. A backbone export has no split: the calibration images check
it too.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.data import (
    Dataset,
    fingerprint,
    image_folder,
    is_named_image_set,
    open_dataset,
    split,
)
from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED, Skipped, check_images, entries
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import Source, SplitRecord, check_labels

__all__ = ["ExportSource", "calibration_pool", "calibration_sample", "open_backbone", "open_run"]

_logger = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """A network to export, its head and labels, and its data.

    ``fit_set`` (training + validation split) and ``held_out`` (test split) are None for a
    backbone export, or when the run's data cannot be read (``--head-fit source``).
    """

    name: str
    features: Any  # edge_tl.backbones.FeatureModel
    head: LinearHead
    labels: list[str]
    source: Source
    fit_set: Dataset | None = None
    held_out: Dataset | None = None
    held_out_name: str = "held-out split"
    """What ``held_out`` is, for the fidelity report (``target held-out split`` after AdaBN)."""
    task_heads: dict[str, LinearHead] | None = None
    """A multi-task run's head per task (``labels`` and ``head`` are then the joint classes
    and their head); the tasks' classes are in ``task_labels``."""
    task_labels: dict[str, list[str]] | None = None


def open_run(run: str | Path, calib: str | Path | None, head_fit: str) -> ExportSource:
    """A run folder from ``edge-tl train``, with its split re-made from its data.

    Raises:
        EdgeTLError: not a run folder; its data unreadable while the head is to be refit or
            no ``calib`` is given; or its data changed since training.
    """
    from edge_tl.train import load_run

    record, features, head = load_run(run)
    sources = record["metrics"].get("sources")
    if sources:  # a multi-source run that its single sources match: say so before the work
        from edge_tl.train.probe import multi_source_note

        note = multi_source_note(record["backbone"], sources)
        if note:
            _logger.warning(f"{note}, and export that run")
    task_heads = task_labels = None
    if record.get("tasks"):
        from edge_tl.train.multitask import TaskHeads

        task_labels = {t["name"]: list(t["labels"]) for t in record["tasks"]}
        task_heads = TaskHeads.load(Path(run), list(task_labels), head).heads
    labels = record["labels"]
    check_labels(labels, f"labels of the run {run}", fix="rename the class folder and train again")
    cfg = record["config"]
    split_record = SplitRecord(
        test_frac=cfg["test_frac"],
        val_frac=cfg["val_frac"],
        seed=cfg["seed"],
        train_per_class=cfg.get("train_per_class", 0),
        data_fingerprint=record.get("data_fingerprint"),
    )
    source = Source(
        kind="run",
        weights_sha256=record["weights_sha256"],
        run=str(Path(run).resolve()),
        strategy=cfg["strategy"],
        data=record["data"],
        split=split_record,
        pytorch_test_accuracy=record["metrics"].get("test_accuracy"),
    )
    base = ExportSource(
        record["backbone"],
        features,
        head,
        labels,
        source,
        task_heads=task_heads,
        task_labels=task_labels,
    )
    try:  # the files training skipped under --skip-bad are skipped again (same fingerprint)
        ds = open_dataset(
            record["data"],
            skip_bad=bool(record["metrics"].get(SKIPPED)),
            tasks=cfg.get("tasks") or None,
        )
    except EdgeTLError as e:
        if head_fit == "artifact" or calib is None:
            raise EdgeTLError(
                f"the run's training data is not readable ({e}); pass --calib DATA and "
                "--head-fit source"
            ) from None
        return base
    if ds.classes != labels or record.get("data_fingerprint") not in (None, fingerprint(ds)):
        raise EdgeTLError(
            f"the training data {record['data']} changed since the run was trained (other "
            "classes or images); restore it, or export with --calib DATA --head-fit source"
        )
    parts = split(ds, split_record)
    fit_set = ds.subset(np.concatenate([parts["train"], parts["val"]]))
    held_out = ds.subset(parts["test"])
    return dataclasses.replace(base, fit_set=fit_set, held_out=held_out)


def open_backbone(name: str, weights: str | Path | None) -> ExportSource:
    """A pretrained backbone with its ImageNet classifier as the head (no training)."""
    from edge_tl.backbones import build, get_spec, imagenet_labels, weights_sha256

    spec = get_spec(name)
    if spec.sources:
        raise EdgeTLError(
            f"{name} has no ImageNet classifier to export; train a linear probe on it "
            f"(edge-tl train DATA --backbone {name} --strategy linear-probe) and export the run"
        )
    features, fc = build(spec.name, weights=weights)
    head = LinearHead.from_logits_layer(fc.weight.detach().numpy(), fc.bias.detach().numpy())
    source = Source(kind="imagenet", weights_sha256=weights_sha256(spec.name, weights))
    return ExportSource(spec.name, features, head, imagenet_labels(), source)


def calibration_pool(
    calib: str | Path | None, fit_set: Dataset | None, skip_bad: bool = False
) -> tuple[list[str], list[Skipped]]:
    """``(paths, skipped)``: every image calibration may draw from: ``--calib`` (a named
    set such as ``elpv:poly``, an ImageFolder or a flat folder of images, by the folder rule
    of :mod:`edge_tl.images`; ``skip_bad`` leaves its bad files out and lists them), or the
    run's training split.

    Raises:
        EdgeTLError: a backbone export without ``--calib``, or a folder that does not exist.
        BadImageError: a calibration file that is not a readable image (not ``skip_bad``).
    """
    if calib is not None and is_named_image_set(calib):
        return list(open_dataset(calib).paths), []
    if calib is not None:
        folder = Path(calib)
        if not folder.is_dir():
            raise EdgeTLError(
                f"calibration folder {folder} does not exist; pass a folder of images"
            )
        files, dirs = entries(folder)
        if files:
            flat, skipped = check_images(files, skip_bad)
            if flat:
                return flat, skipped
        if not dirs:
            raise EdgeTLError(
                f"calibration folder {folder} has no images; pass a folder of images or an "
                "ImageFolder (<class>/<image>)"
            )
        ds = image_folder(folder, skip_bad=skip_bad)
        return list(ds.paths), list(ds.skipped)
    if fit_set is not None:
        return list(fit_set.paths), []
    raise EdgeTLError("exporting a backbone needs real images: pass --calib DATA")


def calibration_sample(pool: list[str], size: int, int8: bool) -> list[str]:
    """``size`` images of ``pool`` drawn with a fixed seed (all of them when fewer); warns
    with the real count when INT8 gets fewer than the recipe asks for."""
    if int8 and len(pool) < size:
        _logger.warning(
            f"only {len(pool)} calibration images (the recipe asks for {size}); "
            "INT8 ranges may be less accurate"
        )
    idx = np.random.default_rng(0).permutation(len(pool))[:size]
    return [pool[i] for i in sorted(idx)]
