"""``edge-tl serve`` as a user runs it: a real server process on a free loopback port, real
bundles (the session's exported linear probe on NEU-DET, and a copy with an anomaly bank
built from real magnetic tiles), driven by a standard Open Inference Protocol client
(``tritonclient.http``) and by plain HTTP: conformance, protocol errors, the token, limits
and bad uploads leaving the bundle unchanged, learning over HTTP seen by the next
prediction, ``kill -9`` during a learning call, and a graceful stop."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.conftest import NEU, SHARED, need  # noqa: E402

TOKEN = "live-test-token-0123456789abcdef"
TILES = SHARED / "magnetic_tile"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``edge-tl serve BUNDLES...`` in a child process on a free loopback port; its log
    (JSON lines) in ``log``."""

    def __init__(self, bundles: list[Path], work: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = work / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.log = work / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "edge_tl.cli", "serve", *map(str, bundles)]
        cmd += ["--port", str(self.port), "--token-file", str(self.token_file), *flags]
        env = {**os.environ, "EDGE_TL_QUIET": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.text()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s: {self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def infer_json(url: str, name: str, paths: list[Path], **params) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(paths)],
                "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
            }
        ],
        "parameters": params,
    }
    return httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)


def snapshot(bundle: Path) -> dict[str, str]:
    """SHA-256 of every file of the bundle but lock files (what a refused call must not
    change)."""
    return {
        str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def neu(cls: str, start: int, n: int) -> list[Path]:
    return sorted((need(NEU) / cls).iterdir())[start : start + n]


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    """A server on two private bundle copies: ``cls`` (the exported linear probe on
    crazing/patches/scratches) and ``tiles`` (the same backbone with an anomaly bank of 12
    good magnetic tiles)."""
    from edge_tl.runtime import Model

    work = tmp_path_factory.mktemp("serve")
    cls = Path(shutil.copytree(bundles["onnx-fp32"], work / "cls"))
    tiles = Path(shutil.copytree(bundles["onnx-fp32"], work / "tiles"))
    good = sorted((need(TILES) / "train" / "good").iterdir())
    Model(tiles).detector.fit([str(p) for p in good[:12]], false_alarm=0.1)
    server = Server([cls, tiles], work, "--max-body-mb", "2")
    try:
        server.wait_ready()
        yield {"server": server, "url": server.url, "cls": cls, "tiles": tiles, "good": good}
    finally:
        server.stop()


# ---- protocol conformance ----------------------------------------------------------------
@pytest.mark.slow
def test_a_standard_client_reads_health_metadata_and_infers(served):
    tc = pytest.importorskip("tritonclient.http")
    from edge_tl.runtime import Model

    client = tc.InferenceServerClient(served["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cls") and client.is_model_ready("tiles")
    assert client.get_server_metadata()["name"] == "edge_tl"
    meta = client.get_model_metadata("cls")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["parameters"]["kind"] == "classifier"
    model = Model(served["cls"])
    assert meta["parameters"]["classes"] == model.classifier.labels

    images = neu("crazing", 20, 2) + neu("patches", 20, 1)
    data = np.array([p.read_bytes() for p in images], dtype=np.object_)
    inp = tc.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(data)  # the binary-data extension
    res = client.infer("cls", [inp], parameters={"top_k": 2})
    expected = model.predict([str(p) for p in images], top_k=2)
    assert [s.decode() for s in res.as_numpy("label")] == [p.label for p in expected]
    np.testing.assert_allclose(res.as_numpy("score"), [p.score for p in expected], atol=1e-5)
    assert res.as_numpy("top_k_scores").shape == (3, 2)
    assert [s.decode() for s in res.as_numpy("top_k_labels")[:, 0]] == [p.label for p in expected]

    # JSON with base64 elements, one output asked for in JSON
    b64 = np.array([base64.b64encode(p.read_bytes()).decode() for p in images], dtype=np.object_)
    inp = tc.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(b64, binary_data=False)
    out = tc.InferRequestedOutput("label", binary_data=False)
    res = client.infer("cls", [inp], outputs=[out])
    assert res.get_response()["outputs"][0]["data"] == [p.label for p in expected]

    meta = client.get_model_metadata("tiles")
    assert meta["parameters"]["kind"] == "anomaly"
    h, w = meta["parameters"]["grid"]
    tile = sorted((TILES / "test" / "blowhole").iterdir())[:1]
    inp = tc.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([tile[0].read_bytes()], dtype=np.object_))
    res = client.infer("tiles", [inp], parameters={"map": True})
    verdict = Model(served["tiles"]).detector.predict([str(tile[0])])[0]
    assert res.as_numpy("verdict")[0].decode() == verdict.verdict
    assert res.as_numpy("score")[0] == pytest.approx(verdict.score, abs=1e-3)
    assert res.as_numpy("threshold")[0] == pytest.approx(meta["parameters"]["threshold"], abs=1e-3)
    assert res.as_numpy("map").shape == (1, h, w)


@pytest.mark.slow
def test_wrong_input_name_datatype_or_shape_gets_the_protocols_400(served):
    tc = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(served["url"].removeprefix("http://"))
    image = neu("crazing", 0, 1)[0].read_bytes()
    wrong = [tc.InferInput("input_1", [1], "BYTES"), tc.InferInput("image", [1], "FP32")]
    wrong[0].set_data_from_numpy(np.array([image], dtype=np.object_))
    wrong[1].set_data_from_numpy(np.zeros(1, np.float32))
    for inp, words in zip(wrong, ("unexpected input 'input_1'", "datatype 'FP32'"), strict=True):
        with pytest.raises(InferenceServerException) as e:
            client.infer("cls", [inp])
        assert e.value.status() == "400" and words in e.value.message()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": ["eA=="]}]}
    r = httpx.post(f"{served['url']}/v2/models/cls/infer", json=body)
    assert r.status_code == 400 and "shape [2, 1]" in r.json()["error"]
    r = infer_json(served["url"], "nope", neu("crazing", 0, 1))
    assert r.status_code == 404 and set(r.json()) == {"error"}


# ---- security ----------------------------------------------------------------------------
@pytest.mark.slow
def test_refused_calls_change_nothing_and_the_server_keeps_serving(served, tmp_path):
    from PIL import Image

    url, cls, tiles = served["url"], served["cls"], served["tiles"]
    before = {b: snapshot(b) for b in (cls, tiles)}
    teach = files(neu("inclusion", 0, 3))
    calls = [
        ("post", "cls/learn", {"data": {"label": "inclusion"}, "files": teach}),
        ("post", "cls/remove", {"json": {"label": "crazing"}}),
        ("post", "cls/relabel", {"json": {"from": "crazing", "to": "x"}}),
        ("post", "cls/rollback", {"json": {}}),
        ("post", "tiles/good", {"files": files(served["good"][12:14])}),
        ("post", "tiles/calibrate", {"json": {"false_alarm": 0.2}}),
        ("get", "cls/versions", {}),
    ]
    for method, path, kw in calls:
        for headers in ({}, auth("wrong-token-0123456789abcdef")):
            r = httpx.request(method, f"{url}/v2/models/{path}", headers=headers, **kw)
            assert r.status_code == 401, (path, r.text)
            assert "error" in r.json() and TOKEN not in r.text

    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 8000)).save(bomb, optimize=True)  # 64 MP of zeros in ~60 KB
    assert bomb.stat().st_size < 200_000
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    big = neu("crazing", 0, 1)[0].read_bytes() * 200  # 2.5 MB, over --max-body-mb 2
    bad = [
        ("cls/learn", {"data": {"label": "../x"}, "files": teach}, 400, "'..'"),
        ("cls/learn", {"data": {"label": "a/b"}, "files": teach}, 400, "contains '/'"),
        ("cls/learn", {"data": {"label": "bomb"}, "files": files([bomb])}, 413, "8,000 x 8,000"),
        ("cls/learn", {"data": {"label": "text"}, "files": files([text])}, 400, "notes.jpg is not"),
        ("cls/learn", {"data": {"label": "big"}, "files": [("images", ("b.jpg", big))]}, 413, ""),
        ("cls/remove", {"json": {"label": "no-such-class"}}, 400, "not in the head"),
        ("tiles/good", {"files": files([text])}, 400, "not a readable image"),
        ("tiles/calibrate", {"json": {"false_alarm": 1.5}}, 400, "(0, 1)"),
        ("cls/infer", {"content": big}, 413, "over this server's limit"),
    ]
    for path, kw, status, words in bad:
        r = httpx.post(f"{url}/v2/models/{path}", headers=auth(), timeout=60, **kw)
        assert r.status_code == status, (path, r.text)
        error = r.json()["error"]
        assert words in error and "\n" not in error, (path, error)
    r = infer_json(url, "cls", [bomb])
    assert r.status_code == 413 and "decompression bombs" in r.json()["error"]

    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert infer_json(url, "cls", neu("crazing", 0, 1)).status_code == 200
    assert {b: snapshot(b) for b in (cls, tiles)} == before
    assert TOKEN not in served["server"].text()


