"""ONNX Runtime static INT8 against ONNX Runtime FP32 on an x86-64 CPU with AVX2 and no VNNI:
which setting keeps the fidelity goal (embedding cosine >= 0.98 vs FP32, top-1 within 0.5 pt)
*and* runs faster than FP32, side by side in one run.

Why it is a question: on AVX2 without VNNI, ORT's u8s8 integer GEMM multiplies with
``VPMADDUBSW``, whose 16-bit pair sums saturate (cosine ~0.6 on Lite0). The ``ort-int8``
recipe's session option ``session.x64quantprecision=1`` fixes that by turning every s8
weight into u8 at session start (ORT's ``Avx2WeightS8ToU8Transformer``), so the u8u8 kernel
runs, which widens to 16 bits first and is about as slow as FP32's FMA kernels. Candidates:

- ``u8s8`` as ``quantize_static`` writes it (QDQ, per-channel s8 weights, MinMax): fast,
  saturates; ``+x64``: exact, slow; ``reduce_range`` (7-bit weights, ORT's other remedy);
  QOperator format instead of QDQ;
- pointwise only: the depthwise convolutions kept in FP32 (MLAS's depthwise INT8 kernel
  does not saturate, but the depthwise layers are cheap and the most sensitive);
- the ``k`` convolutions whose own quantization costs the most cosine on *this* host's
  kernels (saturation included) kept in FP32, ``x64quantprecision`` off: the accuracy
  control ladder's sensitivity pass, measured here on AVX2 kernels.

Each candidate's mean / min embedding cosine vs ONNX FP32 on 100 held-out NEU-DET images,
top-1 of a trained head (``--run``: the run's own head on its held-out split) and batch-1
engine latency as a ratio to ONNX FP32 (each artifact alone in a fresh process, rounds in
alternating order, ``benchmarks/int8_kernels.py``'s worker).

AVX2 kernels on a newer CPU: ``--kernels avx2`` (the default on a host with AVX-512) runs a
private copy of the installed ONNX Runtime in which MLAS's one dispatch branch to its
AVX-512 kernels is cut (``avx2_onnxruntime``): MLAS then picks the AVX2/FMA kernels it
picks on a CPU without AVX-512 (FP32 and integer alike), on the real silicon, so both the
saturation (the cosines) and the speed are those kernels'. The copy's u8s8 cosine (~0.6)
against the installed one's (~0.96) shows the AVX2 kernels ran. ``--kernels native`` uses
the installed ONNX Runtime as is.

    .venv/bin/python benchmarks/ort_int8_speed.py [--backbone efficientnet_lite0]
        [--run RUN] [--kernels avx2|native] [--rounds 5] [--latency-images 20]
        [--max-k 16] [--brief] [--work /tmp/edge_tl_ort_int8_speed] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_kernels import Variant, cosines, latency_ms, pick_images, quiet, runner  # noqa: E402

from edge_tl.bundle import read_manifest  # noqa: E402
from edge_tl.export.quantize import conv_nodes, ort_preprocessed, quantize_ort  # noqa: E402
from edge_tl.export.saturation import pair_safe, saturation_report  # noqa: E402
from edge_tl.runtime.engine import DISABLED_OPTIMIZERS  # noqa: E402
from edge_tl.runtime.host import host_info  # noqa: E402
from edge_tl.runtime.preprocess import batch_inputs  # noqa: E402
from edge_tl.spec import Recipe, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
X64 = "session.x64quantprecision"
GOAL_COSINE, GOAL_DROP = 0.98, 0.005
# MLAS_PLATFORM(): "mov r8->rax; not rax; test al, 0xE0; je <AVX-512 setup>": the branch taken
# when the OS saves the AVX-512 state (XCR0 bits 5-7) on a CPU with AVX512F
_AVX512_BRANCH = bytes.fromhex("4c89c048f7d0a8e00f84")
_NOP6 = bytes.fromhex("660f1f440000")


def avx2_onnxruntime(work: Path) -> Path:
    """A copy of the installed ``onnxruntime`` package whose MLAS never takes its AVX-512
    kernels; returns the folder to put first on ``PYTHONPATH``.

    Raises:
        SystemExit: this ONNX Runtime build does not have the one branch this expects.
    """
    src = Path(importlib.util.find_spec("onnxruntime").submodule_search_locations[0])
    dst = work / "ort-avx2"
    lib = next((dst / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"), None)
    if lib is not None and (dst / "patched").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst / "onnxruntime")
    lib = next((dst / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
    data = bytearray(lib.read_bytes())
    at = data.find(_AVX512_BRANCH)
    if at < 0 or data.find(_AVX512_BRANCH, at + 1) >= 0:
        raise SystemExit(
            f"{lib.name}: MLAS's AVX-512 branch not found exactly once; run with "
            "--kernels native on an AVX2 CPU instead"
        )
    jump = at + len(_AVX512_BRANCH) - 2
    data[jump : jump + 6] = _NOP6
    lib.write_bytes(bytes(data))
    (dst / "patched").write_text(f"{lib.name}: 6 bytes at file offset {jump:#x} -> NOP\n")
    return dst


def fp32_bundle(data: Path, backbone: str, work: Path) -> Path:
    """The pretrained backbone's ONNX FP32 bundle (exported once, then reused)."""
    path = work / f"{backbone}-{data.name}-fp32"
    if not (path / "manifest.json").is_file():
        from edge_tl.export import export_bundle

        print(f"exporting {path} (onnx-fp32, {backbone})", flush=True)
        export_bundle(path, "onnx-fp32", backbone=backbone, calib=data)
    return path


