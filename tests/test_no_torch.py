"""The device side runs with torch and torchvision blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = "import sys\nfor m in ('torch', 'torchvision'):\n    sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_runtime_imports_without_torch():
    res = _run("""
        import edge_tl.runtime, edge_tl.runtime.bench, edge_tl.runtime.learner, edge_tl.data
        import edge_tl.runtime.anomaly, edge_tl.runtime.patchcore, edge_tl.runtime.evaluation
        import edge_tl.runtime.overlay, edge_tl.runtime.versions, edge_tl.report
        import edge_tl.runtime.align
        import importlib.util
        if importlib.util.find_spec("fastapi") is not None:  # the serve extra
            import edge_tl.serve, edge_tl.serve.app, edge_tl.serve.learning
            import edge_tl.serve.metrics, edge_tl.serve.protocol, edge_tl.serve.security
        import edge_tl.bundle, edge_tl.spec, edge_tl.cli, edge_tl.cli.parser, edge_tl.cli.output
        try:
            import torch
        except ImportError:
            print("blocked")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "blocked"


@pytest.mark.slow
def test_bundles_run_without_torch(bundles, neu_small):
    img = sorted((neu_small / "crazing").iterdir())[0]
    for recipe in ("ort-int8", "openvino-int8"):
        res = _run(f"""
            from edge_tl.runtime import Model
            from edge_tl.data import image_folder
            m = Model({str(bundles[recipe])!r})
            print(m.predict([{str(img)!r}])[0].label)
            print(m.evaluate(image_folder({str(neu_small)!r})).n)
            print(sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision")
                         and sys.modules[k] is not None))
        """)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["crazing", "48", "[]"]


@pytest.mark.slow
def test_learning_and_rollback_run_without_torch(bundles, neu_small, tmp_path):
    import shutil

    bundle = shutil.copytree(bundles["ort-int8"], tmp_path / "b")
    res = _run(f"""
        from edge_tl.runtime import Model
        m = Model({str(bundle)!r})
        m.adapt({[str(p) for p in sorted(neu_small.glob("*/*"))] * 2!r}, method="coral")
        m.classifier.learn({str(neu_small)!r}, head="linear")
        m.classifier.add_class("again", [{str(sorted((neu_small / "patches").iterdir())[0])!r}])
        m.classifier.rollback()
        print(m.classifier.history()[0]["op"])
        print(Model({str(bundle)!r}).classifier.labels)
        print(sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision")
                     and sys.modules[k] is not None))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == [
        "adapt coral on 96 images",
        "['crazing', 'patches', 'scratches']",
        "[]",
    ]


@pytest.mark.slow
def test_anomaly_bank_builds_scores_and_grows_without_torch(bundles, tmp_path):
    import shutil

    from tests.conftest import SHARED, need

    good = sorted((need(SHARED / "magnetic_tile") / "train/good").iterdir())
    bundle = shutil.copytree(bundles["ort-int8"], tmp_path / "b")
    res = _run(f"""
        from edge_tl.runtime import Model
        m = Model({str(bundle)!r})
        from PIL import Image
        m.detector.fit({[str(p) for p in good[:6]]!r})
        m.detector.add({[str(p) for p in good[6:9]]!r})
        r = m.detector.predict({[str(good[9])]!r}, maps=True)[0]
        print(Model({str(bundle)!r}).detector.state.summary()["images"], r.map.shape[::-1]
              == Image.open({str(good[9])!r}).size)
        print(sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision")
                     and sys.modules[k] is not None))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["9 True", "[]"]


def test_workstation_commands_on_a_device_install_say_what_to_install(tmp_path):
    for args in (
        ["train", str(tmp_path), "--out", str(tmp_path / "r")],
        ["export", str(tmp_path), "--out", str(tmp_path / "b")],
    ):
        res = _run(f"from edge_tl.cli import main; sys.exit(main({args!r}))")
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'edge_tl[train]'" in lines[0], res.stderr


@pytest.mark.slow
def test_text_bundle_learns_and_answers_without_torch_or_transformers(text_fp32_bundle, tmp_path):
    """The text device path: the bundle's tokenizer (Rust `tokenizers`), the engine, numpy
    pooling and a head learned from real TREC-6 questions, with torch, transformers and
    optimum blocked."""
    import shutil

    bundle = shutil.copytree(text_fp32_bundle, tmp_path / "b")
    blocked = ("transformers", "optimum", "sentence_transformers")
    block = f"for m in {blocked!r}:\n    sys.modules[m] = None\n"
    res = _run(
        block
        + f"""
from edge_tl.runtime import Model
m = Model({str(bundle)!r})
m.classifier.learn({{
    "human": ["Who wrote Hamlet ?", "Who was the first president of the United States ?",
              "Who invented the telephone ?"],
    "location": ["Where is the Eiffel Tower ?", "What country is Lima the capital of ?",
                 "Where do kangaroos live ?"],
}}, quantile=None)
print(m.predict(["Who painted the Mona Lisa ?"])[0].label)
print(sorted(k for k in sys.modules if k.split(".")[0] in
             ("torch", "torchvision", "transformers", "optimum") and sys.modules[k] is not None))
"""
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["human", "[]"]
