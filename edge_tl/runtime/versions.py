"""Versions of what a device learns, kept in the bundle: crash-safe, locked, bound to the
backbone, rolled back by number.

One :class:`VersionedStore` serves every kind of learned state (the head in ``heads/``,
the anomaly bank in ``anomaly/``); a :class:`StoreKind` says which. Each version is
``DIR/vNNNN.npz`` (plain arrays, metadata as a JSON string; never pickles) and
``DIR/CURRENT`` names the one in force. Every write is a temporary file, ``fsync`` and
``rename`` (:func:`edge_tl.bundle.atomic_write`), under a file lock, so a power cut leaves
the previous version in force and never half a file. Every version records the SHA-256 of
the bundle's backbone artifact: state learned on other embeddings is refused. Torch-free.

Example:
    >>> from edge_tl.runtime.learner import head_store
    >>> store = head_store("bundle", manifest)  # doctest: +SKIP
    >>> [h["version"] for h in store.history()]  # doctest: +SKIP
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_tl.archive import refuse_write
from edge_tl.bundle import atomic_write
from edge_tl.errors import EdgeTLError
from edge_tl.spec import Manifest

__all__ = ["CURRENT", "State", "StoreKind", "VersionedStore", "backbone_sha256"]

CURRENT = "CURRENT"


class State(Protocol):
    """What a store keeps: a dataclass with ``meta``, plain arrays and a summary."""

    meta: dict[str, Any]

    def to_arrays(self) -> dict[str, np.ndarray]: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StoreKind:
    """One kind of learned state: where it lives in the bundle and how it is named.

    ``read(npz, where)`` builds the state from a version file's arrays (raising
    :class:`EdgeTLError` for a foreign file); ``keep`` versions are kept, older ones pruned.
    """

    dirname: str
    noun: str
    command: str
    rollback_flag: str
    read: Callable[[Any, str], Any]
    keep: int


def backbone_sha256(manifest: Manifest) -> str:
    """One SHA-256 over the backbone artifact's files (their hashes in the manifest)."""
    h = hashlib.sha256()
    for f in sorted(manifest.artifact.files):
        h.update(f"{f}:{manifest.files.get(f, '')}\n".encode())
    return h.hexdigest()


