"""Choosing the pre-trained backbone: LogME / LEEP / H-score rankings from frozen features vs
fine-tuned accuracy, and the seconds each costs.

For each data set and every image backbone with pretrained weights on this machine:

- fine-tuned accuracy: `edge-tl train DATA --backbone B --strategy finetune --train-stages 1
  --epochs 3 --train-per-class 100 --seed 0` (the last stage and the head, 3 epochs, at most
  100 training images per class; the test split is the usual 20 %), and its seconds (the
  run's train_seconds: caching the frozen part, then training);
- `edge-tl select DATA --per-class P --results RUN...` (all backbones, P images per class,
  seeded), its seconds per backbone, the weighted Kendall tau of each score against the
  fine-tuned accuracies, and the random-init baseline (negative transfer).

Reference scale: thuml's re-run over 10 ImageNet models and 8 data sets gives LogME a mean
weighted tau of 0.67, LEEP 0.29 (with many more models than the four here).

    .venv/bin/python benchmarks/transferability.py                     # NEU-DET, flowers5, ELPV
    .venv/bin/python benchmarks/transferability.py --data neu_det --work /tmp/tr
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.backbones import offline_backbones  # noqa: E402
from edge_tl.train import TrainConfig, train  # noqa: E402
from edge_tl.train.select import (  # noqa: E402
    METRICS,
    markdown,
    read_results,
    select,
    with_results,
    write_selection,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = {
    "neu_det": str(SHARED / "neu_det"),
    "flowers5": str(SHARED / "flowers5"),
    "elpv": "elpv",
}
FINETUNE = {"strategy": "finetune", "train_stages": 1, "epochs": 3, "train_per_class": 100}


def finetune(data: str, backbone: str, out: Path) -> None:
    """Train unless ``out`` holds a finished run with these settings (the CLI's runs count)."""
    record = out / "run.json"
    want = {"backbone": backbone, "seed": 0, **FINETUNE}
    if record.is_file():
        cfg = json.loads(record.read_text())["config"]
        if all(cfg.get(k) == v for k, v in want.items()):
            return
    train(data, out, TrainConfig(**want), force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=",".join(DATA), help="comma-separated: " + ", ".join(DATA))
    ap.add_argument("--backbones", default=None, help="default: every one with weights here")
    ap.add_argument("--per-class", type=int, default=300, help="images per class for select")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_transferability"))
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--until", help="HH:MM (UTC): start no data set after this time")
    args = ap.parse_args()
    backbones = args.backbones.split(",") if args.backbones else offline_backbones()
    summary = {}
    for key in args.data.split(","):
        if args.until and time.strftime("%H:%M", time.gmtime()) >= args.until:
            print(f"past {args.until} UTC: {key} not started", flush=True)
            break
        data = DATA[key]
        sel = select(data, backbones, per_class=args.per_class)  # first: the cheap answer
        print(f"\n## {key}: select alone\n\n{markdown(sel)}\n", flush=True)
        runs = []
        for b in backbones:
            run = args.work / "ft" / f"{key}__{b}"
            finetune(data, b, run)
            runs.append(run)
        finetuned, flags = read_results(runs, data)
        sel = with_results(sel, finetuned, flags, [str(r) for r in runs])
        write_selection(sel, args.work / "select" / key, force=True)
        print(f"\n## {key}\n\n{markdown(sel)}\n", flush=True)
        summary[key] = sel.to_dict()
        if args.json:  # after each data set, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps({"per_data": summary}, indent=2))
    print("| data | " + " | ".join(f"tau {m}" for m in METRICS) + " | select s | fine-tune s |")
    print("|---|" + "---|" * (len(METRICS) + 2))
    for key, s in summary.items():
        taus = " | ".join(f"{s['weighted_tau'].get(m, float('nan')):+.3f}" for m in METRICS)
        sel_s = sum(r["seconds"] for r in s["rows"]) + (s["baseline"] or {}).get("seconds", 0)
        ft_s = sum(r["finetune_seconds"] or 0 for r in s["rows"])
        print(f"| {key} | {taus} | {sel_s:.0f} | {ft_s:.0f} |")
    means = {
        m: sum(s["weighted_tau"].get(m, 0) for s in summary.values()) / max(len(summary), 1)
        for m in METRICS
    }
    print("mean weighted tau: " + ", ".join(f"{m} {v:+.3f}" for m, v in means.items()))
    if args.json:
        args.json.write_text(json.dumps({"per_data": summary, "mean_tau": means}, indent=2))


if __name__ == "__main__":
    main()
