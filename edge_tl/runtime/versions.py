"""Versions of what a device learns, kept in the bundle: crash-safe, locked, bound to the
backbone, rolled back by number.

One :class:`VersionedStore` serves every kind of learned state (the head in ``heads/``,
the anomaly bank in ``anomaly/``); a :class:`StoreKind` says which. Each version is
``DIR/vNNNN.npz`` (plain arrays, metadata as a JSON string; never pickles) and
``DIR/CURRENT`` names the one in force with the SHA-256 of its file (``"N <hex>"``). Every
write is a temporary file, ``fsync`` and ``rename`` (:func:`edge_tl.bundle.atomic_write`),
so a power cut or ``kill -9`` leaves the previous version in force and never half a file.
A change is read-current, compute, write as one step under a file lock
(:meth:`VersionedStore.update`): two processes changing one bundle at once are serialised,
the second applies its change on top of the first's, no update is lost.

Damage is detected, not guessed at: each version stores the SHA-256 of its own arrays
(``sha256``), and ``CURRENT`` the SHA-256 of the whole file it names, so a file cut short,
a flipped byte that numpy would still read, or a pointer cut to another number is named
with the intact versions to roll back to. Every version records the SHA-256 of the
bundle's backbone artifact: state learned on other embeddings is refused. Torch-free.

Example:
    >>> from edge_tl.runtime.learner import head_store
    >>> store = head_store("bundle", manifest)  # doctest: +SKIP
    >>> [h["version"] for h in store.history()]  # doctest: +SKIP
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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

__all__ = [
    "CURRENT",
    "DIGEST",
    "State",
    "StoreKind",
    "VersionedStore",
    "arrays_sha256",
    "backbone_sha256",
]

CURRENT = "CURRENT"
DIGEST = "sha256"
"""The array in each version file holding the SHA-256 of the others (:func:`arrays_sha256`)."""


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


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """One SHA-256 over named arrays: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def backbone_sha256(manifest: Manifest) -> str:
    """One SHA-256 over the backbone artifact's files (their hashes in the manifest)."""
    h = hashlib.sha256()
    for f in sorted(manifest.artifact.files):
        h.update(f"{f}:{manifest.files.get(f, '')}\n".encode())
    return h.hexdigest()


