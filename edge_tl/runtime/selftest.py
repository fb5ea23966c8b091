"""On-device self-test: does this host's engine still produce the bundle's embeddings?

The same INT8 file can be right on one CPU and wrong on another (integer kernels differ by
instruction set), so a bundle carries a few reference images with their FP32 embeddings
(``selftest.npz``, written by the export with :func:`write_self_test`) and the device
checks them when it loads the bundle (:func:`run_self_test`). Torch-free.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.engine import Engine, make_engine
from edge_tl.runtime.host import host_info
from edge_tl.runtime.preprocess import normalise_pixels
from edge_tl.runtime.text import TextEncoder, pool
from edge_tl.spec import EMBEDDING, Artifact, Manifest, Preprocess, SelfTestSpec, TextPreprocess

__all__ = [
    "SELF_TEST_FILE",
    "enforce",
    "read_pixels",
    "reference_images",
    "run_self_test",
    "write_self_test",
]

_logger = logging.getLogger(__name__)

SELF_TEST_FILE = "selftest.npz"
SELF_TEST_IMAGES = 4


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _embed_stored(
    bundle: Path, file: str, pre: Preprocess | TextPreprocess, engine: Engine
) -> np.ndarray:
    """Per-item cosines ``float32[N]`` of the self-test inputs in ``bundle/file`` through
    ``engine`` with their FP32 embeddings: the stored ``uint8`` pixels read back and
    normalised as the manifest says (a text bundle: the stored ``texts``, tokenized by the
    bundle's tokenizer and pooled), run as one batch. The export and the device both call
    this, so the figure recorded at export is the one the device reproduces on the same
    host."""
    with np.load(bundle / file, allow_pickle=False) as z:
        ref = z["embedding"]
        if isinstance(pre, TextPreprocess):
            inputs = TextEncoder(bundle, pre).encode([str(t) for t in z["texts"]])
            hidden = engine.run(inputs, (pre.hidden_output,))[pre.hidden_output]
            got = pool(hidden, inputs["attention_mask"], pre)
        else:
            got = engine.run(normalise_pixels(z["pixels"], pre), (EMBEDDING,))[EMBEDDING]
    return _cosine(got, ref).astype(np.float32)


def write_self_test(
    folder: Path,
    pixels: np.ndarray,
    reference: np.ndarray,
    artifact: Artifact,
    pre: Preprocess | TextPreprocess,
    on_fail: str,
    margin: float,
) -> SelfTestSpec | None:
    """Write ``selftest.npz`` into the bundle ``folder`` (whose artifact files are final):
    four of the check images and their FP32 embeddings, and the cosine this host reaches on
    them, measured as the device measures it on load (:func:`run_self_test`): a fresh
    engine opened from the bundle's files with the device's defaults (:func:`make_engine`:
    default threads, CPU), the stored pixels read back, one batch.

    Args:
        pixels: ``uint8[N, 3, S, S]`` resized check images; four, evenly spaced, are kept.
        reference: ``float32[N, D]`` their FP32 PyTorch embeddings.
        artifact: the bundle's artifact (its files already in ``folder``).
        pre: the bundle's preprocessing.
        on_fail: ``refuse``, ``warn`` or ``off`` (nothing written).
        margin: the device passes at the cosine reached here minus ``margin``.

    Raises:
        EdgeTLError: the engine cannot load the artifact.

    A text bundle passes ``pixels`` as a ``str`` array ``[N]`` of check texts (stored as
    ``texts``: a unicode array, read without pickles).
    """
    if on_fail == "off":
        return None
    idx = np.linspace(0, len(pixels) - 1, min(SELF_TEST_IMAGES, len(pixels))).round().astype(int)
    key = "texts" if isinstance(pre, TextPreprocess) else "pixels"
    arrays = {key: pixels[idx], "embedding": reference[idx].astype(np.float32)}
    np.savez(folder / SELF_TEST_FILE, **arrays)
    cos = _embed_stored(folder, SELF_TEST_FILE, pre, make_engine(folder, artifact))
    np.savez(folder / SELF_TEST_FILE, **arrays, export_cosine=cos)
    return SelfTestSpec(
        file=SELF_TEST_FILE,
        min_cosine=round(max(0.0, float(cos.mean()) - margin), 5),
        export_cosine=round(float(cos.mean()), 5),
        export_host=str(host_info()["cpu"]),
        on_fail=on_fail,
    )


def read_pixels(bundle: Path, spec: SelfTestSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8[N, 3, S, S], FP32 embeddings float32[N, D])`` of the self-test."""
    with np.load(bundle / spec.file, allow_pickle=False) as z:
        return z["pixels"], z["embedding"]


def reference_images(bundle: Path, spec: SelfTestSpec) -> list[Image.Image]:
    """The self-test images as PIL images (to time a bundle without images of one's own)."""
    pixels, _ = read_pixels(bundle, spec)
    hwc = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in pixels]  # stored CHW
    return [Image.fromarray(p[..., 0] if p.shape[2] == 1 else p) for p in hwc]


def run_self_test(bundle: Path, manifest: Manifest, engine: Engine) -> dict[str, Any] | None:
    """Embed the bundled reference images on this host and compare with FP32 (the
    computation :func:`write_self_test` recorded at export).

    Returns:
        ``{"cosine", "min_cosine", "passed", ...}``, or None when the bundle has no self-test.
    """
    spec = manifest.self_test
    if spec is None or spec.on_fail == "off":
        return None
    t0 = time.perf_counter()
    cos = _embed_stored(bundle, spec.file, manifest.preprocess, engine)
    return {
        "cosine": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "min_cosine": spec.min_cosine,
        "export_cosine": spec.export_cosine,
        "export_host": spec.export_host,
        "host": host_info()["cpu"],
        "cpu_class": host_info()["cpu_class"],
        "passed": bool(cos.mean() >= spec.min_cosine),
        "on_fail": spec.on_fail,
        "ms": round((time.perf_counter() - t0) * 1e3, 1),
    }


def enforce(bundle: Path, result: dict[str, Any] | None) -> None:
    """Refuse (or warn, as the recipe said) when the self-test failed.

    Raises:
        EdgeTLError: the self-test failed and the bundle says ``refuse``.
    """
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
        _logger.warning(msg)
        return
    raise EdgeTLError(msg)
