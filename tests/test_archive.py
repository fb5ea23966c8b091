"""One-file bundles: `edge-tl pack` writes the same bytes twice, every reading command takes
the archive, and a crafted archive is refused member by member with nothing written outside
(or inside) the target."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import NEU

IMAGE = NEU / "scratches" / "scratches_1.jpg"


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGE_TL_QUIET": "1", **(env or {})},
        timeout=600,
    )


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("edge-tl: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def craft(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A tar with ``members``: (name, data) regular files or ready TarInfo headers."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def info(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, link
    return i


MANIFEST = ("manifest.json", b"{}")


@pytest.mark.parametrize(
    "case, words",
    [
        ("dotdot", ["'../escaped'", "leaves the target"]),
        ("absolute", ["absolute path"]),
        ("symlink", ["'link'", "is a link"]),
        ("hardlink", ["'hard'", "is a link"]),
        ("fifo", ["'pipe'", "device or fifo"]),
        ("device", ["'dev'", "device or fifo"]),
        ("duplicate", ["'manifest.json'", "appears twice"]),
        ("oversized", ["'big.bin'", "cap per file", "EDGE_TL_ARCHIVE_MAX_MEMBER_MB"]),
        ("total", ["unpacks to over", "EDGE_TL_ARCHIVE_MAX_MB"]),
    ],
)
def test_a_crafted_archive_is_refused_naming_the_member_and_writes_nothing(tmp_path, case, words):
    outside = tmp_path / "escaped"  # where '../escaped' and the absolute path would land
    members = {
        "dotdot": [MANIFEST, ("../escaped", b"x")],
        "absolute": [MANIFEST, (str(outside), b"x")],
        "symlink": [MANIFEST, info("link", tarfile.SYMTYPE, "/etc/passwd")],
        "hardlink": [MANIFEST, info("hard", tarfile.LNKTYPE, "/etc/passwd")],
        "fifo": [MANIFEST, info("pipe", tarfile.FIFOTYPE)],
        "device": [MANIFEST, info("dev", tarfile.CHRTYPE)],
        "duplicate": [MANIFEST, ("manifest.json", b'{"evil": 1}')],
        "oversized": [MANIFEST, ("big.bin", b"\0" * 3000)],
        "total": [MANIFEST, ("a.bin", b"\0" * 1500), ("b.bin", b"\0" * 1500)],
    }[case]
    archive = craft(tmp_path / "crafted.tar", members)
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)
    caps = {"EDGE_TL_ARCHIVE_MAX_MEMBER_MB": "0.002", "EDGE_TL_ARCHIVE_MAX_MB": "0.0025"}
    res = cli("unpack", archive, work / "out", env=caps)
    one_line_error(res, str(archive), *words)
    assert tree(tmp_path) == before
    if case in ("dotdot", "symlink"):  # a command that reads a bundle refuses it alike
        one_line_error(cli("inspect", archive, env=caps), *words)
        assert tree(tmp_path) == before


def test_archives_made_with_tar_itself_unpack(tmp_path):
    """`tar -C BUNDLE -cf A.tar .` stores ./ and ./NAME; that is not an escape."""
    from edge_tl.archive import unpack

    archive = craft(
        tmp_path / "a.tar",
        [info("./", tarfile.DIRTYPE), ("./manifest.json", b"{}"), ("./heads/CURRENT", b"1\n")],
    )
    out = unpack(archive, tmp_path / "out")
    assert tree(out) == ["heads", "heads/CURRENT", "manifest.json"]


@pytest.mark.slow
def test_a_packed_bundle_is_deterministic_and_answers_like_the_folder(bundles, tmp_path, neu_small):
    b = tmp_path / "b"
    shutil.copytree(bundles["onnx-fp32"], b)
    support = tmp_path / "support"
    for c in ("crazing", "patches"):
        (support / c).mkdir(parents=True)
        for p in sorted((neu_small / c).iterdir())[:3]:
            shutil.copy(p, support / c / p.name)
    assert cli("learn", b, support).returncode == 0  # learned state travels with the bundle
    assert (b / "heads" / ".lock").exists()

    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    assert cli("pack", b, one).returncode == 0
    os.utime(b / "head.npz", (1e9, 1e9))  # times, owners and order must not matter
    assert cli("pack", b, two).returncode == 0
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "heads/v0001.npz" in names
    assert not [n for n in names if n.endswith(".lock") or "/." in n or n.startswith(".")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert all(m.isreg() or m.isdir() for m in members)

    folder = cli("predict", b, IMAGE, "--json")
    packed = cli("predict", one, IMAGE, "--json")
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout) == json.loads(folder.stdout)
    assert json.loads(packed.stdout)[0]["label"] in ("crazing", "patches", "unknown")
    assert cli("rollback", one, "--list").returncode == 0

    from edge_tl.errors import EdgeTLError
    from edge_tl.runtime import Model

    model = Model(one)  # the library takes the archive too, as a read-only copy
    assert model.predict([IMAGE])[0].to_dict() == json.loads(folder.stdout)[0]
    copy = model.path
    with pytest.raises(EdgeTLError, match="learning writes into the bundle"):
        model.classifier.remove_class("crazing")
    del model
    import gc

    gc.collect()
    assert not copy.exists()

    one_line_error(cli("learn", one, support, "--add"), "writes into the bundle", "edge-tl unpack")
    assert one.read_bytes() == two.read_bytes()
    out = tmp_path / "unpacked"
    res = cli("unpack", one, out)
    assert res.returncode == 0, res.stderr
    assert cli("learn", out, support, "--add").returncode == 0
    one_line_error(cli("pack", b, one), "already exists", "--force")
