"""``edge-tl train``: strategies, the training loop, and the run folder."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl import __version__
from edge_tl.backbones import DEFAULT_BACKBONE, FeatureModel, build, get_spec, weights_sha256
from edge_tl.bundle import atomic_folder, check_destination, read_json
from edge_tl.data import ELPV, Dataset, fingerprint, open_dataset, stratified_split
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import FORMAT_VERSION
from edge_tl.train.cache import cache_activations
from edge_tl.train.plots import plot_history

STRATEGIES = ("linear-probe", "finetune")
DEFAULT_STRATEGY = "finetune"
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.npz"


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are the ones ``edge-tl train`` uses."""

    backbone: str = DEFAULT_BACKBONE
    strategy: str = DEFAULT_STRATEGY
    epochs: int = 8
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    train_stages: int = 2
    test_frac: float = 0.2
    val_frac: float = 0.1
    seed: int = 0
    onnx_cache: bool = True

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.strategy not in STRATEGIES:
            raise EdgeTLError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.epochs < 1 or self.train_stages < 1:
            raise EdgeTLError("--epochs and --train-stages must be at least 1")
        if self.batch_size < 2:
            raise EdgeTLError("--batch-size must be at least 2 (batch norm needs two samples)")


def train(data: str | Path, out: str | Path, config: TrainConfig, force: bool = False) -> dict:
    """Train on ``data`` (ImageFolder path or ``"elpv"``) and write the run folder ``out``.

    Returns:
        The metrics written to ``out/metrics.json``.
    """
    out = Path(out)
    check_destination(out, force, "run folder")
    ds = open_dataset(data)
    splits = stratified_split(ds.labels, config.test_frac, config.val_frac, config.seed)
    _check_splits(ds, splits)
    torch.manual_seed(config.seed)
    features, _ = build(config.backbone)
    pre = features.spec.preprocess
    start = time.perf_counter()
    if config.strategy == "linear-probe":
        head, history, metrics = _linear_probe(features, ds, splits, config)
    else:
        head, history, metrics = _finetune(features, ds, splits, config)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["n_train"], metrics["n_val"], metrics["n_test"] = (len(splits[k]) for k in splits)

    from_package = ds.name == ELPV and not Path(data).exists()  # as open_dataset decides
    record = {
        "format_version": FORMAT_VERSION,
        "edge_tl_version": __version__,
        "backbone": config.backbone,
        "weights_sha256": weights_sha256(config.backbone),
        "data": ELPV if from_package else str(Path(data).resolve()),
        "data_name": ds.name,
        "data_fingerprint": fingerprint(ds),
        "labels": ds.classes,
        "config": dataclasses.asdict(config),
        "preprocess": dataclasses.asdict(pre),
        "metrics": metrics,
    }
    from safetensors.torch import save_file

    with atomic_folder(out, force) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in features.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        head.save(tmp / HEAD_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(tmp / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        if "val_loss" in history[0]:
            title = f"{config.backbone} {config.strategy} on {ds.name}"
            plot_history(history, tmp / "curves.png", title)
    return metrics


def _check_splits(ds: Dataset, splits: dict[str, np.ndarray]) -> None:
    if len(ds.classes) < 2:
        raise EdgeTLError(f"{ds.name} has one class ({ds.classes[0]}); training needs at least two")
    for c, name in enumerate(ds.classes):
        for split in ("train", "test"):
            if not np.any(ds.labels[splits[split]] == c):
                n = int((ds.labels == c).sum())
                raise EdgeTLError(
                    f"class {name!r} has {n} image(s), too few for a {split} split; "
                    "add images (at least 5 per class) or change --test-frac"
                )


def _linear_probe(features: FeatureModel, ds: Dataset, splits, config: TrainConfig):
    pre = features.spec.preprocess
    emb = cache_activations(
        features, ds.paths, pre, None, desc="embedding images", use_onnx=config.onnx_cache
    )
    fit_idx = np.concatenate([splits["train"], splits["val"]])
    head = LinearHead.fit(emb[fit_idx], ds.labels[fit_idx], len(ds.classes), seed=config.seed)
    test_acc = _accuracy(head.predict_proba(emb[splits["test"]]), ds.labels[splits["test"]])
    fit_acc = _accuracy(head.predict_proba(emb[fit_idx]), ds.labels[fit_idx])
    history = [{"step": 1, "l2": head.l2, "train_accuracy": fit_acc, "test_accuracy": test_acc}]
    return head, history, {"strategy": "linear-probe", "test_accuracy": test_acc, "l2": head.l2}


def _accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean()) if len(y) else float("nan")


class _Suffix(nn.Module):
    """The trainable part: blocks from the freeze boundary on, the head conv, a linear head."""

    def __init__(self, features: FeatureModel, block: int, n_classes: int) -> None:
        super().__init__()
        self.features = features
        self.block = block
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(features.num_features, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features.forward_from(a, self.block)))


