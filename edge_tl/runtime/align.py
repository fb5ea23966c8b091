"""Feature alignment on the device: target-camera embeddings made to look like the source's,
so the head learned on the source answers unchanged. Torch-free (numpy only).

Two methods, both from unlabelled target images:

- ``coral``: CORrelation ALignment (Sun, Feng & Saenko, "Return of Frustratingly Easy
  Domain Adaptation", AAAI 2016), applied to the target instead of the source: target
  embeddings are centred on the target mean, whitened with ``C_t^-1/2``, re-coloured with
  ``C_s^1/2`` and moved to the source mean, ``x' = mu_s + (x - mu_t) C_t^-1/2 C_s^1/2``.
  The covariances are regularised as in the paper, ``C + reg I`` with ``reg = 1``
  (:data:`DEFAULT_REG`), in the embedding's own units: for pooled ReLU6 features (mean
  variance per dimension about 0.06) that whitens the few strong directions and leaves
  the weak ones alone. The square roots are the symmetric ones (eigendecomposition).
  Each covariance is kept in factored form, its top
  ``rank`` eigenpairs plus the mean of the remaining eigenvalues (exact when the data have
  fewer than ``rank`` + 1 images), so neither a bundle nor a head version stores a
  ``D x D`` matrix, and applying it costs ``O(N D rank)``.
- ``center``: the head's centre replaced by the target's (SimpleShot's CL2N, Wang et al.
  2019, centred by the target mean instead of the source mean): for a head that centres
  power-transformed, L2-normalised features (prototype, k-NN, few-shot linear) the shift is
  done in that power space; for a workstation linear head, which standardises around the
  training mean, in the embedding space.

The source statistics come from the export (``source_stats.npz``: the artifact's
embeddings of the run's training and validation images, :func:`write_source_stats`). An
:class:`Alignment` is part of a head version (:class:`~edge_tl.runtime.head_state.HeadState`),
so it is versioned, rolled back and applied to every embedding the head sees.

Cross-checked against ``skada.CORALAdapter`` (``tests/test_align.py``): skada regularises
by shrinkage, ``(1 - s) C + s tr(C)/D I = (1 - s) (C + reg I)`` with
``reg = s tr(C) / (D (1 - s))`` per side (:func:`shrinkage_reg`), and the factors
``(1 - s)^-+1/2`` cancel between whitening and re-colouring; with those ``reg`` and no
truncation the aligned features agree to float precision. skada also leaves the result
centred (its target's frame); here the source mean is added back, since the head is the
source's. skada's ``reg="auto"`` (Ledoit-Wolf on standardised features, i.e. shrinkage
towards the diagonal) has no factored form and is not offered.

Example:
    >>> src = moments(x_source)  # doctest: +SKIP
    >>> al = fit_alignment("coral", x_target, src)  # doctest: +SKIP
    >>> head.predict_proba(al.apply(x_target, head))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.data import Dataset, is_named_image_set, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import entries, folder_images, is_image_name

__all__ = [
    "DEFAULT_RANK",
    "DEFAULT_REG",
    "METHODS",
    "MIN_TARGET",
    "SOURCE_STATS",
    "Alignment",
    "Moments",
    "fit_alignment",
    "moments",
    "read_source_stats",
    "shrinkage_reg",
    "target_images",
    "write_source_stats",
]

_logger = logging.getLogger(__name__)

SOURCE_STATS = "source_stats.npz"
"""The bundle file with the source embeddings' :class:`Moments` (written by the export)."""
METHODS = ("coral", "center")
MIN_TARGET = {"coral": 50, "center": 10}
"""Fewest target images per method: a mean needs a few, a covariance some dozens."""
DEFAULT_RANK = 64
"""Eigenpairs kept per covariance (the rest by their mean): 64 x 1280 float32 is 330 KB.
On ELPV mono -> poly (efficientnet_lite0) ranks 16 to all give the same accuracy within
0.8 pt (reg 1 leaves the weak directions alone)."""
DEFAULT_REG = 1.0
"""CORAL's covariance regulariser ``C + reg I`` (Sun et al. 2016 add the identity)."""
POWER = 0.5  # the few-shot heads' power transform (heads.FEWSHOT_POWER)
_EPS = 1e-6  # eigenvalue floor, relative to the mean variance


def _power(x: np.ndarray, p: float) -> np.ndarray:
    return np.copysign(np.abs(x) ** p, x)


