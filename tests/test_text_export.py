"""Text encoders exported through optimum: each recipe's bundle loads torch-free and passes its
self-test; ONNX FP32 matches PyTorch on real texts; bad input is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_fp32_bundle_loads_and_matches_pytorch(text_fp32_bundle):
    """The device runtime loads the bundle (hashes, self-test) and its embeddings of real
    questions equal FP32 PyTorch's within the recipe's parity tolerance."""
    from edge_tl.backbones import get_text_spec
    from edge_tl.runtime import Model
    from edge_tl.spec import load_recipe
    from edge_tl.train.text_encoder import embed_texts, load_encoder

    model = Model(text_fp32_bundle)
    assert model.modality == "text"
    assert model.self_test is not None and model.self_test["passed"]
    manifest = json.loads((text_fp32_bundle / "manifest.json").read_text())
    assert manifest["outputs"] == {"embedding": ["batch", 384]}
    assert "tokenizer.json" in manifest["files"]
    assert manifest["head"] is None and manifest["source"]["kind"] == "pretrained"
    texts = [
        "How long does the night train take from Vienna to Zurich?",
        "Which river flows through the middle of the old capital?",
        "Who painted the ceiling of the small chapel by the harbour?",
        "Why does bread go stale faster in the fridge?",
    ]
    spec = get_text_spec("all-minilm-l6-v2")
    torch_model, tokenizer = load_encoder(spec.model_dir())
    ref = embed_texts(torch_model, tokenizer, texts, spec.preprocess)
    got = model.embed_texts(texts)
    assert np.abs(got - ref).max() < load_recipe("onnx-fp32").parity_atol
