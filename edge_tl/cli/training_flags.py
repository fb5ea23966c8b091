"""The training flags ``train`` and ``compare`` share, and how they become a
:class:`~edge_tl.train.TrainConfig` (field by field; the config checks the values)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING

from edge_tl.errors import EdgeTLError

if TYPE_CHECKING:
    from edge_tl.train import TrainConfig
    from edge_tl.train.text_config import TextTrainConfig

__all__ = ["add_training_flags", "is_text_training", "text_train_config", "train_config"]

# Image-only flags and their defaults: given on text data, they are refused.
_IMAGE_ONLY = {
    "weights": None,
    "train_stages": 2,
    "image_size": None,
    "stages": "",
    "params": "",
    "unfreeze_every": 1,
    "balance": "none",
    "augment": "auto",
    "views": 1,
    "no_cache": False,
    "freeze_bn": False,
    "precision": "auto",
    "compile": False,
    "no_channels_last": False,
    "workers": 2,
    "qat": False,
    "no_onnx_cache": False,
    "tasks": None,
    "task_weights": None,
}
# Text-only flags (default None): given on image data, they are refused.
_TEXT_ONLY = ("text_column", "label_column", "train_layers", "test_data")


def add_training_flags(t: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare`` (defaults: see TrainConfig)."""
    t.add_argument(
        "--backbone",
        help="images: efficientnet_lite0 (default), efficientnet_lite1/2, mobilenet_v2, "
        "resnet18, resnet50, mobilenet_v3_large, vgg16; a+b (e.g. "
        "efficientnet_lite0+mobilenet_v2) concatenates their embeddings for --strategy "
        "linear-probe; text: all-minilm-l6-v2 (default on text data)",
    )
    t.add_argument(
        "--weights",
        help="local pretrained weights (state dict .pth/.safetensors) for the backbone; "
        "needed for torchvision backbones without internet",
    )
    t.add_argument("--epochs", type=int, help="maximum epochs (default 8; text 5)")
    t.add_argument(
        "--train-stages",
        type=int,
        default=_IMAGE_ONLY["train_stages"],
        help="finetune/gradual: how many final stages train (default 2)",
    )
    t.add_argument(
        "--image-size",
        type=int,
        default=_IMAGE_ONLY["image_size"],
        help="input side in pixels, e.g. 320 for 300-px images (default 0: the backbone's "
        "native size, 224 for efficientnet_lite0); export and the device resize to it too",
    )
    t.add_argument(
        "--stages",
        default=_IMAGE_ONLY["stages"],
        help="selective: stage indices, e.g. 5,6 (negative from the end)",
    )
    t.add_argument(
        "--params",
        default=_IMAGE_ONLY["params"],
        help="selective: parameter-name patterns, e.g. 'net.layer4.*'",
    )
    t.add_argument(
        "--unfreeze-every",
        type=int,
        default=_IMAGE_ONLY["unfreeze_every"],
        help="gradual: epochs per unfrozen stage",
    )
    t.add_argument(
        "--batch-size", type=int, default=32, help="images or texts per step (default 32)"
    )
    t.add_argument("--lr-head", type=float, help="head learning rate (default 1e-3; text 3e-3)")
    t.add_argument(
        "--lr-backbone",
        type=float,
        help="learning rate of the last stage / text layer (default 1e-4)",
    )
    t.add_argument(
        "--layer-decay",
        type=float,
        help="learning-rate factor per stage / text layer towards the input (default 0.8; "
        "text 0.9)",
    )
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (1e-4; text 0.01)")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="in [0, 1) (default 0.1)")
    t.add_argument("--dropout", type=float, help="dropout before the head (0.2; text 0.1)")
    t.add_argument(
        "--patience",
        type=int,
        help="stop after this many epochs without a better validation score (0: never; "
        "default 4, text 2)",
    )
    t.add_argument(
        "--balance",
        default=_IMAGE_ONLY["balance"],
        choices=["none", "sampler", "loss"],
        help="class balancing for imbalanced data: sampler or loss weights (default none)",
    )
    t.add_argument(
        "--augment",
        default=_IMAGE_ONLY["augment"],
        help="auto (default: inspection for grey data, natural for colour), inspection, "
        "natural, none; overrides like 'inspection,rotate=5,blur=0'",
    )
    t.add_argument(
        "--views",
        type=int,
        default=_IMAGE_ONLY["views"],
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
        default=_IMAGE_ONLY["precision"],
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on GPUs that support it, fp32 on CPUs",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the trained part")
    t.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory format on images"
    )
    t.add_argument(
        "--workers",
        type=int,
        default=_IMAGE_ONLY["workers"],
        help="DataLoader workers (default 2)",
    )
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
    multi = t.add_argument_group(
        "multi-task (one backbone, one head per task; DATA: elpv, a labels file "
        "path,<task>,... (.csv) or a folder <task 1 class>/<task 2 class>/<image>)"
    )
    multi.add_argument(
        "--tasks",
        help="tasks to learn, comma-separated: elpv's defect,type, the CSV's columns, or "
        "names for the folder levels (outermost first); one task trains an ordinary model "
        "on that label",
    )
    multi.add_argument(
        "--task-weights",
        help="loss weight per task, comma-separated (default: 1 each, the plain sum of Kurin "
        "et al., NeurIPS 2022)",
    )
    text = t.add_argument_group(
        "text data (a CSV/TSV, JSON Lines, <class>/*.txt folder, or a named set such as "
        "trec6:train; or --backbone all-minilm-l6-v2)"
    )
    text.add_argument("--text-column", help="column of the texts (default text)")
    text.add_argument("--label-column", help="column of the labels (default label)")
    text.add_argument(
        "--train-layers",
        type=int,
        help="finetune: how many final transformer layers train (default 2)",
    )
    text.add_argument(
        "--test-data",
        help="a separate held-out set to test on (e.g. trec6:test); DATA is then split "
        "into training and validation (--val-frac) only",
    )


