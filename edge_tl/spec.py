"""The contract between workstation and device, as frozen dataclasses <-> JSON/TOML.

Torch-free: the device side reads these too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.errors import EdgeTLError
from edge_tl.labels import LABEL_RULE, UNKNOWN, check_label, check_labels  # the contract's

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

FORMAT_VERSION = 1
"""Bundle and run-folder format version; readers refuse other versions."""

INPUT_NAME = "image"
EMBEDDING = "embedding"
FEATURES_S8 = "features_s8"
FEATURES_S16 = "features_s16"
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


def _from_dict(cls: type, data: Any, where: str, fix: str = "write it as one") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing in one line naming the field: data
    that is not a mapping, an unknown or missing field, and a value of the wrong type
    (:func:`_fits`: the field's annotation, containers included, numbers finite)."""
    if not isinstance(data, dict):
        raise EdgeTLError(f"{where}: {_short(data)} is not a table of fields; {fix}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise EdgeTLError(
            f"{where}: unknown field(s) {', '.join(_short(k) for k in unknown)}; "
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
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise EdgeTLError(
                f"{where}: {name} = {_short(value)} is not {_describe(hints[name])}; {fix}"
            )
    return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON/TOML fits the annotation ``hint``: numbers are finite
    (true/false is not a number), a tuple or list is a list (of the given length for a
    fixed tuple), a dict has string keys, a nested dataclass is a table (its own
    ``from_dict`` checks it), ``Any`` is anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) or math.isfinite(value)  # a huge int overflows isfinite
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()
        )
    raise TypeError(f"no rule for annotation {hint!r}")  # pragma: no cover - a new field type


def _describe(hint: Any) -> str:
    """``hint`` in a user's words: "a number", "a list of 3 numbers", "a table of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
    }.get(hint, "a value")


def _plural(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "lists"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "tables"
    return {float: "finite numbers", int: "integers", str: "strings", bool: "true/false"}.get(
        hint, "values"
    )


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: one line, whatever the file holds."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4300 digits
        return "a number too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


FIX = "write it as one"


def _one_of(where: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise EdgeTLError(
            f"{where}: {name} = {_short(value)} is not one of {', '.join(map(str, allowed))}"
        )


@dataclass(frozen=True)
class Preprocess:
    """How the device turns an image file into the input tensor, as data.

    ``resize="squash"`` resizes the whole image to ``size x size`` (no crop: a defect at
    the border stays in view). Pixels (0..255, RGB) are normalised as ``(p - mean) / std``.
    ``draft``: a JPEG at least twice ``size`` on both sides is first decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (:func:`edge_tl.images.read_image` ``reduce_to``), faster
    but other pixels than a full decode; off unless the run chose it (older manifests have
    no such field and decode at full size).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bilinear"
    colour: str = "RGB"
    layout: str = "NCHW"
    draft: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_INPUT_SIZE:
            raise EdgeTLError(
                f"preprocess: size = {_short(self.size)} is not between 1 and {MAX_INPUT_SIZE}"
            )
        if not all(self.std):
            raise EdgeTLError(f"preprocess: std = {_short(self.std)} divides by zero")
        for name, allowed in PREPROCESS_CHOICES.items():
            _one_of("preprocess", name, getattr(self, name), allowed)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "preprocess", fix: str = FIX) -> Preprocess:
        p = _from_dict(cls, d, where, fix)
        return dataclasses.replace(p, mean=tuple(p.mean), std=tuple(p.std))


TEXT_POOLING = ("mean", "cls")
MAX_TEXT_LENGTH = 4096
"""The longest token sequence a text bundle may ask for."""


