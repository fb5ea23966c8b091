"""The one training loop every fine-tuning strategy runs (see :mod:`edge_tl.train.policies`).

AdamW with discriminative learning rates (each stage ``layer_decay`` times the next, no
weight decay on norms and biases), warm-up + cosine schedule, label smoothing, balanced
sampling or loss weights, bf16 autocast and channels_last where they pay, DDP under
torchrun (every process draws the same global batch and trains its slice), early stopping
on the validation split, and a checkpoint after every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl.backbones import FeatureModel
from edge_tl.data import Dataset, fingerprint
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.evaluation import macro_f1
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.preprocess import load_image
from edge_tl.train import distributed as dist
from edge_tl.train.adapt import LOOP_METHODS, TARGET, Adapter, TargetData
from edge_tl.train.augment import parse_augment
from edge_tl.train.batches import TrainingData
from edge_tl.train.config import TrainConfig
from edge_tl.train.epochs import Epochs
from edge_tl.train.policies import Policy, make_policy
from edge_tl.train.policies import set_train_modes as _set_train_modes
from edge_tl.train.runs import save_checkpoint

__all__ = ["BN_MOMENTUM", "ClassifierNet", "fit"]

_logger = logging.getLogger(__name__)

BN_MOMENTUM = 0.1


class ClassifierNet(nn.Module):
    """The trainable model: the backbone from the freeze boundary on, dropout, a linear head."""

    def __init__(
        self, features: FeatureModel, boundary: int | None, n_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.features = features
        self.boundary = boundary
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features.num_features, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, a: torch.Tensor, with_features: bool = False):
        """Logits; with ``with_features`` also the embeddings: ``(logits, embeddings)``."""
        f = self.features.forward_from(a, self.boundary)
        logits = self.head(self.dropout(f))
        return (logits, f) if with_features else logits


def _param_groups(model: ClassifierNet, policy: Policy, config: TrainConfig) -> list[dict]:
    """Discriminative learning rates; no weight decay on norms and biases."""
    groups = []
    for u in policy.units:
        if policy.pretrained:
            lr = config.lr_backbone * config.layer_decay**u.depth
        else:
            lr = config.lr_head  # random weights: nothing to preserve
        for decay in (True, False):
            ps = [p for _, p in u.params if (p.ndim > 1) == decay]
            if ps:
                wd = config.weight_decay if decay else 0.0
                groups.append(
                    {
                        "params": ps,
                        "lr": lr,
                        "weight_decay": wd,
                        "unit": u.name,
                        "unfreeze_epoch": u.unfreeze_epoch,
                    }
                )
    groups.append(
        {
            "params": [model.head.weight],
            "lr": config.lr_head,
            "weight_decay": config.weight_decay,
            "unit": "head",
            "unfreeze_epoch": 1,
        }
    )
    groups.append(
        {
            "params": [model.head.bias],
            "lr": config.lr_head,
            "weight_decay": 0.0,
            "unit": "head",
            "unfreeze_epoch": 1,
        }
    )
    return groups


def _epoch_batches(
    y: np.ndarray, config: TrainConfig, gen: torch.Generator, world: int
) -> list[np.ndarray]:
    n = len(y)
    if config.balance == "sampler":
        counts = np.bincount(y)
        w = torch.from_numpy(1.0 / counts[y])
        order = torch.multinomial(w, n, replacement=True, generator=gen).numpy()
    else:
        order = torch.randperm(n, generator=gen).numpy()
    bs = config.batch_size
    batches = [order[i : i + bs] for i in range(0, n, bs)]
    # batch norm needs two samples per process
    return [b for b in batches if len(b) >= 2 * world]


def fit(
    features: FeatureModel,
    ds: Dataset,
    splits: dict[str, np.ndarray],
    config: TrainConfig,
    ctx: dist.Context,
    ckpt_file: Path,
    state: dict[str, Any] | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    target: TargetData | None = None,
) -> tuple[LinearHead, list[dict[str, Any]], dict[str, Any]]:
    """Train ``features`` + a linear head with ``config``'s strategy; ``(head, history,
    metrics)``, the best validation epoch's weights loaded into ``features``. Each epoch ends
    with an atomic checkpoint (``state`` resumes from one). With ``config.adapt`` one of
    coral, dann, mcc, each step also draws a batch of ``target``'s unlabelled images and adds
    the method's loss (:class:`~edge_tl.train.adapt.Adapter`)."""
    policy = make_policy(
        features,
        config.strategy,
        config.train_stages,
        config.stages,
        config.params,
        config.unfreeze_every,
    )
    device = dist.device_for(ctx, config.device)
    grey = _is_grey_data(ds)
    aug = parse_augment(config.augment, grey)
    adapter = None
    if config.adapt in LOOP_METHODS and target is not None:
        if ctx.world > 1:
            raise EdgeTLError(f"--adapt {config.adapt} trains in one process; drop torchrun")
        adapter = Adapter(config.adapt, float(config.adapt_weight), features.num_features, device)
    unlabeled = {TARGET: target.unlabeled} if adapter is not None else None
    data = TrainingData(features, ds, splits, config, policy, device, aug, unlabeled)
    n_classes = len(ds.classes)
    objective = None  # several tasks: one head per task, a weighted sum of their losses
    if ds.tasks is not None:
        from edge_tl.train.multitask import TaskObjective

        weights = config.weights_per_task
        objective = TaskObjective(ds.tasks, weights, config.label_smoothing).to(device)
        eval_objective = TaskObjective(ds.tasks, weights).to(device)

    for m in features.modules():
        # TF-converted nets use momentum 0.01 (ImageNet-long schedules); a short transfer run
        # needs running statistics that follow the new data, as PyTorch's default 0.1 does.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = max(m.momentum, BN_MOMENTUM)
    model = ClassifierNet(
        features,
        policy.boundary if data.cached else None,
        n_classes if objective is None else objective.n_outputs,
        config.dropout,
    ).to(device)
    if config.channels_last:  # faster convolutions on CPUs (~25 %) and GPUs alike
        model = model.to(memory_format=torch.channels_last)
    qat = None
    if config.qat:
        from edge_tl.train.qat import enable_qat

        size = features.spec.preprocess.size
        qat = enable_qat(features, torch.zeros(2, 3, size, size, device=device))
    groups = _param_groups(model, policy, config)
    if adapter is not None and adapter.parameters():
        groups.append(
            {
                "params": adapter.parameters(),
                "lr": config.lr_head,
                "weight_decay": config.weight_decay,
                "unit": "domain_classifier",
                "unfreeze_epoch": 1,
            }
        )
    opt = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]
    weight = None
    if config.balance == "loss":
        counts = np.bincount(data.y["train"], minlength=n_classes).astype(np.float64)
        # inverse class frequency, mean 1 over classes (as scikit-learn's "balanced")
        balanced = counts.sum() / (n_classes * np.maximum(counts, 1))
        weight = torch.tensor(balanced, dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    if objective is not None:
        loss_fn, eval_loss = objective, eval_objective
    gen = torch.Generator().manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    train_model: nn.Module = dist.wrap(ctx, model, device)
    if config.compile:
        train_model = torch.compile(train_model)

    steps_per_epoch = max(
        1, len(_epoch_batches(data.y["train"], config, torch.Generator().manual_seed(0), ctx.world))
    )
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if adapter is not None:
            adapter.load_state_dict(state["adapter"])
    e = Epochs.start(steps_per_epoch, config.epochs, state, gen)
    has_val = len(data.y["val"]) > 0
    for epoch in range(e.first, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        _set_train_modes(features, policy, epoch, config.freeze_bn)
        batches = _epoch_batches(data.y["train"], config, gen, ctx.world)
        total_loss, correct, seen, adapt_loss = 0.0, 0, 0, 0.0
        steps = zip(batches, data.epoch(batches, gen, ctx.rank, ctx.world), strict=True)
        targets = None
        if adapter is not None:
            adapter.train()
            tb = Adapter.target_batches(
                len(target.unlabeled), len(batches), config.batch_size, config.seed, epoch
            )
            targets = data.inputs_of(TARGET, tb)
        desc = f"epoch {epoch}/{config.epochs}"
        for idx, (xb, yb) in progress(steps, total=len(batches), desc=desc):
            local = idx[ctx.rank :: ctx.world]
            e.set_lr(opt, base_lrs)
            with autocast():
                if targets is None:
                    logits = train_model(xb)
                else:  # one forward for both domains, as tllib does (shared BN batches)
                    both, f = train_model(torch.cat([xb, next(targets)]), with_features=True)
                    n = len(xb)
                    logits = both[:n]
                    extra = adapter.loss(
                        f[:n].float(), f[n:].float(), both[n:].float(), e.step / max(1, e.total)
                    )
                    adapt_loss += float(extra.detach()) * len(idx)
                # Each process's share of the global-batch mean: N processes take the same
                # step as one process on the whole batch, even when slices differ in size.
                loss = loss_fn(logits.float(), yb) * (len(local) * ctx.world / len(idx))
                minimised = loss if targets is None else loss + extra
            opt.zero_grad(set_to_none=True)
            minimised.backward()
            for g in opt.param_groups:  # gradual: stages not yet unfrozen stay put
                if g["unfreeze_epoch"] > epoch:
                    for p in g["params"]:
                        p.grad = None
            opt.step()
            e.step += 1
            total_loss += float(loss.detach()) * len(idx) / ctx.world
            if objective is None:
                correct += int((logits.argmax(1) == yb).sum())
            else:
                correct += objective.correct(logits, yb)
            seen += len(local)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, _ = _evaluate(model, data, "val", eval_loss, device, autocast, objective)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(train_seconds, 2),
            "val_seconds": round(time.perf_counter() - t0 - train_seconds, 2),
        }
        if adapter is not None:
            row["adapt_loss"] = adapt_loss / max(seen, 1)
        e.end(row, lambda: _cpu_state(model), has_val, config.patience, config.epochs)
        if ctx.is_main:
            ckpt = e.checkpoint(config, fingerprint(ds), epoch, _cpu_state(model), opt, gen)
            ckpt["adapter"] = adapter.state_dict() if adapter is not None else {}
            save_checkpoint(ckpt_file, ckpt)
            e.log(row, config.epochs)
            if on_epoch_end is not None:
                on_epoch_end(row)
        if e.stopping(config.patience):
            break
    model.load_state_dict(e.best)
    _, test_acc, test_pred = _evaluate(model, data, "test", eval_loss, device, autocast, objective)
    if qat is not None:  # test accuracy above is through the simulated INT8 rounding
        qat.remove()
    model.cpu().eval()
    head = LinearHead.from_logits_layer(
        model.head.weight.detach().float().numpy().copy(),
        model.head.bias.detach().float().numpy().copy(),
    )
    task_results = None
    if objective is not None:  # one head per task, and their joint head
        from edge_tl.train.multitask import task_metrics

        head = objective.split_head(head.weight, head.bias)
        task_results = task_metrics(ds.tasks, test_pred, data.y["test"])
    history = e.history
    metrics = {
        "strategy": config.strategy,
        "test_accuracy": test_acc,
        "test_macro_f1": macro_f1(test_pred, data.y["test"], n_classes)
        if objective is None
        else float(np.mean([r["test_macro_f1"] for r in task_results.values()])),
        "test_recall": _recall(test_pred, data.y["test"], ds.classes)
        if objective is None
        else None,
        **e.summary(has_val),
        "boundary": f"block {policy.boundary} input (cached)" if data.cached else "image",
        "freeze_boundary_block": policy.boundary,
        "cached_views": config.views if data.cached else 0,
        "cache_seconds": data.cache_seconds,
        "augment": dataclasses.asdict(aug) if (not data.cached or config.views > 1) else None,
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in history])), 2),
        "trainable_parameters": sum(p.numel() for p in policy.trainable)
        + model.head.weight.numel()
        + model.head.bias.numel(),
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "world_size": ctx.world,
        "qat": config.qat,
    }
    if adapter is not None:
        metrics["adapt_loss_last_epoch"] = history[-1]["adapt_loss"]
    if task_results is not None:
        metrics["tasks"] = task_results
        metrics["task_weights"] = list(config.weights_per_task)
    return head, history, metrics


