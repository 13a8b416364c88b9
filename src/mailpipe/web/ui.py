"""The web inbox: `/` and `/ui/{file}`, the page's own files from inside the package.

Nothing here knows about `http.base_path`: the page refers to everything by relative URL, so
it works under whatever prefix the API is mounted at."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from aiohttp import web

# The page is ours and runs only ours: no inline script or style, nothing from elsewhere,
# never framed (clickjacking). The captured HTML lives in a sandboxed iframe of the /html
# route, which sends its own, stricter policy.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


@cache
def _files() -> dict[str, _File]:
    """Every servable file of web/static, read once: the set is fixed at install time, and
    a name not in it can never reach the filesystem (no path handling to get wrong)."""
    found: dict[str, _File] = {}
    for entry in resources.files("mailpipe.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            found[entry.name] = _File(body, _TYPES[suffix], etag)
    return found


def _serve(request: web.Request, name: str) -> web.Response:
    file = _files().get(name)
    if file is None:
        raise web.HTTPNotFound()
    # no-cache = revalidate every time: an upgraded mailpipe is seen at once, and an
    # unchanged file costs a 304.
    headers = {
        "Content-Security-Policy": PAGE_CSP,
        "Cache-Control": "no-cache",
        "ETag": file.etag,
        "Referrer-Policy": "no-referrer",
    }
    if file.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    response = web.Response(body=file.body, headers=headers)
    response.content_type = file.content_type
    response.charset = "utf-8"
    return response


async def _index(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def _static(request: web.Request) -> web.Response:
    return _serve(request, request.match_info["file"])


def is_page_route(request: web.Request) -> bool:
    """Whether the request matched `/` or `/ui/{file}` (which hold no captured data)."""
    return request.match_info.route.handler in (_index, _static)


def ui_routes() -> list[web.RouteDef]:
    """The page's routes; a missing static directory fails here, at startup."""
    if "index.html" not in _files():
        raise RuntimeError("mailpipe's web page files are missing from the package")
    return [web.get("/", _index), web.get("/ui/{file}", _static)]
