"""Accuracy control for text encoders: build the recipe's artifact, measure it against FP32
PyTorch on real texts, escalate INT8 that misses the tolerance, refuse when nothing reaches it.

The measure is the image export's (:mod:`edge_tl.export.accuracy_control`): mean embedding
cosine vs FP32 PyTorch (``min_cosine``) and, on a run's labelled held-out texts, the top-1
drop of the head that ships and of the run's own head (``max_top1_drop``). The steps follow
what optimum exposes for each backend:

- ONNX Runtime, static (``ort-static``) and dynamic (``ort-dynamic``): on x86-64 CPUs
  without VNNI, its saturation-safe requantization (``session.x64quantprecision``) and 7-bit
  weights (``reduce_range``), as its docs advise there; then the feed-forward output MatMuls
  kept in FP32 (the layers whose inputs carry the largest activations in BERT-family
  encoders: Bondarenko et al. 2021, "Understanding and overcoming the challenges of
  efficient transformer quantization"), then the most sensitive MatMuls kept in FP32
  (ranked one at a time on calibration texts, as NNCF's accuracy-control ranker does;
  calibration ranges are reused, so each node costs one quantization).
- NNCF (``nncf``): overflow fix, full bias correction, then the feed-forward output MatMuls
  kept in FP32 (an ignored scope). NNCF's own ``quantize_with_accuracy_control`` is not
  reachable through optimum-intel's ``OVQuantizer``, and a ranking that quantizes once per
  MatMul would cost half a minute per node (see the README).

Other calibration methods are not tried for text: ONNX Runtime's histogram calibrators
(percentile, entropy) stack every batch into one array, which texts of different lengths
cannot form without padding, and padding tokens' activations would enter the ranges.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edge_tl.bundle import sha256
from edge_tl.export.control_base import Attempt, Candidate, ControlLadder, nncf_first_steps
from edge_tl.export.fidelity import accuracy, cosine
from edge_tl.export.text_optimum import (
    FFN_OUTPUT_OPENVINO,
    CalibInputs,
    RangeCache,
    ffn_output_matmuls,
    matmul_nodes,
    openvino_isolated,
    quantize_ort,
)
from edge_tl.progress import progress
from edge_tl.runtime.engine import DISABLED_OPTIMIZERS, Engine, make_engine
from edge_tl.runtime.heads import LinearHead
from edge_tl.runtime.host import host_info
from edge_tl.runtime.text import TextEncoder, pool
from edge_tl.spec import Artifact, Recipe

__all__ = [
    "CheckTexts",
    "TextControl",
    "TextHeads",
    "artifact_key",
    "calibration_inputs",
    "embed_engine",
]

_logger = logging.getLogger(__name__)

SENSITIVITY_TEXTS = 32
EXCLUSION_STEPS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class CheckTexts:
    """The texts every artifact is checked on: a run's held-out split (``labels`` set), the
    calibration texts or the built-in reference sentences (``labels`` None); ``what`` says
    which, for the report."""

    texts: list[str]
    labels: np.ndarray | None
    what: str

    def __len__(self) -> int:
        return len(self.texts)


def embed_engine(
    engine: Engine,
    encoder: TextEncoder,
    texts: Sequence[str],
    batch: int = 32,
    desc: str | None = None,
) -> np.ndarray:
    """``float32[N, D]`` pooled embeddings of ``texts`` through an artifact's ``engine``,
    tokenized and pooled as the device does (:class:`~edge_tl.runtime.text.TextEncoder`,
    :func:`~edge_tl.runtime.text.pool`); texts are batched by length (less padding) and
    returned in input order."""
    pre = encoder.pre
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch)
    for i in progress(starts, desc=desc) if desc else starts:
        idx = order[i : i + batch]
        inputs = encoder.encode([texts[j] for j in idx])
        hidden = engine.run(inputs, (pre.hidden_output,))[pre.hidden_output]
        emb = pool(hidden, inputs["attention_mask"], pre)
        if out is None:
            out = np.zeros((len(texts), emb.shape[1]), np.float32)
        out[idx] = emb
    assert out is not None, "no texts"
    return out


def calibration_inputs(encoder: TextEncoder, texts: Sequence[str]) -> CalibInputs:
    """One ``{input name: int64[1, T]}`` per text, unpadded (what ORT's calibration reader and
    ``nncf.Dataset`` take)."""
    return [encoder.encode([t]) for t in texts]


@dataclass
class TextHeads:
    """The head that ships with an artifact: refit on the artifact's own embeddings of the
    run's training texts (``fit_texts``; ``--head-fit artifact``), or the run's ``source``
    head unchanged; None for a pretrained encoder (no head: the device learns one)."""

    source: LinearHead | None
    n_classes: int
    fit_texts: list[str] | None = None
    fit_labels: np.ndarray | None = None

    _fitted: dict[str, LinearHead] = field(default_factory=dict, repr=False)

    def for_engine(
        self, engine: Engine, encoder: TextEncoder, key: str | None = None
    ) -> LinearHead | None:
        """The head for ``engine``'s artifact; ``key`` (:func:`artifact_key`) reuses the fit
        of an identical artifact (ONNX FP32 is the FP32 graph itself: one pass over the
        training texts, not two)."""
        if self.fit_texts is None or self.fit_labels is None:
            return self.source
        if key is not None and key in self._fitted:
            return self._fitted[key]
        emb = embed_engine(engine, encoder, self.fit_texts, desc="embedding training texts")
        head = LinearHead.fit(emb, self.fit_labels, self.n_classes)
        if key is not None:
            self._fitted[key] = head
        return head


def artifact_key(folder: Path, files: Sequence[str], options: dict[str, str]) -> str:
    """What an artifact computes, as a string: its files' SHA-256 and its engine options."""
    digests = [sha256(folder / f) for f in files]
    return json.dumps([digests, sorted(options.items())])


