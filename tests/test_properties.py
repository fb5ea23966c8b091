"""Property-based tests of the contract's readers (hypothesis).

Manifests, recipes, device profiles and head files are built from random mutations of real
ones: a real bundle's ``manifest.json``, the shipped ``export/*.toml`` and
``devices/*.toml``, and head versions written by ``learn``. A key deleted or added, a value
of another type or a wrong one (random strings, NaN, infinities, huge and negative
numbers, paths out of the bundle), the file cut short or given bytes that are not UTF-8:
the public readers either return well-typed values or refuse with one line of
:class:`~edge_tl.errors.EdgeTLError`, never another exception.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import shutil
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_tl.bundle import MANIFEST, read_manifest
from edge_tl.errors import EdgeTLError
from edge_tl.spec import DeviceProfile, Manifest, Recipe, load_profile, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "export").glob("*.toml"))
PROFILES = sorted((ROOT / "devices").glob("*.toml"))
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- values a damaged or hostile file may hold ---------------------------------------------
NASTY_STRINGS = [
    "",
    " ",
    "../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "two\nlines",
    "é☃",
    "x" * 300,
]
NASTY_NUMBERS = [0, -1, 2**31, 2**63, -(2**63), 10**30, 0.5, -0.0, 1e308, 1e-308]
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(NASTY_NUMBERS),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=12),
    st.sampled_from(NASTY_STRINGS),
)
VALUES = st.recursive(
    LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=6,
)
# inserted into the text of a file: half a token, an unparseable number, deep nesting
NASTY_TEXT = ['"', "{", "]", ",", "=", "NaN", "-Infinity", "9" * 5000, "[" * 5000, "\x00", "\\u"]


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON-like document (the root is ``()``)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _retyped(value: Any) -> list[Any]:
    """The same content as another type."""
    out = [str(value), [value], {"value": value}, None]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out += [float(value), -value, value * 10**20, bool(value)]
        if math.isfinite(value):
            out.append(int(value))
    if isinstance(value, list):
        out += [tuple(value)[:1], value[:-1], value * 2, dict(enumerate(value))]
    if isinstance(value, dict):
        out += [list(value), list(value.values())]
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` after one to three mutations: a key or item deleted, a value replaced by a
    random one or by the same content as another type, an unknown key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_nodes(doc)))
        op = draw(st.sampled_from(("delete", "replace", "retype", "add")))
        if not path:
            if op == "add" and isinstance(doc, dict):
                doc[draw(st.text(max_size=8))] = draw(VALUES)
            elif op in ("replace", "retype"):
                doc = draw(VALUES) if op == "replace" else draw(st.sampled_from(_retyped(doc)))
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(VALUES)
        elif op == "retype":
            parent[key] = draw(st.sampled_from(_retyped(parent[key])))
        elif isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=8))] = draw(VALUES)
        elif isinstance(parent[key], list):
            parent[key].append(draw(VALUES))
    return doc


@st.composite
def damaged_text(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as bytes, cut short, with a nasty token inserted, or with bytes that are
    not UTF-8."""
    data = text.encode()
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(("cut", "insert", "bytes")))
    if how == "cut":
        return data[:at]
    if how == "insert":
        return data[:at] + draw(st.sampled_from(NASTY_TEXT)).encode() + data[at:]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]


# ---- what "read" means -----------------------------------------------------------------------
def _refused_in_one_line(read: typing.Callable[[], Any]) -> Any:
    """``read()``'s value, or None when it raised an EdgeTLError of one non-empty line;
    any other exception fails the test with its traceback."""
    try:
        return read()
    except EdgeTLError as e:
        message = str(e)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        return None


def _well_typed(value: Any, hint: Any) -> bool:
    """``value`` fits the annotation ``hint``: dataclasses field by field, numbers finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_well_typed(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return type(value) is hint
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return isinstance(value, hint) and all(
            _well_typed(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(hint)
        )
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_well_typed(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_well_typed, value, args))
    if origin is list:
        return isinstance(value, list) and all(_well_typed(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _well_typed(k, args[0]) and _well_typed(v, args[1]) for k, v in value.items()
        )
    raise AssertionError(f"no rule for {hint!r}")


# ---- manifests -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_copies(bundles, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each real bundle copied (its manifest is rewritten per example) with its manifest."""
    root = tmp_path_factory.mktemp("manifests")
    out = {}
    for name, src in bundles.items():
        dst = Path(shutil.copytree(src, root / name))
        out[name] = (dst, json.loads((dst / MANIFEST).read_text()))
    return out


