"""The contract between workstation and device, as frozen dataclasses <-> JSON/TOML.

Torch-free: the device side reads these too.

The records live in modules of one idea each, all re-exported here (import from
``edge_tl.spec``): :mod:`edge_tl.spec_manifest` (``manifest.json`` and its records),
:mod:`edge_tl.spec_preprocess` (preprocessing as data), :mod:`edge_tl.spec_recipes`
(export recipes and device profiles), :mod:`edge_tl.spec_fields` (a table onto a
dataclass, checked). This module keeps the names every command shares.
"""

from __future__ import annotations

from edge_tl.labels import LABEL_RULE, UNKNOWN, check_label, check_labels  # the contract's
from edge_tl.spec_manifest import (
    EMBEDDING,
    FEATURES_S8,
    FEATURES_S16,
    FORMAT_VERSION,
    INPUT_NAME,
    Artifact,
    HeadEntry,
    Manifest,
    SelfTestSpec,
    Source,
    SplitRecord,
    TaskEntry,
)
from edge_tl.spec_preprocess import Preprocess, TextPreprocess
from edge_tl.spec_recipes import (
    DeviceProfile,
    Recipe,
    builtin_profiles,
    builtin_recipes,
    load_profile,
    load_recipe,
)
from edge_tl.spec_recipes import _data_dir as _data_dir  # where the built-in files are

__all__ = [
    "EMBEDDING",
    "FEATURES_S8",
    "FEATURES_S16",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "INPUT_NAME",
    "LABEL_RULE",
    "STRATEGIES",
    "UNKNOWN",
    "Artifact",
    "DeviceProfile",
    "HeadEntry",
    "Manifest",
    "Preprocess",
    "Recipe",
    "SelfTestSpec",
    "Source",
    "SplitRecord",
    "TEXT_DEFAULT_STRATEGY",
    "TEXT_STRATEGIES",
    "TaskEntry",
    "TextPreprocess",
    "builtin_profiles",
    "builtin_recipes",
    "check_label",
    "check_labels",
    "load_profile",
    "load_recipe",
]

STRATEGIES = (
    "auto",
    "linear-probe",
    "finetune",
    "full",
    "selective",
    "bn-only",
    "bias-only",
    "gradual",
    "from-scratch",
)
"""Transfer strategies by name (``edge_tl.train.policies`` says what each trains; ``auto``
chooses one of linear-probe, finetune, full: ``edge_tl.train.auto``)."""
TEXT_STRATEGIES = ("linear-probe", "finetune", "full")
"""The strategies of text models (``edge_tl.train.text``): a head on frozen embeddings, the
last transformer layers + head, or every layer."""
DEFAULT_STRATEGY = "auto"
"""The image default (``edge_tl.train.auto``); text models default to ``finetune``."""
TEXT_DEFAULT_STRATEGY = "finetune"
"""The text default (``edge_tl.train.text``)."""
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".pgm",
    ".ppm",
)
"""Image files by extension, in any case, for every command (GIF: its first frame)."""
