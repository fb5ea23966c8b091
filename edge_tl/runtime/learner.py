"""On-device learning: head state that grows with the field, versioned and crash-safe.

Torch-free (numpy only). A :class:`HeadState` is one head (prototype, linear or k-NN), its
labels, the support embeddings it was learned from, and the open-set threshold. The
:class:`HeadStore` keeps every version in ``BUNDLE/heads/vNNNN.npz`` (plain arrays, metadata
as a JSON string; never pickles) and a ``CURRENT`` pointer. Each write is a temporary file,
``fsync`` and ``rename``, so a power cut leaves the previous version in force, never half a
file. Each state is bound to the SHA-256 of the bundle's backbone: a head learned on other
embeddings is refused.

Example:
    >>> from edge_tl.runtime import Model
    >>> model = Model("bundle")  # doctest: +SKIP
    >>> model.learn("support/", head="prototype")  # doctest: +SKIP
    >>> model.add_class("oil_stain", ["a.jpg", "b.jpg"])  # doctest: +SKIP
    >>> model.rollback()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.heads import (
    FEWSHOT_POWER,
    KnnHead,
    LinearHead,
    PrototypeHead,
    cl2n,
    class_means,
    imprint,
    power,
    unit_rows,
)
from edge_tl.spec import Manifest

HEADS = ("linear", "prototype", "knn")
DEFAULT_HEAD = "linear"
UNKNOWN = "unknown"
"""The label ``predict`` gives an image that is like none of the known classes."""
DEFAULT_QUANTILE = 0.05
"""Open set: the threshold lets through all but this share of the support set (leave-one-out)."""
HEADS_DIR = "heads"
CURRENT = "CURRENT"
KEEP_VERSIONS = 20

Head = LinearHead | PrototypeHead | KnnHead


def backbone_sha256(manifest: Manifest) -> str:
    """One SHA-256 over the backbone artifact's files (their hashes in the manifest)."""
    h = hashlib.sha256()
    for f in sorted(manifest.artifact.files):
        h.update(f"{f}:{manifest.files.get(f, '')}\n".encode())
    return h.hexdigest()


@dataclass
class HeadState:
    """A head with its labels, support embeddings and open-set threshold.

    ``support_x`` are raw embeddings of the images the head learned from (so prototypes,
    k-NN and the threshold can be recomputed exactly when classes change). A head from the
    workstation starts with no support: its classes live in its weights.
    """

    kind: str
    labels: list[str]
    head: Head
    support_x: np.ndarray
    support_y: np.ndarray
    quantile: float | None = DEFAULT_QUANTILE  # None: open set off
    threshold_override: float | None = None  # set by the user; wins over the quantile
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._open = _open_set(self) if self.open_set_ready else None

    # ---- open set ---------------------------------------------------------------------
    @property
    def open_set_ready(self) -> bool:
        counts = np.bincount(self.support_y, minlength=len(self.labels))
        return bool(len(self.labels)) and bool(counts.min() > 0)

    @property
    def threshold(self) -> float | None:
        if self.threshold_override is not None:
            return self.threshold_override
        if self._open is None or self.quantile is None:
            return None
        return self._open["threshold"]

    def similarity(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        """Cosine of each embedding to its predicted class's prototype (open-set score)."""
        if self._open is None:
            return None
        z = cl2n(power(x, FEWSHOT_POWER), self._open["centre"])
        return np.einsum("nd,nd->n", z, self._open["prototypes"][pred])

    # ---- prediction -------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head.logits(np.asarray(x, np.float32))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(np.asarray(x, np.float32))

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.support_y, minlength=len(self.labels))
        return {name: int(n) for name, n in zip(self.labels, c, strict=True)}

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.meta.get("version"),
            "head": self.kind,
            "labels": list(self.labels),
            "support": self.counts(),
            "threshold": None if self.threshold is None else round(self.threshold, 4),
            "open_set": self.threshold is not None,
            **{k: self.meta[k] for k in ("op", "parent", "created", "fit_ms") if k in self.meta},
        }

    # ---- persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        a: dict[str, np.ndarray] = {
            "kind": np.array(self.kind),
            "labels": np.array(self.labels, dtype=str).reshape(-1),
            "support_x": self.support_x.astype(np.float32),
            "support_y": self.support_y.astype(np.int64),
            "quantile": np.array(np.nan if self.quantile is None else self.quantile),
            "threshold_override": np.array(
                np.nan if self.threshold_override is None else self.threshold_override
            ),
            "meta": np.array(json.dumps(self.meta)),
        }
        if isinstance(self.head, LinearHead):
            a.update({f"linear_{k}": v for k, v in self.head.arrays().items()})
        elif isinstance(self.head, KnnHead):
            a["knn_k"] = np.array(self.head.k)
        return a

    @classmethod
    def from_arrays(cls, z: Any, where: str) -> HeadState:
        try:
            kind = str(z["kind"])
            labels = [str(s) for s in z["labels"]]
            support_x = np.asarray(z["support_x"], np.float32)
            support_y = np.asarray(z["support_y"], np.int64)
            quantile = float(z["quantile"])
            override = float(z["threshold_override"])
            meta = json.loads(str(z["meta"]))
            if kind == "linear":
                head: Head = LinearHead.from_arrays(
                    {k[len("linear_") :]: z[k] for k in z.files if k.startswith("linear_")}
                )
            elif kind in ("prototype", "knn"):
                k = int(z["knn_k"]) if kind == "knn" else 1
                head = _fit_support(kind, support_x, support_y, len(labels), k)
            else:
                raise KeyError(f"head kind {kind!r}")
        except (KeyError, ValueError) as e:
            raise EdgeTLError(
                f"{where} is not an edge_tl head state ({e}); pass a file written by "
                "`edge-tl learn`"
            ) from None
        return cls(
            kind,
            labels,
            head,
            support_x,
            support_y,
            None if np.isnan(quantile) else quantile,
            None if np.isnan(override) else override,
            meta,
        )


