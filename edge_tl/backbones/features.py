"""A backbone split at its feature boundary (as timm's ``forward_features`` /
``forward_head``): :class:`FeatureModel` returns the pooled embedding plus spatial feature
maps at strides 8 and 16, and sees every network as ``stem -> blocks -> head modules ->
pooling -> post-pool layers``; :class:`MultiSourceModel` concatenates several. Here too:
where each architecture is cut (EfficientNet-Lite, torchvision's ResNet, MobileNet, VGG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edge_tl.backbones.registry import BackboneSpec

__all__ = ["FeatureModel", "MultiSourceModel"]


def _run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


class FeatureModel(nn.Module):
    """A backbone split at its feature boundary.

    ``forward(x)`` -> ``(embedding[N, D], features_s8, features_s16)``. ``blocks`` are the
    network's residual/inverted-residual blocks in order; ``stage_starts`` lists the first
    block of each stage (where the stride or the width changes), so a fine-tuning policy
    can freeze everything before a block and cache activations there. ``net`` is the
    original network, so state-dict keys are the source's keys prefixed with ``net.``.
    """

    def __init__(
        self,
        net: nn.Module,
        spec: BackboneSpec,
        stem: Sequence[nn.Module],
        blocks: Sequence[nn.Module],
        head: Sequence[nn.Module],
        post: Sequence[nn.Module],
        num_features: int,
        flatten_pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        # Plain lists: the modules are registered once, under ``net``.
        self.stem_modules = list(stem)
        self.blocks = list(blocks)
        self.head_modules = list(head)
        self.post_modules = list(post)
        self.num_features = num_features
        self._flatten_pool = flatten_pool
        strides, widths = self._probe(224)  # divisible by 32: exact strides
        self.block_strides = strides
        self.stage_starts = [
            i
            for i in range(len(blocks))
            if i == 0 or strides[i] != strides[i - 1] or widths[i] != widths[i - 1]
        ]
        self.tap_s8 = max(i for i, s in enumerate(strides) if s == 8)
        self.tap_s16 = max(i for i, s in enumerate(strides) if s == 16)

    @torch.no_grad()
    def _probe(self, size: int) -> tuple[list[int], list[int]]:
        """Stride and width after every block, measured with one small forward pass."""
        was_training = self.training
        self.eval()
        x = self.stem(torch.zeros(1, 3, size, size))
        strides, widths = [], []
        for b in self.blocks:
            x = b(x)
            strides.append(round(size / x.shape[-1]))
            widths.append(x.shape[1])
        self.train(was_training)
        return strides, widths

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.stem_modules, x)

    def stage_of(self, block: int) -> int:
        """Index of the stage that ``block`` belongs to."""
        return max(s for s, start in enumerate(self.stage_starts) if start <= block)

    def forward_until(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Activation at the input of ``block`` (the freeze boundary)."""
        return _run(self.blocks[:block], self.stem(x))

    def forward_from(self, x: torch.Tensor, block: int | None) -> torch.Tensor:
        """Pooled embedding from the activation at the input of ``block`` (``None``: image)."""
        if block is None:
            x, block = self.stem(x), 0
        return self.pool(_run(self.blocks[block:], x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.head_modules, x)
        x = self._flatten_pool(x) if self._flatten_pool else x.mean(dim=(2, 3))
        return _run(self.post_modules, x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        s8 = s16 = x
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == self.tap_s8:
                s8 = x
            if i == self.tap_s16:
                s16 = x
        return self.pool(x), s8, s16


class MultiSourceModel(nn.Module):
    """Several pretrained backbones on one input, their pooled embeddings concatenated: one
    graph, one embedding ``[N, sum(D_i)]`` (multi-source transfer), so heads and device
    verbs are unchanged.

    The input is preprocessed as the first backbone expects (``spec.preprocess``); each
    other backbone receives it re-normalised to its own mean/std (an affine per channel)
    and, when its input size differs, resized bilinearly inside the graph. The spatial maps
    (``features_s8``, ``features_s16``) are the first backbone's. ``source_dims`` gives
    each source's slice of the embedding, in order.
    """

    def __init__(self, parts: Sequence[FeatureModel], spec: BackboneSpec) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.spec = spec
        self.source_dims = [p.num_features for p in parts]
        self.num_features = sum(self.source_dims)
        a = parts[0].spec
        for i, p in enumerate(parts[1:], 1):
            mean_a, std_a = torch.tensor(a.mean), torch.tensor(a.std)
            mean_b, std_b = torch.tensor(p.spec.mean), torch.tensor(p.spec.std)
            # x_b = (pixel - mean_b) / std_b with pixel = x_a * std_a + mean_a
            self.register_buffer(f"scale{i}", (std_a / std_b).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(
                f"shift{i}", ((mean_a - mean_b) / std_b).view(1, 3, 1, 1), persistent=False
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb, s8, s16 = self.parts[0](x)
        embs = [emb]
        for i, part in enumerate(self.parts[1:], 1):
            xi = x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")
            if part.spec.size != self.spec.size:
                size = (part.spec.size, part.spec.size)
                xi = nn.functional.interpolate(xi, size=size, mode="bilinear", align_corners=False)
            embs.append(part(xi)[0])
        return torch.cat(embs, dim=1), s8, s16


def _efficientnet(spec: BackboneSpec) -> tuple[nn.Module, Callable[[nn.Module], tuple]]:
    from efficientnet_lite_pytorch import EfficientNet

    def split(net: nn.Module) -> tuple:
        fc = net._fc
        net._fc = nn.Identity()  # the classifier lives outside the feature model
        parts = (
            [net._conv_stem, net._bn0, net._swish],
            list(net._blocks),
            [net._conv_head, net._bn1, net._swish],
            [],
            net._conv_head.out_channels,
            None,
        )
        return fc, parts

    return EfficientNet.from_name(spec.arch), split


def _torchvision(spec: BackboneSpec) -> tuple[nn.Module, Callable[[nn.Module], tuple]]:
    import torchvision.models as tvm

    net = getattr(tvm, spec.arch)(weights=None)

    def split(net: nn.Module) -> tuple:
        if spec.arch.startswith("resnet"):
            fc = net.fc
            net.fc = nn.Identity()
            blocks = [
                b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer
            ]
            stem = [net.conv1, net.bn1, net.relu, net.maxpool]
            return fc, (stem, blocks, [], [], fc.in_features, None)
        if spec.arch == "mobilenet_v2":
            fc = net.classifier[1]
            f = net.features
            return fc, ([f[0]], list(f[1:-1]), [f[-1]], [], fc.in_features, None)
        if spec.arch == "mobilenet_v3_large":
            fc = net.classifier[3]
            f = net.features
            # The 960 -> 1280 pre-logit layer belongs to the embedding (as in timm).
            return fc, ([f[0]], list(f[1:-1]), [f[-1]], list(net.classifier[:2]), 1280, None)
        if spec.arch == "vgg16":
            fc = net.classifier[6]
            f = net.features
            cuts = [i + 1 for i, m in enumerate(f) if isinstance(m, nn.MaxPool2d)]
            blocks = [nn.Sequential(*f[a:b]) for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]

            def flatten_pool(x: torch.Tensor) -> torch.Tensor:
                return torch.flatten(net.avgpool(x), 1)

            return fc, ([], blocks, [], list(net.classifier[:6]), 4096, flatten_pool)
        raise AssertionError(spec.arch)

    return net, split
