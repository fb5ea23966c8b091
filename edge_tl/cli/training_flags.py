"""The training flags ``train`` and ``compare`` share, and how they become a
:class:`~edge_tl.train.TrainConfig` (field by field; the config checks the values)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING

from edge_tl.errors import EdgeTLError

if TYPE_CHECKING:
    from edge_tl.train import TrainConfig

__all__ = ["add_training_flags", "train_config"]


def add_training_flags(t: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare`` (defaults: see TrainConfig)."""
    t.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (default), efficientnet_lite1/2, resnet18, resnet50, "
        "mobilenet_v3_large, vgg16",
    )
    t.add_argument(
        "--weights",
        help="local pretrained weights (state dict .pth/.safetensors) for the backbone; "
        "needed for torchvision backbones without internet",
    )
    t.add_argument("--epochs", type=int, default=8, help="maximum epochs (default 8)")
    t.add_argument(
        "--train-stages",
        type=int,
        default=2,
        help="finetune/gradual: how many final stages train (default 2)",
    )
    t.add_argument(
        "--stages", default="", help="selective: stage indices, e.g. 5,6 (negative from the end)"
    )
    t.add_argument(
        "--params", default="", help="selective: parameter-name patterns, e.g. 'net.layer4.*'"
    )
    t.add_argument(
        "--unfreeze-every", type=int, default=1, help="gradual: epochs per unfrozen stage"
    )
    t.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    t.add_argument("--lr-head", type=float, default=1e-3, help="head learning rate (1e-3)")
    t.add_argument(
        "--lr-backbone", type=float, default=1e-4, help="last-stage learning rate (1e-4)"
    )
    t.add_argument(
        "--layer-decay",
        type=float,
        default=0.8,
        help="learning-rate factor per stage towards the input (default 0.8)",
    )
    t.add_argument(
        "--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)"
    )
    t.add_argument("--label-smoothing", type=float, default=0.1, help="in [0, 1) (default 0.1)")
    t.add_argument("--dropout", type=float, default=0.2, help="dropout before the head (0.2)")
    t.add_argument(
        "--patience",
        type=int,
        default=4,
        help="stop after this many epochs without a better validation score (0: never)",
    )
    t.add_argument(
        "--balance",
        default="none",
        choices=["none", "sampler", "loss"],
        help="class balancing for imbalanced data: sampler or loss weights (default none)",
    )
    t.add_argument(
        "--augment",
        default="auto",
        help="auto (default: inspection for grey data, natural for colour), inspection, "
        "natural, none; overrides like 'inspection,rotate=5,blur=0'",
    )
    t.add_argument(
        "--views",
        type=int,
        default=1,
        help="cached training: activations of this many views per image (1 clean + "
        "augmented ones; default 1)",
    )
    t.add_argument(
        "--no-cache",
        action="store_true",
        help="run the frozen prefix on every step instead of caching its activations",
    )
    t.add_argument(
        "--freeze-bn", action="store_true", help="keep every batch-norm layer's statistics"
    )
    t.add_argument("--test-frac", type=float, default=0.2, help="held-out test share (default 0.2)")
    t.add_argument("--val-frac", type=float, default=0.1, help="validation share (default 0.1)")
    t.add_argument(
        "--train-per-class",
        type=int,
        default=0,
        help="cap the training split per class (a CPU budget; default 0 = all)",
    )
    t.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on GPUs that support it, fp32 on CPUs",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the trained part")
    t.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory format on images"
    )
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    t.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware fine-tuning: train through simulated INT8 rounding (weights "
        "per channel, activations per tensor) so an INT8 export keeps the accuracy; runs "
        "uncached",
    )
    t.add_argument(
        "--no-onnx-cache",
        action="store_true",
        help="cache boundary activations with PyTorch instead of ONNX Runtime",
    )


def train_config(args: argparse.Namespace, strategy: str) -> TrainConfig:
    """The training flags as a :class:`~edge_tl.train.TrainConfig` (field by field)."""
    from edge_tl.train import TrainConfig

    try:
        stages = tuple(int(s) for s in args.stages.split(",") if s.strip())
    except ValueError:
        raise EdgeTLError(f"--stages {args.stages!r} must be integers like 5,6") from None
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(
        strategy=strategy,
        stages=stages,
        params=tuple(p.strip() for p in args.params.split(",") if p.strip()),
        cache=not args.no_cache,
        onnx_cache=not args.no_onnx_cache,
        channels_last=not args.no_channels_last,
    )
    return TrainConfig(**values)