def _fit_support(kind: str, x: np.ndarray, y: np.ndarray, n_classes: int, k: int = 1) -> Head:
    if kind == "prototype":
        return PrototypeHead.fit(x, y, n_classes)
    if kind == "knn":
        return KnnHead.fit(x, y, n_classes, k=k)
    return LinearHead.fit_fewshot(x, y, n_classes)


def _refit(state: HeadState, x: np.ndarray, y: np.ndarray, n_classes: int) -> Head:
    """A prototype or k-NN head (same k) recomputed from a changed support set."""
    k = state.head.k if isinstance(state.head, KnnHead) else 1
    return _fit_support(state.kind, x, y, n_classes, k)


def _open_set(state: HeadState) -> dict[str, Any]:
    """Prototypes of the support set and the leave-one-out threshold.

    Each support embedding is scored against its class's prototype computed without it;
    the threshold is the ``quantile`` of those scores, so about that share of images like
    the support set would be called unknown. A class with one example cannot be left out;
    with no class of two or more, the threshold is ``-1`` (nothing is rejected).
    """
    x, y, k = state.support_x, state.support_y, len(state.labels)
    p = power(x, FEWSHOT_POWER)
    centre = p.mean(0)
    z = cl2n(p, centre)
    counts = np.bincount(y, minlength=k)
    sums = class_means(z, y, k) * counts[:, None]
    # leave-one-out in closed form: |S - z|^2 = |S|^2 - 2 z.S + 1 for unit z
    dots = np.einsum("nd,nd->n", z, sums[y])
    sq = np.maximum((sums * sums).sum(1)[y] - 2 * dots + 1.0, 1e-12)
    scores = ((dots - 1.0) / np.sqrt(sq))[counts[y] >= 2]
    q = state.quantile if state.quantile is not None else DEFAULT_QUANTILE
    threshold = float(np.quantile(scores, q)) if len(scores) else -1.0
    return {"centre": centre, "prototypes": unit_rows(sums), "threshold": threshold}


# ---- operations (pure: each returns a new state) -----------------------------------------
def check_labels(names: list[str], existing: list[str] | None = None) -> None:
    """Refuse label names that collide: ``unknown``, empty, or equal ignoring case."""
    seen: dict[str, str] = {}
    for name in [*(existing or []), *names]:
        key = name.strip().casefold()
        if not key:
            raise EdgeTLError("a class name is empty; name every class folder")
        if key == UNKNOWN:
            raise EdgeTLError(
                f"class name {name!r} is reserved for open-set rejection; rename the class"
            )
        if key in seen and seen[key] != name:
            raise EdgeTLError(
                f"class names {seen[key]!r} and {name!r} differ only in case; rename one"
            )
        seen[key] = name


def learn(
    x: np.ndarray,
    names: list[str],
    kind: str = DEFAULT_HEAD,
    quantile: float | None = DEFAULT_QUANTILE,
    k: int = 1,
) -> HeadState:
    """A new head from support embeddings ``x[N, D]`` labelled by class name."""
    if kind not in HEADS:
        raise EdgeTLError(f"--head must be one of {', '.join(HEADS)}, not {kind!r}")
    labels = sorted(set(names))
    check_labels(labels)
    if len(labels) < 2 and kind == "linear":
        raise EdgeTLError(
            f"a linear head needs at least 2 classes, DATA has {len(labels)}; add class "
            "folders, or use --head prototype"
        )
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to learn from; add images to the class folders")
    y = np.asarray([labels.index(n) for n in names], np.int64)
    t0 = time.perf_counter()
    head = _fit_support(kind, x, y, len(labels), k)
    fit_ms = (time.perf_counter() - t0) * 1e3
    return HeadState(
        kind, labels, head, np.asarray(x, np.float32), y, quantile, None, {"fit_ms": fit_ms}
    )


