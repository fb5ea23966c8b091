"""The contract between workstation and device, as frozen dataclasses <-> JSON/TOML.

Torch-free: the device side reads these too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.errors import EdgeTLError

__all__ = [
    "EMBEDDING",
    "FEATURES_S8",
    "FEATURES_S16",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "INPUT_NAME",
    "STRATEGIES",
    "Artifact",
    "DeviceProfile",
    "HeadEntry",
    "Manifest",
    "Preprocess",
    "Recipe",
    "SelfTestSpec",
    "Source",
    "SplitRecord",
    "builtin_profiles",
    "builtin_recipes",
    "load_profile",
    "load_recipe",
]

FORMAT_VERSION = 1
"""Bundle and run-folder format version; readers refuse other versions."""

INPUT_NAME = "image"
EMBEDDING = "embedding"
FEATURES_S8 = "features_s8"
FEATURES_S16 = "features_s16"
STRATEGIES = (
    "linear-probe",
    "finetune",
    "full",
    "selective",
    "bn-only",
    "bias-only",
    "gradual",
    "from-scratch",
)
"""Transfer strategies by name (``edge_tl.train.policies`` says what each trains)."""
DEFAULT_STRATEGY = "finetune"
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


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; an unknown or missing field is an error naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EdgeTLError(
            f"{where}: unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(names))}"
        )
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise EdgeTLError(f"{where}: missing field(s) {', '.join(missing)}")
    for f in dataclasses.fields(cls):  # plain scalar fields: the value's type, checked
        want = _SCALARS.get(str(f.type))
        value = data.get(f.name)
        if want and f.name in data and value is not None and not _is(value, want):
            raise EdgeTLError(
                f"{where}: {f.name} = {value!r} is not {_NAMES[want]}; write it as one"
            )
    return cls(**data)


_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_SCALARS.update({f"{k} | None": v for k, v in list(_SCALARS.items())})
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _is(value: Any, want: type) -> bool:
    if want is float:  # an integer is a number; true/false is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


@dataclass(frozen=True)
class Preprocess:
    """How the device turns an image file into the input tensor, as data.

    ``resize="squash"`` resizes the whole image to ``size x size`` (no crop: a defect at
    the border stays in view). Pixels (0..255, RGB) are normalised as ``(p - mean) / std``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bilinear"
    colour: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        p = _from_dict(cls, d, "preprocess")
        return dataclasses.replace(p, mean=tuple(p.mean), std=tuple(p.std))


RECIPE_FORMATS = ("onnx", "openvino")
RECIPE_PRECISIONS = ("fp32", "fp16", "int8")
RECIPE_QUANT = ("none", "ort-static", "nncf")
SELF_TEST_MODES = ("refuse", "warn", "off")


