"""``edge-tl train`` on text: labelled texts and a BERT-family encoder in, a text run out.

Strategies (:data:`~edge_tl.train.text_config.TEXT_STRATEGIES`):

- ``linear-probe``: every text embedded once by the frozen encoder
  (:func:`edge_tl.train.text_encoder.embed_texts`), a softmax head fitted on the cache of the
  training and validation texts, its L2 penalty by cross-validation on them (as
  :mod:`edge_tl.train.probe` does for images).
- ``finetune`` (default): the last ``train_layers`` transformer layers + the head
  (:mod:`edge_tl.train.text_loop`).
- ``full``: every layer and the word embeddings.

The run folder is :mod:`edge_tl.train.text_runs`'s; an interrupted fine-tuning run continues
with ``resume`` from the checkpoint beside it, as image runs do.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_tl.backbones import get_text_spec
from edge_tl.bundle import check_destination
from edge_tl.data import Dataset, fingerprint
from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.runtime.evaluation import macro_f1
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import TextPreprocess
from edge_tl.train.probe import fit_probe
from edge_tl.train.runs import checkpoint_path, load_checkpoint
from edge_tl.train.text_config import TextTrainConfig
from edge_tl.train.text_encoder import embed_texts, load_encoder
from edge_tl.train.text_loop import TextClassifier, fit_text
from edge_tl.train.text_runs import text_splits, write_text_run

__all__ = ["cap_threads", "train_text"]


def cap_threads() -> int:
    """Limit torch's intra-op threads to the cores this process may run on (a container or
    ``taskset`` often allows fewer than the machine has); returns the number used."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    n = max(1, min(torch.get_num_threads(), cores))
    torch.set_num_threads(n)
    return n


