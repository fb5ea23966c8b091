"""Signed bundles: Ed25519 keys, a detached signature of ``manifest.json``, trusted keys.

Torch-free (``cryptography`` only). The manifest holds every file's SHA-256, so one
signature over it covers the whole bundle: :func:`sign_bundle` writes ``manifest.sig``
(JSON: algorithm, key id, signing time, the manifest's SHA-256 and the Ed25519 signature of
those four fields), and :func:`check_signature` refuses an unsigned bundle, one signed by an
untrusted key, or one whose manifest changed after signing. The files themselves are then
checked against the signed hashes by :func:`edge_tl.bundle.verify_files`.

Replay: a bundle signed earlier by the same trusted key verifies as well as a newer one. A
device that was given trusted keys therefore remembers, per bundle path, the newest signing
time it accepted (:func:`remember`, in ``$EDGE_TL_STATE/signatures.json``) and refuses an
older signature at that path; going back on purpose means signing the older bundle again
(a fresh signing time is the publisher's consent).

Example:
    >>> key_id = generate_keys("release")  # doctest: +SKIP
    >>> sign_bundle("bundles/neu-int8", load_private_key("release.key"))  # doctest: +SKIP
    >>> keys = trusted_keys(["release.pub"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_tl.bundle import MANIFEST, SIGNATURE, atomic_write
from edge_tl.errors import EdgeTLError

__all__ = [
    "SIGNATURE",
    "STATE_ENV",
    "TRUST_ENV",
    "Signature",
    "check_signature",
    "generate_keys",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_signature",
    "remember",
    "sign_bundle",
    "signature_status",
    "trusted_keys",
]

ALGORITHM = "ed25519"
TRUST_ENV = "EDGE_TL_TRUST"  # a .pub file or a folder of .pub files (os.pathsep-separated)
STATE_ENV = "EDGE_TL_STATE"  # folder for signatures.json (default $XDG_STATE_HOME/edge_tl)
_CONTEXT = b"edge_tl bundle signature v1\n"  # domain separation: never valid for other data

Trust = Sequence[str | os.PathLike | Ed25519PublicKey]


@dataclass(frozen=True)
class Signature:
    """``manifest.sig``: who signed which manifest bytes, when; ``signature`` is base64."""

    algorithm: str
    key_id: str
    signed_at: str  # UTC, ISO 8601 with microseconds: later signatures sort later
    manifest_sha256: str
    signature: str

    def message(self) -> bytes:
        """The bytes the Ed25519 signature covers: every field but the signature."""
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return _CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


# ---- keys --------------------------------------------------------------------------------
def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(name: str | os.PathLike, force: bool = False) -> str:
    """Write a new Ed25519 key pair ``NAME.key`` (PEM PKCS#8, mode 0600) and ``NAME.pub``
    (PEM); return its key id. A trailing ``.key``/``.pub`` in ``name`` is dropped.

    Raises:
        EdgeTLError: either file exists (without ``force``) or cannot be written.
    """
    base = Path(name)
    if base.suffix in (".key", ".pub"):
        base = base.with_suffix("")
    priv_path, pub_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise EdgeTLError(f"{p} already exists; choose another NAME or pass --force")
        if p.is_dir():
            raise EdgeTLError(f"{p} is a folder; choose another NAME")
    if not base.parent.is_dir():
        raise EdgeTLError(f"folder {base.parent} does not exist; create it or choose another NAME")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(priv_path, pem, 0o600)
    _write(pub_path, pub, 0o644)
    return key_id(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    """A temporary file created with ``mode`` (never wider), fsynced and renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_pem(path: Path, what: str, fix: str) -> bytes:
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise EdgeTLError(f"{what} {path} {where}; {fix}")
    data = path.read_bytes()
    if len(data) > 64 * 1024:
        raise EdgeTLError(
            f"{path} is not a PEM key (over 64 KB); pass a file from `edge-tl keygen`"
        )
    return data


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (``NAME.key`` from :func:`generate_keys`).

    Raises:
        EdgeTLError: missing, a public key, encrypted, not PEM, or not Ed25519.
    """
    path = Path(path)
    data = _read_pem(path, "key file", "create a key pair with `edge-tl keygen NAME`")
    if b"PUBLIC KEY" in data:
        raise EdgeTLError(
            f"{path} is a public key; sign with the private key (NAME.key from `edge-tl keygen`)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EdgeTLError(
            f"{path} is encrypted; edge_tl reads unencrypted keys (keep NAME.key mode 0600 "
            "on the signing host)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise EdgeTLError(
            f"{path} is not a PEM private key; pass NAME.key from `edge-tl keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
        raise EdgeTLError(
            f"{path} is not an Ed25519 key ({kind}); create one with `edge-tl keygen NAME`"
        )
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path`` (``NAME.pub``).

    Raises:
        EdgeTLError: missing, a private key, not PEM, or not Ed25519.
    """
    path = Path(path)
    data = _read_pem(path, "trusted key", "copy the publisher's NAME.pub here and pass its path")
    if b"PRIVATE KEY" in data:
        raise EdgeTLError(
            f"{path} is a private key; trust the public key (NAME.pub) and keep NAME.key off "
            "the device"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise EdgeTLError(
            f"{path} is not a PEM public key; pass NAME.pub from `edge-tl keygen`"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgeTLError(
            f"{path} is not an Ed25519 public key; pass NAME.pub from `edge-tl keygen`"
        )
    return key


def trusted_keys(trust: Trust | None = None) -> dict[str, Ed25519PublicKey] | None:
    """The trusted public keys by key id: from ``trust`` (``.pub`` paths, folders of them, or
    key objects) or, when ``trust`` is None, from ``$EDGE_TL_TRUST``; None when neither
    names any (then bundles are checked by their hashes only).

    Raises:
        EdgeTLError: a path that is missing, a folder without ``.pub`` files, or a file that
            is not an Ed25519 public key.
    """
    if trust is None:
        env = os.environ.get(TRUST_ENV, "").strip()
        if not env:
            return None
        trust = [p for p in env.split(os.pathsep) if p]
    keys: dict[str, Ed25519PublicKey] = {}
    for item in trust:
        if isinstance(item, Ed25519PublicKey):
            keys[key_id(item)] = item
            continue
        p = Path(item)
        if p.is_dir():
            pubs = sorted(p.glob("*.pub"))
            if not pubs:
                raise EdgeTLError(
                    f"trusted-key folder {p} holds no .pub files; copy the publisher's "
                    "NAME.pub there (or drop --trust / $EDGE_TL_TRUST)"
                )
            for f in pubs:
                k = load_public_key(f)
                keys[key_id(k)] = k
        else:
            k = load_public_key(p)
            keys[key_id(k)] = k
    return keys or None


# ---- signing and checking ----------------------------------------------------------------
def sign_bundle(bundle: str | os.PathLike, key: Ed25519PrivateKey) -> Signature:
    """Sign ``bundle/manifest.json`` (its exact bytes) with ``key``: ``manifest.sig`` is
    written atomically, replacing an earlier signature. The caller checks the files first
    (:func:`edge_tl.bundle.read_manifest`): a signature vouches for what is there.
    """
    bundle = Path(bundle)
    unsigned = Signature(
        algorithm=ALGORITHM,
        key_id=key_id(key),
        signed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        manifest_sha256=hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest(),
        signature="",
    )
    sig = Signature(
        **{
            **asdict(unsigned),
            "signature": base64.b64encode(key.sign(unsigned.message())).decode(),
        }
    )
    text = json.dumps(asdict(sig), indent=2) + "\n"
    atomic_write(bundle / SIGNATURE, lambda f: f.write(text.encode()))
    return sig


def read_signature(bundle: str | os.PathLike) -> Signature | None:
    """``bundle/manifest.sig``, or None when the bundle is unsigned.

    Raises:
        EdgeTLError: a signature file that is not one.
    """
    path = Path(bundle) / SIGNATURE
    if not path.is_file():
        return None
    bad = f"{path} is not a valid signature file; sign the bundle again with `edge-tl sign`"
    try:
        d = json.loads(path.read_bytes())
        sig = Signature(**d)
    except (ValueError, TypeError):
        raise EdgeTLError(bad) from None
    if sig.algorithm != ALGORITHM or not all(isinstance(v, str) for v in asdict(sig).values()):
        raise EdgeTLError(bad)
    return sig


def check_signature(
    bundle: str | os.PathLike, manifest_bytes: bytes, keys: dict[str, Ed25519PublicKey]
) -> Signature:
    """Refuse ``bundle`` unless ``manifest_bytes`` carry a valid signature by one of
    ``keys``; the signature.

    Raises:
        EdgeTLError: unsigned, signed by another key, or a manifest changed after signing.
    """
    bundle = Path(bundle)
    sig = read_signature(bundle)
    trusted = ", ".join(sorted(keys))
    if sig is None:
        raise EdgeTLError(
            f"bundle {bundle} is not signed and trusted keys are set ({trusted}); sign it "
            f"with `edge-tl sign {bundle} --key NAME.key` where the key is kept"
        )
    key = keys.get(sig.key_id)
    if key is None:
        raise EdgeTLError(
            f"bundle {bundle} is signed by key {sig.key_id}, which is not trusted here "
            f"(trusted: {trusted}); sign it with a trusted key or add its .pub to --trust"
        )
    try:
        raw = base64.b64decode(sig.signature, validate=True)
        key.verify(raw, sig.message())
    except (InvalidSignature, binascii.Error, ValueError):
        raise EdgeTLError(
            f"bundle {bundle}: {SIGNATURE} does not verify with key {sig.key_id} (the signature "
            "was altered); re-copy the bundle or sign it again"
        ) from None
    if hashlib.sha256(manifest_bytes).hexdigest() != sig.manifest_sha256:
        raise EdgeTLError(
            f"bundle {bundle}: manifest.json changed after it was signed by key {sig.key_id}; "
            "re-copy the bundle, or re-export and sign it again"
        )
    return sig


def signature_status(
    bundle: str | os.PathLike, keys: dict[str, Ed25519PublicKey] | None
) -> dict[str, Any]:
    """What ``inspect`` / ``verify`` report: ``signed``, ``key_id``, ``signed_at`` and
    ``verified`` (True, or None when no trusted keys were given: not checked). Call after
    the bundle was read (with ``keys``, a bad signature has already been refused)."""
    sig = read_signature(bundle)
    if sig is None:
        return {"signed": False, "key_id": None, "signed_at": None, "verified": None}
    return {
        "signed": True,
        "key_id": sig.key_id,
        "signed_at": sig.signed_at,
        "verified": True if keys else None,
    }


# ---- replay guard ------------------------------------------------------------------------
def _state_file() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env) / "signatures.json"
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edge_tl" / "signatures.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remember(identity: str, sig: Signature) -> None:
    """Record ``sig`` as the newest signature accepted for ``identity`` (a resolved bundle or
    archive path) on this device, or refuse it when an earlier load accepted a newer one.

    Raises:
        EdgeTLError: an older signature than the one accepted before (a replayed bundle), or
            a state folder that cannot be written.
    """
    path = _state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            try:
                seen = json.loads(path.read_bytes()) if path.is_file() else {}
            except ValueError:
                seen = None
            if not isinstance(seen, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("signed_at"), str) for v in seen.values()
            ):
                # Fail closed: starting again would let the replay it guards against through.
                raise EdgeTLError(
                    f"{path} (the signatures this device accepted, for the replay guard) is "
                    "damaged; restore it, or remove it to start a new record (every bundle "
                    "path then accepts its next signature once)"
                )
            last = seen.get(identity)
            if last and sig.signed_at < last["signed_at"]:
                raise EdgeTLError(
                    f"bundle {identity} was signed at {sig.signed_at}, before the signature "
                    f"of {last['signed_at']} this device already accepted there (an older "
                    "bundle copied over a newer one?); to go back on purpose sign it again "
                    f"with `edge-tl sign`, or remove its entry from {path}"
                )
            if last and last["signed_at"] == sig.signed_at:
                return
            seen[identity] = {
                "signed_at": sig.signed_at,
                "key_id": sig.key_id,
                "manifest_sha256": sig.manifest_sha256,
            }
            text = json.dumps(seen, indent=2, sort_keys=True) + "\n"
            atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise EdgeTLError(
            f"cannot record accepted signatures in {path} ({e.strerror}); set "
            f"${STATE_ENV} to a writable folder"
        ) from None
