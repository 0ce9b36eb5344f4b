"""The ``wsi-anomaly`` command line: argument parsing only; the work is done by the package.

One module per subcommand (``add_parser(sub, parents)`` and ``run(args) -> int``); the options
they share, and the meaning of each flag, are in :mod:`wsi_anomaly.cli.options`.

Every user error (a :class:`~wsi_anomaly.errors.WsiAnomalyError`) becomes one line on stderr and
a non-zero exit code; tracebacks are kept for bugs (and shown for everything with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_SLIDES_FAILED, WsiAnomalyError

__all__ = ["anomaly_count", "build_parser", "main"]

#: Exit status after SIGTERM (128 + 15, as a shell reports it).
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's cancel, ``kill``): unwinds like Ctrl-C, so every working
    folder of the run is cleaned up on the way out."""


def __getattr__(name: str) -> Any:
    if name == "anomaly_count":
        from .mvtec import anomaly_count

        return anomaly_count
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _commands() -> tuple:
    """Subcommands in the order ``--help`` lists them (imported here, inside :func:`main`'s
    handling of Ctrl-C, not when the package is imported)."""
    from ..viewer import command as view
    from . import (
        demo,
        export,
        heatmap,
        info,
        mvtec,
        napari_setup,
        qc,
        render,
        score,
        synth,
        tile,
        train,
    )

    return (
        info,
        tile,
        qc,
        train,
        score,
        export,
        mvtec,
        synth,
        heatmap,
        render,
        demo,
        view,
        napari_setup,
    )


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
    from .options import add_verbosity_options, common_parent

    parser.add_argument("--version", action="version", version=f"wsi-anomaly {__version__}")
    add_verbosity_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [common_parent()]
    for command in _commands():
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


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` in the main thread (when
    nothing else handles SIGTERM), so it cleans up as Ctrl-C does."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        previous = None
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: Exit status when the reader of the output went away (``info --json | head -1``): the status
#: a shell reports for a program ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141

#: Options that name an output file or folder a command may create.
_OUTPUT_OPTIONS = ("out", "maps", "export_png", "coords_h5")


def _missing_folders(args: argparse.Namespace) -> list[Path]:
    """The output paths of ``args`` and their parent folders that do not exist yet, deepest
    first: what a failed run may remove again if it leaves them empty."""
    missing: list[Path] = []
    for name in _OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if not isinstance(value, str | os.PathLike) or not str(value):
            continue
        for path in (Path(value).absolute(), *Path(value).absolute().parents):
            try:
                if path.exists() or os.path.lexists(path):
                    break
            except OSError:  # a name the filesystem refuses (too long…): nothing was created
                break
            if path not in missing:
                missing.append(path)
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that exist and are empty; leave everything else."""
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink():
            try:
                folder.rmdir()
            except OSError:  # not empty, or not ours to remove: keep it
                pass


def _quiet_stdout() -> None:
    """The reader of stdout has gone (a closed pipe): send what is left to /dev/null so that the
    interpreter's last flush does not report the same broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured in tests)
        pass


def _quiet_abandoned_io() -> None:
    """After an interruption, the I/O it cut short (zarr's pending writes on its own event loop)
    is reported by asyncio as "Task was destroyed but it is pending!" when the interpreter
    exits. The run's one line already says that its partial outputs were removed, so those
    reports are dropped."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_unwinds():
        try:
            return _main(argv)
        except KeyboardInterrupt as exc:
            # Ctrl-C or SIGTERM before a command started (while the modules load).
            _quiet_abandoned_io()
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            print(f"wsi-anomaly: {stopped}", file=sys.stderr)
            return EXIT_TERMINATED if isinstance(exc, Terminated) else 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    new_folders = _missing_folders(args)
    code = 1
    try:
        code = _run(args)
    finally:
        if code not in (0, EXIT_SLIDES_FAILED):
            # A failed run leaves no empty output folder behind that it created itself.
            _remove_empty(new_folders)
    return code


def _run(args: argparse.Namespace) -> int:
    """``args.func(args)`` with every user error, filesystem error and interruption as one
    line on stderr and an exit status."""
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (``| head``): nothing to report, as other Unix tools do.
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
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
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        _quiet_abandoned_io()
        from .options import nothing_kept

        stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
        what = getattr(args, "interrupted", None) or nothing_kept
        print(f"wsi-anomaly {args.command}: {stopped}; {what(args)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else 130