def _finetune(features: FeatureModel, ds: Dataset, splits, config: TrainConfig):
    starts = features.stage_starts
    if config.train_stages > len(starts):
        raise EdgeTLError(
            f"--train-stages {config.train_stages} is more than the {len(starts)} stages of "
            f"{config.backbone}; use 1..{len(starts)}"
        )
    block = starts[-config.train_stages]
    for p in features.parameters():
        p.requires_grad_(False)
    trainable = [*features.net._blocks[block:], features.net._conv_head, features.net._bn1]
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)

    pre = features.spec.preprocess
    order = np.concatenate([splits["train"], splits["val"], splits["test"]])
    acts = cache_activations(
        features,
        [ds.paths[i] for i in order],
        pre,
        block,
        desc=f"caching block {block} input",
        use_onnx=config.onnx_cache,
    )
    n_tr, n_va = len(splits["train"]), len(splits["val"])
    a = {"train": acts[:n_tr], "val": acts[n_tr : n_tr + n_va], "test": acts[n_tr + n_va :]}
    y = {k: ds.labels[splits[k]] for k in ("train", "val", "test")}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _Suffix(features, block, len(ds.classes)).to(device)
    backbone_params = [p for m in trainable for p in m.parameters()]
    decay = [p for p in backbone_params if p.ndim > 1]
    no_decay = [p for p in backbone_params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "lr": config.lr_backbone, "weight_decay": config.weight_decay},
            {"params": no_decay, "lr": config.lr_backbone, "weight_decay": 0.0},
            {
                "params": [model.head.weight],
                "lr": config.lr_head,
                "weight_decay": config.weight_decay,
            },
            {"params": [model.head.bias], "lr": config.lr_head, "weight_decay": 0.0},
        ]
    )
    steps_per_epoch = math.ceil(len(y["train"]) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = min(steps_per_epoch, total // 10 + 1)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    gen = torch.Generator().manual_seed(config.seed)
    xs = torch.from_numpy(a["train"])
    ys = torch.from_numpy(y["train"])

    history, best, best_key, step = [], None, None, 0
    for epoch in progress(range(1, config.epochs + 1), desc="fine-tuning epochs"):
        t0 = time.perf_counter()
        model.train()
        _freeze_bn_outside(model.features, block)
        perm = torch.randperm(len(ys), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            scale = (
                (step + 1) / warmup
                if step < warmup
                else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            )
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * scale
            xb, yb = xs[idx].to(device), ys[idx].to(device)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        val_loss, val_acc = _evaluate(model, a["val"], y["val"], loss_fn, device)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / len(ys),
            "train_accuracy": correct / len(ys),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        key = (val_acc, -val_loss) if len(y["val"]) else (epoch, 0.0)
        if best_key is None or key > best_key:
            best_key, best = key, copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    _, test_acc = _evaluate(model, a["test"], y["test"], loss_fn, device)
    model.cpu().eval()
    head = LinearHead.from_logits_layer(
        model.head.weight.detach().numpy().copy(), model.head.bias.detach().numpy().copy()
    )
    best_epoch = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["epoch"]
    metrics = {
        "strategy": "finetune",
        "test_accuracy": test_acc,
        "best_epoch": best_epoch,
        "val_accuracy": best_key[0] if len(y["val"]) else None,
        "freeze_boundary_block": block,
        "trainable_parameters": sum(p.numel() for p in backbone_params)
        + model.head.weight.numel()
        + model.head.bias.numel(),
    }
    return head, history, metrics


def _freeze_bn_outside(features: FeatureModel, block: int) -> None:
    """Frozen layers stay in eval mode (their batch-norm statistics must not move)."""
    for i, b in enumerate(features.net._blocks):
        if i < block:
            b.eval()
    features.net._bn0.eval()


@torch.no_grad()
def _evaluate(
    model: nn.Module, acts: np.ndarray, y: np.ndarray, loss_fn, device
) -> tuple[float, float]:
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    losses, correct = 0.0, 0
    for i in range(0, len(y), 128):
        xb = torch.from_numpy(acts[i : i + 128]).to(device)
        yb = torch.from_numpy(y[i : i + 128]).to(device)
        logits = model(xb)
        losses += float(loss_fn(logits, yb)) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    return losses / len(y), correct / len(y)


def load_run(run: str | Path) -> tuple[dict[str, Any], FeatureModel, LinearHead]:
    """Read a run folder: its record, the trained feature model and its head.

    Raises:
        EdgeTLError: not a run folder, or written by an incompatible edge_tl version.
    """
    run = Path(run)
    record = read_json(run, RUN_FILE, "run folder", "edge-tl train", "retrain")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgeTLError(
            f"run folder {run} has format version {version!r}, this edge_tl reads version "
            f"{FORMAT_VERSION}; retrain with this version or use the edge_tl that wrote it "
            f"({record.get('edge_tl_version', 'unknown')})"
        )
    from safetensors.torch import load_file

    for name in (WEIGHTS_FILE, HEAD_FILE):
        if not (run / name).is_file():
            raise EdgeTLError(f"run folder {run} has no {name}; copy the whole folder or retrain")
    features, _ = build(record["backbone"], pretrained=False)
    try:
        state = load_file(str(run / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeTLError(f"{run / WEIGHTS_FILE} cannot be read ({first}); retrain") from None
    try:
        missing, unexpected = features.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch; torch's message spans lines
        first = str(e).strip().splitlines()[-1].strip()
        raise EdgeTLError(
            f"{run / WEIGHTS_FILE} does not fit {record['backbone']} ({first}); retrain"
        ) from None
    if missing or unexpected:
        raise EdgeTLError(
            f"{run / WEIGHTS_FILE} does not fit {record['backbone']}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; retrain"
        )
    return record, features.eval(), LinearHead.load(run / HEAD_FILE)
