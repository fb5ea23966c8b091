"""``edge-tl train``: data, split and backbone in; a run folder out.

The strategies share one loop (:mod:`edge_tl.train.loop`) except the linear probe
(:mod:`edge_tl.train.probe`). When everything before the first trainable block is frozen,
the inputs of that block are computed once (through ONNX Runtime: ~10x faster than PyTorch
eager on a CPU) and training runs only the rest. On a GPU: bf16 autocast, channels_last,
optional ``torch.compile``; under ``torchrun`` the model is wrapped in
DistributedDataParallel and only rank 0 writes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_tl.backbones import at_size, build
from edge_tl.bundle import check_destination
from edge_tl.data import Dataset, fingerprint, open_dataset, split
from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED
from edge_tl.train import distributed as dist
from edge_tl.train.adapt import embed_domains, finish, open_target
from edge_tl.train.config import TrainConfig
from edge_tl.train.loop import fit
from edge_tl.train.probe import linear_probe
from edge_tl.train.runs import checkpoint_path, load_checkpoint, write_run

__all__ = ["train"]


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    force: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Train on ``data`` (ImageFolder path or ``"elpv"``) and write the run folder ``out``.

    Args:
        force: replace an existing run folder (and discard an old checkpoint).
        resume: continue an interrupted run from ``OUT.checkpoint.pt``.
        on_epoch_end: called with each epoch's history row (rank 0 only).
        skip_bad: leave bad image files out (listed in the metrics' ``skipped``; the
            export leaves the same files out) instead of stopping on the first.

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        EdgeTLError: bad data, settings, or a checkpoint that does not match.
    """
    if config.strategy == "auto":  # candidates, each an ordinary run (edge_tl.train.auto)
        from edge_tl.train.auto import train_auto

        return train_auto(data, out, config, force, resume, on_epoch_end, skip_bad)
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
    state = load_checkpoint(ckpt_file, config) if resume else None
    ds = open_dataset(data, skip_bad, tasks=config.tasks or None)
    splits = split(ds, config.split)
    _check_splits(ds, splits)
    target = None
    if config.target_unlabeled is not None:
        if ds.modality != "image":  # pragma: no cover - the CLI routes text elsewhere
            raise EdgeTLError("domain adaptation (--target-unlabeled) is for image data")
        target = open_target(config.target_unlabeled, ds.classes, config.seed)
    if state is not None and state["data_fingerprint"] != fingerprint(ds):
        raise EdgeTLError(
            f"{data} changed since {ckpt_file} was written; restore it or start over with --force"
        )
    torch.manual_seed(config.seed)
    features, _ = build(
        config.backbone, pretrained=config.strategy != "from-scratch", weights=config.weights
    )
    at_size(features, config.image_size)
    start = time.perf_counter()
    before = None
    if target is not None and config.adapt != "adabn" and ctx.is_main:
        before = embed_domains(features, ds.subset(splits["test"]), target, config.onnx_cache)
    if config.strategy == "linear-probe":
        head, history, metrics = linear_probe(features, ds, splits, config)
    else:
        head, history, metrics = fit(
            features, ds, splits, config, ctx, ckpt_file, state, on_epoch_end, target
        )
    draw, extra = None, None
    if target is not None and ctx.is_main:
        adapted, draw = finish(features, head, ds.subset(splits["test"]), target, config, before)
        metrics.update(adapted)
        extra = {"target": {**target.record(), "adapt": config.adapt}}
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["n_train"], metrics["n_val"], metrics["n_test"] = (len(splits[k]) for k in splits)
    if ds.skipped:
        metrics[SKIPPED] = [s.to_dict() for s in ds.skipped]
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if ctx.is_main:
        write_run(out, force, data, ds, config, features, head, history, metrics, extra, draw)
        ckpt_file.unlink(missing_ok=True)
    dist.barrier(ctx)
    dist.teardown(ctx)
    return metrics


def _check_splits(ds: Dataset, splits: dict[str, np.ndarray]) -> None:
    if len(ds.classes) < 2:
        raise EdgeTLError(f"{ds.name} has one class ({ds.classes[0]}); training needs at least two")
    for c, name in enumerate(ds.classes):
        for part in ("train", "test"):
            if not np.any(ds.labels[splits[part]] == c):
                n = int((ds.labels == c).sum())
                raise EdgeTLError(
                    f"class {name!r} has {n} image(s), too few for a {part} split; "
                    "add images (at least 5 per class) or change --test-frac"
                )
