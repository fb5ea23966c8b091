"""Does scoring magnetic tiles at their own aspect and a fixed scale, or pooling each patch
over a wider neighbourhood, localise defects better than squashing every tile to 224 x 224
with 3 x 3 pooling? One run, every scale and pooling side by side.

The tiles are 103-620 px wide and 222-403 px high; squashed to 224 x 224 a wide tile's
grinding texture is compressed 2.8x across and a narrow one's stretched 2x, so the bank sees
one texture at many scales. Here each tile is instead resized by one factor for the whole
data set (each side rounded to a multiple of 32), so the texture keeps one scale, and the
stride-16 grid follows the tile's shape. Same features (FP32 PyTorch EfficientNet-Lite0,
stride 16, 3 x 3 mean, standardised per channel on the good patches), bank (every good
training patch, or ``--bank N`` of them at random) and exact nearest-neighbour search for
every row; the map is the raw distance (sigma one cell), so the per-position normalisation
(which needs one grid for all tiles) is left out of every row alike, and the image score is
the map's maximum. ``--pools 3,7`` scores each scale again with each
neighbourhood (``k x k`` mean before standardising; the shipped default is 3). Figures on
the 665 test tiles: image AUROC, pooled pixel AUROC, and pixel AUROC inside the defective
tiles per type (``magnetic_tile.Test.within_image``).

    .venv/bin/python benchmarks/anomaly_aspect.py [--scales squash,0.7,1.0] [--pools 3]
        [--bank 140000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("EDGE_TL_QUIET", "1")

from magnetic_tile import DATA, Test  # noqa: E402

from edge_tl.runtime import anomaly as an  # noqa: E402
from edge_tl.runtime import evaluation as ev  # noqa: E402
from edge_tl.runtime import patchcore as pc  # noqa: E402

SQUASH = "squash"


def input_size(w: int, h: int, scale: str) -> tuple[int, int]:
    """The ``(width, height)`` a ``w x h`` tile is resized to: 224 x 224 for ``squash``,
    else each side times ``scale``, rounded to a multiple of 32 (at least 32)."""
    if scale == SQUASH:
        return 224, 224
    s = float(scale)
    return max(32, round(w * s / 32) * 32), max(32, round(h * s / 32) * 32)


def features(paths: list[str], scale: str, work: Path, tag: str) -> list[np.ndarray]:
    """Each tile's stride-16 output ``float16[112, h, w]`` (cached under ``work``)."""
    cache = work / f"aspect_{scale}.{tag}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return [z[str(i)] for i in range(len(z.files))]
    import torch

    from edge_tl.backbones import build

    torch.set_num_threads(2)
    model = build("efficientnet_lite0")[0].eval()
    pre = model.spec.preprocess
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    out = []
    with torch.no_grad():
        for p in paths:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            x = np.asarray(rgb.resize(input_size(*rgb.size, scale), Image.BILINEAR), np.float32)
            x = (x.transpose(2, 0, 1) - mean) / std
            _, _, s16 = model(torch.from_numpy(x[None]))
            out.append(s16[0].numpy().astype(np.float16))
    np.savez(cache, **{str(i): a for i, a in enumerate(out)})
    return out


def rows(maps: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([m.reshape(m.shape[0], -1).T for m in maps])


def score(scale: str, pool: int, train: list[str], test: Test, work: Path, bank_size: int) -> dict:
    """Figures of one scale and pooling (see the module's docstring)."""
    t0 = time.perf_counter()
    tr = [
        pc.avg_pool(f[None].astype(np.float32), pool)[0] for f in features(train, scale, work, "tr")
    ]
    te = [
        pc.avg_pool(f[None].astype(np.float32), pool)[0]
        for f in features(test.paths, scale, work, "te")
    ]
    bank = rows(tr)
    mu, sd = bank.mean(0), bank.std(0) + 1e-6
    bank = (bank - mu) / sd
    n_patches = len(bank)
    if bank_size and bank_size < len(bank):
        bank = bank[np.random.default_rng(0).choice(len(bank), bank_size, replace=False)]
    d = np.sqrt(pc.nearest((rows(te) - mu) / sd, bank))
    maps, i = [], 0
    for f in te:
        h, w = f.shape[-2:]
        maps.append(pc.blur(d[i : i + h * w].reshape(h, w), 1.0))
        i += h * w
    lo_hi = (min(float(m.min()) for m in maps), max(float(m.max()) for m in maps))
    scores = np.array([m.max() for m in maps])
    return {
        "scale": scale,
        "pool": pool,
        "grid": " x ".join(f"{np.median([m.shape[a] for m in maps]):.0f}" for a in (0, 1)),
        "good_patches": n_patches,
        "bank": len(bank),
        "image_auroc": ev.auroc(scores, test.y),
        "pixel_auroc": test.pixel_auroc(maps, lo_hi),
        "within": test.within_image(maps),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default=f"{SQUASH},0.7,1.0")
    ap.add_argument("--pools", default="3", help="neighbourhood sizes k (odd), comma-separated")
    ap.add_argument("--bank", type=int, default=140_000, help="good patches kept (0: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_aspect"))
    args = ap.parse_args()
    for scale in args.scales.split(","):
        if scale != SQUASH and not _positive(scale):
            ap.error(f"--scales: {scale!r} is neither {SQUASH!r} nor a positive factor (e.g. 0.7)")
    pools = [_odd(p) for p in args.pools.split(",")]
    if None in pools:
        ap.error(f"--pools {args.pools!r}: give odd positive sizes, comma-separated (e.g. 3,7)")
    if args.bank < 0:
        ap.error(f"--bank {args.bank}: give a count of good patches, or 0 for all")
    args.work.mkdir(parents=True, exist_ok=True)
    train, _ = an.good_images(DATA)
    test = Test()
    results = []
    for scale in args.scales.split(","):
        for pool in pools:
            r = score(scale, pool, train, test, args.work, args.bank)
            results.append(r)
            print(f"  {scale}, pool {pool}: {r['seconds']:.0f} s", flush=True)
    types = list(results[0]["within"])
    print(
        "\n| input | pooling | median grid | good patches | bank | image AUROC | pixel AUROC | "
        + " | ".join(f"inside {t}" for t in types)
        + " |"
    )
    print("|---" * (7 + len(types)) + "|")
    for r in results:
        what = "squashed to 224 x 224" if r["scale"] == SQUASH else f"aspect kept, x {r['scale']}"
        print(
            f"| {what} | {r['pool']} x {r['pool']} | {r['grid']} | "
            f"{r['good_patches']:,} | {r['bank']:,} | "
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
            + " | ".join(f"{r['within'][t]:.3f}" for t in types)
            + " |"
        )


def _odd(text: str) -> int | None:
    """``text`` as an odd positive int, else None."""
    try:
        k = int(text)
    except ValueError:
        return None
    return k if k > 0 and k % 2 == 1 else None


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


if __name__ == "__main__":
    main()