@dataclass
class TextControl(ControlLadder):
    """Builds the recipe's artifact into ``out_dir`` and measures it on ``check`` against
    the FP32 ``reference``; escalates INT8 that misses the tolerance.

    Args:
        model_dir: the Hugging Face folder (optimum-intel converts it to OpenVINO).
        onnx_fp32: optimum's checked ONNX FP32 export (ONNX recipes start from it).
        calib: calibration inputs (INT8 with calibration), or None.
        encoder: tokenizes as the bundle will (its ``tokenizer.json``).
        reference: FP32 PyTorch embeddings of ``check``.
        reference_head: the head FP32 accuracy is measured with (None: no head).
        calib_texts: the calibration texts (the MatMul ranking embeds a few of them, so the
            held-out check stays a check).
        known: check-text embeddings already computed, by :func:`artifact_key`.
    """

    model_dir: Path
    onnx_fp32: Path
    recipe: Recipe
    calib: CalibInputs | None
    out_dir: Path
    work: Path
    encoder: TextEncoder
    check: CheckTexts
    reference: np.ndarray
    reference_head: LinearHead | None
    heads: TextHeads
    calib_texts: list[str] = field(default_factory=list)
    known: dict[str, np.ndarray] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    last: Candidate | None = None
    ranges: RangeCache = field(default_factory=RangeCache)

    inputs: ClassVar[str] = "texts"
    int8_fix: ClassVar[str] = (
        "use ort-int8-dynamic or an FP32/FP16 recipe, calibrate on more texts like the "
        "device's (--calib), or loosen min_cosine / max_top1_drop in a copy of the recipe"
    )
    other_fix: ClassVar[str] = (
        "report this with the model folder, or loosen min_cosine in a copy of the recipe"
    )

    # ---- building and measuring ---------------------------------------------------------
    def build(
        self, recipe: Recipe, calib: CalibInputs | None = None, into: Path | None = None
    ) -> tuple[Artifact, Engine]:
        """The artifact of ``recipe`` and its engine, built in ``into`` (default: the bundle
        folder, replacing a previous try's artifact); calibrated on ``calib`` (default: the
        export's calibration texts)."""
        folder = self.out_dir if into is None else into
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():
            if p.name.startswith("backbone."):
                p.unlink()
        calib = self.calib if calib is None else calib
        if recipe.format == "onnx":
            files: tuple[str, ...] = ("backbone.onnx",)
            if recipe.precision == "fp32":
                (folder / files[0]).write_bytes(self.onnx_fp32.read_bytes())
            else:
                quantize_ort(
                    self.onnx_fp32, folder / files[0], recipe, calib, self.work, self.ranges
                )
        else:
            files = ("backbone.xml", "backbone.bin")
            openvino_isolated(
                self.model_dir, recipe, folder, calib if recipe.precision == "int8" else None
            )
        artifact = Artifact(
            recipe.format, recipe.precision, files, recipe.name, dict(recipe.engine_options)
        )
        return artifact, make_engine(folder, artifact)

    def measure(
        self, engine: Engine, key: str | None = None
    ) -> tuple[np.ndarray, LinearHead | None, float | None]:
        """``(embeddings of the check texts, the head that ships, its accuracy or None)``;
        ``key`` (:func:`artifact_key`) reuses what an identical artifact computed."""
        if key is not None and key in self.known:
            emb = self.known[key]
        else:
            emb = embed_engine(engine, self.encoder, self.check.texts, desc="checking the artifact")
        head = self.heads.for_engine(engine, self.encoder, key)
        acc = None
        if head is not None and self.check.labels is not None:
            acc = accuracy(head, emb, self.check.labels)
        return emb, head, acc

    def _top1_drop(
        self, head: LinearHead | None, emb: np.ndarray, acc: float | None
    ) -> float | None:
        """The larger drop of the shipped head and of the run's own FP32-trained head on this
        artifact's embeddings (both must hold), or None without labels or head."""
        labels, ref_head, source = self.check.labels, self.reference_head, self.heads.source
        if labels is None or acc is None or ref_head is None or source is None:
            return None
        drop = accuracy(ref_head, self.reference, labels) - acc
        if source is not head:
            drop = max(
                drop,
                accuracy(source, self.reference, labels) - accuracy(source, emb, labels),
            )
        return round(drop, 6)

    def attempt(self, step: str, recipe: Recipe, note: str = "") -> Attempt:
        """Build and measure one step; record it as the latest candidate."""
        _logger.info(f"  accuracy control: {step}")
        t0 = time.perf_counter()
        artifact, engine = self.build(recipe)
        emb, head, acc = self.measure(
            engine, artifact_key(self.out_dir, artifact.files, artifact.engine_options)
        )
        cos = cosine(emb, self.reference)
        return self._record(
            step,
            Candidate(artifact, engine, recipe, head, emb),  # type: ignore[arg-type]
            (float(cos.mean()), float(cos.min())),
            acc,
            self._top1_drop(head, emb, acc),
            t0,
            note,
        )

    # ---- the ladder ---------------------------------------------------------------------
    def _ladder(self) -> Iterator[bool]:
        ort = self.recipe.quantization in ("ort-static", "ort-dynamic")
        return (_ort_ladder if ort else _nncf_ladder)(self)

    # ---- how much the calibration texts matter ------------------------------------------
    def calibration_spread(
        self, chosen: Recipe, pool_texts: Sequence[str], size: int, subsets: int
    ) -> dict[str, Any] | None:
        """Accuracy and cosine over ``subsets`` disjoint calibration subsets of ``pool_texts``,
        each built with the ``chosen`` settings in the work folder (the bundle keeps the
        chosen artifact). None for artifacts without calibration."""
        if subsets < 1 or chosen.precision != "int8" or chosen.quantization == "ort-dynamic":
            return None
        return self._spread(chosen, pool_texts, size, subsets)

    def _subset_row(self, chosen: Recipe, subset: list[str]) -> dict[str, Any]:
        _, engine = self.build(
            chosen,
            calib=calibration_inputs(self.encoder, subset),
            into=self.work / "calibration_subset",
        )
        emb, _, acc = self.measure(engine)
        cos = cosine(emb, self.reference)
        row: dict[str, Any] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
        }
        if acc is not None:
            row["accuracy"] = acc
        return row


