"""The checks' routes on mailpipe's own API:

- GET /api/v1/messages/{uuid}/html-check: caniemail compatibility (Mailpit's shape, plus
  `Lines` and `Families`);
- GET /api/v1/messages/{uuid}/link-check[?follow=true]: the links' statuses (Mailpit's
  shape); it makes outbound requests, so it runs only when asked;
- GET /api/v1/messages/{uuid}/screenshot.png[?width=]: the HTML rendered by Chromium; 503
  when Playwright or Chromium is missing.

They sit behind the API's guard (web/guard.py) like every route. The guard lets any page
send GETs (it cannot read the answers); the link check and the screenshot act, though
(outbound requests, a browser started), so they also refuse what a page on another origin
sends, as the guard refuses its writes: a cross-site or same-site Sec-Fetch-Site, or an
Origin or Referer that is not this API's.

The checks' modules (tinycss2, the HTTP client, Playwright) load with the first request
that needs them, not with the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mailpipe.config import ChecksConfig
from mailpipe.store.sqlite import SQLiteStore
from mailpipe.web.app import ApiError, int_param, json_response
from mailpipe.web.guard import origin_refusal

DESKTOP_WIDTH = 1024
MIN_WIDTH, MAX_WIDTH = 200, 2560
SCREENSHOTS_AT_ONCE = 2  # each is a browser process
_FLAGS = {"": False, "0": False, "false": False, "no": False,
          "1": True, "true": True, "yes": True}


class CheckRoutes:
    def __init__(self, store: SQLiteStore, config: ChecksConfig | None = None) -> None:
        self.store = store
        self.config = config or ChecksConfig()
        self.screenshots = asyncio.Semaphore(SCREENSHOTS_AT_ONCE)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/messages/{uuid}/html-check", self.html_check),
            web.get("/api/v1/messages/{uuid}/link-check", self.link_check),
            web.get("/api/v1/messages/{uuid}/screenshot.png", self.screenshot),
        ]

    async def html_check(self, request: web.Request) -> web.Response:
        from mailpipe.checks.html import html_check

        html = _html(await self._event(request))
        return json_response(await asyncio.to_thread(html_check, html))

    async def link_check(self, request: web.Request) -> web.Response:
        from mailpipe.checks.links import LinkLimits, link_check

        refuse_other_pages(request)
        follow = flag(request, "follow")
        message = (await self._event(request)).get("message") or {}
        limits = LinkLimits(**self.config.links.model_dump())
        return json_response(await link_check(message.get("html"), message.get("text"),
                                              follow=follow, limits=limits))

    async def screenshot(self, request: web.Request) -> web.Response:
        from mailpipe.checks.screenshot import ScreenshotLimits, ScreenshotUnavailable, screenshot

        refuse_other_pages(request)
        limits = ScreenshotLimits(**self.config.screenshot.model_dump())
        width = int_param(request, "width", DESKTOP_WIDTH, MIN_WIDTH, MAX_WIDTH)
        event = await self._event(request)
        html = _html(event)
        raw = await self.store.raw(event["uuid"]) if "cid:" in html.lower() else None
        safe = await asyncio.to_thread(_safe_html, event, raw, html)
        async with self.screenshots:
            try:
                png = await screenshot(safe, width, limits)
            except ScreenshotUnavailable as exc:
                raise ApiError(503, str(exc)) from None
            except TimeoutError:
                raise ApiError(504, f"the screenshot took over "
                               f"{limits.timeout:g} s") from None
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "no-store"})

    async def _event(self, request: web.Request) -> dict[str, Any]:
        event = await self.store.get(request.match_info["uuid"])
        if event is None:
            raise ApiError(404, "message not found")
        return event



def _html(event: dict[str, Any]) -> str:
    html = (event.get("message") or {}).get("html")
    if not html:
        raise ApiError(404, "message has no HTML body")
    return str(html)


def refuse_other_pages(request: web.Request) -> None:
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        raise ApiError(403, "refused: a page on another site may not start link checks or "
                            "screenshots (this API's own page and non-browser clients may)")
    # Judged as a write: same origin, or no page at all.
    refusal = origin_refusal("POST", request.scheme, request.headers)
    if refusal is not None:
        raise ApiError(refusal.status, refusal.reason)


def flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "").strip().lower()
    if value not in _FLAGS:
        raise ApiError(400, f"{name} must be true or false")
    return _FLAGS[value]


def _safe_html(event: dict[str, Any], raw: bytes | None, html: str) -> str:
    """The HTML view's rewrite of `html`, its cid: images inlined from `raw`."""
    from mailpipe.capture.message import attachment_parts, attachment_payload, parse_message
    from mailpipe.checks.screenshot import data_url_images
    from mailpipe.web.htmlview import rewrite
    from mailpipe.web.inbox import _content_ids

    parts = attachment_parts(parse_message(raw)) if raw is not None else []
    image = data_url_images([(attachment_payload(p), p.get_content_type()) for p in parts])
    by_cid = _content_ids(event)

    def cid_url(content_id: str) -> str | None:
        index = by_cid.get(content_id, by_cid.get(content_id.lower()))
        return image(index) if index is not None else None

    return rewrite(html, cid_url, remote=False).html
