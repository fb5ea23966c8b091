"""``edge-tl compare``: which transfer pays on your data, negative transfer included.

Each strategy trains in its own process (so peak memory is its own) on the same splits;
the table goes to the terminal and to ``compare.md`` / ``compare.json``, the validation
curves to ``curves.png``. Work happens in ``OUT.partial/``, renamed to ``OUT`` when every
strategy is done; ``--resume`` continues an interrupted comparison from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

from edge_tl.bundle import check_destination, read_json
from edge_tl.errors import EdgeTLError
from edge_tl.progress import log_to_stderr, logging_to_stderr
from edge_tl.spec import STRATEGIES
from edge_tl.train.config import TrainConfig
from edge_tl.train.runs import RUN_FILE, start_work
from edge_tl.train.text_config import TEXT_STRATEGIES, TextTrainConfig

__all__ = [
    "COMPARE_FILE",
    "DEFAULT_STRATEGIES",
    "TEXT_DEFAULT_STRATEGIES",
    "compare",
    "markdown",
    "negative_transfer",
    "parse_strategies",
    "partial_path",
    "plot_curves",
]

_logger = logging.getLogger(__name__)

COMPARE_FILE = "compare.json"
DEFAULT_STRATEGIES = "linear-probe,finetune,full,bn-only,from-scratch"
TEXT_DEFAULT_STRATEGIES = ",".join(TEXT_STRATEGIES)


def partial_path(out: str | Path) -> Path:
    """Where an unfinished comparison works: beside ``OUT``, renamed to it at the end."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _child(
    data: str, out: str, config: dict[str, Any], error_file: str, console: bool, text: bool
) -> None:
    if console:  # the parent shows status lines: so does this (spawned) process
        log_to_stderr()
    try:
        if text:
            from edge_tl.train.text import train_text
            from edge_tl.train.text_config import TextTrainConfig

            train_text(data, out, TextTrainConfig.from_dict(config), force=True)
        else:
            from edge_tl.train.core import train

            train(data, out, TrainConfig.from_dict(config), force=True)
    except EdgeTLError as e:
        Path(error_file).write_text(str(e))
        raise SystemExit(2) from None
    except BaseException:
        Path(error_file).write_text(traceback.format_exc().strip().splitlines()[-1])
        raise


