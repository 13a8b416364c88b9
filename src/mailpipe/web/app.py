"""The REST API over the store, plus /healthz, /metrics, the OpenAPI document, the event schema."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import mimetypes
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailpipe.admin import AdminOps
from mailpipe.compat import PREFIX
from mailpipe.metrics import Metrics
from mailpipe.schema import event_schema_bytes
from mailpipe.store.sqlite import SQLiteStore, StoreClosedError
from mailpipe.web.guard import BrowserGuard
from mailpipe.web.session import (
    ATTACHMENT_ROUTE,
    COOKIE,
    PROCESS_KEY,
    SessionRoutes,
    cookie_ok,
    link_key,
    link_ok,
    open_paths,
)
from mailpipe.web.ui import is_page_route, ui_routes

if TYPE_CHECKING:
    from mailpipe.capture.inject import Injector
    from mailpipe.checks.spam import SpamChecker
    from mailpipe.config import ChecksConfig

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
# SQLite's INTEGER range: one more and the store raises OverflowError.
MAX_OFFSET = 2**63 - 1
# Far more than any email holds (each attachment costs bytes of max_message_size).
MAX_ATTACHMENT_INDEX = 1_000_000
OPEN_PATHS = frozenset({"/healthz"})
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
# Served bytes come from whoever sent the email: never let a browser run them in our origin.
UNTRUSTED_HEADERS = {**NOSNIFF, "Content-Security-Policy": "sandbox"}
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_CHARSET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$%&'+^_`{}~.-]*$")


class ApiError(Exception):
    """An error answered as {"error": message} with the given status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class HttpAuth:
    kind: Literal["basic", "bearer"]
    username: str | None = None
    password: str | None = None
    token: str | None = None
    # What the page's sign-in cookie is signed with (web/session.py): the process's own key,
    # unless a test gives another.
    session_key: bytes = field(default=PROCESS_KEY, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "basic" and (self.username is None or self.password is None):
            raise ValueError("basic auth needs a username and a password")
        if self.kind == "bearer" and not self.token:
            raise ValueError("bearer auth needs a token")
        if self.kind not in ("basic", "bearer"):
            raise ValueError(f"unknown auth kind {self.kind!r}")

    def check(self, header: str | None) -> bool:
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() != self.kind:
            return False
        if self.kind == "bearer":
            return _same(value.strip(), self.token or "")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        # Both compared every time, so timing doesn't tell which one was wrong.
        user_ok = _same(user, self.username or "")
        password_ok = _same(password, self.password or "")
        return bool(sep) and user_ok and password_ok

    def challenge(self) -> str:
        if self.kind == "basic":
            return 'Basic realm="mailpipe", charset="UTF-8"'
        return 'Bearer realm="mailpipe"'


def _same(given: str, expected: str) -> bool:
    # Constant time; bytes because compare_digest refuses non-ASCII str.
    return hmac.compare_digest(given.encode(), expected.encode())


def create_app(
    store: SQLiteStore | None,
    metrics: Metrics,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
    auth: HttpAuth | None = None,
    admin: AdminOps | None = None,
    bind_host: str | None = None,
    allowed_hosts: Iterable[str] = (),
    base_path: str = "",
    code_pattern: str | None = None,
    ping_interval: float | None = None,
    compat: Mapping[str, web.Application] | None = None,
    injector: Injector | None = None,
    checks: ChecksConfig | None = None,
    spam_checker: SpamChecker | None = None,
) -> web.Application:
    """The API app; with the store disabled (None) only health, metrics and OpenAPI remain.
    The admin routes (workers, connections, stop) are always there; without `admin` they 404.
    `bind_host` and `allowed_hosts` say which Host headers are served (web/guard.py); without
    `bind_host` only the loopback names are. With `base_path` ("/mail") every route is served
    under it and nothing outside it. `code_pattern` is the default of the /codes route,
    `ping_interval` how often an idle event stream says it is alive (seconds). `injector`
    serves POST /api/v1/send (without it the route answers 404); `checks` bounds the content
    checks (checks/routes.py), `spam_checker` is the spamd client of the spam-check route
    (None: spam checking is not configured). `compat` maps a compatible API's name to its
    application, served under /compat/NAME (compat/)."""
    # These build on this module's ApiError and helpers.
    from mailpipe.admin.routes import AdminRoutes
    from mailpipe.checks.routes import CheckRoutes
    from mailpipe.web.inbox import DEFAULT_CODE_PATTERN, PING_INTERVAL, InboxRoutes
    from mailpipe.web.send import SendRoutes
    from mailpipe.web.spam import SpamRoutes
    from mailpipe.web.tags import TagRoutes

    middlewares = [_errors_as_json, *_protection(auth, bind_host, allowed_hosts, base_path)]
    app = web.Application()
    _openapi_bytes()  # a missing or broken document should stop startup, not a request
    event_schema_bytes()  # likewise the event schema
    if health is None:
        health = store.health if store is not None else lambda: {"ok": True}
    service = _Service(metrics, health)
    app.router.add_routes(
        [
            web.get("/healthz", service.healthz),
            web.get("/metrics", service.metrics_text),
            web.get("/api/openapi.json", service.openapi),
            web.get("/api/v1/schema", service.event_schema),
            *AdminRoutes(admin).routes(),
            *SendRoutes(injector).routes(),
            *SessionRoutes(auth, base_path).routes(),
            *ui_routes(),
        ]
    )
    if store is not None:
        api = _Api(store)
        inbox = InboxRoutes(
            store,
            code_pattern=code_pattern or DEFAULT_CODE_PATTERN,
            ping_interval=ping_interval or PING_INTERVAL,
            link_key=(lambda uuid, index: link_key(auth.session_key, uuid, index))
            if auth is not None
            else None,
        )
        app.on_shutdown.append(inbox.on_shutdown)
        app.router.add_routes(
            [
                *inbox.routes(),
                *CheckRoutes(store, checks).routes(),
                *SpamRoutes(store, spam_checker).routes(),
                *TagRoutes(store).routes(),
                web.get("/api/v1/messages", api.list_messages),
                web.delete("/api/v1/messages", api.clear_messages),
                web.get("/api/v1/messages/{uuid}", api.get_message),
                web.delete("/api/v1/messages/{uuid}", api.delete_message),
                web.get("/api/v1/messages/{uuid}/raw", api.get_raw),
                web.get(
                    "/api/v1/messages/{uuid}/attachments/{index}",
                    api.get_attachment,
                    name=ATTACHMENT_ROUTE,
                ),
            ]
        )
    for name, compat_app in (compat or {}).items():
        app.add_subapp(PREFIX + name, compat_app)
    return _serve_under(base_path, app, middlewares)


def create_compat_root(
    compat_app: web.Application,
    *,
    auth: HttpAuth | None = None,
    bind_host: str | None = None,
    allowed_hosts: Iterable[str] = (),
) -> web.Application:
    """A compatible API at the root of a listener of its own, behind the same browser guard
    and authentication as the main API. Its errors are its own: clients of that API parse
    them as that API answers them."""
    return _serve_under("", compat_app, _protection(auth, bind_host, allowed_hosts, ""))


def _protection(auth: HttpAuth | None, bind_host: str | None, allowed_hosts: Iterable[str],
                base_path: str) -> list[Middleware]:
    """The guard, then authentication when configured."""
    # Outermost first: the guard runs before auth, so a refused page never sees a challenge.
    middlewares = [_guard_middleware(BrowserGuard(bind_host, allowed_hosts))]
    if auth is not None:
        middlewares.append(_auth_middleware(auth, base_path))
    return middlewares


def _serve_under(
    base_path: str, app: web.Application, middlewares: list[Middleware]
) -> web.Application:
    """`app` with the middlewares, at the root or under `base_path` (then the root serves
    nothing else but a redirect from the bare prefix to the prefix with its slash, where a
    page's relative URLs resolve inside the prefix)."""
    if not base_path:
        app.middlewares.extend(middlewares)
        app.on_response_prepare.append(_add_nosniff)
        return app
    root = web.Application(middlewares=middlewares)
    root.on_response_prepare.append(_add_nosniff)  # runs for the sub-app's responses too

    async def to_slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(base_path + "/")

    root.router.add_get(base_path, to_slash)
    root.add_subapp(base_path, app)
    return root


async def start_http(
    app: web.Application, host: str, port: int, *, access_log: logging.Logger | None = None
) -> web.AppRunner:
    """Serve `app`; port 0 picks a free port (see `runner.addresses`)."""
    # aiohttp logs every request by default; that is noise for a local dev tool.
    runner = web.AppRunner(app, access_log=access_log)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def stop_http(runner: web.AppRunner) -> None:
    await runner.cleanup()


# ---- handlers -----------------------------------------------------------------------------


class _Api:
    """The message routes."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def list_messages(self, request: web.Request) -> web.Response:
        limit = int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = int_param(request, "offset", 0, 0, MAX_OFFSET)
        q = request.query.get("q") or None
        page = await self.store.page(limit=limit, offset=offset, q=q)
        return json_response(
            {
                "total": page.total,
                "unread": page.unread,
                "count": len(page.messages),
                "offset": offset,
                "limit": limit,
                "messages": page.messages,
            }
        )

    async def clear_messages(self, request: web.Request) -> web.Response:
        return json_response({"deleted": await self.store.clear()})

    async def get_message(self, request: web.Request) -> web.Response:
        return json_response(await self._event(request))

    async def delete_message(self, request: web.Request) -> web.Response:
        if not await self.store.delete(request.match_info["uuid"]):
            raise _not_found()
        return web.Response(status=204)

    async def get_raw(self, request: web.Request) -> web.Response:
        uuid = request.match_info["uuid"]
        raw = await self.store.raw(uuid)
        if raw is None:
            raise _not_found()
        # A download, never shown: a browser told "inline" may render what the sender wrote.
        headers = {
            "Content-Disposition": _disposition("attachment", f"{uuid}.eml", extended=False),
            **UNTRUSTED_HEADERS,
        }
        return web.Response(body=raw, content_type="message/rfc822", headers=headers)

    async def get_attachment(self, request: web.Request) -> web.Response:
        index = bounded_int("index", request.match_info["index"], 0, MAX_ATTACHMENT_INDEX)
        event = await self._event(request)
        raw = await self.store.raw(request.match_info["uuid"])
        described = event.get("attachments") or []
        if raw is None or index >= len(described):
            raise _not_found("attachment not found")
        # Parsing a large message is CPU work: keep it off the event loop.
        found = await asyncio.to_thread(_extract_attachment, raw, index)
        if found is None:
            raise _not_found("attachment not found")
        payload, part_type, charset, part_name = found
        meta = described[index]
        content_type = _safe_mime(meta.get("content_type") or part_type)
        name = _safe_filename(meta.get("filename") or part_name, content_type, index)
        response = web.Response(
            body=payload,
            headers={"Content-Disposition": _disposition("attachment", name), **UNTRUSTED_HEADERS},
        )
        response.content_type = content_type
        if charset and content_type.startswith("text/") and _CHARSET.match(charset):
            response.charset = charset
        return response

    async def _event(self, request: web.Request) -> dict[str, Any]:
        event = await self.store.get(request.match_info["uuid"])
        if event is None:
            raise _not_found()
        return event


class _Service:
    """Routes that exist with or without a store."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics
        self.health = health

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            details = dict(self.health())
        except Exception as exc:  # a broken health check is itself a degraded state
            details = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ok = bool(details.get("ok", True))
        details.pop("status", None)
        return json_response({"status": "ok" if ok else "degraded", **details},
                             status=200 if ok else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        # CONTENT_TYPE_LATEST carries a charset, which aiohttp only accepts as a raw header.
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=_openapi_bytes(), content_type="application/json")

    async def event_schema(self, request: web.Request) -> web.Response:
        return web.Response(body=event_schema_bytes(), content_type="application/schema+json")


# ---- middlewares --------------------------------------------------------------------------


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error, aiohttp's own 404/405 included, leaves as {"error": ...}."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response({"error": exc.message}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        skip = ("content-type", "content-length")
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in skip}
        return json_response({"error": exc.reason.lower()}, status=exc.status, headers=headers)
    except StoreClosedError:  # shutting down: the client may retry elsewhere or later
        return json_response({"error": "store unavailable"}, status=503)
    except Exception:
        log.exception("error handling %s %s", request.method, request.path)
        return json_response({"error": "internal server error"}, status=500)


