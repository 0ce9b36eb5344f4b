"""``wsi-anomaly view RESULTS/ [--port 8000] [--host 127.0.0.1] [--no-browser]``."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_parser(
    subparsers, parents: list[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """Register ``view`` on the CLI's subparsers (``parents``: the options every subcommand
    shares). The parsed arguments carry ``func`` (and ``run``): :func:`run`."""
    from ..cli.options import add_command, port, positive_int

    parser = add_command(
        subparsers,
        parents or [],
        "view",
        help="browse a results folder in a local web app (read-only)",
        description="Serve a `heatmap` results folder as a local, read-only web app: a cohort "
        "table and, per slide, a deep-zoom view of the original slide with the "
        "anomaly heatmap over it.",
        run=run,
        examples=[
            "wsi-anomaly view results/                        # opens a browser",
            "wsi-anomaly view results/ --port 8080 --no-browser",
        ],
    )
    parser.add_argument("results", help="the --out folder of `wsi-anomaly heatmap`")
    parser.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: any free)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument(
        "--cache-mb",
        type=positive_int,
        default=64,
        help="memory for encoded tiles, MiB (default 64)",
    )
    parser.set_defaults(func=run, run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted. Returns the exit code."""
    try:
        import bokeh  # noqa: F401
        import jinja2  # noqa: F401
    except ImportError as exc:
        print(
            f"wsi-anomaly view needs {exc.name}, part of the default install: "
            "pip install --force-reinstall wsi-anomaly",
            file=sys.stderr,
        )
        return 2
    from ..errors import WsiAnomalyError
    from .server import make_server

    try:
        server = make_server(
            args.results, host=args.host, port=args.port, cache_bytes=max(1, args.cache_mb) << 20
        )
    except WsiAnomalyError as exc:
        print(f"wsi-anomaly view: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except OSError as exc:
        print(
            f"error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
            "choose another --port",
            file=sys.stderr,
        )
        return 2
    import threading

    threading.Thread(target=server.viewer.warm_up, daemon=True, name="warm-up").start()
    port = server.server_address[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/"
    print(f"serving {server.viewer.results.root} at {url} (read-only; Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: listening on {args.host}: other machines on the network can see these results",
            file=sys.stderr,
        )
    if not args.no_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.viewer.close()
    return 0