def parse_strategies(text: str, text_data: bool = False) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each a strategy (of text models with ``text_data``)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = TEXT_STRATEGIES if text_data else STRATEGIES
    bad = [s for s in names if s not in known]
    if bad and text_data:
        raise EdgeTLError(
            f"{', '.join(bad)}: not a strategy for text models; choose from {', '.join(known)}"
        )
    if bad or not names:
        raise EdgeTLError(
            f"unknown strategy {', '.join(bad) or '(none)'}; choose from {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise EdgeTLError(f"--strategies lists a strategy twice: {text}")
    return names


def compare(
    data: str | Path,
    out: str | Path,
    strategies: list[str],
    base: TrainConfig | TextTrainConfig,
    threshold: float = 0.02,
    force: bool = False,
    resume: bool = False,
    select: str | Path | None = None,
) -> dict[str, Any]:
    """Train every strategy on the same splits and tabulate them.

    Args:
        threshold: transfer that beats from-scratch by less than this (a fraction of
            accuracy) is flagged as not paying for itself.
        select: an ``edge-tl select`` output for the same data: its score of this
            backbone is printed beside the negative-transfer check.

    Returns:
        The comparison written to ``OUT/compare.json``.
    """
    out = Path(out)
    check_destination(out, force, "comparison")
    chosen = None
    if select is not None and not isinstance(base, TextTrainConfig):
        from edge_tl.train.select import select_summary

        chosen = select_summary(select, base.backbone, data)
    work = partial_path(out)
    start_work(work, resume, force, "comparison")
    (work / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for i, strategy in enumerate(strategies, 1):
        cfg = dataclasses.replace(base, strategy=strategy)
        run = work / "runs" / strategy
        if resume and _finished(run, cfg):
            _logger.info(f"[{i}/{len(strategies)}] {strategy}: reusing {run}")
        else:
            _logger.info(f"[{i}/{len(strategies)}] training {strategy}")
            err = work / f".{strategy}.error"
            err.unlink(missing_ok=True)
            p = ctx.Process(
                target=_child,
                args=(
                    str(data),
                    str(run),
                    cfg.to_dict(),
                    str(err),
                    logging_to_stderr(),
                    isinstance(base, TextTrainConfig),
                ),
            )
            p.start()
            p.join()
            if p.exitcode != 0:
                why = err.read_text() if err.exists() else f"exit code {p.exitcode}"
                raise EdgeTLError(
                    f"{strategy} failed: {why}; fix it and rerun with --resume (finished "
                    "strategies are kept)"
                )
        record = read_json(run, RUN_FILE, "run folder", "edge-tl train", "rerun compare")
        history = _history(run)
        row = {"strategy": strategy, **_row(record["metrics"]), "history": history}
        if "chosen" in record["metrics"]:  # auto: the strategy it chose
            row["chosen"] = record["metrics"]["chosen"]
        rows.append(row)
    result = {
        "data": str(data),
        "config": base.to_dict(),
        "rows": rows,
        "flags": negative_transfer(rows, threshold),
        "threshold": threshold,
    }
    if chosen is not None:
        result["select"] = chosen
    (work / COMPARE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (work / "compare.md").write_text(markdown(result) + "\n")
    plot_curves(rows, work / "curves.png", f"{base.backbone} on {Path(str(data)).name}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return result


def _finished(run: Path, cfg: TrainConfig) -> bool:
    try:
        record = json.loads((run / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    want = cfg.to_dict()  # auto records the chosen arm's config, and its own under "auto"
    return want in (record.get("config"), record.get("auto", {}).get("config"))


def _history(run: Path) -> list[dict[str, float]]:
    import csv

    with open(run / "history.csv", newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]


def _row(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "test_accuracy": m["test_accuracy"],
        "test_macro_f1": m.get("test_macro_f1"),
        "val_accuracy": m.get("val_accuracy"),
        "train_seconds": m.get("train_seconds"),
        "seconds_per_epoch": m.get("seconds_per_epoch"),
        "epochs_run": m.get("epochs_run", 1),
        "trainable_parameters": m.get("trainable_parameters"),
        "peak_rss_mb": m.get("peak_rss_mb"),
        "peak_gpu_mb": m.get("peak_gpu_mb"),
        "boundary": m.get("boundary"),
        "n_train": m.get("n_train"),
        "n_test": m.get("n_test"),
    }


def negative_transfer(rows: list[dict[str, Any]], threshold: float) -> list[str]:
    """Flags: from-scratch beats a transfer strategy, or transfer gains < ``threshold``."""
    scratch = next((r for r in rows if r["strategy"] == "from-scratch"), None)
    if scratch is None:
        return []
    flags = []
    transfer = [r for r in rows if r["strategy"] != "from-scratch"]
    for r in transfer:
        if scratch["test_accuracy"] >= r["test_accuracy"]:
            flags.append(
                f"negative transfer: from-scratch ({scratch['test_accuracy']:.4f}) matches or "
                f"beats {r['strategy']} ({r['test_accuracy']:.4f})"
            )
    if transfer:
        best = max(transfer, key=lambda r: r["test_accuracy"])
        gain = best["test_accuracy"] - scratch["test_accuracy"]
        if 0 < gain < threshold:
            flags.append(
                f"transfer gains only {100 * gain:.1f} pt over from-scratch (best: "
                f"{best['strategy']}); below the {100 * threshold:.1f} pt threshold"
            )
    return flags


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    gpu = any(r.get("peak_gpu_mb") for r in rows)
    head = [
        "strategy",
        "test acc",
        "macro-F1",
        "train s",
        "s/epoch",
        "epochs",
        "trainable params",
        "peak RSS MB",
    ] + (["peak GPU MB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = max(r["test_accuracy"] for r in rows)
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}" + (" **best**" if r["test_accuracy"] == best else "")
        cells = [
            r["strategy"] + (f" ({r['chosen']})" if r.get("chosen") else ""),
            acc,
            _f(r["test_macro_f1"]),
            _f(r["train_seconds"], "{:.0f}"),
            _f(r["seconds_per_epoch"], "{:.1f}"),
            str(int(r["epochs_run"])),
            f"{r['trainable_parameters']:,}",
            _f(r["peak_rss_mb"], "{:.0f}"),
        ] + ([_f(r.get("peak_gpu_mb"), "{:.0f}")] if gpu else [])
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]
    lines.append("")
    lines.append(f"n_train {n['n_train']}, n_test {n['n_test']}; data {result['data']}")
    checked = any(r["strategy"] == "from-scratch" for r in rows)
    if checked:
        none = "no negative transfer flagged"
    elif "text_column" in result["config"]:
        none = "negative transfer not checked: text models have no from-scratch baseline"
    else:
        none = "negative transfer not checked: add from-scratch to --strategies"
    for f in result["flags"] or [none]:
        lines.append(f"- {f}")
    if result.get("select"):
        from edge_tl.train.select import summary_line

        lines.append(f"- {summary_line(result['select'], result['flags'])}")
    return "\n".join(lines)


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    from edge_tl.plots import pyplot, save

    plt = pyplot()
    if plt is None:  # pragma: no cover - matplotlib is in the train extra
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for r in rows:
        h = r["history"]
        if h and "val_accuracy" in h[0]:
            ep = [x["epoch"] for x in h]
            ax_loss.plot(ep, [x["train_loss"] for x in h], "o-", label=r["strategy"])
            ax_acc.plot(ep, [x["val_accuracy"] for x in h], "o-", label=r["strategy"])
        elif r.get("val_accuracy") is not None:  # linear probe: one fit, drawn as a level
            ax_acc.axhline(r["val_accuracy"], ls="--", lw=1, color="grey", label=r["strategy"])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, title)
    return True
