"""``edge-tl export`` for text encoders: a pretrained encoder or a text run -> a checked bundle.

The steps, in order (those of :mod:`edge_tl.export.pipeline`, through optimum): open the
source and its split; pick the calibration and check texts; write the model's fast tokenizer
as the bundle's ``tokenizer.json``; export ONNX FP32 with optimum and check its pooled
embeddings against PyTorch on the check texts, tokenized as the device will; build the
recipe's artifact under accuracy control (:mod:`edge_tl.export.text_control`); measure
PyTorch, ONNX FP32 and the artifact side by side; write head, exemplars, self-test, fidelity
report and manifest into a temporary folder renamed into place when complete.

Example:
    >>> export_text_bundle("minilm", "onnx-fp32", backbone="all-minilm-l6-v2")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.backbones import get_text_spec
from edge_tl.bundle import atomic_folder, check_destination
from edge_tl.errors import EdgeTLError
from edge_tl.export.accuracy_control import Candidate
from edge_tl.export.fidelity import accuracy, cosine, torch_size_mb
from edge_tl.export.side_by_side import artifact_metrics, fidelity_report
from edge_tl.export.text_control import (
    CheckTexts,
    TextControl,
    TextHeads,
    artifact_key,
    calibration_inputs,
    embed_engine,
)
from edge_tl.export.text_optimum import export_onnx
from edge_tl.export.text_source import (
    REFERENCE_TEXTS,
    TextSource,
    calibration_texts,
    open_text_backbone,
    open_text_run,
)
from edge_tl.export.write import seal_bundle
from edge_tl.report import ArtifactRow, FidelityReport
from edge_tl.runtime.engine import Engine, OrtEngine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.learner import EXEMPLARS, write_exemplars
from edge_tl.runtime.text import TextEncoder
from edge_tl.signing import Ed25519PrivateKey, sign_bundle
from edge_tl.spec import EMBEDDING, HeadEntry, Manifest, Recipe, load_recipe

__all__ = ["CHECK_TEXTS", "EXEMPLARS_PER_CLASS", "export_text_bundle"]

_logger = logging.getLogger(__name__)

CHECK_TEXTS = 300
"""At most this many calibration texts check a pretrained encoder's artifact."""
EXEMPLARS_PER_CLASS = 20
TEXT_INPUT = "input_ids"


