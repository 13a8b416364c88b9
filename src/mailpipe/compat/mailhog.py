"""MailHog's HTTP API, v1 and v2, over mailpipe's store (MailHog-Server api/v1.go, api/v2.go),
so that MailHog's clients (the npm `mailhog` package, hand-written test helpers) run
unchanged. Messages are shaped by compat/mailhog_message.py; IDs are mailpipe's uuids.

Where MailHog answers a bad request with an empty 400 or a missing message with `null`, this
answers a status and {"error": ...}: clients that worked against MailHog never depended on
those. Jim, MailHog's chaos monkey, works on mailpipe's SMTP sessions (compat/mailhog_jim.py):
not invited, his routes answer 404 as MailHog's do without -invite-jim.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from mailpipe.compat import CompatContext
from mailpipe.compat.mailhog_jim import Jim, JimError, settings_from
from mailpipe.compat.mailhog_message import (
    decoded_body,
    header,
    message_json,
    part_at,
    part_filename,
)
from mailpipe.store.feed import Change
from mailpipe.store.search import Term
from mailpipe.web.app import (
    MAX_OFFSET,
    UNTRUSTED_HEADERS,
    ApiError,
    _disposition,
    _errors_as_json,
    _safe_filename,
    _safe_mime,
    bounded_int,
    int_param,
    json_response,
)
from mailpipe.web.inbox import PING_INTERVAL, _Live, stream_changes

if TYPE_CHECKING:
    from mailpipe.router.deliver import Relay

# MailHog's paging: 50 by default, never more than 250 a page; v1 lists up to 1000.
DEFAULT_LIMIT = 50
MAX_LIMIT = 250
V1_LIMIT = 1000
MAX_PART_INDEX = 1_000_000
SEARCH_KINDS = ("from", "to", "containing")
RELEASE_FIELDS = ("host", "port", "email", "username", "password", "mechanism", "name", "save")


class JimDesk:
    """Whether Jim is invited, for both places the API is served (the /compat/mailhog prefix
    and its own listener are two applications over one running mailpipe)."""

    def __init__(self, context: CompatContext) -> None:
        self.verdicts = context.mailpipe.verdicts
        self.jim: Jim | None = None
        if context.config.compat.mailhog.invite_jim:
            self.jim = Jim(self.verdicts)

    def invite(self, settings: dict[str, float] | None) -> Jim:
        self.dismiss()
        self.jim = Jim(self.verdicts, settings)
        return self.jim

    def dismiss(self) -> None:
        if self.jim is not None:
            self.jim.leave()
            self.jim = None


def create_app(context: CompatContext) -> web.Application:
    desk = context.shared.get("mailhog")
    if desk is None:
        desk = context.shared["mailhog"] = JimDesk(context)
    routes = MailHogRoutes(context, desk)
    # Its own error middleware: on its own listener nothing else turns errors into JSON.
    app = web.Application(middlewares=[_errors_as_json])
    app.on_shutdown.append(routes.on_shutdown)
    app.router.add_routes(routes.routes())
    return app


class MailHogRoutes:
    def __init__(self, context: CompatContext, desk: JimDesk,
                 ping_interval: float = PING_INTERVAL) -> None:
        self.store = context.store
        self.desk = desk
        self.ping_interval = ping_interval
        self.live: set[Any] = set()

    def routes(self) -> list[web.RouteDef]:
        message = "/api/v1/messages/{id}"
        return [
            web.get("/api/v2/messages", self.messages_v2),
            web.get("/api/v2/search", self.search),
            web.get("/api/v2/jim", self.get_jim),
            web.post("/api/v2/jim", self.invite_jim),
            web.put("/api/v2/jim", self.update_jim),
            web.delete("/api/v2/jim", self.dismiss_jim),
            web.get("/api/v2/outgoing-smtp", self.outgoing_smtp),
            web.get("/api/v1/messages", self.messages_v1),
            web.delete("/api/v1/messages", self.delete_all),
            web.get("/api/v1/events", self.events),
            web.get(message, self.message),
            web.delete(message, self.delete_one),
            web.get(message + "/download", self.download),
            web.get(message + "/mime/part/{part}/download", self.download_part),
            web.post(message + "/release", self.release),
        ]

    async def on_shutdown(self, app: web.Application) -> None:
        for subscription in list(self.live):
            subscription.end()

    # ---- lists ---------------------------------------------------------------------------

    async def messages_v2(self, request: web.Request) -> web.Response:
        start, limit = _start_limit(request)
        page = await self.store.page_of([], limit=limit, offset=start)
        return await self._result(page, start)

    async def search(self, request: web.Request) -> web.Response:
        start, limit = _start_limit(request)
        kind = request.query.get("kind", "")
        if kind not in SEARCH_KINDS:
            raise ApiError(400, "kind must be one of from, to, containing")
        query = request.query.get("query", "")
        if not query:
            raise ApiError(400, "query must not be empty")
        if kind == "containing":
            # MailHog looks in the body as sent (still encoded) and the headers; mailpipe's
            # search text holds them decoded: either matches.
            page = await self.store.page_of([Term("text", query)], limit=limit, offset=start,
                                            or_raw=query)
        else:
            page = await self.store.page_of([Term(kind, query)], limit=limit, offset=start)
        return await self._result(page, start)

    async def messages_v1(self, request: web.Request) -> web.Response:
        # MailHog's v1 list: a bare array, oldest first, at most 1000 (here the newest 1000).
        page = await self.store.page_of([], limit=V1_LIMIT)
        items = await self._messages([summary["uuid"] for summary in page.messages])
        return json_response(items[::-1])

    async def _result(self, page: Any, start: int) -> web.Response:
        items = await self._messages([summary["uuid"] for summary in page.messages])
        return json_response({"total": page.total, "count": len(items), "start": start,
                              "items": items})

    async def _messages(self, uuids: list[str]) -> list[dict[str, Any]]:
        """The messages in MailHog's shape; one deleted meanwhile is left out."""
        loaded = await asyncio.gather(*(self._load(uuid) for uuid in uuids))
        found = [pair for pair in loaded if pair is not None]
        # Splitting many messages is CPU work: off the event loop, in one go.
        return await asyncio.to_thread(lambda: [message_json(*pair) for pair in found])

    async def _load(self, uuid: str) -> tuple[dict[str, Any], bytes] | None:
        event, raw = await asyncio.gather(self.store.get(uuid), self.store.raw(uuid))
        return None if event is None or raw is None else (event, raw)

    # ---- one message ---------------------------------------------------------------------

    async def message(self, request: web.Request) -> web.Response:
        return json_response(await self._message(request))

    async def _message(self, request: web.Request) -> dict[str, Any]:
        loaded = await self._load(request.match_info["id"])
        if loaded is None:
            raise ApiError(404, "message not found")
        return await asyncio.to_thread(message_json, *loaded)

    async def delete_one(self, request: web.Request) -> web.Response:
        if not await self.store.delete(request.match_info["id"]):
            raise ApiError(404, "message not found")
        return web.Response()  # MailHog answers 200 with no body; its clients expect none

    async def delete_all(self, request: web.Request) -> web.Response:
        await self.store.clear()
        return web.Response()

    async def download(self, request: web.Request) -> web.Response:
        uuid = request.match_info["id"]
        raw = await self.store.raw(uuid)
        if raw is None:
            raise ApiError(404, "message not found")
        headers = {"Content-Disposition": _disposition("attachment", f"{uuid}.eml"),
                   **UNTRUSTED_HEADERS}
        return web.Response(body=raw, content_type="message/rfc822", headers=headers)

    async def download_part(self, request: web.Request) -> web.Response:
        """MIME.Parts[part] decoded (MailHog decodes base64 only; quoted-printable too here),
        always as a download: the sender's headers are not passed on as ours."""
        index = bounded_int("part", request.match_info["part"], 0, MAX_PART_INDEX)
        uuid = request.match_info["id"]
        part = part_at((await self._message(request))["MIME"], index)
        if part is None:
            raise ApiError(404, "MIME part not found")
        content_type = _safe_mime(header(part, "Content-Type") or "text/plain")
        name = part_filename(part) or f"{uuid}-part-{index}"
        response = web.Response(
            body=decoded_body(part),
            headers={"Content-Disposition": _disposition("attachment",
                                                         _safe_filename(name, content_type,
                                                                        index)),
                     **UNTRUSTED_HEADERS},
        )
        response.content_type = content_type
        return response

    async def release(self, request: web.Request) -> web.Response:
        """Deliver the message as received to Email through Host:Port (MailHog's release)."""
        loaded = await self._load(request.match_info["id"])
        if loaded is None:
            raise ApiError(404, "message not found")
        event, raw = loaded
        # Imported by the first release: aiosmtplib is no part of an idle mailpipe.
        from mailpipe.router.deliver import DeliveryError, deliver

        relay, email = _release_config(await _json_body(request))
        mail_from = (event.get("envelope") or {}).get("from") or ""
        try:
            await deliver(raw, relay, mail_from, [email])
        except DeliveryError as exc:
            raise ApiError(502, f"release failed: {exc}") from None
        return web.Response()

    # ---- the rest of MailHog's API -------------------------------------------------------

    async def get_jim(self, request: web.Request) -> web.Response:
        return json_response(self._jim().settings)

    async def invite_jim(self, request: web.Request) -> web.Response:
        """Invite Jim: with the settings given (a field left out is 0, as MailHog decodes
        them), else with MailHog's defaults; 400 when he is already here."""
        if self.desk.jim is not None:
            raise ApiError(400, "Jim is already invited: PUT changes him, DELETE sends him away")
        body = await request.read()
        settings = _jim_settings(body) if body.strip() else None
        return json_response(self.desk.invite(settings).settings, status=201)

    async def update_jim(self, request: web.Request) -> web.Response:
        self._jim()
        jim = self.desk.invite(_jim_settings(await request.read()))
        return json_response(jim.settings)

    async def dismiss_jim(self, request: web.Request) -> web.Response:
        self._jim()
        self.desk.dismiss()
        return web.Response()

    def _jim(self) -> Jim:
        if self.desk.jim is None:
            raise ApiError(404, "Jim is not invited: POST /api/v2/jim invites him "
                                "(compat.mailhog.invite_jim at start)")
        return self.desk.jim

    async def outgoing_smtp(self, request: web.Request) -> web.Response:
        # MailHog's servers saved for release (-outgoing-smtp); mailpipe keeps none.
        return json_response({})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """MailHog's v1 event stream: each new message in full, as a plain `message` event
        (MailHog's UI listens for those); a comment now and then, so that a gone client is
        noticed."""

        async def render(change: Change) -> bytes:
            if change.kind != "new":
                return b""
            found = await self._messages([change.data["uuid"]])
            return b"".join(b"data: %s\n\n" % orjson.dumps(item) for item in found)

        live = _Live(self.store.changes.subscribe(), self.live)
        return await stream_changes(request, live, self.ping_interval, render,
                                    ping=b": keepalive\n\n")


