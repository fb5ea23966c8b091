"""``edge-tl train``: the training loop, checkpoints and the run folder.

One loop serves every strategy (see :mod:`edge_tl.train.policies`). When everything
before the first trainable block is frozen, the inputs of that block are computed once
(through ONNX Runtime: ~10x faster than PyTorch eager on a CPU) and training runs only
the rest; ``views > 1`` caches augmented copies too. Otherwise images are decoded by
DataLoader workers and augmented on the training device. On a GPU: bf16 autocast,
channels_last, optional ``torch.compile``; under ``torchrun`` the model is wrapped in
DistributedDataParallel and only rank 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
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
from edge_tl.progress import progress, say
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.preprocess import load_image, to_pixels
from edge_tl.spec import DEFAULT_STRATEGY, FORMAT_VERSION, STRATEGIES
from edge_tl.train import distributed as dist
from edge_tl.train.augment import Augment, augment, normalise, parse_augment
from edge_tl.train.cache import PrefixRunner, cache_activations
from edge_tl.train.plots import plot_history
from edge_tl.train.policies import Policy, make_policy
from edge_tl.train.policies import set_train_modes as _set_train_modes

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.npz"
CHECKPOINT_SUFFIX = ".checkpoint.pt"
BALANCE = ("none", "sampler", "loss")
BN_MOMENTUM = 0.1
PRECISIONS = ("auto", "fp32", "bf16")
# Settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("workers", "compile", "onnx_cache", "device")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are the ones ``edge-tl train`` uses (see README,
    "Training defaults", for the measurements behind them)."""

    backbone: str = DEFAULT_BACKBONE
    strategy: str = DEFAULT_STRATEGY
    weights: str | None = None
    epochs: int = 8
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    layer_decay: float = 0.8
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    dropout: float = 0.2
    train_stages: int = 2
    stages: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    unfreeze_every: int = 1
    patience: int = 4
    balance: str = "none"
    augment: str = "auto"
    views: int = 1
    cache: bool = True
    freeze_bn: bool = False
    test_frac: float = 0.2
    val_frac: float = 0.1
    train_per_class: int = 0
    seed: int = 0
    onnx_cache: bool = True
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    qat: bool = False

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        object.__setattr__(self, "params", tuple(self.params))
        if self.strategy not in STRATEGIES:
            raise EdgeTLError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        for name, choices in (("balance", BALANCE), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise EdgeTLError(
                    f"--{name} {getattr(self, name)!r} is not one of {', '.join(choices)}"
                )
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgeTLError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        for name in ("epochs", "train_stages", "unfreeze_every", "views"):
            if getattr(self, name) < 1:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("patience", "train_per_class", "workers"):
            if getattr(self, name) < 0:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.batch_size < 2:
            raise EdgeTLError("--batch-size must be at least 2 (batch norm needs two samples)")
        if not 0 < self.layer_decay <= 1:
            raise EdgeTLError("--layer-decay must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise EdgeTLError("--dropout must be in [0, 1)")
        if self.strategy == "selective" and not self.stages and not self.params:
            raise EdgeTLError(
                "selective needs --stages (e.g. 5,6) and/or --params (e.g. 'net.layer4.*')"
            )
        parse_augment(self.augment, grey=True)  # a typo fails now, not after caching
        if self.qat and self.strategy in ("linear-probe", "from-scratch"):
            raise EdgeTLError(
                f"--qat fine-tunes a pretrained backbone through INT8 rounding; it does not "
                f"apply to {self.strategy} (use finetune, full, selective, ...)"
            )
        if self.strategy == "linear-probe" and not self.cache:
            raise EdgeTLError("linear-probe always caches embeddings; drop --no-cache")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"], d["params"] = list(self.stages), list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        )


def run_splits(ds: Dataset, config: TrainConfig | dict[str, Any]) -> dict[str, np.ndarray]:
    """The run's train/val/test indices (``train_per_class`` caps the training split)."""
    c = config.to_dict() if isinstance(config, TrainConfig) else config
    splits = stratified_split(ds.labels, c["test_frac"], c["val_frac"], c["seed"])
    cap = c.get("train_per_class", 0)
    if cap:
        tr = splits["train"]
        keep = np.concatenate([tr[ds.labels[tr] == k][:cap] for k in range(len(ds.classes))])
        splits["train"] = np.sort(keep)
    return splits


def checkpoint_path(out: str | Path) -> Path:
    """Where an interrupted run's checkpoint lives: beside the run folder."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    force: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train on ``data`` (ImageFolder path or ``"elpv"``) and write the run folder ``out``.

    Args:
        force: replace an existing run folder (and discard an old checkpoint).
        resume: continue an interrupted run from ``OUT.checkpoint.pt``.
        on_epoch_end: called with each epoch's history row (rank 0 only).

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        EdgeTLError: bad data, settings, or a checkpoint that does not match.
    """
    out = Path(out)
    ctx = dist.setup()
    ckpt_file = checkpoint_path(out)
    if ctx.is_main:
        check_destination(out, force, "run folder")
        if not resume and ckpt_file.exists():
            if not force:
                raise EdgeTLError(
                    f"an interrupted run left {ckpt_file}; pass --resume to continue it or "
                    "--force to start over"
                )
            ckpt_file.unlink()
    state = _load_checkpoint(ckpt_file, config) if resume else None
    ds = open_dataset(data)
    splits = run_splits(ds, config)
    _check_splits(ds, splits)
    if state is not None and state["data_fingerprint"] != fingerprint(ds):
        raise EdgeTLError(
            f"{data} changed since {ckpt_file} was written; restore it or start over with --force"
        )
    torch.manual_seed(config.seed)
    features, _ = build(
        config.backbone, pretrained=config.strategy != "from-scratch", weights=config.weights
    )
    start = time.perf_counter()
    if config.strategy == "linear-probe":
        head, history, metrics = _linear_probe(features, ds, splits, config)
    else:
        head, history, metrics = _fit(
            features, ds, splits, config, ctx, ckpt_file, state, on_epoch_end
        )
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["n_train"], metrics["n_val"], metrics["n_test"] = (len(splits[k]) for k in splits)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if ctx.is_main:
        _write_run(out, force, data, ds, config, features, head, history, metrics)
        ckpt_file.unlink(missing_ok=True)
    dist.barrier(ctx)
    dist.teardown(ctx)
    return metrics


def _write_run(out, force, data, ds, config, features, head, history, metrics) -> None:
    from safetensors.torch import save_file

    from_package = ds.name == ELPV and not Path(data).exists()  # as open_dataset decides
    record = {
        "format_version": FORMAT_VERSION,
        "edge_tl_version": __version__,
        "backbone": config.backbone,
        "weights_sha256": weights_sha256(config.backbone, config.weights)
        if config.strategy != "from-scratch"
        else None,
        "data": ELPV if from_package else str(Path(data).resolve()),
        "data_name": ds.name,
        "data_fingerprint": fingerprint(ds),
        "labels": ds.classes,
        "config": config.to_dict(),
        "preprocess": dataclasses.asdict(features.spec.preprocess),
        "metrics": metrics,
    }
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


def _macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    f1 = []
    for k in range(n_classes):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1))