def _check_manifest(folder: Path, data: bytes) -> None:
    (folder / MANIFEST).write_bytes(data)
    manifest = _refused_in_one_line(lambda: read_manifest(folder))
    if manifest is not None:
        assert _well_typed(manifest, Manifest)
        for rel in manifest.files:  # every file it hashes is inside the bundle
            assert (folder / rel).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_manifests_are_read_well_typed_or_refused_in_one_line(bundle_copies, data):
    name = data.draw(st.sampled_from(sorted(bundle_copies)))
    folder, real = bundle_copies[name]
    doc = data.draw(mutated(real))
    _check_manifest(folder, json.dumps(doc, indent=1).encode())


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_damaged_manifest_files_are_refused_in_one_line(bundle_copies, data):
    name = data.draw(st.sampled_from(sorted(bundle_copies)))
    folder, real = bundle_copies[name]
    _check_manifest(folder, data.draw(damaged_text(json.dumps(real, indent=1))))


@FUZZ
@given(doc=VALUES)
def test_any_json_value_as_a_manifest_is_refused_in_one_line(doc):
    assert _refused_in_one_line(lambda: Manifest.from_dict(doc)) is None


@pytest.mark.slow
def test_the_real_manifest_reads_back(bundle_copies):
    """The unmutated manifests pass the same checks (the properties above are not vacuous)."""
    for folder, real in bundle_copies.values():
        (folder / MANIFEST).write_text(json.dumps(real))
        assert _well_typed(read_manifest(folder), Manifest)


# ---- recipes and device profiles -----------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML's basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = (f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{" + ", ".join(items) + "}"
    raise AssertionError(type(v))


def _toml(doc: dict) -> str:
    """``doc`` as TOML (``None`` has no TOML form: the key is left out)."""
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in doc.items() if v is not None)


def _tomls(paths: list[Path]) -> dict[str, dict]:
    import tomllib

    return {p.name: tomllib.loads(p.read_text()) for p in paths}


@pytest.mark.parametrize(
    ("paths", "load", "cls"),
    [(RECIPES, load_recipe, Recipe), (PROFILES, load_profile, DeviceProfile)],
)
@FUZZ
@given(data=st.data())
def test_mutated_recipes_and_profiles_are_read_well_typed_or_refused(
    tmp_path_factory, paths, load, cls, data
):
    real = _tomls(paths)
    name = data.draw(st.sampled_from(sorted(real)))
    doc = data.draw(mutated(real[name]))
    if isinstance(doc, dict):
        text = _toml(doc)
    else:  # the whole file replaced: a bare value is not TOML, nothing is an empty file
        text = "" if doc is None else f"value = {_toml_value(doc)}\n"
    raw = text.encode() if data.draw(st.booleans()) else data.draw(damaged_text(text))
    path = tmp_path_factory.getbasetemp() / f"fuzz-{name}"
    path.write_bytes(raw)
    value = _refused_in_one_line(lambda: load(str(path)))
    if value is not None:
        assert _well_typed(value, cls)


def test_shipped_recipes_and_profiles_survive_the_round_trip(tmp_path):
    """The TOML writer above reproduces every shipped file (so mutations start from them)."""
    assert RECIPES and PROFILES
    for paths, load in ((RECIPES, load_recipe), (PROFILES, load_profile)):
        for name, doc in _tomls(paths).items():
            (tmp_path / name).write_text(_toml(doc))
            assert load(str(tmp_path / name)) == load(name[: -len(".toml")])


# ---- head files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_files(bundles, neu_small, tmp_path_factory):
    """A bundle with real head versions written by ``learn``: a linear head that gained a
    class, a prototype head and a k-NN head; with the store that reads them."""
    from edge_tl.runtime import Model

    bundle = Path(shutil.copytree(bundles["ort-int8"], tmp_path_factory.mktemp("heads") / "b"))
    model = Model(bundle)
    clf = model.classifier
    images = sorted((neu_small / "scratches").iterdir())
    clf.add_class("scratch_b", images[:3])
    clf.learn(neu_small, head="prototype")
    clf.learn(neu_small, head="knn", k=3)
    files = sorted((bundle / "heads").glob("v*.npz"))
    assert len(files) == 3
    x = model.embed(images[3:5])
    arrays = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            arrays.append({k: z[k] for k in z.files})
    return clf.store, files, arrays, x


