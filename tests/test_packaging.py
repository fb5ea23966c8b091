"""Recipes and device profiles ship inside the wheel and resolve from an installed copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_recipes_and_they_resolve_when_installed(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ beside the sources
    skip = (".venv", ".git", ".gpu", "build", "*.egg-info", "demo-output", "__pycache__")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "dist").glob("edge_tl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("onnx-fp32", "ort-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"):
        assert f"edge_tl/recipes/{recipe}.toml" in names
    assert any(n.startswith("edge_tl/profiles/") and n.endswith(".toml") for n in names)
    assert "edge_tl/py.typed" in names
    # every module of the source tree ships (a new subpackage left out of pyproject.toml's
    # package list would install without it)
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "edge_tl").rglob("*.py")}
    assert source - set(names) == set(), sorted(source - set(names))
    # and the device service's page (HTML, CSS, JS) with it
    page = {p.relative_to(ROOT).as_posix() for p in (ROOT / "edge_tl/serve/static").iterdir()}
    assert page and page - set(names) == set(), sorted(page - set(names))

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path = [p for p in sys.path if 'edge_tl' not in p and p not in ('', '.')];"
        f"sys.path.insert(0, {str(site)!r});"
        "import edge_tl.spec as s; r = s.load_recipe('ort-int8');"
        "import edge_tl.cli.parser, edge_tl.export, edge_tl.runtime, edge_tl.report;"
        "print(s.__file__); print(s._data_dir('recipes', 'export'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    module_file, data_dir = out.stdout.split()
    assert module_file.startswith(str(site)) and data_dir.startswith(str(site))
