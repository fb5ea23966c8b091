"""Exports that reuse their work, measured: several recipes of one run exported one by one
(cold cache each, the one-at-a-time-in-FP32 sensitivity pass: the path before the export
cache) against one ``export_bundles`` call (shared work, the one-pass-per-layer ranking),
side by side in one process; and the convolution ranking checked against the full pass.

    python benchmarks/export_speed.py speed RUN [--recipes onnx-fp32,ort-int8,openvino-int8]
        [--out DIR] [--profile DIR]
    python benchmarks/export_speed.py ranking RUN [RUN ...]

``speed`` prints each export's seconds, the ratio (separate / shared) and each recipe's
fidelity verdict both ways; with ``--profile`` it also writes cProfile statistics of the
separate ort-int8 export and of the shared call (with ``--after-single``, of a single
ort-int8 export after it too, warm cache), with their top entries (the profiler's overhead
is in those timings). ``ranking`` prints, per run, the time of both sensitivity
passes, their Spearman rank correlation, and for k = 1, 2, 4, 8, 16 the fidelity verdict
(cosine and top-1 drop of the run's head on the held-out split, at the recipe's
tolerance) of the ort-int8 artifact with each ranking's top k convolutions kept in FP32.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge_tl.export import accuracy_control, export_bundle, export_bundles  # noqa: E402
from edge_tl.export.accuracy_control import ToleranceError  # noqa: E402
from edge_tl.export.cache import CACHE_DIR  # noqa: E402
from edge_tl.report import read_report  # noqa: E402


def _verdict(bundle: Path) -> tuple[str, float, float | None]:
    report = read_report(bundle)
    assert report is not None
    art = report.artifacts[report.recipe]
    return report.verdict, art.cosine_mean, art.accuracy_own_head


def _top(prof: cProfile.Profile, path: Path, n: int = 14) -> str:
    prof.dump_stats(str(path))
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


def speed(
    run: Path, recipes: list[str], out: Path, profile: Path | None, after_single: bool
) -> None:
    shutil.rmtree(out, ignore_errors=True)
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    verdicts: dict[str, dict[str, str]] = {r: {} for r in recipes}
    before: dict[str, float] = {}
    rankings: dict[str, list[dict]] = {}  # what each ladder's sensitivity pass ranked

    def recording(rank, key):
        def run(c, base):
            t0 = time.perf_counter()
            out = rank(c, base)
            rankings[key] = out
            print(f"{key} sensitivity pass: {time.perf_counter() - t0:.1f} s", flush=True)
            return out

        return run

    accuracy_control.ort_sensitivity_full = recording(accuracy_control.ort_sensitivity_full, "full")
    accuracy_control.ort_sensitivity = recording(accuracy_control.ort_sensitivity, "one-pass")
    accuracy_control.SENSITIVITY = "full"
    for r in recipes:
        shutil.rmtree(run / CACHE_DIR, ignore_errors=True)
        prof = cProfile.Profile() if profile is not None and r == "ort-int8" else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        try:
            export_bundle(out / "separate" / r, r, run=run, cache=False)
            v = _verdict(out / "separate" / r)
            verdicts[r]["separate"] = f"{v[0]} (cosine {v[1]:.4f}, accuracy {v[2]})"
        except ToleranceError as e:
            verdicts[r]["separate"] = f"refused after {len(e.attempts)} tries"
        if prof is not None:
            prof.disable()
            print("profile, separate ort-int8 export (full sensitivity pass, no cache):")
            print(_top(prof, profile / "ort-int8-before.prof"))
        before[r] = time.perf_counter() - t0
        print(f"separate {r}: {before[r]:.1f} s", flush=True)
    accuracy_control.SENSITIVITY = "one-pass"
    shutil.rmtree(run / CACHE_DIR, ignore_errors=True)
    prof = cProfile.Profile() if profile is not None else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    results = export_bundles(out / "shared", recipes, run=run)
    shared = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        print("profile, one call for every recipe (one-pass sensitivity, cold cache):")
        print(_top(prof, profile / "shared.prof"))
    for res in results:
        if res.manifest is None:
            assert res.refused is not None
            verdicts[res.recipe]["shared"] = f"refused after {len(res.refused.attempts)} tries"
        else:
            v = _verdict(res.out)
            verdicts[res.recipe]["shared"] = f"{v[0]} (cosine {v[1]:.4f}, accuracy {v[2]})"
    total = sum(before.values())
    print(f"\nrun {run}; host {os.uname().nodename}, {os.cpu_count()} CPUs")
    print(f"{'recipe':<15}{'separate s':>11}  verdict separate | verdict shared")
    for r in recipes:
        print(f"{r:<15}{before[r]:>11.1f}  {verdicts[r]['separate']} | {verdicts[r]['shared']}")
    print(f"separate total {total:.1f} s; one call {shared:.1f} s; ratio {total / shared:.2f}x")
    same = all(
        v["separate"].split(" (")[0] == v["shared"].split(" (")[0] for v in verdicts.values()
    )
    print(f"same fidelity verdicts: {same}")
    if len(rankings) == 2:
        from scipy.stats import spearmanr

        a = {r["name"]: r["loss"] for r in rankings["one-pass"]}
        b = {r["name"]: r["gain"] for r in rankings["full"]}
        rho = spearmanr([a[n] for n in b], [b[n] for n in b]).statistic
        top = len({r["name"] for r in rankings["one-pass"][:16]} & set(list(b)[:16]))
        print(f"ranking one-pass vs full: Spearman {rho:.3f}, top-16 overlap {top}/16")
    if after_single and profile is not None and "ort-int8" in recipes:
        prof = cProfile.Profile()
        prof.enable()
        export_bundle(out / "single-after", "ort-int8", run=run, force=True)
        prof.disable()
        print("profile, single ort-int8 export after (one-pass sensitivity, warm cache):")
        print(_top(prof, profile / "ort-int8-after.prof"))


def ranking(runs: list[Path]) -> None:
    from scipy.stats import spearmanr

    from edge_tl.export.accuracy_control import AccuracyControl
    from edge_tl.export.fidelity import Images, accuracy, cosine, embed, torch_runner
    from edge_tl.export.graph import export_onnx
    from edge_tl.export.quantize import quantize_ort
    from edge_tl.export.sensitivity import ort_sensitivity, ort_sensitivity_full
    from edge_tl.export.source import calibration_pool, calibration_sample, open_run
    from edge_tl.runtime.engine import DISABLED_OPTIMIZERS, OrtEngine
    from edge_tl.spec import EMBEDDING, load_recipe

    for run in runs:
        src = open_run(run, None, "source")
        pre = src.features.spec.preprocess
        rec = load_recipe("ort-int8")
        opts = {**rec.engine_options, DISABLED_OPTIMIZERS: "WeightBiasQuantization"}
        rec = dataclasses.replace(rec, engine_options=opts)
        pool, _ = calibration_pool(None, src.fit_set)
        calib = Images(calibration_sample(pool, rec.calibration_size, True), pre).inputs()
        assert src.held_out is not None
        check = Images(list(src.held_out.paths), pre, src.held_out.labels)
        ref = embed(torch_runner(src.features), check)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            export_onnx(src.features, work / "fp32.onnx", pre.size)
            c = AccuracyControl(work / "fp32.onnx", rec, calib, work, work, check, ref, None, None)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            one = ort_sensitivity(c, rec)
            t_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            full = ort_sensitivity_full(c, rec)
            t_full = time.perf_counter() - t0
            a = {r["name"]: r["loss"] for r in one}
            b = {r["name"]: r["gain"] for r in full}
            names = list(b)
            rho = spearmanr([a[n] for n in names], [b[n] for n in names]).statistic
            print(
                f"\n{run} ({src.name}, {len(names)} convolutions, {len(check)} held-out): "
                f"one-pass {t_one:.1f} s, full {t_full:.1f} s ({t_full / t_one:.1f}x); "
                f"Spearman {rho:.3f}"
            )
            print("top 8 one-pass:", [r["index"] for r in one[:8]])
            print("top 8 full:    ", [r["index"] for r in full[:8]])
            labels = check.labels
            ref_acc = accuracy(src.head, ref, labels)
            trial = work / "k.onnx"
            print(f"{'k':>3} {'one-pass: cos, drop, verdict':>34} {'full: cos, drop, verdict':>34}")
            for k in (1, 2, 4, 8, 16):
                cells = []
                for ranked in (one, full):
                    names_k = tuple(r["name"] for r in ranked[:k])
                    quantize_ort(
                        work / "fp32.onnx",
                        trial,
                        calib,
                        dataclasses.replace(rec, nodes_to_exclude=names_k),
                        work,
                    )
                    eng = OrtEngine(trial, rec.engine_options)
                    emb = embed(lambda x, e=eng: e.run(x, (EMBEDDING,))[EMBEDDING], check)
                    cos = float(cosine(emb, ref).mean())
                    drop = ref_acc - accuracy(src.head, emb, labels)
                    ok = cos >= rec.min_cosine and drop <= rec.max_top1_drop + 1e-9
                    cells.append(f"{cos:.4f}, {drop * 100:+.1f} pt, {'pass' if ok else 'miss'}")
                print(f"{k:>3} {cells[0]:>34} {cells[1]:>34}")
            top16 = len({r["name"] for r in one[:16]} & {r["name"] for r in full[:16]})
            print(f"top-16 overlap {top16}/16; mean loss {np.mean(list(a.values())):.5f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("run", type=Path)
    s.add_argument("--recipes", default="onnx-fp32,ort-int8,openvino-int8")
    s.add_argument("--out", type=Path, default=Path("export-speed-bundles"))
    s.add_argument("--profile", type=Path, help="write cProfile statistics here")
    s.add_argument(
        "--after-single",
        action="store_true",
        help="with --profile: also profile a single ort-int8 export after (warm cache)",
    )
    r = sub.add_parser("ranking")
    r.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    if args.what == "speed":
        speed(args.run, args.recipes.split(","), args.out, args.profile, args.after_single)
    else:
        ranking(args.runs)


if __name__ == "__main__":
    main()
