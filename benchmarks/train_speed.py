"""Boundary caching vs none: the same fine-tuning policy, side by side in one run.

Both runs train the same parameters (the last ``--train-stages`` stages + head of
EfficientNet-Lite0) on the same images with the same seed and no augmentation. "cached"
computes the frozen prefix's activations once (ONNX Runtime) and trains on them;
"uncached" decodes every image and runs the frozen prefix (PyTorch, no grad) on every step.
The ratio of seconds per epoch is the figure; absolute times depend on the machine.

    .venv/bin/python benchmarks/train_speed.py [--data ../shared/data/neu_det]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.train import TrainConfig, train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "neu_det"))
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-stages", default="1,2", help="policies to time, e.g. 1,2")
    args = p.parse_args()
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
