"""On-device self-test: does this host's engine still produce the bundle's embeddings?

The same INT8 file can be right on one CPU and wrong on another (integer kernels differ by
instruction set), so a bundle carries a few reference images with their FP32 embeddings and
the device checks them when it loads the bundle. Torch-free.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.engine import Engine
from edge_tl.runtime.host import host_info
from edge_tl.runtime.preprocess import normalise_pixels
from edge_tl.spec import EMBEDDING, Manifest


def run_self_test(bundle: Path, manifest: Manifest, engine: Engine) -> dict[str, Any] | None:
    """Embed the bundled reference images on this host and compare with FP32.

    Returns:
        ``{"cosine", "min_cosine", "passed", ...}``, or None when the bundle has no self-test.
    """
    spec = manifest.self_test
    if not spec or spec.get("on_fail") == "off":
        return None
    with np.load(bundle / spec["file"], allow_pickle=False) as z:
        pixels, ref = z["pixels"], z["embedding"]
    t0 = time.perf_counter()
    got = engine.run(normalise_pixels(pixels, manifest.preprocess), (EMBEDDING,))[EMBEDDING]
    cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return {
        "cosine": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "min_cosine": spec["min_cosine"],
        "export_cosine": spec.get("export_cosine"),
        "export_host": spec.get("export_host"),
        "host": host_info()["cpu"],
        "cpu_class": host_info()["cpu_class"],
        "passed": bool(cos.mean() >= spec["min_cosine"]),
        "on_fail": spec.get("on_fail", "refuse"),
        "ms": round((time.perf_counter() - t0) * 1e3, 1),
    }


def enforce(bundle: Path, result: dict[str, Any] | None) -> None:
    """Refuse (or warn, as the recipe said) when the self-test failed."""
    if result is None or result["passed"]:
        return
    msg = (
        f"bundle {bundle} fails its self-test on this host ({result['host']}): embedding "
        f"cosine vs FP32 {result['cosine']:.4f} < {result['min_cosine']:.4f} (it was "
        f"{result['export_cosine']} on {result['export_host']}); this CPU's INT8 kernels bend "
        "the model: re-export with a recipe for this CPU class (e.g. engine option "
        "session.x64quantprecision for ONNX Runtime on AVX2) or use an FP32/FP16 bundle"
    )
    if result["on_fail"] == "warn":
        print(f"warning: {msg}", file=sys.stderr)
        return
    raise EdgeTLError(msg)