class _Damaged(Exception):
    """A version file that cannot be read as a whole state; the message says why."""


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

    def _pointer(self) -> tuple[int, str | None] | None:
        """``(version, SHA-256 of its file or None for a pointer written before hashes)``
        from ``CURRENT``, or None when nothing was learned yet.

        Raises:
            EdgeTLError: ``CURRENT`` is damaged or names a version that is not on disk.
        """
        f = self.dir / CURRENT
        if not f.exists():
            # Versions without a pointer: a lone first version is a first write cut before
            # its pointer (nothing was learned yet); more than that, the pointer was lost
            # (a partial copy, a cleanup script), and answering with the exported head or
            # no bank would be silently wrong.
            if self.versions() in ([], [1]):
                return None
            raise EdgeTLError(
                f"{f} is missing while {self.dir} holds versions {self.versions()}; "
                f"{self._way_back(f)}"
            )
        if not f.is_file():
            raise EdgeTLError(f"{f} is not a file; remove it, then {self._way_back(f)}")
        raw = f.read_bytes().decode("ascii", "replace")
        text, parts = raw.strip(), raw.split()
        try:  # the line ends in a newline: a pointer cut short ("12 <hex>" -> "1") is caught
            v = int(parts[0]) if len(parts) in (1, 2) and raw.endswith("\n") else -1
        except ValueError:
            v = -1
        sha = parts[1] if len(parts) == 2 else None
        if v < 0 or (sha is not None and not _is_sha256(sha)):
            raise EdgeTLError(
                f"{f} is damaged (it holds {text[:40]!r}, not a version number and its "
                f"SHA-256); {self._way_back(f)}"
            )
        if not self._path(v).is_file():
            raise EdgeTLError(
                f"{f} names {self.kind.noun} version {v}, which is not in {self.dir}; "
                f"{self._way_back(f)}"
            )
        return v, sha

    def current(self) -> int | None:
        """The version in force, or None when nothing was learned yet.

        Raises:
            EdgeTLError: ``CURRENT`` is damaged or names a version that is not on disk.
        """
        pointer = self._pointer()
        return None if pointer is None else pointer[0]

    def load(self, version: int | None = None) -> Any:
        """The current (or a given) version; None when nothing was learned yet.

        Raises:
            EdgeTLError: the version does not exist, or its file or ``CURRENT`` is damaged
                (the message names the file and the intact versions to roll back to).
        """
        if version is None:
            pointer = self._pointer()
            if pointer is None:
                return None
            return self.read(self._path(pointer[0]), pointer[1])
        if not self._path(version).is_file():
            raise EdgeTLError(
                f"{self.kind.noun} version {version} does not exist in {self.dir}; "
                f"versions: {self.versions()}"
            )
        return self.read(self._path(version))

    def read(self, path: Path, file_sha256: str | None = None) -> Any:
        """Read a state file and check it is whole and belongs to this bundle's backbone.

        Args:
            file_sha256: the SHA-256 the whole file must have (what ``CURRENT`` records).

        Raises:
            EdgeTLError: a damaged file (unreadable, its arrays or bytes not matching their
                recorded SHA-256), not a state file of this kind, or one learned on another
                backbone; for a version of this store, the message names the intact versions
                to roll back to.
        """
        try:
            state = self._parse(path, file_sha256)
        except _Damaged as e:
            raise EdgeTLError(
                f"{path} is not a readable {self.kind.noun} state ({e}); {self._way_back(path)}"
            ) from None
        theirs = state.meta.get("backbone_sha256")
        if theirs != self.backbone:
            raise EdgeTLError(
                f"{path} was learned on another backbone (sha256 {str(theirs)[:12]}, this "
                f"bundle's is {self.backbone[:12]}); its features do not match, so learn "
                f"the {self.kind.noun} again on this bundle with `{self.kind.command}`"
            )
        return state

    def _parse(self, path: Path, file_sha256: str | None = None) -> Any:
        """The state in ``path``, its hashes checked; raises :class:`_Damaged` with why not."""
        try:
            data = path.read_bytes()
            if file_sha256 is not None and hashlib.sha256(data).hexdigest() != file_sha256:
                raise ValueError(
                    f"its SHA-256 is not the one {CURRENT} recorded when it was written: the "
                    "file changed on disk"
                )
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            stored = arrays.pop(DIGEST, None)
            if stored is not None and str(stored) != arrays_sha256(arrays):
                raise ValueError(
                    "its arrays do not match the SHA-256 stored with them: the file changed on disk"
                )
            return self.kind.read(arrays, str(path))
        except EdgeTLError as e:
            raise _Damaged(str(e)) from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            # numpy reads anything that is not .npy/.npz as a pickle, which is never loaded
            raise _Damaged(
                "not a .npz of plain arrays" if "allow_pickle" in str(e) else str(e)
            ) from None

    def save(self, state: Any, op: str) -> Any:
        """Write ``state`` as the next version and make it current; returns it with its
        metadata (version, parent, op, created, backbone). For a change computed from the
        current version, use :meth:`update`, which reads that version under the lock."""
        with self._lock():
            return self._save(state, op)

    def update(self, change: Callable[[Any], Any], op: str) -> Any:
        """Read the current version, compute ``change(current)`` (current is None when
        nothing was learned yet) and write the result as the next version, all under the
        store's lock: a second process changing the bundle at the same time waits and
        applies its change on top of this one's result. Returns the new state.

        Raises:
            EdgeTLError: from ``change`` (nothing is written), or a damaged current version.
        """
        with self._lock():
            return self._save(change(self.load()), op)

    def _save(self, state: Any, op: str) -> Any:
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
        arrays = state.to_arrays()
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{DIGEST: np.array(arrays_sha256(arrays))})
        data = buf.getvalue()
        atomic_write(self._path(version), lambda f: f.write(data))
        self._point(version, hashlib.sha256(data).hexdigest())
        self._prune(version, parent)
        return state

    def _point(self, version: int, file_sha256: str) -> None:
        line = f"{version} {file_sha256}\n".encode()
        atomic_write(self.dir / CURRENT, lambda f: f.write(line))

    def rollback(self, to: int | None = None) -> Any:
        """Make an earlier version current (default: the current one's parent). Nothing is
        deleted. With ``to``, this works even when ``CURRENT`` or the current version is
        damaged: it is the way back.

        Raises:
            EdgeTLError: nothing learned, no earlier version, the version does not exist or
                is damaged itself.
        """
        if to is None and self.current() is None:  # before the lock, which makes the folder
            raise self._nothing_learned()
        if to is not None and not self.versions():
            raise self._nothing_learned()
        with self._lock():
            if to is None:
                cur = self.load()
                if cur is None:
                    raise self._nothing_learned()
                to = cur.meta.get("parent")
                if to is None:
                    raise EdgeTLError(
                        f"{self.kind.noun} version {cur.meta.get('version')} is the first "
                        f"one; there is nothing before it (versions: {self.versions()})"
                    )
            if not self._path(to).is_file():
                raise EdgeTLError(
                    f"{self.kind.noun} version {to} does not exist in {self.dir}; "
                    f"versions: {self.versions()}"
                )
            data = self._path(to).read_bytes()
            state = self.read(self._path(to), hashlib.sha256(data).hexdigest())
            self._point(to, hashlib.sha256(data).hexdigest())
        return state

    def history(self) -> list[dict[str, Any]]:
        """Each version's summary with ``current``; an unreadable one gives ``error``. Works
        when ``CURRENT`` is damaged too (then no version is current)."""
        try:
            cur, cur_sha = self._pointer() or (None, None)
        except EdgeTLError:
            cur, cur_sha = None, None
        out = []
        for v in self.versions():
            try:
                s = self.read(self._path(v), cur_sha if v == cur else None)
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
                with contextlib.suppress(_Damaged):
                    if self._parse(self._path(v)).meta.get("backbone_sha256") == self.backbone:
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

    def _prune(self, current: int, parent: int | None) -> None:
        """Drop the oldest versions beyond ``keep``, never the current one nor its parent
        (where a plain ``rollback`` goes, however old), and temporary files a killed writer
        left (only a lock holder writes, so under the lock every one is such a leftover)."""
        for tmp in self.dir.glob(".*.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        versions = self.versions()
        kept = {current, parent} & set(versions)
        old = [v for v in versions if v not in kept]
        for v in old[: max(0, len(old) + len(kept) - self.kind.keep)]:
            with contextlib.suppress(OSError):
                self._path(v).unlink()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (another process learning on the same bundle waits); never
        in the temporary copy of an archive."""
        refuse_write(self.bundle)
        self.dir.mkdir(parents=True, exist_ok=True)  # heads/<task>/ of a multi-task bundle
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
