"""The layer rules in pyproject.toml hold, and they catch a forbidden import when one is
added (import-linter on a copy of the package with one more import line)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not LINT.is_file():
        pytest.skip("import-linter is not installed (pip install 'edge_tl[dev]')")
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy, not the installed package
    return subprocess.run(
        [str(LINT), "--no-cache", str(root / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )


def test_the_package_keeps_its_layer_rules():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("runtime/engine.py", "import torch", "The device side needs numpy, Pillow"),
        ("train/augment.py", "import edge_tl.export.fidelity", "Face > export > workstation"),
        ("data.py", "from edge_tl.runtime import heads", "The contract (floor) imports none"),
        ("export/report_helpers.py", "import edge_tl.cli.output", "nothing imports the CLI"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    shutil.copytree(
        ROOT / "edge_tl", tmp_path / "edge_tl", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "edge_tl" / module
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    res = _lint(tmp_path)
    assert res.returncode != 0, res.stdout[-3000:]
    assert "1 broken" in res.stdout
    broken = " ".join(res.stdout.split("Broken contracts")[-1].split())
    assert contract in broken, broken[:2000]
    importer = "edge_tl." + module.removesuffix(".py").replace("/", ".")
    imported = line.split()[1]
    assert f"{importer} -> {imported}" in broken, broken[:2000]  # the offending line, named
