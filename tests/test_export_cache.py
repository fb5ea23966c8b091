"""Exports that reuse their work: the run's export cache (reuse, invalidation), several
recipes in one call (bad lists refused before any work, a refused recipe keeping the
others), and the one-layer-at-a-time sensitivity ranking."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from edge_tl.export import export_bundle, export_bundles
from edge_tl.export.cache import CACHE_DIR, ExportCache, run_key
from edge_tl.export.pipeline import parse_recipes
from edge_tl.spec import load_recipe


def _fake_run(root: Path) -> Path:
    root.mkdir()
    (root / "run.json").write_text('{"backbone": "x"}\n')
    np.savez(root / "head.npz", w=np.ones(3))
    return root


# ---- the cache on its own ------------------------------------------------------------------
def test_cache_reuses_arrays_across_instances_and_is_wiped_when_the_run_changes(tmp_path):
    run = _fake_run(tmp_path / "run")
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    first = ExportCache.for_run(run)
    a = first.array("emb-x", compute)
    again = ExportCache.for_run(run)  # a later export of the same run
    b = again.array("emb-x", compute)
    assert len(calls) == 1 and again.hits == ["emb-x.npz"]
    np.testing.assert_array_equal(a, b)
    key = run_key(run)
    (run / "head.npz").unlink()
    np.savez(run / "head.npz", w=np.zeros(3))  # trained again: other weights
    assert run_key(run) != key
    changed = ExportCache.for_run(run)
    changed.array("emb-x", compute)
    assert len(calls) == 2 and changed.hits == []
    assert json.loads((run / CACHE_DIR / "key.json").read_text())["run_key"] == run_key(run)
    files = sorted(p.name for p in (run / CACHE_DIR).iterdir())
    assert files == ["emb-x.npz", "key.json"]  # npz and json only, no pickles


def test_a_cache_that_cannot_be_written_still_shares_in_memory(tmp_path):
    run = _fake_run(tmp_path / "run")
    (run / CACHE_DIR).write_text("in the way")  # as a read-only folder would: no cache there
    cache = ExportCache.for_run(run)
    assert not cache.writable
    calls = []
    cache.array("a", lambda: calls.append(1) or np.zeros(2))
    cache.array("a", lambda: calls.append(1) or np.zeros(2))
    assert calls == [1] and (run / CACHE_DIR).read_text() == "in the way"


# ---- recipe lists -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, words",
    [
        ("onnx-fp32,,ort-int8", "empty item"),
        ("onnx-fp32,", "empty item"),
        ("ort-int8,onnx-fp32,ort-int8", "named twice"),
        ("onnx-fp32,ort-int9", "unknown recipe 'ort-int9'"),
        (",", "no recipe given"),
    ],
)
def test_bad_recipe_lists_are_refused_in_one_line(spec, words):
    with pytest.raises(EdgeTLError, match=words) as err:
        parse_recipes(spec)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_recipe_list_before_any_work(tmp_path):
    out = tmp_path / "bundles"
    res = subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", "export", str(tmp_path / "no-run")]
        + ["--recipe", "onnx-fp32,onnx-fp32", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("edge-tl: error: recipe onnx-fp32 is named twice")
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


# ---- real exports -------------------------------------------------------------------------
def _loose(name: str):
    """The slice's INT8 tolerance (see tests/conftest.py ``bundles``)."""
    r = load_recipe(name)
    return dataclasses.replace(r, min_cosine=0.93, max_top1_drop=0.17, calibration_subsets=0)


