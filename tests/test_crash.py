"""Crash safety and concurrency on real bundles and real images: two processes learning on
one bundle at once (no lost update), damaged version files named with the way back by the
CLI, ``kill -9`` at random points (a short run of ``benchmarks/crash.py``), one model
shared by 8 threads, learning while other threads predict, and a short soak."""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_tl.runtime import Model
from edge_tl.runtime.classifier import _classify
from tests.conftest import NEU, SHARED, need
from tests.test_cli import ENV, _one_line_error, cli

ROOT = Path(__file__).resolve().parents[1]
TILES = SHARED / "magnetic_tile"


def _benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (registered, as dataclasses need)."""
    key = f"_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _images(src: Path, dst: Path, start: int, n: int) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir())[start : start + n]:
        shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    """A private copy of the ONNX FP32 bundle (learning writes into it)."""
    return Path(shutil.copytree(bundles["onnx-fp32"], tmp_path / "bundle"))


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_tl.cli", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---- two processes, one bundle ------------------------------------------------------------
@pytest.mark.slow
def test_two_learn_add_started_together_both_land(bundle, tmp_path):
    a = _images(need(NEU) / "inclusion", tmp_path / "a" / "inclusion", 0, 40).parent
    b = _images(NEU / "pitted_surface", tmp_path / "b" / "pitted_surface", 0, 40).parent
    procs = [_start("learn", bundle, d, "--add") for d in (a, b)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    head = Model(bundle).classifier.state
    assert {"inclusion", "pitted_surface"} <= set(head.labels)  # neither change lost
    assert head.counts()["inclusion"] == 40 and head.counts()["pitted_surface"] == 40
    # the second applied its change on top of the first: v2's parent is v1
    assert head.meta["version"] == 2 and head.meta["parent"] == 1


@pytest.mark.slow
def test_two_anomaly_add_started_together_both_land(bundle, tmp_path):
    good = need(TILES) / "train" / "good"
    Model(bundle).detector.fit(_images(good, tmp_path / "g0", 0, 4))
    dirs = [_images(good, tmp_path / f"g{i}", 4 * i, 4) for i in (1, 2)]
    procs = [_start("anomaly", bundle, d, "--add") for d in dirs]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    bank = Model(bundle).detector.state
    assert len(bank.loo_maps) == 12  # 4 + 4 + 4 good images: both additions kept
    assert bank.meta["version"] == 3 and bank.meta["parent"] == 2


# ---- damaged state, through the CLI ---------------------------------------------------------
def _cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_damaged_current_head_is_named_and_the_way_back_works(bundle, tmp_path):
    model = Model(bundle)
    support = _images(need(NEU) / "inclusion", tmp_path / "s" / "inclusion", 0, 3).parent
    model.classifier.add(support)
    model.classifier.remove_class("inclusion")
    image = next((NEU / "scratches").iterdir())
    before = cli("predict", bundle, image, "--json")
    head = bundle / "heads" / "v0002.npz"
    data = head.read_bytes()
    # one flipped byte in the middle of the file (inside the stored arrays)
    i = len(data) // 2
    head.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    _one_line_error(cli("predict", bundle, image), "v0002.npz", "--to N", "intact: [1]")
    # the file cut to half its size: every command names it and the way back
    head.write_bytes(data[: len(data) // 2])
    res = cli("predict", bundle, image)
    _one_line_error(res, "v0002.npz", "rollback", "--to N", "intact: [1]")
    assert "Traceback" not in res.stderr
    listing = cli("rollback", bundle, "--list")
    assert listing.returncode == 0, listing.stderr
    assert "v1" in listing.stdout and "v2: unreadable" in listing.stdout
    res = cli("rollback", bundle)  # its parent is unknown: the message says what to do
    _one_line_error(res, "v0002.npz", "--to N", "intact: [1]")
    res = cli("rollback", bundle, "--to", "1")
    assert res.returncode == 0, res.stderr
    assert "head v1 is current again" in res.stdout
    assert cli("verify", bundle).returncode == 0
    after = cli("predict", bundle, image, "--json")
    assert after.returncode == 0 and after.stdout != before.stdout  # v1 knows "inclusion"


@pytest.mark.slow
def test_a_damaged_bank_or_pointer_is_named_and_the_way_back_works(bundle, tmp_path):
    good = need(TILES) / "train" / "good"
    model = Model(bundle)
    model.detector.fit(_images(good, tmp_path / "g0", 0, 4))
    model.detector.add(_images(good, tmp_path / "g1", 4, 2))
    image = next((TILES / "test" / "good").iterdir())
    _cut_half(bundle / "anomaly" / "v0002.npz")
    for args in (("predict", bundle, image), ("verify", bundle)):
        res = cli(*args)
        _one_line_error(res, "anomaly/v0002.npz", "--anomaly --to N", "intact: [1]")
        assert "Traceback" not in res.stderr
    assert cli("rollback", bundle, "--anomaly", "--to", "1").returncode == 0
    # CURRENT cut short in the middle of its hash
    line = (bundle / "anomaly" / "CURRENT").read_text()
    (bundle / "anomaly" / "CURRENT").write_text(line[:30])
    res = cli("predict", bundle, image)
    _one_line_error(res, "anomaly/CURRENT is damaged", "--anomaly --to N", "intact: [1]")
    listing = cli("rollback", bundle, "--anomaly", "--list")
    assert listing.returncode == 0 and "v1" in listing.stdout, listing.stderr
    assert "no version is current" in listing.stdout
    assert cli("rollback", bundle, "--anomaly", "--to", "1").returncode == 0
    assert cli("predict", bundle, image).returncode == 0


# ---- kill -9 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_points_leaves_the_old_or_the_new_state(bundles, tmp_path):
    crash = _benchmark("crash")
    folders = crash.make_folders(tmp_path / "images", per_class=3, shared=need(SHARED))
    base = crash.prepare(bundles["onnx-fp32"], tmp_path / "base", folders)
    tallies = crash.run_trials(base, tmp_path, folders, trials=8, seed=1)
    assert sum(t.trials for t in tallies.values()) == 8
    for op, t in tallies.items():
        assert t.counts["corrupt"] == 0, (op, t.examples)
        assert t.counts["old"] + t.counts["new"] + t.counts["refused"] == t.trials


# ---- threads -------------------------------------------------------------------------------
def _answers(model: Model, images: list[Path]) -> dict[str, tuple[str, float]]:
    return {str(p): (r.label, r.score) for p in images for r in model.predict([p])}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["onnx-fp32", "openvino-int8"])
def test_eight_threads_sharing_one_model_answer_as_one_thread(bundles, neu_small, recipe):
    model = Model(bundles[recipe], self_test=False)  # the answers are compared, not judged
    images = sorted(neu_small.rglob("*.jpg"))[::2]
    alone = _answers(model, images)

    def worker(seed: int) -> dict[str, tuple[str, float]]:
        order = list(images)
        random.Random(seed).shuffle(order)
        return _answers(model, order)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for got in results:
        assert got.keys() == alone.keys()
        for k, (label, score) in got.items():
            assert label == alone[k][0] and score == pytest.approx(alone[k][1], abs=1e-6), k


@pytest.mark.slow
def test_learning_while_threads_predict_never_mixes_two_heads(bundle, neu_small, tmp_path):
    model = Model(bundle)
    images = sorted(neu_small.rglob("*.jpg"))[::4]
    emb = {str(p): model.embed([p]) for p in images}
    new = _images(need(NEU) / "inclusion", tmp_path / "new" / "inclusion", 0, 3).parent
    states = [model.classifier.state]
    stop = threading.Event()
    seen: list[tuple[str, str, float]] = []

    def predictor(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            p = rng.choice(images)
            r = model.predict([p])[0]
            seen.append((str(p), r.label, r.score))

    threads = [threading.Thread(target=predictor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            states.append(model.classifier.add(new))
            states.append(model.classifier.remove_class("inclusion"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 0

    def answer(state, p: str) -> tuple[str, float]:
        proba, pred, _ = _classify(state, emb[p])
        label = "unknown" if pred[0] < 0 else state.labels[int(proba[0].argmax())]
        return label, float(proba[0].max())

    allowed = {p: [answer(s, p) for s in states] for p in emb}
    for p, label, score in seen:
        assert any(label == a and score == pytest.approx(b, abs=1e-5) for a, b in allowed[p]), (
            p,
            label,
            score,
            allowed[p],
        )


# ---- soak ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_short_soak_keeps_state_and_heap_bounded(bundle, neu_small):
    soak = _benchmark("soak")
    images = [str(p) for p in sorted(neu_small.rglob("*.jpg"))[:12]]
    learn = [str(p) for p in sorted((need(NEU) / "inclusion").iterdir())[:3]]
    r = soak.soak(bundle, images, learn, n=150, learn_every=25, window=50)
    assert r["learn_steps"] == 5
    before, after = r["sizes"]
    # the learned state is back to its size after each add/remove pair, the versions on
    # disk stop at the kept count, and the heap does not grow with the predictions
    assert (after["classes"], after["support"]) == (before["classes"], before["support"])
    assert after["heads_files"] <= 20 + 2  # versions kept, CURRENT, .lock
    assert after["gc_objects"] - before["gc_objects"] < 2000, (before, after)


_BLAS_CHECK = """
import sys, threading
from pathlib import Path
from threadpoolctl import threadpool_info
from edge_tl.runtime.patchcore import one_blas_thread

def blas():
    return [i["num_threads"] for i in threadpool_info()
            if i["user_api"] == "blas" and "numpy" in Path(i["filepath"]).parent.name]

before = blas()
if not before or max(before) == 1:
    sys.exit(3)  # numpy's BLAS runs one thread here: nothing to limit or restore
entered, inside = threading.Barrier(4), []

def scorer(i):
    with one_blas_thread():
        entered.wait()  # all four inside at once, then they leave in their own order
        inside.append(blas())
        threading.Event().wait(0.01 * i)

threads = [threading.Thread(target=scorer, args=(i,)) for i in (3, 1, 2, 0)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all(max(n) == 1 for n in inside) and blas() == before, (before, inside, blas())
"""


def test_the_blas_limit_of_overlapping_scorers_is_restored_by_the_last_to_leave():
    """In a fresh interpreter: OpenBLAS reports its thread count per calling thread once the
    main thread has set a limit, so a long test process reads other threads' counts wrong."""
    res = subprocess.run([sys.executable, "-c", _BLAS_CHECK], capture_output=True, text=True)
    if res.returncode == 3:
        pytest.skip("numpy's BLAS runs one thread here: nothing to limit or restore")
    assert res.returncode == 0, res.stderr[-2000:]
