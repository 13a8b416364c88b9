"""Mailpit's REST API v1 over mailpipe's store, so that Mailpit's clients (the `mailpit-api`
npm package, Mailpit's Go client, plain HTTP in Cypress or Playwright) run unchanged.

Routes, bodies and answers follow Mailpit's swagger file and handlers: JSON as Mailpit
shapes it (compat/mailpit_model.py), "ok" as text/plain for writes, errors as a 400 (or
404) with the message as plain text. IDs are mailpipe's uuids; `latest` is the newest
message (matching `?query=` when given). Docs: docs/from-mailpit.md.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from mailpipe import __version__
from mailpipe.compat import CompatContext
from mailpipe.compat import mailpit_model as model
from mailpipe.compat.mailpit_chaos import Chaos, ChaosError, as_json, from_json, parse_triggers
from mailpipe.compat.mailpit_release import ReleaseError, check_recipients, prepare
from mailpipe.config import RelayConfig
from mailpipe.store.sqlite import StoreClosedError
from mailpipe.web.app import UNTRUSTED_HEADERS, ApiError, _safe_mime, int_param

log = logging.getLogger("mailpipe.compat.mailpit")

DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
MAX_START = 10_000_000
# Every matching uuid of a search is held at once to act on it; bounded all the same.
MAX_MATCHES = 1_000_000
# Parts Mailpit would let a browser render inline: not these, which may carry script.
ACTIVE_TYPES = frozenset({"text/html", "text/xml", "application/xhtml+xml", "image/svg+xml",
                          "application/xml", "text/xsl"})
# The sender's HTML at /view/{ID}.html: shown as written, but never running script in our
# origin (Mailpit relies on its own CSP for that; this one also sandboxes the document).
VIEW_CSP = ("sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
            "img-src * data:; style-src 'unsafe-inline' *; font-src * data:")
NOT_FOUND = "404 page not found"


class Fail(Exception):
    """An answer in Mailpit's way: plain text, 400 unless said otherwise."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


class Shared:
    """What both places the API is served share (the /compat/mailpit prefix and its own
    listener are two applications over one running mailpipe)."""

    def __init__(self, context: CompatContext) -> None:
        settings = context.config.compat.mailpit
        self.started = time.time()
        self.deleted = 0
        self.chaos: Chaos | None = None
        if settings.chaos:
            triggers = parse_triggers(settings.chaos_triggers or "")
            self.chaos = Chaos(context.mailpipe.verdicts, triggers)


def create_app(context: CompatContext) -> web.Application:
    shared = context.shared.get("mailpit")
    if shared is None:
        shared = context.shared["mailpit"] = Shared(context)
    api = MailpitAPI(context, shared)
    app = web.Application(middlewares=[_plain_errors])
    app.router.add_routes(api.routes())
    return app