@dataclass(frozen=True)
class Recipe:
    """An export recipe (``export/*.toml``): what artifact to build and how to check it.

    Tolerances: the artifact's pooled embeddings must reach ``min_cosine`` (mean, vs FP32
    PyTorch on held-out images) and its top-1 accuracy may drop at most ``max_top1_drop``
    (a fraction). An INT8 artifact that misses them is escalated (``accuracy_control``) and
    refused when nothing tried reaches them. ``self_test`` says what the device does when its
    own kernels bend the bundled reference embeddings by more than ``self_test_margin``
    below the cosine measured at export.
    """

    name: str
    format: str
    precision: str
    quantization: str = "none"
    calibration_size: int = 100
    calibration_method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "u8"
    weight_type: str = "s8"
    overflow_fix: str = "enable"
    fast_bias_correction: bool = True
    nodes_to_exclude: tuple[str, ...] = ()
    parity_atol: float = 1e-4
    min_cosine: float = 0.9
    max_top1_drop: float = 0.01
    accuracy_control: bool = True
    max_excluded_nodes: int = 16
    calibration_subsets: int = 3
    self_test: str = "refuse"
    self_test_margin: float = 0.02
    input_size: int = 0
    engine_options: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        for attr, allowed in (
            ("format", RECIPE_FORMATS),
            ("precision", RECIPE_PRECISIONS),
            ("quantization", RECIPE_QUANT),
            ("activation_type", ("u8", "s8")),
            ("weight_type", ("u8", "s8")),
            ("calibration_method", ("minmax", "entropy", "percentile")),
            ("overflow_fix", ("enable", "disable", "first_layer_only")),
            ("self_test", SELF_TEST_MODES),
        ):
            value = getattr(self, attr)
            if value not in allowed:
                raise EdgeTLError(
                    f"recipe {self.name!r}: {attr} = {value!r} is not one of {', '.join(allowed)}"
                )
        if self.calibration_size < 1 or self.parity_atol <= 0:
            raise EdgeTLError(
                f"recipe {self.name!r}: calibration_size must be >= 1 and parity_atol > 0"
            )
        if not (0 <= self.min_cosine <= 1 and 0 <= self.max_top1_drop <= 1):
            raise EdgeTLError(
                f"recipe {self.name!r}: min_cosine and max_top1_drop are fractions in [0, 1]"
            )
        if self.calibration_subsets < 0 or self.max_excluded_nodes < 0:
            raise EdgeTLError(
                f"recipe {self.name!r}: calibration_subsets and max_excluded_nodes must be >= 0"
            )
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        if (self.precision == "int8") != (self.quantization != "none"):
            raise EdgeTLError(
                f"recipe {self.name!r}: precision int8 needs a quantization method and "
                "fp32/fp16 needs quantization = 'none'"
            )


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return _builtin("recipes", "export")


def load_recipe(name_or_path: str) -> Recipe:
    """Resolve a recipe by built-in name (``ort-int8``) or by path to a TOML file.

    Example:
        >>> load_recipe("onnx-fp32").format
        'onnx'
    """
    return _load_toml(Recipe, "recipe", name_or_path, "recipes", "export")


def _builtin(package: str, source_dir: str) -> list[str]:
    return sorted(
        p.name[:-5] for p in _data_dir(package, source_dir).iterdir() if p.name.endswith(".toml")
    )


def _load_toml(cls: type, kind: str, name_or_path: str, package: str, source_dir: str):
    """A built-in data file by name, or the user's ``.toml`` by path, mapped onto ``cls``."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        candidate = _data_dir(package, source_dir) / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise EdgeTLError(
                f"unknown {kind} {name_or_path!r}; use one of "
                f"{', '.join(_builtin(package, source_dir))} or a path to a .toml {kind} file"
            )
        path = Path(str(candidate))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgeTLError(f"{kind} {path}: not valid TOML ({e}); fix the file") from None
    data.setdefault("name", path.stem)
    return _from_dict(cls, data, f"{kind} {path}")


def _data_dir(package: str, source_dir: str):
    """Package data folder (``edge_tl.recipes``); the source tree's folder in a checkout."""
    try:
        root = importlib.resources.files(f"edge_tl.{package}")
        if root.is_dir() and any(p.name.endswith(".toml") for p in root.iterdir()):
            return root
    except ModuleNotFoundError:  # pragma: no cover - broken install
        pass
    return Path(__file__).resolve().parent.parent / source_dir  # pragma: no cover


@dataclass(frozen=True)
class Artifact:
    """The backbone artifact of a bundle and how to run it."""

    format: str  # "onnx" | "openvino"
    precision: str  # "fp32" | "fp16" | "int8"
    files: tuple[str, ...]  # first file is the one the engine opens
    recipe: str
    engine_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        a = _from_dict(cls, d, "artifact")
        return dataclasses.replace(a, files=tuple(a.files))


@dataclass(frozen=True)
class SplitRecord:
    """How a data set is split into train / val / test (see :func:`edge_tl.data.split`).

    Stratified per class by ``seed``; ``val_frac`` and ``test_frac`` are shares of the whole
    set; ``train_per_class`` caps the training split (0: no cap). ``data_fingerprint`` (the
    SHA-256 of class and file names, :func:`edge_tl.data.fingerprint`) says which data set
    the split belongs to: the same seed on other files is another split.
    """

    test_frac: float
    val_frac: float
    seed: int
    train_per_class: int = 0
    data_fingerprint: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitRecord:
        return _from_dict(cls, d, "split")


