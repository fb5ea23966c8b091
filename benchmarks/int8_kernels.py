"""Naive INT8 on this host's integer kernels: embedding cosine vs FP32 and batch-1 latency,
per quantization setting, side by side in one run.

The pretrained EfficientNet-Lite0 is exported once as an ONNX FP32 bundle
(``export_bundle(..., "onnx-fp32", backbone="efficientnet_lite0", calib=NEU-DET)``); no
training. Its FP32 graph is then quantized, without accuracy control, every way below, on
the same 100 NEU-DET calibration images (the very images an ``ort-int8`` export of this
backbone calibrates on: ``edge_tl.export.source.calibration_sample``, seed 0), and every
artifact embeds the same 100 *other* NEU-DET images (seed 1) at batch 1:

- ONNX Runtime static INT8 (``onnxruntime.quantization.quantize_static`` on the graph after
  ORT's ``quant_pre_process``, as ``edge_tl.export.quantize`` runs it: QDQ format, MinMax
  calibration, u8 activations):
  per-channel s8 weights as written (the ``ort-int8`` recipe's scheme); the same file with the
  session config entry ``session.x64quantprecision = 1`` (exact 64-bit requantization, what
  the ``ort-int8`` recipe sets); ``reduce_range=True`` (7-bit weights, ORT's advice against
  u8s8 saturation on CPUs without VNNI); u8u8 (``weight_type=QUInt8``, the other advice);
  per-tensor s8 weights; per-channel u8s8 with Entropy calibration (printed too: whether its
  file is byte-identical to MinMax's). The saturation and the two remedies are ORT's own
  account (onnxruntime.ai, "Quantize ONNX models", "When to use reduce_range and different
  data types": on x86-64 without VNNI, u8s8 uses ``VPMADDUBSW``, whose 16-bit sums saturate).
- NNCF post-training INT8 (``nncf.quantize`` on ``openvino.convert_model`` of the same
  graph, ``subset_size`` = the calibration count, run by OpenVINO on the CPU): NNCF's defaults
  (for 8-bit activations and weights its ``overflow_fix`` is ``first_layer_only``), and
  ``AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)`` (7-bit weight range
  everywhere, what the ``openvino-int8`` recipe sets; NNCF documents the overflow fix as the
  remedy for the same saturation on CPUs without VNNI).
- Context: ONNX FP32 (the reference every cosine is taken against) and OpenVINO FP32 (f32
  inference forced, as the ``openvino-fp32`` recipe does).

Measured: mean and minimum embedding cosine vs ONNX FP32 over the check images, and batch-1
engine latency (median; each artifact runs alone in a fresh process, as in
``benchmarks/latency.py``, 3 warm-up calls then the first ``--latency-images`` check images;
rounds alternate the order) as a ratio to ONNX FP32 in the same run. The host's CPU
and integer instruction sets are printed (``edge_tl.runtime.host.host_info``): ORT's u8s8
kernels saturate on x86-64 CPUs with AVX2 but no VNNI, so the same file gives other
cosines on other CPUs. Also printed: the FP32 bundle's ONNX-vs-PyTorch parity as recorded in
its manifest (``metrics.parity_max_abs_diff``, max abs difference on real images).

The CPU features this process sees (CPUID, as numpy's runtime dispatch reads it) are
printed beside ``/proc/cpuinfo``'s: under an emulator they differ, and the emulated CPU is
the one whose kernels run. So the AVX2-only kernels can be measured on a newer CPU with
QEMU's user-mode emulator (Debian package ``qemu-user``; TCG emulates up to AVX2, no
AVX-512 and no VNNI); cosines are then the emulated CPU's, latencies mean nothing:

    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_kernels.py --engines ort --no-latency

``--optimum`` also asks pip what ``optimum-onnx`` and ``optimum-intel`` would add to this
environment (``pip install --dry-run --report``, with ``constraints.txt``; nothing is
installed, but it needs a package index).

    .venv/bin/python benchmarks/int8_kernels.py [--work /tmp/edge_tl_int8_kernels]
        [--calib 100] [--check 100] [--rounds 5] [--latency-images 20] [--optimum]
        [--engines ort,openvino] [--no-latency]

Bundles, quantized files and ORT's calibration ranges are kept in ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from edge_tl.bundle import read_manifest  # noqa: E402
from edge_tl.data import image_folder  # noqa: E402
from edge_tl.export.source import calibration_sample  # noqa: E402
from edge_tl.runtime.engine import OpenVinoEngine, OrtEngine  # noqa: E402
from edge_tl.runtime.host import cpu_class, host_info  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs  # noqa: E402
from edge_tl.spec import EMBEDDING, INPUT_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
X64 = {"session.x64quantprecision": "1"}
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass(frozen=True)
class Variant:
    """One artifact to measure: how it is built and how the engine opens it."""

    name: str
    engine: str  # "ort" or "openvino"
    build: str  # key of the file it runs (several variants may share one file)
    options: dict[str, str] = field(default_factory=dict)


VARIANTS = (
    Variant("ONNX FP32 (reference)", "ort", "fp32"),
    Variant("ORT per-channel u8s8, as written", "ort", "ort-u8s8"),
    Variant("ORT per-channel u8s8 + x64quantprecision=1", "ort", "ort-u8s8", X64),
    Variant("ORT per-channel u8s8, reduce_range", "ort", "ort-u8s8-reduce-range"),
    Variant("ORT per-channel u8u8", "ort", "ort-u8u8"),
    Variant("ORT per-tensor u8s8", "ort", "ort-u8s8-per-tensor"),
    Variant("ORT per-channel u8s8, Entropy calibration", "ort", "ort-u8s8-entropy"),
    Variant("OpenVINO FP32 (f32 forced)", "openvino", "ov-fp32", F32),
    Variant("NNCF INT8, defaults", "openvino", "nncf-default"),
    Variant("NNCF INT8, overflow_fix=ENABLE", "openvino", "nncf-overflow-fix"),
)


@dataclass(frozen=True)
class OrtBuild:
    """One ``quantize_static`` setting (QDQ, u8 activations)."""

    per_channel: bool = True
    weight_type: str = "QInt8"
    reduce_range: bool = False
    method: str = "MinMax"


ORT_BUILDS = {
    "ort-u8s8": OrtBuild(),
    "ort-u8s8-reduce-range": OrtBuild(reduce_range=True),
    "ort-u8u8": OrtBuild(weight_type="QUInt8"),
    "ort-u8s8-per-tensor": OrtBuild(per_channel=False),
    "ort-u8s8-entropy": OrtBuild(method="Entropy"),
}


def fp32_bundle(data: Path, work: Path) -> Path:
    """The pretrained backbone's ONNX FP32 bundle (exported once, then reused)."""
    path = work / f"{data.name}-fp32"
    if not (path / "manifest.json").is_file():
        from edge_tl.export import export_bundle

        print(f"exporting {path} (onnx-fp32, efficientnet_lite0)", flush=True)
        export_bundle(path, "onnx-fp32", backbone="efficientnet_lite0", calib=data)
    return path


