"""The web inbox in a real browser: Debian's chromium driven by Playwright, against a real
`mailpipe serve` fed over real SMTP. Also takes the README's screenshots: into
build/screenshots/, or the folder MAILPIPE_SCREENSHOTS names (`make screenshots` renews
docs/screenshots/inbox-*.png), so a test run leaves the checkout as it was."""

from __future__ import annotations

import os
import re
import smtplib
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture says so (a skip, or a failure under CI)
    expect = None

from conftest import ROOT, MailpipeServer, missing, wait_until_ready

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, never one Playwright downloads; nothing that would reach the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATIC = ROOT / "src" / "mailpipe" / "web" / "static"
SCREENSHOTS = Path(os.environ.get("MAILPIPE_SCREENSHOTS") or ROOT / "build" / "screenshots")


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG of one colour: an image the browser must decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


LOGO = png(40, 40, (37, 99, 235))
PHOTO = png(120, 80, (234, 88, 12))
WAIT_MS = 10_000

# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (make test installs it)")
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (make test installs Debian's chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    return mailpipe_factory({"smtp": {"transcript": True}})


@pytest.fixture
def full_server(mailpipe_factory: Callable[..., MailpipeServer]) -> MailpipeServer:
    """One with something in every panel: a transcript, a job sink's outcome, plugin tags."""
    return mailpipe_factory(
        {
            "smtp": {"transcript": True, "jobs": {"pipeline": "emails"}},
            "jobs": {"pipelines": {"emails": {"driver": "sqlite"}}},
            "plugins": {
                "plugins": ["header_stamp"],
                "plugin_config": {"header_stamp": {"tags": ["signup-flow", "ci"]}},
            },
        }
    )


class Page:
    """A browser tab on the inbox, failing the test on any script error of the page."""

    def __init__(self, context: Any, base: str) -> None:
        self.context = context
        self.base = base
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.set_default_timeout(WAIT_MS)

    def open(self, path: str = "") -> Any:
        self.page.goto(self.base + path)
        # The event stream connected: from here on, nothing is missed.
        self.page.wait_for_selector("#live.on")
        return self.page

    def rows(self) -> Any:
        return self.page.locator("#list .row")

    def row(self, subject: str) -> Any:
        return self.rows().filter(has=self.page.locator(".subject", has_text=subject))

    def open_email(self, subject: str) -> Any:
        self.row(subject).click()
        self.page.wait_for_selector(".email-subject")
        return self.page

    def wait_rows(self, count: int) -> None:
        self.page.wait_for_function(
            "(n) => document.querySelectorAll('#list .row').length === n", arg=count
        )

    def wait_title(self, title: str) -> None:
        # Functions, not strings: Playwright evals a string, which the page's CSP refuses.
        self.page.wait_for_function("(t) => document.title === t", arg=title)

    def tab(self, name: str) -> Any:
        self.page.click(f".tabs button[data-tab={name}]")
        return self.page.locator(".tab-body")


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Page]]:
    contexts: list[Any] = []
    pages: list[Page] = []

    def make(server: MailpipeServer, base: str = "/", **context_args: Any) -> Page:
        context = browser.new_context(
            viewport={"width": 1280, "height": 800}, accept_downloads=True, **context_args
        )
        contexts.append(context)
        page = Page(context, server.api + base)
        pages.append(page)
        return page

    yield make
    for context in contexts:
        context.close()
    for page in pages:
        assert not page.errors, f"script errors in the page: {page.errors}"


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def answers(server: MailpipeServer, path: str) -> bool:
    try:
        return server.request("GET", path)[0] == 200
    except OSError:  # not listening yet
        return False


def send(
    server: MailpipeServer, message: EmailMessage, auth: tuple[str, str] | None = None
) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        if auth:
            smtp.login(*auth)
        smtp.send_message(message)


