"""The inbox routes over the store: live changes (SSE), read state, the safe HTML view, and
what end-to-end tests need (wait for an email, its links, its one-time codes).

Live requests (the SSE stream, long polls) each hold a subscription to the store's change
feed; when the app shuts down they are all ended, so a stopping mailpipe never waits for
them and a stream ends cleanly instead of being cut.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import orjson
from aiohttp import web

from mailpipe.store.feed import Change, Subscription
from mailpipe.store.search import Term
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import ApiError, int_param, json_response

DEFAULT_CODE_PATTERN = r"\b\d{4,8}\b"
PING_INTERVAL = 15.0
WAIT_DEFAULT = 30
WAIT_MAX = 300
MAX_PATTERN = 500  # characters of a ?pattern= regex
HTML_CSP = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
    "img-src 'self' data:{remote}; style-src 'unsafe-inline'; font-src data:"
)


class InboxRoutes:
    def __init__(self, store: SQLiteStore, *, code_pattern: str = DEFAULT_CODE_PATTERN,
                 ping_interval: float = PING_INTERVAL,
                 link_key: Callable[[str, int], str] | None = None) -> None:
        """With auth on, `link_key(uuid, index)` keys the HTML view's cid: image URLs: the
        sandboxed frame's requests carry no credentials (web/session.py)."""
        self.store = store
        self.link_key = link_key
        self.code_pattern = re.compile(code_pattern)
        self.ping_interval = ping_interval
        self.live: set[Subscription] = set()

    def routes(self) -> list[web.RouteDef]:
        # /wait before /{uuid}: aiohttp matches routes in the order they are added.
        return [
            web.get("/api/v1/events", self.events),
            web.patch("/api/v1/messages", self.mark_all),
            web.get("/api/v1/messages/wait", self.wait),
            web.patch("/api/v1/messages/{uuid}", self.mark_one),
            web.get("/api/v1/messages/{uuid}/html", self.html),
            web.get("/api/v1/messages/{uuid}/links", self.links),
            web.get("/api/v1/messages/{uuid}/codes", self.codes),
        ]

    async def on_shutdown(self, app: web.Application) -> None:
        for subscription in list(self.live):
            subscription.end()

    def _subscribe(self) -> _Live:
        return _Live(self.store.changes.subscribe(), self.live)

    # ---- live ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one per change, a comment now and then so that proxies and
        the client know the stream is alive (and a gone client is noticed)."""

        async def render(change: Change) -> bytes:
            return _sse(change)

        return await stream_changes(request, self._subscribe(), self.ping_interval, render,
                                    greeting=b": connected\n\n")

    async def wait(self, request: web.Request) -> web.Response:
        """The newest email matching to/subject/after, as soon as there is one."""
        timeout = int_param(request, "timeout", WAIT_DEFAULT, 0, WAIT_MAX)
        query = request.query
        terms = [Term(name, query[name]) for name in ("to", "subject") if query.get(name)]
        after_id, after_ts = await self._after(query.get("after") or "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Subscribed before looking, so an email stored in between is not missed.
        with self._subscribe() as changes:
            while True:
                uuid = await self.store.newest(terms, after_id=after_id, after_ts=after_ts)
                event = await self.store.get(uuid) if uuid is not None else None
                if event is not None:
                    return json_response(event)
                if not await _next_new(changes, deadline - loop.time()):
                    raise ApiError(408, f"no matching email within {timeout} s")

    async def _after(self, text: str) -> tuple[int, float | None]:
        """`after` as (message id, timestamp): a time, or the uuid of a stored message."""
        if not text:
            return 0, None
        when = _rfc3339(text)
        if when is not None:
            return 0, when
        found = await self.store.id_of(text)
        if found is None:
            raise ApiError(400, "after must be an RFC 3339 time or the uuid of a stored message")
        return found, None

    # ---- read state ----------------------------------------------------------------------

    async def mark_one(self, request: web.Request) -> web.Response:
        summary = await self.store.mark_read(request.match_info["uuid"], await _read_flag(request))
        if summary is None:
            raise ApiError(404, "message not found")
        return json_response(summary)

    async def mark_all(self, request: web.Request) -> web.Response:
        return json_response({"updated": await self.store.mark_all_read(await _read_flag(request))})

    # ---- content -------------------------------------------------------------------------

    async def html(self, request: web.Request) -> web.Response:
        remote = int_param(request, "remote", 0, 0, 1) == 1
        event = await self._event(request)
        source = (event.get("message") or {}).get("html")
        if not source:
            raise ApiError(404, "message has no HTML body")
        by_cid = _content_ids(event)
        uuid = request.match_info["uuid"]

        def cid_url(content_id: str) -> str | None:
            index = by_cid.get(content_id, by_cid.get(content_id.lower()))
            if index is None:
                return None
            # Relative to .../{uuid}/html, so it works under any base path.
            if self.link_key is None:
                return f"attachments/{index}"
            return f"attachments/{index}?key={self.link_key(uuid, index)}"

        view = await asyncio.to_thread(_htmlview().rewrite, source, cid_url, remote=remote)
        csp = HTML_CSP.format(remote=" http: https:" if remote else "")
        return web.Response(
            text=view.html,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": csp,
                "X-Mailpipe-Blocked-Remote": str(view.blocked_remote),
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def links(self, request: web.Request) -> web.Response:
        message = (await self._event(request)).get("message") or {}
        found = await asyncio.to_thread(_htmlview().links, message.get("html"), message.get("text"))
        return json_response({"links": found})

    async def codes(self, request: web.Request) -> web.Response:
        pattern = self.code_pattern
        if given := request.query.get("pattern"):
            pattern = _pattern(given)
        message = (await self._event(request)).get("message") or {}
        # A thread: a costly pattern must not stall every other request.
        found = await asyncio.to_thread(
            _htmlview().codes, pattern, message.get("text"), message.get("html")
        )
        return json_response({"codes": found})

    async def _event(self, request: web.Request) -> dict[str, Any]:
        event = await self.store.get(request.match_info["uuid"])
        if event is None:
            raise ApiError(404, "message not found")
        return event


class _Live:
    """A subscription held by a live request, known to the routes while it lasts."""

    def __init__(self, subscription: Subscription, live: set[Subscription]) -> None:
        self.subscription = subscription
        self.live = live

    def __enter__(self) -> Subscription:
        self.live.add(self.subscription)
        return self.subscription.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.live.discard(self.subscription)
        self.subscription.__exit__(*exc)


async def _next_new(changes: Subscription, timeout: float) -> bool:
    """Wait up to `timeout` s for a new email; False when none came (or the feed ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (remaining := deadline - loop.time()) > 0:
        try:
            change = await asyncio.wait_for(changes.get(), remaining)
        except TimeoutError:
            return False
        if change is None:
            raise ApiError(503, "mailpipe is stopping")
        if change.kind == "new":
            return True
    return False


async def stream_changes(
    request: web.Request,
    live: _Live,
    ping_interval: float,
    render: Callable[[Change], Awaitable[bytes]],
    *,
    greeting: bytes = b"",
    ping: bytes = b": ping\n\n",
) -> web.StreamResponse:
    """An event stream of the store's changes, each written as `render` makes it (b"": none),
    `ping` after ping_interval s of quiet; it ends when the client goes or mailpipe stops."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: deliver each event at once
    })
    with live as changes:
        await response.prepare(request)
        try:
            if greeting:
                await response.write(greeting)
            while True:
                try:
                    change = await asyncio.wait_for(changes.get(), ping_interval)
                except TimeoutError:
                    await response.write(ping)
                    continue
                if change is None:  # stopping: the stream ends
                    break
                if data := await render(change):
                    await response.write(data)
            await response.write_eof()
        except ConnectionError:  # the client went away (at shutdown too)
            pass
    return response


def _sse(change: Change) -> bytes:
    # orjson never writes a newline, so the data is one `data:` line.
    return b"event: %s\ndata: %s\n\n" % (change.kind.encode(), orjson.dumps(change.data))


async def _read_flag(request: web.Request) -> bool:
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        raise ApiError(400, "the body must be JSON: {\"read\": true|false}") from None
    if not isinstance(body, dict) or not isinstance(body.get("read"), bool):
        raise ApiError(400, "the body must be JSON: {\"read\": true|false}")
    return bool(body["read"])


def _content_ids(event: dict[str, Any]) -> dict[str, int]:
    """Attachment index by Content-ID (as written, and lowercased as a fallback)."""
    found: dict[str, int] = {}
    for index, attachment in enumerate(event.get("attachments") or []):
        content_id = (attachment.get("content_id") or "").strip().strip("<>")
        if content_id:
            found.setdefault(content_id, index)
            found.setdefault(content_id.lower(), index)
    return found


def _rfc3339(text: str) -> float | None:
    # A "+" in a query string arrives as a space when the client did not encode it.
    candidate = re.sub(r" (\d{2}:?\d{2})$", r"+\1", text.strip())
    if not re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]", candidate):
        return None
    try:
        when = datetime.fromisoformat(re.sub(r"[Zz]$", "+00:00", candidate))
    except ValueError:
        raise ApiError(400, "after must be an RFC 3339 time or the uuid of a stored message") \
            from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _pattern(text: str) -> re.Pattern[str]:
    if len(text) > MAX_PATTERN:
        raise ApiError(400, f"pattern must be at most {MAX_PATTERN} characters")
    try:
        return re.compile(text)
    except re.error as exc:
        raise ApiError(400, f"pattern is not a valid regular expression: {exc}") from None


def _htmlview() -> ModuleType:
    # The HTML view (and html.parser) is imported by the first request that needs it, not
    # with the server: an idle mailpipe whose inbox is never opened does not hold it.
    from mailpipe.web import htmlview

    return htmlview