def add(state: HeadState, x: np.ndarray, names: list[str]) -> HeadState:
    """Add examples (to known classes) and classes (new names) to ``state``.

    Prototype and k-NN heads are recomputed from the grown support set (exact, cheap). A
    linear head gains each new class by weight imprinting, calibrated against the support
    of the known classes; its existing rows stay. A few-shot linear head given examples of a
    class it already had is refitted from the whole support set; a workstation head keeps
    its trained rows (the new examples join the support for the open set and later classes).
    """
    if len(x) != len(names) or len(x) == 0:
        raise EdgeTLError("no support images to add; add images to the class folders")
    new = sorted(set(names) - set(state.labels))
    check_labels(new, state.labels)
    labels = [*state.labels, *new]
    y_add = np.asarray([labels.index(n) for n in names], np.int64)
    support_x = np.concatenate([state.support_x, np.asarray(x, np.float32)])
    support_y = np.concatenate([state.support_y, y_add])
    t0 = time.perf_counter()
    head = state.head
    if isinstance(head, LinearHead):
        x = np.asarray(x, np.float32)
        to_known = bool((y_add < len(state.labels)).any())
        if to_known and head.normalise and np.bincount(support_y, minlength=len(labels)).min():
            # a few-shot head with support for every class: refit (a few ms)
            head = LinearHead.fit_fewshot(support_x, support_y, len(labels))
        elif new:
            is_new = y_add >= len(state.labels)
            known = support_y < len(state.labels)  # references: support of known classes
            head = imprint(
                head,
                x[is_new],
                y_add[is_new] - len(state.labels),
                len(new),
                support_x[known],
                support_y[known],
            )
    else:
        head = _refit(state, support_x, support_y, len(labels))
    fit_ms = (time.perf_counter() - t0) * 1e3
    return replace(
        state,
        labels=labels,
        head=head,
        support_x=support_x,
        support_y=support_y,
        meta={"fit_ms": fit_ms},
    )


def remove(state: HeadState, name: str) -> HeadState:
    """Forget class ``name``: its weights, prototype and support images."""
    if name not in state.labels:
        raise EdgeTLError(
            f"class {name!r} is not in the head ({', '.join(state.labels)}); check the name"
        )
    if len(state.labels) <= 1:
        raise EdgeTLError(f"{name!r} is the head's only class; learn a new head instead")
    c = state.labels.index(name)
    keep = state.support_y != c
    support_y = state.support_y[keep]
    support_y = support_y - (support_y > c)
    labels = [n for n in state.labels if n != name]
    head = state.head
    if isinstance(head, LinearHead):
        rows = np.arange(head.n_classes) != c
        head = replace(head, weight=head.weight[rows], bias=head.bias[rows])
    else:
        head = _refit(state, state.support_x[keep], support_y, len(labels))
    return replace(
        state,
        labels=labels,
        head=head,
        support_x=state.support_x[keep],
        support_y=support_y,
        meta={},
    )


def relabel(state: HeadState, old: str, new: str) -> HeadState:
    """Rename class ``old`` to ``new`` (a name no other class has)."""
    if old not in state.labels:
        raise EdgeTLError(
            f"class {old!r} is not in the head ({', '.join(state.labels)}); check the name"
        )
    others = [n for n in state.labels if n != old]
    clash = [n for n in others if n.strip().casefold() == new.strip().casefold()]
    if clash:
        raise EdgeTLError(
            f"cannot relabel {old!r} as {new!r}: the head already has a class {clash[0]!r}; "
            f"remove one of them first (learn --remove)"
        )
    check_labels([new], others)
    labels = [new if n == old else n for n in state.labels]
    return replace(state, labels=labels, meta={})


