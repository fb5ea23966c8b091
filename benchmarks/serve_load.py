"""Load on ``edge-tl serve``: concurrent clients against a real server on loopback, beside
in-process :meth:`Model.predict` on the same host in the same run, and a run with learning
calls mixed in.

The bundle: the pretrained EfficientNet-Lite0 exported as ONNX FP32 (built once into
``--work`` by ``edge-tl export`` in a child process), with a linear head learned on the
device from 5 NEU-DET classes x 10 images (inclusion left out); or ``--bundle``, copied.
The server is ``edge-tl serve`` in a child process on a free loopback port. Each client is
a thread with its own keep-alive HTTP/1.1 connection (``http.client``), sending one real
NEU-DET photo per ``infer`` request (base64 in the protocol's JSON, built before the clock
starts), for ``--seconds`` at each client count (1, 4, 16).

Reported per row: requests per second, latency p50 / p95 / p99 (ms, send to full answer),
errors (non-200 or a broken connection; goal 0) and the server's RSS (its process and
children, psutil) at the start and after the row; and the ratio of throughput to
in-process ``Model.predict`` (one caller, batch 1, the same photos read from disk, the same
engine settings as the server; measured before the server starts and after it stops, the
mean is the reference; goal at 16 clients >= 0.8x).

The mixed run: ``--clients-mixed`` clients ask for every class's score (``top_k`` = 100)
while a learner teaches a new class (``probe_1``, ``probe_2``, ... from 3 inclusion photos
each) every second over ``POST /v2/models/{name}/learn``. Checked, not just timed: every
call answered 200; every answer's classes are exactly those of one committed head version
(the head learned in set-up plus ``probe_1..probe_j``; scores summing to 1); ``j`` at least
the lessons answered before the request was sent and at most those sent before its answer
came (a committed lesson is seen at once, an uncommitted one never); and the versions list
afterwards contiguous, one version per lesson, the last in force (nothing lost).

    flock /tmp/edge_tl_cpu.lock .venv/bin/python benchmarks/serve_load.py \\
        [--seconds 15] [--clients 1,4,16] [--mixed-seconds 20] [--json out.json]

Speed is compared only as ratios within one run (the host is shared).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.host import host_info  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
NEU = SHARED / "neu_det"
KNOWN = ("crazing", "patches", "pitted_surface", "rolled-in_scale", "scratches")
PROBE_FROM = "inclusion"
TOKEN = "serve-load-token-0123456789abcdef"
NAME = "neu"


# ---- the bundle and the server ------------------------------------------------------------
def _photos(cls: str, start: int, n: int) -> list[Path]:
    return sorted((NEU / cls).glob("*.jpg"))[start : start + n]


def build_bundle(work: Path, given: Path | None) -> Path:
    """A private copy of ``given``, or of the exported backbone with a head learned on the
    device from :data:`KNOWN` x 10 photos (the export runs once per ``work``)."""
    out = work / NAME
    if out.exists():
        shutil.rmtree(out)
    if given is not None:
        return Path(shutil.copytree(given, out))
    template = work / "onnx-fp32"
    if not (template / "manifest.json").is_file():
        print(f"exporting {template} (onnx-fp32, pretrained efficientnet_lite0)", flush=True)
        cmd = [sys.executable, "-m", "edge_tl.cli", "export", "--backbone", "efficientnet_lite0"]
        cmd += ["--recipe", "onnx-fp32", "--calib", str(NEU), "--out", str(template)]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    shutil.copytree(template, out)
    Model(out).classifier.learn({c: [str(p) for p in _photos(c, 0, 10)] for c in KNOWN})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``edge-tl serve BUNDLE`` in a child process on a free loopback port."""

    def __init__(self, bundle: Path, work: Path) -> None:
        self.port = _free_port()
        token = work / "token"
        token.write_text(TOKEN + "\n")
        self.log = work / "server.log"
        cmd = [sys.executable, "-m", "edge_tl.cli", "serve", str(bundle), "--name", NAME]
        cmd += ["--port", str(self.port), "--token-file", str(token)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_TL_QUIET": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if request(self.port, "GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in 300 s: {self.log.read_text()[-2000:]}")

    def rss_mb(self) -> float:
        p = psutil.Process(self.proc.pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


def infer_body(photo: Path, parameters: dict[str, Any] | None = None) -> bytes:
    data = base64.b64encode(photo.read_bytes()).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
    return json.dumps({"inputs": [tensor], "parameters": parameters or {}}).encode()


# ---- load ---------------------------------------------------------------------------------
def load(
    port: int, bodies: list[bytes], clients: int, seconds: float, keep: bool = False
) -> dict[str, Any]:
    """``clients`` threads posting ``bodies`` in turn for ``seconds``: throughput, latency,
    errors (and with ``keep`` every answer with its send and receive times)."""
    path = f"/v2/models/{NAME}/infer"
    headers = {"Content-Type": "application/json"}
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    answers: list[list[tuple[float, float, int, bytes]]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = i
        start.wait()
        while time.perf_counter() < stop_at[0]:
            body = bodies[n % len(bodies)]
            n += clients
            t0 = time.perf_counter()
            try:
                status, out = request(port, "POST", path, body, headers, conn)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status, out = -1, b""
            t1 = time.perf_counter()
            if status != 200:
                errors[i] += 1
            else:
                lat[i].append(t1 - t0)
            if keep:
                answers[i].append((t0, t1, status, out))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    ms = np.array([x for xs in lat for x in xs]) * 1000
    out: dict[str, Any] = {
        "clients": clients,
        "requests": int(len(ms) + sum(errors)),
        "errors": int(sum(errors)),
        "throughput": len(ms) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }
    if keep:
        out["answers"] = [a for xs in answers for a in xs]
    return out


def in_process(bundle: Path, photos: list[Path], seconds: float) -> dict[str, Any]:
    """One caller of ``Model.predict([photo])`` for ``seconds`` (the server's engine
    settings: a fresh Model on a copy of the bundle, default threads)."""
    model = Model(bundle)
    for p in photos[:5]:
        model.predict([str(p)])
    n, ms = 0, []
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        model.predict([str(photos[n % len(photos)])])
        ms.append((time.perf_counter() - t0) * 1000)
        n += 1
    wall = time.perf_counter() - t_start
    return {
        "clients": "in-process",
        "requests": n,
        "errors": 0,
        "throughput": n / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


# ---- learning mixed in --------------------------------------------------------------------
def _multipart(label: str, photos: list[Path]) -> tuple[bytes, str]:
    boundary = "edgetlserveload7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'.encode()
    ]
    for p in photos:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{p.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        parts.append(head.encode() + p.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def mixed(port: int, photos: list[Path], clients: int, seconds: float) -> dict[str, Any]:
    """Predictions from ``clients`` while a lesson (a new class from 3 photos) is sent every
    second; every answer checked against the head versions committed around it."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, raw = request(port, "GET", f"/v2/models/{NAME}/versions", headers=auth)
    if status != 200:
        raise RuntimeError(f"versions: {status} {raw[:300]!r}")
    before = json.loads(raw)
    v0 = before["current"]
    status, raw = request(port, "GET", f"/v2/models/{NAME}")
    base = set(json.loads(raw)["parameters"]["classes"])
    bodies = [infer_body(p, {"top_k": 100}) for p in photos]
    lessons: list[tuple[float, float, int, Any]] = []
    probes = _photos(PROBE_FROM, 20, 3 * int(seconds + 2))

    def learner() -> None:
        j = 0
        next_at = time.perf_counter() + 0.5
        end = time.perf_counter() + seconds - 0.5
        while time.perf_counter() < end:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += 1.0
            j += 1
            body, ctype = _multipart(f"probe_{j}", probes[3 * (j - 1) : 3 * j])
            t0 = time.perf_counter()
            status, out = request(
                port,
                "POST",
                f"/v2/models/{NAME}/learn",
                body,
                {**auth, "Content-Type": ctype},
            )
            t1 = time.perf_counter()
            record = json.loads(out) if status == 200 else out[:300]
            lessons.append((t0, t1, status, record))

    teacher = threading.Thread(target=learner)
    teacher.start()
    row = load(port, bodies, clients, seconds, keep=True)
    teacher.join()

    sent = sorted(t0 for t0, _, _, _ in lessons)
    answered = sorted(t1 for _, t1, s, _ in lessons if s == 200)
    problems: list[str] = []
    version_differs = 0
    for t0, t1, status, out in row.pop("answers"):
        if status != 200:
            continue
        answer = json.loads(out)
        tensors = {o["name"]: o for o in answer["outputs"]}
        labels = tensors["top_k_labels"]["data"]
        extra = set(labels) - base
        j = len(extra)
        if extra != {f"probe_{i}" for i in range(1, j + 1)} or len(labels) != len(base) + j:
            problems.append(
                f"classes of no committed version: {len(labels)} labels, new {sorted(extra)}, "
                f"missing {sorted(base - set(labels))}"
            )
            continue
        if abs(sum(tensors["top_k_scores"]["data"]) - 1) > 1e-3:
            problems.append("scores that do not sum to 1")
        low = sum(t < t0 for t in answered)
        high = sum(t < t1 for t in sent)
        if not low <= j <= high:
            problems.append(f"saw {j} lessons; {low} were committed before, {high} sent")
        version_differs += int(answer.get("model_version") != str(v0 + j))
    status, raw = request(port, "GET", f"/v2/models/{NAME}/versions", headers=auth)
    after = json.loads(raw)
    ok_lessons = [r for _, _, s, r in lessons if s == 200]
    new = [v["version"] for v in after["versions"] if v["version"] > v0]
    expected = list(range(v0 + 1, v0 + 1 + len(ok_lessons)))
    if new != expected or after["current"] != (expected[-1] if expected else v0):
        problems.append(f"versions after v{v0}: {new}, current {after['current']}; {expected}")
    if [r["version"] for r in ok_lessons] != expected:
        problems.append(f"lessons answered versions {[r['version'] for r in ok_lessons]}")
    last = after["versions"][-1]["labels"] if after["versions"] else []
    missing = [f"probe_{i}" for i in range(1, len(ok_lessons) + 1) if f"probe_{i}" not in last]
    if missing:
        problems.append(f"classes lost: {missing}")
    row.update(
        clients=f"{clients} + learn/s",
        lessons=len(lessons),
        lesson_errors=sum(s != 200 for _, _, s, _ in lessons),
        lesson_p50_ms=float(np.median([(t1 - t0) * 1000 for t0, t1, _, _ in lessons]))
        if lessons
        else None,
        versions=f"v{v0} -> v{after['current']}",
        inconsistent=len(problems),
        problems=problems[:10],
        model_version_differs=version_differs,
    )
    return row


# ---- the report ---------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], reference: float) -> str:
    head = "| clients | requests | errors | req/s vs in-process | p50 ms | p95 ms | p99 ms |"
    head += " server RSS MB (start -> end) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rss = f"{r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f}" if "rss_end_mb" in r else "-"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | "
            f"{r['throughput'] / reference:.2f}x | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {rss} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a classifier bundle (copied); default: built")
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_serve_load"))
    p.add_argument("--seconds", type=float, default=15.0, help="per client count")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--mixed-seconds", type=float, default=20.0)
    p.add_argument("--clients-mixed", type=int, default=4)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if not NEU.is_dir():
        print(f"serve_load: {NEU} is not here (../shared/data beside the repository)")
        return 2
    counts = [int(c) for c in args.clients.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(args.work, args.bundle)
    photos = [q for c in (*KNOWN, PROBE_FROM) for q in _photos(c, 100, 8)]

    before = in_process(bundle, photos, args.seconds)
    before["clients"] = "in-process (before)"
    server = Server(bundle, args.work)
    rows: list[dict[str, Any]] = []
    try:
        rss0 = server.rss_mb()
        bodies = [infer_body(q) for q in photos]
        load(server.port, bodies, 2, 2.0)  # warm-up
        for c in counts:
            row = load(server.port, bodies, c, args.seconds)
            row.update(rss_start_mb=rss0, rss_end_mb=server.rss_mb())
            rows.append(row)
            print(f"{c} clients: {row['throughput']:.1f} req/s, {row['errors']} errors", flush=True)
        if args.mixed_seconds > 0:
            row = mixed(server.port, photos, args.clients_mixed, args.mixed_seconds)
            row.update(rss_start_mb=rss0, rss_end_mb=server.rss_mb())
            rows.append(row)
    finally:
        server.stop()
    # once more after the server rows (the learning run's head grown back to the start's):
    # the reference is their mean, and their difference shows the host's drift
    after = in_process(build_bundle(args.work, args.bundle), photos, args.seconds)
    after["clients"] = "in-process (after)"
    reference = {**before, "throughput": (before["throughput"] + after["throughput"]) / 2}
    print()
    print(table([before, after, *rows], reference["throughput"]))
    at16 = next((r for r in rows if r["clients"] == 16), None)
    if at16 is not None:
        ratio = at16["throughput"] / reference["throughput"]
        print(f"\n16 clients vs in-process Model.predict: {ratio:.2f}x (goal >= 0.8x)")
    mixed_row = next((r for r in rows if "lessons" in r), None)
    if mixed_row is not None:
        print(
            f"learning mixed in: {mixed_row['lessons']} lessons ({mixed_row['lesson_errors']} "
            f"refused, p50 {mixed_row['lesson_p50_ms']:.0f} ms), {mixed_row['versions']}, "
            f"{mixed_row['inconsistent']} answers inconsistent with the committed versions, "
            f"{mixed_row['errors']} infer errors; model_version in the answer differs from "
            f"the version the classes show in {mixed_row['model_version_differs']} answers"
        )
        for problem in mixed_row["problems"]:
            print("  ", problem)
    if args.json:
        out = {
            "host": {**host_info(), "python": platform.python_version()},
            "args": {k: str(v) for k, v in vars(args).items()},
            "in_process": [before, after],
            "rows": rows,
        }
        args.json.write_text(json.dumps(out, indent=2))
    bad = sum(r["errors"] for r in rows) + (mixed_row["inconsistent"] if mixed_row else 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
