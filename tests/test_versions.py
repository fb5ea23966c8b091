"""Learned state survives a power cut at any point of a write: a version file cut short, a
crash between the version and ``CURRENT``, a temporary file left by a killed process, and
pruning interrupted. The store is the one heads and anomaly banks share."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import learner, versions
from edge_tl.runtime.versions import CURRENT, StoreKind, VersionedStore
from edge_tl.spec import Artifact, Manifest, Preprocess, Source


def _manifest() -> Manifest:
    pre = Preprocess(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Manifest(
        format_version=1,
        edge_tl_version="test",
        backbone="efficientnet_lite0",
        input_name="image",
        preprocess=pre,
        outputs={"embedding": ["batch", 4]},
        artifact=Artifact("onnx", "int8", ("backbone.onnx",), "ort-int8"),
        labels=["a", "b"],
        head=None,
        metrics={},
        source=Source(kind="imagenet"),
        files={"backbone.onnx": "0" * 64},
    )


def _state(seed: int) -> learner.HeadState:
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(10, 4))).astype(np.float32)
    return learner.learn(x, ["a"] * 5 + ["b"] * 5, "prototype")


def _store(tmp_path: Path, keep: int = 20) -> VersionedStore:
    kind = StoreKind("heads", "head", "edge-tl learn", "", learner.HeadState.from_arrays, keep)
    return VersionedStore(tmp_path, _manifest(), kind)


def _files(store: VersionedStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.dir.iterdir()) if p.name != ".lock"}


def _same(a: learner.HeadState, b: learner.HeadState) -> bool:
    return a.labels == b.labels and np.array_equal(a.support_x, b.support_x)


def test_a_version_cut_short_mid_write_leaves_the_previous_one_in_force(tmp_path, monkeypatch):
    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    before = _files(store)
    real = np.savez

    def half_then_power_cut(f, **arrays):
        buf = io.BytesIO()
        real(buf, **arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # bytes on disk, then the cut
        raise OSError("simulated power cut")

    monkeypatch.setattr(np, "savez", half_then_power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.save(_state(1), "add")
    monkeypatch.undo()
    assert _files(store) == before  # no half file, no temporary file, CURRENT unchanged
    assert store.current() == 1 and _same(store.load(), first)


def test_a_crash_between_the_version_and_current_keeps_the_old_version_current(
    tmp_path, monkeypatch
):
    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    real = versions.atomic_write

    def crash_on_current(path, write):
        if path.name == CURRENT:
            raise OSError("simulated power cut before CURRENT")
        real(path, write)

    monkeypatch.setattr(versions, "atomic_write", crash_on_current)
    with pytest.raises(OSError, match="before CURRENT"):
        store.save(_state(1), "add")
    monkeypatch.undo()
    # the complete v2 is on disk but was never made current: v1 stays in force
    assert store.versions() == [1, 2] and store.current() == 1
    assert _same(store.load(), first)
    assert [(h["version"], h["current"]) for h in store.history()] == [(1, True), (2, False)]
    # the next change numbers past it and names v1 as its parent; v2 can still be chosen
    third = store.save(_state(2), "add")
    assert third.meta["version"] == 3 and third.meta["parent"] == 1
    assert _same(store.rollback(to=2), _state(1)) and store.current() == 2


def test_a_temporary_file_left_by_a_killed_process_is_ignored(tmp_path):
    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    buf = io.BytesIO()
    np.savez(buf, **_state(1).to_arrays())
    stale = store.dir / ".v0002.npz.tmp-dead"  # what a kill -9 during a write leaves
    stale.write_bytes(buf.getvalue()[:100])
    assert store.versions() == [1] and _same(store.load(), first)
    assert [h["version"] for h in store.history()] == [1]
    second = store.save(_state(1), "add")
    assert second.meta["version"] == 2 and _same(store.load(), second)
    assert not stale.exists()  # the next write, holding the lock, clears what was left


def test_interrupted_pruning_keeps_the_new_version_and_the_next_write_prunes(tmp_path, monkeypatch):
    store = _store(tmp_path, keep=2)
    for seed in range(2):
        store.save(_state(seed), "learn")
    real_unlink = Path.unlink

    def cut(self, *a, **k):
        if self.name.startswith("v") and self.suffix == ".npz":
            raise OSError("simulated power cut while pruning")
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", cut)
    third = store.save(_state(2), "add")  # pruning v1 fails: the write itself stands
    monkeypatch.undo()
    assert store.current() == 3 and _same(store.load(), third)
    assert store.versions() == [1, 2, 3]
    assert all("error" not in h for h in store.history())
    store.save(_state(3), "add")
    assert store.versions() == [3, 4]  # the next write prunes down to keep=2


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped bytes"])
def test_a_damaged_current_version_is_named_with_the_way_back(tmp_path, damage):
    from edge_tl.errors import EdgeTLError

    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    store.save(_state(1), "add")
    path = store.dir / "v0002.npz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        i = data.index(b"support_x.npy") + 200  # inside an array's stored bytes
        path.write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i : i + 2]) + data[i + 2 :])
    with pytest.raises(EdgeTLError, match=r"v0002.npz is not a readable head state.*--to N.*\[1\]"):
        store.load()
    listing = store.history()  # listing works: the damaged version is named, not fatal
    assert listing[0]["version"] == 1 and "error" in listing[1]
    assert _same(store.rollback(to=1), first) and _same(store.load(), first)


def test_a_garbage_current_pointer_can_still_be_rolled_back(tmp_path):
    from edge_tl.errors import EdgeTLError

    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    store.save(_state(1), "add")
    (store.dir / CURRENT).write_text("abc\n")
    with pytest.raises(EdgeTLError, match=r"CURRENT is damaged.*'abc'.*--to N.*\[1, 2\]"):
        store.load()
    assert [h["current"] for h in store.history()] == [False, False]
    assert _same(store.rollback(to=1), first) and store.current() == 1


def _resave(path: Path, **changes: np.ndarray) -> None:
    """Rewrite a version file with some arrays changed: a valid .npz numpy reads without
    complaint (fresh zip CRCs), as a faulty disk controller or a stray tool would leave it."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def test_a_changed_value_numpy_still_reads_is_caught_by_the_versions_own_hash(tmp_path):
    from edge_tl.errors import EdgeTLError

    store = _store(tmp_path)
    first = store.save(_state(0), "learn")
    store.save(_state(1), "add")
    old = store.dir / "v0001.npz"
    with np.load(old) as z:
        x = z["support_x"].copy()
    x[3, 1] = np.nextafter(x[3, 1], np.float32(2))  # one bit of one value
    _resave(old, support_x=x)
    np.load(old)["support_x"]  # numpy reads it: only the hash can tell
    with pytest.raises(EdgeTLError, match=r"v0001.npz is not a readable.*arrays do not match"):
        store.load(1)
    with pytest.raises(EdgeTLError, match=r"v0001.npz is not a readable.*arrays do not match"):
        store.rollback(to=1)
    assert store.current() == 2  # the refused rollback changed nothing
    listing = store.history()
    assert "error" in listing[0] and listing[1]["current"]
    # the current file rewritten whole, arrays and their hash alike: CURRENT's file hash
    cur = store.dir / "v0002.npz"
    _resave(cur, quantile=np.array(0.5))
    with pytest.raises(EdgeTLError, match=r"v0002.npz.*SHA-256 is not the one CURRENT recorded"):
        store.load()
    del first