def train_text(
    data: str | Path,
    out: str | Path,
    config: TextTrainConfig | None = None,
    force: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Train a text classifier on ``data`` and write the run folder ``out``.

    Args:
        data: labelled texts as :func:`edge_tl.texts.open_text_dataset` reads them (a CSV /
            TSV / JSON Lines file, a folder ``<class>/*.txt``, or a named set such as
            ``trec6:train``), columns ``config.text_column`` / ``config.label_column``.
        config: settings (default :class:`TextTrainConfig`: ``finetune`` of the last two
            layers of all-MiniLM-L6-v2).
        force: replace an existing run folder (and discard an old checkpoint).
        resume: continue an interrupted run from ``OUT.checkpoint.pt``.
        on_epoch_end: called with each epoch's history row.
        skip_bad: leave bad rows out instead of stopping on the first.

    Returns:
        The metrics written to ``out/metrics.json`` (``test_accuracy``: the PyTorch model on
        the test split, or on ``config.test_data``).

    Raises:
        EdgeTLError: bad data or settings, or a checkpoint that does not match.

    Example:
        >>> cfg = TextTrainConfig(test_data="trec6:test")
        >>> train_text("trec6:train", "runs/trec6", cfg)["test_accuracy"]  # doctest: +SKIP
        0.96
    """
    from edge_tl.texts import open_text_dataset

    config = config or TextTrainConfig()
    out = Path(out)
    ckpt_file = checkpoint_path(out)
    check_destination(out, force, "run folder")
    if not resume and ckpt_file.exists():
        if not force:
            raise EdgeTLError(
                f"an interrupted run left {ckpt_file}; pass --resume to continue it or "
                "--force to start over"
            )
        ckpt_file.unlink()
    state = load_checkpoint(ckpt_file, config) if resume else None  # type: ignore[arg-type]
    columns = (config.text_column, config.label_column)
    ds = open_text_dataset(data, *columns, skip_bad=skip_bad)
    test = None
    if config.test_data is not None:
        test = open_text_dataset(config.test_data, *columns, skip_bad=skip_bad)
    sets = text_splits(ds, config, test)
    _check_sets(ds, sets, config)
    data_fp = fingerprint(ds)
    if state is not None and state["data_fingerprint"] != data_fp:
        raise EdgeTLError(
            f"{data} changed since {ckpt_file} was written; restore it or start over with --force"
        )
    threads = cap_threads()
    torch.manual_seed(config.seed)
    spec = get_text_spec(config.backbone)
    pre = spec.preprocess
    encoder, tokenizer = load_encoder(spec.model_dir())
    start = time.perf_counter()
    if config.strategy == "linear-probe":
        head, history, metrics = _probe(encoder, tokenizer, sets, pre, config)
    else:
        model = TextClassifier(encoder, pre, len(ds.classes), config.dropout)
        head, history, metrics = fit_text(
            model,
            tokenizer,
            sets,
            config,
            _device(config.device),
            ckpt_file,
            state,
            data_fp,
            on_epoch_end,
        )
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["n_train"], metrics["n_val"], metrics["n_test"] = (len(sets[k]) for k in sets)
    metrics["test_data"] = config.test_data
    metrics["threads"] = threads
    skipped = [s for d in (ds, test) if d is not None for s in d.skipped]
    if skipped:
        metrics[SKIPPED] = [s.to_dict() for s in skipped]
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    test_fp = fingerprint(test) if test is not None else None
    write_text_run(
        out, force, data, ds, config, encoder, tokenizer, head, history, metrics, test_fp
    )
    ckpt_file.unlink(missing_ok=True)
    return metrics


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeTLError("--device cuda, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _check_sets(ds: Dataset, sets: dict[str, Dataset], config: TextTrainConfig) -> None:
    """What :func:`edge_tl.data.split` does not check: two classes at least, and a separate
    test set that holds every class."""
    if len(ds.classes) < 2:
        raise EdgeTLError(f"{ds.name} has one class ({ds.classes[0]}); training needs at least two")
    if config.test_data is not None:
        missing = [c for k, c in enumerate(ds.classes) if not np.any(sets["test"].labels == k)]
        if missing:
            raise EdgeTLError(
                f"--test-data {config.test_data} has no text of class {missing[0]!r}; test on "
                "a set with every class"
            )


def _probe(
    encoder: Any,
    tokenizer: Any,
    sets: dict[str, Dataset],
    pre: TextPreprocess,
    config: TextTrainConfig,
) -> tuple[LinearHead, list[dict[str, Any]], dict[str, Any]]:
    """The linear probe: embeddings computed once, a softmax head on the training and
    validation texts, its L2 penalty chosen by cross-validation on them
    (:func:`~edge_tl.train.probe.fit_probe`; ``val_accuracy`` is the out-of-fold accuracy)."""
    t0 = time.perf_counter()
    emb = {k: embed_texts(encoder, tokenizer, d.paths, pre) for k, d in sets.items()}
    embed_seconds = time.perf_counter() - t0
    tr, va, te = sets["train"], sets["val"], sets["test"]
    k = len(tr.classes)
    fit = fit_probe(emb["train"], tr.labels, emb["val"], va.labels, k, config.seed)
    head = fit.head

    def acc(part: str) -> float | None:
        if not len(sets[part]):
            return None
        return float((head.predict_proba(emb[part]).argmax(1) == sets[part].labels).mean())

    test_pred = head.predict_proba(emb["test"]).argmax(1)
    history = [
        {"step": 1, "l2": head.l2, "train_accuracy": acc("train"), "test_accuracy": acc("test")}
    ]
    n_texts = sum(len(d) for d in sets.values())
    return (
        head,
        history,
        {
            "strategy": "linear-probe",
            "test_accuracy": acc("test"),
            "test_macro_f1": macro_f1(test_pred, te.labels, k),
            "val_accuracy": fit.cv_accuracy if len(va) else None,
            "l2": head.l2,
            "l2_choice": fit.summary(),
            "trainable_parameters": int(head.weight.size + head.bias.size),
            "boundary": "embedding (cached)",
            "cache_seconds": round(embed_seconds, 1),
            "texts_per_second": round(n_texts / max(embed_seconds, 1e-9), 1),
        },
    )
