"""The measurements behind ``edge-tl train``'s fine-tuning defaults, in one run.

Fine-tunes EfficientNet-Lite0 on NEU-DET and flowers5 (``--per-class`` training images per
class, the full held-out split) with the default settings and with one setting changed
at a time: trained stages, layer-wise learning-rate decay, the backbone/head
learning-rate ratio, and augmented cached views. Prints held-out accuracy per variant.

    .venv/bin/python benchmarks/defaults.py [--per-class 60] [--epochs 6]
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

VARIANTS = {
    "defaults (2 stages, decay 0.8, lr 1e-4 / 1e-3, 1 view)": {},
    "train_stages=1": {"train_stages": 1},
    "train_stages=3": {"train_stages": 3},
    "layer_decay=1.0": {"layer_decay": 1.0},
    "lr_backbone=1e-3 (= head)": {"lr_backbone": 1e-3},
    "views=4 (augmented cache)": {"views": 4},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--sets", default="neu_det,flowers5")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    sets = args.sets.split(",")
    acc: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS.items():
            for s in sets:
                print(f"{s}: {name} ...", file=sys.stderr, flush=True)
                cfg = TrainConfig(
                    strategy="finetune", epochs=args.epochs, train_per_class=args.per_class, **kw
                )
                m = train(Path(args.data) / s, Path(tmp) / "run", cfg, force=True)
                acc.setdefault(name, {})[s] = m["test_accuracy"]
    print(
        f"\nfinetune, EfficientNet-Lite0, {args.per_class} training images per class, "
        f"{args.epochs} epochs; held-out accuracy\n"
    )
    print("| variant | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, row in acc.items():
        print(f"| {name} | " + " | ".join(f"{row[s]:.4f}" for s in sets) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
