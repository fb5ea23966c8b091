"""Cases found by trying the tools as a new user would, each on a small input with the
result it should have: a one-class head that rejects what is unlike its support, one rule
for class names at every entry, and an anomaly bank that says when its calibration set is
too small and drops copies. (The self-test figure recorded at export is checked against a
load on the same host in tests/test_fidelity.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import anomaly as an
from edge_tl.runtime import learner
from edge_tl.spec import LABEL_RULE, check_label, check_labels
from tests.conftest import FLOWERS, NEU, SHARED, need
from tests.test_cli import _one_line_error, cli

MT = SHARED / "magnetic_tile"


def _copy(files, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    """A private copy of the ORT INT8 bundle (heads and banks are written into it)."""
    return Path(shutil.copytree(bundles["ort-int8"], tmp_path / "bundle"))


# ---- a head with one class ------------------------------------------------------------------
def test_one_class_threshold_comes_from_uncentred_leave_one_out_cosines():
    """One class: centred on its own mean the support points every way (leave-one-out
    cosines near -1, nothing rejected); the features are left uncentred instead."""
    from edge_tl.runtime.heads import power, unit_rows

    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(1.0, 0.3, (8, 16))).astype(np.float32)
    state = learner.learn(x, ["part"] * 8, "prototype", quantile=0.25)
    z = unit_rows(power(x, 0.5))
    loo = [z[i] @ unit_rows(np.delete(z, i, 0).sum(0)[None])[0] for i in range(8)]
    assert state.threshold == pytest.approx(np.quantile(loo, 0.25), abs=1e-5)
    assert state.threshold > 0.5  # it was about -0.99 when centred on the class mean
    # 1 image per class: nothing to leave out, so the open set is off and says why
    one = learner.learn(x[:1], ["part"], "prototype")
    s = one.summary()
    assert one.threshold is None and not s["open_set"] and "2 or more" in s["open_set_problem"]
    with pytest.raises(EdgeTLError, match="at least 2 classes"):
        learner.learn(x, ["part"] * 8, "linear")


@pytest.mark.slow
def test_one_class_head_accepts_its_kind_and_rejects_flowers(bundle, tmp_path):
    """10 real NEU-DET scratches from across the class as the only class: other scratches
    are mostly that class, flower photos unknown (before: threshold -0.94, every image
    accepted). Measured: 10 of 10 scratches kept, 0 of 20 flowers. (10 consecutive files,
    more alike than the class, keep 35-80 %: the open set trusts the support's spread.)"""
    scratches = sorted((need(NEU) / "scratches").iterdir())
    support = _copy(scratches[::30], tmp_path / "support" / "scratches").parent
    queries = scratches[15::30] + [
        p for c in sorted(need(FLOWERS).iterdir()) for p in sorted(c.iterdir())[:4]
    ]
    res = cli("learn", bundle, support, "--head", "prototype", "--json")
    assert res.returncode == 0, res.stderr
    head = json.loads(res.stdout)["head"]
    assert head["open_set"] and head["threshold"] > 0.3, head
    res = cli("predict", bundle, *queries, "--json")
    assert res.returncode == 0, res.stderr
    labels = [p["label"] for p in json.loads(res.stdout)]
    kept_scratches = np.mean([x == "scratches" for x in labels[:10]])
    kept_flowers = np.mean([x == "scratches" for x in labels[10:]])
    assert kept_scratches >= 0.7 and kept_flowers <= 0.1, (kept_scratches, kept_flowers)
    # a linear head cannot learn one class, and says what to use instead
    _one_line_error(cli("learn", bundle, support), "at least 2 classes", "--head prototype")


# ---- class names: one rule at every entry ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a=b", "contains '='"),
        ("a,b", "contains ','"),
        ("a/b", "contains '/'"),
        ("", "is empty"),
        (" a", "leading or trailing space"),
        ("a\tb", "control character"),
        ("a\u200bb", "control character"),  # zero-width space (format character)
        ("x" * 101, "101 characters"),
        ("Unknown", "reserved"),
    ],
)
def test_a_bad_class_name_is_refused_naming_it_and_the_rule(name, why):
    with pytest.raises(EdgeTLError, match=why) as e:
        check_label(name, "here")
    assert repr(name) in str(e.value) and LABEL_RULE in str(e.value)


