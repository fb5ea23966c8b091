"""The run folder (``edge-tl train --out RUN``) and the checkpoint of an interrupted run.

A run folder holds ``model.safetensors``, ``head.npz``, ``run.json``, ``metrics.json``,
``history.csv`` and, for fine-tuning, ``curves.png``: no pickles. A multi-task run
(``run.json`` lists its ``tasks``) also holds each task's head as ``heads/<task>.npz``;
its ``head.npz`` is then the joint head over every combination of task classes
(:mod:`edge_tl.train.multitask`). ``RUN.checkpoint.pt``
(beside it) is written atomically after every epoch and loaded weights-only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edge_tl import __version__
from edge_tl.backbones import FeatureModel, build, weights_sha256
from edge_tl.bundle import atomic_folder, read_json
from edge_tl.data import Dataset, fingerprint, is_named_image_set
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import FORMAT_VERSION
from edge_tl.train.config import TrainConfig
from edge_tl.train.plots import plot_history

__all__ = [
    "CHECKPOINT_SUFFIX",
    "HEAD_FILE",
    "RUN_FILE",
    "WEIGHTS_FILE",
    "checkpoint_path",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
    "start_work",
    "write_run",
]

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.npz"
CHECKPOINT_SUFFIX = ".checkpoint.pt"
# Settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("workers", "compile", "onnx_cache", "device")


def start_work(work: Path, resume: bool, force: bool, what: str) -> None:
    """Keep an interrupted ``what``'s work folder for ``resume``, remove it with ``force``.

    Raises:
        EdgeTLError: ``work`` exists and neither ``resume`` nor ``force`` was asked for.
    """
    if work.exists() and not resume:
        if not force:
            raise EdgeTLError(
                f"an interrupted {what} left {work}; pass --resume to continue it or "
                "--force to start over"
            )
        shutil.rmtree(work)


def checkpoint_path(out: str | Path) -> Path:
    """Where an interrupted run's checkpoint lives: beside the run folder."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def write_run(
    out: Path,
    force: bool,
    data: str | Path,
    ds: Dataset,
    config: TrainConfig,
    features: FeatureModel,
    head: LinearHead | Any,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    extra_record: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> None:
    """The run folder, written atomically: weights (safetensors), head (npz), ``run.json``
    (what was trained on what, with which settings), metrics, history and curves.
    ``extra_record`` adds keys to ``run.json``; ``extra_files`` writes more files (plots)
    into the folder before it is renamed into place."""
    from safetensors.torch import save_file

    from_package = is_named_image_set(data)  # as open_dataset decides
    record = {
        "format_version": FORMAT_VERSION,
        "edge_tl_version": __version__,
        "backbone": config.backbone,
        "weights_sha256": weights_sha256(config.backbone, config.weights)
        if config.strategy != "from-scratch"
        else None,
        "data": str(data) if from_package else str(Path(data).resolve()),
        "data_name": ds.name,
        "data_fingerprint": fingerprint(ds),
        "labels": ds.classes,
        "config": config.to_dict(),
        "preprocess": dataclasses.asdict(features.spec.preprocess),
        "metrics": metrics,
        **(extra_record or {}),
    }
    if ds.tasks is not None:  # multi-task: each task's classes (heads/<task>.npz)
        record["tasks"] = ds.tasks.to_records()
    with atomic_folder(out, force) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in features.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        head.save(tmp / HEAD_FILE)
        write_records(tmp, record, metrics, history)
        if "val_loss" in history[0]:
            title = f"{config.backbone} {config.strategy} on {ds.name}"
            plot_history(history, tmp / "curves.png", title)
        if extra_files is not None:
            extra_files(tmp)


def write_records(
    folder: Path,
    record: dict[str, Any],
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """A run folder's ``run.json``, ``metrics.json`` and ``history.csv`` (a row an epoch):
    what the image and the text run folder both hold."""
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(folder / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a power cut leaves the previous checkpoint, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise EdgeTLError(f"no checkpoint to resume at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise EdgeTLError(
            f"checkpoint {path} cannot be read ({type(e).__name__}); start over with --force"
        ) from None
    saved = state.get("config", {})
    now = config.to_dict()
    differ = [k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if differ:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in differ[:4])
        raise EdgeTLError(
            f"checkpoint {path} was written with other settings: {diffs}; resume with the "
            "same settings or start over with --force"
        )
    return state


def read_run_record(run: Path) -> dict[str, Any]:
    """``run.json`` of a run folder (image or text), its format version checked.

    Raises:
        EdgeTLError: not a run folder, or written by an incompatible edge_tl version.
    """
    record = read_json(run, RUN_FILE, "run folder", "edge-tl train", "retrain")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgeTLError(
            f"run folder {run} has format version {version!r}, this edge_tl reads version "
            f"{FORMAT_VERSION}; retrain with this version or use the edge_tl that wrote it "
            f"({record.get('edge_tl_version', 'unknown')})"
        )
    return record


def load_run(run: str | Path) -> tuple[dict[str, Any], FeatureModel, LinearHead]:
    """Read a run folder: its record, the trained feature model and its head.

    Raises:
        EdgeTLError: not a run folder, or written by an incompatible edge_tl version.
    """
    run = Path(run)
    record = read_run_record(run)
    if record.get("modality") == "text":
        raise EdgeTLError(
            f"run folder {run} holds a text model; read it with "
            "edge_tl.train.text_runs.load_text_run"
        )
    from safetensors.torch import load_file

    from edge_tl.backbones import at_size, load_strict

    for name in (WEIGHTS_FILE, HEAD_FILE):
        if not (run / name).is_file():
            raise EdgeTLError(f"run folder {run} has no {name}; copy the whole folder or retrain")
    features, _ = build(record["backbone"], pretrained=False)
    try:
        state = load_file(str(run / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeTLError(f"{run / WEIGHTS_FILE} cannot be read ({first}); retrain") from None
    load_strict(
        features,
        state,
        f"{run / WEIGHTS_FILE}",
        f"it was not trained as {record['backbone']}; retrain",
    )
    at_size(features, int(record.get("preprocess", {}).get("size") or 0))  # --image-size
    return record, features.eval(), LinearHead.load(run / HEAD_FILE)
