"""The operator console: static files under `/console` (docs/console.md).

The console is a build-free Preact + htm application whose files ship inside this package
(`api/console/`, declared as package data); nothing is fetched from a CDN at run time. The files
are public (DECISIONS D5): the console signs in with an operator token kept in the browser's
sessionStorage and sends it as a bearer token on every API call, so the API's own role checks
decide what an operator may do.

Only files present in `api/console/` when the app is built are served (a fixed table, so no path
a client sends can reach outside the directory). Every answer carries a strict Content Security
Policy (`default-src 'self'`: no inline script, no third-party origin), `nosniff`, no referrer and
no framing; `index.html` is revalidated on every load, the other files are cached for an hour.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Final

from aiohttp import web

from api.auth import PUBLIC, Role
from ledger.errors import ErrorCode, LedgerError

PACKAGE: Final = "api"
DIRECTORY: Final = "console"
INDEX: Final = "index.html"
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
"""Served extensions and their types; other files in the directory (licences) are text."""
CSP: Final = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CACHE_INDEX: Final = "no-cache"
CACHE_ASSET: Final = "public, max-age=3600"


def _content_type(name: str) -> str:
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:] if dot >= 0 else "", "text/plain; charset=utf-8")


def load_files() -> dict[str, tuple[bytes, str]]:
    """Every console file by its path under `/console/` -> (bytes, content type)."""
    root = resources.files(PACKAGE).joinpath(DIRECTORY)
    files: dict[str, tuple[bytes, str]] = {}
    pending = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        for item in folder.iterdir():
            if item.name.startswith((".", "__")):
                continue
            if item.is_dir():
                pending.append((f"{prefix}{item.name}/", item))
            else:
                files[f"{prefix}{item.name}"] = (item.read_bytes(), _content_type(item.name))
    if INDEX not in files:
        raise RuntimeError(f"the console's {INDEX} is missing from the package (api/{DIRECTORY}/)")
    return files


FILES: Final = web.AppKey("console_files", dict[str, tuple[bytes, str]])


def _file_response(request: web.Request, path: str) -> web.Response:
    found = request.app[FILES].get(path)
    if found is None:
        raise LedgerError(ErrorCode.NOT_FOUND, f"no console file {path}", {"resource": "console_file"})
    body, content_type = found
    cache = CACHE_INDEX if path == INDEX else CACHE_ASSET
    return web.Response(
        body=body, headers={**SECURITY_HEADERS, "Content-Type": content_type, "Cache-Control": cache}
    )


async def console_root(request: web.Request) -> web.StreamResponse:
    """GET /console: to `/console/`, so the page's relative URLs resolve under it."""
    raise web.HTTPFound("/console/")


async def console_file(request: web.Request) -> web.Response:
    """GET /console/{path}: a console file; the empty path is the application's page."""
    return _file_response(request, request.match_info["path"] or INDEX)


def install(app: web.Application) -> None:
    """Load the console's files once (before the app starts)."""
    app[FILES] = load_files()


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/console", console_root, PUBLIC),
    ("GET", "/console/{path:.*}", console_file, PUBLIC),
]
