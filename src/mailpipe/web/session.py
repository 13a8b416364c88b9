"""Signing in to the web page with the bearer token: a cookie the browser sends by itself.

A browser cannot prompt for a bearer token, and EventSource, the HTML frame, images and
download links cannot send an Authorization header. So the page asks for the token once and
POSTs it to /api/v1/session; the answer sets `mailpipe_session`, which the auth middleware
takes as equal to a valid `Authorization: Bearer` header.

The cookie's value is not the token but an HMAC of it under a key drawn when the process
starts: a stolen cookie reveals nothing about the token and works nowhere else, and a restart
signs everyone out. The cookie is HttpOnly (no script of the page reads it), SameSite=Strict
(no other site's page makes the browser send it) and limited to http.base_path; the guard
(web/guard.py) refuses a cross-origin or non-JSON POST/DELETE here, so another site can
neither sign a browser in to its own server nor out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from mailpipe.web.app import HttpAuth

COOKIE = "mailpipe_session"
PATH = "/api/v1/session"
# Drawn once per process: the cookies of another process (or of this one before a restart)
# are refused.
PROCESS_KEY = secrets.token_bytes(32)
# Guessing the token: at most this many wrong ones per client address per window, and each
# wrong one answered only after a pause.
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0
FAILURE_DELAY = 0.25
_MAX_TRACKED = 10_000  # client addresses remembered; the oldest are forgotten first
_MAX_BODY = 16 * 1024
ATTACHMENT_ROUTE = "attachment"


def session_value(key: bytes, token: str) -> str:
    """The cookie's value for `token` under `key`: 64 hex digits, the token not among them."""
    return hmac.new(key, b"mailpipe-session\0" + token.encode(), hashlib.sha256).hexdigest()


def link_key(key: bytes, uuid: str, index: int) -> str:
    """The `?key=` of one attachment's URL in the safe HTML view (a `cid:` image).

    The view's frame is sandboxed into an opaque origin, so the browser sends its images'
    requests as cross-site: without the SameSite=Strict cookie, and without basic auth's
    credentials either. The /html route (itself behind auth) therefore links each inline
    image with a key that opens that one attachment, and only while this process runs."""
    message = f"mailpipe-link\0{uuid}\0{index}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def link_ok(auth: HttpAuth, request: web.Request) -> bool:
    """Whether `request` is a GET of an attachment with its valid `?key=`."""
    given = request.query.get("key")
    route = request.match_info.route
    if not given or request.method not in ("GET", "HEAD") or route.name != ATTACHMENT_ROUTE:
        return False
    from mailpipe.web.app import _same

    uuid, index = request.match_info.get("uuid", ""), request.match_info.get("index", "")
    if not index.isascii() or not index.isdigit() or len(index) > 7:
        return False
    return _same(given, link_key(auth.session_key, uuid, int(index)))


def cookie_ok(auth: HttpAuth, value: str | None) -> bool:
    """Whether `value` (the request's cookie) is this process's session for the token."""
    if auth.kind != "bearer" or not value:
        return False
    from mailpipe.web.app import _same

    return _same(value, session_value(auth.session_key, auth.token or ""))


def open_paths(auth: HttpAuth, base_path: str) -> frozenset[str]:
    """The paths served without credentials under bearer auth: the session route and the
    bare base path's redirect (the page's files are known by their route, web/ui.py)."""
    if auth.kind != "bearer":
        return frozenset()
    return frozenset({base_path + PATH, base_path} - {""})


class _Failures:
    """Wrong tokens per client address in the current window."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[float, int]] = {}

    def blocked(self, client: str, now: float) -> float:
        """Seconds until `client` may try again (0: now)."""
        start, count = self.counts.get(client, (now, 0))
        if now - start >= FAILURE_WINDOW:
            self.counts.pop(client, None)
            return 0.0
        return FAILURE_WINDOW - (now - start) if count >= MAX_FAILURES else 0.0

    def add(self, client: str, now: float) -> None:
        start, count = self.counts.pop(client, (now, 0))
        if now - start >= FAILURE_WINDOW:
            start, count = now, 0
        self.counts[client] = (start, count + 1)  # re-inserted: the dict stays oldest first
        while len(self.counts) > _MAX_TRACKED:
            del self.counts[next(iter(self.counts))]


class SessionRoutes:
    """GET/POST/DELETE /api/v1/session."""

    def __init__(self, auth: HttpAuth | None, base_path: str) -> None:
        self.auth = auth
        self.cookie_path = base_path + "/"
        self.failures = _Failures()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(PATH, self.state),
            web.post(PATH, self.sign_in),
            web.delete(PATH, self.sign_out),
        ]

    async def state(self, request: web.Request) -> web.Response:
        """What the page needs to know: which auth is on, and whether this browser's cookie
        is a valid session (then the page offers to sign out)."""
        from mailpipe.web.app import json_response

        kind = self.auth.kind if self.auth is not None else None
        signed_in = self.auth is not None and cookie_ok(self.auth, request.cookies.get(COOKIE))
        return json_response({"auth": kind, "cookie": signed_in})

    async def sign_in(self, request: web.Request) -> web.Response:
        from mailpipe.web.app import ApiError, _same, json_response

        if self.auth is None or self.auth.kind != "bearer":
            raise ApiError(404, "signing in with a token needs http.auth of type bearer")
        token = await _token_of(request)
        client = request.remote or "?"
        now = time.monotonic()
        wait = self.failures.blocked(client, now)
        if wait:
            return json_response(
                {"error": "too many wrong tokens: try again later"},
                status=429,
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        if not _same(token, self.auth.token or ""):
            self.failures.add(client, now)
            await asyncio.sleep(FAILURE_DELAY)
            return json_response(
                {"error": "wrong token"},
                status=401,
                headers={"WWW-Authenticate": self.auth.challenge()},
            )
        response = json_response({"auth": "bearer", "cookie": True})
        response.set_cookie(
            COOKIE,
            session_value(self.auth.session_key, self.auth.token or ""),
            path=self.cookie_path,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        response = web.Response(status=204)
        response.del_cookie(
            COOKIE, path=self.cookie_path, httponly=True, samesite="Strict", secure=request.secure
        )
        return response


async def _token_of(request: web.Request) -> str:
    from mailpipe.web.app import ApiError

    error = ApiError(400, 'the body must be JSON: {"token": "..."}')
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise ApiError(413, "request body too large")
    body = await request.content.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise ApiError(413, "request body too large")
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise error from None
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token:
        raise error
    return token
