"""Latency, throughput and memory of a bundle, optionally with a device profile's settings.

:func:`latency`: batch-1 end to end (decode + preprocess + engine + head) and the raw engine
call alone, interleaved so their ratio is meaningful on a noisy host. :func:`bench`
(``edge-tl bench``): the same plus throughput and the peak resident memory, measured in a
fresh process (``python -m edge_tl.runtime.bench``) so nothing the caller loaded counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.archive import is_archive, open_bundle
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.host import host_info
from edge_tl.runtime.model import Model
from edge_tl.runtime.preprocess import ImageLike
from edge_tl.runtime.selftest import reference_images
from edge_tl.spec import DeviceProfile

__all__ = ["bench", "bundle_size_mb", "latency", "peak_rss_mb", "resolve_device"]


def latency(
    model: Model, images: Sequence[ImageLike], repeats: int = 3, warmup: int = 3
) -> dict[str, float]:
    """p50/p95 milliseconds of the classifier's ``predict([image])`` (decode, preprocess,
    engine, head; for a text bundle ``images`` are texts: tokenize, engine, pooling, head)
    and of the raw engine call.

    The two are interleaved image by image, so a slow phase of the host hits both.
    """
    inputs = [model.engine_inputs([p]) for p in images]
    predict = model.classifier.predict
    for i in range(warmup):
        predict([images[i % len(images)]])
    e2e, raw = [], []
    for _ in range(repeats):
        for path, x in zip(images, inputs, strict=True):
            t0 = time.perf_counter()
            predict([path])
            t1 = time.perf_counter()
            model.engine.run(*x)
            t2 = time.perf_counter()
            e2e.append(t1 - t0)
            raw.append(t2 - t1)
    ms = lambda v, q: float(np.percentile(np.asarray(v) * 1e3, q))  # noqa: E731
    return {
        "predict_p50_ms": ms(e2e, 50),
        "predict_p95_ms": ms(e2e, 95),
        "engine_p50_ms": ms(raw, 50),
        "engine_p95_ms": ms(raw, 95),
        "n": len(e2e),
    }


def bundle_size_mb(bundle: str | Path) -> float:
    """Size on disk of the bundle's artifact files (the part that ships)."""
    from edge_tl.bundle import read_manifest

    files = read_manifest(bundle, verify=False).artifact.files
    return sum((Path(bundle) / f).stat().st_size for f in files) / 1e6


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ``ru_maxrss``)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def resolve_device(profile: DeviceProfile, artifact_format: str) -> dict[str, Any]:
    """The engine settings of ``profile`` that this host can honour, and what it cannot:
    ``{"engine", "device", "missing"}``, ``device`` being ONNX Runtime execution providers
    (comma-separated) or an OpenVINO device string."""
    from edge_tl.runtime.engine import openvino_device, ort_providers

    engine = {"onnx": "onnxruntime", "openvino": "openvino"}[artifact_format]
    if profile.engine != engine:
        raise EdgeTLError(
            f"device profile {profile.name} runs {profile.engine} bundles and this bundle is "
            f"for {engine}; export one with --recipe {profile.recipe}"
        )
    if engine == "onnxruntime":
        use, missing = ort_providers(profile.device)
        device = ",".join(use)
    else:
        device, missing = openvino_device(profile.device)
    return {"engine": engine, "device": device, "missing": missing}


