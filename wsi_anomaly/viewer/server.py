"""The viewer's HTTP server: read-only, a fixed set of routes.

Routes (GET and HEAD only):

- ``/``                                  the cohort page
- ``/api/cohort``                        the cohort table as JSON
- ``/slide/<name>/``                     a slide's page (``<name>``: its folder in RESULTS)
- ``/slide/<name>/tiles/<z>/<x>/<y>.jpg`` deep-zoom tiles of the original slide
- ``/slide/<name>/overlay/cells.png``    tile scores on the fixed colour scale
- ``/slide/<name>/overlay/pixels.png``   the pixel-level map, when it was kept
- ``/slide/<name>/overlay/qc.png``       the tissue QC flags, when measured
- ``/slide/<name>/api/tiles``            the tile table as JSON
- ``/slide/<name>/files/<file>``         one of :data:`results.SERVED_FILES`
- ``/slide/<name>/thumb.jpg``            a small JPEG of the slide's thumbnail (cohort page)
- ``/slide/<name>/tile-image/<i>.jpg``   tile ``i`` of the tile store, small (top-tiles list)
- ``/static/<file>``, ``/bokeh/<file>``  the viewer's own assets and bokeh's JS, from the
  installed packages

Bound to a loopback address, the server answers only requests whose ``Host`` is a loopback name,
so a web page elsewhere cannot read the results through DNS rebinding.

No route turns a part of the URL into a file path: slide names, file names and asset names are
looked up in tables built when the server starts, so ``..``, encoded or not, and absolute paths
find nothing. Python's ``http.server`` (``ThreadingHTTPServer``) is enough for one local user and
adds no dependency.

Every 200 answer carries an ``ETag`` (a hash of the body): a request whose ``If-None-Match``
names it gets ``304 Not Modified`` and no body. Text answers (pages, JSON, scripts, styles) are
gzip-compressed for clients that accept it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .pages import BOKEH_BUNDLES
from .pyramid import SlidePyramid, TileCache, png_bytes
from .results import (
    SERVED_FILES,
    ResultsFolder,
    cell_overlay_rgba,
    pixel_overlay_rgba,
    qc_overlay_rgba,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

_TILE = re.compile(r"^(\d{1,2})/(\d{1,7})/(\d{1,7})\.jpg$")
_TILE_IMAGE = re.compile(r"^(\d{1,9})\.jpg$")
#: Longest side of the cohort page's thumbnails and of the top-tiles list's tile images, px.
THUMB_PX = 240
TILE_IMAGE_PX = 96
#: Content types worth compressing (images are compressed already).
COMPRESSIBLE = ("text/", "application/json", "application/geo+json")


@lru_cache(maxsize=1)
def _bokeh_assets() -> dict[str, Path]:
    from bokeh.util.paths import bokehjs_path

    folder = Path(bokehjs_path()) / "js"
    return {name: folder / name for name in BOKEH_BUNDLES if (folder / name).is_file()}


def _static_assets() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}


class Viewer:
    """The application: the results folder, the slides' tile pyramids and the tile cache."""

    def __init__(self, results: ResultsFolder, cache_bytes: int = 64 << 20):
        self.results = results
        self.cache = TileCache(cache_bytes)
        self._pyramids: dict[str, SlidePyramid] = {}
        self._slide_errors: dict[str, str] = {}
        self._pages: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._gzipped: dict[str, bytes] = {}
        self.static = _static_assets()

    def gzipped(self, etag: str, body: bytes) -> bytes:
        """``body`` gzip-compressed, kept per ETag (bokeh's script is compressed once)."""
        with self._lock:
            packed = self._gzipped.get(etag)
        if packed is None:
            packed = gzip.compress(body, compresslevel=6, mtime=0)
            with self._lock:
                if len(self._gzipped) > 64:
                    self._gzipped.clear()
                self._gzipped[etag] = packed
        return packed

    def warm_up(self) -> None:
        """Import what the first slide page needs (bokeh alone takes a second or more), so that
        the page opens quickly once a browser asks for it."""
        import importlib

        from . import pages

        for module in ("bokeh.embed", "bokeh.models", "bokeh.plotting", "openslide", "zarr"):
            importlib.import_module(module)

        pages._environment()

    def page(self, name: str, make: Callable[[], str]) -> bytes:
        """A slide page, built once: the results do not change while they are served."""
        with self._lock:
            cached = self._pages.get(name)
        if cached is None:
            cached = make().encode()
            with self._lock:
                self._pages[name] = cached
        return cached

    # -- slides ------------------------------------------------------------------------------
    def pyramid(self, name: str) -> SlidePyramid | None:
        """The open slide of results folder ``name``; None when it cannot be read (the reason
        is kept in :meth:`slide_error`)."""
        with self._lock:
            if name in self._pyramids:
                return self._pyramids[name]
            if name in self._slide_errors:
                return None
            entry = self.results.slide(name)
            if entry is None:
                return None
            path = entry.slide_path
            try:
                if path is None:
                    raise FileNotFoundError("summary.json does not record the slide's path")
                pyramid = SlidePyramid(path, mpp=entry.mpp)
                _ = pyramid.dimensions  # opens it: a missing or unreadable slide fails here
            except Exception as exc:  # any reader failure: the page falls back to thumbnail.png
                self._slide_errors[name] = f"{path}: {exc}"
                log.warning("%s: the original slide cannot be read: %s", name, exc)
                return None
            self._pyramids[name] = pyramid
            return pyramid

    def slide_error(self, name: str) -> str | None:
        return self._slide_errors.get(name)

    def cached(self, key: tuple, make: Callable[[], bytes | None]) -> bytes | None:
        value = self.cache.get(key)
        if value is None:
            value = make()
            if value is not None:
                self.cache.put(key, value)
        return value

    def close(self) -> None:
        for pyramid in self._pyramids.values():
            pyramid.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "wsi-anomaly-viewer"
    protocol_version = "HTTP/1.1"  # keep-alive: a view loads dozens of tiles
    # Headers and body go out in separate writes: without TCP_NODELAY each response on a
    # kept-alive connection waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    viewer: Viewer  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"read-only\n",
            "text/plain; charset=utf-8",
            head=False,
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    # -- dispatch ----------------------------------------------------------------------------
    def _host_allowed(self) -> bool:
        allowed = self.server.allowed_hosts  # type: ignore[attr-defined]
        if allowed is None:
            return True
        host = host_name(self.headers.get("Host") or "")
        return host is not None and host in allowed

    def _serve(self, head: bool) -> None:
        if not self._host_allowed():
            self._send(
                HTTPStatus.FORBIDDEN,
                b"unknown Host\n",
                "text/plain; charset=utf-8",
                head,
                {"Cache-Control": "no-cache"},
            )
            return
        try:
            routed = self._route(urlsplit(self.path).path)
        except Exception:  # a bug or an unreadable file must not kill the server thread
            log.exception("error serving %s", self.path)
            routed = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                b"internal error\n",
                "text/plain; charset=utf-8",
                False,
            )
        if routed is None:
            routed = (HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", False)
        status, body, ctype, cacheable = routed
        extra = {"Cache-Control": "private, max-age=3600" if cacheable else "no-cache"}
        if status == HTTPStatus.MOVED_PERMANENTLY:
            extra["Location"] = body.decode()
        if status == HTTPStatus.OK:
            status, body = self._conditional(body, ctype, extra)
        self._send(status, body, ctype, head, extra)

    def _conditional(
        self, body: bytes, ctype: str, extra: dict[str, str]
    ) -> tuple[HTTPStatus, bytes]:
        """ETag and If-None-Match (304), then gzip for text when the client accepts it."""
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        extra["ETag"] = etag
        asked = self.headers.get("If-None-Match") or ""
        if etag in {t.strip() for t in asked.split(",")} or asked.strip() == "*":
            return HTTPStatus.NOT_MODIFIED, b""
        if ctype.startswith(COMPRESSIBLE):
            extra["Vary"] = "Accept-Encoding"
            accepted = (self.headers.get("Accept-Encoding") or "").lower()
            if "gzip" in accepted and len(body) > 256:
                extra["Content-Encoding"] = "gzip"
                return HTTPStatus.OK, self.viewer.gzipped(etag, body)
        return HTTPStatus.OK, body

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        ctype: str,
        head: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser moved on (panning drops tile requests)

    def _route(self, raw_path: str) -> tuple[HTTPStatus, bytes, str, bool] | None:
        viewer = self.viewer
        # Split before decoding, so an encoded "/" stays inside its segment.
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if any(p in (".", "..") or "/" in p or "\\" in p or "\x00" in p for p in parts):
            return None
        if raw_path == "/":
            from .pages import cohort_page

            return (
                HTTPStatus.OK,
                cohort_page(viewer.results).encode(),
                "text/html; charset=utf-8",
                False,
            )
        if parts == ["favicon.ico"]:
            return HTTPStatus.NO_CONTENT, b"", "image/x-icon", True
        if parts == ["api", "cohort"]:
            from .pages import cohort_rows

            return _json(cohort_rows(viewer.results))
        if len(parts) == 2 and parts[0] == "static" and parts[1] in viewer.static:
            path = viewer.static[parts[1]]
            return HTTPStatus.OK, path.read_bytes(), STATIC_TYPES[path.suffix], False
        if len(parts) == 2 and parts[0] == "bokeh" and parts[1] in _bokeh_assets():
            return (
                HTTPStatus.OK,
                _bokeh_assets()[parts[1]].read_bytes(),
                STATIC_TYPES[".js"],
                True,
            )
        if len(parts) == 2 and parts[0] == "slide" and viewer.results.slide(parts[1]):
            # The page's links are relative to ".../<name>/".
            from .pages import slide_url

            return HTTPStatus.MOVED_PERMANENTLY, slide_url(parts[1]).encode(), "text/plain", False
        if len(parts) >= 3 and parts[0] == "slide":
            return self._slide_route(parts[1], parts[2:])
        return None

    def _slide_route(
        self, name: str, rest: list[str]
    ) -> tuple[HTTPStatus, bytes, str, bool] | None:
        viewer = self.viewer
        entry = viewer.results.slide(name)
        if entry is None:
            return None
        if rest == ["thumb.jpg"]:
            body = viewer.cached((name, "thumb"), lambda: _small_jpeg(entry.file("thumbnail.png")))
            return None if body is None else (HTTPStatus.OK, body, "image/jpeg", True)
        if rest[0] == "tile-image" and len(rest) == 2 and entry.viewable:
            found = _TILE_IMAGE.match(rest[1])
            if found is None:
                return None
            index = int(found.group(1))
            body = viewer.cached(
                (name, "tile-image", index), lambda: _tile_jpeg(entry.file("tiles.zarr"), index)
            )
            return None if body is None else (HTTPStatus.OK, body, "image/jpeg", True)
        if rest == [""]:
            if not entry.viewable:
                return None
            from .pages import slide_page

            available = viewer.pyramid(name) is not None
            html = viewer.page(name, lambda: slide_page(entry, available, viewer.slide_error(name)))
            return HTTPStatus.OK, html, "text/html; charset=utf-8", False
        if rest[0] == "tiles" and len(rest) == 4:
            match = _TILE.match("/".join(rest[1:]))
            pyramid = viewer.pyramid(name)
            if match is None or pyramid is None:
                return None
            z, x, y = (int(v) for v in match.groups())
            body = viewer.cached((name, "slide", z, x, y), lambda: pyramid.tile(z, x, y))
            return None if body is None else (HTTPStatus.OK, body, "image/jpeg", True)
        if rest == ["overlay", "cells.png"] and entry.viewable:
            body = viewer.cached(
                (name, "cells"), lambda: png_bytes(cell_overlay_rgba(entry.tiles(), entry.scale))
            )
            return HTTPStatus.OK, body or b"", "image/png", True
        if rest == ["overlay", "qc.png"] and entry.viewable and entry.tiles().qc_flags is not None:
            body = viewer.cached((name, "qc"), lambda: png_bytes(qc_overlay_rgba(entry.tiles())))
            return None if body is None else (HTTPStatus.OK, body, "image/png", True)
        if rest == ["overlay", "pixels.png"] and entry.viewable:

            def make() -> bytes | None:
                pixel_map = entry.pixel_map()
                return (
                    None
                    if pixel_map is None
                    else png_bytes(pixel_overlay_rgba(pixel_map, entry.scale))
                )

            body = viewer.cached((name, "pixels"), make)
            return None if body is None else (HTTPStatus.OK, body, "image/png", True)
        if rest == ["api", "tiles"] and entry.viewable:
            from .pages import tile_records

            return _json(tile_records(entry))
        if len(rest) == 2 and rest[0] == "files" and rest[1] in SERVED_FILES:
            path = entry.file(rest[1])
            if path is None or not path.is_file():
                return None
            return HTTPStatus.OK, path.read_bytes(), SERVED_FILES[rest[1]], False
        return None


def _jpeg(image: Any, max_px: int) -> bytes:
    import io

    image = image.convert("RGB")
    image.thumbnail((max_px, max_px))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=82, optimize=True)
    return out.getvalue()