def _linear_probe(features: FeatureModel, ds: Dataset, splits, config: TrainConfig):
    """Embeddings computed once; a softmax head fitted on the training split, its L2
    penalty chosen on the validation split (the data fine-tuning uses for model selection),
    so every strategy in a comparison learns from the same images."""
    from edge_tl.runtime.heads import DEFAULT_L2_GRID

    pre = features.spec.preprocess
    emb = cache_activations(
        features, ds.paths, pre, None, desc="embedding images", use_onnx=config.onnx_cache
    )
    k = len(ds.classes)
    tr, va, te = splits["train"], splits["val"], splits["test"]
    if len(va):
        scores = []
        for l2 in DEFAULT_L2_GRID:
            h = LinearHead.fit(emb[tr], ds.labels[tr], k, l2=l2)
            p = h.predict_proba(emb[va])
            acc = float((p.argmax(1) == ds.labels[va]).mean())
            nll = float(-np.log(p[np.arange(len(va)), ds.labels[va]] + 1e-12).mean())
            scores.append((acc, -nll, l2))
        head = LinearHead.fit(emb[tr], ds.labels[tr], k, l2=max(scores)[2])
    else:
        head = LinearHead.fit(emb[tr], ds.labels[tr], k, seed=config.seed)
    test_y = ds.labels[te]
    test_pred = head.predict_proba(emb[te]).argmax(1)
    test_acc = float((test_pred == test_y).mean())
    fit_acc = float((head.predict_proba(emb[tr]).argmax(1) == ds.labels[tr]).mean())
    val_acc = (
        float((head.predict_proba(emb[va]).argmax(1) == ds.labels[va]).mean()) if len(va) else None
    )
    history = [{"step": 1, "l2": head.l2, "train_accuracy": fit_acc, "test_accuracy": test_acc}]
    return (
        head,
        history,
        {
            "strategy": "linear-probe",
            "test_accuracy": test_acc,
            "test_macro_f1": _macro_f1(test_pred, test_y, k),
            "val_accuracy": val_acc,
            "l2": head.l2,
            "trainable_parameters": int(head.weight.size + head.bias.size),
            "boundary": "embedding (cached)",
        },
    )


