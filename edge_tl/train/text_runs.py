"""The text run folder (``edge-tl train`` on text data): written atomically, read back whole.

Layout::

    RUN/encoder/     Hugging Face folder (save_pretrained): config.json, model.safetensors,
                     tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt
    RUN/head.npz     LinearHead on the pooled, L2-normalised embeddings (float32[K, D])
    RUN/run.json     as an image run's, plus "modality": "text", "preprocess" (TextPreprocess),
                     "text_column", "label_column", "test_data"
    RUN/metrics.json RUN/history.csv RUN/curves.png (fine-tuning only)

No pickles: weights in safetensors, the head in npz. The checkpoint of an interrupted run is
the image path's (``RUN.checkpoint.pt`` beside the folder, :mod:`edge_tl.train.runs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.backbones import get_text_spec
from edge_tl.bundle import atomic_folder
from edge_tl.data import Dataset, fingerprint, split
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import FORMAT_VERSION, TextPreprocess
from edge_tl.train.plots import plot_history
from edge_tl.train.runs import HEAD_FILE, RUN_FILE, read_run_record, write_records
from edge_tl.train.text_config import TextTrainConfig

__all__ = [
    "ENCODER_DIR",
    "data_ref",
    "load_text_run",
    "run_texts",
    "text_splits",
    "write_text_run",
]

ENCODER_DIR = "encoder"
_ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def data_ref(data: str | Path) -> str:
    """How run.json names the data: a named set (``trec6:train``) as given, a file or folder
    by its absolute path."""
    return str(Path(data).resolve()) if Path(data).exists() else str(data)


def text_splits(
    ds: Dataset, config: TextTrainConfig, test: Dataset | None = None
) -> dict[str, Dataset]:
    """The run's ``train`` / ``val`` / ``test`` sets: :func:`edge_tl.data.split` of ``ds`` by
    ``config.split``; with ``config.test_data`` the split's held-out part validates and
    ``test`` (the separate held-out set) tests.

    Raises:
        EdgeTLError: ``config.test_data`` set but ``test`` not given, or its classes differ.
    """
    parts = split(ds, config.split)
    if config.test_data is None:
        return {k: ds.subset(parts[k]) for k in ("train", "val", "test")}
    if test is None:
        raise EdgeTLError(f"the run is tested on {config.test_data}; open it and pass it")
    if test.classes != ds.classes:
        raise EdgeTLError(
            f"--test-data {config.test_data} has classes {', '.join(test.classes)}, the "
            f"training data {', '.join(ds.classes)}; use a test set with the same classes"
        )
    return {"train": ds.subset(parts["train"]), "val": ds.subset(parts["test"]), "test": test}


def write_text_run(
    out: Path,
    force: bool,
    data: str | Path,
    ds: Dataset,
    config: TextTrainConfig,
    model: Any,
    tokenizer: Any,
    head: LinearHead,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    test_fingerprint: str | None = None,
) -> None:
    """The run folder, written atomically (see the module docstring for the layout).

    ``model`` is the trained ``transformers`` encoder (saved as safetensors), ``tokenizer``
    its fast tokenizer, ``head`` the linear head on its pooled normalised embeddings.
    """
    spec = get_text_spec(config.backbone)
    record = {
        "format_version": FORMAT_VERSION,
        "edge_tl_version": __version__,
        "modality": "text",
        "backbone": config.backbone,
        "weights_sha256": _sha256(spec.model_dir() / "model.safetensors"),
        "data": data_ref(data),
        "data_name": ds.name,
        "data_fingerprint": fingerprint(ds),
        "test_data": None if config.test_data is None else data_ref(config.test_data),
        "test_fingerprint": test_fingerprint,
        "text_column": config.text_column,
        "label_column": config.label_column,
        "labels": ds.classes,
        "config": config.to_dict(),
        "preprocess": dataclasses.asdict(spec.preprocess),
        "metrics": metrics,
    }
    with atomic_folder(out, force) as tmp:
        enc = tmp / ENCODER_DIR
        model.save_pretrained(enc, safe_serialization=True)
        tokenizer.save_pretrained(enc)
        head.save(tmp / HEAD_FILE)
        write_records(tmp, record, metrics, history)
        if "val_loss" in history[0] and all(np.isfinite(r["val_loss"]) for r in history):
            plot_history(history, tmp / "curves.png", f"{config.backbone} {config.strategy}")


def load_text_run(run: str | Path) -> tuple[dict[str, Any], Any, Any, LinearHead]:
    """Read a text run folder: ``(record, model, tokenizer, head)``.

    ``record`` is run.json (its ``preprocess`` checked as a
    :class:`~edge_tl.spec.TextPreprocess`); ``model`` the fine-tuned ``transformers``
    encoder in eval mode, ``tokenizer`` its fast tokenizer (``edge_tl.train.text_encoder``
    embeds with both); ``head`` the :class:`~edge_tl.runtime.heads.LinearHead` on the pooled,
    L2-normalised embeddings.

    Raises:
        EdgeTLError: not a run folder, an image run, another format version, or a file
            missing or unreadable.

    Example:
        >>> record, model, tok, head = load_text_run("runs/trec6")  # doctest: +SKIP
        >>> pre = TextPreprocess.from_dict(record["preprocess"])  # doctest: +SKIP
        >>> emb = embed_texts(model, tok, ["Who wrote Hamlet ?"], pre)  # doctest: +SKIP
        >>> head.predict_proba(emb).argmax(1)  # doctest: +SKIP
    """
    from edge_tl.train.text_encoder import load_encoder

    run = Path(run)
    record = read_run_record(run)
    if record.get("modality") != "text":
        raise EdgeTLError(
            f"run folder {run} holds an image model, not a text model; read it with "
            "edge_tl.train.load_run"
        )
    TextPreprocess.from_dict(record.get("preprocess"), f"preprocess of {run / RUN_FILE}", "retrain")
    missing = [
        f"{ENCODER_DIR}/{f}" for f in _ENCODER_FILES if not (run / ENCODER_DIR / f).is_file()
    ]
    missing += [HEAD_FILE] if not (run / HEAD_FILE).is_file() else []
    if missing:
        raise EdgeTLError(
            f"run folder {run} has no {', '.join(missing)}; copy the whole folder or retrain"
        )
    model, tokenizer = load_encoder(run / ENCODER_DIR)
    try:
        head = LinearHead.load(run / HEAD_FILE)
    except (OSError, ValueError, KeyError) as e:
        raise EdgeTLError(
            f"{run / HEAD_FILE} cannot be read ({type(e).__name__}); retrain"
        ) from None
    if head.n_classes != len(record.get("labels", [])) or head.weight.shape[1] != (
        model.config.hidden_size
    ):
        raise EdgeTLError(
            f"{run / HEAD_FILE} ({head.weight.shape[0]} classes x {head.weight.shape[1]}) does "
            f"not fit the run's labels and encoder; copy the whole folder or retrain"
        )
    return record, model, tokenizer, head


def run_texts(record: dict[str, Any], skip_bad: bool = False) -> dict[str, Dataset]:
    """The ``train`` / ``val`` / ``test`` texts a run was trained, selected and tested on,
    re-read from its data (``record`` from :func:`load_text_run`).

    Raises:
        EdgeTLError: the data cannot be read, or changed since the run was trained.
    """
    from edge_tl.texts import open_text_dataset

    config = TextTrainConfig.from_dict(record["config"])
    ds = open_text_dataset(record["data"], config.text_column, config.label_column, skip_bad)
    test = None
    if record.get("test_data") is not None:
        test = open_text_dataset(
            record["test_data"], config.text_column, config.label_column, skip_bad
        )
    for what, d, fp in (
        ("training data", ds, record.get("data_fingerprint")),
        ("test data", test, record.get("test_fingerprint")),
    ):
        if d is not None and fp is not None and fingerprint(d) != fp:
            raise EdgeTLError(
                f"the {what} of the run changed since it was trained (other texts or labels); "
                "restore it or retrain"
            )
    return text_splits(ds, config, test)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
