"""Multi-task training: one shared backbone, one linear head per task, a weighted sum of the
tasks' cross-entropies.

The heads are one ``nn.Linear`` whose outputs are the tasks' logits side by side; the loss
is ``sum_t w_t * CE(logits_t, y_t)`` with equal weights by default. Kurin et al., "In
Defense of the Unitary Scalarization for Deep Multi-Task Learning" (NeurIPS 2022) find
this plain sum, with the usual regularisation, as good as the specialised multi-task
optimisers (PCGrad, MGDA, GradDrop, ...). Model selection uses the weighted mean of the
tasks' accuracies. Labels arrive as joint classes (:mod:`edge_tl.multitask`) and are mapped
to each task's class here, so batching, caching and the split are the one-task code's.

Besides one head per task, a run keeps the *joint head* (:func:`joint_head`): the sum of
the tasks' logits for every combination of task classes, a plain linear head over the
joint classes whose argmax is every task's argmax. Tools that know one head (the export's
accuracy control, ``load_run``) work with it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl.data import Dataset
from edge_tl.multitask import TaskSet
from edge_tl.runtime.evaluation import macro_f1
from edge_tl.runtime.heads import LinearHead

__all__ = ["TASK_HEADS_DIR", "TaskHeads", "TaskObjective", "joint_head", "task_metrics"]

TASK_HEADS_DIR = "heads"
"""A multi-task run folder keeps each task's head as ``heads/<task>.npz``."""


@dataclass
class TaskHeads:
    """Each task's linear head (by task name, in task order) and their joint head."""

    heads: dict[str, LinearHead]
    joint: LinearHead

    def save(self, path: str | Path) -> None:
        """The joint head at ``path`` (``head.npz``) and each task's beside it in
        ``heads/<task>.npz``."""
        path = Path(path)
        self.joint.save(path)
        folder = path.parent / TASK_HEADS_DIR
        folder.mkdir(exist_ok=True)
        for name, head in self.heads.items():
            head.save(folder / f"{name}.npz")

    @classmethod
    def load(cls, run: Path, tasks: list[str], joint: LinearHead) -> TaskHeads:
        return cls({t: LinearHead.load(run / TASK_HEADS_DIR / f"{t}.npz") for t in tasks}, joint)


def joint_head(heads: list[LinearHead], table: np.ndarray) -> LinearHead:
    """The linear head over joint classes: ``logit(j) = sum_t logit_t(table[j, t])``.

    Each head's standardisation is folded in first, so heads fitted on different scalings
    combine exactly; the result has no standardisation of its own.
    """
    w = sum(h.folded()[0][:, table[:, t]] for t, h in enumerate(heads))
    b = sum(h.folded()[1][table[:, t]] for t, h in enumerate(heads))
    return LinearHead.from_logits_layer(np.ascontiguousarray(w.T), b)


class TaskObjective(nn.Module):
    """``sum_t w_t * CE(logits[:, slice_t], table[y, t])`` over joint labels ``y``."""

    def __init__(
        self, tasks: TaskSet, weights: tuple[float, ...], label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.sizes = [len(c) for c in tasks.classes]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        self.weights = tuple(weights)
        self.register_buffer("table", torch.from_numpy(tasks.table.astype(np.int64)))
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    @property
    def n_outputs(self) -> int:
        return self.offsets[-1]

    def _slices(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return [logits[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        table = self.table.to(y.device)
        return sum(
            w * self.ce(part, table[y, t])
            for t, (w, part) in enumerate(zip(self.weights, self._slices(logits), strict=True))
        )

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        """int64 ``[N, n_tasks]``: each task's predicted class."""
        return torch.stack([p.argmax(1) for p in self._slices(logits)], 1).cpu().numpy()

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The weighted mean over tasks of the number of right answers in the batch."""
        pred = torch.from_numpy(self.predict(logits.detach())).to(y.device)
        right = (pred == self.table.to(y.device)[y]).float().sum(0)
        w = torch.tensor(self.weights, device=right.device)
        return float((right * w).sum() / w.sum())

    def accuracy(self, pred: np.ndarray, y: np.ndarray) -> float:
        """Weighted mean task accuracy of predictions ``pred[N, T]`` for joint labels."""
        per = (pred == self.tasks.table[y]).mean(0)
        return float(np.dot(per, self.weights) / sum(self.weights))

    def split_head(self, weight: np.ndarray, bias: np.ndarray) -> TaskHeads:
        """The trained ``nn.Linear``'s rows, one head per task, and their joint head."""
        heads = {
            name: LinearHead.from_logits_layer(weight[a:b].copy(), bias[a:b].copy())
            for name, a, b in zip(
                self.tasks.names, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }
        return TaskHeads(heads, joint_head(list(heads.values()), self.tasks.table))


def task_metrics(tasks: TaskSet, pred: np.ndarray, y: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{task: {"test_accuracy", "test_macro_f1"}}`` for predictions ``pred[N, T]`` of
    joint labels ``y[N]``."""
    out = {}
    for t, name in enumerate(tasks.names):
        truth = tasks.table[y, t]
        out[name] = {
            "test_accuracy": float((pred[:, t] == truth).mean()),
            "test_macro_f1": macro_f1(pred[:, t], truth, len(tasks.classes[t])),
        }
    return out


def probe_tasks(
    emb: np.ndarray,
    ds: Dataset,
    splits: dict[str, np.ndarray],
    weights: tuple[float, ...],
    seed: int,
) -> tuple[TaskHeads, float, float | None, dict[str, dict[str, Any]]]:
    """Linear probe of every task on cached embeddings ``emb[N, D]``: ``(heads, weighted mean
    test accuracy, weighted mean validation accuracy or None, per-task metrics)``."""
    from edge_tl.train.probe import fit_probe

    tasks = ds.tasks
    assert tasks is not None
    tr, va, te = splits["train"], splits["val"], splits["test"]
    heads, test_pred, val_accs = {}, [], []
    for t, name in enumerate(tasks.names):
        y = tasks.table[ds.labels, t]
        k = len(tasks.classes[t])
        fit = fit_probe(emb[tr], y[tr], emb[va], y[va], k, seed)
        heads[name] = head = fit.head
        test_pred.append(head.predict_proba(emb[te]).argmax(1))
        val_accs.append(fit.cv_accuracy)
    pred = np.stack(test_pred, 1)
    metrics = task_metrics(tasks, pred, ds.labels[te])
    for name, head in heads.items():
        metrics[name]["l2"] = head.l2
    w = np.asarray(weights, np.float64) / sum(weights)
    test_acc = float(np.dot([metrics[n]["test_accuracy"] for n in tasks.names], w))
    val_acc = None  # each head learned from val: its out-of-fold accuracy stands in
    if len(va) and None not in val_accs:
        val_acc = float(np.dot(val_accs, w))
    return (
        TaskHeads(heads, joint_head(list(heads.values()), tasks.table)),
        test_acc,
        val_acc,
        metrics,
    )
