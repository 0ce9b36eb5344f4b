"""The ``wsi-anomaly`` command line: argument parsing only; the work is done by the package.

One module per subcommand (``add_parser(sub, parents)`` and ``run(args) -> int``); the options
they share, and the meaning of each flag, are in :mod:`wsi_anomaly.cli.options`.

Every user error (a :class:`~wsi_anomaly.errors.WsiAnomalyError`) becomes one line on stderr and
a non-zero exit code; tracebacks are kept for bugs (and shown for everything with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import WsiAnomalyError
from ..viewer import command as view
from . import demo, export, heatmap, info, mvtec, score, synth, tile, train
from .mvtec import anomaly_count
from .options import add_verbosity_options, common_parent

__all__ = ["anomaly_count", "build_parser", "main"]

#: Subcommands in the order ``--help`` lists them.
COMMANDS = (info, tile, train, score, export, mvtec, synth, heatmap, demo, view)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem and where to look, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsi-anomaly",
        description="Find anomalous tissue in whole-slide images: tile slides, train HaloAE on "
        "normal tissue, score every tile and draw slide heatmaps.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-anomaly {__version__}")
    add_verbosity_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [common_parent()]
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """-v: the package's debug messages; -q: its warnings only. Other libraries (PIL,
    matplotlib, urllib3, asyncio, distributed…) stay at WARNING either way."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("wsi_anomaly").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        return int(args.func(args) or 0)
    except WsiAnomalyError as exc:
        if args.debug:
            raise
        print(f"wsi-anomaly {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # The filesystem refused something (a name too long, no space, no permission) in a
        # place no check caught first: still one line, naming the path and the reason.
        if args.debug:
            raise
        from ..outputs import describe_os_error

        where = exc.filename if exc.filename is not None else "a file"
        reason = describe_os_error(exc, where).split(": ", 1)[-1]
        print(
            f"wsi-anomaly {args.command}: error: filesystem error on {str(where)[:120]}: {reason}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"wsi-anomaly {args.command}: interrupted; partial outputs were not kept",
            file=sys.stderr,
        )
        return 130
