"""Accuracy control: INT8 that misses its recipe's tolerance is escalated step by step, and
refused when nothing reaches it.

Each step builds the artifact with other settings and measures it on the check images
against FP32 PyTorch: mean embedding cosine (``min_cosine``) and top-1 drop of both the head
that ships and the run's own FP32-trained head (``max_top1_drop``). Every try is recorded.
The steps follow each backend's own advice: ONNX Runtime's saturation-safe requantization
(its docs for AVX2 CPUs without VNNI), other calibration methods, then the most sensitive
convolutions kept in FP32 (ranked by their local quantization noise in one pass,
:mod:`edge_tl.export.sensitivity`);
OpenVINO's overflow fix, full bias correction, the first convolutions in FP32, then
``nncf.quantize_with_accuracy_control``.

Example:
    >>> control = AccuracyControl(fp32, recipe, calib, bdir, work, check, ref, ref_head, heads)
    >>> chosen = control.run()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edge_tl.export.control_base import (
    Attempt,
    Candidate,
    ControlLadder,
    ToleranceError,
    nncf_first_steps,
)
from edge_tl.export.fidelity import (
    Agreement,
    HeadFit,
    Images,
    accuracy,
    agreement,
    cosine,
    embed,
    engine_runner,
)
from edge_tl.export.quantize import build_artifact, first_convolutions
from edge_tl.export.sensitivity import ort_sensitivity, ort_sensitivity_full
from edge_tl.runtime.engine import DISABLED_OPTIMIZERS, OrtEngine, make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.spec import EMBEDDING, Artifact, Recipe

__all__ = ["AccuracyControl", "Attempt", "Candidate", "ToleranceError"]

_logger = logging.getLogger(__name__)

SENSITIVITY_IMAGES = 32
SENSITIVITY = "one-pass"
"""How the ORT ladder ranks convolutions: ``one-pass`` (local quantization noise, one
forward pass) or ``full`` (one quantization and pass per convolution, the reference):
:mod:`edge_tl.export.sensitivity`."""
EXCLUSION_STEPS = (1, 2, 4, 8, 16, 32)


@dataclass
class AccuracyControl(ControlLadder):
    """Builds the recipe's artifact into ``out_dir`` and measures it against the FP32
    reference on the check images; escalates INT8 that misses the tolerance.

    Args:
        fp32_onnx: the FP32 graph every artifact is built from.
        calib: calibration inputs ``float32[N, 3, S, S]`` (INT8), or None.
        work: a folder for calibration caches and trial graphs.
        check: the check images (the run's held-out split, labelled, or calibration images).
        reference: FP32 PyTorch embeddings of ``check``.
        reference_head: the head FP32 accuracy is measured with.
        heads: how the head that ships with an artifact is made.
        decode: ``decode(paths, desc=...)`` -> :class:`Images` (the export's shared, cached
            decoding); None decodes afresh.
    """

    fp32_onnx: Path
    recipe: Recipe
    calib: np.ndarray | None
    out_dir: Path
    work: Path
    check: Images
    reference: np.ndarray
    reference_head: LinearHead
    heads: HeadFit
    decode: Callable[..., Images] | None = None
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    last: Candidate | None = None

    inputs: ClassVar[str] = "images"
    int8_fix: ClassVar[str] = (
        "fine-tune with quantization-aware training (`edge-tl train ... --qat`) and export "
        "again, use an FP32/FP16 recipe, or loosen min_cosine / max_top1_drop in a copy of "
        "the recipe"
    )
    other_fix: ClassVar[str] = (
        "report this with the backbone name, or loosen min_cosine in a copy of the recipe"
    )

    # ---- building and measuring -------------------------------------------------------
    def build(
        self,
        recipe: Recipe,
        calib: np.ndarray | None = None,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        into: Path | None = None,
    ) -> tuple[Artifact, Any]:
        """The artifact of ``recipe`` and its engine, built in ``into`` (default: the bundle
        folder ``out_dir``, replacing a previous try's artifact there); calibrated on
        ``calib`` (default: the export's calibration images)."""
        folder = self.out_dir if into is None else into
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():  # a previous attempt's artifact
            if p.name.startswith("backbone."):
                p.unlink()
        files, options = build_artifact(
            self.fp32_onnx,
            recipe,
            self.calib if calib is None else calib,
            folder,
            self.work,
            validation,
        )
        artifact = Artifact(recipe.format, recipe.precision, tuple(files), recipe.name, options)
        return artifact, make_engine(folder, artifact)

    def measure(self, engine: Any) -> tuple[Agreement, LinearHead, np.ndarray]:
        """The artifact's agreement with FP32, with the head that would ship with it, and its
        embeddings of the check images."""
        head = self.heads.for_engine(engine)
        emb = embed(engine_runner(engine), self.check, desc="checking the artifact")
        return (
            agreement(emb, self.reference, head, self.check.labels, self.reference_head),
            head,
            emb,
        )

    def _misses_without_refit(self, emb: np.ndarray) -> bool:
        """True when ``emb`` (the check images' embeddings) misses the tolerance on what needs
        no head refit: the cosine floor, or the run's own head's top-1 drop (the drop that
        counts is the larger of it and the shipped head's, :meth:`_top1_drop`)."""
        if float(cosine(emb, self.reference).mean()) < self.recipe.min_cosine:
            return True
        labels, source = self.check.labels, self.heads.source
        if labels is None:
            return False
        own = accuracy(source, self.reference, labels) - accuracy(source, emb, labels)
        return own > self.recipe.max_top1_drop + 1e-9

    def _top1_drop(self, m: Agreement, head: LinearHead, emb: np.ndarray) -> float | None:
        """The larger drop of the head that ships and of the run's own FP32-trained head on
        this artifact's embeddings (what ``--head-fit source`` would ship): both must hold."""
        labels = self.check.labels
        if labels is None or m.accuracy is None:
            return None
        drop = accuracy(self.reference_head, self.reference, labels) - m.accuracy
        # always both, also when ``head`` is the run's own (a try measured without a refit):
        # its drop on its own FP32 embeddings must hold too
        source = self.heads.source
        own = accuracy(source, self.reference, labels) - accuracy(source, emb, labels)
        return round(max(drop, own), 6)

    def attempt(
        self,
        step: str,
        recipe: Recipe,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        note: str = "",
    ) -> Attempt:
        """Build and measure one step; record it as the latest candidate."""
        _logger.info(f"  accuracy control: {step}")
        t0 = time.perf_counter()
        artifact, engine = self.build(recipe, validation=validation)
        emb = embed(engine_runner(engine), self.check, desc="checking the artifact")
        missed = self._misses_without_refit(emb)
        if missed:
            # the try fails whatever head ships with it: measured with the run's own head, it
            # skips re-embedding the training split for a refit
            head = self.heads.source
            note = note or "missed without a refit: the run's own head measured"
        else:
            head = self.heads.for_engine(engine)
        m = agreement(emb, self.reference, head, self.check.labels, self.reference_head)
        return self._record(
            step,
            Candidate(artifact, engine, recipe, head, emb),
            (m.cosine_mean, m.cosine_min),
            m.accuracy,
            self._top1_drop(m, head, emb),
            t0,
            note,
            missed,
        )

    # ---- the ladder ---------------------------------------------------------------------
    def _ladder(self) -> Iterator[bool]:
        return (_ort_ladder if self.recipe.quantization == "ort-static" else _nncf_ladder)(self)

    def sensitivity_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Calibration images (training split, no labels) with their FP32 embeddings: what
        the layer ranking is measured on, so the held-out check stays a check."""
        assert self.calib is not None  # INT8 ladders only
        x = self.calib[:SENSITIVITY_IMAGES]
        return x, OrtEngine(self.fp32_onnx).run(x, (EMBEDDING,))[EMBEDDING]

    # ---- how much the calibration images matter -----------------------------------------
    def calibration_spread(
        self, chosen: Recipe, pool: Sequence[str], size: int, subsets: int
    ) -> dict[str, Any] | None:
        """INT8 accuracy and cosine over ``subsets`` disjoint calibration subsets of ``pool``,
        each built with the ``chosen`` settings (NNCF accuracy control is not re-run per
        subset: too slow). The subsets' artifacts are built in the work folder: the bundle
        keeps the chosen artifact, the one every other figure was measured on."""
        if subsets < 1 or chosen.precision != "int8":
            return None
        return self._spread(chosen, pool, size, subsets)

    def _subset_row(self, chosen: Recipe, subset: list[str]) -> dict[str, Any]:
        desc = "decoding calibration subset"
        decoded = (
            Images(subset, self.check.pre, desc=desc)
            if self.decode is None
            else self.decode(subset, desc=desc)
        )
        calib = decoded.inputs()
        _, engine = self.build(chosen, calib=calib, into=self.work / "calibration_subset")
        m, _, _ = self.measure(engine)
        row: dict[str, Any] = {
            "cosine_mean": m.cosine_mean,
            "cosine_min": m.cosine_min,
            "top1_agreement": m.top1_agreement,
        }
        if m.accuracy is not None:
            row["accuracy"] = m.accuracy
        return row


def _ort_ladder(c: AccuracyControl) -> Iterator[bool]:
    """ORT: saturation-safe kernels, other calibration methods, then the most sensitive
    convolutions kept in FP32 (ranked by :data:`SENSITIVITY`)."""
    rec = c.recipe
    # pair-safe weights are exact on every CPU already; the session option would only slow
    # them down (u8u8 kernels)
    x86 = host_info()["machine"] in ("x86_64", "AMD64")
    if x86 and not rec.pair_safe_weights and "session.x64quantprecision" not in rec.engine_options:
        opts = {**rec.engine_options, "session.x64quantprecision": "1"}
        yield c.attempt(
            "saturation-safe integer kernels (exact requantization on x86-64)",
            dataclasses.replace(rec, engine_options=opts),
        ).passed
    base = c.best().recipe
    # not entropy: ORT 1.32's entropy calibrator yields the MinMax ranges on these CNNs
    # (byte-identical quantized files for efficientnet_lite0), so it would only cost time
    for method in ("percentile", "minmax"):
        if method != base.calibration_method:
            yield c.attempt(
                f"calibration {method}", dataclasses.replace(base, calibration_method=method)
            ).passed
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    # FP32 nodes in a QDQ graph only stay FP32 with ORT's WeightBiasQuantization off (it
    # would quantize their weights again at session start): the bundle records that
    base = dataclasses.replace(
        base,
        engine_options={**base.engine_options, DISABLED_OPTIMIZERS: "WeightBiasQuantization"},
    )
    rank = ort_sensitivity_full if SENSITIVITY == "full" else ort_sensitivity
    ranking = rank(c, base)
    c.sensitivity = ranking
    for k in EXCLUSION_STEPS:
        k = min(k, rec.max_excluded_nodes, len(ranking))
        names = tuple(r["name"] for r in ranking[:k])
        if names == base.nodes_to_exclude:
            break
        yield c.attempt(
            f"{k} most sensitive convolutions kept in FP32",
            dataclasses.replace(base, nodes_to_exclude=names),
        ).passed
        if k == rec.max_excluded_nodes or k == len(ranking):
            break


def _nncf_ladder(c: AccuracyControl) -> Iterator[bool]:
    """OpenVINO/NNCF: overflow fix, full bias correction, then NNCF's accuracy control."""
    rec = c.recipe
    yield from nncf_first_steps(c)
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    first = first_convolutions(c.fp32_onnx, 2)
    yield c.attempt(
        "first 2 convolutions kept in FP32 (they see raw pixels)",
        dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, *first)),
    ).passed
    validation = c.sensitivity_set()
    yield c.attempt(
        "NNCF accuracy control (most costly layers back to FP32)",
        base,
        validation,
        note="nncf.quantize_with_accuracy_control on embedding cosine",
    ).passed