def export_text_bundle(
    out: str | Path,
    recipe: str | Recipe,
    run: str | Path | None = None,
    backbone: str | None = None,
    calib: str | Path | None = None,
    head_fit: str = "artifact",
    force: bool = False,
    sign: Ed25519PrivateKey | None = None,
) -> Manifest:
    """Export a text encoder (a pretrained ``backbone``, or a text ``run``) into a bundle.

    Args:
        out: bundle folder to create (refused if it exists, unless ``force``).
        recipe: recipe name (``onnx-fp32``, ``ort-int8``, ``ort-int8-dynamic``,
            ``openvino-fp32``, ``openvino-fp16``, ``openvino-int8``), a TOML path or a
            :class:`Recipe`. Its format and precision decide the artifact; image-only knobs
            (``input_size``) do not apply.
        run: a folder written by ``edge-tl train`` on text data.
        backbone: a pretrained text encoder (``all-minilm-l6-v2``), exported without a head.
        calib: unlabelled texts (one per line) to calibrate INT8 and to check the artifact
            on; default: the run's training texts. A pretrained encoder needs them for
            static INT8.
        head_fit: ``artifact`` refits the run's linear head on the artifact's own
            embeddings of its training texts; ``source`` keeps the run's head.
        force: replace an existing ``out`` (only once the new bundle is complete).
        sign: sign the manifest with this key before the bundle is renamed into place.

    Returns:
        The bundle's manifest.

    Raises:
        EdgeTLError: conflicting arguments, unreadable texts, static INT8 without texts, an
            ONNX graph that does not match PyTorch, or an artifact that misses its tolerance
            (``ToleranceError``); nothing is written at ``out`` then.

    Example:
        >>> export_text_bundle("b", "ort-int8", backbone="all-minilm-l6-v2", calib="q.txt")
        ... # doctest: +SKIP
    """
    out = Path(out)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if (run is None) == (backbone is None):
        raise EdgeTLError("pass either a RUN folder or --backbone NAME, not both or neither")
    if head_fit not in ("artifact", "source"):
        raise EdgeTLError(f"--head-fit must be artifact or source, not {head_fit!r}")
    if rec.input_size:
        raise EdgeTLError(
            f"recipe {rec.name} sets input_size {rec.input_size}, an image size; a text "
            "encoder takes texts up to its max_length tokens: remove input_size"
        )
    if rec.pair_safe_weights:
        raise EdgeTLError(
            f"recipe {rec.name} sets pair_safe_weights, which makes convolutions safe from "
            "AVX2 saturation; a text encoder's MatMuls are not: export it with ort-int8"
        )
    if rec.quantization == "ort-static" and rec.calibration_method != "minmax":
        raise EdgeTLError(
            f"recipe {rec.name} calibrates with {rec.calibration_method}, whose ONNX Runtime "
            "calibrator stacks every batch into one array, which texts of different lengths "
            'cannot form; use calibration_method = "minmax" for text'
        )
    check_destination(out, force)
    calibrates = rec.precision == "int8" and rec.quantization != "ort-dynamic"
    if run is not None:
        src = open_text_run(run, calib, head_fit)
        calib_sample, calib_pool = calibration_texts(
            calib, src.fit_set, rec.calibration_size, calibrates, rec.name
        )
    else:  # the texts first: a bad --calib fails before the model loads
        get_text_spec(backbone)  # type: ignore[arg-type]
        calib_sample, calib_pool = calibration_texts(
            calib, None, rec.calibration_size, calibrates, rec.name
        )
        src = open_text_backbone(backbone)  # type: ignore[arg-type]
    head_fit = head_fit if src.fit_set is not None and src.head is not None else "source"
    check = _check_texts(src, calib_pool)
    with tempfile.TemporaryDirectory(prefix="edge_tl_text_export_") as tmp:
        work = Path(tmp)
        with atomic_folder(out, force) as bdir:
            pre = src.pre
            src.tokenizer.backend_tokenizer.save(str(bdir / pre.tokenizer))
            encoder = TextEncoder(bdir, pre)
            onnx_fp32, reference, fp32_engine, fp32_emb, parity = _export_checked(
                src, work, encoder, check, rec
            )
            heads = _heads(src, head_fit)
            fp32_key = artifact_key(onnx_fp32.parent, [onnx_fp32.name], {})
            fp32_head = heads.for_engine(fp32_engine, encoder, fp32_key)
            control = TextControl(
                src.model_dir,
                onnx_fp32,
                rec,
                calibration_inputs(encoder, calib_sample) if calibrates else None,
                bdir,
                work,
                encoder,
                check,
                reference,
                fp32_head,
                heads,
                calib_texts=calib_sample,
                known={fp32_key: fp32_emb},
            )
            _logger.info(f"building {rec.name} ({rec.format} {rec.precision})")
            chosen = control.run()
            rows, cosines, preds = _side_by_side(
                src,
                encoder,
                check,
                reference,
                fp32_emb,
                fp32_engine,
                fp32_head,
                chosen,
                bdir,
                onnx_fp32,
            )
            spread = control.calibration_spread(
                chosen.recipe, calib_pool, rec.calibration_size, rec.calibration_subsets
            )
            report = fidelity_report(
                src.name,
                rec,
                control,
                check.what,
                len(check),
                check.labels,
                src.labels,
                rows,
                preds,
                spread,
                unit="texts",
            )
            metrics = artifact_metrics(
                report,
                {EMBEDDING: parity},
                control,
                ("calibration_texts", len(calib_sample) if calibrates else 0),
                head_fit,
                chosen.head,
                len(check),
            )
            manifest = _write_bundle(
                bdir, src, chosen, encoder, check, reference, head_fit, report, cosines, metrics
            )
            if sign is not None:
                sign_bundle(bdir, sign)
            return manifest