def _ort_ladder(c: TextControl) -> Iterator[bool]:
    """ORT static or dynamic: saturation-safe kernels, 7-bit weights, the feed-forward output
    MatMuls in FP32, then the MatMuls ranked by sensitivity in FP32."""
    rec = c.recipe
    # the u8s8 saturation these two steps avoid happens on x86-64 without VNNI only; on other
    # hosts they cannot change what this host measures (the self-test guards other hosts)
    saturates = host_info()["cpu_class"] == "x86-64-avx2"
    if saturates and "session.x64quantprecision" not in rec.engine_options:
        opts = {**rec.engine_options, "session.x64quantprecision": "1"}
        yield c.attempt(
            "saturation-safe requantization (session.x64quantprecision)",
            dataclasses.replace(rec, engine_options=opts),
        ).passed
    base = c.best().recipe
    if saturates and not base.reduce_range:
        yield c.attempt(
            "7-bit weights (reduce_range: no u8s8 saturation without VNNI)",
            dataclasses.replace(base, reduce_range=True),
        ).passed
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    if rec.quantization == "ort-static":
        # FP32 MatMuls in a QDQ graph stay FP32 only with ORT's WeightBiasQuantization off
        base = dataclasses.replace(
            base,
            engine_options={**base.engine_options, DISABLED_OPTIMIZERS: "WeightBiasQuantization"},
        )
    ffn = ffn_output_matmuls(c.onnx_fp32)[: rec.max_excluded_nodes]
    if ffn:
        yield c.attempt(
            f"the {len(ffn)} feed-forward output MatMuls kept in FP32",
            dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, *ffn)),
            note="their inputs carry the encoder's largest activations (Bondarenko et al. 2021)",
        ).passed
    ranking = ort_sensitivity(c, base)
    c.sensitivity = ranking
    for k in EXCLUSION_STEPS:
        k = min(k, rec.max_excluded_nodes, len(ranking))
        names = tuple(r["name"] for r in ranking[:k])
        yield c.attempt(
            "the most sensitive MatMul kept in FP32"
            if k == 1
            else f"the {k} most sensitive MatMuls kept in FP32",
            dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, *names)),
        ).passed
        if k == rec.max_excluded_nodes or k == len(ranking):
            break