@pytest.fixture(scope="module")
def run_copy(lp_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cache") / "run"
    shutil.copytree(lp_run, run, ignore=shutil.ignore_patterns(CACHE_DIR))
    return run


@pytest.mark.slow
def test_recipes_of_one_call_share_the_graph_and_a_later_export_reuses_it(
    run_copy, tmp_path, monkeypatch
):
    import edge_tl.export.graph as graph

    exports = []
    real = graph.export_onnx
    monkeypatch.setattr(graph, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    strict = dataclasses.replace(
        load_recipe("ort-int8"),
        name="ort-int8-strict",
        min_cosine=0.99999,
        accuracy_control=False,
        calibration_subsets=0,
    )
    results = export_bundles(
        tmp_path / "b", ["onnx-fp32", _loose("ort-int8"), strict], run=run_copy
    )
    assert [r.recipe for r in results] == ["onnx-fp32", "ort-int8", "ort-int8-strict"]
    assert exports == [1]  # one ONNX export for every recipe
    fp32, int8, refused = results
    assert fp32.manifest is not None and int8.manifest is not None
    assert (tmp_path / "b" / "ort-int8" / "manifest.json").is_file()
    # a refused recipe loses nothing of the others and writes nothing of its own
    assert refused.manifest is None and "misses its tolerance" in str(refused.refused)
    assert not (tmp_path / "b" / "ort-int8-strict").exists()
    cached = sorted(p.suffix for p in (run_copy / CACHE_DIR).iterdir())
    assert set(cached) == {".json", ".npz", ".onnx"}

    # a later single export of the same run: no ONNX export, no decoding, no FP32
    # embedding (every progress bar of the measurement says what it does), same figures
    import edge_tl.export.fidelity as fidelity

    bars: list[str] = []
    monkeypatch.setattr(
        fidelity, "progress", lambda items, total=None, desc="": bars.append(desc) or iter(items)
    )
    again = export_bundle(tmp_path / "again", "onnx-fp32", run=run_copy)
    assert exports == [1] and "checking the artifact" in bars
    assert not [b for b in bars if b.startswith("decoding") or "FP32" in b or "PyTorch" in b]
    for key in ("embedding_cosine_vs_fp32", "parity_max_abs_diff", "test_accuracy"):
        assert again.metrics[key] == fp32.manifest.metrics[key]

    # the run trained again (here: its record touched): everything is made afresh
    with open(run_copy / "run.json", "a") as f:
        f.write("\n")
    export_bundle(tmp_path / "third", "onnx-fp32", run=run_copy)
    assert exports == [1, 1]


@pytest.mark.slow
def test_cli_several_recipes_exit_1_when_one_is_refused(run_copy, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text(
        'format = "onnx"\nprecision = "int8"\nquantization = "ort-static"\n'
        "calibration_size = 24\nmin_cosine = 0.99999\naccuracy_control = false\n"
        "calibration_subsets = 0\n"
    )
    out = tmp_path / "bundles"
    res = subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", "export", str(run_copy)]
        + ["--recipe", f"onnx-fp32,{strict}", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    assert "exported onnx-fp32 ->" in res.stdout and "refused strict:" in res.stdout
    assert "1 of 2 recipes refused by accuracy control (strict)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["onnx-fp32"]


@pytest.mark.slow
def test_one_layer_at_a_time_ranking_covers_every_convolution(run_copy, tmp_path):
    """Every convolution gets its own INT8 copy; one already kept in FP32 loses nothing."""
    from edge_tl.export.accuracy_control import AccuracyControl
    from edge_tl.export.fidelity import Images
    from edge_tl.export.graph import export_onnx
    from edge_tl.export.quantize import conv_nodes, ort_preprocessed
    from edge_tl.export.sensitivity import ort_sensitivity
    from edge_tl.export.source import open_run

    src = open_run(run_copy, None, "source")
    pre = src.features.spec.preprocess
    assert src.fit_set is not None
    calib = Images(list(src.fit_set.paths)[:16], pre).inputs()
    export_onnx(src.features, tmp_path / "fp32.onnx", pre.size)
    rec = load_recipe("ort-int8")
    c = AccuracyControl(
        tmp_path / "fp32.onnx", rec, calib, tmp_path, tmp_path, None, None, None, None
    )  # type: ignore[arg-type]
    names = [n["name"] for n in conv_nodes(ort_preprocessed(tmp_path / "fp32.onnx", tmp_path))]
    ranking = ort_sensitivity(c, rec)
    assert sorted(r["name"] for r in ranking) == sorted(names)
    losses = [r["loss"] for r in ranking]
    assert losses == sorted(losses, reverse=True) and losses[0] > 0.0
    assert sum(v > 0 for v in losses) >= len(names) // 2  # INT8 changes most layers' output
    top = ranking[0]["name"]
    again = ort_sensitivity(c, dataclasses.replace(rec, nodes_to_exclude=(top,)))
    assert next(r for r in again if r["name"] == top)["loss"] == 0.0


def test_a_step_without_progress_of_its_own_says_when_it_is_done(capsys, monkeypatch):
    from edge_tl.progress import step

    monkeypatch.delenv("EDGE_TL_QUIET", raising=False)
    with step("exporting to ONNX"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("exporting to ONNX") and "[done]" in err[0]
    monkeypatch.setenv("EDGE_TL_QUIET", "1")
    with step("silent"):
        pass
    assert capsys.readouterr().err == ""