@dataclass(frozen=True)
class Moments:
    """Mean and covariance of embeddings ``x[N, D]``, the covariance in factored form.

    ``C = basis diag(var) basis.T + rest (I - basis basis.T)``: ``basis`` ``float32[D, r]``
    orthonormal eigenvectors of the sample covariance (divided by N, as
    ``sklearn.covariance.empirical_covariance``), ``var`` ``float64[r]`` their eigenvalues
    (descending), ``rest`` the mean of the other ``D - r`` eigenvalues. ``power_mean`` is
    the mean of ``sign(x) |x| ** 0.5`` (the few-shot heads' centre), ``n`` the number of
    images.
    """

    mean: np.ndarray
    power_mean: np.ndarray
    basis: np.ndarray
    var: np.ndarray
    rest: float
    n: int

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def mu(self) -> float:
        """``tr(C) / D``, the mean variance per dimension."""
        d, r = self.dim, len(self.var)
        return float((self.var.sum() + (d - r) * self.rest) / d)

    def regularised(self, reg: float) -> tuple[np.ndarray, float]:
        """Eigenvalues of ``C + reg I``: ``(along basis[r], elsewhere)``, floored at a
        millionth of the mean variance."""
        floor = _EPS * max(self.mu, 1e-30)
        return np.maximum(self.var + reg, floor), max(self.rest + reg, floor)

    def matpow(self, x: np.ndarray, p: float, reg: float) -> np.ndarray:
        """``x @ (C + reg I) ** p`` for rows ``x[N, D]`` (the symmetric power, by the
        eigendecomposition), in ``O(N D r)``; float64."""
        e, f = self.regularised(reg)
        x = np.asarray(x, np.float64)
        u = self.basis.astype(np.float64)
        return f**p * x + ((x @ u) * (e**p - f**p)) @ u.T

    def covariance(self, reg: float = 0.0) -> np.ndarray:
        """The dense ``float64[D, D]`` covariance ``C + reg I`` (for checks; D x D memory)."""
        e, f = self.regularised(reg)
        u = self.basis.astype(np.float64)
        return f * np.eye(self.dim) + (u * (e - f)) @ u.T

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": self.mean.astype(np.float32),
            f"{prefix}power_mean": self.power_mean.astype(np.float32),
            f"{prefix}basis": self.basis.astype(np.float32),
            f"{prefix}var": self.var.astype(np.float64),
            f"{prefix}rest": np.array(float(self.rest)),
            f"{prefix}n": np.array(int(self.n), np.int64),
        }

    @classmethod
    def from_arrays(cls, z: Any, prefix: str = "", dim: int | None = None) -> Moments:
        """Moments from :meth:`to_arrays`' arrays, each checked (finite numbers, shapes that
        agree, ``dim`` columns when given).

        Raises:
            KeyError: an array is missing. ValueError: naming the array that is wrong.
        """

        def arr(key: str, ndim: int) -> np.ndarray:
            v = np.asarray(z[prefix + key])
            if v.dtype.kind not in "fiu" or v.ndim != ndim:
                raise ValueError(f"{prefix}{key} is not a {ndim}-D array of numbers")
            if not np.isfinite(v).all():
                raise ValueError(f"{prefix}{key} holds values that are not finite")
            return v

        mean, pmean, basis, var = (
            arr("mean", 1),
            arr("power_mean", 1),
            arr("basis", 2),
            arr("var", 1),
        )
        rest, n = float(arr("rest", 0)), arr("n", 0)
        d = dim if dim is not None else len(mean)
        if len(mean) != d or pmean.shape != (d,):
            raise ValueError(f"{prefix}mean / {prefix}power_mean are not {d} numbers")
        if basis.shape != (d, len(var)) or len(var) > d:
            raise ValueError(f"{prefix}basis has shape {basis.shape}, not ({d}, {len(var)})")
        if (var < 0).any() or rest < 0:
            raise ValueError(f"{prefix}var / {prefix}rest hold negative variances")
        if n.dtype.kind not in "iu" or int(n) < 1:
            raise ValueError(f"{prefix}n is not a positive count")
        return cls(
            mean.astype(np.float32),
            pmean.astype(np.float32),
            basis.astype(np.float32),
            var.astype(np.float64),
            rest,
            int(n),
        )


def shrinkage_reg(m: Moments, shrinkage: float) -> float:
    """The ``reg`` for which ``C + reg I`` is ``(1 - s) C + s tr(C)/D I`` up to the factor
    ``1 - s`` (scikit-learn's ``shrunk_covariance``, skada's ``CORALAdapter(reg=s)``)."""
    if not 0 <= shrinkage < 1:
        raise EdgeTLError(f"shrinkage must be in [0, 1), not {shrinkage}")
    return shrinkage * m.mu / (1 - shrinkage)