class VersionedStore:
    """The versions of one kind of learned state in a bundle (see the module docstring)."""

    def __init__(self, bundle: str | Path, manifest: Manifest, kind: StoreKind) -> None:
        self.bundle = Path(bundle)
        self.kind = kind
        self.dir = self.bundle / kind.dirname
        self.backbone = backbone_sha256(manifest)

    def _path(self, version: int) -> Path:
        return self.dir / f"v{version:04d}.npz"

    def versions(self) -> list[int]:
        """Version numbers on disk, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("v*.npz"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem[1:]))
        return sorted(out)

    def current(self) -> int | None:
        """The version in force, or None when nothing was learned yet.

        Raises:
            EdgeTLError: ``CURRENT`` names a version that is not on disk.
        """
        f = self.dir / CURRENT
        if not f.is_file():
            return None
        try:
            v = int(f.read_text().strip())
        except ValueError:
            v = -1
        if not self._path(v).is_file():
            raise EdgeTLError(
                f"{f} names {self.kind.noun} version {f.read_text().strip()!r}, which is not "
                f"in {self.dir}; run `edge-tl rollback {self.bundle}{self.kind.rollback_flag} "
                f"--to N` with one of {self.versions()}"
            )
        return v

    def load(self, version: int | None = None) -> Any:
        """The current (or a given) version; None when nothing was learned yet."""
        v = self.current() if version is None else version
        if v is None:
            return None
        if not self._path(v).is_file():
            raise EdgeTLError(
                f"{self.kind.noun} version {v} does not exist in {self.dir}; "
                f"versions: {self.versions()}"
            )
        return self.read(self._path(v))

    def read(self, path: Path) -> Any:
        """Read a state file and check it belongs to this bundle's backbone.

        Raises:
            EdgeTLError: a damaged file, not a state file of this kind, or one learned on
                another backbone; for a version of this store, the message names the intact
                versions to roll back to.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                state = self.kind.read(z, str(path))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            # numpy reads anything that is not .npy/.npz as a pickle, which is never loaded
            why = "not a .npz of plain arrays" if "allow_pickle" in str(e) else str(e)
            raise EdgeTLError(
                f"{path} is not a readable {self.kind.noun} state ({why}); {self._way_back(path)}"
            ) from None
        theirs = state.meta.get("backbone_sha256")
        if theirs != self.backbone:
            raise EdgeTLError(
                f"{path} was learned on another backbone (sha256 {str(theirs)[:12]}, this "
                f"bundle's is {self.backbone[:12]}); its features do not match, so learn "
                f"the {self.kind.noun} again on this bundle with `{self.kind.command}`"
            )
        return state

    def save(self, state: Any, op: str) -> Any:
        """Write ``state`` as the next version and make it current; returns it with its
        metadata (version, parent, op, created, backbone)."""
        with self._lock():
            parent = self.current()
            version = max(self.versions(), default=0) + 1
            meta = {
                **state.meta,
                "version": version,
                "parent": parent,
                "op": op,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "backbone_sha256": self.backbone,
            }
            state = replace(state, meta=meta)
            atomic_write(self._path(version), lambda f: np.savez(f, **state.to_arrays()))
            atomic_write(self.dir / CURRENT, lambda f: f.write(f"{version}\n".encode()))
            self._prune(version)
        return state

    def rollback(self, to: int | None = None) -> Any:
        """Make an earlier version current (default: the current one's parent). Nothing is
        deleted. With ``to``, this works even when ``CURRENT`` or the current version is
        damaged: it is the way back."""
        if to is None and self.current() is None:  # before the lock, which makes the folder
            raise self._nothing_learned()
        if to is not None and not self.versions():
            raise self._nothing_learned()
        with self._lock():
            if to is None:
                cur = self.current()
                if cur is None:
                    raise self._nothing_learned()
                to = self.read(self._path(cur)).meta.get("parent")
                if to is None:
                    raise EdgeTLError(
                        f"{self.kind.noun} version {cur} is the first one; there is nothing "
                        f"before it (versions: {self.versions()})"
                    )
            if not self._path(to).is_file():
                raise EdgeTLError(
                    f"{self.kind.noun} version {to} does not exist in {self.dir}; "
                    f"versions: {self.versions()}"
                )
            state = self.read(self._path(to))
            atomic_write(self.dir / CURRENT, lambda f: f.write(f"{to}\n".encode()))
        return state

    def history(self) -> list[dict[str, Any]]:
        """Each version's summary with ``current``; an unreadable one gives ``error``. Works
        when ``CURRENT`` is damaged too (then no version is current)."""
        try:
            cur = self.current()
        except EdgeTLError:
            cur = None
        out = []
        for v in self.versions():
            try:
                s = self.read(self._path(v))
            except EdgeTLError as e:
                out.append({"version": v, "error": str(e)})
                continue
            out.append({**s.summary(), "current": v == cur})
        return out

    def _way_back(self, path: Path) -> str:
        """What to do about an unreadable file: for one of this store's versions, roll back
        to an intact one; for another file, pass one written by the right command."""
        if path.parent.resolve() != self.dir.resolve():
            return f"pass a file written by `{self.kind.command}`"
        intact = []
        for v in self.versions():
            if self._path(v) != path:
                with contextlib.suppress(EdgeTLError):
                    self.read(self._path(v))
                    intact.append(v)
        if not intact:
            return f"no other version is intact; learn again with `{self.kind.command}`"
        return (
            f"go back to an intact version with `edge-tl rollback {self.bundle}"
            f"{self.kind.rollback_flag} --to N` (intact: {intact})"
        )

    def _nothing_learned(self) -> EdgeTLError:
        return EdgeTLError(
            f"{self.bundle} has no learned {self.kind.noun} to roll back; run "
            f"`{self.kind.command}` first"
        )

    def _prune(self, current: int) -> None:
        old = [v for v in self.versions() if v != current]
        for v in old[: max(0, len(old) - (self.kind.keep - 1))]:
            with contextlib.suppress(OSError):
                self._path(v).unlink()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (another process learning on the same bundle waits); never
        in the temporary copy of an archive."""
        refuse_write(self.bundle)
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
