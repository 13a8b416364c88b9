"""Screenshots (issue 15): an HTML email sent over real SMTP, rendered by Debian's chromium
through Playwright at GET /api/v1/messages/{uuid}/screenshot.png; the PNG is decoded and
looked at (size, colours, the email's own cid: image), the remote resources it names are
never requested, and without a browser the route says so with a 503."""

from __future__ import annotations

import io
import json
import smtplib
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import MailpipeServer, missing
from test_web_ui import png

CHROMIUM = Path("/usr/bin/chromium")
RED, BLUE = (220, 20, 60), (37, 99, 235)


@pytest.fixture
def tracker() -> Iterator[tuple[str, list[str]]]:
    """A web server the email's remote images point at: nothing may reach it."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def send_newsletter(server: MailpipeServer, remote: str) -> str:
    html = f"""<!DOCTYPE html><html><body style="margin:0; background:#ffffff">
<div style="background-color: rgb{RED}; height: 120px; width: 100%">Sale</div>
<img src="cid:logo@example" width="40" height="40" style="display:block">
<img src="{remote}/pixel.png" width="10" height="10">
<div style="background-image: url('{remote}/bg.png'); height: 30px">x</div>
<link rel="stylesheet" href="{remote}/style.css">
<p style="height: 2000px">A long email.</p>
</body></html>"""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.org", "shot"
    message.set_content("see HTML")
    message.add_alternative(html, subtype="html")
    message.get_payload()[1].add_related(png(40, 40, BLUE), "image", "png", cid="<logo@example>")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    return str(server.wait_for_messages(1)[0]["uuid"])


def test_screenshot_at_phone_width(mailpipe_factory: Callable[..., MailpipeServer],
                                   tracker: tuple[str, list[str]]) -> None:
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (make test installs Debian's chromium)")
    remote, hits = tracker
    server = mailpipe_factory({"checks": {"screenshot": {"max_height": 1000}}})
    uuid = send_newsletter(server, remote)
    status, body, headers = server.request(
        "GET", f"/api/v1/messages/{uuid}/screenshot.png?width=375")
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "image/png"
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(body)).convert("RGB")
    # Phone width; the long email cut at max_height.
    assert image.size == (375, 1000)
    assert image.getpixel((200, 60)) == RED
    logo = [image.getpixel((x, y)) for x in range(0, 40, 5) for y in range(125, 160, 5)]
    assert logo.count(BLUE) > len(logo) // 2, "the cid: image is rendered"
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 2  # not blank
    assert hits == []  # no remote image, background or stylesheet was fetched

    # The default is a desktop width; a width out of bounds is refused.
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/screenshot.png")
    assert status == 200 and Image.open(io.BytesIO(body)).size[0] == 1024
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/screenshot.png?width=5")
    assert status == 400
    assert json.loads(body) == {"error": "width must be an integer between 200 and 2560"}
    assert hits == []


def test_without_chromium_503(mailpipe_factory: Callable[..., MailpipeServer],
                              tracker: tuple[str, list[str]]) -> None:
    server = mailpipe_factory(
        {"checks": {"screenshot": {"chromium": "/nonexistent/chromium"}}})
    uuid = send_newsletter(server, tracker[0])
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/screenshot.png")
    assert status == 503
    assert json.loads(body) == {
        "error": "checks.screenshot.chromium: /nonexistent/chromium not found"}


def test_refused_from_other_pages(mailpipe: MailpipeServer,
                                  tracker: tuple[str, list[str]]) -> None:
    uuid = send_newsletter(mailpipe, tracker[0])
    status, body, _ = mailpipe.request("GET", f"/api/v1/messages/{uuid}/screenshot.png",
                                       {"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "refused" in json.loads(body)["error"]
    status, body, _ = mailpipe.request("GET", "/api/v1/messages/nope/screenshot.png")
    assert status == 404