def moments(x: np.ndarray, rank: int | None = DEFAULT_RANK) -> Moments:
    """The :class:`Moments` of embeddings ``x[N, D]`` with ``rank`` eigenpairs kept (None:
    all non-zero ones, exact); ``rank=0`` keeps means only (for ``center``).

    Raises:
        EdgeTLError: fewer than 2 rows, or values that are not finite.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise EdgeTLError(f"moments need 2 or more embeddings, not an array of shape {x.shape}")
    if not np.isfinite(x).all():
        raise EdgeTLError("embeddings hold values that are not finite")
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    trace = float((xc**2).sum() / n)
    keep = d if rank is None else min(rank, d)
    if keep == 0:
        vals, basis = np.zeros(0), np.zeros((d, 0))
    elif n <= d:  # through the N x N Gram matrix: same non-zero eigenvalues
        w, v = np.linalg.eigh(xc @ xc.T / n)
        order = np.argsort(w)[::-1]
        w, v = w[order], v[:, order]
        ok = w > 1e-12 * max(float(w[0]), 1e-30)
        w, v = w[ok][:keep], v[:, ok][:, :keep]
        vals, basis = w, (xc.T @ v) / np.sqrt(n * w)
    else:
        w, v = np.linalg.eigh(xc.T @ xc / n)
        order = np.argsort(w)[::-1][:keep]
        vals, basis = np.maximum(w[order], 0.0), v[:, order]
    r = len(vals)
    rest = max(trace - float(vals.sum()), 0.0) / (d - r) if d > r else 0.0
    return Moments(
        mean.astype(np.float32),
        _power(x, POWER).mean(0).astype(np.float32),
        basis.astype(np.float32),
        vals.astype(np.float64),
        rest,
        n,
    )


@dataclass(frozen=True)
class Alignment:
    """A fitted alignment of target embeddings to the source (see the module docstring).

    ``target`` (and for ``coral`` ``source``) are :class:`Moments`; ``reg`` the
    covariance regulariser of each side (``(target, source)``: ``C + reg I``).
    """

    method: str
    target: Moments
    source: Moments | None = None
    reg: tuple[float, float] = (DEFAULT_REG, DEFAULT_REG)

    @property
    def n(self) -> int:
        return self.target.n

    def describe(self) -> str:
        """``"coral on 812 images"``."""
        return f"{self.method} on {self.n} images"

    def apply(self, x: np.ndarray, head: Any = None) -> np.ndarray:
        """Aligned embeddings ``float32[N, D]`` for the device's embeddings ``x[N, D]``.

        ``head`` (a head from :mod:`edge_tl.runtime.heads`) gives ``center`` the centre it
        replaces; ``coral`` does not use it.
        """
        x = np.asarray(x, np.float32)
        if self.method == "coral":
            assert self.source is not None
            rt, rs = self.reg
            z = x.astype(np.float64) - self.target.mean
            z = self.source.matpow(self.target.matpow(z, -0.5, rt), 0.5, rs)
            return (z + self.source.mean).astype(np.float32)
        centre, p = _head_centre(head)
        if p == 1.0:
            return (x - self.target.mean + centre).astype(np.float32)
        shifted = _power(x, p) - self.target.power_mean + centre
        return _power(shifted, 1.0 / p).astype(np.float32)

    def to_arrays(self, prefix: str = "align_") -> dict[str, np.ndarray]:
        a = {
            f"{prefix}method": np.array(self.method),
            f"{prefix}reg": np.asarray(self.reg, np.float64),
            **self.target.to_arrays(f"{prefix}target_"),
        }
        if self.source is not None:
            a.update(self.source.to_arrays(f"{prefix}source_"))
        return a

    @classmethod
    def from_arrays(cls, z: Any, dim: int, prefix: str = "align_") -> Alignment | None:
        """The alignment in a head file's arrays, or None when it has none.

        Raises:
            KeyError: an array is missing. ValueError: naming the array that is wrong.
        """
        if f"{prefix}method" not in z:
            return None
        method = np.asarray(z[f"{prefix}method"])
        if method.dtype.kind != "U" or method.ndim != 0 or str(method) not in METHODS:
            raise ValueError(f"{prefix}method is not one of {', '.join(METHODS)}")
        reg = np.asarray(z[f"{prefix}reg"])
        if reg.dtype.kind != "f" or reg.shape != (2,) or not (np.isfinite(reg) & (reg >= 0)).all():
            raise ValueError(f"{prefix}reg is not two numbers >= 0")
        target = Moments.from_arrays(z, f"{prefix}target_", dim)
        source = None
        if str(method) == "coral":
            source = Moments.from_arrays(z, f"{prefix}source_", dim)
        return cls(str(method), target, source, (float(reg[0]), float(reg[1])))


def _head_centre(head: Any) -> tuple[np.ndarray, float]:
    """``(centre[D], power)`` of a head: a few-shot head's CL2N centre in its power space,
    or a workstation linear head's training mean (power 1)."""
    if getattr(head, "normalise", True) is False:  # LinearHead trained on the workstation
        return np.asarray(head.mean, np.float32), 1.0
    centre = head.mean if hasattr(head, "normalise") else head.centre
    p = float(head.power)
    return np.asarray(centre, np.float32), p


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise EdgeTLError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")