# ---- the steps ---------------------------------------------------------------------------
def _check_texts(src: TextSource, calib_pool: list[str]) -> CheckTexts:
    """The run's held-out split (labelled); else up to :data:`CHECK_TEXTS` of the calibration
    texts; else the built-in reference sentences."""
    if src.held_out is not None:
        return CheckTexts(list(src.held_out.paths), src.held_out.labels, "held-out split")
    if calib_pool:
        idx = np.random.default_rng(2).permutation(len(calib_pool))[:CHECK_TEXTS]
        return CheckTexts([calib_pool[i] for i in sorted(idx)], None, "calibration texts")
    return CheckTexts(list(REFERENCE_TEXTS), None, "built-in reference sentences")


def _export_checked(
    src: TextSource, work: Path, encoder: TextEncoder, check: CheckTexts, rec: Recipe
) -> tuple[Path, np.ndarray, Engine, np.ndarray, float]:
    """ONNX FP32 by optimum, checked: its pooled embeddings of the check texts (tokenized by
    the bundle's tokenizer) against PyTorch's (tokenized by ``transformers``).

    Returns:
        ``(onnx path, FP32 PyTorch embeddings, ONNX FP32 engine, its embeddings, max abs diff)``.

    Raises:
        EdgeTLError: the max abs difference exceeds the recipe's ``parity_atol``.
    """
    from edge_tl.train.text_encoder import embed_texts

    _logger.info(f"exporting {src.name} to ONNX (optimum)")
    onnx_fp32 = export_onnx(src.model_dir, work)
    reference = embed_texts(src.model, src.tokenizer, check.texts, src.pre)
    engine = OrtEngine(onnx_fp32)
    emb = embed_engine(engine, encoder, check.texts, desc="embedding with ONNX FP32")
    diff = float(np.abs(emb - reference).max())
    if diff > rec.parity_atol:
        worst = int(np.abs(emb - reference).max(1).argmax())
        raise EdgeTLError(
            f"the ONNX export of {src.name} differs from PyTorch: pooled embeddings max abs "
            f"diff {diff:.2e} > parity_atol {rec.parity_atol:g} on {len(check)} {check.what} "
            f"(worst: text {worst + 1}, {check.texts[worst][:60]!r}); nothing was written"
        )
    return onnx_fp32, reference, engine, emb, diff


def _heads(src: TextSource, head_fit: str) -> TextHeads:
    n = len(src.labels)
    if head_fit == "artifact" and src.fit_set is not None:
        return TextHeads(src.head, n, list(src.fit_set.paths), src.fit_set.labels)
    return TextHeads(src.head, n)