def pick_images(data: Path, n_calib: int, n_check: int) -> tuple[list[str], list[str]]:
    """``n_calib`` calibration images (drawn as an INT8 export draws them) and ``n_check``
    other images of ``data`` (seed 1)."""
    pool = list(image_folder(data).paths)
    calib = calibration_sample(pool, n_calib, int8=True)
    taken = set(calib)
    rest = [p for p in pool if p not in taken]
    idx = np.random.default_rng(1).permutation(len(rest))[:n_check]
    return calib, [rest[i] for i in sorted(idx)]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's calibrators and NNCF print progress on stdout and log warnings per layer (ORT:
    "Quantized bias ... exceeds the range of a int32"; the cosine measures what they cost):
    drop them while quantizing."""
    # importing nncf loads torch's C++-extension helper, which warns that no CUDA runtime
    # exists on a CPU-only machine
    logging.disable(logging.WARNING)
    try:
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def build_ort(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    """Every ORT static INT8 variant of ``fp32`` (one calibration pass per method, cached)."""
    from onnxruntime import quantization as q

    from edge_tl.export.quantize import ort_preprocessed

    class Reader(q.CalibrationDataReader):
        def __init__(self, step: int) -> None:
            batches = [{INPUT_NAME: calib[i : i + step]} for i in range(0, len(calib), step)]
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    key = hashlib.sha256(np.ascontiguousarray(calib[:, :, ::8, ::8]).tobytes()).hexdigest()[:12]
    pre = ort_preprocessed(fp32, work)
    out = {}
    for build, b in ORT_BUILDS.items():
        dst = work / f"{build}-{len(calib)}-{key}.onnx"
        if not dst.is_file():
            print(f"quantizing {build} (ORT)", flush=True)
            # ORT's histogram calibrators stack batches: keep them one size, as edge_tl does
            step = 8 if b.method == "MinMax" else 1
            cache = work / f"calib-{b.method}-{len(calib)}-{key}.json"
            with quiet():
                q.quantize_static(
                    str(pre),
                    str(dst),
                    Reader(step),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=b.per_channel,
                    reduce_range=b.reduce_range,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=getattr(q.QuantType, b.weight_type),
                    calibrate_method=getattr(q.CalibrationMethod, b.method),
                    calibration_cache_path=str(cache),
                )
        out[build] = dst
    return out


def build_openvino(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    """OpenVINO FP32 IR and the two NNCF INT8 variants of ``fp32``."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    key = hashlib.sha256(np.ascontiguousarray(calib[:, :, ::8, ::8]).tobytes()).hexdigest()[:12]
    settings = {
        "nncf-default": None,
        "nncf-overflow-fix": AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
    }
    out = {"ov-fp32": work / "ov-fp32.xml"}
    if not out["ov-fp32"].is_file():
        ov.save_model(ov.convert_model(str(fp32)), str(out["ov-fp32"]), compress_to_fp16=False)
    for build, params in settings.items():
        dst = work / f"{build}-{len(calib)}-{key}.xml"
        if not dst.is_file():
            print(f"quantizing {build} (NNCF)", flush=True)
            dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
            with quiet():
                model = nncf.quantize(
                    ov.convert_model(str(fp32)),
                    dataset,
                    subset_size=len(calib),
                    advanced_parameters=params,
                )
            ov.save_model(model, str(dst), compress_to_fp16=False)
        out[build] = dst
    return out