@dataclass(frozen=True)
class TextPreprocess:
    """How the device turns a text into the encoder's inputs and its output into an
    embedding, as data (a text bundle's ``preprocess``; ``modality`` tells it from an image
    bundle's :class:`Preprocess`).

    ``tokenizer`` is the bundle's Hugging Face ``tokenizer.json`` (read by the Rust
    ``tokenizers`` library on the device, so no torch and no ``transformers``): texts are
    truncated to ``max_length`` tokens, special tokens included, and a batch is padded to
    its longest text. The encoder takes ``inputs`` (int64 ``[batch, tokens]``) and gives
    ``hidden_output`` (float32 ``[batch, tokens, dim]``), pooled by ``pooling`` (``mean``
    over the attention mask, as sentence-transformers does; ``cls``: the first token) and
    L2-normalised when ``normalize``.
    """

    tokenizer: str
    max_length: int
    modality: str = "text"
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    hidden_output: str = "last_hidden_state"
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        _one_of("preprocess", "modality", self.modality, ("text",))
        _one_of("preprocess", "pooling", self.pooling, TEXT_POOLING)
        if not 2 <= self.max_length <= MAX_TEXT_LENGTH:
            raise EdgeTLError(
                f"preprocess: max_length = {_short(self.max_length)} is not between 2 and "
                f"{MAX_TEXT_LENGTH}"
            )
        if "input_ids" not in self.inputs or "attention_mask" not in self.inputs:
            raise EdgeTLError(
                f"preprocess: inputs = {_short(self.inputs)} must name input_ids and attention_mask"
            )

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], where: str = "preprocess", fix: str = FIX
    ) -> TextPreprocess:
        p = _from_dict(cls, d, where, fix)
        return dataclasses.replace(p, inputs=tuple(p.inputs))


def read_preprocess(d: Any, where: str, fix: str = FIX) -> Preprocess | TextPreprocess:
    """The ``preprocess`` table of a manifest or run: text when it says ``modality = "text"``,
    else an image's."""
    if isinstance(d, dict) and d.get("modality") == "text":
        return TextPreprocess.from_dict(d, where, fix)
    return Preprocess.from_dict(d, where, fix)


