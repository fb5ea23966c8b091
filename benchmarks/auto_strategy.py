"""``--strategy auto`` against each strategy alone, at 10, 30, 100 and all training images
per class, on NEU-DET, flowers5 and ELPV.

Every cell is an ordinary ``edge_tl.train.train`` run with the defaults (EfficientNet-Lite0,
8 epochs at most, patience 4) on one split per data set (stratified, test_frac 0.2,
val_frac 0.1, seed 0; ``train_per_class`` caps only the training split, so the validation
and test images are the same in every row). Held-out test accuracy is reported; nothing
is chosen on it. Each cell's result is written to the JSON file as soon as it finishes and
cells already there are skipped, so the table fills in over several short runs:

    flock /tmp/edge_tl_cpu.lock .venv/bin/python benchmarks/auto_strategy.py --max-minutes 9
    .venv/bin/python benchmarks/auto_strategy.py --table          # print what is there
    ... --only full --sets neu_det --sizes 100 --redo            # recompute some cells

``auto``'s cell: auto trains its candidates as ordinary runs of the explicit strategies
with the same settings and seed, so its choice is computed by ``edge_tl.train.auto.choose``
from the explicit cells' validation scores and its test accuracy is the chosen cell's. That
reuse is valid only if training is deterministic: ``--verify DATA:SIZE`` runs auto for real
on one cell and checks that every candidate it trained reproduces the stored explicit cell
(validation and test accuracy) and that it chose the same arm; the table says whether this
was verified. ``--real-auto`` trains auto for real in every cell instead.

Full fine-tuning of the whole flowers5 and ELPV training splits (~3,000 / ~1,800 images,
uncached, 8 epochs) does not fit a short run on 2 cores: these cells run only with
``--expensive``; the table prints the command that finishes a missing cell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.train import TrainConfig, train  # noqa: E402
from edge_tl.train.auto import AUTO_ARMS, arm_config, choose  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = {"neu_det": str(SHARED / "neu_det"), "flowers5": str(SHARED / "flowers5"), "elpv": "elpv"}
SIZES = (10, 30, 100, 0)  # 0: the whole training split
EXPLICIT = ("linear-probe", "finetune", "full")
STRATEGIES = (*EXPLICIT, "auto")
EXPENSIVE = {("flowers5", 0, "full"), ("elpv", 0, "full")}
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "auto_strategy.json"
SPLIT = {"test_frac": 0.2, "val_frac": 0.1, "seed": 0}


def _size_name(size: int) -> str:
    return "full" if size == 0 else str(size)


def _key(data: str, size: int, strategy: str) -> str:
    return f"{data}/{_size_name(size)}/{strategy}"


def _config(size: int, strategy: str) -> TrainConfig:
    base = TrainConfig(strategy="auto", train_per_class=size, **SPLIT)
    if strategy == "auto":
        return base
    arm = next(a for a in AUTO_ARMS if a.strategy == strategy)
    return arm_config(base, arm)  # the settings auto's arm trains with


def _train(data: str, size: int, strategy: str, work: Path) -> dict[str, Any]:
    m = train(SETS[data], work / "run", _config(size, strategy), force=True)
    keep = ("test_accuracy", "val_accuracy", "train_seconds", "n_train", "epochs_run")
    cell = {k: m.get(k) for k in keep}
    if strategy == "auto":
        cell.update(chosen=m["chosen"], why=m["why"], reused=False)
        cell["candidates"] = m["auto"]["candidates"]
    return cell


def _per_class(data: str, size: int) -> tuple[int, int]:
    """Training and validation images of the smallest class (auto's gates)."""
    import numpy as np

    from edge_tl.data import open_dataset, split

    ds = open_dataset(SETS[data])
    parts = split(ds, _config(size, "linear-probe").split)
    k = len(ds.classes)
    return tuple(int(np.bincount(ds.labels[parts[p]], minlength=k).min()) for p in ("train", "val"))


def _auto_from_cells(results: dict, data: str, size: int) -> dict[str, Any] | None:
    """Auto's cell from the explicit cells (None when a cell it needs is missing)."""
    missing = []

    def score(arm) -> float:
        cell = results.get(_key(data, size, arm.strategy))
        if cell is None:
            missing.append(arm.strategy)
            raise LookupError(arm.strategy)
        return cell["val_accuracy"]

    try:
        best, why, records = choose(*_per_class(data, size), score)
    except LookupError:
        return None
    chosen = results[_key(data, size, best.strategy)]
    return {
        "test_accuracy": chosen["test_accuracy"],
        "val_accuracy": chosen["val_accuracy"],
        "chosen": best.name,
        "why": why,
        "candidates": records,
        "train_seconds": sum(
            results[_key(data, size, a.strategy)]["train_seconds"]
            for a in AUTO_ARMS
            if "val_accuracy" in records.get(a.name, {})
        ),
        "reused": True,
    }


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _verify(results: dict, spec: str, work: Path) -> dict[str, Any]:
    data, size_s = spec.split(":")
    size = 0 if size_s == "full" else int(size_s)
    print(f"verify: auto for real on {data} at {size_s} per class ...", flush=True)
    cell = _train(data, size, "auto", work)
    checks = []
    for name, rec in cell["candidates"].items():
        if "val_accuracy" not in rec:
            continue
        stored = results.get(_key(data, size, name))
        if stored is None:
            checks.append(f"{name}: no stored cell to compare")
            continue
        same = stored["val_accuracy"] == rec["val_accuracy"]
        checks.append(f"{name}: val {rec['val_accuracy']:.4f} vs {stored['val_accuracy']:.4f}")
        if not same:
            checks[-1] += " DIFFERENT"
    reused = _auto_from_cells(results, data, size)
    ok = (
        reused is not None
        and reused["chosen"] == cell["chosen"]
        and reused["test_accuracy"] == cell["test_accuracy"]
        and not any("DIFFERENT" in c or "no stored" in c for c in checks)
    )
    return {"cell": f"{data}:{size_s}", "deterministic": ok, "checks": checks, "real": cell}


def table(results: dict, sets: list[str]) -> str:
    verified = results.get("_verify", {})
    lines = []
    for data in sets:
        lines.append(f"\n{data} (held-out accuracy, %; stratified test 0.2 / val 0.1, seed 0)\n")
        lines.append(
            "| train / class | " + " | ".join(STRATEGIES) + " | best explicit | auto gap |"
        )
        lines.append("|---|" + "---|" * (len(STRATEGIES) + 2))
        for size in SIZES:
            cells = {s: results.get(_key(data, size, s)) for s in EXPLICIT}
            auto = results.get(_key(data, size, "auto")) or _auto_from_cells(results, data, size)
            row = [_size_name(size)]
            for s in EXPLICIT:
                c = cells[s]
                row.append("not measured" if c is None else f"{100 * c['test_accuracy']:.1f}")
            if auto is None:
                row.append("not measured")
            else:
                mark = "" if auto.get("reused") is False else "*"
                row.append(f"{100 * auto['test_accuracy']:.1f} ({auto['chosen']}){mark}")
            done = {s: c for s, c in cells.items() if c is not None}
            if len(done) == len(EXPLICIT):
                best = max(done, key=lambda s: done[s]["test_accuracy"])
                row.append(f"{best} {100 * done[best]['test_accuracy']:.1f}")
                if auto is not None:
                    gap = 100 * (auto["test_accuracy"] - done[best]["test_accuracy"])
                    row.append(f"{gap:+.1f}" + ("" if gap >= -1.0 else " (over 1 pt)"))
                else:
                    row.append("-")
            else:
                row += ["-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if verified:
        v = verified
        lines.append(
            f"* auto's choice computed from the explicit cells' validation scores; training "
            f"determinism {'verified' if v['deterministic'] else 'NOT verified'} by a real "
            f"auto run on {v['cell']}: {'; '.join(v['checks'])}"
        )
    else:
        lines.append("* auto's choice computed from the explicit cells (determinism not verified)")
    missing = [
        (d, s, st) for d in sets for s in SIZES for st in EXPLICIT if _key(d, s, st) not in results
    ]
    cmd = "flock /tmp/edge_tl_cpu.lock .venv/bin/python benchmarks/auto_strategy.py"
    cheap = [m for m in missing if m not in EXPENSIVE]
    costly = [m for m in missing if m in EXPENSIVE]
    if cheap:
        lines.append(
            f"{len(cheap)} cell(s) not measured yet; rerun `{cmd} --max-minutes 9` until none is"
        )
    if costly:
        names = ",".join(sorted({d for d, _, _ in costly}))
        lines.append(
            f"not measured (full fine-tuning of the whole training split, longer than a "
            f"10-minute chunk on 2 cores): `{cmd} --expensive --only full --sets {names} "
            "--sizes full`"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--sizes", default="10,30,100,full")
    p.add_argument("--only", help="strategies to compute, e.g. full,finetune")
    p.add_argument("--redo", action="store_true", help="recompute cells already there")
    p.add_argument("--max-minutes", type=float, default=0, help="start no cell after this")
    p.add_argument("--expensive", action="store_true", help="also full fine-tuning, full sets")
    p.add_argument("--verify", metavar="DATA:SIZE", help="run auto for real on one cell")
    p.add_argument("--real-auto", action="store_true", help="train auto in every cell")
    p.add_argument("--table", action="store_true", help="print the table only")
    args = p.parse_args()
    sets = args.sets.split(",")
    sizes = [0 if s == "full" else int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        if args.verify and not args.table:
            results["_verify"] = v = _verify(results, args.verify, Path(tmp))
            data, size_s = args.verify.split(":")
            results[_key(data, 0 if size_s == "full" else int(size_s), "auto")] = v["real"]
            _save(args.json, results)
        only = args.only.split(",") if args.only else list(EXPLICIT)
        if args.real_auto and "auto" not in only:
            only.append("auto")
        for size in sizes:
            for data in sets:
                for strategy in only:
                    if args.table or args.verify:
                        break
                    key = _key(data, size, strategy)
                    if key in results and not args.redo:
                        continue
                    if (data, size, strategy) in EXPENSIVE and not args.expensive:
                        continue
                    if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
                        print(f"time is up ({args.max_minutes} min); rerun to continue")
                        print(table(results, sets))
                        return 0
                    print(f"{key} ...", file=sys.stderr, flush=True)
                    results[key] = _train(data, size, strategy, Path(tmp))
                    print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
                    _save(args.json, results)
    print(table(results, sets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
