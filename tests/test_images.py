"""Every odd image a camera or a phone can produce, and the one folder rule: decoded to the
same input as the clean image, or refused in one typed line; hidden and OS files ignored by
every command; bad files stop a folder command or, with --skip-bad, are listed."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_tl.cli.output import _finite
from edge_tl.data import image_folder
from edge_tl.errors import EdgeTLError
from edge_tl.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    check_images,
    entries,
    folder_images,
    ignored,
)
from edge_tl.runtime.anomaly import good_images
from edge_tl.runtime.detector import overlay_name
from edge_tl.runtime.evaluation import load_mask, mvtec_test
from edge_tl.runtime.preprocess import load_image, to_input
from edge_tl.spec import Preprocess
from tests.test_cli import _one_line_error, cli

PRE = Preprocess(size=32, mean=(0.0,) * 3, std=(1.0,) * 3)


def _picture(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colour picture (JPEG keeps it close; noise would not survive compression)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.05, 0.2, 3)
    rgb = np.stack(
        [128 + 100 * np.sin(a * x), 128 + 100 * np.cos(b * y), 128 + 60 * np.sin(c * (x + y))], -1
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _input(path) -> np.ndarray:
    return to_input(load_image(path), PRE)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A valid PNG of 13,400 x 13,400 blank pixels: 22 KB on disk, 180 MP decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (13_400, 13_400)).save(path)
    return path


# ---- one image ------------------------------------------------------------------------
def test_a_decompression_bomb_is_refused_naming_the_limit_and_how_to_raise_it(bomb):
    with pytest.raises(BadImageError) as e:
        load_image(bomb)
    msg = str(e.value)
    assert "179,560,000 pixels" in msg and f"{DEFAULT_MAX_PIXELS:,}" in msg, msg
    assert "EDGE_TL_MAX_PIXELS=180000000" in msg and "\n" not in msg


def test_the_pixel_limit_is_edge_tls_own_and_the_variable_moves_it(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    _picture(40, 30).save(path)  # 1,200 pixels
    monkeypatch.setenv("EDGE_TL_MAX_PIXELS", "1000")
    with pytest.raises(BadImageError, match=r"40 x 30 = 1,200 pixels.*EDGE_TL_MAX_PIXELS=1000000"):
        load_image(path)
    with pytest.raises(BadImageError):  # folder commands check with the same limit
        check_images([path])
    monkeypatch.setenv("EDGE_TL_MAX_PIXELS", "1200")
    assert load_image(path).size == (40, 30)
    monkeypatch.setenv("EDGE_TL_MAX_PIXELS", "many")
    with pytest.raises(EdgeTLError, match="EDGE_TL_MAX_PIXELS='many' is not a pixel count"):
        load_image(path)


def test_no_pillow_warning_reaches_the_user(tmp_path, monkeypatch):
    """Corrupt EXIF, palette transparency as bytes, and Pillow's own size warning: each
    image decodes, and not one warning escapes (here warnings are errors)."""
    img = _picture()
    # an orientation tag whose value lies past the end of the EXIF block
    img.save(
        tmp_path / "exif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03"
    )
    img.convert("P").save(tmp_path / "ptrans.png", transparency=b"\x00" * 10)
    img.save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # Pillow warns above 2,000 pixels
    monkeypatch.setenv("EDGE_TL_MAX_PIXELS", "3500")  # 64 x 48 = 3,072: under edge_tl's limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("exif.jpg", "ptrans.png", "big.png"):
            assert load_image(tmp_path / name).mode == "RGB"
        assert check_images([tmp_path / "exif.jpg", tmp_path / "big.png"])[0]


def _odd(tmp_path: Path, kind: str) -> tuple[Path, float]:
    """The clean picture saved as ``kind``, and the largest input difference (grey levels)
    allowed against the clean image."""
    img = _picture()
    p = tmp_path / f"{kind}.png"
    if kind == "cmyk-tiff":
        p = tmp_path / "cmyk.tif"
        img.convert("CMYK").save(p)
        return p, 0
    if kind == "cmyk-jpeg":
        p = tmp_path / "cmyk.jpg"
        img.convert("CMYK").save(p, quality=95)
        return p, 12
    if kind == "progressive-jpeg":
        p = tmp_path / "prog.jpg"
        img.save(p, quality=95, progressive=True)
        return p, 12
    if kind == "rgba":
        img.putalpha(200)
        img.save(p)
        return p, 0
    if kind == "16-bit":
        grey = np.asarray(img.convert("L"), np.uint16) * 257  # the same levels in 16 bits
        Image.fromarray(grey).save(p)
        return p, 0
    if kind == "float":
        p = tmp_path / "float.tif"
        Image.fromarray(np.asarray(img.convert("L"), np.float32) / 255).save(p)
        return p, 0
    if kind == "multi-frame-gif":
        p = tmp_path / "anim.gif"
        img.save(p, save_all=True, append_images=[Image.new("RGB", img.size, "red")])
        return p, 80  # 256 colours of a dithered palette
    if kind == "multi-frame-tiff":
        p = tmp_path / "pages.tiff"
        img.save(p, save_all=True, append_images=[Image.new("RGB", img.size, "red")])
        return p, 0
    if kind == "exif-rotated":
        p = tmp_path / "rot.jpg"
        exif = Image.Exif()
        exif[0x0112] = 8  # stored rotated 90 degrees: displayed upright
        img.transpose(Image.Transpose.ROTATE_270).save(p, exif=exif, quality=95)
        return p, 12
    if kind == "upper-case":
        p = tmp_path / "PART 01 ÄÖ 部品.PNG"
        img.save(p)
        return p, 0
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "cmyk-tiff",
        "cmyk-jpeg",
        "progressive-jpeg",
        "rgba",
        "16-bit",
        "float",
        "multi-frame-gif",
        "multi-frame-tiff",
        "exif-rotated",
        "upper-case",
    ],
)
def test_odd_images_give_the_input_of_the_clean_image(tmp_path, kind):
    path, tol = _odd(tmp_path, kind)
    clean = to_input(_picture(), PRE)
    if kind in ("16-bit", "float"):
        clean = to_input(_picture().convert("L"), PRE)
    x = _input(path)
    assert x.shape == clean.shape
    assert np.abs(x - clean).mean() <= max(tol / 4, 0.5), (kind, np.abs(x - clean).mean())
    assert np.abs(x - clean).max() <= max(tol * 4, 1), (kind, np.abs(x - clean).max())
    assert check_images([path]) == ([str(path)], [])


@pytest.mark.parametrize("size", [(1, 1), (4000, 1), (1, 4000)])
def test_degenerate_sizes_decode(tmp_path, size):
    path = tmp_path / "thin.png"
    _picture(*size).save(path)
    assert _input(path).shape == (3, 32, 32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.95])
def test_truncated_and_empty_files_are_refused_in_one_typed_line(tmp_path, fmt, keep):
    buf = io.BytesIO()
    _picture(200, 150).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadImageError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadImageError, match="--skip-bad"):
        check_images([path])  # the same verdict from the up-front check of folder commands


def _decodes_or_typed_error(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(data)
        try:
            img = load_image(path)
        except EdgeTLError as e:
            assert "\n" not in str(e)
            return
        assert img.mode in ("RGB", "L")
        assert to_input(img, PRE).shape == (3, 32, 32)


_SEEDS = {}
for _fmt in ("JPEG", "PNG"):
    _buf = io.BytesIO()
    _picture(48, 32).save(_buf, _fmt)
    _SEEDS[_fmt] = _buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.sampled_from([".jpg", ".png", ".gif", ".tif", ".bin"]))
def test_random_bytes_decode_or_raise_edge_tls_error_only(data, suffix):
    _decodes_or_typed_error(data, suffix)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(_SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
    st.integers(0, 10_000),
    st.booleans(),
)
def test_mutated_real_files_decode_or_raise_edge_tls_error_only(fmt, edits, cut, truncate):
    data = bytearray(_SEEDS[fmt])
    for pos, value in edits:  # header bytes (sizes, modes, chunk lengths) included
        data[pos % len(data)] = value
    if truncate:
        data = data[: cut % len(data)]
    _decodes_or_typed_error(bytes(data), ".jpg" if fmt == "JPEG" else ".png")


# ---- the folder rule ------------------------------------------------------------------
def _messy(folder: Path) -> list[str]:
    """A folder as a Mac, Windows and a phone leave it; the names every command must read."""
    folder.mkdir(parents=True)
    img = _picture()
    img.save(folder / "a.JPG")
    img.save(folder / "b.Png")
    img.save(folder / "c.gif")
    img.save(folder / "d.jpeg")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]")
    (folder / "._a.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "__MACOSX").mkdir()
    img.save(folder / "__MACOSX" / "x.jpg")
    (folder / ".thumbnails").mkdir()
    return [str(folder / n) for n in ("a.JPG", "b.Png", "c.gif", "d.jpeg")]


def test_every_folder_command_reads_a_folder_by_one_rule(tmp_path):
    want = _messy(tmp_path / "good")
    assert all(
        ignored(n)
        for n in (".DS_Store", "Thumbs.db", "THUMBS.DB", "desktop.ini", "._a.jpg", "__MACOSX")
    )
    assert folder_images(tmp_path / "good") == (want, [])
    assert good_images(tmp_path / "good") == (want, [])  # anomaly
    shutil.copytree(tmp_path / "good", tmp_path / "set" / "cls")
    shutil.copytree(tmp_path / "good", tmp_path / "set" / "__MACOSX")
    ds = image_folder(tmp_path / "set")  # train, learn, evaluate
    assert ds.classes == ["cls"] and [Path(p).name for p in ds.paths] == [
        Path(p).name for p in want
    ]
    mv = tmp_path / "mv"
    shutil.copytree(tmp_path / "good", mv / "test" / "good")
    shutil.copytree(tmp_path / "good", mv / "test" / "scratch")
    items, skipped = mvtec_test(mv)  # evaluate on an MVTec folder
    assert len(items) == 8 and not skipped
    assert [p.name for p in entries(mv / "test")[1]] == ["good", "scratch"]


def test_bad_files_stop_a_folder_command_or_are_skipped_and_listed(tmp_path):
    want = _messy(tmp_path / "good")
    (tmp_path / "good" / "notes.txt").write_text("shift 2")
    (tmp_path / "good" / "e.jpg").write_bytes(_SEEDS["JPEG"][:300])  # truncated
    with pytest.raises(BadImageError, match=r"e\.jpg is not a readable image .*--skip-bad"):
        good_images(tmp_path / "good")
    paths, skipped = good_images(tmp_path / "good", skip_bad=True)
    assert paths == want
    assert [Path(s.path).name for s in skipped] == ["e.jpg", "notes.txt"]
    assert "truncated" in skipped[0].reason.lower() and "not an image file" in skipped[1].reason
    shutil.copytree(tmp_path / "good", tmp_path / "set" / "cls")
    (tmp_path / "set" / "other").mkdir()
    _picture().save(tmp_path / "set" / "other" / "x.png")
    with pytest.raises(BadImageError, match="e.jpg"):
        image_folder(tmp_path / "set")
    ds = image_folder(tmp_path / "set", skip_bad=True)
    assert len(ds) == 5 and len(ds.skipped) == 2
    assert len(ds.subset([0, 4]).skipped) == 2  # a split keeps the record
    (tmp_path / "all_bad" / "cls").mkdir(parents=True)
    (tmp_path / "all_bad" / "cls" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(EdgeTLError, match="no readable image"):
        image_folder(tmp_path / "all_bad", skip_bad=True)


# ---- masks and names ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 255, 65535, "palette"])
def test_masks_read_any_non_zero_pixel_as_defect(tmp_path, scale):
    truth = np.zeros((12, 16), bool)
    truth[3:7, 5:11] = True
    path = tmp_path / "m_mask.png"
    if scale == "palette":
        img = Image.fromarray(truth.astype(np.uint8)).convert("P")
    elif scale == 65535:
        img = Image.fromarray(truth.astype(np.uint16) * 65535)
    else:
        img = Image.fromarray(truth.astype(np.uint8) * scale)
    img.save(path)
    assert np.array_equal(load_mask(str(path)), truth)


def test_overlays_of_images_with_one_name_get_one_file_each():
    taken: set[str] = set()
    names = [overlay_name(taken, s) for s in ("0001", "0001", "0001_2", "0001", "x")]
    assert names == ["0001.png", "0001_2.png", "0001_2_2.png", "0001_3.png", "x.png"]


def test_json_never_holds_nan():
    assert _finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }


# ---- through the command line, on real bundles ----------------------------------------
def _no_python_warning(res) -> None:
    assert "Warning" not in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_predict_refuses_a_bomb_and_takes_odd_images_on_both_engines(bundles, bomb, tmp_path):
    res = cli("predict", bundles["ort-int8"], bomb)
    _one_line_error(res, "bomb.png", "179,560,000 pixels", "EDGE_TL_MAX_PIXELS=180000000")
    _no_python_warning(res)
    clean = tmp_path / "clean.tif"
    _picture(200, 200).save(clean)
    odd = tmp_path / "dossier à vérifier" / "部品 01.TIF"
    odd.parent.mkdir()
    _picture(200, 200).convert("CMYK").save(odd)
    for name in ("ort-int8", "openvino-int8"):
        res = cli("predict", bundles[name], clean, odd, "--json")
        assert res.returncode == 0, res.stderr
        a, b = json.loads(res.stdout)
        assert b["image"] == str(odd) and a["label"] == b["label"]
        assert b["score"] == pytest.approx(a["score"], abs=1e-6)


@pytest.mark.slow
def test_learn_and_evaluate_follow_the_folder_rule_and_skip_bad(bundles, neu_small, tmp_path):
    bundle = Path(shutil.copytree(bundles["onnx-fp32"], tmp_path / "b"))
    support = tmp_path / "support"
    for cls in ("crazing", "patches"):
        (support / cls).mkdir(parents=True)
        for i, p in enumerate(sorted((neu_small / cls).iterdir())[:4]):
            with Image.open(p) as im:  # one class as upper-case JPGs, one as GIFs
                im.save(support / cls / (f"{i}.JPG" if cls == "crazing" else f"{i}.gif"))
        (support / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (support / cls / ".DS_Store").write_bytes(b"Bud1")
    res = cli("learn", bundle, support, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["head"]["support"] == {"crazing": 4, "patches": 4}

    (support / "patches" / "cut.jpg").write_bytes(_SEEDS["JPEG"][:200])
    res = cli("learn", bundle, support, "--add")
    _one_line_error(res, "cut.jpg", "--skip-bad")
    res = cli("learn", bundle, support, "--add", "--skip-bad", "--json")
    assert res.returncode == 0, res.stderr
    head = json.loads(res.stdout)["head"]
    assert [s["path"] for s in head["skipped"]] == [str(support / "patches" / "cut.jpg")]
    assert "cut.jpg" in res.stderr  # listed at the end for a person too

    res = cli("evaluate", bundle, support, "--json")
    _one_line_error(res, "cut.jpg", "--skip-bad")
    res = cli("evaluate", bundle, support, "--json", "--skip-bad")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    assert ev["n"] == 8 and len(ev["skipped"]) == 1
    _no_python_warning(res)


@pytest.mark.slow
def test_anomaly_masks_of_0_and_1_maps_that_never_collide_and_skip_bad(
    bundles, neu_small, tmp_path
):
    bundle = Path(shutil.copytree(bundles["ort-int8"], tmp_path / "b"))
    crazing = sorted((neu_small / "crazing").iterdir())
    scratches = sorted((neu_small / "scratches").iterdir())
    mv = tmp_path / "mv"
    for sub, files in (
        ("train/good", crazing[:8]),
        ("test/good", crazing[8:12]),
        ("test/scratch", scratches[:4]),
    ):
        (mv / sub).mkdir(parents=True)
        for p in files:
            shutil.copy(p, mv / sub / p.name)
    (mv / "train/good/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (mv / "train/good/notes.txt").write_text("line 3")
    _one_line_error(cli("anomaly", bundle, mv), "notes.txt", "--skip-bad")
    res = cli("anomaly", bundle, mv, "--skip-bad", "--json")
    assert res.returncode == 0, res.stderr
    bank = json.loads(res.stdout)
    assert bank["images"] == 8 and [Path(s["path"]).name for s in bank["skipped"]] == ["notes.txt"]

    (mv / "ground_truth/scratch").mkdir(parents=True)
    for p in scratches[:4]:  # masks stored as 0/1 (a scratch down the middle third)
        with Image.open(p) as im:
            m = np.zeros((im.size[1], im.size[0]), np.uint8)
        m[:, m.shape[1] // 3 : 2 * m.shape[1] // 3] = 1
        Image.fromarray(m).save(mv / "ground_truth/scratch" / f"{p.stem}_mask.png")
    res = cli("evaluate", bundle, mv, "--json")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)  # valid JSON (no NaN), and the 0/1 masks are not empty
    assert ev["pixel_auroc"] is not None and 0 <= ev["pixel_auroc"] <= 1
    assert ev["skipped"] == []
    _no_python_warning(res)

    lines = {}
    for line, ext in (("lineA", "jpg"), ("lineB", "jpg"), ("lineC", "png")):
        (tmp_path / line).mkdir()
        src = scratches[5] if line == "lineB" else crazing[12]
        with Image.open(src) as im:
            im.save(tmp_path / line / f"0001.{ext}")
        lines[line] = tmp_path / line / f"0001.{ext}"
    maps = tmp_path / "out"
    res = cli("predict", bundle, *lines.values(), "--maps", maps, "--json")
    assert res.returncode == 0, res.stderr
    verdicts = json.loads(res.stdout)
    pngs = [v["map_png"] for v in verdicts]
    assert len(set(pngs)) == 3 and sorted(p.name for p in maps.iterdir()) == sorted(
        Path(p).name for p in pngs
    )
    with Image.open(pngs[1]) as im, Image.open(lines["lineB"]) as orig:  # lineB's own overlay
        left = np.asarray(im.convert("L"))[16:, : orig.size[0]]
        assert np.array_equal(left, np.asarray(orig.convert("L")))


def test_calibration_images_follow_the_same_rule(tmp_path):
    from edge_tl.export.source import calibration_pool

    want = _messy(tmp_path / "calib")
    assert calibration_pool(tmp_path / "calib", None) == (want, [])
    (tmp_path / "calib" / "cut.png").write_bytes(_SEEDS["PNG"][:100])
    with pytest.raises(BadImageError, match=r"cut\.png .*--skip-bad"):
        calibration_pool(tmp_path / "calib", None)
    paths, skipped = calibration_pool(tmp_path / "calib", None, skip_bad=True)
    assert paths == want and [Path(s.path).name for s in skipped] == ["cut.png"]


@pytest.mark.slow
def test_train_and_export_stop_on_a_bad_file_before_any_work(lp_run, neu_small, tmp_path):
    data = Path(shutil.copytree(neu_small, tmp_path / "data"))
    (data / "patches" / "cut.jpg").write_bytes(_SEEDS["JPEG"][:200])
    res = cli("train", data, "--strategy", "linear-probe", "--out", tmp_path / "run")
    _one_line_error(res, "cut.jpg", "--skip-bad")
    assert not (tmp_path / "run").exists()
    res = cli("export", lp_run, "--calib", data / "patches", "--out", tmp_path / "b")
    _one_line_error(res, "cut.jpg", "--skip-bad")
    assert not (tmp_path / "b").exists()
