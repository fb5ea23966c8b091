"""Peak memory of building an anomaly bank from N good images: the all-in-memory build
(every image's features at once, then ``anomaly.build``) against the shipped streaming
build (``AnomalyDetector.fit``: one chunk of features at a time, see
``edge_tl/runtime/streaming.py``), side by side, each build in a fresh process.

On ``../shared/data/magnetic_tile``'s 679 good training tiles through the pretrained
EfficientNet-Lite0 ORT INT8 bundle (default bank: stride-16 features, k-centre 50 %, cap 16
MB at half precision). Above 679 images the extra good images are the tiles flipped
left-right, then flipped top-bottom, then turned 180 degrees (written once to ``--work``):
distinct pictures (a pixel-equal copy would be dropped by the duplicate check) of the same
kind of part. Peak RSS is the process's ``ru_maxrss``; "before" is the RSS with the bundle
loaded and nothing built. With ``--evaluate`` the banks built from the 679 real tiles are
also scored on the test set (image / pixel AUROC, false alarms at the 1 % threshold).

    .venv/bin/python benchmarks/anomaly_memory.py [--sizes 100,300,679,1000,2000]
        [--builds memory,streaming] [--evaluate] [--work /tmp/edge_tl_anomaly]
        [--json results.json]   # resumes: sizes already in --json are not rebuilt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
ROOT = Path(__file__).resolve().parents[1]
BUILDS = ("memory", "streaming")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def good_pool(work: Path, n: int) -> list[str]:
    """The first ``n`` of: the good training tiles, then their left-right, top-bottom and
    180-degree versions (written as JPEG under ``work/extra_good`` when first needed)."""
    from PIL import Image, ImageOps

    from edge_tl.runtime import anomaly as an

    orig, _ = an.good_images(DATA)
    out = list(orig)
    extra = work / "extra_good"
    ops = (
        ("lr", ImageOps.mirror),
        ("tb", ImageOps.flip),
        ("r180", lambda im: im.rotate(180)),
    )
    for tag, op in ops:
        if len(out) >= n:
            break
        for p in orig:
            if len(out) >= n:
                break
            dst = extra / f"{Path(p).stem}_{tag}.jpg"
            if not dst.is_file():
                extra.mkdir(parents=True, exist_ok=True)
                with Image.open(p) as im:
                    op(im.convert("RGB")).save(dst, quality=95)
            out.append(str(dst))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct good images can be made; ask for fewer")
    return out[:n]


def one(work: Path, n: int, build: str, evaluate: bool) -> dict:
    """One build in this process; its figures as a dict (printed as JSON by ``--one``)."""
    from edge_tl.runtime import Model
    from edge_tl.runtime import anomaly as an

    paths = good_pool(work, n)
    dst = work / f"bundle-{build}-{n}"
    shutil.rmtree(dst, ignore_errors=True)
    from magnetic_tile import bundle

    shutil.copytree(bundle(work), dst, ignore=shutil.ignore_patterns("anomaly"))
    model = Model(dst, self_test=False)
    model.engine  # noqa: B018 - the session opened before "before"
    before = rss_mb()
    t0 = time.perf_counter()
    det = model.detector
    if build == "streaming":
        state = det.fit(paths)
    else:  # the all-in-memory build: every image's features, then one coreset
        kept, digests, _ = an.unique_images(paths)
        feats = model.patch_features(kept)
        state = det._commit(an.build(feats, det._grid(an.DEFAULT_STAGES), digests=digests), "build")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "n": n,
        "images": len(state.loo_maps),
        "build": build,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "seconds": seconds,
        "bank_patches": len(state.bank),
        "bank_mb": state.bank_mb,
        "threshold": state.threshold,
    }
    if evaluate:
        r = Model(dst).detector.evaluate(DATA)
        out.update(
            image_auroc=r.image_auroc,
            pixel_auroc=r.pixel_auroc,
            false_alarm_rate=r.false_alarm_rate,
        )
    shutil.rmtree(dst, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly"))
    ap.add_argument("--sizes", default="100,300,679,1000,2000")
    ap.add_argument("--builds", default=",".join(BUILDS))
    ap.add_argument("--evaluate", action="store_true", help="score the 679-image banks")
    ap.add_argument("--json", type=Path, help="results file (read first: done runs are kept)")
    ap.add_argument("--one", nargs=2, metavar=("N", "BUILD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        n, build = int(args.one[0]), args.one[1]
        print(json.dumps(one(args.work, n, build, args.evaluate and n == 679)))
        return
    res = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    from magnetic_tile import bundle

    bundle(args.work)
    for n in (int(s) for s in args.sizes.split(",")):
        good_pool(args.work, n)
        for build in args.builds.split(","):
            key = f"{n} {build}"
            if key in res:
                continue
            print(f"  N={n} {build}", flush=True)
            cmd = [sys.executable, __file__, "--work", str(args.work), "--one", str(n), build]
            if args.evaluate:
                cmd.append("--evaluate")
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if p.returncode:
                raise SystemExit(f"N={n} {build} failed:\n{p.stderr[-2000:]}")
            res[key] = json.loads(p.stdout.strip().splitlines()[-1])
            if args.json:
                args.json.write_text(json.dumps(res, indent=1))
    print("\n| N good images | build | peak RSS MB | RSS before build MB | build growth MB "
          "| build s | bank patches | threshold |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(res.values(), key=lambda r: (r["n"], r["build"])):
        print(
            f"| {r['n']} | {r['build']} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} | {r['seconds']:.1f} | "
            f"{r['bank_patches']} | {r['threshold']:.3f} |"
        )
    ns = sorted({r["n"] for r in res.values()})
    ratios = [
        f"N={n}: {res[f'{n} streaming']['seconds'] / res[f'{n} memory']['seconds']:.2f}"
        for n in ns
        if f"{n} streaming" in res and f"{n} memory" in res
    ]
    print("build time, streaming / in memory: " + ", ".join(ratios))
    for build in BUILDS:
        r = res.get(f"679 {build}", {})
        if "image_auroc" in r:
            print(
                f"679 real tiles, {build}: image AUROC {r['image_auroc']:.4f}, pixel AUROC "
                f"{r['pixel_auroc']:.4f}, false alarms {r['false_alarm_rate']:.1%} (target 1 %)"
            )


if __name__ == "__main__":
    main()
