"""Recipes as data, the manifest contract, and atomic, verified bundles."""

from __future__ import annotations

import json
import os

import pytest

from edge_tl.bundle import atomic_folder, hash_files, read_manifest
from edge_tl.errors import EdgeTLError
from edge_tl.spec import builtin_recipes, load_recipe


def test_builtin_recipes_resolve_by_name():
    assert {"onnx-fp32", "ort-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"} <= set(
        builtin_recipes()
    )
    ort = load_recipe("ort-int8")
    assert (ort.format, ort.precision, ort.quantization) == ("onnx", "int8", "ort-static")
    assert ort.engine_options["session.x64quantprecision"] == "1"
    assert load_recipe("openvino-fp32").engine_options == {"INFERENCE_PRECISION_HINT": "f32"}


def test_recipe_from_a_path_and_unknown_fields_are_named(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('format = "onnx"\nprecision = "fp32"\nparity_atol = 1e-3\n')
    assert load_recipe(str(good)).parity_atol == 1e-3
    assert load_recipe(str(good)).name == "mine"
    bad = tmp_path / "typo.toml"
    bad.write_text('format = "onnx"\nprecision = "fp32"\ncalibraton_size = 5\n')
    with pytest.raises(EdgeTLError, match="unknown field.*calibraton_size"):
        load_recipe(str(bad))


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(EdgeTLError, match="unknown recipe 'int4'.*ort-int8"):
        load_recipe("int4")


def test_inconsistent_recipe_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('format = "onnx"\nprecision = "int8"\n')
    with pytest.raises(EdgeTLError, match="needs a quantization method"):
        load_recipe(str(bad))


def test_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("export failed half-way")
    assert not out.exists() and list(tmp_path.iterdir()) == []

    with atomic_folder(out) as tmp:
        (tmp / "manifest.json").write_text("old")
    with pytest.raises(EdgeTLError, match="already exists.*--force"), atomic_folder(out):
        pass
    with pytest.raises(RuntimeError), atomic_folder(out, force=True) as tmp:
        (tmp / "manifest.json").write_text("new")
        raise RuntimeError("boom")
    assert (out / "manifest.json").read_text() == "old"
    with atomic_folder(out, force=True) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_force_never_replaces_a_folder_edge_tl_did_not_write(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    (data / "precious.jpg").write_bytes(b"x")
    with pytest.raises(EdgeTLError, match="not an edge_tl bundle"), atomic_folder(data, True):
        pass
    assert [p.name for p in data.iterdir()] == ["precious.jpg"]


def test_recipe_enums_are_checked_before_any_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'format = "onnx"\nprecision = "int8"\nquantization = "ort-static"\n'
        'activation_type = "int8"\n'
    )
    with pytest.raises(EdgeTLError, match="activation_type = 'int8' is not one of u8, s8"):
        load_recipe(str(bad))


def test_missing_parent_folders_are_created_and_removed_again_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "a" / "b" / "bundle") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "a" / "b" / "bundle") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "bundle" / "x").read_text() == "x"


def test_hashes_catch_a_modified_file(bundles):
    import shutil

    copy = bundles["onnx-fp32"].parent / "tampered"
    shutil.copytree(bundles["onnx-fp32"], copy)
    m = read_manifest(copy)
    assert set(m.files) == set(hash_files(copy)) and "backbone.onnx" in m.files
    with open(copy / "head.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(EdgeTLError, match="head.npz does not match its SHA-256"):
        read_manifest(copy)
    (copy / "backbone.onnx").unlink()
    with pytest.raises(EdgeTLError, match="backbone.onnx is missing"):
        read_manifest(copy)


def test_manifest_of_another_format_version_is_refused(bundles, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(bundles["onnx-fp32"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EdgeTLError, match="format version 99 is not supported"):
        read_manifest(copy)
    with pytest.raises(EdgeTLError, match="not a bundle"):
        read_manifest(tmp_path)


def test_device_profiles_resolve_and_name_their_recipe():
    from edge_tl.spec import builtin_profiles, load_profile

    assert "raspberry-pi-5" in builtin_profiles()
    for name in builtin_profiles():
        load_recipe(load_profile(name).recipe)  # every profile points at a real recipe
    with pytest.raises(EdgeTLError, match="unknown device profile"):
        load_profile("toaster")


def test_recipe_and_manifest_values_of_the_wrong_type_are_named(tmp_path, bundles):
    bad = tmp_path / "typed.toml"
    bad.write_text('format = "onnx"\nprecision = "fp32"\nmin_cosine = "high"\n')
    with pytest.raises(EdgeTLError, match="min_cosine = 'high' is not a finite number"):
        load_recipe(str(bad))
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundles["onnx-fp32"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["preprocess"]["size"] = "224"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EdgeTLError, match="size = '224' is not an integer"):
        read_manifest(copy)
