"""Per-class precision / recall in ``evaluate``, and a class's operating point
(``--min-recall CLASS=R``, ``--class-threshold CLASS=T``): the figures against hand counts,
the threshold's two promises (recall >= R, the largest such), and one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_tl.cli import main
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.evaluation import confusion, macro_averages
from edge_tl.runtime.operating import (
    ClassThreshold,
    class_figures,
    decide,
    min_recall_threshold,
    parse_class_values,
)
from tests.test_cli import _one_line_error, cli

KEYS = {"accuracy", "n", "precision", "recall", "f1", "support"}


def _recall(score, positive, t, passes=None):
    hit = positive & (score >= np.asarray(t, score.dtype))
    if passes is not None:
        hit &= passes
    return hit.sum() / positive.sum()


def test_per_class_figures_match_hand_counts_and_unknown_is_a_miss():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, -1, 1, 0, 2, 2, 1, 2])  # -1: called unknown
    cm, per_class, present = confusion(y, pred, ["a", "b", "c"])
    assert present == [0, 1, 2] and cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 3]]
    a, b, c = per_class["a"], per_class["b"], per_class["c"]
    assert set(a) == KEYS
    assert (a["recall"], a["precision"], a["support"]) == (1 / 3, 1 / 2, 3)  # unknown: a miss
    assert (b["recall"], b["precision"]) == (1 / 2, 1 / 3)
    assert (c["recall"], c["precision"]) == (3 / 4, 1.0)
    assert a["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert all(m["accuracy"] == m["recall"] and m["n"] == m["support"] for m in per_class.values())
    macro = macro_averages(per_class)
    assert macro["macro_recall"] == pytest.approx((1 / 3 + 1 / 2 + 3 / 4) / 3)
    # a class never called has precision 0, not NaN
    assert confusion(np.array([0, 1]), np.array([0, 0]), ["a", "b"])[1]["b"]["precision"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_min_recall_threshold_meets_r_and_is_the_largest(seed):
    rng = np.random.default_rng(seed)
    n = 60
    proba = rng.dirichlet(np.ones(3), n).astype(np.float32)
    proba[:5, 2] = proba[5, 2]  # ties
    y = rng.integers(0, 3, n)
    positive = y == 2
    for r in (0.05, 0.5, 0.8, 0.95, 1.0):
        t = min_recall_threshold(proba[:, 2], positive, r)
        assert _recall(proba[:, 2], positive, t) >= r
        above = np.nextafter(np.float32(t), np.float32(np.inf))
        assert _recall(proba[:, 2], positive, above) < r
        # the rule calls the class at exactly these images, so its recall is the same
        pred = decide(proba, ClassThreshold("c", 2, t))
        assert class_figures(y, pred, 2).recall == _recall(proba[:, 2], positive, t)
    # with an open set, only images it lets through count
    passes = rng.random(n) > 0.2
    best = (positive & passes).sum() / positive.sum()
    t = min_recall_threshold(proba[:, 2], positive, best, passes)
    assert _recall(proba[:, 2], positive, t, passes) >= best
    with pytest.raises(EdgeTLError, match="out of reach.*--no-open-set"):
        min_recall_threshold(proba[:, 2], positive, 1.0, passes & ~positive)


def test_the_rule_calls_the_class_above_its_threshold_else_the_best_other():
    p = np.array([[0.5, 0.3, 0.2], [0.7, 0.1, 0.2], [0.1, 0.2, 0.7]], np.float32)
    assert decide(p, None).tolist() == [0, 0, 2]
    assert decide(p, ClassThreshold("c", 2, 0.2)).tolist() == [2, 2, 2]
    assert decide(p, ClassThreshold("c", 2, 0.9)).tolist() == [0, 0, 1]
    f = class_figures(np.array([0, 1, 2]), np.array([2, 2, 2]), 2)
    assert (f.recall, f.precision, f.false_alarm_rate, f.accuracy) == (1.0, 1 / 3, 1.0, 1 / 3)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("defective", ["takes CLASS=R", "'defective'"]),
        ("=0.9", ["takes CLASS=R"]),
        ("defective=0", ["(0, 1]"]),
        ("defective=1.5", ["(0, 1]"]),
        ("defective=-0.1", ["(0, 1]"]),
        ("defective=high", ["(0, 1]"]),
        ("defective=nan", ["(0, 1]"]),
        ("defective=0.9,defective=0.8", ["twice"]),
    ],
)
def test_malformed_min_recall_fails_in_one_line_before_the_bundle_opens(
    tmp_path, capsys, spec, words
):
    # the bundle does not exist: the flag is refused first
    code = main(["evaluate", str(tmp_path / "no-bundle"), str(tmp_path), "--min-recall", spec])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-tl: error: --min-recall"), err
    for w in words:
        assert w in lines[0]


def test_class_threshold_parses_zero_and_refuses_out_of_range():
    assert parse_class_values(["a=0,b=1"], "--class-threshold", "t", False) == {"a": 0, "b": 1}
    with pytest.raises(EdgeTLError, match=r"\[0, 1\]"):
        parse_class_values(["a=1.01"], "--class-threshold", "t", False)


@pytest.mark.slow
def test_evaluate_json_and_text_on_a_real_bundle(bundles, neu_small):
    bundle = bundles["onnx-fp32"]
    res = cli("evaluate", bundle, neu_small, "--split", "test", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"macro_precision", "macro_recall", "macro_f1", "operating_points"} <= set(out)
    assert out["class_threshold"] is None and out["operating_points"] == []
    cm = np.array(out["confusion_matrix"])
    for i, name in enumerate(out["labels"]):  # the exported head: no open set, no unknowns
        pc = out["per_class"][name]
        assert set(pc) == KEYS
        assert pc["support"] == pc["n"] == cm[i].sum()
        assert pc["recall"] == pc["accuracy"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert pc["precision"] == pytest.approx(cm[i, i] / max(1, cm[:, i].sum()))
    assert out["macro_recall"] == pytest.approx(
        np.mean([pc["recall"] for pc in out["per_class"].values()])
    )
    text = cli("evaluate", bundle, neu_small, "--split", "test", "--min-recall", "patches=0.9")
    assert text.returncode == 0, text.stderr
    assert "precision" in text.stdout and "macro average" in text.stdout
    assert "--min-recall patches=0.9: threshold" in text.stdout
    assert "optimistic" in text.stdout and "--split val" in text.stdout
    assert "chose its threshold on the test split" in text.stderr


@pytest.mark.slow
def test_min_recall_on_a_real_bundle_is_the_largest_threshold_and_checks_out(bundles, neu_small):
    from edge_tl.data import image_folder
    from edge_tl.runtime import Model

    model = Model(bundles["onnx-fp32"])
    ds = image_folder(neu_small)
    emb = model.embed(ds.paths)
    proba, _, _ = model.classifier.classify(emb)
    labels = model.classifier.labels
    y = np.array([labels.index(ds.classes[i]) for i in ds.labels])
    c = labels.index("crazing")
    res = model.evaluate(ds, min_recall={"crazing": 0.9, "scratches": 1.0})
    assert [p.label for p in res.operating_points] == ["crazing", "scratches"]
    point = res.operating_points[0]
    t = point.threshold
    assert point.min_recall == 0.9 and point.caveat and "--split val" in point.caveat
    assert _recall(proba[:, c], y == c, t) >= 0.9 == point.min_recall
    assert _recall(proba[:, c], y == c, np.nextafter(np.float32(t), np.float32(1))) < 0.9
    assert point.at_threshold.recall == _recall(proba[:, c], y == c, t)
    assert point.argmax.recall == res.per_class["crazing"]["recall"]
    assert point.argmax.accuracy == res.accuracy
    assert (point.n_class, point.n_other) == (16, 32)
    # the threshold given back is measured under its rule (the check on another split)
    check = model.evaluate(ds, class_threshold={"crazing": t})
    assert check.class_threshold == {"label": "crazing", "threshold": t}
    assert check.per_class["crazing"]["recall"] == point.at_threshold.recall
    assert check.accuracy == point.at_threshold.accuracy
    # the exported head was refitted on the training and validation images: val says so
    val = model.evaluate(neu_small, split="val", min_recall={"crazing": 0.5})
    assert "not held out" in val.operating_points[0].caveat
    # ... and predict answers by the same rule: at T = 0 everything is crazing
    preds = model.predict(ds.paths[:3], class_threshold={"crazing": 0.0})
    assert [p.label for p in preds] == ["crazing"] * 3


@pytest.mark.slow
def test_operating_point_bad_input_on_a_real_bundle(bundles, neu_small, tmp_path):
    bundle = bundles["onnx-fp32"]
    _one_line_error(
        cli("evaluate", bundle, neu_small, "--min-recall", "defective=0.9"),
        "no class 'defective'",
        "crazing, patches, scratches",
    )
    two = tmp_path / "two"
    for name in ("crazing", "patches"):
        shutil.copytree(neu_small / name, two / name)
    res = cli("evaluate", bundle, two, "--min-recall", "scratches=0.9", "--json")
    _one_line_error(res, "'scratches' has no images", "crazing, patches")
    assert res.stdout == ""
    _one_line_error(
        cli(
            "evaluate",
            bundle,
            neu_small,
            "--min-recall",
            "crazing=0.9",
            "--class-threshold",
            "crazing=0.3",
        ),
        "--class-threshold",
        "--split val",
    )
    _one_line_error(
        cli(
            "predict",
            bundle,
            next((neu_small / "crazing").iterdir()),
            "--class-threshold",
            "crazing=0.3,patches=0.3",
        ),
        "one class",
    )
    _one_line_error(
        cli(
            "predict",
            bundle,
            next((neu_small / "crazing").iterdir()),
            "--class-threshold",
            "rust=0.3",
        ),
        "no class 'rust'",
    )
    pred = cli(
        "predict",
        bundle,
        next((neu_small / "patches").iterdir()),
        "--json",
        "--class-threshold",
        "crazing=0",
    )
    assert json.loads(pred.stdout)[0]["label"] == "crazing", pred.stderr