def bench(
    bundle: str | Path,
    profile: DeviceProfile | None = None,
    images: Sequence[str] = (),
    repeats: int = 20,
    batch: int = 8,
    trust: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Measure ``bundle`` in a fresh process with ``profile``'s engine settings.

    Returns p50/p95 of batch-1 ``predict`` (end to end) and of the engine call, throughput
    at ``batch``, the peak RSS of the process, and each budget of the profile with whether
    it holds here. Without ``images`` the bundle's own self-test images are used. ``bundle``
    may be an archive; ``trust`` (``.pub`` paths; None: ``$EDGE_TL_TRUST``) is checked by
    the benchmark process when it opens the bundle.

    Raises:
        EdgeTLError: ``repeats`` or ``batch`` below 1, a missing image, a profile for the
            other engine, or a failed benchmark process.
    """
    from edge_tl.bundle import read_manifest

    if repeats < 1 or batch < 1:
        raise EdgeTLError("--repeats and --batch must be at least 1")
    for img in images:
        if not Path(img).is_file():
            raise EdgeTLError(f"image {img} does not exist; pass image files to --images")
    if is_archive(bundle):
        unpacked, bundle = open_bundle(bundle)
        with unpacked:
            return bench(bundle, profile, images, repeats, batch, trust)
    manifest = read_manifest(bundle, verify=False)
    settings = (
        resolve_device(profile, manifest.artifact.format)
        if profile
        else {"engine": manifest.artifact.format, "device": None, "missing": []}
    )
    threads = profile.threads if profile else 0
    cmd = [
        sys.executable,
        "-m",
        "edge_tl.runtime.bench",
        json.dumps(
            {
                "bundle": str(bundle),
                "engine": settings["engine"],
                "device": settings["device"],
                "threads": threads,
                "images": list(images),
                "repeats": repeats,
                "batch": batch,
                "trust": None if trust is None else [str(t) for t in trust],
            }
        ),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeTLError(f"the benchmark process failed: {last.removeprefix('edge-tl: error: ')}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    host = host_info()
    out["host"] = {k: host[k] for k in ("cpu", "cpu_class", "cores")}
    if profile is not None:
        out["profile"] = {
            "name": profile.name,
            "description": profile.description,
            "engine": profile.engine,
            "device": profile.device,
            "threads": profile.threads,
            "recipe": profile.recipe,
        }
        out["device_used"] = settings["device"]
        notes = []
        if settings["missing"]:
            notes.append(
                f"this host lacks {', '.join(settings['missing'])}: ran on {settings['device']}"
            )
        if profile.recipe != manifest.artifact.recipe:
            notes.append(
                f"the profile expects recipe {profile.recipe}, the bundle has "
                f"{manifest.artifact.recipe}"
            )
        notes.append(
            f"measured on this host ({host['cpu']}), not on a {profile.name}: the figures "
            "approximate the device; run `edge-tl bench` there for its own"
        )
        out["approximated"] = True
        out["notes"] = notes
        budgets = {}
        if profile.latency_budget_ms:
            budgets["latency_p95_ms"] = _budget(profile.latency_budget_ms, out["predict_p95_ms"])
        if profile.memory_budget_mb:
            budgets["peak_rss_mb"] = _budget(profile.memory_budget_mb, out["peak_rss_mb"])
        out["budgets"] = budgets
    return out


def _budget(limit: float, measured: float) -> dict[str, Any]:
    return {"budget": limit, "measured": round(measured, 2), "holds": bool(measured <= limit)}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: load, warm up, time, and report the peak RSS."""
    t0 = time.perf_counter()
    ort = spec["engine"] in ("onnx", "onnxruntime")
    model = Model(
        spec["bundle"],
        threads=spec["threads"],
        providers=spec["device"] if ort else None,
        ov_device=None if ort else spec["device"],
        trust=spec.get("trust"),
    )
    load_ms = (time.perf_counter() - t0) * 1e3
    images = list(spec["images"]) or _selftest_images(model)
    lat = latency(model, images, repeats=max(1, spec["repeats"] // len(images)), warmup=3)
    x = model.engine_inputs([images[i % len(images)] for i in range(spec["batch"])])
    model.engine.run(*x)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 2.0 or n < 3:
        model.engine.run(*x)
        n += 1
    seconds = time.perf_counter() - t0
    return {
        "bundle": spec["bundle"],
        "artifact": f"{model.manifest.artifact.format}-{model.manifest.artifact.precision}",
        "head": model.classifier.state.summary() if model.classifier.state is not None else None,
        "load_ms": round(load_ms, 1),
        **{k: round(v, 2) for k, v in lat.items() if k != "n"},
        "n": lat["n"],
        "batch": spec["batch"],
        "throughput_ips": round(n * spec["batch"] / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": spec["threads"] or "engine default",
    }


def _selftest_images(model: Model) -> list[ImageLike] | list[str]:
    """The bundle's self-test images (or texts, for a text bundle) to time."""
    spec = model.manifest.self_test
    if spec is None:
        raise EdgeTLError(
            f"bundle {model.path} has no self-test inputs to time; pass images with --images"
        )
    if model.text is not None:
        with np.load(model.path / spec.file, allow_pickle=False) as z:
            return [str(t) for t in z["texts"]]
    return list(reference_images(model.path, spec))


if __name__ == "__main__":  # the fresh process of bench()
    try:
        print(json.dumps(_child(json.loads(sys.argv[1]))))
    except EdgeTLError as e:
        print(f"edge-tl: error: {e}", file=sys.stderr)
        sys.exit(2)
