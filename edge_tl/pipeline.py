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
from edge_tl.progress import say
from edge_tl.runtime.engine import OrtEngine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.spec import (
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    INPUT_NAME,
    Manifest,
    Recipe,
    load_recipe,
)

HEAD_FITS = ("artifact", "source")


def export_bundle(
    out: str | Path,
    recipe: str | Recipe,
    run: str | Path | None = None,
    backbone: str | None = None,
    calib: str | Path | None = None,
    head_fit: str = "artifact",
    force: bool = False,
    weights: str | Path | None = None,
    logits: bool = False,
) -> Manifest:
    """Export a trained run (or a pretrained ``backbone``) into a bundle at ``out``.

    Args:
        out: bundle folder to create (refused if it exists, unless ``force``).
        recipe: recipe name (``ort-int8``), path to a recipe TOML, or a :class:`Recipe`.
        run: a folder written by ``edge-tl train``; or None with ``backbone``.
        backbone: export ImageNet features and classifier without training.
        calib: images for calibration and parity checks (ImageFolder or flat folder);
            defaults to the run's training split.
        weights: with ``backbone``, a local pretrained weights file (torchvision nets).
        head_fit: ``artifact`` refits the run's linear head on the artifact's own embeddings
            of the training split; ``source`` keeps the head trained in PyTorch.
        force: replace an existing ``out`` (only once the new bundle is complete).
        logits: also fuse the head into the graph as a ``logits`` output (FP32), for users
            who run the engine directly and need no on-device learning.

    Example:
        >>> export_bundle("bundles/neu_int8", "ort-int8", run="runs/neu")  # doctest: +SKIP
    """
    out = Path(out)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if (run is None) == (backbone is None):
        raise EdgeTLError("pass either a RUN folder or --backbone NAME, not both or neither")
    if weights is not None and run is not None:
        raise EdgeTLError("--weights goes with --backbone; a run folder carries its own weights")
    if head_fit not in HEAD_FITS:
        raise EdgeTLError(f"--head-fit must be one of {', '.join(HEAD_FITS)}, not {head_fit!r}")
    check_destination(out, force)

    from edge_tl.backbones import build, get_spec, imagenet_labels, weights_sha256
    from edge_tl.export import export_onnx, parity
    from edge_tl.fidelity import (
        Checker,
        Images,
        agreement,
        calibration_spread,
        embed,
        engine_runner,
        latency_ms,
        per_class,
        write_report,
        write_self_test,
    )
    from edge_tl.quantize import LOGITS, append_logits
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

    pool = _calibration_pool(calib, fit_set)
    calib_paths = _calibration_sample(pool, rec.calibration_size, rec.precision == "int8")
    check_on = "held-out split" if held_out is not None else "calibration images"
    check = Images(
        list(held_out.paths) if held_out is not None else calib_paths,
        pre,
        held_out.labels if held_out is not None else None,
        desc=f"decoding {check_on}",
    )
    with tempfile.TemporaryDirectory(prefix="edge_tl_export_") as tmp:
        work = Path(tmp)
        fp32 = work / "fp32.onnx"
        say(f"exporting {name} to ONNX")
        outputs = export_onnx(features, fp32, pre.size)
        diffs = parity(features, fp32, check.inputs(0, 8), rec.parity_atol)
        reference = embed(_torch_runner(features), check)
        fp32_engine = OrtEngine(fp32)
        fp32_emb = embed(engine_runner(fp32_engine), check)
        calib_inputs = Images(calib_paths, pre).inputs() if rec.precision == "int8" else None
        fit = None
        fp32_head = head  # the head FP32 accuracy is measured with
        if fit_set is not None and head_fit == "artifact":
            fit = Images(list(fit_set.paths), pre, fit_set.labels, desc="decoding training split")
            say("fitting a head on FP32 embeddings of the training split")
            fp32_head = LinearHead.fit(
                embed(engine_runner(fp32_engine), fit), fit.labels, len(labels)
            )

        def head_for(engine) -> LinearHead:
            """The head that ships with ``engine``: refit on its own embeddings, or the run's."""
            if fit is None:
                return head
            return LinearHead.fit(embed(engine_runner(engine), fit), fit.labels, len(labels))

        with atomic_folder(out, force) as bdir:
            say(f"building {rec.name} ({rec.format} {rec.precision})")
            checker = Checker(
                fp32, rec, calib_inputs, bdir, work, check, reference, fp32_head, head_for, head
            )
            artifact, engine, chosen, shipped = checker.run_ladder()
            emb = embed(engine_runner(engine), check)
            # each row: with the run's own head (trained on FP32 PyTorch embeddings) and with
            # the head fit the way this bundle's head is (on that row's own embeddings)
            rows = {
                "pytorch-fp32": (reference, fp32_head),
                "onnx-fp32": (fp32_emb, fp32_head),
                rec.name: (emb, shipped),
            }
            report_rows = {}
            for key, (e, h) in rows.items():
                r = agreement(e, reference, h, check.labels, fp32_head)
                if check.labels is not None:
                    r["accuracy_own_head"] = r.pop("accuracy")
                    r["accuracy_fp32_head"] = float(
                        (head.predict_proba(e).argmax(1) == check.labels).mean()
                    )
                report_rows[key] = r
            metrics: dict[str, Any] = {
                "parity_max_abs_diff": diffs,
                "parity_atol": rec.parity_atol,
                "calibration_images": len(calib_paths) if calib_inputs is not None else 0,
                "head_fit": head_fit,
            }
            if fit is not None:
                metrics["head_l2"] = shipped.l2
            sizes = {
                "pytorch-fp32": _torch_size_mb(features),
                "onnx-fp32": fp32.stat().st_size / 1e6,
                rec.name: sum((bdir / f).stat().st_size for f in artifact.files) / 1e6,
            }
            runners = {
                "pytorch-fp32": _torch_runner(features),
                "onnx-fp32": engine_runner(fp32_engine),
                rec.name: engine_runner(engine),
            }
            say("timing batch-1 latency")
            lat = latency_ms(runners, check)
            for key, r in report_rows.items():
                r["size_mb"] = round(sizes[key], 2)
                r["latency_ms"] = lat[key]
            spread = calibration_spread(
                checker, chosen, pool, rec.calibration_size, rec.calibration_subsets
            )
            art = report_rows[rec.name]
            metrics["embedding_cosine_vs_fp32"] = {
                "mean": art["cosine_mean"],
                "min": art["cosine_min"],
                "n": len(check),
                "on": check_on,
            }
            metrics["top1_agreement_vs_fp32"] = art["top1_agreement"]
            if check.labels is not None:
                metrics["test_accuracy"] = art["accuracy_own_head"]
                metrics["test_n"] = len(check)
                metrics["fp32_test_accuracy"] = report_rows["pytorch-fp32"]["accuracy_own_head"]
            if len(checker.attempts) > 1:
                metrics["accuracy_control"] = checker.attempts[-1].step
            shipped.save(bdir / "head.npz")
            head_entry: dict[str, Any] = {"kind": "linear", "file": "head.npz", "fit_on": head_fit}
            if fit is not None:
                write_exemplars(bdir / EXEMPLARS, fit_set, pre, engine)
                head_entry["exemplars"] = EXEMPLARS
            if logits:
                append_logits(bdir, list(artifact.files), *shipped.folded())
                outputs = {**outputs, LOGITS: ["batch", len(labels)]}
            self_test = write_self_test(bdir, check, reference, emb, chosen)
            report = {
                "backbone": name,
                "recipe": rec.name,
                "verdict": "pass"
                if len(checker.attempts) == 1
                else f"pass after accuracy control ({checker.attempts[-1].step})",
                "checked_on": check_on,
                "n_images": len(check),
                "tolerance": {"min_cosine": rec.min_cosine, "max_top1_drop": rec.max_top1_drop},
                "host": host_info(),
                "artifacts": {
                    k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                    for k, v in report_rows.items()
                },
                "per_class": {
                    k: per_class(v["_pred"], check.labels, labels) for k, v in report_rows.items()
                }
                if check.labels is not None
                else None,
                "accuracy_control": [a.to_dict() for a in checker.attempts]
                if rec.precision == "int8"
                else [],
                "sensitive_layers": checker.sensitivity[:16],
                "calibration_sensitivity": spread,
                "_plot": {
                    "cosines": {
                        k: v["_cosines"] for k, v in report_rows.items() if k != "pytorch-fp32"
                    }
                },
            }
            write_report(bdir, report)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                edge_tl_version=__version__,
                backbone=name,
                input_name=INPUT_NAME,
                preprocess=pre,
                outputs=outputs,
                artifact=artifact,
                labels=list(labels),
                head=head_entry,
                metrics=metrics,
                source={**source, "weights_sha256": weights},
                files=hash_files(bdir),
                self_test=self_test,
            )
            write_manifest(bdir, manifest)
    return manifest