def _latency_ms(
    runners: dict[str, Callable[[str], Any]], texts: Sequence[str], rounds: int = 4, n: int = 5
) -> dict[str, float]:
    """Batch-1 median latency (ms) per runner, tokenization and pooling included: ``rounds``
    rounds, each timing ``n`` texts per runner in a block after two warm-up calls. Blocks,
    not text by text: ONNX Runtime's threads spin for a while after each run, and PyTorch
    run right after it measured 25x its own speed on a 2-core host (515 vs 20 ms)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    sample = list(texts[: rounds * n])
    for r in range(rounds):
        chunk = sample[r * n : (r + 1) * n]
        if not chunk:
            break
        for name, run in runners.items():
            for t in chunk[:2]:
                run(t)
            for t in chunk:
                t0 = time.perf_counter()
                run(t)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def _side_by_side(
    src: TextSource,
    encoder: TextEncoder,
    check: CheckTexts,
    reference: np.ndarray,
    fp32_emb: np.ndarray,
    fp32_engine: Engine,
    fp32_head: LinearHead | None,
    chosen: Candidate,
    bdir: Path,
    onnx_fp32: Path,
) -> tuple[dict[str, ArtifactRow], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch FP32, ONNX FP32 and the artifact: rows, per-text cosines, predictions."""
    from edge_tl.train.text_encoder import embed_texts

    name = chosen.recipe.name
    models = {
        "pytorch-fp32": (reference, fp32_head),
        "onnx-fp32": (fp32_emb, fp32_head),
        name: (chosen.emb, chosen.head),
    }
    sizes = {
        "pytorch-fp32": torch_size_mb(src.model),
        "onnx-fp32": onnx_fp32.stat().st_size / 1e6,
        name: sum((bdir / f).stat().st_size for f in chosen.artifact.files) / 1e6,
    }
    _logger.info("timing batch-1 latency")
    lat = _latency_ms(
        {
            "pytorch-fp32": lambda t: embed_texts(src.model, src.tokenizer, [t], src.pre),
            "onnx-fp32": lambda t: embed_engine(fp32_engine, encoder, [t]),
            name: lambda t: embed_engine(chosen.engine, encoder, [t]),
        },
        check.texts,
    )
    labels = check.labels
    ref_pred = None if fp32_head is None else fp32_head.predict_proba(reference).argmax(1)
    rows, cosines, preds = {}, {}, {}
    for key, (emb, head) in models.items():
        cos = cosine(emb, reference)
        pred = None if head is None else head.predict_proba(emb).argmax(1)
        rows[key] = ArtifactRow(
            cosine_mean=float(cos.mean()),
            cosine_min=float(cos.min()),
            top1_agreement=None if pred is None else float((pred == ref_pred).mean()),
            accuracy_own_head=None
            if pred is None or labels is None
            else float((pred == labels).mean()),
            accuracy_fp32_head=None
            if src.head is None or labels is None
            else accuracy(src.head, emb, labels),
            size_mb=round(sizes[key], 2),
            latency_ms=lat[key],
        )
        if pred is not None:
            preds[key] = pred
        if key != "pytorch-fp32":
            cosines[key] = cos
    return rows, cosines, preds


def _write_bundle(
    bdir: Path,
    src: TextSource,
    chosen: Candidate,
    encoder: TextEncoder,
    check: CheckTexts,
    reference: np.ndarray,
    head_fit: str,
    report: FidelityReport,
    cosines: dict[str, np.ndarray],
    metrics: dict[str, Any],
) -> Manifest:
    """Head, exemplars, self-test, report and last the manifest into ``bdir``."""
    head = None
    if chosen.head is not None:
        chosen.head.save(bdir / "head.npz")
        head = HeadEntry(kind="linear", file="head.npz", fit_on=head_fit)
        if src.fit_set is not None:
            _write_exemplars(bdir / EXEMPLARS, src, chosen.engine, encoder)
            head = HeadEntry(kind="linear", file="head.npz", fit_on=head_fit, exemplars=EXEMPLARS)
    return seal_bundle(
        bdir,
        src.name,
        TEXT_INPUT,
        src.pre,
        {EMBEDDING: ["batch", int(reference.shape[1])]},
        chosen,
        src.labels,
        head,
        metrics,
        src.source,
        (np.asarray(check.texts, dtype=str), reference),
        report,
        cosines,
    )


def _write_exemplars(
    path: Path, src: TextSource, engine: Engine, encoder: TextEncoder, seed: int = 0
) -> None:
    """Artifact embeddings of up to 20 training texts per class (the known classes' stand-ins
    when the device adds one, ``learn --add``)."""
    fit_set = src.fit_set
    assert fit_set is not None
    rng = np.random.default_rng(seed)
    idx = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(fit_set.labels == c))[:EXEMPLARS_PER_CLASS]
                for c in np.unique(fit_set.labels)
            ]
        )
    )
    texts = [fit_set.paths[i] for i in idx]
    x = embed_engine(engine, encoder, texts, desc="embedding exemplars")
    write_exemplars(path, x, fit_set.labels[idx])