# ---- learning over HTTP ------------------------------------------------------------------
@pytest.mark.slow
def test_learning_over_http_is_seen_by_the_next_prediction_and_rolls_back(served):
    from edge_tl.runtime import Model

    url = served["url"]
    old = httpx.get(f"{url}/v2/models/cls").json()["parameters"]
    assert "pitted_surface" not in old["classes"]
    r = httpx.post(
        f"{url}/v2/models/cls/learn",
        headers=auth(),
        data={"label": "pitted_surface"},
        files=files(neu("pitted_surface", 0, 5)),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["labels"] == [*old["classes"], "pitted_surface"]
    assert record["support"]["pitted_surface"] == 5
    meta = httpx.get(f"{url}/v2/models/cls").json()
    assert meta["parameters"]["head_version"] == record["version"]
    queries = neu("pitted_surface", 10, 4)
    res = infer_json(url, "cls", queries).json()
    assert res["model_version"] == str(record["version"])
    labels = res["outputs"][0]["data"]
    # the server answers as the library does from the version on disk
    assert labels == [p.label for p in Model(served["cls"]).predict([str(q) for q in queries])]
    assert labels.count("pitted_surface") >= 2, labels

    r = httpx.post(
        f"{url}/v2/models/cls/learn",
        headers=auth(),
        data={"label": "inclusion"},
        files=files(neu("inclusion", 0, 3)),
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["parent"] == record["version"], r.text
    listing = httpx.get(f"{url}/v2/models/cls/versions", headers=auth()).json()
    assert listing["kind"] == "head" and listing["current"] == r.json()["version"]
    assert [v["version"] for v in listing["versions"] if v["current"]] == [listing["current"]]
    r = httpx.post(f"{url}/v2/models/cls/rollback", headers=auth(), json={}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == record["version"], r.text
    meta = httpx.get(f"{url}/v2/models/cls").json()["parameters"]
    assert meta["classes"] == record["labels"] and meta["head_version"] == record["version"]
    r = httpx.post(f"{url}/v2/models/cls/rollback", headers=auth(), json={"to": 99})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]

    tiles = httpx.get(f"{url}/v2/models/tiles").json()["parameters"]
    r = httpx.post(
        f"{url}/v2/models/tiles/good",
        headers=auth(),
        files=files(served["good"][12:16]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"] == 16 and r.json()["version"] == tiles["bank_version"] + 1
    r = httpx.post(f"{url}/v2/models/tiles/calibrate", headers=auth(), json={"false_alarm": 0.25})
    assert r.status_code == 200 and r.json()["false_alarm"] == 0.25
    after = httpx.get(f"{url}/v2/models/tiles").json()["parameters"]
    assert after["bank_version"] == tiles["bank_version"] + 2
    assert after["threshold"] == r.json()["threshold"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'edge_tl_learning_operations_total{model="cls",op="learn",outcome="ok"} 2.0' in metrics

    # a change written by another process (`edge-tl learn` beside the server, or another
    # --workers process) is read before the next prediction
    state = Model(served["cls"]).classifier.add(
        {"rolled-in_scale": [str(p) for p in neu("rolled-in_scale", 0, 3)]}
    )
    meta = httpx.get(f"{url}/v2/models/cls").json()["parameters"]
    assert "rolled-in_scale" in meta["classes"] and meta["head_version"] == state.meta["version"]
    res = infer_json(url, "cls", neu("rolled-in_scale", 10, 1)).json()
    assert res["model_version"] == str(state.meta["version"])


# ---- kill -9 and a graceful stop -----------------------------------------------------------
def _learn_in_thread(url: str, images: list[Path], label: str) -> tuple[threading.Thread, list]:
    out: list = []

    def go() -> None:
        try:
            out.append(
                httpx.post(
                    f"{url}/v2/models/cls/learn",
                    headers=auth(),
                    data={"label": label},
                    files=files(images),
                    timeout=120,
                )
            )
        except httpx.TransportError as e:
            out.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t, out


@pytest.mark.slow
def test_kill_9_during_a_learning_call_leaves_the_old_or_the_new_head(bundles, tmp_path):
    from edge_tl.runtime import Model

    bundle = Path(shutil.copytree(bundles["onnx-fp32"], tmp_path / "cls"))
    # a learned version to go back to after a trial that landed (the exported head is none)
    Model(bundle).classifier.add({"pitted_surface": [str(p) for p in neu("pitted_surface", 0, 3)]})
    old = Model(bundle).classifier.labels
    teach = neu("inclusion", 0, 40)  # embedding them takes long enough for a kill to land
    rng = random.Random(0)
    outcomes = []
    for _ in range(3):
        server = Server([bundle], tmp_path)
        try:
            server.wait_ready()
            t, out = _learn_in_thread(server.url, teach, "inclusion")
            time.sleep(rng.uniform(0.05, 0.5))
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(timeout=30)
            t.join(timeout=60)
        finally:
            server.stop()
        labels = Model(bundle).classifier.labels  # loads: hashes of CURRENT and its file hold
        assert labels in (old, [*old, "inclusion"]), labels
        outcomes.append("new" if "inclusion" in labels else "old")
        if "inclusion" in labels:  # start the next trial from the old head again
            Model(bundle).classifier.rollback()
    server = Server([bundle], tmp_path)
    try:
        server.wait_ready()
        classes = httpx.get(f"{server.url}/v2/models/cls").json()["parameters"]["classes"]
        assert classes == old
        listing = httpx.get(f"{server.url}/v2/models/cls/versions", headers=auth()).json()
        assert all("error" not in v for v in listing["versions"]), listing
    finally:
        server.stop()
    print("kill -9 outcomes:", outcomes)


@pytest.mark.slow
def test_sigterm_lets_a_learning_call_in_flight_finish(bundles, tmp_path):
    from edge_tl.runtime import Model

    bundle = Path(shutil.copytree(bundles["onnx-fp32"], tmp_path / "cls"))
    server = Server([bundle], tmp_path)
    try:
        server.wait_ready()
        t, out = _learn_in_thread(server.url, neu("inclusion", 0, 12), "inclusion")
        time.sleep(0.15)
        server.proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        # uvicorn re-raises the signal once it has shut down
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM), server.text()
    finally:
        server.stop()
    (res,) = out
    assert isinstance(res, httpx.Response) and res.status_code == 200, res
    assert "inclusion" in Model(bundle).classifier.labels
    assert json.loads(server.text().splitlines()[-1])  # the log stays JSON lines to the end
