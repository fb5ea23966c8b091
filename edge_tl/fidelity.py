"""Is the artifact still the model? Measured on the user's own held-out images.

Every export compares its artifact with FP32 PyTorch: embedding cosine (mean / min per
image), top-1 agreement, accuracy with a head trained on FP32 embeddings and with one fit on
the artifact's own, per-class accuracy, size and batch-1 latency; for INT8 also how much the
accuracy moves with the calibration images (three disjoint subsets).

An INT8 artifact that misses the recipe's tolerance is escalated step by step (accuracy
control) and each step is recorded; when nothing reaches the tolerance the export is refused
with what was tried. The record is written into the bundle as ``fidelity.json``,
``fidelity.md`` and ``fidelity.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress, say
from edge_tl.runtime.engine import DISABLED_OPTIMIZERS, make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.runtime.preprocess import load_image, normalise_pixels, to_pixels
from edge_tl.spec import EMBEDDING, Artifact, Preprocess, Recipe

REPORT_FILES = ("fidelity.json", "fidelity.md", "fidelity.png")
SENSITIVITY_IMAGES = 32
EXCLUSION_STEPS = (1, 2, 4, 8, 16, 32)


@dataclass
class Images:
    """Images decoded once and kept as resized ``uint8`` pixels (a quarter of float32)."""

    paths: list[str]
    pre: Preprocess
    labels: np.ndarray | None = None
    desc: str | None = None  # progress bar label; None decodes silently
    pixels: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        paths = progress(self.paths, desc=self.desc) if self.desc else self.paths
        self.pixels = np.stack([to_pixels(load_image(p), self.pre) for p in paths])

    def inputs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return normalise_pixels(self.pixels[start:stop], self.pre)

    def __len__(self) -> int:
        return len(self.paths)


def embed(run: Callable[[np.ndarray], np.ndarray], images: Images, batch: int = 32) -> np.ndarray:
    """Pooled embeddings of ``images`` through ``run(float32[N,3,H,W]) -> float32[N,D]``."""
    return np.concatenate(
        [run(images.inputs(i, i + batch)) for i in range(0, len(images), batch)]
    ).astype(np.float32)


def engine_runner(engine) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: engine.run(x, (EMBEDDING,))[EMBEDDING]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def agreement(
    emb: np.ndarray,
    ref: np.ndarray,
    head: LinearHead,
    labels: np.ndarray | None,
    ref_head: LinearHead | None = None,
) -> dict[str, Any]:
    """Cosine vs the reference embeddings, top-1 agreement with the reference's predictions
    (``ref_head`` on ``ref``; ``head`` if None) and, with labels, ``head``'s accuracy."""
    cos = cosine(emb, ref)
    pred = head.predict_proba(emb).argmax(1)
    ref_pred = (ref_head or head).predict_proba(ref).argmax(1)
    out: dict[str, Any] = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((pred == ref_pred).mean()),
        "_cosines": cos,
        "_pred": pred,
    }
    if labels is not None:
        out["accuracy"] = float((pred == labels).mean())
    return out


