"""What many ``edge-tl`` subcommands share: the help epilog, bundle and ``--skip-bad`` help,
``--trust`` and ``--class-threshold``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["BUNDLE_HELP", "EPILOG", "SKIP_BAD_HELP", "add_class_threshold", "add_trust"]

EPILOG = (
    "Docs and examples: README.md. Every command exits 2 with a one-line error on bad input. "
    "Folders: hidden and OS files (.DS_Store, Thumbs.db, desktop.ini, ._*, __MACOSX) are "
    "ignored; images are .jpg .jpeg .png .bmp .tif .tiff .webp .gif .pgm .ppm in any case; "
    "images over EDGE_TL_MAX_PIXELS (default 120,000,000) pixels are refused."
)
SKIP_BAD_HELP = (
    "leave files that are not readable images out, and list them at the end (and under "
    '"skipped" with --json); by default the first one stops the command'
)
BUNDLE_HELP = "bundle folder from `edge-tl export`, or its archive from `edge-tl pack`"


def add_trust(p: argparse.ArgumentParser) -> None:
    """``--trust KEY.pub`` (repeatable) on a command that loads a bundle."""
    p.add_argument(
        "--trust",
        action="append",
        type=Path,
        metavar="KEY.pub",
        help="trusted public key (NAME.pub from `edge-tl keygen`) or a folder of .pub files; "
        "repeatable. With one, unsigned bundles, bundles signed by other keys and bundles "
        "changed after signing are refused (default: $EDGE_TL_TRUST; without either, files "
        "are checked by their hashes only)",
    )


def add_class_threshold(p: argparse.ArgumentParser) -> None:
    """``--class-threshold CLASS=T``: the decision rule of :mod:`edge_tl.runtime.operating`."""
    p.add_argument(
        "--class-threshold",
        action="append",
        default=[],
        metavar="CLASS=T",
        help="classification: call CLASS when its probability is >= T (in [0, 1]), else the "
        "most probable other class (T from `evaluate --split val --min-recall CLASS=R`); "
        "one class",
    )
