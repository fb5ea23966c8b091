"""Data sets: ImageFolder checks, image decoding, stratified splits, the ELPV package."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_tl.data import elpv, image_folder, stratified_split
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.preprocess import load_image, to_input
from edge_tl.spec import Preprocess
from tests.conftest import make_image


def _folder(tmp_path, classes=("a", "b"), n=3):
    for c in classes:
        (tmp_path / c).mkdir()
        for i in range(n):
            make_image(tmp_path / c / f"{i}.png", seed=i)
    return tmp_path


def test_image_folder_reads_classes_sorted_and_ignores_hidden_files(tmp_path):
    _folder(tmp_path, ("b", "a"))
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    ds = image_folder(tmp_path)
    assert ds.classes == ["a", "b"]
    assert len(ds) == 6 and list(np.bincount(ds.labels)) == [3, 3]


@pytest.mark.parametrize(
    "breakage, words",
    [
        ("missing", "does not exist"),
        ("no_classes", "no class folders"),
        ("empty_class", "is empty"),
        ("text_file", "is not an image file"),
        ("corrupt_image", "is not a readable image"),
    ],
)
def test_bad_folders_fail_with_a_message_that_names_the_problem(tmp_path, breakage, words):
    root = tmp_path / "data"
    if breakage != "missing":
        root.mkdir()
    if breakage in ("empty_class", "text_file", "corrupt_image"):
        _folder(root)
    if breakage == "empty_class":
        (root / "c").mkdir()
    if breakage == "text_file":
        (root / "a" / "notes.txt").write_text("not an image")
    if breakage == "corrupt_image":
        (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(EdgeTLError, match=words) as e:
        image_folder(root)
    assert "\n" not in str(e.value)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / "x.png"
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    else:
        make_image(path, mode=mode)
    img = load_image(path)
    assert img.mode in ("RGB", "L")
    x = to_input(img, Preprocess(size=8, mean=(0.0,) * 3, std=(1.0,) * 3))
    assert x.shape == (3, 8, 8)
    if mode in ("L", "I;16"):
        assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    if mode == "I;16":
        assert x.min() == 255  # full-scale 16-bit stays full-scale


def test_16_bit_and_float_images_scale_by_their_type_not_their_content():
    pre = Preprocess(size=2, mean=(0.0,) * 3, std=(1.0,) * 3)
    dark16 = Image.fromarray(np.full((2, 2), 200, np.uint16))  # 200 of 65535: nearly black
    assert to_input(load_image(dark16), pre).max() == 1.0
    half = Image.fromarray(np.full((2, 2), 0.5, np.float32))  # float intensities in 0..1
    assert to_input(load_image(half), pre).max() == 128.0


def test_grey_and_rgb_of_the_same_picture_give_the_same_input():
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8))
    pre = Preprocess(size=16, mean=(127.0,) * 3, std=(128.0,) * 3)
    np.testing.assert_allclose(to_input(grey, pre), to_input(grey.convert("RGB"), pre), atol=1e-6)


def test_preprocess_follows_the_manifest_numbers():
    pre = Preprocess(size=4, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
    x = to_input(Image.new("RGB", (10, 6), (255, 127, 0)), pre)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [1.0, 0.0, -127 / 128], atol=1e-6)


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    s = stratified_split(labels, test_frac=0.2, val_frac=0.1, seed=0)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(100))
    assert list(np.bincount(labels[s["test"]])) == [10, 6, 4]
    assert list(np.bincount(labels[s["val"]])) == [5, 3, 2]
    again = stratified_split(labels, 0.2, 0.1, seed=0)
    other = stratified_split(labels, 0.2, 0.1, seed=1)
    assert np.array_equal(s["test"], again["test"]) and not np.array_equal(s["test"], other["test"])
    with pytest.raises(EdgeTLError, match="invalid"):
        stratified_split(labels, test_frac=1.2)


def test_elpv_package_loads_with_the_published_labelling():
    pytest.importorskip("elpv_dataset")
    ds = elpv()
    assert len(ds) == 2624 and ds.classes == ["functional", "defective"]
    probs = np.array([float(m["defect_probability"]) for m in ds.meta])
    assert np.array_equal(ds.labels, (probs >= 0.5).astype(int))
    assert {m["type"] for m in ds.meta} == {"mono", "poly"}
    assert load_image(ds.paths[0]).size == (300, 300)


def test_elpv_subsets_split_the_set_by_cell_type():
    pytest.importorskip("elpv_dataset")
    from edge_tl.data import open_dataset

    mono, poly, whole = open_dataset("elpv:mono"), open_dataset("elpv:poly"), elpv()
    assert (mono.name, poly.name) == ("elpv:mono", "elpv:poly")
    assert len(mono) + len(poly) == len(whole)
    assert {m["type"] for m in mono.meta} == {"mono"} and {m["type"] for m in poly.meta} == {"poly"}
    assert mono.classes == poly.classes == whole.classes
    assert not set(mono.paths) & set(poly.paths)