def per_class(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    return {
        classes[c]: float((pred[labels == c] == c).mean())
        for c in range(len(classes))
        if (labels == c).any()
    }


class ToleranceError(EdgeTLError):
    """The artifact missed its recipe's tolerance after every step; ``attempts`` says each."""

    def __init__(self, attempts: list[Attempt], message: str) -> None:
        super().__init__(message)
        self.attempts = list(attempts)


@dataclass
class Attempt:
    """One try of the accuracy-control ladder."""

    step: str
    recipe: Recipe
    cosine_mean: float
    cosine_min: float
    accuracy: float | None
    top1_drop: float | None  # the larger of the shipped head's and the run head's drop
    passed: bool
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        r = self.recipe
        settings = {
            "calibration_method": r.calibration_method,
            "overflow_fix": r.overflow_fix,
            "fast_bias_correction": r.fast_bias_correction,
            "nodes_in_fp32": list(r.nodes_to_exclude),
            "engine_options": dict(r.engine_options),
        }
        if r.quantization == "ort-static":
            settings.pop("overflow_fix")
            settings.pop("fast_bias_correction")
        elif r.quantization == "nncf":
            settings.pop("calibration_method")
        else:
            settings = {"engine_options": dict(r.engine_options)}
        return {
            "step": self.step,
            "settings": settings,
            "cosine_mean": round(self.cosine_mean, 5),
            "cosine_min": round(self.cosine_min, 5),
            "accuracy": self.accuracy,
            "top1_drop": self.top1_drop,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class Checker:
    """Builds and measures artifacts against the FP32 reference on the check images."""

    fp32_onnx: Path
    recipe: Recipe
    calib: np.ndarray | None
    out_dir: Path
    work: Path
    check: Images
    reference: np.ndarray  # FP32 PyTorch embeddings of ``check``
    reference_head: LinearHead  # the head FP32 accuracy is measured with
    head_for: Callable[[Any], LinearHead]  # engine -> the head that ships with it
    source_head: LinearHead | None = None  # the run's own head, trained on FP32 embeddings
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reference_accuracy(self) -> float | None:
        if self.check.labels is None:
            return None
        pred = self.reference_head.predict_proba(self.reference).argmax(1)
        return float((pred == self.check.labels).mean())

    def sensitivity_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Calibration images (training split, no labels) with their FP32 embeddings: what
        the layer ranking is measured on, so the held-out check stays a check."""
        x = self.calib[:SENSITIVITY_IMAGES]
        from edge_tl.runtime.engine import OrtEngine

        ref = OrtEngine(self.fp32_onnx).run(x, (EMBEDDING,))[EMBEDDING]
        return x, ref

    def measure(self, engine) -> tuple[dict[str, Any], LinearHead]:
        """The artifact's agreement with FP32, with the head that would ship with it."""
        head = self.head_for(engine)
        emb = embed(engine_runner(engine), self.check)
        m = agreement(emb, self.reference, head, self.check.labels, self.reference_head)
        m["_emb"] = emb
        return m, head

    def build(self, recipe: Recipe, validation=None) -> tuple[Artifact, Any]:
        from edge_tl.quantize import build_artifact

        for p in self.out_dir.iterdir():  # a previous attempt's artifact
            if p.name.startswith("backbone."):
                p.unlink()
        files, options = build_artifact(
            self.fp32_onnx, recipe, self.calib, self.out_dir, self.work, validation
        )
        artifact = Artifact(recipe.format, recipe.precision, tuple(files), recipe.name, options)
        return artifact, make_engine(self.out_dir, artifact)

    def attempt(self, step: str, recipe: Recipe, validation=None, note: str = "") -> Attempt:
        say(f"  accuracy control: {step}")
        t0 = time.perf_counter()
        artifact, engine = self.build(recipe, validation)
        m, head = self.measure(engine)
        drop = None
        if "accuracy" in m:
            # the head that ships, and the run's FP32-trained head on the artifact's embeddings
            # (what --head-fit source would ship): both must hold
            drop = self.reference_accuracy - m["accuracy"]
            if self.source_head is not None and self.source_head is not head:
                labels = self.check.labels
                src = self.source_head
                ref_acc = float((src.predict_proba(self.reference).argmax(1) == labels).mean())
                got = float((src.predict_proba(m["_emb"]).argmax(1) == labels).mean())
                m["source_head_drop"] = round(ref_acc - got, 6)
                drop = max(drop, ref_acc - got)
            drop = round(drop, 6)
        passed = m["cosine_mean"] >= self.recipe.min_cosine and (
            drop is None or drop <= self.recipe.max_top1_drop + 1e-9
        )
        a = Attempt(
            step,
            recipe,
            m["cosine_mean"],
            m["cosine_min"],
            m.get("accuracy"),
            drop,
            passed,
            time.perf_counter() - t0,
            note,
        )
        self.attempts.append(a)
        self.last = (artifact, engine, recipe, head)
        return a

    def run_ladder(self) -> tuple[Artifact, Any, Recipe, LinearHead]:
        """The recipe as written; if it misses the tolerance and is INT8, escalate."""
        rec = self.recipe
        first = self.attempt("recipe as written", rec)
        if first.passed:
            return self.last
        if rec.precision != "int8" or not rec.accuracy_control:
            self.refuse()
        ladder = _ort_ladder if rec.quantization == "ort-static" else _nncf_ladder
        for passed in ladder(self):
            if passed:
                return self.last
        self.refuse()
        raise AssertionError  # unreachable

    def best(self) -> Attempt:
        return max(self.attempts, key=lambda a: (a.cosine_mean, -(a.top1_drop or 0)))

    def refuse(self) -> None:
        rec = self.recipe
        tried = "; ".join(
            f"{a.step}: cosine {a.cosine_mean:.4f}"
            + (f", top-1 drop {a.top1_drop * 100:.1f} pt" if a.top1_drop is not None else "")
            for a in self.attempts
        )
        fixes = (
            "fine-tune with quantization-aware training (`edge-tl train ... --qat`) and export "
            "again, use an FP32/FP16 recipe, or loosen min_cosine / max_top1_drop in a copy of "
            "the recipe"
            if rec.precision == "int8"
            else "report this with the backbone name, or loosen min_cosine in a copy of the recipe"
        )
        raise ToleranceError(
            self.attempts,
            f"{rec.name} misses its tolerance (cosine >= {rec.min_cosine}, top-1 drop <= "
            f"{rec.max_top1_drop * 100:.1f} pt) after {len(self.attempts)} tries [{tried}]; "
            f"nothing was written; {fixes}",
        )


def _ort_ladder(c: Checker):
    """ORT: saturation-safe kernels, other calibration methods, then the most sensitive
    convolutions kept in FP32 (ranked by a one-at-a-time sensitivity pass)."""
    rec = c.recipe
    if "session.x64quantprecision" not in rec.engine_options and host_info()["machine"] in (
        "x86_64",
        "AMD64",
    ):
        opts = {**rec.engine_options, "session.x64quantprecision": "1"}
        yield c.attempt(
            "saturation-safe integer kernels (exact requantization on x86-64)",
            dataclasses.replace(rec, engine_options=opts),
        ).passed
    base = c.best().recipe
    # not entropy: ORT 1.32's entropy calibrator yields the MinMax ranges on these CNNs
    # (byte-identical quantized files for efficientnet_lite0), so it would only cost time
    for method in ("percentile", "minmax"):
        if method != base.calibration_method:
            yield c.attempt(
                f"calibration {method}", dataclasses.replace(base, calibration_method=method)
            ).passed
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    # FP32 nodes in a QDQ graph only stay FP32 with ORT's WeightBiasQuantization off (it
    # would quantize their weights again at session start): the bundle records that
    base = dataclasses.replace(
        base,
        engine_options={**base.engine_options, DISABLED_OPTIMIZERS: "WeightBiasQuantization"},
    )
    ranking = ort_sensitivity(c, base)
    c.sensitivity = ranking
    for k in EXCLUSION_STEPS:
        k = min(k, rec.max_excluded_nodes, len(ranking))
        names = tuple(r["name"] for r in ranking[:k])
        if names == base.nodes_to_exclude:
            break
        yield c.attempt(
            f"{k} most sensitive convolutions kept in FP32",
            dataclasses.replace(base, nodes_to_exclude=names),
        ).passed
        if k == rec.max_excluded_nodes or k == len(ranking):
            break


def ort_sensitivity(c: Checker, base: Recipe) -> list[dict[str, Any]]:
    """Per convolution: the embedding cosine gained when it alone stays in FP32.

    Reuses the cached calibration, so each node costs one quantization without calibrating
    (about a second on a 2-core CPU) and one pass over a few images.
    """
    from edge_tl.quantize import conv_nodes, preprocessed, quantize_ort
    from edge_tl.runtime.engine import OrtEngine

    x, ref = c.sensitivity_set()
    trial = c.work / "sensitivity.onnx"

    def cos_of(recipe: Recipe) -> float:
        quantize_ort(c.fp32_onnx, trial, c.calib, recipe, c.work)
        got = OrtEngine(trial, recipe.engine_options).run(x, (EMBEDDING,))[EMBEDDING]
        return float(cosine(got, ref).mean())

    t0 = time.perf_counter()
    base_cos = cos_of(base)
    nodes = conv_nodes(preprocessed(c.fp32_onnx, c.work))
    for node in progress(nodes, desc="sensitivity per convolution"):
        if node["name"] in base.nodes_to_exclude:
            node["gain"] = 0.0
            continue
        one = dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, node["name"]))
        node["gain"] = round(cos_of(one) - base_cos, 6)
    say(f"  sensitivity pass: {len(nodes)} convolutions in {time.perf_counter() - t0:.0f} s")
    return sorted(nodes, key=lambda r: -r["gain"])