def _small_jpeg(path: Path | None) -> bytes | None:
    """A small JPEG of a results PNG (the cohort page's thumbnails: tens of kB, not MB); ``path``
    as :meth:`SlideResults.file` resolved it (None: absent or outside the folder)."""
    from PIL import Image

    if path is None or not path.is_file():
        return None
    with Image.open(path) as image:
        return _jpeg(image, THUMB_PX)


def _tile_jpeg(store_path: Path | None, index: int) -> bytes | None:
    """Tile ``index`` of the slide's tile store (resolved inside the slide's folder) as a small
    JPEG; None past the last tile."""
    from PIL import Image

    from ..tiles import TileStore

    if store_path is None:
        return None
    store = TileStore(store_path)
    if not 0 <= index < len(store):
        return None
    return _jpeg(Image.fromarray(store.read(index, index + 1)[0]), TILE_IMAGE_PX)


#: A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::([0-9]{1,5}))?")


def host_name(header: str) -> str | None:
    """The host of a ``Host`` header, lower-cased (IPv6 in brackets); None when the header is
    not one host with an optional port (``[::1].example.com``, two ports, spaces inside)."""
    match = _HOST.fullmatch(header.strip().lower())
    if match is None or (match.group(2) is not None and int(match.group(2)) > 65535):
        return None
    return match.group(1)


def _json(value: Any) -> tuple[HTTPStatus, bytes, str, bool]:
    return (HTTPStatus.OK, json.dumps(value, allow_nan=False).encode(), "application/json", False)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    viewer: Viewer
    #: Host header values answered; None: any (the server was asked to listen beyond loopback).
    allowed_hosts: frozenset[str] | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # the browser closed a kept-alive connection
        super().handle_error(request, client_address)


def make_server(
    results: str | Path | ResultsFolder,
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_bytes: int = 64 << 20,
) -> ViewerServer:
    """A server over ``results`` (not yet serving: call ``serve_forever``). ``port=0`` picks a
    free port (``server.server_address[1]``). ``server.viewer`` is the :class:`Viewer`."""
    folder = results if isinstance(results, ResultsFolder) else ResultsFolder(results)
    viewer = Viewer(folder, cache_bytes)
    handler = type("ViewerHandler", (Handler,), {"viewer": viewer})
    server = ViewerServer((host, port), handler)
    server.viewer = viewer
    if host in LOOPBACK_NAMES or host.startswith("127."):
        server.allowed_hosts = LOOPBACK_NAMES | {host.lower()}
    return server