def _recall(pred: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Recall of each class present in ``y`` (for defect data, the defective class's recall
    is the share of bad parts caught)."""
    return {c: float((pred[y == k] == k).mean()) for k, c in enumerate(classes) if (y == k).any()}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _is_grey_data(ds: Dataset, n: int = 16) -> bool:
    step = max(1, len(ds) // n)
    return all(load_image(p).mode == "L" for p in ds.paths[::step][:n])


@torch.no_grad()
def _evaluate(
    model: ClassifierNet, data: TrainingData, split: str, loss_fn, device, autocast, objective=None
) -> tuple[float, float, np.ndarray]:
    """``(loss, accuracy, predictions)`` on a split; with a multi-task ``objective`` the
    weighted mean task accuracy and predictions ``[N, n_tasks]``."""
    y = data.y[split]
    if len(y) == 0:
        return float("nan"), float("nan"), np.zeros(0, np.int64)
    model.eval()
    logits = []
    for xb in data.eval_batches(split):
        with autocast():
            logits.append(model(xb).float().cpu())
    out = torch.cat(logits)
    yt = torch.from_numpy(y)
    if objective is not None:
        pred = objective.predict(out)
        return float(loss_fn(out, yt.to(out.device))), objective.accuracy(pred, y), pred
    pred = out.argmax(1).numpy()
    return float(loss_fn(out, yt)), float((pred == y).mean()), pred
