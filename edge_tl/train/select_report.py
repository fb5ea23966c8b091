"""What a selection reads as: ``select.json``, ``select.md`` and ``select.png``
(:func:`write_selection`), its Markdown table (:func:`markdown`), the plot of score against
fine-tuned accuracy (:func:`plot_selection`), and what ``compare`` prints of it
(:func:`select_summary`, :func:`summary_line`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_tl.bundle import atomic_folder
from edge_tl.errors import EdgeTLError
from edge_tl.train.select_records import METRICS, SELECT_FILE, Selection, _ranked, _same_data

__all__ = ["markdown", "plot_selection", "select_summary", "summary_line", "write_selection"]


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