ARRAY_OPS = ("delete", "values", "dtype", "shape", "scalar", "text", "meta")


@st.composite
def mutated_arrays(draw: st.DrawFn, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a head file after one to three mutations: an array deleted, values
    replaced (NaN, infinities, huge, negative, out of range), another dtype or shape, a
    scalar where an array was, text for numbers, the metadata JSON changed."""
    a = dict(arrays)
    for _ in range(draw(st.integers(1, 3))):
        if not a:
            break
        key = draw(st.sampled_from(sorted(a)))
        op = draw(st.sampled_from(ARRAY_OPS))
        v = a[key]
        if op == "delete":
            del a[key]
        elif op == "values" and v.size and v.dtype.kind in "fiub":
            integer = v.dtype.kind in "iu"
            v = v.astype(np.int64 if integer else np.float64)  # a copy
            pool = [-1, 0, 10**12, 2**62, -(2**62)]
            bad = draw(
                st.sampled_from(pool if integer else [np.nan, np.inf, -np.inf, 1e300, *pool])
            )
            v.reshape(-1)[draw(st.integers(0, v.size - 1))] = bad
            a[key] = v
        elif op == "dtype":
            if v.dtype.kind == "U":
                a[key] = np.zeros(v.shape, draw(st.sampled_from([np.float32, np.int64, np.bool_])))
            else:
                with np.errstate(all="ignore"):
                    a[key] = v.astype(
                        draw(st.sampled_from([np.float16, np.int8, np.uint8, np.bool_, "U3"]))
                    )
        elif op == "shape":
            choice = draw(st.sampled_from(("flat", "drop", "extra", "empty")))
            if choice == "flat":
                a[key] = v.reshape(-1)
            elif choice == "drop" and v.ndim and len(v):
                a[key] = v[:-1]
            elif choice == "extra":
                a[key] = v[None]
            else:
                a[key] = v.reshape(-1)[:0]
        elif op == "scalar":
            a[key] = np.array(draw(st.sampled_from([0, -1, 1.5, np.nan, "x", True])))
        elif op == "text":
            a[key] = np.array(draw(st.text(max_size=20)))
        elif op == "meta":
            doc = draw(mutated(json.loads(str(arrays["meta"]))))  # the real file's metadata
            a["meta"] = np.array(draw(st.sampled_from([json.dumps(doc), json.dumps(doc)[:-1]])))
    return a


def _check_head(store, path: Path, x: np.ndarray) -> None:
    state = _refused_in_one_line(lambda: store.read(path))
    if state is not None:  # what it reads, it can use
        p = state.predict_proba(x)
        assert p.shape == (len(x), len(state.labels)) and np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(1), 1, rtol=1e-4)
        sim = state.similarity(x, p.argmax(1))
        assert sim is None or np.isfinite(sim).all()
        assert isinstance(state.summary(), dict)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_head_files_are_read_usable_or_refused_in_one_line(
    head_files, data, tmp_path_factory
):
    store, files, arrays, x = head_files
    i = data.draw(st.integers(0, len(files) - 1))
    a = data.draw(mutated_arrays(arrays[i]))
    path = store.dir / "v0099.npz"  # a version of this store: the message names the way back
    try:
        np.savez(path, **a)
        _check_head(store, path, x)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_damaged_head_files_are_refused_in_one_line(head_files, data):
    store, files, _, x = head_files
    raw = data.draw(st.sampled_from(files)).read_bytes()
    how = data.draw(st.sampled_from(("cut", "flip", "garbage", "member")))
    if how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    elif how == "garbage":
        raw = data.draw(st.binary(max_size=200))
    else:  # a zip whose member is not an .npy
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(data.draw(st.sampled_from(["kind.npy", "meta.npy", "x.txt"])), raw[:64])
        raw = buf.getvalue()
    path = store.dir / "v0099.npz"
    try:
        path.write_bytes(raw)
        _check_head(store, path, x)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_the_real_head_files_read_back(head_files):
    store, files, _, x = head_files
    for f in files:
        _check_head(store, f, x)
        assert store.read(f) is not None
