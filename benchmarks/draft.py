"""JPEG draft decoding (DCT-domain scaling, ``Preprocess.draft``): what it saves and what it
costs in accuracy, on real photographs delivered at camera resolution.

flowers5's photographs are 128 x 128; to stand in for a camera that delivers more pixels
than the model reads, each is enlarged (Lanczos) to ``--side`` pixels and saved as a JPEG
(quality 90), so a 224-pixel model decodes it at 1/2 scale with draft on. For each decoding
(full, draft) the bundle's embeddings train a linear head on half of the images (the
device's learner, ``edge_tl.runtime.learner.learn``) and are scored on the other half; a
third row trains on full decodes and tests on draft ones, what an old head would see if
the device switched decoding without the head knowing. Decode + preprocess time per image
is the median over the test images, measured in this process.

    .venv/bin/python benchmarks/draft.py --bundle BUNDLE   # an image bundle (e.g. onnx-fp32)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.data import image_folder  # noqa: E402
from edge_tl.runtime import Model, learner  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs, prepare  # noqa: E402
from edge_tl.spec import EMBEDDING  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="an image bundle")
    p.add_argument("--data", type=Path, default=SHARED / "flowers5")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--side", type=int, default=512, help="side of the enlarged JPEGs")
    args = p.parse_args()
    model = Model(args.bundle)
    full = model.manifest.preprocess
    draft = dataclasses.replace(full, draft=True)
    ds = image_folder(args.data)
    with tempfile.TemporaryDirectory(prefix="edge_tl_draft_") as tmp:
        paths, names = [], []
        for c, cls in enumerate(ds.classes):
            own = [q for q, y in zip(ds.paths, ds.labels, strict=True) if y == c]
            for q in own[: args.per_class]:
                out = Path(tmp) / f"{cls}_{Path(q).stem}.jpg"
                with Image.open(q) as im:
                    big = im.convert("RGB").resize((args.side, args.side), Image.Resampling.LANCZOS)
                big.save(out, quality=90)
                paths.append(str(out))
                names.append(cls)
        emb = {}
        for name, pre in (("full", full), ("draft", draft)):
            xs = [
                model.engine.run(batch_inputs(paths[i : i + 16], pre), (EMBEDDING,))[EMBEDDING]
                for i in range(0, len(paths), 16)
            ]
            emb[name] = np.concatenate(xs)
        times = {}
        for name, pre in (("full", full), ("draft", draft)):
            t = []
            for q in paths[1::2]:
                t0 = time.perf_counter()
                prepare(q, pre)
                t.append(time.perf_counter() - t0)
            times[name] = 1e3 * float(np.median(t))
    idx = np.arange(len(paths))
    train, test = idx[::2], idx[1::2]
    y = np.asarray(names)
    cos = np.sum(emb["full"] * emb["draft"], 1) / (
        np.linalg.norm(emb["full"], axis=1) * np.linalg.norm(emb["draft"], axis=1)
    )
    print(
        f"{len(paths)} flowers5 photographs enlarged to {args.side}x{args.side} JPEG q90, "
        f"model input {full.size}; linear head on {len(train)}, tested on {len(test)}"
    )
    print(f"embedding cosine full vs draft: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"{'train on':<10}{'test on':<10}{'accuracy':>9}{'decode+prep ms':>16}")
    for fit_on, test_on in (("full", "full"), ("draft", "draft"), ("full", "draft")):
        state = learner.learn(emb[fit_on][train], list(y[train]), "linear", None)
        pred = state.predict_proba(emb[test_on][test]).argmax(1)
        acc = float((np.asarray(state.labels)[pred] == y[test]).mean())
        print(f"{fit_on:<10}{test_on:<10}{acc:>9.4f}{times[test_on]:>16.2f}")


if __name__ == "__main__":
    main()