EXEMPLARS = "exemplars.npz"
EXEMPLARS_PER_CLASS = 20


def write_exemplars(path: Path, fit_set: Dataset, pre, engine, seed: int = 0) -> None:
    """Artifact embeddings of up to 20 training images per class: on the device they stand
    for the classes the head already knows when a new class is imprinted, and give the open
    set its prototypes (a few hundred KB)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [
            rng.permutation(np.flatnonzero(fit_set.labels == c))[:EXEMPLARS_PER_CLASS]
            for c in np.unique(fit_set.labels)
        ]
    )
    from edge_tl.fidelity import Images, embed, engine_runner

    sub = fit_set.subset(np.sort(idx))
    images = Images(list(sub.paths), pre, sub.labels, desc="decoding exemplars")
    x = embed(engine_runner(engine), images)
    np.savez(path, x=x.astype(np.float32), y=sub.labels.astype(np.int64))


def _torch_runner(features):
    """FP32 PyTorch embeddings (the reference every artifact is measured against)."""
    import torch

    features = features.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return features(torch.from_numpy(x))[0].numpy()

    return run


def _torch_size_mb(features) -> float:
    return sum(t.numel() * t.element_size() for t in features.state_dict().values()) / 1e6


def _calibration_pool(calib, fit_set: Dataset | None) -> list[str]:
    """Every image calibration may draw from: ``--calib``, or the run's training split."""
    if calib is not None:
        return _image_paths(Path(calib))
    if fit_set is not None:
        return list(fit_set.paths)
    raise EdgeTLError("exporting a backbone needs real images: pass --calib DATA")


def _calibration_sample(pool: list[str], size: int, int8: bool) -> list[str]:
    if int8 and len(pool) < size:
        print(
            f"warning: only {len(pool)} calibration images (the recipe asks for {size}); "
            "INT8 ranges may be less accurate",
            file=sys.stderr,
        )
    idx = np.random.default_rng(0).permutation(len(pool))[:size]
    return [pool[i] for i in sorted(idx)]


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
