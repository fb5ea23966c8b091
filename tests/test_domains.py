"""The domain-shift protocol: disjoint source/target halves, a target split, a camera change."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_tl.data import image_folder
from edge_tl.domains import CameraShift, split_domains, target_split, write_camera_shift
from edge_tl.errors import EdgeTLError
from tests.conftest import NEU


@pytest.fixture(scope="module")
def neu():
    if not NEU.is_dir():
        pytest.skip("../shared/data/neu_det is absent")
    return image_folder(NEU)


def test_source_target_and_test_are_disjoint_and_keep_every_class(neu):
    source, target = split_domains(neu)
    parts = target_split(target)
    sets = [set(source.paths), set(parts["unlabeled"].paths), set(parts["test"].paths)]
    assert sum(map(len, sets)) == len(neu) and len(set().union(*sets)) == len(neu)
    for part in (source, parts["unlabeled"], parts["test"]):
        assert set(part.labels.tolist()) == set(range(len(neu.classes)))


def test_camera_shift_changes_the_image_reproducibly_and_keeps_its_size(neu):
    with Image.open(neu.paths[0]) as img:
        a, b, c = CameraShift()(img, 3), CameraShift()(img, 3), CameraShift()(img, 4)
        orig = np.asarray(img.convert("RGB"), np.float32)
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.abs(np.asarray(a, np.float32) - orig).mean() > 10  # a visible change


def test_write_camera_shift_writes_an_image_folder_and_never_overwrites(neu, tmp_path):
    small = neu.subset(np.arange(0, len(neu), 150))
    out = write_camera_shift(small, tmp_path / "shifted")
    again = image_folder(out)
    assert again.classes == small.classes and len(again) == len(small)
    with pytest.raises(EdgeTLError, match="not empty"):
        write_camera_shift(small, out)
    with pytest.raises(EdgeTLError, match="invalid"):
        CameraShift(scale=0)
