"""Backbone registry: name -> network with pretrained weights, preprocessing and feature taps.

Every backbone is split at the feature boundary (as timm's ``forward_features`` /
``forward_head``): ``forward`` returns the pooled embedding plus spatial feature maps at
strides 8 and 16; the ImageNet classifier is a separate linear layer. The network is seen
as ``stem -> blocks -> head modules -> pooling -> post-pool layers``, so every fine-tuning
policy (freeze up to a block, train norms only, ...) works on every backbone the same way.

The registry (:mod:`~edge_tl.backbones.registry`, :mod:`~edge_tl.backbones.text`), the
split (:mod:`~edge_tl.backbones.features`) and weights files
(:mod:`~edge_tl.backbones.weights`) live in modules of their own; everything is imported
from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from edge_tl.backbones.features import (
    FeatureModel,
    MultiSourceModel,
    _efficientnet,
    _torchvision,
)
from edge_tl.backbones.registry import (
    DEFAULT_BACKBONE,
    REGISTRY,
    BackboneSpec,
    get_spec,
    offline_backbones,
)
from edge_tl.backbones.text import (
    TEXT_REGISTRY,
    TextBackboneSpec,
    get_text_spec,
    is_text_backbone,
)
from edge_tl.backbones.weights import load_strict, read_state_dict, weights_sha256

__all__ = [
    "at_size",
    "DEFAULT_BACKBONE",
    "REGISTRY",
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
