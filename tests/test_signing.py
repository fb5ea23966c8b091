"""Signed bundles through the command line: keys, signing, and a device that trusts a key
refusing what it should (unsigned, another key, a changed file or manifest, a replayed
older signature) while a signed, intact bundle - learned on or not - loads and predicts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NEU

IMAGE = NEU / "scratches" / "scratches_1.jpg"


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_tl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGE_TL_QUIET": "1", **(env or {})},
        timeout=600,
    )


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("edge-tl: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    for name in ("release", "other"):
        res = cli("keygen", root / name)
        assert res.returncode == 0, res.stderr
    return {"release": root / "release", "other": root / "other"}


@pytest.fixture(scope="module")
def signed(bundles, keys, tmp_path_factory) -> Path:
    """A copy of the FP32 bundle signed with the release key (never modified by tests)."""
    out = tmp_path_factory.mktemp("signed") / "b"
    shutil.copytree(bundles["onnx-fp32"], out)
    res = cli("sign", out, "--key", f"{keys['release']}.key")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def state(tmp_path) -> dict[str, str]:
    """A fresh replay-guard record for each test (never the user's own)."""
    return {"EDGE_TL_STATE": str(tmp_path / "state")}


def test_keygen_writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite(tmp_path):
    from edge_tl.signing import key_id, load_public_key

    res = cli("keygen", tmp_path / "k", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert out["key_id"] == key_id(load_public_key(tmp_path / "k.pub"))
    before = (tmp_path / "k.key").read_bytes()
    one_line_error(cli("keygen", tmp_path / "k"), "k.key already exists", "--force")
    assert (tmp_path / "k.key").read_bytes() == before
    assert cli("keygen", tmp_path / "k.key", "--force").returncode == 0
    assert (tmp_path / "k.key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600


@pytest.mark.slow
def test_signed_intact_bundle_loads_predicts_and_says_who_signed_it(signed, keys, state):
    pub = f"{keys['release']}.pub"
    trusted = cli("predict", signed, IMAGE, "--json", "--trust", pub, env=state)
    assert trusted.returncode == 0, trusted.stderr
    plain = cli("predict", signed, IMAGE, "--json")
    assert json.loads(trusted.stdout) == json.loads(plain.stdout)

    from edge_tl.signing import key_id, load_public_key

    kid = key_id(load_public_key(pub))
    info = json.loads(cli("inspect", signed, "--json", "--trust", pub, env=state).stdout)
    assert info["signature"] == {
        "signed": True,
        "key_id": kid,
        "signed_at": info["signature"]["signed_at"],
        "verified": True,
    }
    assert "manifest.sig" not in info["files"]
    unchecked = cli("inspect", signed).stdout  # no trusted keys: says so, still loads
    assert f"signed by key {kid}" in unchecked and "not checked" in unchecked
    assert f"signed by key {kid}" in cli("verify", signed, "--trust", pub, env=state).stdout


def _tamper(bundle: Path, how: str) -> None:
    if how == "unsigned":
        (bundle / "manifest.sig").unlink()
    elif how == "changed_file":
        with open(bundle / "head.npz", "ab") as f:
            f.write(b"\0")
    elif how == "changed_manifest":
        m = json.loads((bundle / "manifest.json").read_text())
        m["labels"] = list(reversed(m["labels"]))
        (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    elif how == "rehashed_manifest":  # an attacker also fixes the hash in the signature file
        import hashlib

        _tamper(bundle, "changed_manifest")
        sig = json.loads((bundle / "manifest.sig").read_text())
        sig["manifest_sha256"] = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        (bundle / "manifest.sig").write_text(json.dumps(sig))


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, trust, words",
    [
        ("unsigned", "release", ["is not signed", "edge-tl sign"]),
        ("none", "other", ["signed by key", "not trusted here", "--trust"]),
        ("changed_file", "release", ["head.npz does not match", "after the bundle was signed"]),
        ("changed_manifest", "release", ["manifest.json changed after it was signed"]),
        ("rehashed_manifest", "release", ["manifest.sig does not verify"]),
    ],
)
def test_a_device_that_trusts_a_key_refuses_what_that_key_did_not_sign(
    signed, keys, state, tmp_path, how, trust, words
):
    b = tmp_path / "b"
    shutil.copytree(signed, b)
    _tamper(b, how)
    one_line_error(
        cli("predict", b, IMAGE, "--trust", f"{keys[trust]}.pub", env=state), str(b), *words
    )
    if how in ("unsigned", "changed_file"):  # without trusted keys: the hashes, as before
        plain = cli("predict", b, IMAGE)
        assert (plain.returncode == 0) == (how == "unsigned"), plain.stderr


@pytest.mark.slow
def test_an_older_signed_bundle_copied_over_a_newer_one_is_refused(signed, keys, state, tmp_path):
    pub, key = f"{keys['release']}.pub", f"{keys['release']}.key"
    old, slot = tmp_path / "old", tmp_path / "slot"
    shutil.copytree(signed, old)
    shutil.copytree(signed, slot)
    assert cli("sign", slot, "--key", key).returncode == 0  # the newer release
    assert cli("inspect", slot, "--trust", pub, env=state).returncode == 0  # accepted here
    shutil.rmtree(slot)
    shutil.copytree(old, slot)  # the replay: validly signed, but older
    one_line_error(
        cli("inspect", slot, "--trust", pub, env=state), "before the signature", "sign it again"
    )
    assert cli("inspect", old, "--trust", pub, env=state).returncode == 0  # another path
    assert cli("sign", slot, "--key", key).returncode == 0  # going back on purpose
    assert cli("inspect", slot, "--trust", pub, env=state).returncode == 0
    # a damaged record fails closed: starting afresh would let the replay through
    record = Path(state["EDGE_TL_STATE"]) / "signatures.json"
    for garbage in ("{garbage", "[]", '{"x": 1}'):
        record.write_text(garbage)
        one_line_error(cli("inspect", slot, "--trust", pub, env=state), "is damaged", "remove it")
    record.unlink()
    assert cli("inspect", slot, "--trust", pub, env=state).returncode == 0


@pytest.mark.slow
def test_learning_on_a_signed_bundle_keeps_it_loadable_with_trust(
    signed, keys, state, tmp_path, neu_small
):
    pub = f"{keys['release']}.pub"
    b = tmp_path / "b"
    shutil.copytree(signed, b)
    sig = (b / "manifest.sig").read_bytes()
    support = tmp_path / "support"
    for c in ("crazing", "patches"):
        (support / c).mkdir(parents=True)
        for p in sorted((neu_small / c).iterdir())[:3]:
            shutil.copy(p, support / c / p.name)
    res = cli("learn", b, support, "--trust", pub, env=state)
    assert res.returncode == 0, res.stderr
    assert (b / "manifest.sig").read_bytes() == sig and (b / "heads" / "v0001.npz").is_file()
    pred = cli("predict", b, IMAGE, "--json", "--trust", pub, env=state)
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)[0]["label"] in ("crazing", "patches", "unknown")
    bank = cli("anomaly", b, support / "crazing", "--trust", pub, env=state)
    assert bank.returncode == 0, bank.stderr
    assert (b / "manifest.sig").read_bytes() == sig
    info = json.loads(cli("inspect", b, "--json", "--trust", pub, env=state).stdout)
    assert info["signature"]["verified"] and info["learned_heads"][0]["current"]
    assert info["anomaly_banks"][0]["current"]
    assert not [f for f in info["files"] if f.startswith(("heads/", "anomaly/"))]


@pytest.mark.slow
def test_trust_from_the_environment_and_from_key_objects(signed, keys, state, tmp_path):
    folder = tmp_path / "trust"
    folder.mkdir()
    shutil.copy(f"{keys['other']}.pub", folder)
    env = {**state, "EDGE_TL_TRUST": str(folder)}
    one_line_error(cli("inspect", signed, env=env), "not trusted here")
    shutil.copy(f"{keys['release']}.pub", folder)  # a folder of keys: any of them will do
    assert cli("inspect", signed, env=env).returncode == 0

    from edge_tl.errors import EdgeTLError
    from edge_tl.runtime import Model
    from edge_tl.signing import load_public_key

    os.environ["EDGE_TL_STATE"] = state["EDGE_TL_STATE"]
    try:
        model = Model(signed, trust=[load_public_key(f"{keys['release']}.pub")])
        assert model.predict([IMAGE])[0].label in model.manifest.labels
        with pytest.raises(EdgeTLError, match="not trusted here"):
            Model(signed, trust=[f"{keys['other']}.pub"])
    finally:
        del os.environ["EDGE_TL_STATE"]


def test_bad_keys_and_trust_are_refused_in_one_line(keys, tmp_path):
    (tmp_path / "garbage.key").write_text("not a key\n")
    (tmp_path / "empty").mkdir()
    b = tmp_path / "nothing"  # the key is checked before the bundle is touched
    priv, pub = f"{keys['release']}.key", f"{keys['release']}.pub"
    one_line_error(cli("sign", b, "--key", tmp_path / "nope.key"), "does not exist", "keygen")
    one_line_error(cli("sign", b, "--key", pub), "is a public key", "private key")
    one_line_error(cli("sign", b, "--key", tmp_path / "garbage.key"), "not a PEM private key")
    one_line_error(cli("inspect", b, "--trust", tmp_path / "empty"), "holds no .pub files")
    one_line_error(cli("inspect", b, "--trust", priv), "is a private key", "NAME.pub")
    one_line_error(
        cli("inspect", b, env={"EDGE_TL_TRUST": str(tmp_path / "empty")}), "holds no .pub files"
    )
    out = tmp_path / "bundle"
    one_line_error(
        cli("export", "--backbone", "efficientnet_lite0", "--out", out, "--sign", pub),
        "is a public key",
    )
    assert not out.exists()
