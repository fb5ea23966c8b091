"""``edge-tl export``: run folder (or pretrained backbone) -> checked bundle.

Steps: ONNX FP32 export, parity against PyTorch on real images, the recipe's artifact
(INT8 calibrated on real images), a head fitted on the artifact's own embeddings of the
training split, accuracy and embedding cosine on the held-out split, then the bundle,
written atomically.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.bundle import atomic_folder, check_destination, hash_files, write_manifest
from edge_tl.data import Dataset, fingerprint, image_folder, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.engine import make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.preprocess import batch_inputs
from edge_tl.spec import (
    EMBEDDING,
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    INPUT_NAME,
    Artifact,
    Manifest,
    load_recipe,
)

HEAD_FITS = ("artifact", "source")


def export_bundle(
    out: str | Path,
    recipe: str,
    run: str | Path | None = None,
    backbone: str | None = None,
    calib: str | Path | None = None,
    head_fit: str = "artifact",
    force: bool = False,
    weights: str | Path | None = None,
) -> Manifest:
    """Export a trained run (or a pretrained ``backbone``) into a bundle at ``out``.

    Args:
        out: bundle folder to create (refused if it exists, unless ``force``).
        recipe: recipe name (``ort-int8``) or path to a recipe TOML.
        run: a folder written by ``edge-tl train``; or None with ``backbone``.
        backbone: export ImageNet features and classifier without training.
        calib: images for calibration and parity checks (ImageFolder or flat folder);
            defaults to the run's training split.
        weights: with ``backbone``, a local pretrained weights file (torchvision nets).
        head_fit: ``artifact`` refits the run's linear head on the artifact's own embeddings
            of the training split; ``source`` keeps the head trained in PyTorch.
        force: replace an existing ``out`` (only once the new bundle is complete).

    Example:
        >>> export_bundle("bundles/neu_int8", "ort-int8", run="runs/neu")  # doctest: +SKIP
    """
    out = Path(out)
    rec = load_recipe(recipe)
    if (run is None) == (backbone is None):
        raise EdgeTLError("pass either a RUN folder or --backbone NAME, not both or neither")
    if weights is not None and run is not None:
        raise EdgeTLError("--weights goes with --backbone; a run folder carries its own weights")
    if head_fit not in HEAD_FITS:
        raise EdgeTLError(f"--head-fit must be one of {', '.join(HEAD_FITS)}, not {head_fit!r}")
    check_destination(out, force)

    from edge_tl.backbones import build, get_spec, imagenet_labels, weights_sha256
    from edge_tl.export import export_onnx, parity
    from edge_tl.quantize import build_artifact
    from edge_tl.train import load_run, run_splits

    held_out: Dataset | None = None
    fit_set: Dataset | None = None
    if run is not None:
        record, features, head = load_run(run)
        labels = record["labels"]
        source: dict[str, Any] = {
            "kind": "run",
            "run": str(Path(run).resolve()),
            "strategy": record["config"]["strategy"],
            "data": record["data"],
            "split": {
                **{k: record["config"][k] for k in ("test_frac", "val_frac", "seed")},
                "data_fingerprint": record.get("data_fingerprint"),
            },
            "pytorch_test_accuracy": record["metrics"].get("test_accuracy"),
        }
        try:
            ds = open_dataset(record["data"])
        except EdgeTLError as e:
            if head_fit == "artifact" or calib is None:
                raise EdgeTLError(
                    f"the run's training data is not readable ({e}); pass --calib DATA and "
                    "--head-fit source"
                ) from None
            ds = None
        if ds is not None and (
            ds.classes != labels or record.get("data_fingerprint") not in (None, fingerprint(ds))
        ):
            raise EdgeTLError(
                f"the training data {record['data']} changed since the run was trained (other "
                "classes or images); restore it, or export with --calib DATA --head-fit source"
            )
        if ds is not None:
            cfg = record["config"]
            splits = run_splits(ds, cfg)
            fit_set = ds.subset(np.concatenate([splits["train"], splits["val"]]))
            held_out = ds.subset(splits["test"])
        weights = record["weights_sha256"]
        name = record["backbone"]
    else:
        spec = get_spec(backbone)
        features, fc = build(spec.name, weights=weights)
        head = LinearHead.from_logits_layer(fc.weight.detach().numpy(), fc.bias.detach().numpy())
        labels = imagenet_labels()
        source = {"kind": "imagenet"}
        head_fit = "source"
        weights = weights_sha256(spec.name, weights)
        name = spec.name
    pre = features.spec.preprocess
    if rec.input_size and rec.input_size != pre.size:
        raise EdgeTLError(
            f"recipe {rec.name} asks for input size {rec.input_size}, but {name} was built for "
            f"{pre.size}; remove input_size from the recipe"
        )

    calib_paths = _calibration_paths(calib, fit_set, rec.calibration_size)
    parity_inputs = batch_inputs(calib_paths[:8], pre)
    with tempfile.TemporaryDirectory(prefix="edge_tl_export_") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _say(f"exporting {name} to ONNX")
        outputs = export_onnx(features, fp32, pre.size)
        diffs = parity(features, fp32, parity_inputs, rec.parity_atol)
        calib_inputs = (
            np.concatenate(
                [batch_inputs(calib_paths[i : i + 32], pre) for i in range(0, len(calib_paths), 32)]
            )
            if rec.precision == "int8"
            else None
        )
        with atomic_folder(out, force) as bdir:
            _say(f"building {rec.name} ({rec.format} {rec.precision})")
            files, options = build_artifact(fp32, rec, calib_inputs, bdir)
            artifact = Artifact(rec.format, rec.precision, tuple(files), rec.name, options)
            engine = make_engine(bdir, artifact)
            reference = make_engine(Path(tmp), Artifact("onnx", "fp32", ("fp32.onnx",), "ref"))
            metrics: dict[str, Any] = {
                "parity_max_abs_diff": diffs,
                "parity_atol": rec.parity_atol,
                "calibration_images": len(calib_paths) if calib_inputs is not None else 0,
                "head_fit": head_fit,
            }
            if fit_set is not None and head_fit == "artifact":
                emb = _embed(engine, fit_set.paths, pre, "embedding train split")
                head = LinearHead.fit(emb, fit_set.labels, len(labels))
                metrics["head_l2"] = head.l2
            check = held_out  # None when exporting a backbone: check on the calibration images
            check_paths = check.paths if check is not None else calib_paths
            got = _embed(engine, check_paths, pre, "checking held-out")
            ref = _embed(reference, check_paths, pre, "fp32 reference")
            cos = np.sum(got * ref, 1) / (
                np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12
            )
            metrics["embedding_cosine_vs_fp32"] = {
                "mean": float(cos.mean()),
                "min": float(cos.min()),
                "n": len(cos),
                "on": "held-out split" if check is not None else "calibration images",
            }
            if check is not None:
                pred = head.predict_proba(got).argmax(1)
                metrics["test_accuracy"] = float((pred == check.labels).mean())
                metrics["test_n"] = len(check)
                metrics["top1_agreement_vs_fp32"] = float(
                    (pred == head.predict_proba(ref).argmax(1)).mean()
                )
            head.save(bdir / "head.npz")
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                edge_tl_version=__version__,
                backbone=name,
                input_name=INPUT_NAME,
                preprocess=pre,
                outputs=outputs,
                artifact=artifact,
                labels=list(labels),
                head={"kind": "linear", "file": "head.npz", "fit_on": head_fit},
                metrics=metrics,
                source={**source, "weights_sha256": weights},
                files=hash_files(bdir),
            )
            write_manifest(bdir, manifest)
    return manifest


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _embed(engine, paths: list[str], pre, desc: str) -> np.ndarray:
    out = []
    for i in progress(range(0, len(paths), 32), desc=desc):
        out.append(engine.run(batch_inputs(paths[i : i + 32], pre), (EMBEDDING,))[EMBEDDING])
    return np.concatenate(out)


def _calibration_paths(calib, fit_set: Dataset | None, size: int) -> list[str]:
    if calib is not None:
        paths = _image_paths(Path(calib))
    elif fit_set is not None:
        paths = list(fit_set.paths)
    else:
        raise EdgeTLError("exporting a backbone needs real images: pass --calib DATA")
    if len(paths) < size:
        print(
            f"warning: only {len(paths)} calibration images (the recipe asks for {size}); "
            "INT8 ranges may be less accurate",
            file=sys.stderr,
        )
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(paths))[:size]
    return [paths[i] for i in sorted(idx)]


def _image_paths(folder: Path) -> list[str]:
    """Images of an ImageFolder, or of a flat folder of images."""
    if not folder.is_dir():
        raise EdgeTLError(f"calibration folder {folder} does not exist; pass a folder of images")
    flat = sorted(
        str(p)
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if flat:
        return flat
    return list(image_folder(folder).paths)
