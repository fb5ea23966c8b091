"""``--strategy linear-probe``: a softmax head on frozen embeddings, computed once."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_tl.backbones import FeatureModel
from edge_tl.data import Dataset
from edge_tl.runtime.evaluation import macro_f1
from edge_tl.runtime.heads import DEFAULT_L2_GRID, LinearHead
from edge_tl.train.cache import cache_activations
from edge_tl.train.config import TrainConfig

__all__ = ["fit_probe_head", "linear_probe", "multi_source_note"]

_logger = logging.getLogger(__name__)


def fit_probe_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    seed: int = 0,
) -> LinearHead:
    """A softmax head on embeddings ``x_train[N, D]``: its L2 penalty picked from
    :data:`~edge_tl.runtime.heads.DEFAULT_L2_GRID` by accuracy on ``x_val`` (ties: lower
    log-loss), or by the head's own hold-out when there is no validation split."""
    if not len(x_val):
        return LinearHead.fit(x_train, y_train, n_classes, seed=seed)
    scores = []
    for l2 in DEFAULT_L2_GRID:
        h = LinearHead.fit(x_train, y_train, n_classes, l2=l2)
        p = h.predict_proba(x_val)
        acc = float((p.argmax(1) == y_val).mean())
        nll = float(-np.log(p[np.arange(len(y_val)), y_val] + 1e-12).mean())
        scores.append((acc, -nll, l2))
    return LinearHead.fit(x_train, y_train, n_classes, l2=max(scores)[2])


def linear_probe(
    features: FeatureModel, ds: Dataset, splits: dict[str, np.ndarray], config: TrainConfig
) -> tuple[LinearHead, list[dict[str, Any]], dict[str, Any]]:
    """``(head, history, metrics)``: embeddings computed once; a softmax head fitted on the
    training split, its L2 penalty chosen on the validation split (the data fine-tuning
    uses for model selection), so every strategy in a comparison learns from the same
    images."""
    pre = features.spec.preprocess
    emb = cache_activations(
        features, ds.paths, pre, None, desc="embedding images", use_onnx=config.onnx_cache
    )
    if ds.tasks is not None:
        return _probe_tasks(emb, ds, splits, config)
    k = len(ds.classes)
    tr, va, te = splits["train"], splits["val"], splits["test"]
    head = fit_probe_head(emb[tr], ds.labels[tr], emb[va], ds.labels[va], k, config.seed)
    test_y = ds.labels[te]
    test_pred = head.predict_proba(emb[te]).argmax(1)
    test_acc = float((test_pred == test_y).mean())
    fit_acc = float((head.predict_proba(emb[tr]).argmax(1) == ds.labels[tr]).mean())
    val_acc = (
        float((head.predict_proba(emb[va]).argmax(1) == ds.labels[va]).mean()) if len(va) else None
    )
    history = [{"step": 1, "l2": head.l2, "train_accuracy": fit_acc, "test_accuracy": test_acc}]
    sources = _single_sources(features, emb, ds, splits, config.seed)
    if sources:
        sources[features.spec.name] = {"val_accuracy": val_acc, "test_accuracy": test_acc}
        note = multi_source_note(features.spec.name, sources)
        if note:
            _logger.warning(note)
    return (
        head,
        history,
        {
            "strategy": "linear-probe",
            "test_accuracy": test_acc,
            "test_macro_f1": macro_f1(test_pred, test_y, k),
            "val_accuracy": val_acc,
            "l2": head.l2,
            "trainable_parameters": int(head.weight.size + head.bias.size),
            "boundary": "embedding (cached)",
            **({"sources": sources} if sources else {}),
        },
    )


def _single_sources(
    features: FeatureModel,
    emb: np.ndarray,
    ds: Dataset,
    splits: dict[str, np.ndarray],
    seed: int,
) -> dict[str, dict[str, float | None]]:
    """A multi-source backbone: each source's own probe, fitted on its slice of the
    concatenated embedding (the same images, the same L2 choice), scored on val and test."""
    dims = getattr(features, "source_dims", None)
    if not dims:
        return {}
    k = len(ds.classes)
    tr, va, te = splits["train"], splits["val"], splits["test"]
    out: dict[str, dict[str, float | None]] = {}
    start = 0
    for name, d in zip(features.spec.sources, dims, strict=True):
        x = emb[:, start : start + d]
        start += d
        h = fit_probe_head(x[tr], ds.labels[tr], x[va], ds.labels[va], k, seed)

        def acc(idx: np.ndarray, h: LinearHead = h, x: np.ndarray = x) -> float | None:
            if not len(idx):
                return None
            return float((h.predict_proba(x[idx]).argmax(1) == ds.labels[idx]).mean())

        out[name] = {"val_accuracy": acc(va), "test_accuracy": acc(te)}
    return out


def multi_source_note(name: str, sources: dict[str, dict[str, float | None]]) -> str:
    """A warning when the concatenation ``name`` does not beat its best single source on
    the validation split (test accuracy when there is none); empty when it does."""
    key = "val_accuracy" if sources[name].get("val_accuracy") is not None else "test_accuracy"
    singles = {k: v[key] for k, v in sources.items() if k != name}
    best = max(singles, key=lambda k: singles[k])
    if sources[name][key] > singles[best]:
        return ""
    split_name = "validation" if key == "val_accuracy" else "test"
    return (
        f"the multi-source {name} ({sources[name][key]:.4f}) does not beat {best} alone "
        f"({singles[best]:.4f}) on the {split_name} split; use the single source: "
        f"--backbone {best}"
    )


def _probe_tasks(
    emb: np.ndarray, ds: Dataset, splits: dict[str, np.ndarray], config: TrainConfig
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """The linear probe of a multi-task data set: one head per task on the same embeddings."""
    from edge_tl.train.multitask import probe_tasks

    heads, test_acc, val_acc, per_task = probe_tasks(
        emb, ds, splits, config.weights_per_task, config.seed
    )
    history = [{"step": 1, "test_accuracy": test_acc}]
    metrics = {
        "strategy": "linear-probe",
        "test_accuracy": test_acc,
        "test_macro_f1": float(np.mean([m["test_macro_f1"] for m in per_task.values()])),
        "val_accuracy": val_acc,
        "trainable_parameters": int(sum(h.weight.size + h.bias.size for h in heads.heads.values())),
        "boundary": "embedding (cached)",
        "tasks": per_task,
        "task_weights": list(config.weights_per_task),
    }
    return heads, history, metrics