class MailpitAPI:
    def __init__(self, context: CompatContext, shared: Shared) -> None:
        self.store = context.store
        self.context = context
        self.settings = context.config.compat.mailpit
        self.shared = shared

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/messages", self.list_messages),
            web.put("/api/v1/messages", self.set_read_status),
            web.delete("/api/v1/messages", self.delete_messages),
            web.get("/api/v1/search", self.search),
            web.delete("/api/v1/search", self.delete_search),
            web.get("/api/v1/message/{ID}", self.get_message),
            web.get("/api/v1/message/{ID}/headers", self.get_headers),
            web.get("/api/v1/message/{ID}/raw", self.get_raw),
            web.get("/api/v1/message/{ID}/part/{PartID}", self.get_part),
            web.get("/api/v1/message/{ID}/part/{PartID}/thumb", self.get_thumbnail),
            web.post("/api/v1/message/{ID}/release", self.release),
            web.get("/api/v1/message/{ID}/html-check", self.html_check),
            web.get("/api/v1/message/{ID}/link-check", self.link_check),
            web.get("/api/v1/message/{ID}/sa-check", self.sa_check),
            web.post("/api/v1/send", self.send),
            web.get("/api/v1/tags", self.get_tags),
            web.put("/api/v1/tags", self.set_tags),
            # {Tag:.+}: a tag may hold a "/" (sent as %2F).
            web.put("/api/v1/tags/{Tag:.+}", self.rename_tag),
            web.delete("/api/v1/tags/{Tag:.+}", self.delete_tag),
            web.get("/api/v1/info", self.info),
            web.get("/api/v1/webui", self.webui),
            web.get("/api/v1/chaos", self.get_chaos),
            web.put("/api/v1/chaos", self.set_chaos),
            web.get("/view/{ID}.html", self.view_html),
            web.get("/view/{ID}.txt", self.view_text),
            web.get("/livez", self.livez),
            web.get("/readyz", self.readyz),
        ]

    # ---- messages --------------------------------------------------------------------

    async def list_messages(self, request: web.Request) -> web.Response:
        start, limit = _start_limit(request)
        page = await self.store.page(limit=limit, offset=start)
        return _json(await self._summaries(page.messages, start, page.total, page.total,
                                           page.unread, page.unread))

    async def search(self, request: web.Request) -> web.Response:
        query = _query(request)
        start, limit = _start_limit(request)
        found = await self.store.page(limit=limit, offset=start, q=query)
        unread = await self.store.page(limit=0, q=f"{query} is:unread")
        whole = await self.store.page(limit=0)
        return _json(await self._summaries(found.messages, start, whole.total, found.total,
                                           whole.unread, unread.total))

    async def _summaries(self, rows: list[dict[str, Any]], start: int, total: int,
                         matching: int, unread: int, matching_unread: int) -> dict[str, Any]:
        events = await self.store.get_many([row["uuid"] for row in rows])
        tags = await self.store.tags()
        return {
            "total": total,
            "unread": unread,
            "count": len(rows),
            "messages_count": matching,
            "messages_unread": matching_unread,
            "start": start,
            "tags": [tag["name"] for tag in tags],
            "messages": [model.summary(row, events.get(row["uuid"]), row.get("tags") or [])
                         for row in rows],
        }

    async def set_read_status(self, request: web.Request) -> web.Response:
        data = await _body(request)
        read = data.get("Read", False)
        ids = _ids(data)
        search = data.get("Search") or ""
        if not isinstance(read, bool) or not isinstance(search, str):
            raise Fail("Read must be true or false, Search a string")
        if ids and search.strip():
            raise Fail("You may specify either IDs or a search query, not both")
        if search.strip():
            ids = await self._matching(search.strip())
        elif not ids:
            await self.store.mark_all_read(read)
            return _ok()
        await asyncio.gather(*(self.store.mark_read(uuid, read) for uuid in ids))
        return _ok()

    async def delete_messages(self, request: web.Request) -> web.Response:
        # No body, or no IDs: every message (Mailpit's rule); a body that is not JSON is an
        # error here, where Mailpit would delete everything.
        data = await _body(request, empty_ok=True)
        ids = _ids(data)
        if not ids:
            self.shared.deleted += await self.store.clear()
        else:
            await self._delete(ids)
        return _ok()

    async def delete_search(self, request: web.Request) -> web.Response:
        await self._delete(await self._matching(_query(request)))
        return _ok()

    async def _delete(self, ids: list[str]) -> None:
        deleted = await asyncio.gather(*(self.store.delete(uuid) for uuid in ids))
        self.shared.deleted += sum(deleted)

    async def _matching(self, query: str) -> list[str]:
        page = await self.store.page(limit=MAX_MATCHES, q=query)
        return [row["uuid"] for row in page.messages]

    # ---- one message -----------------------------------------------------------------

    async def _id(self, request: web.Request) -> str:
        """The path's ID; `latest` the newest message (matching ?query= when given)."""
        given = request.match_info["ID"]
        if given != "latest":
            return given
        page = await self.store.page(limit=1, q=request.query.get("query", "").strip() or None)
        if not page.messages:
            raise Fail("Message not found", 404)
        return str(page.messages[0]["uuid"])

    async def _event(self, uuid: str, missing: str = NOT_FOUND) -> dict[str, Any]:
        event = await self.store.get(uuid)
        if event is None:
            raise Fail(missing, 404)
        return event

    async def _raw(self, uuid: str) -> bytes:
        raw = await self.store.raw(uuid)
        if raw is None:
            raise Fail(NOT_FOUND, 404)
        return raw

    async def get_message(self, request: web.Request) -> web.Response:
        uuid = await self._id(request)
        event = await self._event(uuid)
        parts = await asyncio.to_thread(model.parts_of, await self._raw(uuid))
        await self.store.mark_read(uuid, True)  # Mailpit: reading a message marks it read
        return _json(model.message(uuid, event, parts, event.get("tags") or []))

    async def get_headers(self, request: web.Request) -> web.Response:
        raw = await self._raw(await self._id(request))
        return _json(await asyncio.to_thread(model.raw_headers, raw))

    async def get_raw(self, request: web.Request) -> web.Response:
        uuid = await self._id(request)
        headers = dict(UNTRUSTED_HEADERS)
        if request.query.get("dl") == "1":
            headers["Content-Disposition"] = f'attachment; filename="{uuid}.eml"'
        return web.Response(body=await self._raw(uuid), headers=headers,
                            content_type="text/plain", charset="utf-8")

    async def _part(self, request: web.Request) -> tuple[dict[str, Any], model.Part]:
        uuid = await self._id(request)
        event = await self._event(uuid)
        parts = await asyncio.to_thread(model.parts_of, await self._raw(uuid))
        wanted = request.match_info["PartID"]
        for meta, part in zip(event.get("attachments") or [], parts, strict=False):
            if part.part_id == wanted:
                return meta, part
        raise Fail(NOT_FOUND, 404)

    async def get_part(self, request: web.Request) -> web.Response:
        meta, part = await self._part(request)
        content_type = _safe_mime(meta.get("content_type") or "application/octet-stream")
        disposition = "inline"
        if content_type in ACTIVE_TYPES:
            content_type, disposition = "application/octet-stream", "attachment"
        name = meta.get("filename") or meta.get("content_id") or f"part-{part.part_id}"
        response = web.Response(body=part.payload, headers={
            **UNTRUSTED_HEADERS,
            "Content-Disposition": f'{disposition}; filename="{quote(name, safe="")}"',
        })
        response.content_type = content_type
        return response

    async def get_thumbnail(self, request: web.Request) -> web.Response:
        from mailpipe.compat.thumbnail import thumbnail

        _, part = await self._part(request)
        jpeg = await asyncio.to_thread(thumbnail, part.payload)
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def view_html(self, request: web.Request) -> web.Response:
        uuid = await self._id(request)
        event = await self._event(uuid, "Message not found")
        html = (event.get("message") or {}).get("html")
        if not html:
            raise Fail("This message does not contain a HTML part", 404)
        parts = await asyncio.to_thread(model.parts_of, await self._raw(uuid))
        prefix = request.path[: request.path.rindex("/view/")]
        cids = [(meta.get("content_id") or "", f"/api/v1/message/{uuid}/part/{part.part_id}")
                for meta, part in zip(event.get("attachments") or [], parts, strict=False)]
        if request.query.get("embed") == "1":
            body = await asyncio.to_thread(_embedded, html, dict(cids), prefix)
        else:
            body = model.link_inline_images(html, cids, prefix)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": VIEW_CSP, "Referrer-Policy": "no-referrer"})

    async def view_text(self, request: web.Request) -> web.Response:
        event = await self._event(await self._id(request), "Message not found")
        text = (event.get("message") or {}).get("text") or ""
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def release(self, request: web.Request) -> web.Response:
        from mailpipe.router.deliver import DeliveryError, Relay, deliver

        relay = self.settings.relay
        if relay is None:
            raise Fail("Message relaying is not enabled (compat.mailpit.relay)")
        uuid = await self._id(request)
        raw = await self._raw(uuid)
        data = await _body(request)
        try:
            recipients = check_recipients(relay, data.get("To"))
            sender, message = prepare(relay, raw, datetime.now(UTC))
            auth = relay.auth
            await deliver(message, Relay(
                relay.host, relay.port, auth.username if auth else None,
                auth.password if auth else None, auth.mechanism if auth else None,
                relay.starttls, relay.timeout), sender, recipients)
        except ReleaseError as exc:
            raise Fail(str(exc)) from None
        except DeliveryError as exc:
            log.warning("release of %s through %s:%d failed: %s", uuid, relay.host, relay.port,
                        exc)
            raise Fail(f"SMTP error: {exc}") from None
        return _ok()

    # ---- checks ----------------------------------------------------------------------

    async def html_check(self, request: web.Request) -> web.Response:
        from mailpipe.checks.html import mailpit_html_check

        event = await self._event(await self._id(request))
        html = (event.get("message") or {}).get("html")
        if not html:
            raise Fail("message does not contain HTML")
        return _json(await asyncio.to_thread(mailpit_html_check, html))

    async def link_check(self, request: web.Request) -> web.Response:
        from mailpipe.checks.links import LinkLimits, link_check
        from mailpipe.checks.routes import flag, refuse_other_pages

        refuse_other_pages(request)  # it makes outbound requests: never for another site
        follow = flag(request, "follow")
        message = (await self._event(await self._id(request))).get("message") or {}
        limits = LinkLimits(**self.context.config.checks.links.model_dump())
        return _json(await link_check(message.get("html"), message.get("text"),
                                      follow=follow, limits=limits))

    async def sa_check(self, request: web.Request) -> web.Response:
        from mailpipe.checks.spam import SpamNotConfigured, mailpit_sa_check

        raw = await self._raw(await self._id(request))
        try:
            return _json(await mailpit_sa_check(self.context.mailpipe.spam_checker, raw))
        except SpamNotConfigured as exc:
            raise Fail(str(exc)) from None

    # ---- send and tags ---------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        """Mailpit's send JSON, injected as if received over SMTP (web/send.py); errors as
        Mailpit's JSON {"Error": ...}."""
        from mailpipe.web.compose import SendError, from_mailpit, submission
        from mailpipe.web.send import inject, json_limit, read_json

        injector = self.context.mailpipe.injector
        try:
            message = submission(from_mailpit(await read_json(request, json_limit(injector))))
            outcome = await inject(injector, message, request)
        except SendError as exc:
            return _json({"Error": str(exc)}, status=400)
        except ApiError as exc:
            return _json({"Error": exc.message}, status=exc.status)
        if not outcome.accepted:
            text = outcome.text.replace("\n", " ")
            return _json({"Error": f"{outcome.code} {text}"}, status=400)
        return _json({"ID": outcome.uuid})

    async def get_tags(self, request: web.Request) -> web.Response:
        return _json([tag["name"] for tag in await self.store.tags()])

    async def set_tags(self, request: web.Request) -> web.Response:
        from mailpipe.store.tags import clean_tags

        data = await _body(request)
        tags = data.get("Tags") or []
        with _tag_errors():
            # Mailpit drops what a tag may not hold, rather than refusing the request.
            await self.store.set_tags(_ids(data), clean_tags(tags, strict=False))
        return _ok()

    async def rename_tag(self, request: web.Request) -> web.Response:
        name = (await _body(request)).get("Name")
        with _tag_errors():
            await self.store.rename_tag(request.match_info["Tag"], name)
        return _ok()

    async def delete_tag(self, request: web.Request) -> web.Response:
        with _tag_errors():
            await self.store.delete_tag(request.match_info["Tag"])
        return _ok()

    # ---- application -----------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        whole = await self.store.page(limit=0)
        path = Path(self.store.path)
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
        metrics = self.context.metrics
        return _json({
            "Version": f"mailpipe {__version__}",
            "LatestVersion": "",
            "Database": str(path),
            "DatabaseSize": size,
            "Messages": whole.total,
            "Unread": whole.unread,
            "Tags": {tag["name"]: tag["count"] for tag in await self.store.tags()},
            "RuntimeStats": {
                "Uptime": int(time.time() - self.shared.started),
                "Memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "MessagesDeleted": self.shared.deleted,
                "SMTPAccepted": _total(metrics.emails_accepted),
                "SMTPAcceptedSize": _total(metrics.bytes_received),
                "SMTPRejected": _total(metrics.emails_rejected),
                "SMTPIgnored": 0,
            },
        })

    async def webui(self, request: web.Request) -> web.Response:
        return _json({
            "Label": self.settings.label,
            "MessageRelay": _relay_json(self.settings.relay),
            "SpamAssassin": self.context.mailpipe.spam_checker is not None,
            "ChaosEnabled": self.shared.chaos is not None,
            "DuplicatesIgnored": False,
            "HideDeleteAllButton": False,
        })

    def _chaos(self) -> Chaos:
        if self.shared.chaos is None:
            raise Fail("Chaos is not enabled")
        return self.shared.chaos

    async def get_chaos(self, request: web.Request) -> web.Response:
        return _json(as_json(self._chaos().triggers))

    async def set_chaos(self, request: web.Request) -> web.Response:
        chaos = self._chaos()
        try:
            chaos.set(from_json(await _body(request)))
        except ChaosError as exc:
            raise Fail(str(exc)) from None
        return _json(as_json(chaos.triggers))

    async def livez(self, request: web.Request) -> web.Response:
        return _ok()

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.store.health().get("ok"):
            raise Fail("store not ready", 503)
        return _ok()


