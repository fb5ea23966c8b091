"""The fidelity report of a bundle: its schema and its three renderings.

Every export measures its artifact against FP32 PyTorch and writes the result into the
bundle as ``fidelity.json`` (this schema), ``fidelity.md`` (tables) and ``fidelity.png``
(figures). The export writes it; ``edge-tl inspect``, the demo and scripts read it back
with :func:`read_report`. Torch-free; the figure needs matplotlib and is skipped without it.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.plots import pyplot, save

__all__ = [
    "REPORT_FILE",
    "ArtifactRow",
    "ControlStep",
    "FidelityReport",
    "Tolerance",
    "markdown",
    "read_report",
    "table",
    "write_report",
]

REPORT_FILE = "fidelity.json"


@dataclass(frozen=True)
class Tolerance:
    """What the recipe asked of the artifact: mean embedding cosine vs FP32 at least
    ``min_cosine``, top-1 accuracy at most ``max_top1_drop`` (a fraction) below FP32."""

    min_cosine: float
    max_top1_drop: float


@dataclass(frozen=True)
class ArtifactRow:
    """One model measured on the check images against FP32 PyTorch.

    ``accuracy_fp32_head``: with the run's own head, trained in PyTorch on FP32;
    ``accuracy_own_head``: with a head fit on this row's embeddings of the training split
    (the FP32 rows share the one fit on ONNX FP32 embeddings); None without labels. Cosines and
    agreement are fractions (agreement None without a head: a pretrained text encoder);
    ``size_mb`` in MB (1e6 bytes); ``latency_ms`` the batch-1 median in milliseconds.
    """

    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None
    accuracy_own_head: float | None = None
    accuracy_fp32_head: float | None = None
    size_mb: float = 0.0
    latency_ms: float = 0.0


@dataclass(frozen=True)
class ControlStep:
    """One try of accuracy control: the settings, what they reached, whether it passed.

    ``top1_drop`` is the larger drop of the head that ships and of the run's own head
    (a fraction; None without labels); ``seconds`` the try's wall time.
    """

    step: str
    settings: dict[str, Any]
    cosine_mean: float
    cosine_min: float
    accuracy: float | None
    top1_drop: float | None
    passed: bool
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class FidelityReport:
    """``fidelity.json``: the artifact against FP32 PyTorch, on the user's own images.

    ``artifacts`` holds ``pytorch-fp32``, ``onnx-fp32`` and the recipe's artifact, in that
    order. ``per_class`` maps each row to per-class accuracy (None without labels).
    ``sensitive_layers`` ranks layers (convolutions, a text encoder's MatMuls) by the cosine
    they win back in FP32 (``gain``) or lose when they alone run in INT8 (``loss``; ORT INT8
    accuracy control); ``calibration_sensitivity`` is the
    accuracy and cosine over disjoint calibration subsets (INT8), or None.
    """

    backbone: str
    recipe: str
    verdict: str
    checked_on: str
    n_images: int
    tolerance: Tolerance
    host: dict[str, Any]
    artifacts: dict[str, ArtifactRow]
    per_class: dict[str, dict[str, float]] | None = None
    accuracy_control: list[ControlStep] = field(default_factory=list)
    sensitive_layers: list[dict[str, Any]] = field(default_factory=list)
    calibration_sensitivity: dict[str, Any] | None = None
    unit: str = "images"
    """What was checked: ``images``, or ``texts`` for a text encoder (``n_images`` counts
    them)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FidelityReport:
        try:
            return cls(
                **{
                    **d,
                    "tolerance": Tolerance(**d["tolerance"]),
                    "artifacts": {k: ArtifactRow(**v) for k, v in d["artifacts"].items()},
                    "accuracy_control": [ControlStep(**s) for s in d["accuracy_control"]],
                }
            )
        except (KeyError, TypeError) as e:
            raise EdgeTLError(
                f"fidelity report does not follow the schema ({e}); re-export the bundle"
            ) from None


def write_report(
    folder: Path, report: FidelityReport, cosines: Mapping[str, np.ndarray] | None = None
) -> None:
    """``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` into ``folder``; ``cosines``
    (per-image embedding cosine per artifact row) feed the figure's histogram."""
    (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (folder / "fidelity.md").write_text(markdown(report))
    _plot(folder / "fidelity.png", report, dict(cosines or {}))


def read_report(bundle: str | Path) -> FidelityReport | None:
    """The bundle's fidelity report, or None when it has none."""
    path = Path(bundle) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeTLError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    return FidelityReport.from_dict(data)


def _fmt(v: Any, pct: bool = False, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v * 100:.2f} %" if pct else f"{v:.{digits}f}"
    return str(v)


def table(report: FidelityReport) -> str:
    """The fidelity table as Markdown (also what ``edge-tl inspect`` prints)."""
    lines = [
        "| artifact | cosine mean | cosine min | top-1 agreement | acc (FP32 head) "
        "| acc (own head) | size MB | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report.artifacts.items():
        lines.append(
            f"| {name} | {_fmt(r.cosine_mean)} | {_fmt(r.cosine_min)} | "
            f"{_fmt(r.top1_agreement, True)} | {_fmt(r.accuracy_fp32_head, True)} | "
            f"{_fmt(r.accuracy_own_head, True)} | {_fmt(r.size_mb, digits=2)} | "
            f"{_fmt(r.latency_ms, digits=1)} |"
        )
    return "\n".join(lines)


def markdown(report: FidelityReport) -> str:
    """``fidelity.md``: the table, per-class accuracy, accuracy-control steps, the most
    sensitive convolutions and the calibration sensitivity."""
    host = report.host
    tol = report.tolerance
    out = [
        f"# Fidelity report: {report.backbone} -> {report.recipe}",
        "",
        f"Checked on {report.checked_on} ({report.n_images} {report.unit}) on "
        f"{host['cpu']} ({host['cpu_class']}; {', '.join(host['int8_isa']) or 'no SIMD INT8'}), "
        f"against FP32 PyTorch. Tolerance: cosine >= {tol.min_cosine}, top-1 drop <= "
        f"{tol.max_top1_drop * 100:.1f} pt. Verdict: **{report.verdict}**.",
        "",
        "FP32 head: the run's own head, trained in PyTorch on FP32 (what `--head-fit "
        "source` ships). Own head: a linear head fit on that row's embeddings of the training "
        "split (what the bundle ships with `--head-fit artifact`); for pytorch-fp32 and "
        "onnx-fp32 it is the head fit on ONNX FP32 embeddings.",
        "",
        table(report),
        "",
    ]
    if report.per_class:
        names = list(report.per_class)
        classes = list(report.per_class[names[0]])
        out += ["## Per-class accuracy (shipped head)", ""]
        out.append("| class | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for cls in classes:
            vals = " | ".join(_fmt(report.per_class[n].get(cls), True) for n in names)
            out.append(f"| {cls} | {vals} |")
        out.append("")
    if report.accuracy_control:
        out += [
            "## Accuracy control",
            "",
            "| step | cosine mean | top-1 drop | passed | s |",
            "|---|---|---|---|---|",
        ]
        for a in report.accuracy_control:
            drop = "–" if a.top1_drop is None else f"{a.top1_drop * 100:.2f} pt"
            out.append(
                f"| {a.step} | {a.cosine_mean:.4f} | {drop} | "
                f"{'yes' if a.passed else 'no'} | {a.seconds} |"
            )
        out.append("")
    if report.sensitive_layers and "gain" in report.sensitive_layers[0]:
        out += [
            "Most sensitive layers (cosine gained when kept in FP32): "
            + ", ".join(
                f"#{r['index']} {r['shape']} (+{r['gain']:.4f})"
                for r in report.sensitive_layers[:8]
            ),
            "",
        ]
    elif report.sensitive_layers:  # the one-layer-at-a-time ranking (edge_tl.export.sensitivity)
        out += [
            "Most sensitive layers (cosine lost when it alone runs in INT8): "
            + ", ".join(
                f"#{r['index']} {r['shape']} (-{r['loss']:.4f})"
                for r in report.sensitive_layers[:8]
            ),
            "",
        ]
    spread = report.calibration_sensitivity
    if spread and "subsets" in spread:
        accs = ", ".join(_fmt(s.get("accuracy"), True) for s in spread["subsets"])
        coss = ", ".join(f"{s['cosine_mean']:.4f}" for s in spread["subsets"])
        out += [
            "## Calibration sensitivity",
            "",
            f"{len(spread['subsets'])} disjoint subsets of {spread['images_per_subset']} "
            f"{report.unit}: accuracy {accs} (spread {_fmt(spread['accuracy_spread'], True)}), "
            f"cosine {coss} (spread {spread['cosine_spread']:.4f}).",
            "",
        ]
    return "\n".join(out)


def _plot(path: Path, report: FidelityReport, cosines: dict[str, np.ndarray]) -> None:
    plt = pyplot()
    if plt is None:  # matplotlib is optional on the device side; the JSON and MD still say it
        return
    panels = 2 + (len(report.accuracy_control) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4))
    ax = axes[0]
    tol = report.tolerance.min_cosine
    lo = max(0.0, min([tol, *(float(np.min(c)) for c in cosines.values())]) - 0.01)
    for name, cos in cosines.items():
        ax.hist(np.clip(cos, lo, 1.0), bins=40, range=(lo, 1.0), alpha=0.6, label=name)
    ax.axvline(tol, color="k", ls="--", lw=1, label="tolerance")
    item = report.unit.rstrip("s")
    ax.set(
        title=f"Embedding cosine vs FP32 PyTorch, per {item}", xlabel="cosine", ylabel=report.unit
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    pc = report.per_class or {}
    if pc:
        names = list(pc)
        classes = list(pc[names[0]])
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar(
                np.arange(len(classes)) + i * width,
                [pc[n].get(c, 0) * 100 for c in classes],
                width,
                label=n,
            )
        ax.set_xticks(
            np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right", fontsize=8
        )
        lo = max(0.0, min(min(v.values()) for v in pc.values()) * 100 - 5)
        ax.set_ylim(lo, 100 + (100 - lo) * 0.3)  # headroom for the legend above the bars
        ax.set(title=f"Per-class accuracy on held-out {report.unit}", ylabel="accuracy %")
        ax.legend(fontsize=8, loc="upper center", ncol=len(names))
    else:
        ax.text(0.5, 0.5, f"no labelled held-out {report.unit}", ha="center", va="center")
        ax.set_axis_off()
    if panels == 3:
        ax = axes[2]
        steps = report.accuracy_control
        ax.barh(
            range(len(steps)),
            [s.cosine_mean for s in steps],
            color=["tab:green" if s.passed else "tab:red" for s in steps],
        )
        labels = [textwrap.fill(s.step, 30) for s in steps]
        ax.set_yticks(range(len(steps)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(tol, color="k", ls="--", lw=1)
        lo = min(s.cosine_mean for s in steps)
        ax.set_xlim(max(0.0, lo - 0.02), 1.0)
        ax.set(title="Accuracy control: mean cosine per step", xlabel="cosine")
    title = f"{report.backbone} -> {report.recipe}: {report.verdict}"
    save(fig, path, title, integer_x=False, dpi=110, fontsize=10)
