"""Crash safety proven by ``kill -9``: learning interrupted at random points leaves the old
state or the new one, never a mix, and the bundle loads and verifies after every kill.

Each trial copies a prepared bundle (a learned head with two versions, an anomaly bank),
starts one real CLI process on it (``edge-tl learn --add``, ``learn --remove``,
``anomaly --add`` or ``rollback``), sends it SIGKILL after a random delay in
``[0, the operation's uncut duration]`` and then checks the bundle as ``edge-tl verify``
does (file hashes, the self-test, the current head and bank read whole). The current head
and bank are compared, array for array (metadata aside), with the state before the
operation and the state the same operation leaves when it runs uncut (computed once):

- ``old`` / ``new``: exactly one of the two;
- ``refused``: the bundle refuses to load with a one-line ``edge-tl: error`` message
  (allowed, but none is expected);
- ``corrupt``: anything else (a traceback, a state that is neither) - must be 0.

The bundle is the pretrained EfficientNet-Lite0 exported as ONNX FP32 (built once into
``--work``), the images a few real NEU-DET and magnetic-tile images from ``../shared/data``.

    .venv/bin/python benchmarks/crash.py [--trials 200] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.runtime import Model  # noqa: E402
from edge_tl.runtime.versions import DIGEST, arrays_sha256  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REMOVED = "crazing"
OUTCOMES = ("old", "new", "refused", "corrupt")

Argv = Callable[[Path, dict[str, Path]], list[str]]
OPS: dict[str, Argv] = {
    "learn --add": lambda b, f: ["learn", str(b), str(f["add"]), "--add"],
    "learn --remove": lambda b, f: ["learn", str(b), "--remove", REMOVED],
    "anomaly --add": lambda b, f: ["anomaly", str(b), str(f["good_add"]), "--add"],
    "rollback": lambda b, f: ["rollback", str(b)],
}
"""Each operation as the CLI arguments it runs with, on bundle ``b`` with folders ``f``."""


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)


def make_folders(root: Path, per_class: int = 4, shared: Path = SHARED) -> dict[str, Path]:
    """Small folders of real images: ``support`` (3 NEU-DET classes), ``extra`` (a 4th
    class, the head's second version), ``add`` (a 5th class, for ``learn --add``), ``good``
    (6 magnetic-tile good images, the bank) and ``good_add`` (4 more, ``anomaly --add``)."""
    neu, tiles = shared / "neu_det", shared / "magnetic_tile" / "train" / "good"
    f = {k: root / k for k in ("support", "extra", "add", "good", "good_add")}
    if (root / "done").is_file():
        return f

    def neu_images(cls: str, start: int) -> list[str]:
        return sorted(p.name for p in (neu / cls).iterdir())[start : start + per_class]

    for cls in (REMOVED, "patches", "scratches"):
        _copy(neu / cls, f["support"] / cls, neu_images(cls, 100))
    _copy(neu / "inclusion", f["extra"] / "inclusion", neu_images("inclusion", 100))
    _copy(neu / "pitted_surface", f["add"] / "pitted_surface", neu_images("pitted_surface", 100))
    good = sorted(p.name for p in tiles.iterdir())
    _copy(tiles, f["good"], good[:6])
    _copy(tiles, f["good_add"], good[6:10])
    (root / "done").write_text("")
    return f


def prepare(template: Path, base: Path, folders: dict[str, Path]) -> Path:
    """``base``: a copy of ``template`` with head versions 1 (learned from ``support``) and
    2 (``extra`` added, current) and anomaly bank version 1 (from ``good``)."""
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(template, base, ignore=shutil.ignore_patterns("heads", "anomaly"))
    model = Model(base)
    model.classifier.learn(folders["support"])
    model.classifier.add(folders["extra"])
    model.detector.fit(folders["good"])
    return base


def clone(base: Path, dst: Path) -> None:
    """A trial's bundle: the backbone and manifest hard-linked (every write is a new file
    renamed into place, never an edit), the learned state copied."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(
        base, dst, ignore=shutil.ignore_patterns("heads", "anomaly"), copy_function=os.link
    )
    for d in ("heads", "anomaly"):
        if (base / d).is_dir():
            shutil.copytree(base / d, dst / d)


def _sha(state: Any) -> str | None:
    if state is None:
        return None
    arrays = {k: v for k, v in state.to_arrays().items() if k not in ("meta", DIGEST)}
    return arrays_sha256(arrays)


def fingerprint(bundle: Path) -> tuple[str | None, str | None]:
    """Load ``bundle`` as ``edge-tl verify`` does (hashes, self-test, head and bank read
    whole) and return ``(head, bank)`` fingerprints: SHA-256 of their arrays, metadata
    (times, version numbers) aside.

    Raises:
        EdgeTLError: the bundle refuses to load.
    """
    model = Model(bundle)
    return _sha(model.classifier.state), _sha(model.detector.state)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_tl.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_TL_QUIET": "1"}


@dataclass
class Reference:
    """One operation run uncut: the state before and after, and how long it took."""

    old: tuple[str | None, str | None]
    new: tuple[str | None, str | None]
    seconds: float


