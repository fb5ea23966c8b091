"""What the image and the text accuracy control share: a try's record (:class:`Attempt`), the
artifact that ships (:class:`Candidate`), the climb from the recipe as written up a backend's
ladder, and the refusal (:class:`ToleranceError`) when nothing reaches the tolerance.

The ladders and how an artifact is built and measured are each side's own:
:mod:`edge_tl.export.accuracy_control` (images), :mod:`edge_tl.export.text_control` (texts).

Example:
    >>> from edge_tl.export.accuracy_control import AccuracyControl  # a ControlLadder
    >>> control = AccuracyControl(fp32, recipe, calib, bdir, work, check, ref, ref_head, heads)
    >>> chosen = control.run()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.report import ControlStep
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import Artifact, Recipe

__all__ = ["Attempt", "Candidate", "ControlLadder", "ToleranceError", "nncf_first_steps"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Attempt:
    """One try of the ladder: the settings, what they reached, whether it passed."""

    step: str
    recipe: Recipe
    cosine_mean: float
    cosine_min: float
    accuracy: float | None
    top1_drop: float | None  # the larger of the shipped head's and the run head's drop
    passed: bool
    seconds: float
    note: str = ""

    def record(self) -> ControlStep:
        """The try as the fidelity report keeps it (the settings that matter per backend)."""
        r = self.recipe
        settings: dict[str, Any] = {
            "calibration_method": r.calibration_method,
            "overflow_fix": r.overflow_fix,
            "fast_bias_correction": r.fast_bias_correction,
            "nodes_in_fp32": list(r.nodes_to_exclude),
            "engine_options": dict(r.engine_options),
        }
        if r.quantization in ("ort-static", "ort-dynamic"):
            settings.pop("overflow_fix")
            settings.pop("fast_bias_correction")
            settings["reduce_range"] = r.reduce_range
            if r.pair_safe_weights:
                settings["pair_safe_weights"] = True
            settings["per_channel"] = r.per_channel
            if r.quantization == "ort-dynamic":  # no calibration
                settings.pop("calibration_method")
        elif r.quantization == "nncf":
            settings.pop("calibration_method")
        else:
            settings = {"engine_options": dict(r.engine_options)}
        return ControlStep(
            step=self.step,
            settings=settings,
            cosine_mean=round(self.cosine_mean, 5),
            cosine_min=round(self.cosine_min, 5),
            accuracy=self.accuracy,
            top1_drop=self.top1_drop,
            passed=self.passed,
            seconds=round(self.seconds, 1),
            note=self.note,
        )


class ToleranceError(EdgeTLError):
    """The artifact missed its recipe's tolerance after every step; ``attempts`` says each."""

    def __init__(self, attempts: list[Attempt], message: str) -> None:
        super().__init__(message)
        self.attempts = list(attempts)


@dataclass
class Candidate:
    """An artifact built in the bundle folder and measured: what the export ships when it
    passes. ``emb`` are its embeddings of the check images."""

    artifact: Artifact
    engine: Any
    recipe: Recipe
    head: LinearHead
    emb: np.ndarray