def build(fp32: Path, calib: np.ndarray, recipe: Recipe, work: Path, name: str) -> Path:
    """``recipe``'s INT8 file (the export's own ``quantize_ort``), cached by name."""
    dst = work / f"{name}.onnx"
    if not dst.is_file():
        with quiet():
            quantize_ort(fp32, dst, calib, recipe, work)
    return dst


def build_direct(
    fp32: Path,
    calib: np.ndarray,
    work: Path,
    key: str,
    exclude: tuple[str, ...] = (),
    seven_bit: tuple[str, ...] = (),
    fmt: str = "QDQ",
    pair: tuple[str, ...] | None = (),
) -> Path:
    """``quantize_static`` as ``quantize_ort`` calls it (same calibration cache), plus what
    the recipe cannot say yet: QOperator format, 7-bit weights for some convolutions only
    (``TensorQuantOverrides`` ``reduce_range`` on their weight tensors), pair-safe 8-bit
    weights (``edge_tl.export.saturation.pair_safe``) for ``pair`` (None: every GEMM
    convolution)."""
    import hashlib

    import onnx
    from onnxruntime import quantization as q

    dst = work / f"{key}.onnx"  # rebuilt every run (a second with cached ranges)
    pre = ort_preprocessed(fp32, work)
    weight_of = {n.name: n.input[1] for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"}
    overrides = {weight_of[n]: [{"reduce_range": True}] for n in seven_bit}
    digest = hashlib.sha256(np.ascontiguousarray(calib[:, :, ::8, ::8]).tobytes()).hexdigest()[:12]

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    with quiet():
        q.quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=getattr(q.QuantFormat, fmt),
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=list(exclude) or None,
            calibration_cache_path=str(work / f"calib-minmax-{len(calib)}-{digest}.json"),
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )
    if pair is None or pair:
        pair_safe(dst, pre, None if pair is None else list(pair), dst)
    return dst


def sensitivity(
    fp32: Path,
    calib: np.ndarray,
    work: Path,
    x: np.ndarray,
    ref: np.ndarray,
) -> tuple[float, list[dict]]:
    """Per convolution: the cosine gained (on ``x``) when it alone stays FP32, on this
    process's kernels (the ladder's ``ort_sensitivity``, standalone), every GEMM
    convolution pair-safe."""
    opts = {DISABLED_OPTIMIZERS: "WeightBiasQuantization"}

    def cos_of(exclude: tuple[str, ...]) -> float:
        trial = build_direct(fp32, calib, work, "sensitivity", exclude, pair=None)
        got = runner("ort", trial, opts)(x)
        trial.unlink()
        return float(cosines(got, ref).mean())

    base_cos = cos_of(())
    nodes = conv_nodes(ort_preprocessed(fp32, work))
    t0 = time.perf_counter()
    for i, node in enumerate(nodes):
        node["gain"] = cos_of((node["name"],)) - base_cos
        print(f"\r  sensitivity {i + 1}/{len(nodes)}", end="", flush=True)
    print(f" ({time.perf_counter() - t0:.0f} s)")
    return base_cos, sorted(nodes, key=lambda r: -r["gain"])