def _nncf_ladder(c: Checker):
    """OpenVINO/NNCF: overflow fix, full bias correction, then NNCF's accuracy control."""
    rec = c.recipe
    if rec.overflow_fix != "enable":
        yield c.attempt(
            "overflow fix on (saturation-safe without VNNI)",
            dataclasses.replace(rec, overflow_fix="enable"),
        ).passed
    base = c.best().recipe
    if base.fast_bias_correction:
        yield c.attempt(
            "full bias correction", dataclasses.replace(base, fast_bias_correction=False)
        ).passed
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    first = first_convolutions(c.fp32_onnx, 2)
    yield c.attempt(
        "first 2 convolutions kept in FP32 (they see raw pixels)",
        dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, *first)),
    ).passed
    validation = c.sensitivity_set()
    yield c.attempt(
        "NNCF accuracy control (most costly layers back to FP32)",
        base,
        validation,
        note="nncf.quantize_with_accuracy_control on embedding cosine",
    ).passed


def first_convolutions(onnx_path: Path, n: int) -> list[str]:
    """OpenVINO names of the first ``n`` convolutions (NNCF ignored-scope names)."""
    import openvino as ov

    ops = ov.convert_model(str(onnx_path)).get_ordered_ops()
    return [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() in ("Convolution", "GroupConvolution")
    ][:n]