class Classifier(nn.Module):
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

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features.forward_from(a, self.boundary)))


class _Images(torch.utils.data.Dataset):
    """Decoded, resized pixels ``uint8[3, S, S]`` (augmentation happens on the device)."""

    def __init__(self, paths: list[str], pre) -> None:
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(to_pixels(load_image(self.paths[i]), self.pre))


class _Data:
    """Training batches and evaluation inputs, from a cache or from images."""

    def __init__(
        self, features, ds, splits, config: TrainConfig, policy: Policy, device, aug: Augment
    ) -> None:
        self.pre = features.spec.preprocess
        self.config, self.device, self.aug = config, device, aug
        self.paths = {k: [ds.paths[i] for i in v] for k, v in splits.items()}
        self.y = {k: ds.labels[v] for k, v in splits.items()}
        # QAT runs the frozen layers too, so their INT8 rounding reaches the trained ones
        self.cached = config.cache and policy.boundary is not None and not config.qat
        self.acts: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        if self.cached:
            self._cache(features, policy.boundary)
        self.cache_seconds = round(time.perf_counter() - t0, 1)

    def _cache(self, features, block: int) -> None:
        cfg, pre = self.config, self.pre
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        views = []
        with PrefixRunner(features, pre.size, block, cfg.onnx_cache) as run:  # exported once
            for v in range(cfg.views):
                desc = f"caching block {block} input" + (
                    f" (view {v + 1}/{cfg.views})" if cfg.views > 1 else ""
                )
                keys = ("train",) if v else ("train", "val", "test")
                for k in keys:
                    acts = run(self._input_batches(self.paths[k], gen if v else None, desc))
                    if k == "train":
                        views.append(acts)
                    else:
                        self.acts[k] = acts
        self.acts["train"] = np.stack(views)  # [views, n, ...]

    def _input_batches(self, paths, gen, desc) -> Iterator[np.ndarray]:
        loader = self._loader(paths, None)
        for px in progress(loader, desc=desc):
            x = px.float()
            if gen is not None:
                x = augment(x, self.aug, gen)
            yield normalise(x, self.pre.mean, self.pre.std).numpy()

    def _loader(self, paths, batches) -> torch.utils.data.DataLoader:
        cfg = self.config
        kw: dict[str, Any] = {"num_workers": cfg.workers, "pin_memory": self.device.type == "cuda"}
        if cfg.workers:
            kw["prefetch_factor"] = 4
            # workers start from a clean server process, not a fork of this one: by now the
            # process runs ONNX Runtime / OpenVINO thread pools, and forking a threaded
            # process can crash it (seen as segfaults in long test sessions)
            if "forkserver" in torch.multiprocessing.get_all_start_methods():
                # the server imports torch and this module once; workers fork from it cheaply
                torch.multiprocessing.set_forkserver_preload(["edge_tl.train.core"])
                kw["multiprocessing_context"] = "forkserver"
        if batches is None:
            return torch.utils.data.DataLoader(_Images(paths, self.pre), batch_size=64, **kw)
        return torch.utils.data.DataLoader(_Images(paths, self.pre), batch_sampler=batches, **kw)

    def epoch(
        self, batches: list[np.ndarray], gen: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple]:
        """``(x, y)`` on the device: this process's slice ``[rank::world]`` of each batch.

        Random draws (views, augmentation) are made per global batch from a seed drawn from
        ``gen``, so they do not depend on the number of processes.
        """
        y = torch.from_numpy(self.y["train"])
        local = [idx[rank::world] for idx in batches]
        seeds = [int(torch.randint(2**62, (1,), generator=gen)) for _ in batches]
        rows = slice(rank, None, world)
        if self.cached:
            acts = self.acts["train"]
            for idx, part, seed in zip(batches, local, seeds, strict=True):
                g = torch.Generator().manual_seed(seed)
                v = torch.randint(acts.shape[0], (len(idx),), generator=g).numpy()[rows]
                x = torch.from_numpy(acts[v, part]).to(self.device)
                yield self._prepare(x), y[part].to(self.device)
            return
        loader = self._loader(self.paths["train"], local)
        for idx, part, seed, px in zip(batches, local, seeds, loader, strict=True):
            g = torch.Generator().manual_seed(seed)
            x = augment(px.to(self.device, non_blocking=True).float(), self.aug, g, rows, len(idx))
            x = normalise(x, self.pre.mean, self.pre.std)
            yield self._prepare(x), y[part].to(self.device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def eval_batches(self, split: str) -> Iterator[torch.Tensor]:
        if self.cached:
            a = self.acts[split]
            for i in range(0, len(a), 128):
                yield self._prepare(torch.from_numpy(a[i : i + 128]).to(self.device))
            return
        for px in self._loader(self.paths[split], None):
            x = normalise(px.to(self.device).float(), self.pre.mean, self.pre.std)
            yield self._prepare(x)


def _param_groups(model: Classifier, policy: Policy, config: TrainConfig) -> list[dict]:
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


def _fit(
    features: FeatureModel,
    ds: Dataset,
    splits,
    config: TrainConfig,
    ctx,
    ckpt_file,
    state,
    on_epoch_end,
):
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
    data = _Data(features, ds, splits, config, policy, device, aug)
    n_classes = len(ds.classes)

    for m in features.modules():
        # TF-converted nets use momentum 0.01 (ImageNet-long schedules); a short transfer run
        # needs running statistics that follow the new data, as PyTorch's default 0.1 does.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = max(m.momentum, BN_MOMENTUM)
    model = Classifier(
        features, policy.boundary if data.cached else None, n_classes, config.dropout
    ).to(device)
    if config.channels_last:  # faster convolutions on CPUs (~25 %) and GPUs alike
        model = model.to(memory_format=torch.channels_last)
    qat = None
    if config.qat:
        from edge_tl.train.qat import enable_qat

        size = features.spec.preprocess.size
        qat = enable_qat(features, torch.zeros(2, 3, size, size, device=device))
    groups = _param_groups(model, policy, config)
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
    total = steps_per_epoch * config.epochs
    warmup = min(steps_per_epoch, total // 10 + 1)
    history: list[dict[str, Any]] = []
    best, best_key, step, first, bad = None, None, 0, 1, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best, step, bad = state["history"], state["best"], state["step"], state["bad"]
        best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        first = state["epoch"] + 1
    has_val = len(data.y["val"]) > 0
    stopped = None
    epochs = range(first, config.epochs + 1)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        _set_train_modes(features, policy, epoch, config.freeze_bn)
        batches = _epoch_batches(data.y["train"], config, gen, ctx.world)
        total_loss, correct, seen = 0.0, 0, 0
        steps = zip(batches, data.epoch(batches, gen, ctx.rank, ctx.world), strict=True)
        desc = f"epoch {epoch}/{config.epochs}"
        for idx, (xb, yb) in progress(steps, total=len(batches), desc=desc):
            local = idx[ctx.rank :: ctx.world]
            scale = (
                (step + 1) / warmup
                if step < warmup
                else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            )
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * scale
            with autocast():
                logits = train_model(xb)
                # Each process's share of the global-batch mean: N processes take the same
                # step as one process on the whole batch, even when slices differ in size.
                loss = loss_fn(logits.float(), yb) * (len(local) * ctx.world / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:  # gradual: stages not yet unfrozen stay put
                if g["unfreeze_epoch"] > epoch:
                    for p in g["params"]:
                        p.grad = None
            opt.step()
            step += 1
            total_loss += float(loss.detach()) * len(idx) / ctx.world
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(local)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, _ = _evaluate(model, data, "val", eval_loss, device, autocast)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(train_seconds, 2),
            "val_seconds": round(time.perf_counter() - t0 - train_seconds, 2),
        }
        history.append(row)
        key = (val_acc, -val_loss) if has_val else (epoch, 0.0)
        if best_key is None or key > best_key:
            best_key, best, bad = key, _cpu_state(model), 0
        else:
            bad += 1
        if config.patience and has_val and bad >= config.patience and epoch < config.epochs:
            stopped = epoch
        if ctx.is_main:
            _save_checkpoint(
                ckpt_file,
                {
                    "config": config.to_dict(),
                    "data_fingerprint": fingerprint(ds),
                    "epoch": epoch if stopped is None else config.epochs,
                    "model": _cpu_state(model),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "best": best,
                    "best_key": best_key,
                    "step": step,
                    "bad": bad,
                },
            )
            say(
                f"epoch {epoch}/{config.epochs}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_accuracy']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | "
                f"{row['seconds']:.1f}s" + ("  (best so far)" if bad == 0 else "")
            )
            if on_epoch_end is not None:
                on_epoch_end(row)
        if stopped is not None:
            say(
                f"early stop: no better validation score for {config.patience} epochs; "
                f"keeping the best epoch's weights"
            )
            break
    model.load_state_dict(best)
    _, test_acc, test_pred = _evaluate(model, data, "test", eval_loss, device, autocast)
    if qat is not None:  # test accuracy above is through the simulated INT8 rounding
        qat.remove()
    model.cpu().eval()
    head = LinearHead.from_logits_layer(
        model.head.weight.detach().float().numpy().copy(),
        model.head.bias.detach().float().numpy().copy(),
    )
    best_row = (
        max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"])) if has_val else history[-1]
    )
    metrics = {
        "strategy": config.strategy,
        "test_accuracy": test_acc,
        "test_macro_f1": _macro_f1(test_pred, data.y["test"], n_classes),
        "best_epoch": best_row["epoch"],
        "val_accuracy": best_row["val_accuracy"] if has_val else None,
        "epochs_run": len(history),
        "stopped_early_at": stopped,
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
    return head, history, metrics


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _is_grey_data(ds: Dataset, n: int = 16) -> bool:
    step = max(1, len(ds) // n)
    return all(load_image(p).mode == "L" for p in ds.paths[::step][:n])


@torch.no_grad()
def _evaluate(
    model: Classifier, data: _Data, split: str, loss_fn, device, autocast
) -> tuple[float, float, np.ndarray]:
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
    pred = out.argmax(1).numpy()
    return float(loss_fn(out, yt)), float((pred == y).mean()), pred


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a power cut leaves the previous checkpoint, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
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

    from edge_tl.backbones import load_strict

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
    return record, features.eval(), LinearHead.load(run / HEAD_FILE)


__all__ = [
    "STRATEGIES",
    "Classifier",
    "TrainConfig",
    "checkpoint_path",
    "load_run",
    "run_splits",
    "train",
]