def _given(args: argparse.Namespace) -> dict[str, object]:
    """The flags a user set (None: left to the config's default)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def is_text_training(args: argparse.Namespace) -> bool:
    """Whether ``train`` / ``compare`` take the text path: ``--backbone`` is a text encoder,
    or DATA is text (:func:`edge_tl.texts.is_text_source`).

    Raises:
        EdgeTLError: an image backbone on text data, or a text backbone on image data.
    """
    from edge_tl.backbones import REGISTRY, is_text_backbone
    from edge_tl.texts import is_text_source

    if getattr(args, "tasks", None):  # multi-task data are images (a .csv lists them)
        return False
    text_data = is_text_source(args.data)
    if args.backbone is not None and is_text_backbone(args.backbone) and not text_data:
        raise EdgeTLError(
            f"--backbone {args.backbone} is a text encoder, and {args.data} is not text data; "
            "pass a CSV/TSV, JSON Lines file, <class>/*.txt folder or a named set such as "
            "trec6:train, or an image backbone"
        )
    if text_data and args.backbone in REGISTRY:
        raise EdgeTLError(
            f"{args.data} is text data and --backbone {args.backbone} an image backbone; "
            "drop --backbone or pass a text encoder (all-minilm-l6-v2)"
        )
    return text_data or (args.backbone is not None and is_text_backbone(args.backbone))


def train_config(args: argparse.Namespace, strategy: str) -> TrainConfig:
    """The training flags as a :class:`~edge_tl.train.TrainConfig` (field by field)."""
    from edge_tl.train import TrainConfig

    text = [f"--{k.replace('_', '-')}" for k in _TEXT_ONLY if getattr(args, k, None) is not None]
    if text:
        verb = "applies" if len(text) == 1 else "apply"
        raise EdgeTLError(f"{', '.join(text)} {verb} to text data only; drop it for images")
    try:
        stages = tuple(int(s) for s in args.stages.split(",") if s.strip())
    except ValueError:
        raise EdgeTLError(f"--stages {args.stages!r} must be integers like 5,6") from None
    given = _given(args)
    values = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    if args.task_weights is not None and args.tasks is None:
        raise EdgeTLError("--task-weights weighs the --tasks; give --tasks too")
    if args.tasks is not None:
        from edge_tl.multitask import parse_tasks, parse_weights

        values["tasks"] = parse_tasks(args.tasks)
        if args.task_weights is not None:
            values["task_weights"] = parse_weights(args.task_weights, len(values["tasks"]))
    values.update(
        strategy=strategy,
        stages=stages,
        params=tuple(p.strip() for p in args.params.split(",") if p.strip()),
        cache=not args.no_cache,
        onnx_cache=not args.no_onnx_cache,
        channels_last=not args.no_channels_last,
    )
    return TrainConfig(**values)


def text_train_config(args: argparse.Namespace, strategy: str) -> TextTrainConfig:
    """The training flags as a :class:`~edge_tl.train.text_config.TextTrainConfig`.

    Raises:
        EdgeTLError: an image-only flag (``--augment``, ``--qat``, ...) was given, or a
            strategy text does not have.
    """
    from edge_tl.train.text_config import TextTrainConfig, check_text_strategy

    image = [
        f"--{k.replace('_', '-')}"
        for k, default in _IMAGE_ONLY.items()
        if getattr(args, k, default) != default
    ]
    if image:
        verb = "applies" if len(image) == 1 else "apply"
        raise EdgeTLError(
            f"{', '.join(image)} {verb} to images only; drop it for text data (text flags: "
            "--train-layers, --text-column, --label-column, --test-data)"
        )
    check_text_strategy(strategy)
    given = _given(args)
    values = {f.name: given[f.name] for f in fields(TextTrainConfig) if f.name in given}
    values["strategy"] = strategy
    return TextTrainConfig(**values)