def _guard_middleware(guard: BrowserGuard) -> Middleware:
    @web.middleware
    async def guard_browsers(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = guard.check(request.method, request.scheme, request.headers)
        if refusal is None:
            return await handler(request)
        # The path as %r and the reason's values quoted: they come from the client and must
        # not forge log lines.
        log.info("refused %s %r from %s: %s", request.method, request.path,
                 request.remote or "?", refusal.reason)
        return json_response({"error": refusal.reason}, status=refusal.status)

    return guard_browsers


async def _add_nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors included: a browser must never guess a type for our bytes."""
    response.headers.update(NOSNIFF)


def _auth_middleware(auth: HttpAuth, base_path: str = "") -> Middleware:
    # Bearer opens the page's files and the sign-in route too (they hold no data): the page
    # must load to ask for the token. Basic keeps everything behind the browser's prompt.
    # The page's files are known by the route they matched, not by a path prefix that
    # "/ui/../" might satisfy on its way elsewhere. Besides the header: the session cookie
    # (web/session.py), and a keyed cid: image link of the HTML view.
    unguarded = frozenset(base_path + path for path in OPEN_PATHS) | open_paths(auth, base_path)
    open_page = auth.kind == "bearer"

    @web.middleware
    async def check_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.path in unguarded
            or (open_page and is_page_route(request))
            or auth.check(request.headers.get("Authorization"))
            or cookie_ok(auth, request.cookies.get(COOKIE))
            or link_ok(auth, request)
        ):
            return await handler(request)
        return json_response(
            {"error": "authentication required"},
            status=401,
            headers={"WWW-Authenticate": auth.challenge()},
        )

    return check_auth


# ---- helpers ------------------------------------------------------------------------------


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON body serialised with orjson (every API route answers with this)."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _not_found(message: str = "message not found") -> ApiError:
    return ApiError(404, message)


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """Query parameter `name` as an int in [low, high] (`default` when absent or empty);
    anything else is a 400 that names the parameter and its bounds. Every numeric query
    parameter of every route goes through here."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    return bounded_int(name, text, low, high)


def bounded_int(name: str, text: str, low: int, high: int) -> int:
    """`text` as an int in [low, high] (0 <= low), else ApiError 400 naming `name`."""
    error = ApiError(400, f"{name} must be an integer between {low} and {high}")
    # Plain ASCII digits only: int() would also take "1_000", " 7" or other scripts' digits;
    # and no longer than `high` is, so a huge number never reaches int() (which refuses
    # strings over 4300 digits, leading zeros included) nor the store (OverflowError past
    # 2**63-1).
    digits = text.lstrip("0") or "0"
    if not text.isascii() or not text.isdigit() or len(digits) > len(str(high)):
        raise error
    value = int(digits)
    if not low <= value <= high:
        raise error
    return value


def _extract_attachment(raw: bytes, index: int) -> tuple[bytes, str, str | None, str | None] | None:
    # Imported here: the web app must load even where the capture package is not wanted.
    from mailpipe.capture.message import attachment_parts, attachment_payload, parse_message

    parts = attachment_parts(parse_message(raw))
    if index >= len(parts):
        return None
    part = parts[index]
    return (
        attachment_payload(part),
        part.get_content_type(),
        part.get_content_charset(),
        part.get_filename(),
    )


def _safe_mime(value: str) -> str:
    value = value.split(";", 1)[0].strip().lower()
    return value if _MIME.match(value) else "application/octet-stream"


def _safe_filename(name: str | None, content_type: str, index: int) -> str:
    """The sender's name reduced to a last path component without control characters."""
    name = re.split(r"[/\\]", name or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    if name:
        return name
    return f"attachment-{index}{mimetypes.guess_extension(content_type) or '.bin'}"


def _disposition(kind: str, filename: str, *, extended: bool = True) -> str:
    """RFC 6266: an ASCII fallback for old clients plus the exact name in RFC 5987 form."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in filename)
    if not extended and fallback == filename:
        return f'{kind}; filename="{filename}"'
    encoded = quote(filename, safe="!#$&+-.^_`|~")
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


@cache
def _openapi_bytes() -> bytes:
    # Read and checked once, when the first app is created: a broken file stops startup.
    text = resources.files("mailpipe.web").joinpath("openapi.json").read_bytes()
    return orjson.dumps(orjson.loads(text))
