"""The anomaly-detector face of a loaded bundle: a memory bank of good patches.

Torch-free. The bank in force is the current version in ``BUNDLE/anomaly/``; every change
(:meth:`AnomalyDetector.fit`, :meth:`~AnomalyDetector.add`,
:meth:`~AnomalyDetector.set_false_alarm`) writes a new version and
:meth:`~AnomalyDetector.rollback` goes back. The method is in :mod:`edge_tl.runtime.anomaly`.

Example:
    >>> from edge_tl.runtime import Model
    >>> det = Model("bundle").detector  # doctest: +SKIP
    >>> det.fit("good/")  # doctest: +SKIP
    >>> det.predict(["part.jpg"], maps_dir="maps/")[0].verdict  # doctest: +SKIP
    'anomalous'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.images import SKIPPED, Skipped
from edge_tl.progress import progress
from edge_tl.runtime import anomaly, evaluation, patchcore, streaming
from edge_tl.runtime.anomaly import AnomalyState
from edge_tl.runtime.overlay import write_overlay
from edge_tl.runtime.preprocess import ImageLike, load_image, to_input
from edge_tl.runtime.results import AnomalyEvaluation, Verdict

if TYPE_CHECKING:
    from edge_tl.runtime.model import Model

__all__ = ["AnomalyDetector", "BankChange", "GoodLike"]

_logger = logging.getLogger(__name__)

GoodLike = str | Path | Sequence[ImageLike]
"""Good images: a folder, an MVTec-layout folder (its ``train/good``), or a list."""


@dataclass(frozen=True)
class BankChange:
    """One change to a bundle's anomaly bank, as ``edge-tl anomaly`` asks for it.

    With ``good``: build a new bank (``coreset``, ``max_mb``, ``false_alarm``, ``stages``,
    ``pool``; None takes the default), or with ``add`` grow the current one (keeping its
    coreset and cap). Without ``good``: ``false_alarm`` alone re-calibrates the threshold.

    Raises:
        EdgeTLError: on construction, for a change that asks for nothing or for settings
            that do not go together.
    """

    good: GoodLike | None = None
    add: bool = False
    coreset: float | None = None
    max_mb: float | None = None
    false_alarm: float | None = None
    stages: tuple[str, ...] | None = None
    pool: int | None = None
    skip_bad: bool = False  # leave bad files of ``good`` out (listed in "skipped")

    def __post_init__(self) -> None:
        if self.good is None and (self.false_alarm is None or self.add):
            raise EdgeTLError(
                "pass GOOD_DIR (a folder of good images), or --false-alarm R alone to "
                "re-calibrate the current bank: `edge-tl anomaly BUNDLE GOOD_DIR`"
            )
        kept = [
            flag
            for flag, value in (
                ("--coreset", self.coreset),
                ("--max-mb", self.max_mb),
                ("--stages", self.stages),
                ("--pool", self.pool),
            )
            if value is not None
        ]
        if self.skip_bad and self.good is None:
            raise EdgeTLError("--skip-bad leaves bad files of GOOD_DIR out; it needs GOOD_DIR")
        if (self.add or self.good is None) and kept:
            what = "--add keeps" if self.add else "--false-alarm alone re-calibrates"
            raise EdgeTLError(
                f"{what} the bank's {', '.join(kept)}; build a new bank (`edge-tl anomaly "
                "BUNDLE GOOD_DIR`) to change them"
            )
        anomaly.check_features(
            self.stages or anomaly.DEFAULT_STAGES,
            anomaly.DEFAULT_POOL if self.pool is None else self.pool,
        )


def _check_maps_dir(maps_dir: str | Path | None) -> None:
    if maps_dir is not None and Path(maps_dir).exists() and not Path(maps_dir).is_dir():
        raise EdgeTLError(f"--maps {maps_dir} is a file; pass a folder for the overlay PNGs")


def _paths(good: GoodLike, skip_bad: bool) -> tuple[list[Any], list[Skipped]]:
    if isinstance(good, (str, Path)):
        return anomaly.good_images(good, skip_bad)
    return list(good), []


def _noting(state: AnomalyState, skipped: Sequence[Skipped]) -> AnomalyState:
    """``state`` with the files skipped under ``--skip-bad`` in its metadata."""
    if not skipped:
        return state
    return replace(state, meta={**state.meta, SKIPPED: [s.to_dict() for s in skipped]})


def overlay_name(taken: set[str], stem: str) -> str:
    """``<stem>.png``, or ``<stem>_2.png``, ``_3``, ... when a name is already ``taken`` in
    this call (``lineA/0001.jpg`` and ``lineB/0001.jpg``); the name is added to ``taken``."""
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    return name


def _with_copies(state: AnomalyState, dropped: list[dict[str, str]]) -> AnomalyState:
    """``state`` with the copies that were dropped recorded in its version's metadata."""
    return replace(state, meta={**state.meta, "duplicates": dropped}) if dropped else state