class ControlLadder:
    """The climb both accuracy controls share: the recipe as written, then (INT8 with
    ``accuracy_control`` on) the steps of :meth:`_ladder` until one passes, else a refusal.

    A subclass (a dataclass) holds ``recipe``, ``attempts`` and ``last``, measures a try in
    :meth:`attempt` (recording it with :meth:`_record`) and a calibration subset in
    :meth:`_subset_row`, names its ladder in :meth:`_ladder`, what to do after a refusal in
    ``int8_fix`` and ``other_fix``, and what calibrates in ``inputs``.
    """

    recipe: Recipe
    attempts: list[Attempt]
    last: Candidate | None
    sensitivity: list[dict[str, Any]]
    """Layers ranked by how much quantizing each alone moves the output, most first (empty
    until a ladder ranks them)."""
    int8_fix: ClassVar[str]
    """The refusal's advice for an INT8 recipe."""
    other_fix: ClassVar[str]
    """The refusal's advice for an FP32/FP16 recipe."""
    inputs: ClassVar[str]
    """What calibrates: ``images`` or ``texts``."""

    def attempt(self, step: str, recipe: Recipe) -> Attempt:
        """Build and measure one step; record it as the latest candidate."""
        raise NotImplementedError

    def _ladder(self) -> Iterator[bool]:
        """The escalation steps for this recipe's backend, each yielding whether it passed."""
        raise NotImplementedError

    def _record(
        self,
        step: str,
        candidate: Candidate,
        cosine: tuple[float, float],
        accuracy: float | None,
        top1_drop: float | None,
        t0: float,
        note: str = "",
        missed: bool = False,
    ) -> Attempt:
        """Record a measured try (``cosine``: its mean and minimum; ``missed``: failed before
        the full measure) and keep its artifact as the latest candidate."""
        rec = self.recipe
        passed = (
            not missed
            and cosine[0] >= rec.min_cosine
            and (top1_drop is None or top1_drop <= rec.max_top1_drop + 1e-9)
        )
        a = Attempt(
            step,
            candidate.recipe,
            cosine[0],
            cosine[1],
            accuracy,
            top1_drop,
            passed,
            time.perf_counter() - t0,
            note,
        )
        self.attempts.append(a)
        self.last = candidate
        return a

    def run(self) -> Candidate:
        """The recipe as written; if it misses the tolerance and is INT8, escalate.

        Raises:
            ToleranceError: nothing tried reaches the tolerance.
        """
        rec = self.recipe
        if self.attempt("recipe as written", rec).passed:
            return self._chosen()
        if rec.precision == "int8" and rec.accuracy_control:
            for passed in self._ladder():
                if passed:
                    return self._chosen()
        raise self._refusal()

    def _chosen(self) -> Candidate:
        assert self.last is not None  # set by every attempt
        return self.last

    @property
    def step(self) -> str | None:
        """The step that passed, when accuracy control had to climb; else None."""
        return self.attempts[-1].step if len(self.attempts) > 1 else None

    def best(self) -> Attempt:
        return max(self.attempts, key=lambda a: (a.cosine_mean, -(a.top1_drop or 0)))

    def _refusal(self) -> ToleranceError:
        rec = self.recipe
        tried = "; ".join(
            f"{a.step}: cosine {a.cosine_mean:.4f}"
            + (f", top-1 drop {a.top1_drop * 100:.1f} pt" if a.top1_drop is not None else "")
            for a in self.attempts
        )
        fixes = self.int8_fix if rec.precision == "int8" else self.other_fix
        return ToleranceError(
            self.attempts,
            f"{rec.name} misses its tolerance (cosine >= {rec.min_cosine}, top-1 drop <= "
            f"{rec.max_top1_drop * 100:.1f} pt) after {len(self.attempts)} tries [{tried}]; "
            f"nothing was written; {fixes}",
        )

    def _spread(self, chosen: Recipe, pool: Sequence[T], size: int, subsets: int) -> dict[str, Any]:
        """Each of ``subsets`` disjoint calibration subsets of ``pool`` (at most ``size``
        each, seeded) measured by :meth:`_subset_row` with the ``chosen`` settings, and the
        spread of their accuracy and cosine."""
        per = min(size, len(pool) // subsets)
        if per < 1:
            return {"skipped": f"only {len(pool)} calibration {self.inputs} for {subsets} subsets"}
        order = np.random.default_rng(1).permutation(len(pool))
        rows = []
        for s in range(subsets):
            subset = [pool[i] for i in sorted(order[s * per : (s + 1) * per])]
            _logger.info(f"  calibration subset {s + 1}/{subsets} ({per} {self.inputs})")
            rows.append(self._subset_row(chosen, subset))
        accs = [r["accuracy"] for r in rows if "accuracy" in r]
        coss = [r["cosine_mean"] for r in rows]
        return {
            "settings": self.attempts[-1].step if self.attempts else "recipe as written",
            "images_per_subset": per,
            "subsets": rows,
            "accuracy_spread": float(max(accs) - min(accs)) if accs else None,
            "cosine_spread": float(max(coss) - min(coss)),
        }

    def _subset_row(self, chosen: Recipe, subset: list[Any]) -> dict[str, Any]:
        """The ``chosen`` settings calibrated on ``subset`` and measured: ``cosine_mean``,
        ``cosine_min`` and, with labels, ``accuracy``."""
        raise NotImplementedError


def nncf_first_steps(c: ControlLadder) -> Iterator[bool]:
    """The first NNCF steps of both ladders: the overflow fix, then full bias correction."""
    rec = c.recipe
    if rec.overflow_fix != "enable":
        yield c.attempt(
            "overflow fix on (saturation-safe without VNNI)",
            dataclasses.replace(rec, overflow_fix="enable"),
        ).passed
    base = c.best().recipe
    if base.fast_bias_correction:
        yield c.attempt(
            "full bias correction", dataclasses.replace(base, fast_bias_correction=False)
        ).passed