@dataclass(frozen=True)
class Source:
    """Where a bundle came from: a training run (``kind="run"``) or a pretrained backbone
    exported without training (``kind="imagenet"``)."""

    kind: str
    weights_sha256: str | None = None
    run: str | None = None
    strategy: str | None = None
    data: str | None = None
    split: SplitRecord | None = None
    pytorch_test_accuracy: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        s = _from_dict(cls, d, "source")
        split = SplitRecord.from_dict(s.split) if isinstance(s.split, dict) else s.split
        return dataclasses.replace(s, split=split)


@dataclass(frozen=True)
class HeadEntry:
    """The head exported with the bundle: a linear head in ``file`` (plain arrays),
    fitted on the artifact's own embeddings (``fit_on="artifact"``) or the run's own
    (``"source"``); ``exemplars`` names the artifact embeddings of a few training images
    per class that stand for the known classes when the device adds one."""

    kind: str
    file: str
    fit_on: str
    exemplars: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadEntry:
        return _from_dict(cls, d, "head")


@dataclass(frozen=True)
class SelfTestSpec:
    """The bundle's self-test: reference images with FP32 embeddings in ``file``; the device
    refuses (``on_fail="refuse"``) or warns when its own embeddings of them reach a mean
    cosine below ``min_cosine`` (``export_cosine`` was reached on ``export_host``)."""

    file: str
    min_cosine: float
    export_cosine: float
    export_host: str
    on_fail: str = "refuse"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelfTestSpec:
        return _from_dict(cls, d, "self_test")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle (see DESIGN: the bundle contract)."""

    format_version: int
    edge_tl_version: str
    backbone: str
    input_name: str
    preprocess: Preprocess
    outputs: dict[str, list[Any]]
    artifact: Artifact
    labels: list[str]
    head: HeadEntry | None
    metrics: dict[str, Any]
    source: Source
    files: dict[str, str]
    self_test: SelfTestSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeTLError(
                f"bundle format version {version!r} is not supported by this edge_tl "
                f"(reads version {FORMAT_VERSION}); re-export the bundle with this version"
            )
        m = _from_dict(cls, d, "manifest.json")
        return dataclasses.replace(
            m,
            preprocess=Preprocess.from_dict(m.preprocess),
            artifact=Artifact.from_dict(m.artifact),
            head=HeadEntry.from_dict(m.head) if m.head else None,
            source=Source.from_dict(m.source),
            self_test=SelfTestSpec.from_dict(m.self_test) if m.self_test else None,
        )


@dataclass(frozen=True)
class DeviceProfile:
    """A device profile (``devices/*.toml``): engine, device string, threads, recipe, budgets."""

    name: str
    engine: str
    device: str
    recipe: str
    threads: int = 0
    latency_budget_ms: float = 0.0  # p95 of batch-1 predict, end to end
    memory_budget_mb: float = 0.0  # peak resident memory of the process
    description: str = ""

    def __post_init__(self) -> None:
        if self.engine not in ("onnxruntime", "openvino"):
            raise EdgeTLError(
                f"device profile {self.name}: engine must be onnxruntime or openvino, "
                f"not {self.engine!r}"
            )
        if self.threads < 0 or self.latency_budget_ms < 0 or self.memory_budget_mb < 0:
            raise EdgeTLError(
                f"device profile {self.name}: threads and budgets must be >= 0 (0: none)"
            )


def builtin_profiles() -> list[str]:
    """Names of the device profiles shipped with the package."""
    return _builtin("profiles", "devices")


def load_profile(name_or_path: str) -> DeviceProfile:
    """Resolve a device profile by built-in name (``raspberry-pi-5``) or by TOML path."""
    return _load_toml(DeviceProfile, "device profile", name_or_path, "profiles", "devices")
