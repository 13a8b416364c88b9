"""The content checks in the page (issue 15), in a real browser (Debian's chromium through
Playwright, test_web_ui.py's fixtures) against a real `mailpipe serve` fed over real SMTP:
the HTML preview's width buttons, the Checks tab's HTML compatibility by client family and
by feature with its lines, and the on-demand link check against a local web server.
Also takes docs/screenshots/inbox-checks.png (under `make screenshots`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import test_web_ui
from conftest import MailpipeServer
from test_checks_html import NEWSLETTER
from test_web_ui import SCREENSHOTS, email, send

browser = test_web_ui.browser
open_page = test_web_ui.open_page


@pytest.fixture
def site() -> Iterator[tuple[str, list[str]]]:
    """/ok answers 200, anything else 404; every request is noted."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            seen.append(f"HEAD {self.path}")
            self.send_response(200 if self.path == "/ok" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_checks_in_the_page_screenshots(mailpipe_factory: Callable[..., MailpipeServer],
                            open_page: Callable[..., Any],
                            site: tuple[str, list[str]]) -> None:
    base, seen = site
    server = mailpipe_factory()
    # Every URL at the local server: nothing leaves this machine.
    html = NEWSLETTER.replace("https://cdn.example.com", base).replace(
        "<p>Hello</p>", f'<p>Hello <a href="{base}/ok">ok</a> <a href="{base}/gone">gone</a></p>')
    send(server, email("Spring newsletter", html=html))
    tab = open_page(server)
    page = tab.open()
    tab.open_email("Spring newsletter")

    # The preview at a phone's width, and its screenshot's link at that width.
    tab.tab("HTML")
    page.click(".preview-widths button[data-width='375']")
    frame = page.locator(".html-frame")
    page.wait_for_function(
        "() => document.querySelector('.html-frame').getBoundingClientRect().width === 375")
    assert frame.bounding_box()["width"] == 375
    assert page.get_attribute(".preview-widths .screenshot", "href").endswith(
        "screenshot.png?width=375")
    page.click(".preview-widths button[data-width='null']")
    page.wait_for_function(
        "() => document.querySelector('.html-frame').getBoundingClientRect().width > 375")

    # Compatibility by client family and by feature, with lines.
    body = tab.tab("Checks")
    body.locator(".families tbody tr").first.wait_for()
    families = body.locator(".families tbody tr")
    assert families.count() >= 10
    assert body.locator(".families tr[data-family=outlook] th").inner_text() == "Outlook"
    flex = body.locator(".feature[data-slug=css-display-flex]")
    assert "line 6" in flex.locator("summary").inner_text()
    flex.locator("summary").click()
    assert "Outlook Windows" in flex.locator(".clients").inner_text()
    assert "lines 15, 19" in body.locator(".feature[data-slug=html-img] summary").inner_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".checks h3").first.scroll_into_view_if_needed()
    page.screenshot(path=SCREENSHOTS / "inbox-checks.png")

    # Links only when asked.
    assert seen == []
    body.locator("button.check-links").click()
    body.locator(".links tbody tr").first.wait_for()
    rows = {row.locator(".url").inner_text(): row for row in body.locator(".links tbody tr").all()}
    assert rows[f"{base}/ok"].locator(".status-code").inner_text() == "200"
    assert rows[f"{base}/gone"].get_attribute("class") == "bad"
    assert rows[f"{base}/gone"].locator(".status-code").inner_text() == "404"
    assert "error" in body.locator(".link-summary").inner_text()
    assert sorted(seen) == ["HEAD /gone", "HEAD /logo.webp", "HEAD /ok", "HEAD /pixel.gif"]
