"""``edge-tl select``: ranking backbones by transferability, its checks and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edge_tl.backbones import REGISTRY  # noqa: E402
from edge_tl.cli import main  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.train.select import (  # noqa: E402
    BackboneScore,
    negative_transfer,
    parse_backbones,
    read_results,
    select_summary,
    summary_line,
    weighted_tau,
)
from tests.conftest import make_image  # noqa: E402


@pytest.fixture
def tiny(tmp_path) -> Path:
    root = tmp_path / "tiny"
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            make_image(root / cls / f"{i}.png", seed=10 * c + i)
    return root


def _row(name: str, lm: float, acc: float | None = None, **kw) -> BackboneScore:
    return BackboneScore(name, lm, kw.get("leep", -1.0), kw.get("h", 1.0), 8, 1.0, 1.0, acc)


def _no_weights() -> str:
    names = [n for n, s in REGISTRY.items() if not s.available_offline()]
    if not names:
        pytest.skip("every backbone has weights on this machine")
    return names[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--backbones", "resnet9"], "unknown backbone 'resnet9'; choose one of"),
        (["--backbones", "efficientnet_lite0,efficientnet_lite0"], "lists a backbone twice"),
        (["--backbones", "all-minilm-l6-v2"], "text encoder"),
        (["--backbones", "NOWEIGHTS"], "has no pretrained weights on this machine"),
        (["--results", "missing.json"], "is not a run folder, a compare folder or a .json"),
        (["--results", "bad.json"], "accuracy of efficientnet_lite0 is 87"),
        (["--per-class", "-1"], "--per-class must be 0"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(tiny, tmp_path, capsys, flags, words):
    (tmp_path / "bad.json").write_text(json.dumps({"efficientnet_lite0": 87}))
    flags = [f.replace("NOWEIGHTS", _no_weights()) if f == "NOWEIGHTS" else f for f in flags]
    flags = [str(tmp_path / f) if f.endswith(".json") else f for f in flags]
    out = tmp_path / "sel"
    assert main(["select", str(tiny), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-tl: error:") and words in err and "\n" not in err
    assert not out.exists()


def test_an_existing_out_is_kept_without_force(tiny, tmp_path, capsys):
    out = tmp_path / "sel"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert main(["select", str(tiny), "--backbones", "efficientnet_lite0", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_default_backbones_are_the_ones_with_weights_here():
    names = parse_backbones(None)
    assert "efficientnet_lite0" in names
    assert all(REGISTRY[n].available_offline() for n in names)


def test_results_from_runs_compares_and_json(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"test_accuracy": 0.9, "train_seconds": 120.0}
    (run / "run.json").write_text(
        json.dumps({"data": str(tiny.resolve()), "backbone": "mobilenet_v2", "metrics": metrics})
    )
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    rows = [
        {"strategy": "linear-probe", "test_accuracy": 0.7, "train_seconds": 5.0},
        {"strategy": "finetune", "test_accuracy": 0.8, "train_seconds": 50.0},
        {"strategy": "from-scratch", "test_accuracy": 0.85, "train_seconds": 60.0},
    ]
    flag = "negative transfer: from-scratch (0.8500) matches or beats finetune (0.8000)"
    (cmp / "compare.json").write_text(
        json.dumps(
            {
                "data": str(tiny),
                "config": {"backbone": "efficientnet_lite0"},
                "rows": rows,
                "flags": [flag],
            }
        )
    )
    js = tmp_path / "acc.json"
    js.write_text(json.dumps({"efficientnet_lite1": 0.75}))
    found, flags = read_results([run, cmp, js], tiny)
    assert found == {
        "mobilenet_v2": {"accuracy": 0.9, "seconds": 120.0},
        "efficientnet_lite0": {"accuracy": 0.8, "seconds": 50.0},  # best transfer, not scratch
        "efficientnet_lite1": {"accuracy": 0.75, "seconds": None},
    }
    assert flags == [f"compare {cmp} (efficientnet_lite0): {flag}"]
    with pytest.raises(EdgeTLError, match="gives mobilenet_v2 twice"):
        read_results([run, run], tiny)
    with pytest.raises(EdgeTLError, match="was trained on .*, not .*other"):
        read_results([run], tmp_path / "other")


def test_weighted_tau_follows_the_ranking():
    rows = [_row("a", 0.3, 0.9, leep=-2.0), _row("b", 0.2, 0.8, leep=-1.0), _row("c", 0.1, 0.7)]
    tau = weighted_tau(rows)
    assert tau["logme"] == pytest.approx(1.0)
    assert tau["leep"] < 1.0
    assert weighted_tau(rows[:2]) == {}  # too few backbones with an accuracy


def test_negative_transfer_is_flagged_against_random_features():
    rows = [_row("efficientnet_lite0", 0.40)]
    assert negative_transfer(rows, {"backbone": "efficientnet_lite0", "logme": 0.30}) == []
    (warning,) = negative_transfer(rows, {"backbone": "efficientnet_lite0", "logme": 0.45})
    assert warning.startswith("negative transfer likely") and "from-scratch" in warning


def test_compare_reads_the_select_score(tiny, tmp_path):
    sel = tmp_path / "sel"
    sel.mkdir()
    rows = [
        {"backbone": "mobilenet_v2", "logme": 0.5},
        {"backbone": "efficientnet_lite0", "logme": 0.4},
    ]
    (sel / "select.json").write_text(
        json.dumps({"data": str(tiny), "rows": rows, "baseline": {"logme": 0.45}, "warnings": []})
    )
    s = select_summary(sel, "efficientnet_lite0", tiny)
    assert (s["rank"], s["of"], s["best"], s["logme"]) == (2, 2, "mobilenet_v2", 0.4)
    line = summary_line(s, ["negative transfer: from-scratch ..."])
    assert "LogME 0.4000, rank 2 of 2" in line and "from-scratch training says otherwise" in line
    with pytest.raises(EdgeTLError, match="not .*other; select on this data"):
        select_summary(sel, "efficientnet_lite0", tmp_path / "other")
    with pytest.raises(EdgeTLError, match="holds no select.json"):
        select_summary(tmp_path, "efficientnet_lite0", tiny)


@pytest.mark.slow
def test_select_ranks_two_backbones_on_real_images(neu_small, tmp_path, capsys):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"efficientnet_lite0": 0.9, "mobilenet_v2": 0.8}))
    out = tmp_path / "sel"
    args = ["select", str(neu_small), "--backbones", "efficientnet_lite0,mobilenet_v2"]
    assert main([*args, "--per-class", "10", "--results", str(acc), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 1 |" in table and "random-init" in table
    rec = json.loads((out / "select.json").read_text())
    assert rec["n_images"] == 30 and {r["backbone"] for r in rec["rows"]} == {
        "efficientnet_lite0",
        "mobilenet_v2",
    }
    logmes = [r["logme"] for r in rec["rows"]]
    assert logmes == sorted(logmes, reverse=True)
    assert all(np.isfinite([r["logme"], r["leep"], r["h_score"]]).all() for r in rec["rows"])
    assert all(r["leep"] <= 0 and 0 <= r["h_score"] <= 2 + 1e-6 for r in rec["rows"])
    # pretrained features separate real defect classes better than random ones
    assert rec["rows"][0]["logme"] > rec["baseline"]["logme"]
    (warning,) = rec["warnings"]  # 30 images, 1280 dimensions: no negative transfer, but
    assert warning.startswith("H-score is saturated (30 images, 1280 feature dimensions)")
    assert (out / "select.png").stat().st_size > 10_000
    assert rec["rows"][0]["finetuned_accuracy"] in (0.9, 0.8)


def test_the_comparison_table_carries_the_select_line():
    from edge_tl.train.compare import markdown

    row = {
        "strategy": "finetune",
        "test_accuracy": 0.8,
        "test_macro_f1": 0.8,
        "train_seconds": 10.0,
        "seconds_per_epoch": 3.0,
        "epochs_run": 3,
        "trainable_parameters": 1000,
        "peak_rss_mb": 900.0,
        "n_train": 10,
        "n_test": 5,
    }
    summary = {
        "select": "SEL",
        "backbone": "efficientnet_lite0",
        "logme": 0.4,
        "rank": 1,
        "of": 4,
        "best": "efficientnet_lite0",
        "baseline_logme": 0.2,
        "negative_transfer": False,
    }
    result = {"data": "d", "config": {}, "rows": [row], "flags": [], "select": summary}
    assert markdown(result).splitlines()[-1] == (
        "- select (SEL): efficientnet_lite0 LogME 0.4000, rank 1 of 4 (best: "
        "efficientnet_lite0); random-init features 0.2000"
    )
