"""The link check (issue 15): an email sent over real SMTP links to a real local aiohttp
server started here (200, 404, a redirect to a 200, redirects to ftp: and javascript:, a
loop, a HEAD-refusing page, a slow page); `mailpipe serve` checks them on demand at
GET /api/v1/messages/{uuid}/link-check, as Mailpit answers it."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from typing import Any

import pytest
from aiohttp import web

from conftest import MailpipeServer
from test_checks_html import openapi_check

LINK_TIMEOUT = 1  # seconds: the slow page answers long after


class Site:
    """The web the email links to; it records each request it gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (method, path)
        self.base = ""

    async def record(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        path = request.path
        if path in ("/ok", "/text-only") or path.startswith("/img/"):
            return web.Response(text="fine")
        if path == "/moved":
            raise web.HTTPMovedPermanently("/ok")
        if path == "/to-ftp":
            raise web.HTTPFound("ftp://127.0.0.1/file.txt")
        if path == "/to-js":
            return web.Response(status=302, headers={"Location": "javascript:alert(1)"})
        if path == "/loop":
            raise web.HTTPFound("/loop")
        if path == "/no-head":
            if request.method == "HEAD":
                raise web.HTTPMethodNotAllowed("HEAD", ["GET"])
            return web.Response(text="only GET")
        if path == "/slow":
            await asyncio.sleep(LINK_TIMEOUT * 10)
            return web.Response(text="too late")
        raise web.HTTPNotFound()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    site = Site()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", site.record)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[0][1]
    site.base = f"http://127.0.0.1:{port}"
    yield site
    await runner.cleanup()


def email_linking(site: Site) -> EmailMessage:
    base = site.base
    html = f"""<html><body>
<a href="{base}/ok">fine</a> <a href="{base}/missing">gone</a>
<a href="{base}/moved">moved</a> <a href="{base}/to-ftp">ftp</a> <a href="{base}/to-js">js</a>
<a href="{base}/loop">loop</a> <a href="{base}/no-head">get only</a>
<a href="{base}/slow">slow</a> <a href="{base}/ok">fine again</a>
<a href="mailto:someone@example.com">mail</a> <a href="tel:+100">call</a>
<a href="javascript:alert(2)">script</a> <a href="ftp://127.0.0.1/x">ftp link</a>
<img src="{base}/img/logo.png" srcset="{base}/img/logo-2x.png 2x, {base}/img/logo.png 1x">
<div style="background: url('{base}/img/bg.png')">x</div>
</body></html>"""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.org", "links"
    message.set_content(f"Also here: {base}/ok and {base}/text-only.\n")
    message.add_alternative(html, subtype="html")
    return message


@pytest.fixture
def server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    return mailpipe_factory({"checks": {"links": {"timeout": f"{LINK_TIMEOUT}s",
                                                   "max_redirects": 3}}})


async def send(server: MailpipeServer, message: EmailMessage) -> str:
    def deliver() -> str:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
            smtp.send_message(message)
        return str(server.wait_for_messages(1)[0]["uuid"])

    return await asyncio.to_thread(deliver)


async def link_check(server: MailpipeServer, uuid: str, query: str = "",
                     headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, body, _ = await asyncio.to_thread(
        server.request, "GET", f"/api/v1/messages/{uuid}/link-check{query}", headers)
    return status, json.loads(body)


async def test_link_statuses(server: MailpipeServer, site: Site) -> None:
    uuid = await send(server, email_linking(site))
    status, result = await link_check(server, uuid)
    assert status == 200
    links = {link["URL"].removeprefix(site.base): link for link in result["Links"]}
    # Every http(s) URL once, HTML links first, then what the HTML loads, then the text's.
    assert [link["URL"].removeprefix(site.base) for link in result["Links"]] == [
        "/ok", "/missing", "/moved", "/to-ftp", "/to-js", "/loop", "/no-head", "/slow",
        "/img/logo.png", "/img/logo-2x.png", "/img/bg.png", "/text-only",
    ]
    assert all(set(link) == {"URL", "StatusCode", "Status"} for link in result["Links"])
    openapi_check(server, result, "LinkCheck")
    assert links["/ok"] == {"URL": f"{site.base}/ok", "StatusCode": 200, "Status": "OK"}
    assert links["/missing"]["StatusCode"] == 404
    assert links["/missing"]["Status"] == "Not Found"
    # Not followed unless asked: the redirect itself is the answer.
    assert links["/moved"]["StatusCode"] == 301
    assert links["/to-ftp"]["StatusCode"] == 302
    assert links["/no-head"]["StatusCode"] == 200
    assert links["/slow"]["StatusCode"] == 0
    assert links["/slow"]["Status"] == f"timed out after {LINK_TIMEOUT} s"
    assert links["/img/bg.png"]["StatusCode"] == 200
    assert result["Errors"] == 2  # /missing, /slow
    # HEAD first; GET only where HEAD was refused; mailto:, tel:, javascript:, ftp: never.
    assert ("HEAD", "/no-head") in site.seen and ("GET", "/no-head") in site.seen
    assert ("GET", "/ok") not in site.seen
    assert sum(1 for seen in site.seen if seen == ("HEAD", "/ok")) == 1


async def test_follow_redirects_only_to_http(server: MailpipeServer, site: Site) -> None:
    uuid = await send(server, email_linking(site))
    status, result = await link_check(server, uuid, "?follow=true")
    assert status == 200
    links = {link["URL"].removeprefix(site.base): link for link in result["Links"]}
    assert links["/moved"]["StatusCode"] == 200  # 301 -> /ok
    assert links["/to-ftp"]["StatusCode"] == 302
    assert "redirect to a ftp: URL not followed" in links["/to-ftp"]["Status"]
    assert links["/to-js"]["StatusCode"] == 302
    assert "redirect to a javascript: URL not followed" in links["/to-js"]["Status"]
    assert links["/loop"] == {"URL": f"{site.base}/loop", "StatusCode": 0,
                              "Status": "too many redirects (more than 3)"}
    assert site.seen.count(("HEAD", "/loop")) == 4  # the first request and 3 redirects
    assert result["Errors"] == 3  # /missing, /loop, /slow


async def test_refusals(server: MailpipeServer, site: Site) -> None:
    uuid = await send(server, email_linking(site))
    status, body = await link_check(server, uuid, "?follow=maybe")
    assert status == 400 and body == {"error": "follow must be true or false"}
    status, body = await link_check(server, "no-such-uuid")
    assert status == 404
    # A page elsewhere may not make mailpipe send requests, even with a GET.
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"},
                    {"Referer": "http://localhost:3000/page"}):
        status, body = await link_check(server, uuid, headers=headers)
        assert status == 403, headers
        assert "refused" in body["error"]
    own = {"Origin": f"http://127.0.0.1:{server.http_port}", "Sec-Fetch-Site": "same-origin"}
    status, body = await link_check(server, uuid, headers=own)
    assert status == 200
    assert site.seen.count(("HEAD", "/ok")) == 1  # only the page's own check reached it


async def test_many_links_are_bounded(mailpipe_factory: Callable[..., MailpipeServer],
                                      site: Site) -> None:
    server = mailpipe_factory({"checks": {"links": {"max_links": 5, "concurrency": 2}}})
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.org", "many"
    message.set_content("\n".join(f"{site.base}/img/{n}.png" for n in range(12)))
    uuid = await send(server, message)
    status, result = await link_check(server, uuid)
    assert status == 200
    assert [link["StatusCode"] for link in result["Links"]] == [200] * 5 + [0] * 7
    assert result["Links"][-1]["Status"] == "not checked: more than 5 links"
    assert len(site.seen) == 5
