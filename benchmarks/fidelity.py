"""INT8 you can trust, measured: export trained runs with the default INT8 recipes and print
each bundle's fidelity against FP32 PyTorch side by side.

Per run and recipe: embedding cosine (mean / min) on the held-out split, top-1 accuracy with
the run's own head (trained on FP32 embeddings) and with the head refit on the artifact's
embeddings, the drop of each vs FP32, batch-1 latency of the artifact next to ONNX FP32
(interleaved in one run: their ratio is what to compare on a noisy host), the
accuracy-control step that passed, and the spread over three calibration subsets.

    python benchmarks/fidelity.py RUN [RUN ...] [--recipes ort-int8,openvino-int8] [--out DIR]

Each bundle (with its fidelity.json / .md / .png) is kept in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.export import export_bundle  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders from `edge-tl train`")
    p.add_argument("--recipes", default="ort-int8,openvino-int8")
    p.add_argument("--out", type=Path, default=Path("fidelity-bundles"))
    args = p.parse_args()
    rows = []
    for run in args.runs:
        for recipe in args.recipes.split(","):
            bundle = args.out / f"{run.name}-{recipe}"
            t0 = time.perf_counter()
            try:
                export_bundle(bundle, recipe, run=run, force=True)
            except EdgeTLError as e:
                rows.append({"run": run.name, "recipe": recipe, "refused": str(e)})
                continue
            report = json.loads((bundle / "fidelity.json").read_text())
            art, ref = report["artifacts"][recipe], report["artifacts"]["pytorch-fp32"]
            onnx = report["artifacts"]["onnx-fp32"]
            spread = report.get("calibration_sensitivity") or {}
            rows.append(
                {
                    "run": run.name,
                    "recipe": recipe,
                    "n": report["n_images"],
                    "cos_mean": art["cosine_mean"],
                    "cos_min": art["cosine_min"],
                    "fp32_acc_fp32_head": ref["accuracy_fp32_head"],
                    "acc_fp32_head": art["accuracy_fp32_head"],
                    "fp32_acc_own_head": ref["accuracy_own_head"],
                    "acc_own_head": art["accuracy_own_head"],
                    "ms_int8": art["latency_ms"],
                    "ms_fp32": onnx["latency_ms"],
                    "step": report["accuracy_control"][-1]["step"],
                    "tries": len(report["accuracy_control"]),
                    "calib_spread": spread.get("accuracy_spread"),
                    "export_s": round(time.perf_counter() - t0),
                }
            )
    print(
        "| run | recipe | n | cosine mean / min | top-1 FP32 head: FP32 → INT8 | "
        "top-1 own head: FP32 → INT8 | ms INT8 / FP32 (ratio) | accuracy control | "
        "calib. spread | export s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['run']} | {r['recipe']} | refused: {r['refused']} |||||||")
            continue
        pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
        print(
            f"| {r['run']} | {r['recipe']} | {r['n']} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} "
            f"| {pct(r['fp32_acc_fp32_head'])} → {pct(r['acc_fp32_head'])} "
            f"({100 * (r['acc_fp32_head'] - r['fp32_acc_fp32_head']):+.2f} pt) "
            f"| {pct(r['fp32_acc_own_head'])} → {pct(r['acc_own_head'])} "
            f"({100 * (r['acc_own_head'] - r['fp32_acc_own_head']):+.2f} pt) "
            f"| {r['ms_int8']:.1f} / {r['ms_fp32']:.1f} ({r['ms_int8'] / r['ms_fp32']:.2f}) "
            f"| {r['step']} ({r['tries']} tries) "
            f"| {'–' if r['calib_spread'] is None else pct(r['calib_spread'])} pt "
            f"| {r['export_s']} |"
        )
    (args.out / "fidelity_summary.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
