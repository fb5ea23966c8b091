"""What both training loops keep across epochs (:mod:`edge_tl.train.loop` for images,
:mod:`edge_tl.train.text_loop` for text encoders): the warm-up + cosine learning-rate
schedule, the history, the best validation epoch's weights and early stopping, what a
checkpoint holds of them and how a run resumes from one.

Example:
    >>> import torch
    >>> e = Epochs.start(steps_per_epoch=10, epochs=3, state=None, gen=torch.Generator())
    >>> e.total, e.warmup, e.first
    (30, 4, 1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Epochs"]

_logger = logging.getLogger(__name__)


@dataclass
class Epochs:
    """Where training stands between epochs: ``step`` optimizer steps of ``total`` taken
    (the first ``warmup`` warm up), the epochs' ``history``, the ``best`` weights and their
    ``best_key``, ``bad`` epochs since, ``first`` the next epoch to run, ``stopped`` the epoch
    that stopped early (or None)."""

    total: int
    warmup: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, ...] | None = None
    step: int = 0
    first: int = 1
    bad: int = 0
    stopped: int | None = None

    @classmethod
    def start(
        cls,
        steps_per_epoch: int,
        epochs: int,
        state: dict[str, Any] | None,
        gen: torch.Generator,
    ) -> Epochs:
        """A schedule of ``epochs`` (warm-up: a tenth of it, one epoch at most); resumed
        after the last epoch of the checkpoint ``state`` (restoring ``gen`` and torch's
        random state) when one is given."""
        total = steps_per_epoch * epochs
        e = cls(total, min(steps_per_epoch, total // 10 + 1))
        if state is not None:
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            e.history, e.best, e.step = state["history"], state["best"], state["step"]
            e.bad = state["bad"]
            e.best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
            e.first = state["epoch"] + 1
        return e

    def set_lr(self, opt: torch.optim.Optimizer, base_lrs: list[float]) -> None:
        """The rates of step ``step``: linear warm-up, then cosine decay to zero."""
        step, warmup, total = self.step, self.warmup, self.total
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        )
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * scale

    def end(
        self,
        row: dict[str, Any],
        weights: Callable[[], dict[str, torch.Tensor]],
        has_val: bool,
        patience: int,
        epochs: int,
    ) -> None:
        """Record the epoch ``row``; keep ``weights()`` when it scores best so far
        (validation accuracy, then lower loss; without a validation split the latest epoch);
        stop early after ``patience`` epochs without a better one."""
        epoch = row["epoch"]
        self.history.append(row)
        key = (row["val_accuracy"], -row["val_loss"]) if has_val else (epoch, 0.0)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best, self.bad = key, weights(), 0
        else:
            self.bad += 1
        if patience and has_val and self.bad >= patience and epoch < epochs:
            self.stopped = epoch

    def checkpoint(
        self,
        config: Any,
        fingerprint: str,
        epoch: int,
        model: dict[str, torch.Tensor],
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
    ) -> dict[str, Any]:
        """What a checkpoint after ``epoch`` holds (a stopped run counts as finished)."""
        return {
            "config": config.to_dict(),
            "data_fingerprint": fingerprint,
            "epoch": epoch if self.stopped is None else config.epochs,
            "model": model,
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "best_key": self.best_key,
            "step": self.step,
            "bad": self.bad,
        }

    def log(self, row: dict[str, Any], epochs: int) -> None:
        """One line for the epoch ``row``."""
        _logger.info(
            f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} acc "
            f"{row['val_accuracy']:.4f} | "
            f"{row['seconds']:.1f}s" + ("  (best so far)" if self.bad == 0 else "")
        )

    def stopping(self, patience: int) -> bool:
        """True when this epoch stopped early (said in the log)."""
        if self.stopped is not None:
            _logger.info(
                f"early stop: no better validation score for {patience} epochs; "
                "keeping the best epoch's weights"
            )
        return self.stopped is not None

    def summary(self, has_val: bool) -> dict[str, Any]:
        """The run's metrics about its epochs: the best one, how many ran, the early stop."""
        best = (
            max(self.history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
            if has_val
            else self.history[-1]
        )
        return {
            "best_epoch": best["epoch"],
            "val_accuracy": best["val_accuracy"] if has_val else None,
            "epochs_run": len(self.history),
            "stopped_early_at": self.stopped,
        }