def email(
    subject: str,
    *,
    to: str = "alice@example.org",
    sender: str = "App <app@example.com>",
    text: str = "Plain body",
    html: str | None = None,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def order_email() -> tuple[EmailMessage, dict[str, bytes]]:
    """HTML with a cid: image, a text part, a PDF and a PNG attachment."""
    message = email(
        "Your order #1234 has shipped",
        to="alice@example.org, bob@example.org",
        sender="Shop <shop@example.com>",
        text="Hello Alice,\nyour order has shipped.\nTracking code: 482913\n",
        html=(
            '<html><body><h1 id="greeting">Order shipped</h1>'
            '<p>Hi <b>Alice</b>, <a href="https://example.com/track">track it</a>.</p>'
            '<img id="logo" src="cid:logo@shop" alt="logo"></body></html>'
        ),
    )
    message.get_payload()[1].add_related(LOGO, "image", "png", cid="<logo@shop>")
    files = {
        "invoice.pdf": b"%PDF-1.4\n% not a real invoice\n" + bytes(range(256)),
        "photo.png": PHOTO,
    }
    message.add_attachment(
        files["invoice.pdf"], maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    message.add_attachment(PHOTO, maintype="image", subtype="png", filename="photo.png")
    return message, files


# ---- the page ------------------------------------------------------------------------------


def test_email_appears_live_and_shows_everything(
    full_server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    server = full_server
    tab = open_page(server)
    page = tab.open()
    assert tab.rows().count() == 0
    page.evaluate("window.notReloaded = true")  # gone if the page reloads

    message, files = order_email()
    send(server, message, auth=("alice", "s3cret"))
    tab.row("Your order #1234 has shipped").wait_for()
    assert page.evaluate("window.notReloaded") is True
    tab.wait_title("(1) mailpipe")
    row = tab.row("Your order #1234 has shipped")
    assert "Shop <shop@example.com>" in row.inner_text()
    assert row.locator(".clip").count() == 1

    tab.open_email("Your order #1234 has shipped")
    tab.wait_title("mailpipe")  # opened = read

    # HTML: rendered in the sandboxed frame, the cid: image resolved to the attachment.
    frame = page.frame_locator(".html-frame")
    assert frame.locator("#greeting").inner_text() == "Order shipped"
    logo = frame.locator("#logo")
    assert logo.get_attribute("src") == "attachments/0"  # cid: rewritten by the server
    assert logo.evaluate("(img) => img.complete && img.naturalWidth") == 40
    sandbox = page.locator(".html-frame").get_attribute("sandbox")
    assert sandbox == "allow-popups allow-popups-to-escape-sandbox"

    assert "your order has shipped" in tab.tab("Text").inner_text()

    headers = tab.tab("Headers").locator("tr th").all_inner_texts()
    sent_order = [name for name, _ in message.items()]
    stamped = [name for name in headers if name.startswith("X-Mailpipe-")]  # header_stamp's
    assert len(stamped) == 3
    assert [name for name in headers if name not in stamped] == sent_order

    raw = tab.tab("Raw").locator("pre.raw")
    page.wait_for_function("() => !document.querySelector('pre.raw').textContent.endsWith('…')")
    uuid = page.locator("article.email").get_attribute("data-uuid")
    _, raw_bytes, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert raw.text_content() == raw_bytes.decode()

    envelope = tab.tab("Envelope").inner_text()
    assert "alice@example.org" in envelope and "bob@example.org" in envelope
    assert "PLAIN" in envelope and "alice" in envelope and "s3cret" in envelope
    assert "mail from:<shop@example.com>" in tab.tab("Transcript").inner_text().lower()
    outcomes = tab.tab("Outcomes")
    assert "job" in outcomes.inner_text() and '"driver": "sqlite"' in outcomes.inner_text()
    assert page.locator(".email-head .tag").all_inner_texts() == ["signup-flow", "ci"]

    # Attachments: each downloads byte for byte; the image one is previewed.
    for name, data in files.items():
        with page.expect_download() as download:
            page.locator(".attachment-link", has_text=name).click()
        assert Path(download.value.path()).read_bytes() == data
        assert download.value.suggested_filename == name
    preview = page.locator(".attachment", has_text="photo.png").locator("img")
    preview.wait_for()
    decoded = "(img) => img.complete && img.naturalWidth === 120"
    page.wait_for_function(decoded, arg=preview.element_handle())


def test_hostile_html_runs_nothing_and_markup_shows_as_text(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    tab = open_page(server)
    page = tab.open()
    title = page.title()
    attempts: list[str] = []
    # Any request for "pwned" is a script (or markup) that ran: recorded, then refused.
    tab.context.route(
        re.compile(r".*pwned.*"), lambda route: (attempts.append(route.request.url), route.abort())
    )
    popups: list[Any] = []
    tab.context.on("page", lambda popup: popups.append(popup))

    subject = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b>"
    filename = "<img src=x onerror=alert(1)>.txt"
    hostile = email(
        subject,
        html=(
            "<p id=marker>hostile body</p>"
            "<script>window.top.pwned = 1; top.document.title = 'pwned';"
            " fetch('/pwned?script'); top.location = '/pwned?navigate';</script>"
            "<img src=x onerror=\"window.top.pwned = 2; new Image().src = '/pwned?onerror'\">"
            "<a id=js href=\"javascript:window.top.pwned = 3; fetch('/pwned?link')\">click me</a>"
            '<iframe src="javascript:top.pwned = 4"></iframe>'
            "<form action=/pwned?form><button id=submit>go</button></form>"
            '<svg onload="top.pwned = 5"></svg>'
        ),
    )
    hostile.add_attachment(b"plain text", maintype="text", subtype="plain", filename=filename)
    send(server, hostile)

    # The subject is shown as it was written, not as markup.
    subject_cell = tab.rows().first.locator(".subject")
    subject_cell.wait_for()
    assert subject_cell.inner_text() == subject
    assert tab.rows().first.locator("img, b").count() == 0

    tab.rows().first.click()
    page.wait_for_selector(".email-subject")
    assert page.locator(".email-subject").inner_text() == subject
    assert page.locator(".attachment-link").inner_text() == filename
    assert page.locator(".email img:not(.attachment img), .email b").count() == 0

    frame = page.frame_locator(".html-frame")
    assert frame.locator("#marker").inner_text() == "hostile body"  # it did render
    frame.locator("#js").click()
    frame.locator("#submit").click()
    page.wait_for_timeout(500)
    assert page.evaluate("window.pwned") is None
    assert page.title() in (title, "mailpipe")
    assert page.url.split("#")[0] == tab.base
    assert attempts == []
    for popup in popups:  # a link opens (if at all) in a new, unprivileged tab
        assert not popup.url.startswith(tab.base)


def test_search_narrows_the_list(server: MailpipeServer, open_page: Callable[..., Page]) -> None:
    send(server, email("Invoice March", to="bob@example.org", text="total 42 EUR"))
    send(server, email("Welcome aboard", to="carol@example.org"))
    with_file = email("Report attached", to="bob@example.org")
    with_file.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="r.csv")
    send(server, with_file)
    tab = open_page(server)
    page = tab.open()
    tab.wait_rows(3)

    def search(query: str) -> list[str]:
        page.keyboard.press("Escape")
        page.keyboard.press("/")  # the shortcut focuses the search box
        page.fill("#search", query)
        page.wait_for_function(
            "(q) => document.getElementById('list').dataset.query === q", arg=query
        )
        return sorted(tab.rows().locator(".subject").all_inner_texts())

    assert search("invoice") == ["Invoice March"]
    assert search("to:bob") == ["Invoice March", "Report attached"]
    assert search("has:attachment") == ["Report attached"]
    assert search('"welcome aboard"') == ["Welcome aboard"]
    assert search("subject:nothing-like-this") == []
    assert page.locator("#empty").is_visible()
    assert search("") == ["Invoice March", "Report attached", "Welcome aboard"]


def test_delete_one_all_and_from_elsewhere(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    for subject in ("first", "second", "third", "fourth"):
        send(server, email(subject))
    tab = open_page(server)
    page = tab.open()
    tab.wait_rows(4)

    # Keyboard: j moves down, Enter opens, Delete deletes the open email.
    page.locator("#list").focus()
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("Enter")
    page.wait_for_selector(".email-subject")
    assert page.locator(".email-subject").inner_text() == "third"
    page.keyboard.press("Delete")
    tab.wait_rows(3)
    assert page.locator("#detail").is_hidden()
    assert server.get_json("/api/v1/messages")["total"] == 3

    # The row's button.
    tab.row("fourth").hover()
    tab.row("fourth").locator(".row-delete").click()
    tab.wait_rows(2)

    # Deleted through the API by someone else: the page follows live.
    uuid = tab.row("first").get_attribute("data-uuid")
    status, _, _ = server.request("DELETE", f"/api/v1/messages/{uuid}")
    assert status == 204
    tab.wait_rows(1)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-all")
    page.wait_for_selector("#empty:not([hidden])")
    assert server.get_json("/api/v1/messages")["total"] == 0


def test_paging_and_keys_across_pages(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        for i in range(53):  # one connection: 53 emails in well under a second
            smtp.send_message(email(f"bulk {i:02d}"))
    tab = open_page(server)
    page = tab.open()
    tab.wait_rows(50)
    assert tab.rows().first.locator(".subject").inner_text() == "bulk 52"  # newest first
    assert page.locator("#page-info").inner_text() == "1\u201350 of 53"
    page.click("#next")
    tab.wait_rows(3)
    assert page.locator("#page-info").inner_text() == "51\u201353 of 53"
    assert page.locator("#next").is_disabled()
    # k on the first row of page 2 goes back to the last row of page 1.
    page.locator("#list").focus()
    page.keyboard.press("j")
    page.keyboard.press("k")
    page.keyboard.press("k")
    tab.wait_rows(50)
    expect(page.locator("#list .row.selected .subject")).to_have_text("bulk 03")
    page.keyboard.press("Enter")
    expect(page.locator(".email-subject")).to_have_text("bulk 03")
    page.keyboard.press("j")  # an open email follows the selection, across the page end
    expect(page.locator(".email-subject")).to_have_text("bulk 02")


def test_a_burst_costs_few_list_requests(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    tab = open_page(server)
    page = tab.open()
    lists: list[str] = []
    page.on("request", lambda r: "/api/v1/messages?" in r.url and lists.append(r.url))
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        for i in range(300):
            smtp.send_message(email(f"burst {i:03d}"))
    expect(page.locator("#page-info")).to_have_text("1\u201350 of 300")
    tab.wait_title("(300) mailpipe")
    assert tab.rows().first.locator(".subject").inner_text() == "burst 299"
    # One at once, then at most one per 100 ms while the burst lasts (about a second).
    assert len(lists) < 40, f"{len(lists)} list requests for 300 emails"


def test_unread_count_in_title_and_mark_read(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    tab = open_page(server)
    page = tab.open()
    for subject in ("one", "two", "three"):
        send(server, email(subject))
    tab.wait_title("(3) mailpipe")
    assert page.locator("#list .row.unread").count() == 3
    tab.open_email("two")
    tab.wait_title("(2) mailpipe")
    page.click(".toggle-read")  # back to unread
    tab.wait_title("(3) mailpipe")
    page.click("#mark-all")
    tab.wait_title("mailpipe")
    assert page.locator("#list .row.unread").count() == 0


def test_basic_auth(
    mailpipe_factory: Callable[..., MailpipeServer], open_page: Callable[..., Page]
) -> None:
    """Basic: everything (the page included) behind the browser's own prompt, here the
    credentials it would have typed in."""
    server = mailpipe_factory(
        {"http": {"auth": {"type": "basic", "username": "dev", "password": "pa:ss w0rd"}}}
    )
    refused = open_page(server)
    assert refused.context.request.get(refused.base).status == 401
    assert refused.context.request.get(refused.base + "ui/app.js").status == 401

    tab = open_page(server, http_credentials={"username": "dev", "password": "pa:ss w0rd"})
    page = tab.open()  # the page, its scripts and the event stream all authenticated
    assert page.locator("#signin").is_hidden() and page.locator("#sign-out").is_hidden()
    message, files = order_email()
    send(server, message)
    tab.open_email("Your order #1234 has shipped")  # arrived live
    expect(page.frame_locator(".html-frame").locator("#logo")).to_have_js_property(
        "naturalWidth", 40
    )
    preview = page.locator(".attachment", has_text="photo.png").locator("img")
    expect(preview).to_have_js_property("naturalWidth", 120)
    with page.expect_download() as download:
        page.locator(".attachment-link", has_text="photo.png").click()
    assert Path(download.value.path()).read_bytes() == files["photo.png"]
    tab.wait_title("mailpipe")  # the PATCH went through too


PAGE_TOKEN = 't0ken-%&"s'


@pytest.mark.parametrize("base", ["", "/mail"])
def test_bearer_auth_signs_in_with_the_token(
    base: str, mailpipe_factory: Callable[..., MailpipeServer], open_page: Callable[..., Page]
) -> None:
    """Bearer: a browser cannot prompt for it, so the page asks and trades the token for a
    session cookie, which every request after carries (fetches, the event stream, the
    sandboxed frame's cid: image, the preview, the download)."""
    config: dict[str, Any] = {"auth": {"type": "bearer", "token": PAGE_TOKEN}}
    if base:
        config["base_path"] = base
    server = mailpipe_factory({"http": config}, wait=False)
    wait_until(lambda: answers(server, base + "/healthz"))
    send(server, email("Sent before signing in", text="Waiting"))
    tab = open_page(server, base=base + "/")
    page = tab.page
    page.goto(tab.base)
    form = page.locator("#signin")
    expect(form).to_be_visible()  # the page's files load without the token
    assert page.locator("#token").get_attribute("type") == "password"
    assert page.locator(".panes").is_hidden() and tab.rows().count() == 0
    assert page.locator("#error").is_hidden()  # no "401" banner: the form is the answer

    page.fill("#token", "wrong")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_have_text("Wrong token.")
    assert not page.context.cookies()

    page.fill("#token", PAGE_TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector("#live.on")  # signed in: the list loaded, the stream is live
    assert form.is_hidden()
    expect(page.locator("#sign-out")).to_be_visible()
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "mailpipe_session" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict" and cookie["path"] == base + "/"
    assert "t0ken" not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script of the page sees it
    tab.row("Sent before signing in").wait_for()

    message, files = order_email()
    send(server, message)
    tab.open_email("Your order #1234 has shipped")  # arrived live
    frame = page.frame_locator(".html-frame")
    assert frame.locator("#greeting").inner_text() == "Order shipped"
    logo = frame.locator("#logo")
    expect(logo).to_have_js_property("naturalWidth", 40)
    preview = page.locator(".attachment", has_text="photo.png").locator("img")
    expect(preview).to_have_js_property("naturalWidth", 120)
    for name, data in files.items():
        with page.expect_download() as download:
            page.locator(".attachment-link", has_text=name).click()
        assert Path(download.value.path()).read_bytes() == data
    tab.wait_title("(1) mailpipe")  # the PATCH went through too: one unread left

    page.click("#sign-out")
    expect(form).to_be_visible()
    assert page.locator("#detail").is_hidden() and tab.rows().count() == 0
    assert not page.context.cookies()
    assert page.context.request.get(f"{server.api}{base}/api/v1/messages").status == 401
    page.reload()
    expect(form).to_be_visible()  # signed out for good
    page.fill("#token", PAGE_TOKEN)
    page.press("#token", "Enter")
    tab.row("Sent before signing in").wait_for()


def test_a_restart_signs_the_page_out(
    mailpipe_factory: Callable[..., MailpipeServer], open_page: Callable[..., Page]
) -> None:
    """The cookie is signed with a key drawn at startup: after a restart the open page's
    event stream is refused, and the page asks for the token again."""
    server = mailpipe_factory({"http": {"auth": {"type": "bearer", "token": PAGE_TOKEN}}})
    tab = open_page(server)
    page = tab.page
    page.goto(tab.base)
    page.fill("#token", PAGE_TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector("#live.on")
    server.stop()
    # The same config, so the same ports: the page's address still works.
    process = subprocess.Popen(
        [sys.executable, "-m", "mailpipe", "serve"],
        cwd=server.workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(server.workdir / "restarted.log", "wb"),  # noqa: SIM115
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")},
    )
    restarted = MailpipeServer(
        server.workdir, server.smtp_port, server.http_port, process,
        server.workdir / "restarted.log",
    )
    try:
        wait_until_ready(restarted)
        expect(page.locator("#signin")).to_be_visible(timeout=20_000)
        assert tab.rows().count() == 0 and page.locator("#sign-out").is_hidden()
        page.fill("#token", PAGE_TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#live.on")
    finally:
        restarted.stop()


def test_phone_width(server: MailpipeServer, open_page: Callable[..., Page]) -> None:
    send(server, email("Small screen", text="Readable on a phone"))
    tab = open_page(server)
    page = tab.page
    page.set_viewport_size({"width": 390, "height": 780})
    tab.open()
    tab.open_email("Small screen")
    assert page.locator(".list-pane").is_hidden()  # one pane at a time
    assert "Readable on a phone" in tab.tab("Text").inner_text()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the page scrolls sideways on a phone"
    page.click(".back")
    assert page.locator(".list-pane").is_visible()


def test_under_a_base_path(
    mailpipe_factory: Callable[..., MailpipeServer], open_page: Callable[..., Page]
) -> None:
    """Behind a proxy at /mail: the page's relative URLs reach the API, stream and files."""
    server = mailpipe_factory({"http": {"base_path": "/mail"}}, wait=False)
    wait_until(lambda: answers(server, "/mail/healthz"))
    tab = open_page(server, base="/mail")  # redirected to /mail/
    page = tab.open()
    assert page.url == server.api + "/mail/"
    message, files = order_email()
    send(server, message)
    tab.open_email("Your order #1234 has shipped")
    frame = page.frame_locator(".html-frame")
    assert frame.locator("#logo").evaluate("(img) => img.complete && img.naturalWidth") == 40
    with page.expect_download() as download:
        page.locator(".attachment-link", has_text="invoice.pdf").click()
    assert Path(download.value.path()).read_bytes() == files["invoice.pdf"]
    page.keyboard.press("Backspace")  # a Mac's delete key deletes too
    tab.wait_rows(0)


def test_remote_images_blocked_until_asked(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    fetched: list[str] = []
    tab = open_page(server)
    # The "remote" host answers from the test: the browser never leaves this machine.
    tab.context.route(
        "http://images.remote.test/**",
        lambda route: (
            fetched.append(route.request.url),
            route.fulfill(status=200, content_type="image/png", body=PHOTO),
        ),
    )
    page = tab.open()
    send(
        server,
        email(
            "Newsletter",
            html=(
                "<p>News</p>"
                '<img id="remote" src="http://images.remote.test/banner.png" alt="banner">'
            ),
        ),
    )
    tab.open_email("Newsletter")
    notice = page.locator(".remote-notice")
    notice.wait_for()
    assert "1 remote resource blocked" in notice.inner_text()
    page.frame_locator(".html-frame").locator("text=News").wait_for()
    assert fetched == []
    page.click(".show-remote")
    remote = page.frame_locator(".html-frame").locator("#remote")
    expect(remote).to_have_js_property("naturalWidth", 120)  # polls across the reload
    assert fetched == ["http://images.remote.test/banner.png"]


def test_a_link_to_an_email_opens_it(
    server: MailpipeServer, open_page: Callable[..., Page]
) -> None:
    send(server, email("Shared link", text="Opened from its address"))
    (summary,) = server.wait_for_messages(1)
    tab = open_page(server)
    page = tab.open(f"#{summary['uuid']}")
    expect(page.locator(".email-subject")).to_have_text("Shared link")
    tab.wait_title("mailpipe")  # opened, so read
    page.keyboard.press("Escape")
    assert page.locator("#detail").is_hidden() and "#" not in page.url


def test_screenshots(full_server: MailpipeServer, open_page: Callable[..., Page]) -> None:
    """The README's pictures, from a realistic inbox."""
    server = full_server
    send(
        server,
        email(
            "Welcome to Acme, Alice!",
            sender="Acme <hello@acme.test>",
            text="Thanks for signing up.",
            html="<h1>Welcome!</h1><p>Thanks.</p>",
        ),
    )
    send(
        server,
        email(
            "Reset your password",
            sender="Acme <security@acme.test>",
            to="bob@example.org",
            text="Your code: 731942",
        ),
    )
    send(
        server,
        email(
            "Weekly report",
            sender="Reports <reports@acme.test>",
            to="team@example.org, carol@example.org",
            text="All green this week.",
        ),
    )
    message, _ = order_email()
    send(server, message, auth=("shop", "s3cret"))
    tab = open_page(server)
    page = tab.open()
    tab.wait_rows(4)
    tab.open_email("Welcome to Acme")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.keyboard.press("Escape")
    page.locator("#list").focus()
    page.screenshot(path=SCREENSHOTS / "inbox-list.png")
    tab.open_email("Your order #1234 has shipped")
    page.frame_locator(".html-frame").locator("#greeting").wait_for()
    page.locator(".attachment img").first.wait_for()
    time.sleep(0.3)  # images decoded and painted
    page.screenshot(path=SCREENSHOTS / "inbox-detail.png")


# ---- what the server sends with the page ---------------------------------------------------


def test_page_headers_and_files(server: MailpipeServer) -> None:
    status, body, headers = server.request("GET", "/")
    assert status == 200 and body.startswith(b"<!doctype html>")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    for name in ("app.js", "api.js", "dom.js", "list.js", "detail.js", "app.css"):
        status, _, got = server.request("GET", f"/ui/{name}")
        assert status == 200, name
        assert got["Content-Security-Policy"] == csp
        again, _, _ = server.request("GET", f"/ui/{name}", {"If-None-Match": got["ETag"]})
        assert again == 304
    for bad in ("/ui/nope.js", "/ui/..%2f..%2fapp.py", "/ui/%2e%2e/app.py", "/ui/"):
        assert server.request("GET", bad)[0] == 404, bad


def test_no_captured_text_reaches_markup_sinks() -> None:
    """The page builds its DOM with text nodes only; these would interpret a string."""
    sinks = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|srcdoc|eval\(|new Function"
    )
    for path in STATIC.glob("*.js"):
        found = [line for line in path.read_text().splitlines() if sinks.search(line)]
        assert not found, f"{path.name}: {found}"