# ---- helpers --------------------------------------------------------------------------


@web.middleware
async def _plain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as Mailpit answers them: the message as plain text."""
    try:
        return await handler(request)
    except Fail as exc:
        return web.Response(text=exc.text, status=exc.status)
    except ApiError as exc:  # int_param's bounds
        return web.Response(text=exc.message, status=exc.status)
    except StoreClosedError:
        return web.Response(text="store unavailable", status=503)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@contextmanager
def _tag_errors() -> Iterator[None]:
    """A tag that cannot be (store/tags.py's TagError) as Mailpit's 400."""
    from mailpipe.store.tags import TagError

    try:
        yield
    except TagError as exc:
        raise Fail(str(exc)) from None


def _ok() -> web.Response:
    return web.Response(text="ok", content_type="text/plain")


def _start_limit(request: web.Request) -> tuple[int, int]:
    return (int_param(request, "start", 0, 0, MAX_START),
            int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))


def _query(request: web.Request) -> str:
    query = request.query.get("query", "").strip()
    if not query:
        raise Fail("Error: no search query")
    return query


async def _body(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The JSON object of the body ({} for none when `empty_ok`)."""
    text = await request.read()
    if not text.strip():
        if empty_ok:
            return {}
        raise Fail("a JSON body is required")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise Fail(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise Fail("the body must be a JSON object")
    return data


def _ids(data: dict[str, Any]) -> list[str]:
    ids = data.get("IDs")
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise Fail("IDs must be an array of message IDs")
    return ids


def _embedded(html: str, by_cid: dict[str, str], prefix: str) -> str:
    """?embed=1, for an iframe: the safe view of web/htmlview.py (links open in a new tab
    without a handle on the page). Mailpit also adds a script reporting the height; the
    sandbox runs no script, so that is left out."""
    from mailpipe.web.htmlview import rewrite

    def cid_url(content_id: str) -> str | None:
        path = by_cid.get(content_id)
        return None if path is None else prefix + path

    return rewrite(html, cid_url, remote=True).html


def _relay_json(relay: RelayConfig | None) -> dict[str, Any]:
    """Mailpit's MessageRelay of /api/v1/webui."""
    if relay is None:
        return {"Enabled": False, "SMTPServer": "", "ReturnPath": "", "AllowedRecipients": "",
                "BlockedRecipients": "", "OverrideFrom": "", "PreserveMessageIDs": False}
    return {
        "Enabled": True,
        "SMTPServer": f"{relay.host}:{relay.port}",
        "ReturnPath": relay.return_path or "",
        "AllowedRecipients": relay.allowed_recipients or "",
        "BlockedRecipients": relay.blocked_recipients or "",
        "OverrideFrom": relay.override_from or "",
        "PreserveMessageIDs": relay.preserve_message_ids,
    }


def _total(counter: Any) -> int:
    """A counter's value summed over its labels."""
    return int(sum(sample.value for metric in counter.collect() for sample in metric.samples
                   if sample.name.endswith("_total")))

