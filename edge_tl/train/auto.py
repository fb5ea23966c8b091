"""``--strategy auto`` (the default): a linear probe, the last stages fine-tuned, or the
whole network, chosen from the data on the validation split.

The classic advice (Kornblith et al., "Do Better ImageNet Models Transfer Better?", CVPR
2019; Yosinski et al., NeurIPS 2014) is a softmax head on frozen embeddings for few images
per class and fine-tuning as data grow and as the images move away from ImageNet; measured
here (``benchmarks/auto_strategy.py``), fine-tuning already won at 10 training images per
class on NEU-DET and flowers5, so ``auto`` lets the validation split decide wherever it can:

1. **Gates**: the arms of :data:`AUTO_ARMS` are tried in order, cheapest first; an arm is
   tried only when the smallest class has at least its ``min_per_class`` training and
   ``min_val_per_class`` validation images (with fewer, validation cannot tell the arms
   apart and the linear probe, the low-variance choice, is kept), and an arm with
   ``needs_gain`` only when the arm before it beat everything before that.
2. **Validation**: each arm tried is an ordinary run of its strategy (the linear probe
   embeds the images once; fine-tuning caches the frozen prefix's activations); the arm
   with the highest validation accuracy is kept, ties going to the cheaper arm. The
   held-out test split is never looked at.

The kept run is moved to ``OUT`` unchanged except for the record of the choice, so
export, evaluate and learn treat it as a run of the chosen strategy: ``run.json``'s
``config`` is the chosen arm's, and ``run.json`` / ``metrics.json`` add ``"auto"``:
``{"chosen", "why", "candidates": {arm: {"val_accuracy", "train_seconds"} or
{"skipped": reason}}, "config": the requested settings}``; ``metrics.json`` says
``"strategy": "auto"`` with ``"chosen"`` and ``"why"`` beside it. Candidates train in
``OUT.auto/`` (removed at the end; ``--resume`` reuses finished ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.backbones import get_spec
from edge_tl.bundle import check_destination
from edge_tl.data import open_dataset, split
from edge_tl.errors import EdgeTLError
from edge_tl.train.config import TrainConfig
from edge_tl.train.runs import RUN_FILE, checkpoint_path, start_work

__all__ = [
    "AUTO",
    "AUTO_ARMS",
    "Arm",
    "arm_config",
    "check_auto",
    "choose",
    "train_auto",
    "work_path",
]

AUTO = "auto"


@dataclass(frozen=True)
class Arm:
    """One candidate of ``auto``.

    Attributes:
        name: the arm's name in the record (``linear-probe``, ``finetune``, ``full``).
        strategy: the strategy it trains (:data:`~edge_tl.spec.STRATEGIES`).
        settings: :class:`TrainConfig` fields it sets, each unless the run's own config
            already differs from the default there (a flag the user gave wins).
        min_per_class: tried only when the smallest class has at least this many training
            images.
        min_val_per_class: tried only when the smallest class has at least this many
            validation images (fewer cannot tell the arms apart).
        needs_gain: tried only when the arm tried just before it was kept (it beat every
            arm before it on the validation split).
    """

    name: str
    strategy: str
    settings: dict[str, Any] = field(default_factory=dict)
    min_per_class: int = 0
    min_val_per_class: int = 0
    needs_gain: bool = False


AUTO_ARMS: tuple[Arm, ...] = (
    Arm("linear-probe", "linear-probe"),
    Arm("finetune", "finetune", {}, min_val_per_class=5),
    Arm("full", "full", {}, min_val_per_class=5),
)
"""The candidates of ``--strategy auto`` in the order they are tried (cheapest first), with
their settings and when each is tried; ``benchmarks/auto_strategy.py`` measures the
choice against each strategy alone (README, "auto vs each strategy")."""

# Flags that name what one strategy trains: with auto, the fix is naming that strategy.
_ONE_STRATEGY = {
    "unfreeze_every": ("--unfreeze-every", "gradual"),
}


def work_path(out: str | Path) -> Path:
    """Where ``auto`` trains its candidates: ``OUT.auto`` beside ``OUT``."""
    out = Path(out)
    return out.with_name(out.name + ".auto")


def fixed_strategy(config: TrainConfig) -> str | None:
    """The strategy ``auto`` resolves to without choosing: ``finetune`` with ``--qat`` or a
    domain adaptation that trains in the fine-tuning loop (``--target-unlabeled`` with mcc,
    the default, coral or dann), which the linear probe cannot do; otherwise None."""
    from edge_tl.train.adapt import DEFAULT_METHOD, LOOP_METHODS

    method = config.adapt if config.adapt is not None else DEFAULT_METHOD
    if config.qat or (config.target_unlabeled is not None and method in LOOP_METHODS):
        return "finetune"
    return None


def check_auto(config: TrainConfig) -> None:
    """Refuse settings that only one strategy uses, in one line naming the fix.

    Raises:
        EdgeTLError: ``--stages``/``--params`` (selective), ``--unfreeze-every``
            (gradual), ``--no-cache`` (the probe always caches), or no validation split
            to choose on.
    """
    if config.stages or config.params:  # the words compare and train used before auto
        raise EdgeTLError(
            "--stages and --params choose what --strategy selective trains; auto chooses "
            "among linear-probe, finetune and full (drop them, or add --strategy selective)"
        )
    defaults = TrainConfig(strategy="finetune")
    for name, (flag, strategy) in _ONE_STRATEGY.items():
        if getattr(config, name) != getattr(defaults, name):
            raise EdgeTLError(
                f"{flag} applies to --strategy {strategy} only, and auto may choose another "
                f"strategy; add --strategy {strategy} (or drop {flag})"
            )
    if not config.cache:
        raise EdgeTLError(
            "--no-cache does not apply to the linear probe auto may choose; add --strategy "
            "finetune (or full) or drop --no-cache"
        )
    if config.val_frac <= 0:
        raise EdgeTLError(
            "auto chooses the strategy on the validation split; give --val-frac above 0 "
            "(default 0.1) or an explicit --strategy"
        )


def arm_config(config: TrainConfig, arm: Arm) -> TrainConfig:
    """``config`` with ``arm``'s strategy and settings (a setting the config already
    changed from the default is kept)."""
    defaults = TrainConfig(strategy="finetune")
    settings = {k: v for k, v in arm.settings.items() if getattr(config, k) == getattr(defaults, k)}
    return dataclasses.replace(config, strategy=arm.strategy, **settings)


def _arms(config: TrainConfig) -> tuple[Arm, ...]:
    if get_spec(config.backbone).sources:  # a concatenation only has a linear probe
        return AUTO_ARMS[:1]
    return AUTO_ARMS


def choose(
    per_class: int,
    val_per_class: int,
    score: Callable[[Arm], float | None],
    arms: tuple[Arm, ...] | None = None,
) -> tuple[Arm, str, dict[str, dict[str, Any]]]:
    """Auto's decision: ``(kept arm, one-line reason, {arm name: record})``.

    Args:
        per_class: training images of the smallest class.
        val_per_class: validation images of the smallest class.
        score: trains an arm and returns its validation accuracy (called only for the
            arms tried, in order); None or NaN (no validation images) ranks last.
        arms: the candidates (default :data:`AUTO_ARMS`).
    """
    records: dict[str, dict[str, Any]] = {}
    best: Arm | None = None
    best_val = -1.0
    last_kept = False
    for arm in AUTO_ARMS if arms is None else arms:
        why_not = None
        if per_class < arm.min_per_class:
            why_not = f"{per_class} < {arm.min_per_class} training images per class"
        elif val_per_class < arm.min_val_per_class:
            why_not = (
                f"{val_per_class} < {arm.min_val_per_class} validation images per class, "
                "too few to choose on"
            )
        elif arm.needs_gain and best is not None and not last_kept:
            why_not = f"{best.name} was not beaten on validation"
        if why_not is not None:
            records[arm.name] = {"skipped": why_not}
            last_kept = False
            continue
        got = score(arm)  # None / NaN: no validation images (a tiny data set)
        val = -1.0 if got is None or got != got else float(got)
        records[arm.name] = {"val_accuracy": None if val < 0 else val}
        last_kept = best is None or val > best_val
        if last_kept:
            best, best_val = arm, val
    assert best is not None, "the first arm has no minimum"
    tried = [n for n, r in records.items() if "val_accuracy" in r]
    if len(tried) == 1:
        why = f"{best.name}, the only candidate tried"
    else:
        scores = ", ".join(f"{n} {_pct(records[n]['val_accuracy'])}" for n in tried)
        why = f"{best.name}, the best validation accuracy ({scores}; ties: the cheaper)"
    rest = [f"{n} ({r['skipped']})" for n, r in records.items() if "skipped" in r]
    if rest:
        why += f"; not tried: {', '.join(rest)}"
    return best, why, records


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _finished(run: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    try:
        record = json.loads((run / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get("metrics") if record.get("config") == cfg.to_dict() else None


def train_auto(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    force: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """:func:`edge_tl.train.train` with ``config.strategy == "auto"``: train the candidates
    :func:`choose` asks for in ``OUT.auto/``, move the kept one to ``out`` with the record
    of the choice. Arguments as :func:`~edge_tl.train.train`.

    Returns:
        The kept run's metrics, with ``strategy`` ``"auto"``, ``chosen``, ``why`` and
        ``auto`` (the candidates' validation scores).

    Raises:
        EdgeTLError: settings :func:`check_auto` refuses, under torchrun, or what a
            candidate's training raises.
    """
    from edge_tl.train.core import train

    out = Path(out)
    check_auto(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EdgeTLError(
            "auto trains its candidates in one process; under torchrun name "
            "a --strategy (finetune, full, ...)"
        )
    check_destination(out, force, "run folder")
    work = work_path(out)
    start_work(work, resume, force, "auto run")
    ds = open_dataset(data, skip_bad, tasks=config.tasks or None)
    parts = split(ds, config.split)
    per_class, val_per_class = (
        int(np.bincount(ds.labels[parts[k]], minlength=len(ds.classes)).min())
        for k in ("train", "val")
    )
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}

    def score(arm: Arm) -> float:
        cfg = arm_config(config, arm)
        run = work / arm.name
        metrics = _finished(run, cfg) if resume else None
        if metrics is None:
            again = resume and checkpoint_path(run).exists()
            metrics = train(
                data,
                run,
                cfg,
                force=True,
                resume=again,
                on_epoch_end=on_epoch_end,
                skip_bad=skip_bad,
            )
        results[arm.name] = metrics
        return metrics["val_accuracy"]

    best, why, records = choose(per_class, val_per_class, score, _arms(config))
    for name, m in results.items():
        records[name]["train_seconds"] = m.get("train_seconds")
    chosen_run = work / best.name
    record = {
        "chosen": best.name,
        "why": why,
        "candidates": records,
        "config": config.to_dict(),
    }
    metrics = {"strategy": AUTO, "chosen": best.name, "why": why}
    metrics.update({k: v for k, v in results[best.name].items() if k != "strategy"})
    metrics["auto"] = record
    # what auto cost: every candidate it trained (the kept run's own time is in "auto")
    metrics["train_seconds"] = round(sum(m.get("train_seconds") or 0 for m in results.values()), 1)
    run_json = json.loads((chosen_run / RUN_FILE).read_text())
    run_json["metrics"] = metrics
    run_json["auto"] = record
    (chosen_run / RUN_FILE).write_text(json.dumps(run_json, indent=2) + "\n")
    (chosen_run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(chosen_run, out)
    shutil.rmtree(work)
    return metrics
