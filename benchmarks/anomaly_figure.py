"""The README's anomaly figure: for each magnetic-tile defect type, one good test tile and
one defective test tile with their heat maps (``docs/anomaly_magnetic_tile.png``).

Examples are not picked by eye: the defective tile of each type is the one with the median
score among that type's test tiles, the good tiles are the good test tiles at the 10th,
30th, 50th, 70th and 90th percentile of the good scores. Each panel is the overlay that
``edge-tl predict --maps`` writes (the tile beside itself under the map, 15 % opaque at 0
up to 75 % at 1.5x the threshold; the true defect outlined in green), scaled to one height.

    edge-tl anomaly BUNDLE ../shared/data/magnetic_tile      # a bank from train/good
    .venv/bin/python benchmarks/anomaly_figure.py BUNDLE [--out docs/anomaly_magnetic_tile.png]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from PIL import Image, ImageDraw

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime import evaluation as ev  # noqa: E402
from edge_tl.runtime.overlay import overlay  # noqa: E402
from edge_tl.runtime.preprocess import load_image  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
ROOT = Path(__file__).resolve().parents[1]
HEIGHT = 150


def panel(det, item: ev.TestItem, thr: float, title: str) -> Image.Image:
    (v,) = det.predict([item.path], maps=True)
    img = load_image(item.path)
    mask = ev.load_mask(item.mask) if item.mask else None
    im = overlay(img, v.map, thr, v.score, mask)
    im = im.resize((max(1, round(im.width * HEIGHT / im.height)), HEIGHT), Image.BILINEAR)
    out = Image.new("RGB", (im.width, HEIGHT + 14), "white")
    out.paste(im, (0, 14))
    ImageDraw.Draw(out).text((2, 1), title, "black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a bundle with a bank built on train/good")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "anomaly_magnetic_tile.png")
    args = ap.parse_args()
    det = Model(args.bundle).detector
    thr = det.require().threshold
    items, _ = ev.mvtec_test(args.data)
    verdicts = det.predict([it.path for it in items])
    scores = {it.path: v.score for it, v in zip(items, verdicts, strict=True)}
    good = sorted((it for it in items if it.defect == ev.GOOD), key=lambda it: scores[it.path])
    defects = sorted({it.defect for it in items} - {ev.GOOD})
    rows = []
    for i, d in enumerate(defects):
        of = sorted((it for it in items if it.defect == d), key=lambda it: scores[it.path])
        bad = of[len(of) // 2]
        g = good[min(len(good) - 1, int((0.1 + 0.2 * i) * len(good)))]
        rows.append(
            (
                panel(det, g, thr, f"good ({Path(g.path).stem})"),
                panel(det, bad, thr, f"{d}, median score of its {len(of)} ({Path(bad.path).stem})"),
            )
        )
    w0 = max(a.width for a, _ in rows)
    width = w0 + 12 + max(b.width for _, b in rows)
    fig = Image.new("RGB", (width, len(rows) * (HEIGHT + 20)), "white")
    for r, (a, b) in enumerate(rows):
        fig.paste(a, (0, r * (HEIGHT + 20)))
        fig.paste(b, (w0 + 12, r * (HEIGHT + 20)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.quantize(256, Image.Quantize.MEDIANCUT).save(args.out, optimize=True)  # < 500 KB
    print(f"{args.out}: {fig.size[0]}x{fig.size[1]}, {args.out.stat().st_size / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