@given(st.text(max_size=12))
def test_every_name_the_rule_accepts_survives_relabel_syntax(name):
    from edge_tl.runtime import HeadChange

    try:
        check_label(name)
    except EdgeTLError:
        return
    change = HeadChange(relabel=f"{name}={name}x")
    assert change.relabel.split("=") == [name, f"{name}x"]


def test_every_entry_applies_the_rule(tmp_path):
    from edge_tl.data import image_folder
    from edge_tl.runtime import HeadChange

    x = np.ones((4, 8), np.float32)
    with pytest.raises(EdgeTLError, match="contains '='"):
        learner.learn(x, ["a=b", "a=b", "c", "c"], "prototype")
    state = learner.learn(x, ["ab", "ab", "c", "c"], "prototype")
    with pytest.raises(EdgeTLError, match="contains ','"):
        learner.add(state, x[:2], ["d,e", "d,e"])
    with pytest.raises(EdgeTLError, match="already has a class 'c'"):
        learner.relabel(state, "ab", "C")
    with pytest.raises(EdgeTLError, match="contains '/'"):
        learner.relabel(state, "ab", "a/b")
    with pytest.raises(EdgeTLError, match="one '='"):
        HeadChange(relabel="a=b=ab")
    with pytest.raises(EdgeTLError, match="new name of --relabel"):
        HeadChange(relabel="ab= ab")
    # a head file holding a name the rule refuses
    arrays = state.to_arrays()
    arrays["labels"] = np.array(["a=b", "c"])
    with pytest.raises(EdgeTLError, match="labels of v0009.npz"):
        learner.HeadState.from_arrays(arrays, "v0009.npz")
    # class folders
    for name in ("a=b", "c"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    with pytest.raises(EdgeTLError, match="rename the folder"):
        image_folder(tmp_path / "data")
    # a manifest's labels (the rest of the manifest: below, on a real bundle)
    with pytest.raises(EdgeTLError, match="is given twice"):
        check_labels(["crack", "crack"], "labels of manifest.json")


@pytest.mark.slow  # imports torchvision
def test_imagenet_labels_follow_the_rule():
    pytest.importorskip("torchvision")
    from edge_tl.backbones import imagenet_labels

    labels = imagenet_labels()
    check_labels(labels, "ImageNet")
    assert len(labels) == 1000 and labels[474] == "cardigan"


@pytest.mark.slow
def test_learn_and_relabel_refuse_names_with_separators_and_keep_the_head(bundle, tmp_path):
    """Before: a class named `a=b` was learned, and `--relabel a=b=ab` could not name it."""
    neu = need(NEU)
    data = tmp_path / "data"
    _copy(sorted((neu / "scratches").iterdir())[:3], data / "a=b")
    _copy(sorted((neu / "patches").iterdir())[:3], data / "c")
    _one_line_error(cli("learn", bundle, data, "--head", "prototype"), "'a=b'", "rename")
    assert not (bundle / "heads").exists()
    (data / "a=b").rename(data / "ab")
    assert cli("learn", bundle, data, "--head", "prototype").returncode == 0
    saved = {p.name: p.read_bytes() for p in (bundle / "heads").iterdir()}
    _one_line_error(cli("learn", bundle, "--relabel", "ab=a=b"), "one '='")
    _one_line_error(cli("learn", bundle, "--relabel", "ab=a,b"), "'a,b'", "contains ','")
    assert {p.name: p.read_bytes() for p in (bundle / "heads").iterdir()} == saved
    # a manifest edited to hold such a name is refused on load, naming it
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["labels"][0] = "x=y"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(cli("verify", bundle), "'x=y'", "manifest.json", "re-export")


# ---- anomaly bank: calibration size and copies ----------------------------------------------
def test_images_needed_for_a_false_alarm_rate_follow_the_rule_of_three():
    assert [an.images_needed(r) for r in (0.01, 0.05, 0.1)] == [299, 59, 29]
    for r in (0.01, 0.02, 0.05):
        n = an.images_needed(r)
        assert (1 - r) ** n <= 0.05 < (1 - r) ** (n - 1)
        assert an.supported_false_alarm(n) <= r < an.supported_false_alarm(n - 1)
    warn = an.calibration_warning(30, 0.01, "b")
    assert "30 good images" in warn and "at least 299" in warn and "--false-alarm 0.096" in warn
    assert an.calibration_warning(299, 0.01) is None and an.calibration_warning(30, 0.1) is None


def test_copies_are_found_by_their_pixels(tmp_path):
    tiles = sorted((need(MT) / "train" / "good").iterdir())[:4]
    folder = _copy(tiles, tmp_path / "good")
    shutil.copy(tiles[0], folder / "copy.jpg")  # the same file
    Image.open(tiles[1]).save(folder / "re-encoded.png")  # the same pixels, another format
    images, _ = an.good_images(folder)
    kept, digests, dropped = an.unique_images(images)
    assert len(kept) == 4 and digests.shape == (4, 32) and digests.dtype == np.uint8
    # listed in name order, the first of equal images is kept ("copy.jpg" sorts first)
    pairs = {Path(d["image"]).name: Path(d["same_as"]).name for d in dropped}
    assert pairs == {tiles[0].name: "copy.jpg", "re-encoded.png": tiles[1].name}
    # against a bank that holds them already
    kept, _, dropped = an.unique_images([str(tiles[2])], digests)
    assert kept == [] and dropped[0]["same_as"] == "an image already in the bank"


@pytest.mark.slow
def test_copies_do_not_lower_the_threshold_and_a_small_set_is_warned(bundle, tmp_path):
    """Before: 10 copies among 40 good tiles lowered the threshold 4.55 -> 2.85 silently,
    and a bank from 30 good images promised 1 % false alarms without a word."""
    tiles = sorted((need(MT) / "train" / "good").iterdir())[:30]
    plain = _copy(tiles, tmp_path / "plain")
    dup = _copy(tiles, tmp_path / "dup")
    for p in tiles[:10]:
        shutil.copy(p, dup / f"copy_{p.name}")
    res = cli("anomaly", bundle, plain, "--json")
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)
    assert "warning:" in res.stderr and "needs at least 299" in res.stderr
    assert first["images_needed"] == 299 and "30 good images" in first["calibration_warning"]
    res = cli("anomaly", bundle, dup, "--json")
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    assert again["images"] == 30 and len(again["duplicates"]) == 10
    assert again["threshold"] == first["threshold"]
    assert "dropped 10 duplicate good image(s)" in res.stderr
    # adding the same images again adds nothing, and says so
    _one_line_error(cli("anomaly", bundle, dup, "--add"), "copies of images already in the bank")
    # a rate the 30 images can calibrate: no warning
    res = cli("anomaly", bundle, "--false-alarm", "0.1")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr


def test_bundles_written_before_the_rule_keep_loading():
    """ImageNet's 'Cardigan' (corgi) and 'cardigan' (sweater) were both exported before the
    rule: read back they load, a new name is still checked against both, and a name given
    twice outright is still refused."""
    from edge_tl.spec import check_labels

    check_labels(["Cardigan", "cardigan", "tabby"], "labels of manifest.json", written=True)
    with pytest.raises(EdgeTLError, match="differ only in case"):
        check_labels(["CARDIGAN"], "classes to add", existing=["Cardigan", "cardigan"])
    with pytest.raises(EdgeTLError, match="given twice"):
        check_labels(["tabby", "tabby"], "labels of manifest.json", written=True)
    with pytest.raises(EdgeTLError, match="differ only in case"):
        check_labels(["Cardigan", "cardigan"], "class folders of data")