# ---- versioned store ----------------------------------------------------------------------
class HeadStore:
    """The versions of a bundle's learned head: ``heads/vNNNN.npz`` and ``heads/CURRENT``.

    Subclasses keep other device-learned state the same way (``dirname``, ``state_cls``: a
    class with ``from_arrays(z, where)``, ``to_arrays()``, ``meta`` and ``summary()``).
    """

    dirname = HEADS_DIR
    noun = "head"
    command = "edge-tl learn"
    rollback_flag = ""

    @property
    def state_cls(self) -> Any:
        return HeadState

    def __init__(self, bundle: str | Path, manifest: Manifest, keep: int = KEEP_VERSIONS):
        self.bundle = Path(bundle)
        self.dir = self.bundle / self.dirname
        self.backbone = backbone_sha256(manifest)
        self.keep = keep

    def _path(self, version: int) -> Path:
        return self.dir / f"v{version:04d}.npz"

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("v*.npz"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem[1:]))
        return sorted(out)

    def current(self) -> int | None:
        f = self.dir / CURRENT
        if not f.is_file():
            return None
        try:
            v = int(f.read_text().strip())
        except ValueError:
            v = -1
        if not self._path(v).is_file():
            raise EdgeTLError(
                f"{f} names {self.noun} version {f.read_text().strip()!r}, which is not in "
                f"{self.dir}; run `edge-tl rollback {self.bundle}{self.rollback_flag} --to N` "
                f"with one of {self.versions()}"
            )
        return v

    def load(self, version: int | None = None) -> Any:
        """The current (or a given) version; None when nothing was learned yet."""
        v = self.current() if version is None else version
        if v is None:
            return None
        if not self._path(v).is_file():
            raise EdgeTLError(
                f"{self.noun} version {v} does not exist in {self.dir}; versions: {self.versions()}"
            )
        return self.read(self._path(v))

    def read(self, path: Path) -> Any:
        """Read a state file and check it belongs to this bundle's backbone."""
        try:
            with np.load(path, allow_pickle=False) as z:
                state = self.state_cls.from_arrays(z, str(path))
        except (OSError, ValueError) as e:
            raise EdgeTLError(
                f"{path} is not a readable {self.noun} state ({e}); pass a file written by "
                f"`{self.command}`"
            ) from None
        theirs = state.meta.get("backbone_sha256")
        if theirs != self.backbone:
            raise EdgeTLError(
                f"{path} was learned on another backbone (sha256 {str(theirs)[:12]}, this "
                f"bundle's is {self.backbone[:12]}); its features do not match, so learn "
                f"the {self.noun} again on this bundle with `{self.command}`"
            )
        return state

    def save(self, state: Any, op: str) -> Any:
        """Write ``state`` as the next version and make it current; returns it with its meta."""
        with self._lock():
            parent = self.current()
            version = (max(self.versions(), default=0)) + 1
            meta = {
                **state.meta,
                "version": version,
                "parent": parent,
                "op": op,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "backbone_sha256": self.backbone,
            }
            state = replace(state, meta=meta)
            self.dir.mkdir(exist_ok=True)
            _atomic_write(self._path(version), lambda f: np.savez(f, **state.to_arrays()))
            _atomic_write(self.dir / CURRENT, lambda f: f.write(f"{version}\n".encode()))
            self._prune(version)
        return state

    def rollback(self, to: int | None = None) -> Any:
        """Make an earlier version current (default: the current one's parent)."""
        if self.current() is None:  # checked before the lock, which creates the folder
            raise EdgeTLError(
                f"{self.bundle} has no learned {self.noun} to roll back; run `{self.command}` first"
            )
        with self._lock():
            cur = self.current()
            if cur is None:
                raise EdgeTLError(
                    f"{self.bundle} has no learned {self.noun} to roll back; run "
                    f"`{self.command}` first"
                )
            if to is None:
                to = self.read(self._path(cur)).meta.get("parent")
                if to is None:
                    raise EdgeTLError(
                        f"{self.noun} version {cur} is the first one; there is nothing before it "
                        f"(versions: {self.versions()})"
                    )
            if not self._path(to).is_file():
                raise EdgeTLError(
                    f"{self.noun} version {to} does not exist in {self.dir}; "
                    f"versions: {self.versions()}"
                )
            state = self.read(self._path(to))
            _atomic_write(self.dir / CURRENT, lambda f: f.write(f"{to}\n".encode()))
        return state

    def history(self) -> list[dict[str, Any]]:
        cur = self.current()
        out = []
        for v in self.versions():
            try:
                s = self.read(self._path(v))
            except EdgeTLError as e:
                out.append({"version": v, "error": str(e)})
                continue
            out.append({**s.summary(), "current": v == cur})
        return out

    def _prune(self, current: int) -> None:
        old = [v for v in self.versions() if v != current]
        for v in old[: max(0, len(old) - (self.keep - 1))]:
            with contextlib.suppress(OSError):
                self._path(v).unlink()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (another process learning on the same bundle waits)."""
        self.dir.mkdir(exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync it, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a camera service may be another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def workstation_state(
    head: LinearHead, labels: list[str], exemplars: Path | None = None
) -> HeadState:
    """The bundle's own head (trained on the workstation) as a state. Its support is the
    exemplars the export stored (artifact embeddings of some training images per class),
    or nothing for bundles without them. Open-set rejection starts off."""
    d = head.weight.shape[1]
    x, y = np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    if exemplars is not None and exemplars.is_file():
        with np.load(exemplars, allow_pickle=False) as z:
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    # open set off: the exported head answers as it did at export (evaluate matches the
    # export's figures); `edge-tl learn BUNDLE --quantile 0.05` turns it on
    return HeadState("linear", list(labels), head, x, y, quantile=None, meta={"op": "export"})
