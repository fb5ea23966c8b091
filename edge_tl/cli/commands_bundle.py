"""The ``edge-tl`` subcommands on a bundle as a signed, packed whole: ``inspect``,
``verify``, ``keygen``, ``sign``, ``pack`` and ``unpack``. Each makes one library call and
prints the outcome (:mod:`edge_tl.cli.output`); each returns the exit code.
"""

from __future__ import annotations

import argparse
import shutil

from edge_tl.cli import output

__all__ = ["inspect", "keygen", "pack", "bundle_signature", "sign", "unpack", "verify"]


def inspect(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.report import read_report
    from edge_tl.runtime.anomaly import bank_store
    from edge_tl.runtime.learner import head_store

    m = read_manifest(args.bundle, verify=True, trust=args.trust)
    signature = bundle_signature(args.bundle, args.trust)
    report = read_report(args.bundle)
    heads = head_store(args.bundle, m).history()
    banks = bank_store(args.bundle, m).history()
    if args.json:
        output.print_json(
            {
                **m.to_dict(),
                "hashes_verified": True,
                "signature": signature,
                "fidelity": report.to_dict() if report is not None else None,
                "learned_heads": heads,
                "anomaly_banks": banks,
            }
        )
    else:
        output.inspect(args.bundle, m, report, heads, banks, signature)
    return 0


def verify(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model
    from edge_tl.runtime.selftest import enforce

    # hashes (and with trusted keys the signature) checked; the current head read
    model = Model(args.bundle, self_test=False, trust=args.trust)
    signature = bundle_signature(args.bundle, args.trust)
    result = model.check_self_test()
    model.detector.state  # noqa: B018 - a damaged bank fails here, not at the next predict
    if args.json:
        output.print_json(
            {
                "bundle": str(args.bundle),
                "hashes_verified": True,
                "signature": signature,
                "self_test": result,
            }
        )
    else:
        output.verify(args.bundle, result, signature)
    enforce(model.path, result)
    return 0


def bundle_signature(bundle, trust) -> dict:
    """The signature status of ``bundle`` against the ``trust`` keys (``--trust``)."""
    from edge_tl.signing import signature_status, trusted_keys

    return signature_status(bundle, trusted_keys(trust))


def keygen(args: argparse.Namespace) -> int:
    from edge_tl.signing import generate_keys

    base = args.name.with_suffix("") if args.name.suffix in (".key", ".pub") else args.name
    kid = generate_keys(base, force=args.force)
    if args.json:
        output.print_json(
            {"key_id": kid, "private_key": f"{base}.key", "public_key": f"{base}.pub"}
        )
    else:
        print(
            f"key {kid}: private {base}.key (mode 0600; keep it on the signing host), "
            f"public {base}.pub (copy it to devices: --trust {base}.pub)"
        )
    return 0


def sign(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.signing import load_private_key, sign_bundle

    key = load_private_key(args.key)
    read_manifest(args.bundle, verify=True, trust=[])  # vouch only for intact files
    sig = sign_bundle(args.bundle, key)
    status = {"signed": True, "key_id": sig.key_id, "signed_at": sig.signed_at}
    if args.json:
        output.print_json({"bundle": str(args.bundle), **status})
    else:
        output.signed(args.bundle, status)
    return 0


def pack(args: argparse.Namespace) -> int:
    from edge_tl.archive import pack as pack_bundle
    from edge_tl.bundle import sha256

    out = pack_bundle(args.bundle, args.out, force=args.force)
    info = {"archive": str(out), "bytes": out.stat().st_size, "sha256": sha256(out)}
    if args.json:
        output.print_json({"bundle": str(args.bundle), **info})
    else:
        print(
            f"packed {args.bundle} -> {out} ({info['bytes'] / 1e6:.1f} MB, sha256 "
            f"{info['sha256'][:16]}); every command that takes a bundle takes {out.name}"
        )
    return 0


def unpack(args: argparse.Namespace) -> int:
    from edge_tl.archive import bundle_in
    from edge_tl.archive import unpack as unpack_archive
    from edge_tl.bundle import read_manifest

    out = unpack_archive(args.archive, args.out)
    try:
        bundle = bundle_in(out, args.archive)
        read_manifest(bundle, verify=True, trust=args.trust)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-right is left behind
        raise
    signature = bundle_signature(bundle, args.trust)
    if args.json:
        output.print_json(
            {"archive": str(args.archive), "bundle": str(bundle), "signature": signature}
        )
    else:
        print(f"unpacked {args.archive} -> {bundle} (hashes verified)")
        print(f"  {output.signature_line(signature)}")
    return 0