def ort_sensitivity(c: TextControl, base: Recipe) -> list[dict[str, Any]]:
    """Per MatMul: the embedding cosine (on a few calibration texts, else check texts) gained
    when it alone stays in FP32. Reuses the calibration ranges: one quantization each."""
    from edge_tl.runtime.engine import OrtEngine

    texts = c.calib_texts[:SENSITIVITY_TEXTS] or c.check.texts[:SENSITIVITY_TEXTS]
    fp32 = OrtEngine(c.onnx_fp32)
    ref = embed_engine(fp32, c.encoder, texts)
    trial = c.work / "sensitivity.onnx"

    def cos_of(recipe: Recipe) -> float:
        quantize_ort(c.onnx_fp32, trial, recipe, c.calib, c.work, c.ranges)
        got = embed_engine(OrtEngine(trial, recipe.engine_options), c.encoder, texts)
        return float(cosine(got, ref).mean())

    t0 = time.perf_counter()
    base_cos = cos_of(base)
    nodes = matmul_nodes(c.onnx_fp32)
    for node in progress(nodes, desc="sensitivity per MatMul"):
        if node["name"] in base.nodes_to_exclude:
            node["gain"] = 0.0
            continue
        one = dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, node["name"]))
        node["gain"] = round(cos_of(one) - base_cos, 6)
    _logger.info(f"  sensitivity pass: {len(nodes)} MatMuls in {time.perf_counter() - t0:.0f} s")
    return sorted(nodes, key=lambda r: -r["gain"])


def _nncf_ladder(c: TextControl) -> Iterator[bool]:
    """NNCF through optimum-intel: overflow fix, full bias correction, then the feed-forward
    output MatMuls in FP32 (an ignored scope by name pattern)."""
    rec = c.recipe
    yield from nncf_first_steps(c)
    base = c.best().recipe
    if rec.max_excluded_nodes == 0:
        return
    yield c.attempt(
        "the feed-forward output MatMuls kept in FP32",
        dataclasses.replace(
            base, nodes_to_exclude=(*base.nodes_to_exclude, f"re:{FFN_OUTPUT_OPENVINO}")
        ),
        note="NNCF ignored scope by name pattern; their inputs carry the encoder's largest "
        "activations (Bondarenko et al. 2021)",
    ).passed