def reference(base: Path, work: Path, op: str, folders: dict[str, Path]) -> Reference:
    """Run ``op`` uncut on a copy of ``base``."""
    dst = work / "reference"
    clone(base, dst)
    old = fingerprint(dst)
    t0 = time.perf_counter()
    res = subprocess.run(cli(*OPS[op](dst, folders)), env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{op} failed uncut: {res.stderr.strip()[-500:]}")
    new = fingerprint(dst)
    if new == old:
        raise RuntimeError(f"{op} changed nothing; the trial could not tell old from new")
    return Reference(old, new, seconds)


@dataclass
class Tally:
    trials: int = 0
    killed: int = 0  # still running when the signal came
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    examples: list[str] = field(default_factory=list)  # what a refusal or corruption said


def trial(
    base: Path, dst: Path, op: str, folders: dict[str, Path], ref: Reference, delay: float
) -> tuple[str, bool, str]:
    """One kill: ``(outcome, killed while running, detail)``."""
    clone(base, dst)
    proc = subprocess.Popen(
        cli(*OPS[op](dst, folders)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if not killed and proc.returncode != 0:
        line = err.strip().splitlines()[-1] if err.strip() else ""
        return ("refused" if line.startswith("edge-tl: error") else "corrupt"), killed, line
    try:
        got = fingerprint(dst)
    except EdgeTLError as e:
        return "refused", killed, str(e)
    except Exception:  # anything but edge_tl's one-line errors is a failure of the proof
        return "corrupt", killed, traceback.format_exc(limit=3)
    if got == ref.old:
        return "old", killed, ""
    if got == ref.new:
        return "new", killed, ""
    return "corrupt", killed, f"state is neither old nor new: {got}"


def run_trials(
    base: Path,
    work: Path,
    folders: dict[str, Path],
    trials: int,
    seed: int = 0,
    ops: tuple[str, ...] = tuple(OPS),
    log: Callable[[str], None] | None = None,
) -> dict[str, Tally]:
    """``trials`` kills spread evenly over ``ops`` (in turn), delays drawn from ``seed``."""
    refs = {op: reference(base, work, op, folders) for op in ops}
    rng = random.Random(seed)
    tallies = {op: Tally() for op in ops}
    for i in range(trials):
        op = ops[i % len(ops)]
        delay = rng.uniform(0.0, refs[op].seconds)
        outcome, killed, detail = trial(base, work / "trial", op, folders, refs[op], delay)
        t = tallies[op]
        t.trials += 1
        t.killed += killed
        t.counts[outcome] += 1
        if detail and len(t.examples) < 3:
            t.examples.append(detail)
        if log:
            log(f"{i + 1}/{trials} {op}: kill at {delay:.2f} s -> {outcome}")
    for op, t in tallies.items():
        t.examples.insert(0, f"uncut: {refs[op].seconds:.2f} s")
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    rows = [
        "| operation | trials | killed while running | old | new | refused-with-message "
        "| corrupt/mixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, t in tallies.items():
        c = t.counts
        rows.append(
            f"| {op} | {t.trials} | {t.killed} | {c['old']} | {c['new']} | {c['refused']} "
            f"| {c['corrupt']} |"
        )
    total = {k: sum(t.counts[k] for t in tallies.values()) for k in OUTCOMES}
    rows.append(
        f"| all | {sum(t.trials for t in tallies.values())} | "
        f"{sum(t.killed for t in tallies.values())} | {total['old']} | {total['new']} | "
        f"{total['refused']} | {total['corrupt']} |"
    )
    return "\n".join(rows)


def template_bundle(work: Path, folders: dict[str, Path]) -> Path:
    """The pretrained EfficientNet-Lite0 as an ONNX FP32 bundle (exported once)."""
    path = work / "onnx-fp32"
    if not (path / "manifest.json").is_file():
        from edge_tl.export import export_bundle

        print(f"exporting {path} (onnx-fp32, pretrained efficientnet_lite0)", flush=True)
        export_bundle(path, "onnx-fp32", backbone="efficientnet_lite0", calib=folders["support"])
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200, help="kills, spread over the 4 operations")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_crash"))
    p.add_argument("--bundle", type=Path, help="an ONNX bundle to use instead of exporting one")
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args()
    if args.trials < 1:
        p.error(f"--trials must be at least 1, not {args.trials}")
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(args.work / "images")
    template = args.bundle or template_bundle(args.work, folders)
    base = prepare(template, args.work / "base", folders)
    t0 = time.perf_counter()
    tallies = run_trials(
        base, args.work, folders, args.trials, args.seed, log=lambda s: print(s, flush=True)
    )
    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\nkill -9 at a random point, {args.trials} trials, seed {args.seed} ({minutes:.1f} min)"
    )
    print(table(tallies))
    for op, t in tallies.items():
        print(f"  {op}: {'; '.join(t.examples)}")
    if args.json:
        out = {
            op: {"trials": t.trials, "killed": t.killed, **t.counts, "notes": t.examples}
            for op, t in tallies.items()
        }
        args.json.write_text(json.dumps({"seed": args.seed, "operations": out}, indent=1))
    return 1 if any(t.counts["corrupt"] for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