def calibration_spread(
    c: Checker, chosen: Recipe, pool: Sequence[str], size: int, subsets: int
) -> dict[str, Any] | None:
    """INT8 accuracy and cosine over ``subsets`` disjoint calibration subsets of ``pool``."""
    if subsets < 1 or chosen.precision != "int8":
        return None
    per = min(size, len(pool) // subsets)
    if per < 1:
        return {"skipped": f"only {len(pool)} calibration images for {subsets} subsets"}
    order = np.random.default_rng(1).permutation(len(pool))
    rows = []
    saved = c.calib
    for s in range(subsets):
        paths = [pool[i] for i in sorted(order[s * per : (s + 1) * per])]
        c.calib = Images(paths, c.check.pre).inputs()
        say(f"  calibration subset {s + 1}/{subsets} ({per} images)")
        # the chosen settings; NNCF accuracy control is not re-run per subset (too slow)
        _, engine = c.build(chosen)
        m, _ = c.measure(engine)
        rows.append({k: v for k, v in m.items() if not k.startswith("_")})
    c.calib = saved
    accs = [r["accuracy"] for r in rows if "accuracy" in r]
    coss = [r["cosine_mean"] for r in rows]
    return {
        "settings": c.attempts[-1].step if c.attempts else "recipe as written",
        "images_per_subset": per,
        "subsets": rows,
        "accuracy_spread": float(max(accs) - min(accs)) if accs else None,
        "cosine_spread": float(max(coss) - min(coss)),
    }


def latency_ms(runners: dict[str, Callable[[np.ndarray], Any]], images: Images, n: int = 20):
    """Batch-1 median latency per runner, interleaved image by image (fair on a noisy host)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    xs = [images.inputs(i, i + 1) for i in range(min(n, len(images)))]
    for run in runners.values():  # warm-up
        for x in xs[:3]:
            run(x)
    for x in xs:
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` into ``folder``."""
    plot = report.pop("_plot", {})
    (folder / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "fidelity.md").write_text(markdown(report))
    _plot(folder / "fidelity.png", report, plot)


def _fmt(v: Any, pct: bool = False, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v * 100:.2f} %" if pct else f"{v:.{digits}f}"
    return str(v)


def table(report: dict[str, Any]) -> str:
    """The fidelity table as Markdown (also what `edge-tl inspect` prints)."""
    lines = [
        "| artifact | cosine mean | cosine min | top-1 agreement | acc (FP32 head) "
        "| acc (own head) | size MB | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["artifacts"].items():
        lines.append(
            f"| {name} | {_fmt(r.get('cosine_mean'))} | {_fmt(r.get('cosine_min'))} | "
            f"{_fmt(r.get('top1_agreement'), True)} | {_fmt(r.get('accuracy_fp32_head'), True)} | "
            f"{_fmt(r.get('accuracy_own_head'), True)} | {_fmt(r.get('size_mb'), digits=2)} | "
            f"{_fmt(r.get('latency_ms'), digits=1)} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    host = report["host"]
    tol = report["tolerance"]
    out = [
        f"# Fidelity report: {report['backbone']} -> {report['recipe']}",
        "",
        f"Checked on {report['checked_on']} ({report['n_images']} images) on "
        f"{host['cpu']} ({host['cpu_class']}; {', '.join(host['int8_isa']) or 'no SIMD INT8'}), "
        f"against FP32 PyTorch. Tolerance: cosine >= {tol['min_cosine']}, top-1 drop <= "
        f"{tol['max_top1_drop'] * 100:.1f} pt. Verdict: **{report['verdict']}**.",
        "",
        "FP32 head: a linear head fit on FP32 embeddings of the training split (for "
        "pytorch-fp32 and onnx-fp32 it is their own). Own head: fit on this artifact's "
        "embeddings (what the bundle ships when exported with `--head-fit artifact`).",
        "",
        table(report),
        "",
    ]
    if report.get("per_class"):
        names = list(report["per_class"])
        classes = list(report["per_class"][names[0]])
        out += ["## Per-class accuracy (shipped head)", ""]
        out.append("| class | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for cls in classes:
            vals = " | ".join(_fmt(report["per_class"][n].get(cls), True) for n in names)
            out.append(f"| {cls} | {vals} |")
        out.append("")
    if report.get("accuracy_control"):
        out += [
            "## Accuracy control",
            "",
            "| step | cosine mean | top-1 drop | passed | s |",
            "|---|---|---|---|---|",
        ]
        for a in report["accuracy_control"]:
            drop = "–" if a["top1_drop"] is None else f"{a['top1_drop'] * 100:.2f} pt"
            out.append(
                f"| {a['step']} | {a['cosine_mean']:.4f} | {drop} | "
                f"{'yes' if a['passed'] else 'no'} | {a['seconds']} |"
            )
        out.append("")
    if report.get("sensitive_layers"):
        out += [
            "Most sensitive convolutions (cosine gained when kept in FP32): "
            + ", ".join(
                f"#{r['index']} {r['shape']} (+{r['gain']:.4f})"
                for r in report["sensitive_layers"][:8]
            ),
            "",
        ]
    spread = report.get("calibration_sensitivity")
    if spread and "subsets" in spread:
        accs = ", ".join(_fmt(s.get("accuracy"), True) for s in spread["subsets"])
        coss = ", ".join(f"{s['cosine_mean']:.4f}" for s in spread["subsets"])
        out += [
            "## Calibration sensitivity",
            "",
            f"{len(spread['subsets'])} disjoint subsets of {spread['images_per_subset']} "
            f"images: accuracy {accs} (spread {_fmt(spread['accuracy_spread'], True)}), "
            f"cosine {coss} (spread {spread['cosine_spread']:.4f}).",
            "",
        ]
    return "\n".join(out)


def _plot(path: Path, report: dict[str, Any], plot: dict[str, Any]) -> None:
    from edge_tl.train.plots import pyplot

    plt = pyplot()
    if plt is None:  # matplotlib is optional on the device side; the JSON and MD still say it
        return
    panels = 2 + (len(report.get("accuracy_control") or []) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4))
    ax = axes[0]
    cosines = plot.get("cosines", {})
    tol = report["tolerance"]["min_cosine"]
    lo = max(0.0, min([tol, *(float(np.min(c)) for c in cosines.values())]) - 0.01)
    for name, cos in cosines.items():
        ax.hist(np.clip(cos, lo, 1.0), bins=40, range=(lo, 1.0), alpha=0.6, label=name)
    ax.axvline(report["tolerance"]["min_cosine"], color="k", ls="--", lw=1, label="tolerance")
    ax.set(title="Embedding cosine vs FP32 PyTorch, per image", xlabel="cosine", ylabel="images")
    ax.legend(fontsize=8)
    ax = axes[1]
    pc = report.get("per_class") or {}
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
        ax.set(title="Per-class accuracy on held-out images", ylabel="accuracy %")
        ax.legend(fontsize=8, loc="upper center", ncol=len(names))
    else:
        ax.text(0.5, 0.5, "no labelled held-out images", ha="center", va="center")
        ax.set_axis_off()
    if panels == 3:
        ax = axes[2]
        steps = report["accuracy_control"]
        ax.barh(
            range(len(steps)),
            [s["cosine_mean"] for s in steps],
            color=["tab:green" if s["passed"] else "tab:red" for s in steps],
        )
        labels = [textwrap.fill(s["step"], 30) for s in steps]
        ax.set_yticks(range(len(steps)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(report["tolerance"]["min_cosine"], color="k", ls="--", lw=1)
        lo = min(s["cosine_mean"] for s in steps)
        ax.set_xlim(max(0.0, lo - 0.02), 1.0)
        ax.set(title="Accuracy control: mean cosine per step", xlabel="cosine")
    fig.suptitle(f"{report['backbone']} -> {report['recipe']}: {report['verdict']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_reports(src: Path, dst: Path) -> None:
    for name in REPORT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


SELF_TEST_FILE = "selftest.npz"
SELF_TEST_IMAGES = 4


def write_self_test(
    folder: Path, check: Images, reference: np.ndarray, got: np.ndarray, recipe: Recipe
) -> dict[str, Any] | None:
    """A few reference images (resized pixels) with their FP32 embeddings, for the device to
    check its own kernels on first load; the threshold is the cosine this host reached on
    them minus the recipe's ``self_test_margin``."""
    if recipe.self_test == "off":
        return None
    idx = np.linspace(0, len(check) - 1, min(SELF_TEST_IMAGES, len(check))).round().astype(int)
    cos = cosine(got[idx], reference[idx])
    np.savez(
        folder / SELF_TEST_FILE,
        pixels=check.pixels[idx],
        embedding=reference[idx].astype(np.float32),
        export_cosine=cos.astype(np.float32),
    )
    return {
        "file": SELF_TEST_FILE,
        "min_cosine": round(max(0.0, float(cos.mean()) - recipe.self_test_margin), 5),
        "export_cosine": round(float(cos.mean()), 5),
        "export_host": str(host_info()["cpu"]),
        "on_fail": recipe.self_test,
    }