MAX_INPUT_SIZE = 4096
"""The largest input side a bundle may ask for, in pixels."""
PREPROCESS_CHOICES = {
    "resize": ("squash",),
    "interpolation": ("bilinear", "bicubic"),
    "colour": ("RGB",),
    "layout": ("NCHW",),
}
RECIPE_FORMATS = ("onnx", "openvino")
RECIPE_PRECISIONS = ("fp32", "fp16", "int8")
RECIPE_QUANT = ("none", "ort-static", "ort-dynamic", "nncf")
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

    ``quantization``: ``ort-static`` (QDQ, calibrated), ``ort-dynamic`` (text encoders only:
    activation ranges per batch at run time, no calibration) or ``nncf``. ``reduce_range``:
    7-bit weights for ONNX Runtime, its remedy for the u8s8 saturation of x86-64 CPUs
    without VNNI. ``pair_safe_weights``: ONNX Runtime static INT8 of an image backbone with
    every u8s8 GEMM convolution's weight scales set so that no pair of products can saturate
    (:func:`edge_tl.export.saturation.pair_safe`; 8-bit weights): the artifact is exact on
    every CPU with the fast u8s8 kernels, where ``session.x64quantprecision`` makes it exact
    with u8u8 kernels as slow as FP32 on AVX2.
    """

    name: str
    format: str
    precision: str
    quantization: str = "none"
    calibration_size: int = 100
    calibration_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = False
    pair_safe_weights: bool = False
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
        if self.pair_safe_weights and (
            self.quantization != "ort-static"
            or (self.activation_type, self.weight_type) != ("u8", "s8")
        ):
            raise EdgeTLError(
                f"recipe {self.name!r}: pair_safe_weights applies to ORT static INT8 with u8 "
                'activations and s8 weights (quantization = "ort-static"); remove it or use those'
            )
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
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EdgeTLError(f"{kind} {path}: cannot be read ({e.strerror}); fix the path") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError, huge ints
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise EdgeTLError(f"{kind} {path}: not valid TOML ({why}); fix the file") from None
    data.setdefault("name", path.stem)
    return _from_dict(cls, data, f"{kind} {path}")


def _data_dir(package: str, source_dir: str):
    """Package data folder (``edge_tl.recipes``); the source tree's folder in a checkout.

    A checkout (``pyproject.toml`` beside the package) reads its own ``export/``: an editable
    install maps ``edge_tl.recipes`` to the folder of the checkout it was installed from,
    which is another tree when this ``edge_tl`` is a second checkout on ``PYTHONPATH``."""
    tree = Path(__file__).resolve().parent.parent
    if (tree / "pyproject.toml").is_file() and (tree / source_dir).is_dir():
        return tree / source_dir
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

    def __post_init__(self) -> None:
        _one_of("artifact", "format", self.format, RECIPE_FORMATS)
        _one_of("artifact", "precision", self.precision, RECIPE_PRECISIONS)
        if not self.files:
            raise EdgeTLError("artifact: files is empty; it names the file the engine opens")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "artifact", fix: str = FIX) -> Artifact:
        a = _from_dict(cls, d, where, fix)
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

    def __post_init__(self) -> None:
        if self.seed < 0 or self.train_per_class < 0:
            raise EdgeTLError(
                f"split: seed = {_short(self.seed)} and train_per_class = "
                f"{_short(self.train_per_class)} must be 0 or more"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "split", fix: str = FIX) -> SplitRecord:
        return _from_dict(cls, d, where, fix)


SOURCE_KINDS = ("run", "imagenet", "pretrained")


@dataclass(frozen=True)
class Source:
    """Where a bundle came from: a training run (``kind="run"``), or a pretrained backbone
    exported without training: an image backbone with its ImageNet classifier
    (``kind="imagenet"``) or a text encoder without a head (``kind="pretrained"``)."""

    kind: str
    weights_sha256: str | None = None
    run: str | None = None
    strategy: str | None = None
    data: str | None = None
    split: SplitRecord | None = None
    pytorch_test_accuracy: float | None = None

    def __post_init__(self) -> None:
        _one_of("source", "kind", self.kind, SOURCE_KINDS)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "source", fix: str = FIX) -> Source:
        s = _from_dict(cls, d, where, fix)
        split = s.split
        if isinstance(split, dict):
            split = SplitRecord.from_dict(split, f"{where} split", fix)
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

    def __post_init__(self) -> None:
        _one_of("head", "kind", self.kind, ("linear",))
        _one_of("head", "fit_on", self.fit_on, ("artifact", "source"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "head", fix: str = FIX) -> HeadEntry:
        return _from_dict(cls, d, where, fix)


@dataclass(frozen=True)
class TaskEntry:
    """One task of a multi-task bundle: its name, its classes and its head (fitted on the
    bundle's shared artifact embeddings like the single head; see :class:`HeadEntry`)."""

    name: str
    labels: list[str]
    head: HeadEntry

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "task", fix: str = FIX) -> TaskEntry:
        t = _from_dict(cls, d, where, fix)
        check_label(t.name, f"{where} name", fix=fix)
        check_labels(t.labels, f"{where} {t.name} labels", fix=fix, written=True)
        return dataclasses.replace(t, head=HeadEntry.from_dict(t.head, f"{where} head", fix))


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

    def __post_init__(self) -> None:
        _one_of("self_test", "on_fail", self.on_fail, SELF_TEST_MODES)
        if not (-1 <= self.min_cosine <= 1 and -1 <= self.export_cosine <= 1):
            raise EdgeTLError(
                f"self_test: min_cosine = {_short(self.min_cosine)} and export_cosine = "
                f"{_short(self.export_cosine)} are cosines, in [-1, 1]"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "self_test", fix: str = FIX) -> SelfTestSpec:
        return _from_dict(cls, d, where, fix)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle (see DESIGN: the bundle contract).

    ``tasks`` (multi-task bundles only; absent from the file otherwise, and a bundle without
    it is one task): one :class:`TaskEntry` per task, each with its own head on the one
    shared artifact. ``labels`` and ``head`` are then the joint classes (one per combination
    of task classes, ``defective+mono``) and their head, which the export's accuracy
    control checked; the device answers per task.
    """

    format_version: int
    edge_tl_version: str
    backbone: str
    input_name: str
    preprocess: Preprocess | TextPreprocess
    outputs: dict[str, list[Any]]
    artifact: Artifact
    labels: list[str]
    head: HeadEntry | None
    metrics: dict[str, Any]
    source: Source
    files: dict[str, str]
    self_test: SelfTestSpec | None = None
    tasks: list[TaskEntry] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["tasks"] is None:  # a one-task manifest is written as before
            del d["tasks"]
        if d["preprocess"].get("draft") is False:  # so is one that decodes at full size
            del d["preprocess"]["draft"]
        return d

    @property
    def modality(self) -> str:
        """``text`` for a text encoder's bundle, else ``image``."""
        return "text" if isinstance(self.preprocess, TextPreprocess) else "image"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in ``d`` (parsed ``manifest.json``), every field checked.

        Raises:
            EdgeTLError: another format version, or a field missing, unknown, of the wrong
                type or against a rule (:meth:`check`); one line naming the field.
        """
        if not isinstance(d, dict):
            raise EdgeTLError(
                f"manifest.json holds {_short(d)}, not a table of fields; re-export the bundle"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeTLError(
                f"bundle format version {version!r} is not supported by this edge_tl "
                f"(reads version {FORMAT_VERSION}); re-export the bundle with this version"
            )
        where, fix = "manifest.json", "re-export the bundle"
        m = _from_dict(cls, d, where, fix)
        check_labels(m.labels, "labels of manifest.json", fix=fix, written=True)
        m = dataclasses.replace(
            m,
            preprocess=read_preprocess(m.preprocess, f"{where} preprocess", fix),
            artifact=Artifact.from_dict(m.artifact, f"{where} artifact", fix),
            head=None if m.head is None else HeadEntry.from_dict(m.head, f"{where} head", fix),
            source=Source.from_dict(m.source, f"{where} source", fix),
            self_test=None
            if m.self_test is None
            else SelfTestSpec.from_dict(m.self_test, f"{where} self_test", fix),
            tasks=None
            if m.tasks is None
            else [TaskEntry.from_dict(t, f"{where} task", fix) for t in m.tasks],
        )
        m.check()
        return m

    def check(self) -> None:
        """The rules across fields: every output is ``["batch", dims...]`` with an
        ``embedding``; every file is a relative path inside the bundle with a SHA-256; every
        file the manifest names is one of them (so its hash is checked).

        Raises:
            EdgeTLError: naming the first field that breaks a rule.
        """
        where = "manifest.json"
        if EMBEDDING not in self.outputs:
            raise EdgeTLError(f"{where}: outputs has no {EMBEDDING!r}; re-export the bundle")
        for name, shape in self.outputs.items():
            if not (
                len(shape) >= 2
                and shape[0] == "batch"
                and all(_fits(n, int) and n > 0 for n in shape[1:])
            ):
                raise EdgeTLError(
                    f"{where}: outputs {_short(name)} = {_short(shape)} is not "
                    "['batch', positive sizes...]"
                )
        for rel, digest in self.files.items():
            parts = rel.split("/")
            if rel.startswith("/") or "\\" in rel or "\0" in rel or {"", ".", ".."} & set(parts):
                raise EdgeTLError(
                    f"{where}: files names {_short(rel)}, which is not a relative path inside "
                    "the bundle; re-export the bundle"
                )
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise EdgeTLError(
                    f"{where}: files {_short(rel)} = {_short(digest)} is not a SHA-256 "
                    "(64 hex digits); re-export the bundle"
                )
        named = [*self.artifact.files]
        if isinstance(self.preprocess, TextPreprocess):
            named.append(self.preprocess.tokenizer)
        if self.head is not None:
            named += [self.head.file, *([self.head.exemplars] if self.head.exemplars else [])]
        if self.self_test is not None:
            named.append(self.self_test.file)
        for task in self.tasks or []:
            named += [task.head.file, *([task.head.exemplars] if task.head.exemplars else [])]
        if self.tasks is not None and (
            len(self.tasks) < 2 or len({t.name for t in self.tasks}) != len(self.tasks)
        ):
            raise EdgeTLError(
                f"{where}: tasks must name two or more different tasks; re-export the bundle"
            )
        for rel in named:
            if rel not in self.files:
                raise EdgeTLError(
                    f"{where}: {_short(rel)} is named but has no SHA-256 in files; "
                    "re-export the bundle"
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
