"""Command-line paths run end to end as a user runs them: a shortened demo (with a recipe
that is refused), learn's open-set and class flags with a rollback that succeeds,
``bench --check`` against budgets, training interrupted with Ctrl-C and resumed, and
quantization-aware training. Slow: trains and exports."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import ENV, _one_line_error, cli

pytestmark = pytest.mark.slow
pytest.importorskip("torch")


def test_demo_runs_end_to_end_and_shows_a_refused_recipe(neu_small, tmp_path):
    strict = tmp_path / "strict.toml"  # INT8 that can never pass, and no ladder to climb
    strict.write_text(
        'format = "onnx"\nprecision = "int8"\nquantization = "ort-static"\n'
        "calibration_size = 16\nmin_cosine = 0.99999\naccuracy_control = false\n"
        "calibration_subsets = 0\n"
    )
    out = tmp_path / "demo"
    args = ("demo", "--data", neu_small, "--recipes", f"onnx-fp32,{strict}", "--epochs", "1")
    res = cli(*args, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(ln.startswith("PyTorch FP32") for ln in lines), res.stdout
    row = next(ln for ln in lines if ln.startswith("onnx-fp32 "))
    refused = next(ln for ln in lines if ln.startswith("strict "))
    assert "refused by accuracy control after 1 tries" in refused
    summary = json.loads((out / "summary.json").read_text())
    fp32, strict_row = summary["artifacts"]
    assert "misses its tolerance" in strict_row["refused"] and not (out / "bundles/strict").exists()
    # the table's accuracy is what the runtime measures on the run's held-out split
    ev = json.loads(
        cli("evaluate", out / "bundles/onnx-fp32", neu_small, "--split", "test", "--json").stdout
    )
    assert ev["n"] == summary["n_test"] == 12
    assert ev["accuracy"] == pytest.approx(fp32["accuracy"]) and f"{ev['accuracy']:.4f}" in row
    assert cli(*args, "--out", out).returncode == 0  # a demo folder is its own to replace


def _learn(bundle: Path, *args) -> dict:
    res = cli("learn", bundle, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["head"]


def _labels_of(bundle: Path, images: list[Path]) -> list[str]:
    res = cli("predict", bundle, *images, "--json")
    assert res.returncode == 0, res.stderr
    return [p["label"] for p in json.loads(res.stdout)]


def test_learn_flags_and_a_rollback_through_the_command_line(bundles, neu_small, tmp_path):
    bundle = Path(shutil.copytree(bundles["ort-int8"], tmp_path / "b"))
    crazing = sorted((neu_small / "crazing").iterdir())[:3]
    v1 = _learn(bundle, neu_small, "--head", "prototype")
    assert v1["version"] == 1 and v1["open_set"] and v1["threshold"] is not None
    v2 = _learn(bundle, "--quantile", "0.5")  # reject half the support set's like
    assert v2["version"] == 2 and v2["threshold"] > v1["threshold"]
    v3 = _learn(bundle, "--threshold", "0.9999")
    assert v3["threshold"] == 0.9999 and set(_labels_of(bundle, crazing)) == {"unknown"}
    v4 = _learn(bundle, "--no-open-set")
    assert v4["threshold"] is None and _labels_of(bundle, crazing) == ["crazing"] * 3
    v5 = _learn(bundle, "--relabel", "crazing=cracks")
    assert v5["labels"] == ["cracks", "patches", "scratches"]
    assert _labels_of(bundle, crazing) == ["cracks"] * 3
    v6 = _learn(bundle, "--remove", "patches")
    assert v6["labels"] == ["cracks", "scratches"] and v6["support"] == {
        "cracks": 16,
        "scratches": 16,
    }

    res = cli("rollback", bundle)
    assert res.returncode == 0, res.stderr
    assert "head v5 is current again (prototype, 3 classes: cracks, patches, scratches)" in (
        res.stdout
    )
    back = json.loads(cli("rollback", bundle, "--to", "1", "--json").stdout)
    assert back["version"] == 1 and back["labels"] == ["crazing", "patches", "scratches"]
    assert _labels_of(bundle, crazing) == ["crazing"] * 3
    listing = cli("rollback", bundle, "--list").stdout.splitlines()
    assert len(listing) == 6 and listing[0].startswith("* v1 ")
    assert all(ln.startswith("  v") for ln in listing[1:])
    _one_line_error(cli("learn", bundle, "--relabel", "cracks"), "OLD=NEW")


def test_bench_check_exits_3_when_a_budget_is_missed(bundles, tmp_path):
    impossible = tmp_path / "tiny.toml"
    impossible.write_text(
        'engine = "onnxruntime"\ndevice = "CPUExecutionProvider"\nrecipe = "ort-int8"\n'
        "latency_budget_ms = 0.001\nmemory_budget_mb = 100000\n"
    )
    res = cli("bench", bundles["ort-int8"], "--profile", impossible, "--repeats", "4", "--check")
    assert res.returncode == 3, res.stderr
    assert "budget latency_p95_ms" in res.stdout and "MISSED" in res.stdout
    assert "budget peak_rss_mb" in res.stdout and "holds" in res.stdout
    generous = tmp_path / "big.toml"
    generous.write_text(impossible.read_text().replace("0.001", "100000"))
    res = cli("bench", bundles["ort-int8"], "--device", generous, "--repeats", "4", "--check")
    assert res.returncode == 0, res.stderr  # the old flag still works, and says so once
    assert res.stderr.count("warning: --device is now --profile") == 1
    assert "MISSED" not in res.stdout
    _one_line_error(cli("bench", bundles["ort-int8"], "--repeats", "0"), "--repeats")
    _one_line_error(cli("bench", bundles["ort-int8"], "--batch", "0"), "--batch")
    _one_line_error(cli("bench", bundles["ort-int8"], "--images", tmp_path / "no.jpg"), "no.jpg")


def test_training_interrupted_with_ctrl_c_resumes_from_its_checkpoint(neu_small, tmp_path):
    out = tmp_path / "run"
    ckpt = tmp_path / "run.checkpoint.pt"
    args = [
        sys.executable, "-m", "edge_tl.cli", "train", str(neu_small), "--strategy", "finetune",
        "--epochs", "30", "--patience", "0", "--batch-size", "8", "--workers", "0",
        "--test-frac", "0.25", "--out", str(out),
    ]  # fmt: skip
    # Ctrl-C's default in the child even when this suite runs in the background of a
    # non-interactive shell (which starts it with SIGINT ignored, inherited by children).
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.is_file(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first epoch's checkpoint
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert f"finished epochs are saved in {ckpt}; rerun with --resume" in err
    assert not out.exists()
    _one_line_error(cli(*args[3:]), "--resume to continue it")
    res = cli(*args[3:], "--resume", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)
    assert metrics["epochs_run"] == 30 and not ckpt.exists()
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 31  # header + every epoch once: nothing lost, nothing twice


def test_quantization_aware_training_through_the_command_line(neu_small, tmp_path):
    res = cli(
        "train", neu_small, "--qat", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--test-frac", "0.25", "--out", tmp_path / "qat", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)
    assert metrics["qat"] is True and metrics["boundary"] == "image"  # QAT runs uncached
    assert json.loads((tmp_path / "qat" / "run.json").read_text())["config"]["qat"] is True
    _one_line_error(
        cli("train", neu_small, "--qat", "--strategy", "linear-probe", "--out", tmp_path / "x"),
        "--qat",
        "linear-probe",
    )
    assert not (tmp_path / "x").exists()


def test_evaluate_split_train_is_the_runs_own_training_split(neu_small, tmp_path):
    """The run capped its training split at 5 images per class: ``--split train`` must be
    those 15 images, not the 30 an uncapped split of the same seed would give."""
    run, bundle = tmp_path / "run", tmp_path / "b"
    res = cli(
        "train", neu_small, "--strategy", "linear-probe", "--train-per-class", "5",
        "--test-frac", "0.25", "--out", run, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["n_train"] == 15
    assert cli("export", run, "--out", bundle).returncode == 0
    split = json.loads((bundle / "manifest.json").read_text())["source"]["split"]
    assert split["train_per_class"] == 5
    sizes = {}
    for part in ("train", "val", "test"):
        ev = cli("evaluate", bundle, neu_small, "--split", part, "--json")
        assert ev.returncode == 0, ev.stderr
        sizes[part] = json.loads(ev.stdout)["n"]
    assert sizes == {"train": 15, "val": 6, "test": 12}