def runner(engine: str, path: Path, options: dict[str, str]) -> Callable[[np.ndarray], np.ndarray]:
    """Batch -> embeddings, through the runtime's own engine classes (``ort``/``openvino``)."""
    opened = OrtEngine(path, options) if engine == "ort" else OpenVinoEngine(path, options)
    return lambda x: opened.run(x, (EMBEDDING,))[EMBEDDING]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``[N, D]`` arrays."""
    num = (a * b).sum(1)
    return num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def latency_ms(
    variants: list[Variant],
    files: dict[str, Path],
    inputs: Path,
    rounds: int,
    work: Path,
) -> dict[str, float]:
    """Batch-1 median ms per artifact. Each artifact runs alone in a fresh process (as on a
    device: one engine, no other engine's threads spinning beside it; ``--worker``), on the
    tensors saved in ``inputs``; rounds alternate the order to spread drift."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    out = work / "latency.json"
    for rnd in range(rounds):
        for v in variants if rnd % 2 == 0 else list(reversed(variants)):
            job = {"engine": v.engine, "path": str(files[v.build]), "options": v.options}
            cmd = [sys.executable, __file__, "--worker", json.dumps(job), "--worker-inputs"]
            subprocess.run([*cmd, str(inputs), "--worker-out", str(out)], check=True)
            times[v.name] += json.loads(out.read_text())
    return {k: float(np.median(t)) for k, t in times.items()}


def worker(job: dict, inputs: Path, out: Path) -> None:
    """Time one artifact alone in this process: 3 warm-up calls, then every input once."""
    with np.load(inputs, allow_pickle=False) as z:
        xs = [z["x"][i : i + 1] for i in range(len(z["x"]))]
    run = runner(job["engine"], Path(job["path"]), job["options"])
    for x in xs[:3]:
        run(x)
    times = []
    for x in xs:
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    out.write_text(json.dumps(times))


def process_isa() -> list[str]:
    """INT8-relevant instruction sets as this process's CPUID reports them (numpy's runtime
    dispatch table; an emulator's CPU model shows here, not in ``/proc/cpuinfo``)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    names = {"avx2": "AVX2", "avx512": "AVX512F", "avx512_vnni": "AVX512VNNI"}
    return [isa for isa, key in names.items() if features.get(key)]


def optimum_resolution() -> dict[str, object]:
    """What ``pip install optimum-onnx optimum-intel`` would add to this environment (a dry
    run with the project's constraints; nothing is installed)."""
    with tempfile.TemporaryDirectory(prefix="edge_tl_pip_") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(ROOT / "constraints.txt"),
            "optimum-onnx",
            "optimum-intel",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"pip could not resolve optimum-onnx + optimum-intel:\n{res.stderr}")
        install = json.loads(report.read_text())["install"]
    packages = {i["metadata"]["name"]: i["metadata"]["version"] for i in install}
    shown = "pip install --dry-run -c constraints.txt optimum-onnx optimum-intel"
    return {"command": shown, "n_packages": len(packages), "packages": packages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=SHARED / "neu_det", help="ImageFolder (default: NEU-DET)"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/edge_tl_int8_kernels"),
        help="bundle, quantized files and calibration ranges are kept here",
    )
    ap.add_argument("--calib", type=int, default=100, help="calibration images (default 100)")
    ap.add_argument("--check", type=int, default=100, help="other images to compare on")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (default 5)")
    ap.add_argument(
        "--latency-images", type=int, default=20, help="images timed per round (default 20)"
    )
    ap.add_argument(
        "--optimum",
        action="store_true",
        help="also resolve optimum-onnx + optimum-intel with pip (dry run; needs an index)",
    )
    ap.add_argument(
        "--engines",
        default="ort,openvino",
        help="comma-separated: ort, openvino (default both; ONNX FP32 is always measured)",
    )
    ap.add_argument(
        "--no-latency", action="store_true", help="cosines only (e.g. under an emulator)"
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-inputs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.worker_inputs, args.worker_out)
        return
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    if not engines or engines - {"ort", "openvino"}:
        ap.error(f"--engines takes ort and/or openvino, not {args.engines!r}")
    variants = [v for i, v in enumerate(VARIANTS) if i == 0 or v.engine in engines]
    args.work.mkdir(parents=True, exist_ok=True)

    bundle = fp32_bundle(args.data, args.work)
    manifest = read_manifest(bundle)
    fp32 = bundle / manifest.artifact.files[0]
    calib_paths, check_paths = pick_images(args.data, args.calib, args.check)
    calib = batch_inputs(calib_paths, manifest.preprocess)
    check = batch_inputs(check_paths, manifest.preprocess)
    files = {"fp32": fp32}
    if "ort" in engines:
        files.update(build_ort(fp32, calib, args.work))
    if "openvino" in engines:
        files.update(build_openvino(fp32, calib, args.work))

    emb = {}
    for v in variants:  # one engine at a time
        run = runner(v.engine, files[v.build], v.options)
        emb[v.name] = np.concatenate([run(check[i : i + 1]) for i in range(len(check))])
        del run
    ref = emb[VARIANTS[0].name]
    cos = {name: cosines(e, ref) for name, e in emb.items()}
    n_lat = min(args.latency_images, len(check))
    ms: dict[str, float] = {}
    if not args.no_latency:
        print("timing batch-1 latency", flush=True)
        inputs = args.work / "latency-inputs.npz"
        np.savez(inputs, x=check[:n_lat])
        ms = latency_ms(variants, files, inputs, args.rounds, args.work)

    host = host_info()
    versions = {
        d: importlib.metadata.version(d) for d in ("onnxruntime", "openvino", "nncf", "numpy")
    }
    seen = process_isa()
    seen_class = cpu_class(str(host["machine"]), seen)
    print(
        f"\nhost: {host['cpu']} ({host['machine']}, {host['cores']} cores); /proc/cpuinfo: "
        f"{', '.join(host['int8_isa']) or 'none'} ({host['cpu_class']}); CPUID as this "
        f"process sees it: {', '.join(seen) or 'none'} ({seen_class})"
    )
    emulated = set(seen) != {i for i in host["int8_isa"] if i in ("avx2", "avx512", "avx512_vnni")}
    if emulated:
        print(
            f"  the two differ: an emulated CPU ({seen_class}) runs the kernels; its cosines "
            "hold, its latencies do not"
        )
    print("engines: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    timing = (
        "not timed"
        if args.no_latency
        else f"batch 1, {n_lat} images x {args.rounds} rounds, each artifact in its own process"
    )
    print(
        f"{args.data.name}: {len(calib_paths)} calibration images, {len(check_paths)} other "
        f"images compared; latency: {timing}\n"
    )
    print("| artifact | embedding cosine vs FP32, mean | min | ms, batch 1 | vs ONNX FP32 |")
    print("|---|---|---|---|---|")
    base = ms.get(VARIANTS[0].name)
    for v in variants:
        c = cos[v.name]
        t = ms.get(v.name)
        lat = "– | –" if t is None or base is None else f"{t:.2f} | {t / base:.2f}x"
        print(f"| {v.name} | {c.mean():.3f} | {c.min():.3f} | {lat} |")
    parity = manifest.metrics["parity_max_abs_diff"]
    print(
        "\nONNX FP32 vs PyTorch (the FP32 bundle's manifest, metrics.parity_max_abs_diff, "
        "max abs difference on real images at export): "
        + ", ".join(f"{k} {float(v):.1e}" for k, v in parity.items())
    )
    identical = None
    if "ort" in engines:
        a, b = files["ort-u8s8"].read_bytes(), files["ort-u8s8-entropy"].read_bytes()
        identical = a == b
        print(
            "ORT Entropy vs MinMax calibration (per-channel u8s8): the two files are "
            + ("byte-identical" if identical else f"different ({len(a)} vs {len(b)} bytes)")
        )
    report: dict[str, object] = {
        "host": host,
        "entropy_file_identical_to_minmax": identical,
        "process_isa": seen,
        "process_cpu_class": seen_class,
        "emulated": emulated,
        "versions": versions,
        "data": str(args.data),
        "n_calib": len(calib_paths),
        "n_check": len(check_paths),
        "artifacts": {
            v.name: {
                "cosine_mean": float(cos[v.name].mean()),
                "cosine_min": float(cos[v.name].min()),
                "latency_ms": ms.get(v.name),
                "latency_vs_onnx_fp32": None if base is None else ms[v.name] / base,
            }
            for v in variants
        },
        "parity_max_abs_diff": parity,
    }
    if args.optimum:
        opt = optimum_resolution()
        print(
            f"\n`{opt['command']}` would add {opt['n_packages']} packages to this "
            "environment: " + ", ".join(f"{k} {v}" for k, v in opt["packages"].items())
        )
        report["optimum"] = opt
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