def run_head(run: Path | None):
    """``(head, held-out inputs, labels)`` of a trained run, or None."""
    if run is None:
        return None
    from edge_tl.export.source import open_run

    src = open_run(run, None, "source")
    if src.held_out is None:
        raise SystemExit(f"{run}: its held-out split cannot be read")
    paths = list(src.held_out.paths)
    labels = np.asarray(src.held_out.labels)
    return src.head, paths, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "neu_det")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument(
        "--run", type=Path, help="a trained run: its head's top-1 on its held-out split"
    )
    ap.add_argument("--kernels", choices=("avx2", "native"), help="default: avx2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_ort_int8_speed"))
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--check", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--max-k", type=int, default=16, help="most convolutions kept in FP32")
    ap.add_argument(
        "--saturation",
        type=float,
        default=0.01,
        help="replayed relative error above which a convolution counts as saturating",
    )
    ap.add_argument(
        "--brief",
        action="store_true",
        help="only FP32, as written, x64quantprecision and the pair-safe settings",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    kernels = args.kernels or "avx2"
    if kernels == "avx2" and not os.environ.get("EDGE_TL_ORT_AVX2"):
        patched = avx2_onnxruntime(args.work)
        env = {
            **os.environ,
            "EDGE_TL_ORT_AVX2": str(patched),
            "PYTHONPATH": os.pathsep.join(
                [str(patched), str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
        }
        raise SystemExit(subprocess.call([sys.executable, *sys.argv], env=env))
    import onnxruntime

    work = args.work / f"{args.backbone}-{kernels}"
    work.mkdir(parents=True, exist_ok=True)
    bundle = fp32_bundle(args.data, args.backbone, args.work)
    manifest = read_manifest(bundle)
    fp32 = bundle / manifest.artifact.files[0]
    calib_paths, check_paths = pick_images(args.data, args.calib, args.check)
    calib = batch_inputs(calib_paths, manifest.preprocess)
    check = batch_inputs(check_paths, manifest.preprocess)
    trained = run_head(args.run)

    base = dataclasses.replace(load_recipe("ort-int8"), engine_options={})
    nodes = conv_nodes(ort_preprocessed(fp32, work))
    depthwise = tuple(n["name"] for n in nodes if str(n["shape"]).startswith("depthwise"))
    fp32_opts = {DISABLED_OPTIMIZERS: "WeightBiasQuantization"}
    files: dict[str, Path] = {"fp32": fp32}
    variants = [Variant("ONNX FP32 (reference)", "ort", "fp32")]

    def add(name: str, recipe: Recipe, key: str, options: dict[str, str]) -> None:
        if key not in files:
            print(f"quantizing {key}", flush=True)
            files[key] = build(fp32, calib, recipe, work, key)
        variants.append(Variant(name, "ort", key, options))

    add("u8s8 QDQ, as written", base, "u8s8", {})
    add("u8s8 QDQ + x64quantprecision (ort-int8 today)", base, "u8s8", {X64: "1"})
    if not args.brief:
        add(
            "u8s8 QDQ, reduce_range (7-bit weights)",
            dataclasses.replace(base, reduce_range=True),
            "u8s8-rr",
            {},
        )
        files["u8s8-qop"] = build_direct(fp32, calib, work, "u8s8-qop", fmt="QOperator")
        variants.append(Variant("u8s8 QOperator, as written", "ort", "u8s8-qop"))
        pw = dataclasses.replace(base, nodes_to_exclude=depthwise)
        add(f"pointwise only ({len(depthwise)} depthwise in FP32)", pw, "pointwise", fp32_opts)
        add("pointwise only + x64quantprecision", pw, "pointwise", {**fp32_opts, X64: "1"})

    # the convolutions whose AVX2 accumulation saturates, found by replaying it in numpy
    t0 = time.perf_counter()
    replay = saturation_report(files["u8s8"], calib[:8])
    replay_s = time.perf_counter() - t0
    sat = tuple(r["name"] for r in replay if r["relative_error"] > args.saturation)
    n_gemm = len(replay)
    for key, label, kw, opts in (
        ("sat-fp32", f"{len(sat)} saturating convs in FP32", {"exclude": sat}, fp32_opts),
        ("sat-7bit", f"{len(sat)} saturating convs 7-bit weights", {"seven_bit": sat}, {}),
        ("pair-all", f"all {n_gemm} GEMM convs pair-safe", {"pair": None}, {}),
    ):
        if args.brief and key != "pair-all":
            continue
        files[key] = build_direct(fp32, calib, work, key, **kw)
        variants.append(Variant(label, "ort", key, opts))

    # the ladder's sensitivity pass, x64quantprecision off, every GEMM convolution pair-safe
    # (so no kernel saturates and the ranking is the same on every host)
    x = calib[:32]
    ref_x = runner("ort", fp32, {})(x)
    print("sensitivity pass (each convolution alone in FP32)", flush=True)
    base_cos, ranking = sensitivity(fp32, calib, work, x, ref_x)
    ks = [k for k in (1, 2, 4, 8, 16) if k <= min(args.max_k, len(ranking))]
    for k in ks:
        names = tuple(r["name"] for r in ranking[:k])
        key = f"pair-top{k}"
        files[key] = build_direct(fp32, calib, work, key, exclude=names, pair=None)
        variants.append(Variant(f"pair-safe + {k} most sensitive in FP32", "ort", key, fp32_opts))

    emb, top1 = {}, {}
    held = None
    if trained is not None:
        head, hpaths, hlabels = trained
        held = batch_inputs(hpaths, manifest.preprocess)
    for v in variants:
        run = runner(v.engine, files[v.build], v.options)
        emb[v.name] = np.concatenate([run(check[i : i + 1]) for i in range(len(check))])
        if held is not None:
            e = np.concatenate([run(held[i : i + 32]) for i in range(0, len(held), 32)])
            top1[v.name] = float((head.predict_proba(e).argmax(1) == hlabels).mean())
        del run
    ref = emb[variants[0].name]
    cos = {k: cosines(e, ref) for k, e in emb.items()}
    n_lat = min(args.latency_images, len(check))
    inputs = work / "latency-inputs.npz"
    np.savez(inputs, x=check[:n_lat])
    print("timing batch-1 latency", flush=True)
    ms = latency_ms(variants, files, inputs, args.rounds, work)

    host = host_info()
    print(
        f"\nhost: {host['cpu']} ({host['cores']} cores, {', '.join(host['int8_isa'])}); "
        f"onnxruntime {onnxruntime.__version__} from {Path(onnxruntime.__file__).parent}; "
        f"kernels: {kernels}" + (" (MLAS AVX-512 dispatch cut)" if kernels == "avx2" else "")
    )
    print(
        f"{args.backbone}, {args.data.name}: {len(calib_paths)} calibration, "
        f"{len(check_paths)} check images; batch-1 latency, {n_lat} images x {args.rounds} "
        "rounds, each artifact in its own process"
        + (f"; top-1: {args.run} head on {len(held)} held-out images" if held is not None else "")
    )
    print(
        f"sensitivity set (32 calibration images): all pair-safe {base_cos:.4f}; top 8: "
        + ", ".join(f"{r['name']} ({r['shape']}) +{r['gain']:.4f}" for r in ranking[:8])
    )
    print(
        f"AVX2 replay (numpy, 8 calibration images, {replay_s:.1f} s): {len(sat)} of "
        f"{len(replay)} GEMM convolutions over {args.saturation:.0%} relative error: "
        + ", ".join(
            f"{r['name']} ({r['shape']}) {r['relative_error']:.3f}"
            for r in sorted(replay, key=lambda r: -r["relative_error"])
            if r["name"] in sat
        )
    )
    head_cols = " top-1 % | drop pt |" if top1 else ""
    print(f"\n| artifact | cosine mean | min | ms | vs FP32 |{head_cols} goal |")
    print("|---|---|---|---|---|" + ("---|---|" if top1 else "") + "---|")
    base_ms = ms[variants[0].name]
    rows = {}
    for v in variants:
        c, t = cos[v.name], ms[v.name]
        row = {
            "cosine_mean": float(c.mean()),
            "cosine_min": float(c.min()),
            "ms": t,
            "vs_fp32": t / base_ms,
        }
        extra = ""
        ok = c.mean() >= GOAL_COSINE and t < base_ms
        if top1:
            drop = top1[variants[0].name] - top1[v.name]
            row.update(top1=top1[v.name], top1_drop=drop)
            extra = f" {top1[v.name] * 100:.1f} | {drop * 100:+.1f} |"
            ok = ok and drop <= GOAL_DROP + 1e-9
        rows[v.name] = row
        print(
            f"| {v.name} | {c.mean():.4f} | {c.min():.4f} | {t:.2f} | {t / base_ms:.2f}x |"
            f"{extra} {'yes' if ok and v is not variants[0] else ''} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "host": host,
                    "kernels": kernels,
                    "backbone": args.backbone,
                    "rows": rows,
                    "ranking": ranking,
                    "replay": replay,
                    "replay_seconds": replay_s,
                    "onnxruntime": onnxruntime.__version__,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
