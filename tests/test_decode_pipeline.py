"""Decoding for the engine: the thread pool that decodes folders ahead of the engine gives
the same inputs in the same order as one image at a time, bad files are found and named as
before, and JPEG draft decoding is a recorded preprocessing choice (off for every bundle
whose manifest does not ask for it, so old bundles see the same inputs as before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from edge_tl.errors import EdgeTLError
from edge_tl.images import BadImageError, check_images, decode_ahead, read_image
from edge_tl.runtime.preprocess import (
    batch_inputs,
    input_batches,
    load_image,
    prepare,
    to_input,
)
from edge_tl.spec import Preprocess
from tests.conftest import NEU, make_image, need

PRE = Preprocess(size=64, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


def _reference_input(path: Path, pre: Preprocess) -> np.ndarray:
    """The input tensor as edge_tl computed it before draft decoding and the thread pool:
    full decode, EXIF orientation, RGB (or L when grey), one resize, (p - mean) / std."""
    with Image.open(path) as f:
        img = ImageOps.exif_transpose(f)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img = img.resize((pre.size, pre.size), Image.Resampling.BILINEAR)
    px = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    return (px - mean) * (1.0 / np.asarray(pre.std, np.float32))[:, None, None]


@pytest.fixture
def mixed(tmp_path) -> list[Path]:
    """Images of every kind a folder holds: large and small JPEGs, grey saved as RGB, an
    EXIF-rotated JPEG, RGBA and palette PNGs."""
    paths = []
    for i, (size, mode, ext) in enumerate(
        [((300, 200), "RGB", "jpg"), ((40, 90), "RGB", "jpg"), ((150, 150), "L", "png")]
        + [((64, 64), "RGBA", "png"), ((70, 50), "P", "png"), ((33, 33), "RGB", "bmp")]
    ):
        paths.append(make_image(tmp_path / f"im{i}.{ext}", size, mode, seed=i))
    grey = Image.open(paths[2]).convert("RGB")  # grey camera saving RGB files
    grey.save(tmp_path / "grey_rgb.jpg")
    rotated = Image.open(paths[0])
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    return [*paths, tmp_path / "grey_rgb.jpg", tmp_path / "rotated.jpg"]


def test_inputs_identical_to_the_reference_decode(mixed):
    """Without draft (every bundle so far), inputs are bit-identical to the full decode."""
    for p in mixed:
        np.testing.assert_array_equal(prepare(p, PRE), _reference_input(p, PRE), err_msg=str(p))
    assert load_image(mixed[-1]).size == (200, 300)  # EXIF orientation applied


def test_to_input_writes_into_a_preallocated_buffer(mixed):
    buf = np.full((3, 64, 64), np.nan, np.float32)
    out = to_input(load_image(mixed[0]), PRE, buf)
    assert out is buf
    np.testing.assert_array_equal(buf, to_input(load_image(mixed[0]), PRE))
    with pytest.raises(EdgeTLError, match="float32"):
        to_input(load_image(mixed[0]), PRE, np.empty((3, 32, 32), np.float32))


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_pipelined_batches_equal_one_at_a_time(mixed, workers, batch_size):
    """Same arrays, same order, whatever the pool size and batch size (the buffer ring is
    reused while the pool runs ahead: a row overwritten too early would show here)."""
    paths = mixed * 3
    want = np.stack([_reference_input(p, PRE) for p in paths])
    got = [b.copy() for b in input_batches(paths, PRE, batch_size, workers)]
    assert [len(b) for b in got] == [
        min(batch_size, len(paths) - i) for i in range(0, len(paths), batch_size)
    ]
    np.testing.assert_array_equal(np.concatenate(got), want)
    np.testing.assert_array_equal(batch_inputs(paths, PRE), want)


def test_real_folder_pipelined_equals_sequential(monkeypatch):
    paths = sorted(need(NEU).glob("*/*.jpg"))[::60]
    seq = np.stack([to_input(load_image(p), PRE) for p in paths])
    monkeypatch.setenv("EDGE_TL_DECODE_THREADS", "3")
    np.testing.assert_array_equal(np.concatenate(list(input_batches(paths, PRE, 8))), seq)


def test_first_error_in_order_and_work_behind_it_stops():
    seen = []

    def decode(i: int) -> int:
        seen.append(i)
        if i in (7, 9):
            raise ValueError(f"bad {i}")
        return i * i

    got = []
    with pytest.raises(ValueError, match="bad 7"):
        for r in decode_ahead(range(1000), decode, workers=2, ahead=4):
            got.append(r)
    assert got == [i * i for i in range(7)]
    assert max(seen) < 7 + 4 + 2  # nothing decoded far behind the error


def test_bad_file_named_as_before(tmp_path, mixed):
    """A truncated JPEG among good ones: the same first bad file, in listing order, stops
    the check (or is skipped and listed with --skip-bad), with the pool decoding."""
    data = Path(mixed[0]).read_bytes()
    files = [*mixed]
    for name in ("b_trunc.jpg", "c_trunc.jpg"):
        (tmp_path / name).write_bytes(data[: len(data) // 3])
        files.insert(2, tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    files.append(tmp_path / "notes.txt")
    with pytest.raises(BadImageError) as err:
        check_images(files)
    assert err.value.path == str(files[2]) and "--skip-bad" in str(err.value)
    kept, skipped = check_images(files, skip_bad=True)
    assert kept == [str(f) for f in mixed]
    assert [s.path for s in skipped] == [str(files[2]), str(files[3]), str(files[-1])]
    with pytest.raises(BadImageError, match="b_trunc"):
        batch_inputs([mixed[0], tmp_path / "b_trunc.jpg", tmp_path / "c_trunc.jpg"], PRE)
    with pytest.raises(EdgeTLError, match="does not exist"):
        list(input_batches([mixed[0], tmp_path / "gone.jpg"], PRE, 1, workers=2))


def test_draft_is_a_recorded_choice(tmp_path):
    """Draft decoding happens only when the preprocessing records it, only for JPEGs at
    least twice the input, and changes pixels (so it must be shared by training and the
    device); a manifest without the field means full decoding and is written as before."""
    big = make_image(tmp_path / "big.jpg", (300, 260))
    small = make_image(tmp_path / "small.jpg", (120, 200))
    png = make_image(tmp_path / "big.png", (300, 260))
    on = Preprocess(size=64, mean=PRE.mean, std=PRE.std, draft=True)
    assert load_image(big, PRE).size == (300, 260)
    assert load_image(big, on).size == (75, 65)  # 1/4: both sides still >= 64
    assert read_image(big, reduce_to=130).size == (150, 130)
    assert read_image(big, reduce_to=131).size == (300, 260)
    assert load_image(small, on).size == (120, 200)  # under twice the input
    assert load_image(png, on).size == (300, 260)  # DCT scaling is JPEG only
    full, drafted = prepare(big, PRE), prepare(big, on)
    assert not np.array_equal(full, drafted)
    np.testing.assert_array_equal(prepare(small, on), prepare(small, PRE))

    assert (
        Preprocess.from_dict(
            json.loads(json.dumps({"size": 64, "mean": [1, 2, 3], "std": [1, 1, 1]}))
        ).draft
        is False
    )
    assert (
        Preprocess.from_dict({"size": 64, "mean": [1, 2, 3], "std": [1, 1, 1], "draft": True}).draft
        is True
    )


@pytest.mark.slow
def test_model_results_identical_with_and_without_the_pool(bundles, neu_small, monkeypatch):
    """evaluate / embed / predict on a real bundle: the same numbers decoding in the calling
    thread (EDGE_TL_DECODE_THREADS=0) and in the pool; a bad file stops evaluate as before,
    and --skip-bad lists it."""
    from edge_tl.bundle import read_manifest
    from edge_tl.runtime import Model

    bundle = bundles["ort-int8"]
    assert "draft" not in json.loads((bundle / "manifest.json").read_text())["preprocess"]
    assert read_manifest(bundle).preprocess.draft is False
    model = Model(bundle)
    paths = sorted(str(p) for p in neu_small.glob("*/*.jpg"))
    monkeypatch.setenv("EDGE_TL_DECODE_THREADS", "0")
    emb1 = model.embed(paths, batch_size=5)
    ev1 = model.evaluate(neu_small).to_dict()
    pred1 = [p.to_dict() for p in model.predict(paths[:4])]
    monkeypatch.setenv("EDGE_TL_DECODE_THREADS", "2")
    np.testing.assert_array_equal(model.embed(paths, batch_size=5), emb1)
    ev2 = model.evaluate(neu_small).to_dict()
    ev1.pop("seconds"), ev2.pop("seconds")
    assert ev1 == ev2
    assert [p.to_dict() for p in model.predict(paths[:4])] == pred1

    bad = shutil.copytree(neu_small, Path(str(neu_small) + "_bad"), dirs_exist_ok=True)
    (bad / "patches" / "0_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(BadImageError, match="0_broken.jpg.*--skip-bad"):
        model.evaluate(bad)
    ev = model.evaluate(bad, skip_bad=True)
    assert [s["path"] for s in ev.skipped] == [str(bad / "patches" / "0_broken.jpg")]
    assert ev.n == ev1["n"]
