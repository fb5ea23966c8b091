"""Write, read and verify bundles: one folder with ``manifest.json``, the artifact and the head.

Torch-free. :func:`read_manifest` is the one place a bundle is checked: every listed file's
SHA-256 and, with trusted keys, the signature ``manifest.sig`` (:mod:`edge_tl.signing`).
Writes are atomic: a folder goes to a temporary folder beside the destination, renamed into
place only when complete (:func:`atomic_folder`); a file goes to a temporary file, fsynced
and renamed (:func:`atomic_write`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from edge_tl.errors import EdgeTLError
from edge_tl.spec import Manifest

if TYPE_CHECKING:
    from edge_tl.signing import Trust

__all__ = [
    "MANIFEST",
    "SIGNATURE",
    "UNPACKED_FROM",
    "atomic_folder",
    "atomic_write",
    "check_destination",
    "hash_files",
    "read_json",
    "read_manifest",
    "sha256",
    "verify_files",
    "write_manifest",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # detached signature of manifest.json; not in manifest.files
UNPACKED_FROM = ".unpacked-from"  # in a read-only copy of an archive: the archive's path
# --force replaces only folders edge_tl wrote
OWN_MARKERS = (MANIFEST, "run.json", "compare.json", "select.json")


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path, exclude: tuple[str, ...] = (MANIFEST, SIGNATURE)) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative POSIX paths), except ``exclude``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256(p)
    return out


def check_destination(out: Path, force: bool, what: str = "bundle") -> None:
    """Refuse to overwrite an existing path unless ``force``; fail early, before any work."""
    if out.exists() and not force:
        raise EdgeTLError(
            f"{out} already exists; choose another --out or pass --force to replace it"
        )
    if out.exists() and not (out.is_dir() and any((out / m).is_file() for m in OWN_MARKERS)):
        raise EdgeTLError(
            f"{out} exists and is not an edge_tl {what}, so --force will not replace it; "
            "choose another --out"
        )
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise EdgeTLError(f"{parent} is a file, so {out} cannot be created; choose another --out")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeTLError(f"cannot write in {parent} (permission denied); choose another --out")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success rename it to ``out``, on error remove it.

    With ``force`` an existing ``out`` is replaced only after the new folder is complete,
    so a failed write leaves the old one intact.

    Example:
        >>> with atomic_folder("/tmp/my_bundle", force=True) as tmp:  # doctest: +SKIP
        ...     (tmp / "manifest.json").write_text("{}")
    """
    out = Path(out)
    check_destination(out, force)
    missing = [p for p in out.parents if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a device service may run as another user
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in missing:  # innermost first: remove the folders this call created
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(binary file)``: a temporary file in the same folder,
    fsynced, renamed over ``path``, then the folder fsynced. A crash at any point leaves
    the old file (or none), never half of the new one, and no temporary file behind an
    error."""
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


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json``; ``manifest.files`` must already hold the hashes."""
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_json(folder: Path, name: str, kind: str, command: str, fix: str) -> dict:
    """``folder/name``, a JSON object, with one-line errors when it is missing, unreadable,
    not UTF-8 JSON or not an object."""
    path = folder / name
    if not path.is_file():
        raise EdgeTLError(
            f"{folder} is not a {kind} (no {name}); pass a folder written by `{command}`"
        )
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise EdgeTLError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise EdgeTLError(f"{path} is not valid JSON ({why}); {fix}") from None
    if not isinstance(data, dict):
        raise EdgeTLError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_manifest(
    bundle: str | os.PathLike,
    verify: bool = True,
    trust: Trust | None = None,
    identity: str | None = None,
) -> Manifest:
    """Read a bundle's manifest and (by default) check every file's SHA-256; with trusted
    keys, first its signature.

    Args:
        verify: check the files (and the signature); False reads the manifest alone.
        trust: trusted public keys (``.pub`` paths, folders of them, key objects); None
            reads ``$EDGE_TL_TRUST``. With none, a bundle is checked by its hashes only.
        identity: where the bundle came from, for the replay guard (default: its resolved
            path; for the copy of an archive, the archive's).

    Raises:
        EdgeTLError: not a bundle, unsupported version, missing or altered file; with
            trusted keys also unsigned, signed by another key, a manifest changed after
            signing, or an older signature than one accepted before at this path.
    """
    from edge_tl import signing

    bundle = Path(bundle)
    keys = signing.trusted_keys(trust) if verify else None  # a bad --trust fails first
    text = _read_bytes(bundle)
    sig = signing.check_signature(bundle, text, keys) if keys else None
    fix = "re-export the bundle"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise EdgeTLError(f"{bundle / MANIFEST} is not valid JSON ({why}); {fix}") from None
    if not isinstance(data, dict):
        raise EdgeTLError(f"{bundle / MANIFEST} is not a JSON object; {fix}")
    try:
        manifest = Manifest.from_dict(data)
    except EdgeTLError as e:
        raise EdgeTLError(f"bundle {bundle}: {e}") from None
    if verify:
        verify_files(bundle, manifest.files, signed=sig is not None)
    if sig is not None:
        if identity is None and (bundle / UNPACKED_FROM).is_file():
            identity = (bundle / UNPACKED_FROM).read_text().strip()
        signing.remember(identity or str(bundle.resolve()), sig)
    return manifest


def _read_bytes(bundle: Path) -> bytes:
    path = bundle / MANIFEST
    if not path.is_file():
        raise EdgeTLError(
            f"{bundle} is not a bundle (no {MANIFEST}); pass a folder written by `edge-tl export`"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise EdgeTLError(f"{path} cannot be read ({e.strerror}); re-copy the bundle") from None


def verify_files(bundle: Path, files: dict[str, str], signed: bool = False) -> None:
    """Raise if a listed file is missing or its SHA-256 differs (``signed``: the manifest's
    signature was checked, so the change came after signing)."""
    when = "after the bundle was signed" if signed else "corrupted or modified"
    for rel, digest in files.items():
        p = bundle / rel
        try:
            if not p.is_file():
                raise EdgeTLError(
                    f"bundle {bundle}: {rel} is missing; re-copy or re-export the bundle"
                )
            actual = sha256(p)
        except OSError as e:  # unreadable, or a name the file system refuses
            raise EdgeTLError(
                f"bundle {bundle}: {rel[:80]} cannot be read ({e.strerror}); re-copy or "
                "re-export the bundle"
            ) from None
        if actual != digest:
            raise EdgeTLError(
                f"bundle {bundle}: {rel} does not match its SHA-256 in manifest.json "
                f"({when}); re-copy or re-export the bundle"
            )
