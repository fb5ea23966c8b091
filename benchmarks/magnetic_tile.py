"""What the anomaly benchmarks share: the magnetic-tile data (``../shared/data/magnetic_tile``),
the pretrained EfficientNet-Lite0 bundles they score with, and the test set with its labels,
masks and metrics. Imported by ``anomaly*.py`` in this folder (run as scripts from it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edge_tl.runtime import anomaly as an
from edge_tl.runtime import evaluation as ev
from edge_tl.runtime import patchcore as pc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
RECIPES = {"fp32": "onnx-fp32", "int8": "ort-int8"}


def bundle(work: Path, precision: str = "int8", size: int = 224) -> Path:
    """The pretrained backbone exported at input ``size`` (INT8 calibrated on ``train/good``:
    the camera's own good parts), under ``work``; exported once, then reused."""
    tag = "" if size == 224 else f"{size}-"
    path = work / f"magnetic_tile-{tag}{precision}"
    if not (path / "manifest.json").is_file():
        from edge_tl.export import export_bundle

        recipe = RECIPES[precision]
        print(f"  exporting {path.name} ({recipe}, calibrated on train/good)", flush=True)
        export_bundle(
            path,
            recipe,
            backbone="efficientnet_lite0",
            calib=DATA / "train/good",
            image_size=0 if size == 224 else size,
        )
    return path


def bundles(work: Path, size: int = 224) -> dict[str, Path]:
    """FP32 and INT8 bundles at input ``size``, by precision."""
    return {precision: bundle(work, precision, size) for precision in RECIPES}


class Test:
    """The test set with its labels, masks and image sizes."""

    def __init__(self, data: Path = DATA) -> None:
        self.items, _ = ev.mvtec_test(data)
        self.paths = [it.path for it in self.items]
        self.defects = np.array([it.defect for it in self.items])
        self.y = (self.defects != an.GOOD).astype(np.int64)
        self.masks = [ev.load_mask(it.mask) if it.mask else None for it in self.items]
        self.sizes = []
        for p in self.paths:
            with Image.open(p) as im:
                self.sizes.append(im.size)

    def pixel_auroc(self, maps: np.ndarray, lo_hi: tuple[float, float] | None = None) -> float:
        """Pixel AUROC of grid maps ``[N, h, w]``, each resized to its image exactly
        (histogram bounds ``lo_hi``, default the maps' range)."""
        pix = ev.PixelAuroc(*(lo_hi or (float(maps.min()), float(maps.max()))))
        for g, mask, size in zip(maps, self.masks, self.sizes, strict=True):
            pix.update(pc.resize_map(g, size), mask)
        return pix.value()

    def per_defect(self, scores: np.ndarray) -> dict[str, float]:
        """Image AUROC of each defect type's tiles against the good ones."""
        out = {}
        for d in sorted(set(self.defects) - {an.GOOD}):
            sel = (self.defects == d) | (self.defects == an.GOOD)
            out[d] = ev.auroc(scores[sel], self.y[sel])
        return out

    def within_image(self, maps: np.ndarray) -> dict[str, float]:
        """Localisation inside defective tiles: for each defect type, the mean over its tiles
        of the pixel AUROC of the tile's defect pixels against the same tile's other pixels
        (what pooled pixel AUROC mixes with the contrast against good tiles)."""
        out: dict[str, list[float]] = {}
        for g, mask, size, d in zip(maps, self.masks, self.sizes, self.defects, strict=True):
            if mask is None or mask.all() or not mask.any():
                continue
            up = pc.resize_map(g, size)
            out.setdefault(str(d), []).append(ev.auroc(up.ravel(), mask.ravel().astype(np.int64)))
        return {d: float(np.mean(v)) for d, v in sorted(out.items())}

    def pooled_parts(self, maps: np.ndarray) -> dict:
        """Where pooled pixel AUROC is lost: the defect pixels of every defective tile ranked
        against the good tiles' pixels alone (``vs_good``) and against the defective tiles'
        own defect-free pixels alone (``vs_defective_background``); and for each defect type
        how far its tiles' defect-free pixels stand from good surface (``background``: their
        AUROC against the good tiles' pixels; 0.5 = they score as good tiles do)."""
        lo_hi = (float(maps.min()), float(maps.max()))
        vs_good, vs_bg = ev.PixelAuroc(*lo_hi), ev.PixelAuroc(*lo_hi)
        background: dict[str, ev.PixelAuroc] = {}
        good = ev.PixelAuroc(*lo_hi)
        for g, mask, size, d in zip(maps, self.masks, self.sizes, self.defects, strict=True):
            up = pc.resize_map(g, size)
            if mask is None:
                vs_good.update(up, None)
                good.update(up, None)
                continue
            vs_good.update(up[mask], np.ones(int(mask.sum()), bool))
            vs_bg.update(up, mask)
            bg = background.setdefault(str(d), ev.PixelAuroc(*lo_hi))
            bg.update(up[~mask], np.ones(int((~mask).sum()), bool))
        for bg in background.values():
            bg.neg = good.neg
        return {
            "vs_good": vs_good.value(),
            "vs_defective_background": vs_bg.value(),
            "background": {d: bg.value() for d, bg in sorted(background.items())},
        }

    def metrics(self, scores: np.ndarray, maps: np.ndarray, thr: float | None) -> dict:
        """Image and pixel AUROC, per-defect AUROC and, at ``thr``, F1 and false alarms."""
        out = {"image_auroc": ev.auroc(scores, self.y), "pixel_auroc": self.pixel_auroc(maps)}
        if thr is not None:
            out.update(ev.at_threshold(scores, self.y, thr))
        out["per_defect"] = self.per_defect(scores)
        return out


def patches(outputs: dict[str, np.ndarray], stages: tuple[str, ...], pool: int) -> np.ndarray:
    """Backbone outputs by stage (cached as float16) -> ``float32[N, h * w, C]`` patch
    features, each stage averaged over ``pool x pool`` neighbours (``pc.patch_features``)."""
    return pc.patch_features({s: outputs[s].astype(np.float32) for s in stages}, stages, pool)


def numbers(text: str, kind: type, name: str) -> list:
    """``','``-joined positive numbers of ``kind``, ascending and distinct, or ``ValueError``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected ','-joined numbers") from None
    if not values or min(values) <= 0 or values != sorted(set(values)):
        raise ValueError(f"{name} {text!r}: expected positive numbers, ascending, each once")
    return values


def zscore(maps: np.ndarray, train_maps: np.ndarray) -> np.ndarray:
    """``maps`` in units of the mean and standard deviation of the same scorer's maps of the
    good *training* tiles: how two scorers' maps are added or compared without choosing
    anything on the test set."""
    return (maps - train_maps.mean()) / train_maps.std()


def report(name: str, maps: np.ndarray, test: Test) -> dict:
    """One map's figures on the test set: image AUROC of each map's maximum, pooled pixel
    AUROC and its split by negatives, pixel AUROC inside the defective tiles per type."""
    scores = maps.reshape(len(maps), -1).max(1)
    parts = test.pooled_parts(maps)
    within = test.within_image(maps)
    return {
        "map": name,
        "image_auroc": ev.auroc(scores, test.y),
        "pixel_auroc": test.pixel_auroc(maps),
        "vs_good": parts["vs_good"],
        "vs_defective_background": parts["vs_defective_background"],
        **{f"inside_{k}": v for k, v in within.items()},
    }


def print_table(rows: list[dict]) -> None:
    """:func:`report`'s rows as one markdown table."""
    types = sorted(k for k in rows[0] if k.startswith("inside_"))
    head = ["map", "image AUROC", "pixel AUROC", "vs good px", "vs defective unmarked px"]
    head += [t.removeprefix("inside_") for t in types]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        keys = ["image_auroc", "pixel_auroc", "vs_good", "vs_defective_background", *types]
        print(f"| {r['map']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