def test_a_current_pointer_cut_to_another_number_is_caught(tmp_path):
    from edge_tl.errors import EdgeTLError

    store = _store(tmp_path)
    for seed in range(12):
        store.save(_state(seed), "add")
    line = (store.dir / CURRENT).read_text()
    assert line.startswith("12 ")
    (store.dir / CURRENT).write_text(line[:1])  # "1": a version that exists
    with pytest.raises(EdgeTLError, match=r"CURRENT is damaged|SHA-256"):
        store.load()
    (store.dir / CURRENT).write_text(line[:40])  # the hash cut short
    with pytest.raises(EdgeTLError, match=r"CURRENT is damaged.*--to N"):
        store.load()
    assert _same(store.rollback(to=12), _state(11)) and store.current() == 12


def test_pruning_keeps_the_parent_a_plain_rollback_goes_to(tmp_path):
    store = _store(tmp_path, keep=3)
    base = store.save(_state(0), "learn")
    for seed in range(1, 6):  # learn on top of v1, then go back to it, again and again
        store.save(_state(seed), "add")
        assert _same(store.rollback(), base) and store.current() == 1
    assert 1 in store.versions() and len(store.versions()) == 3


def test_a_lost_current_pointer_is_named_never_answered_with_the_exported_head(tmp_path):
    """A partial copy or a cleanup script that drops ``CURRENT`` must not turn a camera's
    learned head (or bank) back into the exported one without a word."""
    store = _store(tmp_path)
    store.save(_state(0), "learn")
    (store.dir / CURRENT).unlink()
    assert store.load() is None  # one version, no pointer: a first write cut before it
    second = store.save(_state(1), "add")
    (store.dir / CURRENT).unlink()
    with pytest.raises(EdgeTLError, match=r"CURRENT is missing.*rollback .*--to N"):
        store.load()
    assert [h.get("current") for h in store.history()] == [False, False]
    assert _same(store.rollback(to=2), second) and _same(store.load(), second)
    (store.dir / CURRENT).unlink()
    (store.dir / CURRENT).mkdir()
    with pytest.raises(EdgeTLError, match="is not a file; remove it"):
        store.load()
