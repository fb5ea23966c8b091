"""What a text export starts from: a pretrained text encoder, or a text run folder; and the
texts it calibrates and checks on.

A pretrained encoder (``--backbone all-minilm-l6-v2``) has no head and no data: ``--calib``
texts calibrate INT8 and check the artifact, or, for FP32 / FP16 without ``--calib``, a few
built-in reference sentences check it. A run (``edge-tl train`` on text data) brings its
fine-tuned encoder folder, its head and, when its data is still readable, its split: the
training + validation texts refit the head on the artifact's embeddings and calibrate; the
held-out texts check every artifact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.bundle import sha256
from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import Source, TextPreprocess
from edge_tl.texts import read_texts

__all__ = [
    "REFERENCE_TEXTS",
    "TextSource",
    "calibration_texts",
    "is_text_export",
    "open_text_backbone",
    "open_text_run",
]

_logger = logging.getLogger(__name__)

REFERENCE_TEXTS = (
    "The conveyor stopped twice this morning because a sensor near the loading bay failed.",
    "What is the boiling point of water at the top of a high mountain?",
    "Please send the updated invoice to the accounts team before Friday.",
    "A small bakery on the corner sells fresh bread every day from six o'clock.",
    "Who wrote the first textbook on the theory of probability?",
    "Heavy rain is expected across the northern region for the rest of the week.",
    "The firmware update fixes a memory leak and improves battery life.",
    "How many kilometres is it from the harbour to the old town?",
    "The committee postponed its decision until the audit results are published.",
    "She trained the model on a laptop and deployed it to a camera in the warehouse.",
    "Customers reported that the new checkout page loads slowly on mobile phones.",
    "Why do leaves change colour in autumn?",
    "The museum's new wing displays textiles from three centuries.",
    "Replace the filter every six months, or sooner in dusty conditions.",
    "Shares of the shipping company rose after it announced a larger fleet.",
    "Where can I find the manual for this pump?",
)
"""Sentences written for edge_tl (no data set's text): what a pretrained FP32 / FP16 export
without ``--calib`` checks parity on and stores for the device's self-test."""


@dataclass
class TextSource:
    """A text encoder to export, its head and labels, and its data.

    ``model_dir`` is the Hugging Face folder optimum exports from; ``model`` and ``tokenizer``
    the same encoder in PyTorch (the FP32 reference). ``head`` is None for a pretrained
    encoder (the device learns heads); ``fit_set`` (training + validation) and ``held_out``
    (test) are text :class:`~edge_tl.data.Dataset` s, None when there is no split.
    """

    name: str
    model_dir: Path
    model: Any
    tokenizer: Any
    pre: TextPreprocess
    head: LinearHead | None
    labels: list[str]
    source: Source
    fit_set: Dataset | None = None
    held_out: Dataset | None = None


def is_text_export(run: str | Path | None, backbone: str | None) -> bool:
    """Whether an export starts from a text encoder: a text backbone's name, or a run folder
    whose ``run.json`` says ``"modality": "text"`` (anything unreadable is left to the image
    path, whose errors name it)."""
    from edge_tl.backbones import is_text_backbone

    if backbone is not None:
        return is_text_backbone(backbone)
    try:
        record = json.loads((Path(run) / "run.json").read_bytes())  # type: ignore[arg-type]
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("modality") == "text"


def open_text_backbone(name: str) -> TextSource:
    """A pretrained text encoder from :data:`edge_tl.backbones.TEXT_REGISTRY`, no head.

    Raises:
        EdgeTLError: an unknown name, or its weights package is not installed.
    """
    from edge_tl.backbones import get_text_spec
    from edge_tl.train.text_encoder import load_encoder

    spec = get_text_spec(name)
    folder = spec.model_dir()
    model, tokenizer = load_encoder(folder)
    weights = folder / "model.safetensors"
    source = Source(
        kind="pretrained", weights_sha256=sha256(weights) if weights.is_file() else None
    )
    return TextSource(spec.name, folder, model, tokenizer, spec.preprocess, None, [], source)


def open_text_run(run: str | Path, calib: str | Path | None, head_fit: str) -> TextSource:
    """A text run folder from ``edge-tl train``, with its split re-read from its data.

    The training + validation texts refit the head and calibrate; the test texts (the
    run's held-out split, or its separate ``--test-data``) check every artifact.

    Raises:
        EdgeTLError: not a text run folder; its data unreadable or changed while the head is
            to be refit or no ``calib`` is given.
    """
    from edge_tl.data import fingerprint
    from edge_tl.texts import open_text_dataset
    from edge_tl.train.text_config import TextTrainConfig
    from edge_tl.train.text_runs import load_text_run, run_texts

    record, model, tokenizer, head = load_text_run(run)
    config = TextTrainConfig.from_dict(record["config"])
    pre = TextPreprocess.from_dict(record["preprocess"], f"preprocess of {run}/run.json")
    labels = list(record["labels"])
    folder = Path(run) / "encoder"
    try:
        parts = run_texts(record)
        data = open_text_dataset(record["data"], config.text_column, config.label_column)
    except EdgeTLError as e:
        if head_fit == "artifact" or calib is None:
            raise EdgeTLError(
                f"the run's training data is not readable ({e}); pass --calib TEXTS and "
                "--head-fit source"
            ) from None
        parts, data = None, None
    split = dataclasses.replace(
        config.split, data_fingerprint=None if data is None else fingerprint(data)
    )
    source = Source(
        kind="run",
        weights_sha256=record.get("weights_sha256"),
        run=str(Path(run).resolve()),
        strategy=config.strategy,
        data=record["data"],
        split=split,
        pytorch_test_accuracy=record.get("metrics", {}).get("test_accuracy"),
    )
    src = TextSource(record["backbone"], folder, model, tokenizer, pre, head, labels, source)
    if parts is not None:
        train, val = parts["train"], parts["val"]
        src.fit_set = dataclasses.replace(
            train,
            paths=[*train.paths, *val.paths],
            labels=np.concatenate([train.labels, val.labels]),
        )
        src.held_out = parts["test"]
    return src


def calibration_texts(
    calib: str | Path | None,
    fit_set: Dataset | None,
    size: int,
    int8: bool,
    recipe: str,
    text_column: str = "text",
) -> tuple[list[str], list[str]]:
    """``(sample, pool)``: up to ``size`` calibration texts, drawn with a fixed seed from
    ``pool``, every text of ``--calib`` or the run's training split; warns with the real
    count when INT8 gets fewer than the recipe asks for. Empty when none are needed.

    Raises:
        EdgeTLError: INT8 with no texts to calibrate on (a pretrained encoder without
            ``--calib``), or a ``--calib`` file that is missing, not UTF-8, or holds an
            empty text or none at all.
    """
    if calib is not None:
        pool = read_texts(calib, text_column)
    elif fit_set is not None:
        pool = list(fit_set.paths)
    elif int8:
        raise EdgeTLError(
            f"recipe {recipe} quantizes to INT8 and calibrates on real texts: pass --calib "
            "FILE (one text per line, a few hundred of the texts the model will see)"
        )
    else:
        return [], []
    if int8 and len(pool) < size:
        _logger.warning(
            f"only {len(pool)} calibration texts (the recipe asks for {size}); INT8 ranges "
            "may be less accurate"
        )
    idx = np.random.default_rng(0).permutation(len(pool))[:size]
    return [pool[i] for i in sorted(idx)], pool
