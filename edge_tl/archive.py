"""One-file bundles: a deterministic tar of a bundle folder, and a guarded unpack.

Torch-free. :func:`pack` writes the same bytes for the same bundle (members sorted, mtime
0, uid/gid 0, no owner names, modes 0644/0755, regular files and folders only; lock and
temporary files left out; learned ``heads/`` and ``anomaly/`` versions and the signature
kept). :func:`unpack` checks every member before it writes anything: no absolute path, no
``..``, no link, device or fifo, no duplicate name, no member over
:data:`MAX_MEMBER_MB` and no archive over :data:`MAX_TOTAL_MB` (``$EDGE_TL_ARCHIVE_MAX_MB``
and ``$EDGE_TL_ARCHIVE_MAX_MEMBER_MB`` raise them), then extracts with tarfile's ``data``
filter into a temporary folder renamed into place.

Commands that read a bundle take an archive too (:func:`open_bundle` unpacks it into a
temporary folder for the process); commands that write into a bundle (``learn``,
``anomaly``, ``rollback``) refuse an archive: unpack it first.

Example:
    >>> pack("bundles/neu-int8", "neu-int8.tar")  # doctest: +SKIP
    >>> unpack("neu-int8.tar", "bundles/neu-int8-copy")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edge_tl.bundle import MANIFEST, UNPACKED_FROM, atomic_write, read_manifest
from edge_tl.errors import EdgeTLError

__all__ = [
    "MAX_MEMBERS",
    "MAX_MEMBER_MB",
    "MAX_TOTAL_MB",
    "bundle_in",
    "is_archive",
    "open_bundle",
    "pack",
    "refuse_write",
    "unpack",
]

MAX_MEMBER_MB = 2048.0  # one file: above the largest backbone artifact (VGG16 FP32, 528 MB)
MAX_TOTAL_MB = 4096.0  # the whole archive, unpacked
MAX_MEMBERS = 10_000
MEMBER_ENV = "EDGE_TL_ARCHIVE_MAX_MEMBER_MB"
TOTAL_ENV = "EDGE_TL_ARCHIVE_MAX_MB"
_SKIP_SUFFIXES = (".lock",)


def is_archive(path: str | os.PathLike) -> bool:
    """A file that tarfile can read (a bundle is a folder)."""
    p = Path(path)
    try:
        return p.is_file() and tarfile.is_tarfile(p)
    except OSError:
        return False


def _members(bundle: Path) -> list[Path]:
    """What :func:`pack` stores, sorted: every folder and regular file except hidden lock
    and temporary files (``.lock``, ``.NAME.tmp-*``).

    Raises:
        EdgeTLError: a link or special file in the bundle.
    """
    out = []
    for p in sorted(bundle.rglob("*"), key=lambda q: q.relative_to(bundle).as_posix()):
        rel = p.relative_to(bundle)
        if any(part.startswith(".") for part in rel.parts) or p.name.endswith(_SKIP_SUFFIXES):
            continue
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise EdgeTLError(
                f"{p} is a link or special file; a bundle holds regular files only, so remove "
                "it before packing"
            )
        out.append(p)
    return out


def pack(bundle: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write ``bundle`` (checked against its hashes first) as the tar file ``out``,
    atomically. Packing the same bundle twice gives the same bytes.

    Raises:
        EdgeTLError: not a bundle or a damaged one, ``out`` exists (without ``force``) or
            is a folder, or a link in the bundle.
    """
    bundle, out = Path(bundle), Path(out)
    if is_archive(bundle):
        raise EdgeTLError(f"{bundle} is already an archive; pack a bundle folder")
    read_manifest(bundle, verify=True, trust=[])  # a damaged bundle is not shipped
    if out.is_dir():
        raise EdgeTLError(f"{out} is a folder; pass a file name such as {out / bundle.name}.tar")
    if out.exists() and not force:
        raise EdgeTLError(f"{out} already exists; choose another name or pass --force")
    if not out.parent.is_dir():
        raise EdgeTLError(f"folder {out.parent} does not exist; create it first")
    members = _members(bundle)

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in members:
                info = tarfile.TarInfo(p.relative_to(bundle).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if p.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.mode, info.size = 0o644, p.stat().st_size
                    with open(p, "rb") as src:
                        tar.addfile(info, src)

    atomic_write(out, write)
    return out


def _cap(env: str, default: float) -> int:
    """A size cap in bytes: ``$env`` (MB) or ``default``."""
    raw = os.environ.get(env)
    if raw is None:
        return int(default * 1e6)
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise EdgeTLError(f"${env} = {raw!r} is not a positive number of MB; set it or unset it")
    return int(mb * 1e6)


def _check(tar: tarfile.TarFile, archive: Path, max_member: int, max_total: int) -> None:
    """Every member is a plain file or folder with a safe, unique relative name, within the
    caps; raise naming the first that is not."""
    seen: set[str] = set()
    total = 0
    for n, m in enumerate(tar, 1):
        if n > MAX_MEMBERS:
            raise EdgeTLError(f"archive {archive} has over {MAX_MEMBERS} members; not a bundle")
        name = m.name
        where = f"archive {archive}: member {name!r}"
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise EdgeTLError(f"{where} has an absolute path; refused (a bundle is relative)")
        if ".." in parts or "\\" in name or not name:
            raise EdgeTLError(f"{where} leaves the target folder ('..' or '\\'); refused")
        if m.issym() or m.islnk():
            raise EdgeTLError(f"{where} is a link (to {m.linkname!r}); refused")
        if m.ischr() or m.isblk() or m.isfifo():
            raise EdgeTLError(f"{where} is a device or fifo; refused")
        if not (m.isreg() or m.isdir()):
            raise EdgeTLError(f"{where} is not a regular file or folder; refused")
        key = PurePosixPath(*[p for p in parts if p != "."]).as_posix()
        if key == "." and m.isdir():  # `tar -C BUNDLE -cf A.tar .` stores the folder as ./
            continue
        if key in seen:
            raise EdgeTLError(f"{where} appears twice; refused (which one is the bundle's?)")
        seen.add(key)
        if m.size > max_member:
            raise EdgeTLError(
                f"{where} is {m.size / 1e6:.1f} MB, over the {max_member / 1e6:g} MB cap per "
                f"file; refused (raise ${MEMBER_ENV} if the bundle really is that large)"
            )
        total += m.size
        if total > max_total:
            raise EdgeTLError(
                f"archive {archive} unpacks to over {max_total / 1e6:g} MB (at member "
                f"{name!r}); refused (raise ${TOTAL_ENV} if the bundle really is that large)"
            )


def unpack(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    max_member_mb: float | None = None,
    max_total_mb: float | None = None,
) -> Path:
    """Extract ``archive`` into the new folder ``target``, or refuse it having written
    nothing: every member is checked first (see the module docstring), then extracted with
    tarfile's ``data`` filter into a temporary folder beside ``target`` and renamed.

    Args:
        max_member_mb, max_total_mb: caps (default ``$EDGE_TL_ARCHIVE_MAX_MEMBER_MB`` /
            ``$EDGE_TL_ARCHIVE_MAX_MB``, else :data:`MAX_MEMBER_MB` / :data:`MAX_TOTAL_MB`).

    Raises:
        EdgeTLError: not a readable tar, an unsafe member (named), ``target`` exists.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise EdgeTLError(f"archive {archive} does not exist; pass a file from `edge-tl pack`")
    if target.exists():
        raise EdgeTLError(f"{target} already exists; choose a new folder to unpack into")
    if not target.parent.is_dir():
        raise EdgeTLError(f"folder {target.parent} does not exist; create it first")
    max_member = int(max_member_mb * 1e6) if max_member_mb else _cap(MEMBER_ENV, MAX_MEMBER_MB)
    max_total = int(max_total_mb * 1e6) if max_total_mb else _cap(TOTAL_ENV, MAX_TOTAL_MB)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            _check(tar, archive, max_member, max_total)
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = str(e).splitlines()[0].rstrip(":")
        raise EdgeTLError(
            f"{archive} is not a readable tar archive ({why}); pass a file from `edge-tl pack`"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def bundle_in(folder: Path, archive: Path) -> Path:
    """The bundle in an unpacked ``archive``: ``folder`` itself, or the one folder in it
    (an archive of ``BUNDLE/`` rather than of its contents).

    Raises:
        EdgeTLError: no ``manifest.json`` at either place.
    """
    inner = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not (folder / MANIFEST).is_file() and len(inner) == 1 and inner[0].is_dir():
        folder = inner[0]
    if not (folder / MANIFEST).is_file():
        raise EdgeTLError(
            f"archive {archive} holds no bundle ({MANIFEST} at its top); pack a bundle "
            "folder with `edge-tl pack BUNDLE OUT.tar`"
        )
    return folder


def open_bundle(archive: str | os.PathLike) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Unpack ``archive`` into a temporary folder for reading: the folder object (the copy
    is removed with it) and the bundle's path inside it (the top, or the one folder an
    archive of ``BUNDLE/`` holds). The copy is marked with :data:`UNPACKED_FROM`, so that
    learning there is refused (:func:`refuse_write`).

    Raises:
        EdgeTLError: as :func:`unpack`, or an archive without a bundle in it.
    """
    archive = Path(archive)
    tmp = tempfile.TemporaryDirectory(prefix="edge_tl-archive-")
    try:
        folder = bundle_in(unpack(archive, Path(tmp.name) / archive.name), archive)
        (folder / UNPACKED_FROM).write_text(str(archive.resolve()) + "\n")
    except BaseException:
        tmp.cleanup()
        raise
    return tmp, folder


def refuse_write(bundle: str | os.PathLike) -> None:
    """Raise when ``bundle`` is a temporary copy of an archive (learning there would be lost).

    Raises:
        EdgeTLError: naming the archive and the way to learn on it.
    """
    marker = Path(bundle) / UNPACKED_FROM
    if marker.is_file():
        archive = marker.read_text().strip()
        raise EdgeTLError(
            f"{archive} is an archive, and learning writes into the bundle; unpack it with "
            f"`edge-tl unpack {archive} DIR` and use DIR"
        )
