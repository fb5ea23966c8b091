"""One function per ``edge-tl`` subcommand: parsed flags in, one library call, output out.

Each returns the exit code. Decisions (which face answers, which split, what a change
means) are the library's; printing is :mod:`edge_tl.cli.output`. The functions live by
family: the workstation's in :mod:`~edge_tl.cli.commands_train`, the device side's in
:mod:`~edge_tl.cli.commands_device`, a bundle as a signed, packed whole in
:mod:`~edge_tl.cli.commands_bundle`; all are importable from here, with
:func:`bundle_from_archive`, which runs around every command.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from edge_tl.cli.commands_bundle import inspect, keygen, pack, sign, unpack, verify
from edge_tl.cli.commands_device import (
    adapt,
    anomaly,
    bench,
    evaluate,
    learn,
    predict,
    rollback,
    serve,
)
from edge_tl.cli.commands_train import compare, demo, export, select, train
from edge_tl.errors import EdgeTLError

__all__ = [
    "adapt",
    "anomaly",
    "bench",
    "bundle_from_archive",
    "compare",
    "demo",
    "evaluate",
    "export",
    "inspect",
    "keygen",
    "learn",
    "pack",
    "predict",
    "rollback",
    "select",
    "serve",
    "sign",
    "train",
    "unpack",
    "verify",
]

WRITES_INTO_BUNDLE = ("learn", "anomaly", "rollback", "sign", "adapt")


@contextlib.contextmanager
def bundle_from_archive(args: argparse.Namespace) -> Iterator[None]:
    """When ``args.bundle`` is an archive (``edge-tl pack``): for a command that only reads,
    unpack it into a temporary folder for the command's duration; refuse one that writes
    into the bundle before any work."""
    from edge_tl.archive import is_archive, open_bundle

    path = getattr(args, "bundle", None)
    if path is None or not is_archive(path):
        yield
        return
    listing = args.command == "rollback" and args.list
    if args.command in WRITES_INTO_BUNDLE and not listing:
        raise EdgeTLError(
            f"{path} is an archive, and {args.command} writes into the bundle; unpack it with "
            f"`edge-tl unpack {path} DIR` and run `edge-tl {args.command}` on DIR"
            + (" (then `edge-tl pack DIR` again)" if args.command == "sign" else "")
        )
    unpacked, args.bundle = open_bundle(path)
    with unpacked:
        yield
