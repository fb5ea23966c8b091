"""Boundary caching vs none, and what a cached epoch costs beyond the trained layers' math.

Both runs train the same parameters (the last ``--train-stages`` stages + head of
EfficientNet-Lite0) on the same images with the same seed and no augmentation. "cached"
computes the frozen prefix's activations once (ONNX Runtime) and trains on them;
"uncached" decodes every image and runs the frozen prefix (PyTorch, no grad) on every step.
The ratio of seconds per epoch is the figure; absolute times depend on the machine.

``--ratio``: the demo's policy on ELPV (EfficientNet-Lite0, last stage + head trained from
cached block-15 activations, 75/25 split, seed 0) and, in the same process on the same cached
tensors, the trained layers' forward + loss + backward alone over the same index batches
(batch 32, the same number of steps, tensors sliced before the clock starts). The figure is
a whole cached epoch (training steps, validation, checkpoint, logging: the time between two
epochs' ends) over that bare forward + backward; the goal is <= 2x at any data set size.

    .venv/bin/python benchmarks/train_speed.py [--data ../shared/data/neu_det]
    .venv/bin/python benchmarks/train_speed.py --ratio [--epochs 3] [--ratio-data elpv]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.train import TrainConfig, train  # noqa: E402


def cached_epoch_ratio(
    data: str = "elpv",
    epochs: int = 3,
    repeats: int = 2,
    train_per_class: int = 0,
    test_frac: float = 0.25,
    val_frac: float = 0.1,
) -> dict:
    """One cached fine-tuning run (the demo's policy; ``epochs`` >= 2) and the trained
    layers' forward + backward alone on its cached tensors, ``repeats`` times; seconds per
    epoch of each, the fastest of the epochs / repeats (on a shared machine other work only
    adds time; the run's first epoch, which also warms up, is left out)."""
    import torch
    from torch import nn

    import edge_tl.train.loop as loop
    from edge_tl.backbones import build
    from edge_tl.train.policies import make_policy, set_train_modes

    cfg = TrainConfig(
        strategy="finetune",
        epochs=epochs,
        train_stages=1,
        test_frac=test_frac,
        val_frac=val_frac,
        seed=0,
        patience=0,
        train_per_class=train_per_class,
    )
    kept: dict = {}

    class Recorded(loop.TrainingData):  # keeps the run's cache for the bare measurement
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            kept["data"] = self

    ends: list[float] = []
    rows: list[dict] = []

    def on_epoch_end(row: dict) -> None:
        ends.append(time.perf_counter())
        rows.append(row)

    loop.TrainingData = Recorded
    try:
        with tempfile.TemporaryDirectory() as tmp:
            m = train(data, Path(tmp) / "run", cfg, on_epoch_end=on_epoch_end)
    finally:
        loop.TrainingData = Recorded.__mro__[1]
    td = kept["data"]
    acts, y = td.acts["train"][0], td.y["train"]
    batches = loop._epoch_batches(y, cfg, torch.Generator().manual_seed(cfg.seed), 1)
    features, _ = build(cfg.backbone, pretrained=True)
    policy = make_policy(features, cfg.strategy, cfg.train_stages)
    model = loop.ClassifierNet(features, policy.boundary, int(y.max()) + 1, cfg.dropout)
    model = model.to(memory_format=torch.channels_last).train()
    set_train_modes(features, policy, 1, cfg.freeze_bn)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    xs = [torch.from_numpy(acts[b]).contiguous(memory_format=torch.channels_last) for b in batches]
    ys = [torch.from_numpy(y[b]) for b in batches]
    bare = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for xb, yb in zip(xs, ys, strict=True):
            model.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
        bare.append(time.perf_counter() - t0)
    epoch_wall = np.diff(ends)  # epochs 2.. (the first also warms up)
    fastest = int(np.argmin(epoch_wall))
    return {
        "n_train": m["n_train"],
        "cached_images": sum(len(a) for k, a in td.acts.items() if k != "train") + len(acts),
        "steps": len(batches),
        "activation": tuple(acts.shape[1:]),
        "cache_seconds": m["cache_seconds"],
        "epoch_seconds": float(epoch_wall[fastest]),
        "loop_seconds": float(rows[1 + fastest]["seconds"]),  # the same epoch's parts
        "val_seconds": float(rows[1 + fastest]["val_seconds"]),
        "bare_seconds": float(np.min(bare)),
        "torch_threads": torch.get_num_threads(),
    }


def print_ratio(r: dict, data: str) -> None:
    print(
        f"\ncached last-stage epoch on {data}: {r['n_train']} training images, "
        f"{r['steps']} steps of batch 32, block-15 input {r['activation']}, "
        f"{r['torch_threads']} torch threads, CPU\n"
    )
    print(
        "| cache build s | epoch s (whole) | of which steps s | validation s | checkpoint, "
        "log s | fwd+bwd alone s | epoch / fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|")
    other = r["epoch_seconds"] - r["loop_seconds"] - r["val_seconds"]
    print(
        f"| {r['cache_seconds']:.1f} | {r['epoch_seconds']:.2f} | {r['loop_seconds']:.2f} | "
        f"{r['val_seconds']:.2f} | {other:.2f} | {r['bare_seconds']:.2f} | "
        f"{r['epoch_seconds'] / r['bare_seconds']:.2f}x |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "neu_det"))
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-stages", default="1,2", help="policies to time, e.g. 1,2")
    p.add_argument(
        "--ratio",
        action="store_true",
        help="only the cached-epoch vs forward+backward figure (on --ratio-data)",
    )
    p.add_argument("--ratio-data", default="elpv", help="data for --ratio (default elpv)")
    p.add_argument(
        "--ratio-per-class", type=int, default=0, help="--ratio: training images per class"
    )
    args = p.parse_args()
    if args.ratio:
        r = cached_epoch_ratio(args.ratio_data, max(2, args.epochs), 2, args.ratio_per_class)
        print_ratio(r, args.ratio_data)
        return 0
    if not Path(args.data).is_dir():
        print(f"no data at {args.data}; pass --data", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stages in (int(s) for s in args.train_stages.split(",")):
            for cache in (True, False):
                cfg = TrainConfig(
                    strategy="finetune",
                    train_stages=stages,
                    epochs=args.epochs,
                    patience=0,
                    augment="none",
                    cache=cache,
                    train_per_class=args.per_class,
                )
                name = f"stages{stages}-{'cached' if cache else 'uncached'}"
                print(f"training {name} ...", file=sys.stderr, flush=True)
                m = train(args.data, Path(tmp) / name, cfg)
                rows.append((stages, cache, m))
    print(
        f"\nfine-tuning EfficientNet-Lite0 on {Path(args.data).name}, "
        f"{rows[0][2]['n_train']} training images, {args.epochs} epochs, batch 32, CPU\n"
    )
    print(
        "| trained stages | boundary | cache build s | s / epoch | train img/s | speed-up "
        "per epoch | test acc |"
    )
    print("|---|---|---|---|---|---|---|")
    by_stage: dict[int, dict[bool, dict]] = {}
    for stages, cache, m in rows:
        by_stage.setdefault(stages, {})[cache] = m
    for stages, pair in by_stage.items():
        for cache in (False, True):
            m = pair[cache]
            ratio = pair[False]["seconds_per_epoch"] / m["seconds_per_epoch"]
            print(
                f"| {stages} | {m['boundary']} | {m['cache_seconds']:.1f} | "
                f"{m['seconds_per_epoch']:.1f} | {m['n_train'] / m['seconds_per_epoch']:.1f} | "
                f"{ratio:.1f}x | {m['test_accuracy']:.4f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
