"""Export recipes (``export/*.toml``) and device profiles (``devices/*.toml``): data files
mapped onto one frozen dataclass each, by built-in name or by path.

Torch-free, a floor module; re-exported by :mod:`edge_tl.spec`.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edge_tl.errors import EdgeTLError
from edge_tl.spec_fields import _from_dict

__all__ = [
    "DeviceProfile",
    "Recipe",
    "builtin_profiles",
    "builtin_recipes",
    "load_profile",
    "load_recipe",
]

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