class AnomalyDetector:
    """Defect detection from good images with a bundle (see the module docstring)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.store = anomaly.bank_store(model.path, model.manifest)
        self._state: AnomalyState | None = None
        self._loaded = False
        self.search = anomaly.DEFAULT_SEARCH
        """How :meth:`predict` and :meth:`evaluate` search the bank: ``"fast"`` (inverted
        lists) or ``"exact"`` (every bank patch); see :mod:`edge_tl.runtime.search`."""

    @property
    def state(self) -> AnomalyState | None:
        """The bank in force, or None (``edge-tl anomaly BUNDLE GOOD_DIR`` builds one)."""
        if not self._loaded:
            self._state, self._loaded = self.store.load(), True
        return self._state

    def require(self) -> AnomalyState:
        """The bank in force.

        Raises:
            EdgeTLError: the bundle has no bank.
        """
        if self.state is None:
            path = self._model.path
            raise EdgeTLError(
                f"bundle {path} has no anomaly bank; build one from good images with "
                f"`edge-tl anomaly {path} GOOD_DIR`"
            )
        return self.state

    def _grid(self, stages: tuple[str, ...]) -> tuple[int, int]:
        shape = self._model.manifest.outputs[stages[0]]
        return int(shape[-2]), int(shape[-1])

    # ---- learning (each change writes a new version) ----------------------------------
    def fit(
        self,
        good: GoodLike,
        stages: tuple[str, ...] = anomaly.DEFAULT_STAGES,
        pool: int = anomaly.DEFAULT_POOL,
        coreset: float = anomaly.DEFAULT_CORESET,
        max_mb: float = anomaly.DEFAULT_MAX_MB,
        false_alarm: float = anomaly.DEFAULT_FALSE_ALARM,
        skip_bad: bool = False,
    ) -> AnomalyState:
        """Build a new bank from good images; the previous bank stays as a version.

        Copies of an earlier image (same decoded pixels) are dropped and listed in the
        version's ``duplicates``; a calibration set too small for ``false_alarm`` is named
        in the summary's ``calibration_warning`` (see :mod:`edge_tl.runtime.anomaly`).
        ``skip_bad`` leaves bad files of a folder out; they are listed in the version's
        ``skipped``.
        """
        self._model.require_patches()
        anomaly.check_features(stages, pool)
        anomaly.check_settings(coreset, max_mb, false_alarm)
        paths, skipped = _paths(good, skip_bad)
        paths, digests, dropped = anomaly.unique_images(paths)
        if len(paths) < 2:
            raise EdgeTLError(
                f"an anomaly bank needs at least 2 good images (got {len(paths)}); each one "
                "is scored against the others to calibrate the threshold"
            )
        per = streaming.CHUNK_IMAGES
        starts = range(0, len(paths), per)
        chunks = (  # features of one chunk of images at a time (bounded memory)
            self._model.patch_features(paths[i : i + per], stages, pool)
            for i in progress(starts, desc="patch features of good images")
        )
        state = streaming.build_streaming(
            chunks,
            self._grid(stages),
            stages,
            pool,
            coreset,
            max_mb,
            false_alarm,
            digests=digests,
            work_dir=self.store.dir if self.store.dir.is_dir() else self._model.path,
        )
        return self._commit(_noting(_with_copies(state, dropped), skipped), "build")

    def add(self, good: GoodLike, skip_bad: bool = False) -> AnomalyState:
        """Grow the bank with new good images and re-calibrate its threshold (copies of
        images in the bank or earlier in ``good`` are dropped, as in :meth:`fit`)."""
        state = self.require()
        paths, skipped = _paths(good, skip_bad)
        paths, digests, dropped = anomaly.unique_images(paths, state.digests)
        if not paths:
            raise EdgeTLError(
                f"all {len(dropped)} images are copies of images already in the bank "
                f"(e.g. {dropped[0]['image']}); pass new good images"
            )
        feats = self._model.patch_features(  # outside the lock: only the bank's update waits
            paths, state.stages, state.pool, desc="patch features"
        )

        def grow(current: AnomalyState | None) -> AnomalyState:
            if current is None or (current.stages, current.pool) != (state.stages, state.pool):
                raise EdgeTLError(
                    f"the anomaly bank of {self._model.path} was replaced while the images "
                    "were read (other features); run the command again"
                )
            return _noting(_with_copies(anomaly.add(current, feats, digests), dropped), skipped)

        return self._change(grow, "add")

    def set_false_alarm(self, false_alarm: float) -> AnomalyState:
        """Re-calibrate the threshold for another false-alarm rate on good parts."""
        state = self.require()
        anomaly.check_settings(state.coreset, state.max_mb, false_alarm)
        return self._change(
            lambda current: replace(current or state, false_alarm=false_alarm, meta={}),
            "threshold",
        )

    def apply(self, change: BankChange) -> AnomalyState:
        """Carry out one :class:`BankChange` (what ``edge-tl anomaly`` does)."""
        if change.good is None:
            return self.set_false_alarm(change.false_alarm)  # type: ignore[arg-type]
        if change.add:
            state = self.add(change.good, change.skip_bad)
            if change.false_alarm is not None:
                skipped = state.meta.get(SKIPPED)
                state = self.set_false_alarm(change.false_alarm)
                if skipped:  # shown with the result; recorded in the version that added
                    state = replace(state, meta={**state.meta, SKIPPED: skipped})
            return state
        return self.fit(
            change.good,
            change.stages or anomaly.DEFAULT_STAGES,
            anomaly.DEFAULT_POOL if change.pool is None else change.pool,
            anomaly.DEFAULT_CORESET if change.coreset is None else change.coreset,
            anomaly.DEFAULT_MAX_MB if change.max_mb is None else change.max_mb,
            anomaly.DEFAULT_FALSE_ALARM if change.false_alarm is None else change.false_alarm,
            change.skip_bad,
        )

    def rollback(self, to: int | None = None) -> AnomalyState:
        """Go back to an earlier bank version (default: the one before the current)."""
        self._state, self._loaded = self.store.rollback(to), True
        return self._state

    def history(self) -> list[dict[str, Any]]:
        """Every bank version's summary, oldest first."""
        return self.store.history()

    def _commit(self, state: AnomalyState, op: str) -> AnomalyState:
        """Write a bank that does not depend on the current one (a new bank)."""
        self._state, self._loaded = self.store.save(state, op), True
        self._warn()
        return self._state

    def _warn(self) -> None:
        """Log what the version in force should make a user act on: dropped copies, and a
        calibration set too small for its false-alarm target."""
        dropped = self._state.meta.get("duplicates") or []
        if dropped:
            shown = "; ".join(f"{d['image']} (same pixels as {d['same_as']})" for d in dropped[:5])
            more = f"; and {len(dropped) - 5} more (--json lists all)" if len(dropped) > 5 else ""
            _logger.warning(
                f"dropped {len(dropped)} duplicate good image(s), each a copy of an earlier "
                f"one, which would lower the threshold: {shown}{more}"
            )
        note = anomaly.calibration_warning(
            len(self._state.loo_maps), self._state.false_alarm, str(self._model.path)
        )
        if note:
            _logger.warning(note)

    def _change(
        self, change: Callable[[AnomalyState | None], AnomalyState], op: str
    ) -> AnomalyState:
        """Apply ``change`` to the bank in force on disk, under the store's lock (another
        process's change made since this model was loaded is kept); the new bank replaces
        the old in one assignment, so a thread scoring meanwhile uses one or the other."""
        self._state, self._loaded = self.store.update(change, op), True
        self._warn()
        return self._state

    # ---- answering --------------------------------------------------------------------
    def predict(
        self,
        images: Sequence[ImageLike],
        maps: bool = False,
        maps_dir: str | Path | None = None,
    ) -> list[Verdict]:
        """Score, threshold and verdict per image (batch 1, as a camera would).

        With ``maps`` each verdict carries its anomaly map at the image's size; with
        ``maps_dir`` an overlay PNG per image is written there: ``<image stem>.png``, and
        ``<stem>_2.png``, ``_3``, ... for images of one name from several folders (a file of
        that name from an earlier call is replaced).
        """
        state = self.require()
        anomaly.check_search(self.search)
        engine, pre = self._model.engine, self._model.manifest.preprocess
        thr = state.threshold
        _check_maps_dir(maps_dir)
        out: list[Verdict] = []
        taken: set[str] = set()
        for src in images:
            img = load_image(src)  # at full size: the map is drawn at the image's size
            x = to_input(load_image(src, pre) if pre.draft else img, pre)[None]
            feats = patchcore.patch_features(engine.run(x, state.stages), state.stages, state.pool)
            with patchcore.one_blas_thread():
                s, m = state.score(feats, self.search)
            score = round(float(s[0]), 4)
            name = str(src) if not hasattr(src, "size") else "<image>"
            up = patchcore.resize_map(m[0], img.size) if maps or maps_dir is not None else None
            png = None
            if maps_dir is not None and up is not None:
                stem = Path(name).stem if name != "<image>" else "image"
                png_path = Path(maps_dir) / overlay_name(taken, stem)
                png = str(write_overlay(png_path, img, up, thr, float(s[0])))
            verdict = anomaly.ANOMALOUS if s[0] > thr else anomaly.GOOD
            out.append(Verdict(name, score, round(thr, 4), verdict, png, up if maps else None))
        return out

    def evaluate(
        self,
        folder: str | Path,
        maps_dir: str | Path | None = None,
        batch_size: int = 16,
        skip_bad: bool = False,
    ) -> AnomalyEvaluation:
        """Image AUROC, pixel AUROC (when masks exist), F1 and false-alarm rate at the stored
        threshold on an MVTec-layout folder; ``maps_dir`` gets one overlay PNG per image
        (``<defect>_<image stem>.png``, ``_2``, ... for stems met twice). ``skip_bad`` leaves
        bad images out (listed in ``skipped``)."""
        state = self.require()
        anomaly.check_search(self.search)
        _check_maps_dir(maps_dir)
        items, skipped = evaluation.mvtec_test(folder, skip_bad)
        paths = [it.path for it in items]
        y = np.array([it.defect != evaluation.GOOD for it in items], np.int64)
        t0 = time.perf_counter()
        scores, grids = [], []
        for feats in self._model.batches(paths, state.stages, batch_size, "scoring"):
            s, m = state.score(
                patchcore.patch_features(feats, state.stages, state.pool), self.search
            )
            scores.append(s)
            grids.append(m)
        seconds = time.perf_counter() - t0
        score, grid = np.concatenate(scores), np.concatenate(grids)
        thr = state.threshold
        has_masks = any(it.mask for it in items)
        pix = evaluation.PixelAuroc(float(grid.min()), float(grid.max())) if has_masks else None
        taken: set[str] = set()
        if pix is not None or maps_dir is not None:
            for it, g, s in zip(items, grid, score, strict=True):
                img = load_image(it.path)
                up = patchcore.resize_map(g, img.size)
                mask = evaluation.load_mask(it.mask) if it.mask else None
                if pix is not None:
                    pix.update(up, mask)
                if maps_dir is not None:
                    png = Path(maps_dir) / overlay_name(taken, f"{it.defect}_{Path(it.path).stem}")
                    write_overlay(png, img, up, thr, float(s), mask)
        per_defect = {
            d: round(evaluation.auroc(score[sel], y[sel]), 4)
            for d in sorted({it.defect for it in items} - {evaluation.GOOD})
            for sel in [np.array([it.defect in (d, evaluation.GOOD) for it in items])]
        }
        artifact = self._model.manifest.artifact
        pixel = None if pix is None else pix.value()  # None too when masks hold no defect
        return AnomalyEvaluation(
            image_auroc=round(evaluation.auroc(score, y), 4),
            pixel_auroc=None if pixel is None else round(pixel, 4),
            **evaluation.at_threshold(score, y, thr),
            threshold=round(thr, 4),
            target_false_alarm=state.false_alarm,
            n_good=int((y == 0).sum()),
            n_defective=int(y.sum()),
            per_defect_auroc=per_defect,
            bank={**state.summary(), "search": self.search},
            ms_per_image=round(1000 * seconds / len(items), 1),
            maps=None if maps_dir is None else str(maps_dir),
            bundle=str(self._model.path),
            artifact=f"{artifact.format}-{artifact.precision}",
            skipped=[sk.to_dict() for sk in skipped],
        )
