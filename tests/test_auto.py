"""``--strategy auto``: the choice (size gates, validation verdict), its record, the run it
keeps, and the flags it refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.spec import DEFAULT_STRATEGY
from edge_tl.train import TrainConfig
from edge_tl.train.auto import AUTO_ARMS, Arm, arm_config, choose, work_path
from tests.test_cli import _one_line_error, cli


def _scores(**val):
    calls = []

    def score(arm):
        calls.append(arm.name)
        return val[arm.name.replace("-", "_")]

    return score, calls


def test_auto_is_the_default_image_strategy():
    assert DEFAULT_STRATEGY == "auto" and TrainConfig().strategy == "auto"


def test_scarce_data_picks_the_linear_probe_without_training_anything_else():
    score, calls = _scores(linear_probe=0.5, finetune=0.99, full=0.99)
    best, why, records = choose(8, 2, score)
    assert best.strategy == "linear-probe" and calls == ["linear-probe"]
    assert "2 < 5 validation images per class" in records["finetune"]["skipped"]
    assert why.startswith("linear-probe") and "not tried: finetune" in why


def test_the_validation_split_decides_and_ties_go_to_the_cheaper_arm():
    score, calls = _scores(linear_probe=0.90, finetune=0.95, full=0.97)
    best, why, records = choose(500, 50, score)
    assert best.name == "full" and calls == ["linear-probe", "finetune", "full"]
    assert records["finetune"]["val_accuracy"] == 0.95 and "full 0.9700" in why
    score, calls = _scores(linear_probe=0.95, finetune=0.95, full=0.95)
    assert choose(10, 50, score)[0].name == "linear-probe"
    score, calls = _scores(linear_probe=0.9, finetune=0.95, full=0.93)
    assert choose(10, 50, score)[0].name == "finetune"
    score, calls = _scores(linear_probe=None, finetune=None, full=None)
    assert choose(10, 50, score)[0].name == "linear-probe"  # no validation images: no verdict


def test_arm_gates_on_training_images_and_on_a_gain():
    arms = (
        Arm("linear-probe", "linear-probe"),
        Arm("finetune", "finetune"),
        Arm("full", "full", min_per_class=50, needs_gain=True),
    )
    score, calls = _scores(linear_probe=0.95, finetune=0.90, full=1.0)
    best, _, records = choose(100, 50, score, arms)
    assert best.name == "linear-probe" and calls == ["linear-probe", "finetune"]
    assert "not beaten" in records["full"]["skipped"]
    score, calls = _scores(linear_probe=0.90, finetune=0.95, full=1.0)
    best, _, records = choose(40, 50, score, arms)
    assert best.name == "finetune" and "40 < 50 training" in records["full"]["skipped"]


def test_an_arm_setting_applies_unless_the_user_changed_that_flag():
    arm = Arm("finetune", "finetune", {"epochs": 12, "train_stages": 3})
    cfg = arm_config(TrainConfig(epochs=4), arm)
    assert cfg.strategy == "finetune" and cfg.epochs == 4 and cfg.train_stages == 3
    assert [a.strategy for a in AUTO_ARMS][0] == "linear-probe"  # the first has no minimum
    assert AUTO_ARMS[0].min_per_class == 0


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"stages": (5,)}, "--strategy selective"),
        ({"params": ("net.*",)}, "--strategy selective"),
        ({"unfreeze_every": 2}, "--strategy gradual"),
        ({"cache": False}, "--strategy finetune"),
        ({"val_frac": 0.0}, "--val-frac"),
    ],
)
def test_auto_refuses_flags_of_one_strategy(settings, words):
    with pytest.raises(EdgeTLError, match=words):
        TrainConfig(strategy="auto", **settings)


def test_qat_and_loop_adaptation_resolve_auto_to_finetune():
    assert TrainConfig(qat=True).strategy == "finetune"
    assert TrainConfig(target_unlabeled="t").strategy == "finetune"  # mcc by default
    assert TrainConfig(target_unlabeled="t", adapt="adabn").strategy == "auto"


def test_cli_bad_auto_combinations_fail_in_one_line_and_write_nothing(tmp_path, neu_small):
    out = tmp_path / "run"
    _one_line_error(cli("train", neu_small, "--unfreeze-every", "2", "--out", out), "gradual")
    _one_line_error(cli("train", neu_small, "--val-frac", "0", "--out", out), "--val-frac")
    texts = tmp_path / "t.csv"
    texts.write_text("text,label\n" + "".join(f"hello {i},{i % 2}\n" for i in range(10)))
    res = cli("train", texts, "--strategy", "auto", "--out", out)
    _one_line_error(res, "auto is an image strategy", "finetune")
    assert not out.exists() and not work_path(out).exists()


@pytest.mark.slow
def test_auto_on_scarce_data_keeps_a_linear_probe_run_that_exports(neu_small, tmp_path):
    from edge_tl.data import image_folder, split
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.train import load_run

    run = tmp_path / "run"
    res = cli("train", neu_small, "--test-frac", "0.25", "--out", run)
    assert res.returncode == 0, res.stderr
    assert "auto chose linear-probe" in res.stdout and "trained auto (linear-probe)" in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "auto" and metrics["chosen"] == "linear-probe"
    assert "validation images per class" in metrics["why"]
    cands = metrics["auto"]["candidates"]
    assert 0 <= cands["linear-probe"]["val_accuracy"] <= 1 and "skipped" in cands["finetune"]
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["strategy"] == "linear-probe"  # an ordinary linear-probe run
    assert record["auto"]["config"]["strategy"] == "auto" and record["auto"]["chosen"]
    assert not work_path(run).exists()
    assert load_run(run)[0]["config"]["strategy"] == "linear-probe"
    export_bundle(tmp_path / "b", "onnx-fp32", run=run)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["strategy"] == "linear-probe"
    ds = image_folder(neu_small)
    test = ds.subset(split(ds, TrainConfig(test_frac=0.25).split)["test"])
    assert 0 <= Model(tmp_path / "b").evaluate(test).accuracy <= 1


# Trained in a child interpreter: this suite's process, after in-process adapted training
# (tests/test_adapt.py) and this run, crashed in a later fork (a freed list in the main
# thread), so the pytest process keeps no state of it.
_TWO_ARMS = """
import dataclasses, json, sys
from edge_tl.train import TrainConfig, train
from edge_tl.train import auto
auto.AUTO_ARMS = tuple(dataclasses.replace(a, min_val_per_class=0) for a in auto.AUTO_ARMS[:2])
cfg = TrainConfig(epochs=1, train_stages=1, batch_size=8, test_frac=0.25, val_frac=0.25)
print(json.dumps(train(sys.argv[1], sys.argv[2], cfg)))
"""


@pytest.mark.slow
def test_auto_trains_each_candidate_and_keeps_the_best_on_validation(neu_small, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", _TWO_ARMS, str(neu_small), str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    cands = metrics["auto"]["candidates"]
    assert set(cands) == {"linear-probe", "finetune"}
    vals = {k: v["val_accuracy"] for k, v in cands.items()}
    best = "finetune" if vals["finetune"] > vals["linear-probe"] else "linear-probe"
    assert metrics["chosen"] == best and metrics["val_accuracy"] == vals[best]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["strategy"] == best and record["config"]["train_stages"] == 1