def fit_alignment(
    method: str,
    x: np.ndarray,
    source: Moments | None = None,
    reg: float | tuple[float, float] = DEFAULT_REG,
    rank: int | None = DEFAULT_RANK,
) -> Alignment:
    """An :class:`Alignment` of target embeddings ``x[N, D]`` to ``source``.

    Args:
        method: ``coral`` or ``center``.
        source: the source :class:`Moments` (``coral`` needs them).
        reg: ``coral``'s regulariser ``C + reg I`` (> 0), one for both covariances or
            ``(target, source)``.
        rank: eigenpairs kept of the target covariance (None: all).

    Raises:
        EdgeTLError: an unknown method, fewer target images than :data:`MIN_TARGET`,
            ``coral`` without source moments or with another dimension, ``reg`` not > 0.
    """
    _check_method(method)
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) < MIN_TARGET[method]:
        raise EdgeTLError(
            f"{method} needs at least {MIN_TARGET[method]} target images, got {len(x)}; "
            "add unlabelled images from the new camera or line"
        )
    if method == "center":
        return Alignment("center", moments(x, rank=0))
    if source is None:
        raise EdgeTLError("coral needs the source statistics of the bundle")
    if source.dim != x.shape[1]:
        raise EdgeTLError(
            f"the source statistics have {source.dim} dimensions, the embeddings {x.shape[1]}"
        )
    pair = tuple(reg) if isinstance(reg, tuple) else (reg, reg)
    if not all(isinstance(r, (int, float)) and np.isfinite(r) and r > 0 for r in pair):
        raise EdgeTLError(f"--reg must be a number > 0, not {reg!r}")
    return Alignment("coral", moments(x, rank), source, (float(pair[0]), float(pair[1])))


# ---- the bundle's source statistics --------------------------------------------------------
def write_source_stats(path: str | Path, x: np.ndarray, rank: int | None = DEFAULT_RANK) -> None:
    """``source_stats.npz``: the :class:`Moments` of source embeddings ``x[N, D]`` (the
    artifact's embeddings of the run's training and validation images), plain arrays."""
    np.savez(path, **moments(x, rank).to_arrays())


def read_source_stats(path: str | Path) -> Moments:
    """The :class:`Moments` in ``source_stats.npz``.

    Raises:
        EdgeTLError: the file is not readable source statistics.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return Moments.from_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError) as e:
        raise EdgeTLError(
            f"{path} is not readable source statistics ({e}); re-export the bundle with "
            "`edge-tl export RUN`"
        ) from None


# ---- target images -------------------------------------------------------------------------
TargetLike = str | Path | Dataset | Sequence[str]
"""Target images: a named set (``elpv:poly``), a flat folder of images, an ImageFolder
(labels ignored), a :class:`~edge_tl.data.Dataset`, or a list of image paths."""


def target_images(target: TargetLike, skip_bad: bool = False) -> list[str]:
    """The image paths of ``target`` (see :data:`TargetLike`); a labelled source (named set,
    ImageFolder) gives a one-line warning that its labels are not used.

    Raises:
        EdgeTLError: no such folder, a folder without images, text data.
        BadImageError: an unreadable image (not ``skip_bad``).
    """
    if isinstance(target, Dataset):
        if target.modality != "image":
            raise EdgeTLError(f"{target.name} holds texts; adaptation aligns image embeddings")
        return list(target.paths)
    if not isinstance(target, (str, Path)):
        return [str(p) for p in target]
    if is_named_image_set(target):
        _logger.warning(f"{target} is labelled; adapt uses its images only, not the labels")
        return list(open_dataset(target).paths)
    root = Path(target)
    if not root.is_dir():
        raise EdgeTLError(
            f"target {root} does not exist; pass a folder of images from the new camera or "
            "line (an ImageFolder's labels are ignored), or elpv:mono / elpv:poly"
        )
    files, dirs = entries(root)
    if any(is_image_name(f) for f in files) or not dirs:
        paths, _ = folder_images(root, skip_bad)
        if not paths:
            raise EdgeTLError(f"target folder {root} has no images; add unlabelled target images")
        return paths
    ds = open_dataset(root, skip_bad=skip_bad)
    _logger.warning(
        f"{root} is an ImageFolder ({len(ds.classes)} classes); adapt uses its images only, "
        "not the labels"
    )
    return list(ds.paths)