# ---- helpers ------------------------------------------------------------------------------


def _start_limit(request: web.Request) -> tuple[int, int]:
    """MailHog's start and limit: a limit of 0 means the default, more than 250 means 250."""
    start = int_param(request, "start", 0, 0, MAX_OFFSET)
    limit = int_param(request, "limit", 0, 0, MAX_OFFSET)
    return start, min(limit, MAX_LIMIT) if limit else DEFAULT_LIMIT


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _jim_settings(body: bytes) -> dict[str, float]:
    try:
        return settings_from(orjson.loads(body))
    except orjson.JSONDecodeError:
        raise ApiError(400, "the body must be a JSON object of Jim's settings") from None
    except JimError as exc:
        raise ApiError(400, str(exc)) from None


def _release_config(body: dict[str, Any]) -> tuple[Relay, str]:
    """MailHog's ReleaseConfig (Go decodes JSON field names in any case: `host` or `Host`)."""
    from mailpipe.router.deliver import Relay, mechanism

    given = {str(key).lower(): value for key, value in body.items()}
    unknown = sorted(set(given) - set(RELEASE_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown release fields: {', '.join(unknown)}")
    if given.get("name") or given.get("save"):
        raise ApiError(400, "mailpipe keeps no saved outgoing SMTP servers: give Host, Port "
                            "and Email")
    host, email = _text(given, "host"), _text(given, "email")
    if not host or not email:
        raise ApiError(400, "Host and Email are required")
    port = bounded_int("Port", str(given.get("port", "")).strip(), 1, 65535)
    try:
        chosen = mechanism(_text(given, "mechanism"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    username, password = _text(given, "username"), _text(given, "password")
    relay = Relay(host=host, port=port, username=username or None,
                  password=password or None, mechanism=chosen)
    return relay, email


def _text(given: dict[str, Any], name: str) -> str:
    value = given.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value.strip()
