"""Multi-task: readers (ELPV metadata, folder levels, CSV), the joint head, the manifest's
tasks, and one end-to-end run on real ELPV cells (train -> export -> predict / evaluate per
task -> learn one task while the other stays bit-identical)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl.data import split
from edge_tl.errors import EdgeTLError
from edge_tl.multitask import open_tasks, parse_tasks, parse_weights, task_dataset
from edge_tl.spec import SplitRecord
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, layout: dict[tuple[str, str], int]) -> Path:
    for (a, b), n in layout.items():
        (root / a / b).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(root / a / b / f"{a}_{b}_{i}.png", seed=i)
    return root


def test_folder_levels_give_one_label_per_task(tmp_path):
    root = _tree(tmp_path / "parts", {("ok", "bolt"): 3, ("ok", "nut"): 2, ("bad", "nut"): 4})
    ds = open_tasks(root, ["defect", "part"])
    assert ds.tasks.names == ("defect", "part")
    assert ds.tasks.classes == (("bad", "ok"), ("bolt", "nut"))
    assert ds.classes == ["bad+nut", "ok+bolt", "ok+nut"]
    part = task_dataset(ds, "part")
    assert part.classes == ["bolt", "nut"] and np.bincount(part.labels).tolist() == [3, 6]
    assert np.bincount(task_dataset(ds, "defect").labels).tolist() == [4, 5]


def test_csv_labels_file_reads_columns_relative_to_its_folder(tmp_path):
    root = _tree(tmp_path, {("a", "x"): 2, ("b", "y"): 2})
    rows = ["path,defect,part"] + [
        f"{p.relative_to(root).as_posix()},{p.parent.parent.name},{p.parent.name}"
        for p in sorted(root.rglob("*.png"))
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = open_tasks(root / "labels.csv", ["part", "defect"])
    assert ds.tasks.names == ("part", "defect") and len(ds) == 4
    assert task_dataset(ds, "defect").classes == ["a", "b"]
    only = open_tasks(root / "labels.csv", ["part"])  # one task: an ordinary data set
    assert only.tasks is None and only.classes == ["x", "y"] and only.strata is not None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("path,defect\na/x/a_x_0.png\n", "line 2 has 1 field(s), the header 2"),
        ("path,defect\na/x/a_x_0.png,\n", "line 2: defect is empty"),
        ("path,defect\nnope.png,a\n", "line 2: nope.png is not an image file"),
        ("file,defect\na/x/a_x_0.png,a\n", "needs a header row path,<task 1>"),
        ("path,defect\n", "has a header and no rows"),
    ],
)
def test_bad_csv_rows_fail_in_one_line_naming_the_line(tmp_path, body, message):
    _tree(tmp_path, {("a", "x"): 1})
    (tmp_path / "labels.csv").write_text(body)
    with pytest.raises(EdgeTLError, match=re.escape(message)) as e:
        open_tasks(tmp_path / "labels.csv", ["defect"])
    assert "\n" not in str(e.value)


def test_a_task_with_one_class_is_refused_naming_it(tmp_path):
    root = _tree(tmp_path / "d", {("ok", "nut"): 2, ("bad", "nut"): 2})
    with pytest.raises(EdgeTLError, match=r"task 'part' of d has one class \(nut\)"):
        open_tasks(root, ["defect", "part"])


def test_folder_depth_and_task_names_must_agree(tmp_path):
    root = _tree(tmp_path / "d", {("ok", "nut"): 1, ("bad", "bolt"): 1})
    with pytest.raises(EdgeTLError, match="need 3"):
        open_tasks(root, ["a", "b", "c"])
    with pytest.raises(EdgeTLError, match="holds folders"):
        open_tasks(root, ["a"])
    with pytest.raises(EdgeTLError, match="twice"):
        parse_tasks("a,a")
    with pytest.raises(EdgeTLError, match="one per task"):
        parse_weights("1,1,1", 2)
    with pytest.raises(EdgeTLError, match="not all 0"):
        parse_weights("0,0", 2)


def test_elpv_tasks_and_one_task_runs_share_the_split():
    pytest.importorskip("elpv_dataset")
    both = open_tasks("elpv", ["defect", "type"])
    assert both.tasks.classes == (("functional", "defective"), ("mono", "poly"))
    assert np.bincount(task_dataset(both, "type").labels).tolist() == [1074, 1550]
    with pytest.raises(EdgeTLError, match="its tasks are defect, type"):
        open_tasks("elpv", ["colour"])
    record = SplitRecord(0.2, 0.1, 0)
    parts = split(both, record)
    for task in ("defect", "type"):
        one = split(open_tasks("elpv", [task]), record)
        assert all(np.array_equal(parts[k], one[k]) for k in parts)


def test_joint_head_answers_every_task_at_once():
    from edge_tl.runtime.heads import LinearHead
    from edge_tl.train.multitask import joint_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    a = LinearHead.fit(x, (x[:, 0] > 0).astype(int), 2)
    b = LinearHead.from_logits_layer(rng.normal(size=(3, 8)), rng.normal(size=3))
    table = np.array([[i, j] for i in range(2) for j in range(3)])
    joint = joint_head([a, b], table).predict_proba(x).argmax(1)
    want = [a.predict_proba(x).argmax(1), b.predict_proba(x).argmax(1)]
    assert np.array_equal(table[joint], np.stack(want, 1))


def test_manifest_tasks_are_additive():
    from edge_tl.spec import HeadEntry, Manifest, TaskEntry

    entry = TaskEntry(
        "type", ["mono", "poly"], HeadEntry("linear", "tasks/type/head.npz", "source")
    )
    raw = {
        "format_version": 1,
        "edge_tl_version": "0",
        "backbone": "b",
        "input_name": "image",
        "preprocess": {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "outputs": {"embedding": ["batch", 4]},
        "artifact": {"format": "onnx", "precision": "fp32", "files": ["a.onnx"], "recipe": "r"},
        "labels": ["x", "y"],
        "head": None,
        "metrics": {},
        "source": {"kind": "imagenet"},
        "files": {"a.onnx": "0" * 64},
    }
    single = Manifest.from_dict(raw)
    assert single.tasks is None and "tasks" not in single.to_dict()
    other = TaskEntry(
        "defect", ["ok", "bad"], HeadEntry("linear", "tasks/defect/head.npz", "source")
    )
    files = {**raw["files"], "tasks/type/head.npz": "1" * 64, "tasks/defect/head.npz": "2" * 64}
    tasks = [dataclasses.asdict(other), dataclasses.asdict(entry)]
    multi = Manifest.from_dict({**raw, "files": files, "tasks": tasks})
    assert [t.name for t in multi.tasks] == ["defect", "type"]
    again = Manifest.from_dict(json.loads(json.dumps(multi.to_dict())))
    assert again == multi
    with pytest.raises(EdgeTLError, match="has no SHA-256"):
        Manifest.from_dict({**raw, "tasks": tasks})
    with pytest.raises(EdgeTLError, match="two or more different tasks"):
        Manifest.from_dict({**raw, "files": files, "tasks": tasks[1:]})


def test_train_config_of_one_task_is_written_as_before():
    from edge_tl.train import TrainConfig

    assert "tasks" not in TrainConfig().to_dict()
    cfg = TrainConfig(tasks=("a", "b"), task_weights=(1, 2))
    assert cfg.to_dict()["task_weights"] == [1.0, 2.0]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(EdgeTLError, match="--balance sampler"):
        TrainConfig(tasks=("a", "b"), balance="loss")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", *args], capture_output=True, text=True, env=env
    )


def test_train_refuses_a_one_class_task_and_writes_nothing(tmp_path):
    root = _tree(tmp_path / "d", {("ok", "nut"): 3, ("bad", "nut"): 3})
    out = tmp_path / "run"
    r = cli("train", str(root), "--tasks", "defect,part", "--out", str(out))
    assert r.returncode != 0 and not out.exists()
    assert "task 'part' of d has one class (nut)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- end to end on real ELPV cells ------------------------------------------------------
@pytest.fixture(scope="module")
def elpv_small(tmp_path_factory) -> Path:
    """12 real ELPV cells per (defect, type) pair, as a CSV labels file of symlinks."""
    pytest.importorskip("elpv_dataset")
    root = tmp_path_factory.mktemp("elpv_small")
    ds = open_tasks("elpv", ["defect", "type"])
    rng = np.random.default_rng(0)
    rows = ["path,defect,type"]
    for j, name in enumerate(ds.classes):
        defect, kind = name.split("+")
        for i in rng.permutation(np.flatnonzero(ds.labels == j))[:16]:
            link = root / "cells" / f"{Path(ds.paths[i]).name}"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(ds.paths[i])
            rows.append(f"cells/{link.name},{defect},{kind}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_multitask_run_exports_one_bundle_that_answers_and_learns_per_task(elpv_small, tmp_path):
    from edge_tl.export import export_bundle
    from edge_tl.runtime import Model
    from edge_tl.train import TrainConfig, train

    labels = elpv_small / "labels.csv"
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    cfg = TrainConfig(strategy="linear-probe", tasks=("defect", "type"), test_frac=0.25)
    metrics = train(labels, run, cfg)
    assert set(metrics["tasks"]) == {"defect", "type"}
    assert (run / "heads" / "defect.npz").is_file() and (run / "heads" / "type.npz").is_file()
    record = json.loads((run / "run.json").read_text())
    assert [t["name"] for t in record["tasks"]] == ["defect", "type"]

    manifest = export_bundle(bundle, "onnx-fp32", run=run)
    assert [t.name for t in manifest.tasks] == ["defect", "type"]
    assert manifest.tasks[1].labels == ["mono", "poly"]
    assert set(manifest.metrics["tasks"]) == {"defect", "type"}

    model = Model(bundle)
    images = sorted(str(p) for p in (elpv_small / "cells").iterdir())[:6]
    before = model.predict(images)
    assert set(before[0].tasks) == {"defect", "type"}
    assert before[0].to_dict()["tasks"]["type"]["label"] in ("mono", "poly")
    res = model.evaluate(labels, split="test")
    assert set(res.tasks) == {"defect", "type"} and res.n == 16
    assert res.tasks["type"].labels == ["mono", "poly"]
    assert res.tasks["type"].accuracy > 0.6  # cell type is easy: textures differ

    # learn the type task only, from the other cells of the source, through the CLI
    support = tmp_path / "support"
    for kind in ("mono", "poly"):
        (support / kind).mkdir(parents=True)
    pairs = [r.split(",") for r in labels.read_text().splitlines()[1:]]
    for path, _, kind in pairs[::4]:
        (support / kind / Path(path).name).symlink_to((elpv_small / path).resolve())
    r = cli("learn", str(bundle), str(support), "--task", "type", "--add", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["head"]["version"] == 1
    r = cli("learn", str(bundle), str(support), "--add")
    assert r.returncode != 0 and "pass --task NAME" in r.stderr
    after = Model(bundle)
    assert after.tasks["type"].state.meta.get("version") == 1
    assert after.tasks["defect"].store.current() is None  # untouched: no version written
    emb = after.embed(images)
    p_before = model.tasks["defect"].classify(emb)[0]
    p_after = after.tasks["defect"].classify(emb)[0]
    assert np.array_equal(p_before, p_after)  # bit-identical
    assert [p.tasks["defect"] for p in after.predict(images)] == [p.tasks["defect"] for p in before]
    r = cli("predict", str(bundle), images[0], "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)[0]["tasks"]) == {"defect", "type"}
    r = cli("rollback", str(bundle), "--task", "type", "--list", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
