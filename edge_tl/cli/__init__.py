"""``edge-tl``: each subcommand is a thin call into the library.

:mod:`~edge_tl.cli.parser` holds the flags, :mod:`~edge_tl.cli.commands` the calls and
:mod:`~edge_tl.cli.output` what a person reads. Bad input ends in one line
``edge-tl: error: <problem>; <fix>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from edge_tl.errors import EdgeTLError
from edge_tl.progress import log_to_stderr

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-tl`` with ``argv`` (default: the process's arguments); the exit code."""
    from edge_tl.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        from edge_tl.cli.commands import bundle_from_archive

        with bundle_from_archive(args):
            return int(args.func(args) or 0)
    except EdgeTLError as e:
        print(f"edge-tl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `edge-tl inspect B | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # permissions, full disk: one line, not a traceback
        print(f"edge-tl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-tl: interrupted; {_kept_after_interrupt(args)}", file=sys.stderr)
        return 130


def _kept_after_interrupt(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    if args.command == "train" and out is not None:
        from edge_tl.train import checkpoint_path

        ckpt = checkpoint_path(out)
        if ckpt.is_file():
            return f"finished epochs are saved in {ckpt}; rerun with --resume to continue"
    if args.command == "compare" and out is not None:
        from edge_tl.train.compare import partial_path

        work = partial_path(out)
        if work.is_dir():
            return f"finished strategies are kept in {work}; rerun with --resume to continue"
    return "nothing was written"
