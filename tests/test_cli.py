"""The command line as a user runs it: JSON contracts and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image

ENV = {**os.environ, "EDGE_TL_QUIET": "1"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=900,
    )


def _one_line_error(res, *words):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("edge-tl: error:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _folder(root: Path, n=6):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / c / f"{i}.png", seed=i)
    return root


@pytest.mark.parametrize(
    "setup, words",
    [
        ("missing", ["does not exist"]),
        ("empty_class", ["is empty", "add images"]),
        ("non_image", ["notes.txt", "not an image file"]),
        ("unknown_backbone", ["unknown backbone 'resnet9'", "efficientnet_lite0"]),
        ("unknown_strategy", ["unknown strategy", "linear-probe"]),
        ("stages_without_selective", ["--stages and --params", "--strategy selective"]),
    ],
)
def test_train_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, setup, words):
    data = tmp_path / "data"
    args = ["train", data, "--out", tmp_path / "run"]
    if setup != "missing":
        _folder(data)
    if setup == "empty_class":
        (data / "c").mkdir()
    if setup == "non_image":
        (data / "a" / "notes.txt").write_text("hello")
    if setup == "unknown_backbone":
        args += ["--backbone", "resnet9"]
    if setup == "unknown_strategy":
        args += ["--strategy", "magic"]
    if setup == "stages_without_selective":
        args += ["--stages", "5,6"]
    _one_line_error(cli(*args), *words)
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data"] if setup != "missing" else [])


def test_export_bad_input(tmp_path, lp_run, bundles):
    _one_line_error(
        cli("export", lp_run, "--recipe", "int3", "--out", tmp_path / "b"),
        "unknown recipe 'int3'",
        "ort-int8",
    )
    _one_line_error(
        cli("export", tmp_path, "--recipe", "onnx-fp32", "--out", tmp_path / "b"),
        "not a run folder",
    )
    _one_line_error(
        cli("export", lp_run, "--out", bundles["onnx-fp32"]), "already exists", "--force"
    )
    assert (bundles["onnx-fp32"] / "manifest.json").is_file()
    assert not (tmp_path / "b").exists()


def test_run_folder_from_another_version_is_refused(tmp_path, lp_run):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(lp_run, old)
    rec = json.loads((old / "run.json").read_text())
    rec["format_version"] = 0
    (old / "run.json").write_text(json.dumps(rec))
    _one_line_error(cli("export", old, "--out", tmp_path / "b"), "format version 0", "retrain")


@pytest.mark.slow
def test_predict_and_evaluate_json(bundles, neu_small):
    res = cli("evaluate", bundles["ort-int8"], neu_small, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["accuracy"] >= 0.95 and out["n"] == 48  # measured 1.0 (36 of them trained on)
    assert {"per_class", "confusion_matrix", "labels"} <= set(out)
    test = json.loads(
        cli("evaluate", bundles["ort-int8"], neu_small, "--split", "test", "--json").stdout
    )
    assert test["n"] == 12  # 25 % of 16 per class, 3 classes
    img = sorted((neu_small / "scratches").iterdir())[0]
    pred = json.loads(cli("predict", bundles["openvino-int8"], img, "--json").stdout)
    assert pred[0]["label"] == "scratches" and 0 < pred[0]["score"] <= 1
    _one_line_error(cli("predict", bundles["ort-int8"], neu_small / "nope.jpg"), "does not exist")
    _one_line_error(cli("predict", bundles["ort-int8"], neu_small), "is a folder")
    _one_line_error(cli("rollback", bundles["ort-int8"], "--list", "--to", "1"), "--list")
    _one_line_error(
        cli("evaluate", bundles["ort-int8"], neu_small, "--maps", neu_small / "m"), "drop --maps"
    )
    assert not (neu_small / "m").exists()
    ins = json.loads(cli("inspect", bundles["ort-int8"], "--json").stdout)
    assert ins["hashes_verified"] and ins["artifact"]["precision"] == "int8"


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    _one_line_error(cli("demo", "--out", tmp_path), "not a demo folder")
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_export_refuses_a_run_whose_training_data_changed(tmp_path, lp_run):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(lp_run, moved)
    rec = json.loads((moved / "run.json").read_text())
    rec["data_fingerprint"] = "0" * 64  # as if images were added or renamed since training
    (moved / "run.json").write_text(json.dumps(rec))
    _one_line_error(cli("export", moved, "--out", tmp_path / "b"), "changed since the run")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_evaluate_split_refuses_other_data(tmp_path, bundles, neu_small):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(neu_small, other)
    first = sorted((other / "crazing").iterdir())[0]
    first.rename(first.with_name("renamed.jpg"))
    _one_line_error(
        cli("evaluate", bundles["ort-int8"], other, "--split", "test"),
        "not the data set this bundle was trained on",
    )
    assert cli("evaluate", bundles["ort-int8"], other, "--json").returncode == 0
    _one_line_error(
        cli("predict", bundles["ort-int8"], first.with_name("renamed.jpg"), "--top-k", "0"),
        "--top-k must be at least 1",
    )


def test_batch_size_one_is_refused(tmp_path):
    data = _folder(tmp_path / "data")
    _one_line_error(
        cli("train", data, "--out", tmp_path / "run", "--batch-size", "1"),
        "--batch-size must be at least 2",
    )
