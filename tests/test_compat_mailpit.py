"""Mailpit's REST API v1 (compat/mailpit.py) through the front door: a real `mailpipe serve`,
mail sent by real mailers (PHPMailer, smtplib), read by Mailpit's own clients unchanged (the
npm `mailpit-api`, PyPI's `mailpit-api-client`) and by plain HTTP, on the API's own listener
and under /compat/mailpit/ of the main one."""

from __future__ import annotations

import hashlib
import io
import json
import smtplib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import test_spam
from conftest import ROOT, MailpipeServer, free_port, missing, require_tool
from test_clients import PHPMAILER_AUTOLOAD, require_php_library, run_php
from test_spam import GTUBE

# A real spamd, the spam tests' fixture (pytest finds fixtures by name in the module).
spamd = test_spam.spamd

JS_DIR = ROOT / "tests" / "compat" / "mailpit-js"
EVIL = "http://evil.example"
Factory = Callable[..., MailpipeServer]


# ---- servers and clients --------------------------------------------------------------------


def start(factory: Factory, **mailpit: Any) -> tuple[MailpipeServer, str, str]:
    """A mailpipe serving Mailpit's API on its own port: (server, own base, prefixed base)."""
    port = free_port()
    config: dict[str, Any] = {"smtp": {"include_raw": True},
                              "compat": {"mailpit": {"addr": f"127.0.0.1:{port}", **mailpit}}}
    server = factory(config)
    wait_port(port)
    return server, f"http://127.0.0.1:{port}", f"{server.api}/compat/mailpit"


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def call(base: str, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    data = None
    sent = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(base + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(base: str, path: str) -> Any:
    status, body, headers = call(base, "GET", path)
    assert status == 200, (path, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def ok(base: str, method: str, path: str, body: Any = None) -> None:
    status, answer, headers = call(base, method, path, body)
    assert (status, answer) == (200, b"ok"), (path, status, answer[:300])
    assert headers["Content-Type"].startswith("text/plain")


def fails(base: str, method: str, path: str, body: Any = None, status: int = 400) -> str:
    """The plain-text error Mailpit answers."""
    got, answer, headers = call(base, method, path, body)
    assert got == status, (path, got, answer[:300])
    assert headers["Content-Type"].startswith("text/plain")
    return answer.decode()


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def smtp_send(server: MailpipeServer, message: EmailMessage,
              rcpt: list[str] | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.send_message(message, to_addrs=rcpt)


def rich_message(subject: str = "Invoice 42", image: bytes | None = None) -> EmailMessage:
    """Text, HTML with an inline image by cid, a PDF and an HTML attachment."""
    message = EmailMessage()
    message["From"] = "Shop Robot <robot@shop.test>"
    message["To"] = "Alice <alice@example.test>, bob@example.test"
    message["Cc"] = "Carol <carol@example.test>"
    message["Reply-To"] = "help@shop.test"
    message["Subject"] = subject
    message["Message-ID"] = "<inv-42@shop.test>"
    message["Date"] = "Tue, 01 Dec 2026 10:20:30 +0100"
    message["List-Unsubscribe"] = "<mailto:leave@shop.test>, <https://shop.test/leave>"
    message.set_content("Your invoice: https://shop.test/i/42\n")
    message.add_alternative('<p>Hello <img src="cid:logo@shop.test"> '
                            '<a href="https://shop.test/i/42">invoice</a></p>', subtype="html")
    message.get_payload()[1].add_related(image or png(400, 300), "image", "png",
                                         cid="<logo@shop.test>")
    message.add_attachment(b"%PDF-1.4 invoice", maintype="application", subtype="pdf",
                           filename="invoice 42.pdf")
    message.add_attachment(b"<script>alert(1)</script>", maintype="text", subtype="html",
                           filename="page.html")
    return message


def wait_total(base: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        found = get_json(base, "/api/v1/messages")
        if found["total"] >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# ---- the npm client, unchanged ------------------------------------------------------------


def mailpit_js() -> str:
    """node, with tests/compat/mailpit-js's pinned packages installed."""
    node = require_tool("node")
    npm = require_tool("npm")
    if not (JS_DIR / "node_modules" / "mailpit-api").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    return node


def run_js(script: str, request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([mailpit_js(), script, json.dumps(request)], cwd=JS_DIR,
                          capture_output=True, timeout=120)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output + done.stderr.decode(errors="replace")
    return json.loads(output)


@pytest.mark.parametrize("place", ["own listener", "prefix"])
def test_mailpit_api_npm_client_round_trip(mailpipe_factory: Factory, tmp_path: Path,
                                           place: str) -> None:
    """PHPMailer sends; mailpit-api finds the message, reads it and its attachments, deletes
    it."""
    require_php_library(PHPMAILER_AUTOLOAD)
    downstream = mailpipe_factory()
    server, own, prefixed = start(mailpipe_factory, chaos=True, relay={
        "host": "127.0.0.1", "port": downstream.smtp_port})
    report, picture = bytes(range(256)) * 40, png(300, 200)
    (tmp_path / "report.bin").write_bytes(report)
    (tmp_path / "chart.png").write_bytes(picture)
    subject = f"Quarterly report {place}"
    run_php("phpmailer_send.php", {
        "port": server.smtp_port, "helo": "phpmailer.test", "auth_type": "PLAIN",
        "user": "app", "password": "s3cret",
        "messages": [{
            "from": "reports@corp.test", "from_name": "Reports", "to": ["boss@corp.test"],
            "cc": ["cfo@corp.test"], "bcc": ["audit@corp.test"], "subject": subject,
            "text": "The numbers are attached.", "html": "<h1>The numbers ✓</h1>",
            "attachments": [
                {"path": str(tmp_path / "report.bin"), "name": "report.bin",
                 "content_type": "application/octet-stream"},
                {"path": str(tmp_path / "chart.png"), "name": "chart.png",
                 "content_type": "image/png"},
            ],
        }],
    })
    base = own if place == "own listener" else prefixed
    seen = run_js("roundtrip.mjs", {"base": base, "subject": subject,
                                    "releaseTo": "archive@corp.test"})

    message = seen["message"]
    assert message["From"] == {"Name": "Reports", "Address": "reports@corp.test"}
    assert message["To"] == [{"Name": "", "Address": "boss@corp.test"}]
    assert message["Cc"] == [{"Name": "", "Address": "cfo@corp.test"}]
    assert message["Bcc"] == [{"Name": "", "Address": "audit@corp.test"}]  # the envelope's
    assert message["Username"] == "app"
    assert message["Text"].strip() == "The numbers are attached."
    assert message["HTML"].strip() == "<h1>The numbers ✓</h1>"
    assert message["Mailpipe"]["authentication"]["password"] == "s3cret"
    assert seen["headers"]["Subject"] == [subject]
    assert seen["headers"]["From"] == ["Reports <reports@corp.test>"]
    assert f"Subject: {subject}" in seen["source"]
    by_name = {a["FileName"]: a for a in seen["attachments"]}
    assert by_name["report.bin"]["sha256"] == hashlib.sha256(report).hexdigest()
    assert by_name["report.bin"]["type"] == "application/octet-stream"
    assert by_name["chart.png"]["sha256"] == hashlib.sha256(picture).hexdigest()
    assert by_name["chart.png"]["type"] == "image/png"
    assert {a["thumbType"] for a in seen["attachments"]} == {"image/jpeg"}
    assert seen["html"].strip() == "<h1>The numbers ✓</h1>"
    assert seen["text"].strip() == "The numbers are attached."
    assert seen["latestID"] == message["ID"] and seen["searchIDs"] == [message["ID"]]
    assert seen["unreadAgain"] is True and seen["infoMessages"] == 1
    assert seen["webuiRelay"] is True
    assert seen["linkCheck"] == {"Errors": 0, "Links": []}
    assert "400" in seen["spamError"] and "not configured" in seen["spamError"]
    assert seen["chaos"]["Recipient"] == {"ErrorCode": 452, "Probability": 0}
    assert seen["chaosNow"] == seen["chaos"] and seen["released"] == "ok"
    [relayed] = downstream.wait_for_messages(1)
    assert relayed["subject"] == subject and relayed["to"] == ["archive@corp.test"]
    assert seen["htmlCheckTests"] > 100 and isinstance(seen["htmlCheckSlugs"], list)
    assert seen["tags"] == ["invoices", "Q3 2026"] and seen["taggedIDs"] == [message["ID"]]
    assert seen["tagsAfter"] == ["Q3 2026"]
    assert (seen["deleted"], seen["countAfter"]) == ("ok", 0)
    assert server.get_json("/api/v1/messages")["total"] == 0  # gone from mailpipe's own API


def test_mailpit_api_readme_examples(mailpipe_factory: Factory) -> None:
    """The README's Playwright fixture and test, with swaks as the application sending."""
    require_tool("swaks")
    server, own, _ = start(mailpipe_factory)
    smtp_send(server, rich_message())  # an old message, which the fixture clears
    wait_total(own, 1)
    seen = run_js("readme.mjs", {"base": own, "smtpPort": server.smtp_port})
    first = seen["firstList"]
    assert first["messages_count"] == 2
    assert first["messages"][0]["ID"] == seen["sent"]["ID"]
    assert first["messages"][0]["Subject"] == "Test Email"
    assert first["messages"][0]["To"] == [{"Name": "", "Address": "rec@example.test"}]
    assert seen["message"]["Text"].strip() == "Thanks for registering."
    assert (seen["listed"], seen["after"]) == (1, 0)


# ---- PyPI's mailpit-api-client -------------------------------------------------------------


def test_pypi_mailpit_api_client_reads(mailpipe_factory: Factory) -> None:
    """Its reads work unchanged; its writes send form-encoded bodies, which mailpipe refuses
    as not JSON (Mailpit itself reads that DELETE as "delete everything"): see
    docs/from-mailpit.md."""
    try:
        from mailpit.client.api import API
    except ImportError:
        missing("mailpit-api-client is not installed (pip install -e '.[test]')")
    server, own, _ = start(mailpipe_factory)
    message = rich_message()
    # Its Headers model requires Content-Type, Date, Delivered-To, From and Message-Id,
    # whoever serves them: a message with all five, as one an MTA delivered has.
    message["Delivered-To"] = "alice@example.test"
    smtp_send(server, message)
    wait_total(own, 1)
    api = API(own)
    listed = api.get_messages()
    assert (listed.total, listed.count, len(listed.messages)) == (1, 1, 1)
    summary = listed.messages[0]
    assert summary.subject == "Invoice 42" and summary.from_.address == "robot@shop.test"
    message = api.get_message(summary.id)
    assert message.message_id == "inv-42@shop.test"
    assert [a.file_name for a in message.attachments] == ["invoice 42.pdf", "page.html"]
    assert [a.content_id for a in message.inline] == ["logo@shop.test"]
    pdf = message.attachments[0]
    assert api.get_message_attachment(message.id, pdf.part_id) == "%PDF-1.4 invoice"
    headers = api.get_message_headers(message.id)
    assert headers.message_id == ["<inv-42@shop.test>"]
    assert headers.delivered_to == ["alice@example.test"]
    with pytest.raises(Exception, match="400 Bad Request"):
        api.delete_messages([summary.id])
    assert get_json(own, "/api/v1/messages")["total"] == 1


# ---- shapes, route by route ------------------------------------------------------------------


def test_list_search_and_message_shapes(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory)
    smtp_send(server, rich_message(), rcpt=["alice@example.test", "bob@example.test",
                                            "carol@example.test", "hidden@example.test"])
    other = EmailMessage()
    other["From"], other["To"], other["Subject"] = "x@y.test", "z@y.test", "Unrelated"
    other.set_content("nothing")
    smtp_send(server, other)
    listed = wait_total(own, 2)
    assert listed == get_json(prefixed, "/api/v1/messages")
    assert {k: listed[k] for k in ("total", "unread", "count", "messages_count", "start",
                                   "tags")} == {"total": 2, "unread": 2, "count": 2,
                                                "messages_count": 2, "start": 0, "tags": []}
    newest, first = listed["messages"]
    assert newest["Subject"] == "Unrelated"
    assert list(first) == ["ID", "MessageID", "Read", "From", "To", "Cc", "Bcc", "ReplyTo",
                           "Subject", "Created", "Tags", "Size", "Attachments", "Snippet",
                           "Mailpipe"]
    assert first["MessageID"] == "inv-42@shop.test" and first["Read"] is False
    assert first["From"] == {"Name": "Shop Robot", "Address": "robot@shop.test"}
    assert first["To"] == [{"Name": "Alice", "Address": "alice@example.test"},
                           {"Name": "", "Address": "bob@example.test"}]
    assert first["Cc"] == [{"Name": "Carol", "Address": "carol@example.test"}]
    assert first["Bcc"] == [{"Name": "", "Address": "hidden@example.test"}]
    assert first["ReplyTo"] == [{"Name": "", "Address": "help@shop.test"}]
    assert first["Attachments"] == 2 and first["Snippet"].startswith("Your invoice")
    assert first["Mailpipe"]["envelope"]["to"][-1] == "hidden@example.test"

    paged = get_json(own, "/api/v1/messages?start=1&limit=1")
    assert paged["start"] == 1 and [m["ID"] for m in paged["messages"]] == [first["ID"]]
    found = get_json(own, "/api/v1/search?query=subject:invoice")
    assert [m["ID"] for m in found["messages"]] == [first["ID"]]
    assert (found["total"], found["messages_count"], found["messages_unread"]) == (2, 1, 1)

    message = get_json(own, f"/api/v1/message/{first['ID']}")
    assert message["ID"] == first["ID"] and message["Subject"] == "Invoice 42"
    assert message["Date"] == "2026-12-01T10:20:30+01:00"
    assert message["ReturnPath"] == "robot@shop.test"
    assert message["Text"].strip() == "Your invoice: https://shop.test/i/42"
    assert 'src="cid:logo@shop.test"' in message["HTML"]
    assert message["ListUnsubscribe"]["Links"] == ["mailto:leave@shop.test",
                                                   "https://shop.test/leave"]
    [inline] = message["Inline"]
    assert inline["ContentID"] == "logo@shop.test" and inline["ContentType"] == "image/png"
    pdf, page = message["Attachments"]
    assert pdf["FileName"] == "invoice 42.pdf" and pdf["PartID"] == "2"
    assert page["FileName"] == "page.html" and page["PartID"] == "3"
    assert pdf["Checksums"]["MD5"] == hashlib.md5(b"%PDF-1.4 invoice").hexdigest()
    assert message["Mailpipe"]["envelope"]["from"] == "robot@shop.test"
    assert message["Mailpipe"]["remote_addr"].startswith("127.0.0.1:")
    # Reading it marked it read (Mailpit's rule).
    assert get_json(own, "/api/v1/messages")["unread"] == 1
    assert get_json(own, "/api/v1/message/latest")["Subject"] == "Unrelated"
    assert get_json(own, "/api/v1/message/latest?query=invoice")["ID"] == first["ID"]

    headers = get_json(own, f"/api/v1/message/{first['ID']}/headers")
    assert list(headers) == sorted(headers)
    assert headers["Message-Id"] == ["<inv-42@shop.test>"]
    assert headers["Cc"] == ["Carol <carol@example.test>"]
    status, raw, raw_headers = call(own, "GET", f"/api/v1/message/{first['ID']}/raw")
    assert status == 200 and raw_headers["Content-Type"] == "text/plain; charset=utf-8"
    assert raw == server.request("GET", f"/api/v1/messages/{first['ID']}/raw")[1]


def test_parts_thumbnails_and_views(mailpipe_factory: Factory) -> None:
    from PIL import Image

    server, own, prefixed = start(mailpipe_factory)
    smtp_send(server, rich_message(image=png(60, 40, (0, 0, 255))))
    uuid = wait_total(own, 1)["messages"][0]["ID"]
    message = get_json(own, f"/api/v1/message/{uuid}")
    [inline], (pdf, page) = message["Inline"], message["Attachments"]

    status, body, headers = call(own, "GET", f"/api/v1/message/{uuid}/part/{pdf['PartID']}")
    assert (status, body) == (200, b"%PDF-1.4 invoice")
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"] == 'inline; filename="invoice%2042.pdf"'
    # A sender's HTML never renders in our origin: a download, sandboxed.
    status, body, headers = call(own, "GET", f"/api/v1/message/{uuid}/part/{page['PartID']}")
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["Content-Security-Policy"] == "sandbox"

    for part, corner in ((inline, (0, 0, 255)), (pdf, (255, 255, 255))):
        status, jpeg, headers = call(own, "GET",
                                     f"/api/v1/message/{uuid}/part/{part['PartID']}/thumb")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        image = Image.open(io.BytesIO(jpeg))
        assert (image.format, image.size) == ("JPEG", (180, 120))
        # The 60x40 image is padded, centred on white; the PDF is a blank thumbnail.
        centre = image.getpixel((90, 60))
        assert all(abs(a - b) < 40 for a, b in zip(centre, corner, strict=True)), centre
        assert all(v > 215 for v in image.getpixel((2, 2)))
    big = png(900, 300, (0, 160, 0))
    smtp_send(server, rich_message("Big logo", image=big))
    big_id = get_json(own, "/api/v1/message/latest")["Inline"][0]["PartID"]
    jpeg = call(own, "GET", f"/api/v1/message/latest/part/{big_id}/thumb")[1]
    cropped = Image.open(io.BytesIO(jpeg))
    assert cropped.size == (180, 120) and cropped.getpixel((2, 2))[1] > 120  # filled, no pad

    # A decompression bomb (a small PNG claiming 400 million pixels) is never decoded.
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    smtp_send(server, rich_message("Bomb", image=bomb.getvalue()))
    bomb_id = get_json(own, "/api/v1/message/latest")["Inline"][0]["PartID"]
    jpeg = call(own, "GET", f"/api/v1/message/latest/part/{bomb_id}/thumb")[1]
    assert Image.open(io.BytesIO(jpeg)).getpixel((90, 60)) == (255, 255, 255)

    status, html, headers = call(prefixed, "GET", f"/view/{uuid}.html")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    # The sender's HTML as written, in a sandbox where none of its script runs.
    assert "sandbox" in headers["Content-Security-Policy"]
    assert "allow-scripts" not in headers["Content-Security-Policy"]
    image_url = f"/compat/mailpit/api/v1/message/{uuid}/part/{inline['PartID']}"
    assert f'src="{image_url}"'.encode() in html
    assert call(server.api, "GET", image_url)[1] == png(60, 40, (0, 0, 255))
    own_html = call(own, "GET", "/view/latest.html")[1].decode()
    assert '<img src="/api/v1/message/' in own_html
    embedded = call(own, "GET", f"/view/{uuid}.html?embed=1")[1].decode()
    assert embedded.startswith('<base target="_blank">') and "cid:" not in embedded
    status, text, headers = call(own, "GET", "/view/latest.txt")
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text.decode().strip() == "Your invoice: https://shop.test/i/42"


def test_read_status_and_deletes(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory)
    for subject in ("alpha one", "alpha two", "beta"):
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@b.test", "c@d.test", subject
        message.set_content(subject)
        smtp_send(server, message)
    ids = {m["Subject"]: m["ID"] for m in wait_total(own, 3)["messages"]}

    def unread() -> set[str]:
        return {m["Subject"] for m in get_json(own, "/api/v1/messages")["messages"]
                if not m["Read"]}

    ok(own, "PUT", "/api/v1/messages", {"IDs": [ids["beta"]], "Read": True})
    assert unread() == {"alpha one", "alpha two"}
    ok(prefixed, "PUT", "/api/v1/messages", {"Search": "subject:alpha", "Read": True})
    assert unread() == set()
    ok(own, "PUT", "/api/v1/messages", {})  # no IDs, no Search: all, to Read's default false
    assert unread() == {"alpha one", "alpha two", "beta"}
    assert fails(own, "PUT", "/api/v1/messages", {"IDs": [ids["beta"]], "Search": "x"}) == (
        "You may specify either IDs or a search query, not both")
    assert "IDs" in fails(own, "PUT", "/api/v1/messages", {"IDs": "all"})
    assert "JSON" in fails(own, "PUT", "/api/v1/messages", b"{not json")

    ok(own, "DELETE", "/api/v1/messages", {"IDs": [ids["beta"]]})
    assert fails(own, "DELETE", "/api/v1/search") == "Error: no search query"
    assert "JSON" in fails(own, "DELETE", "/api/v1/messages", b"[")  # not "delete all"
    assert get_json(own, "/api/v1/messages")["total"] == 2
    ok(prefixed, "DELETE", "/api/v1/search?query=subject:%22alpha%20two%22")
    assert [m["Subject"] for m in get_json(own, "/api/v1/messages")["messages"]] == ["alpha one"]
    ok(own, "DELETE", "/api/v1/messages")  # no body: everything
    assert get_json(own, "/api/v1/messages")["total"] == 0
    info = get_json(own, "/api/v1/info")
    assert info["RuntimeStats"]["MessagesDeleted"] == 3
    assert info["RuntimeStats"]["SMTPAccepted"] == 3


def test_errors_are_mailpit_plain_text(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory)
    assert fails(own, "GET", "/api/v1/message/latest", status=404) == "Message not found"
    assert fails(own, "GET", "/view/latest.txt", status=404) == "Message not found"
    text_only = EmailMessage()
    text_only["From"], text_only["To"], text_only["Subject"] = "a@b.test", "c@d.test", "t"
    text_only.set_content("only text")
    smtp_send(server, text_only)
    uuid = wait_total(own, 1)["messages"][0]["ID"]
    for base in (own, prefixed):
        assert fails(base, "GET", "/api/v1/message/no-such-id", status=404) == (
            "404 page not found")
        assert fails(base, "GET", f"/api/v1/message/{uuid}/part/9", status=404) == (
            "404 page not found")
        assert fails(base, "GET", f"/view/{uuid}.html", status=404) == (
            "This message does not contain a HTML part")
        assert fails(base, "GET", "/api/v1/search?query=%20") == "Error: no search query"
        assert "start" in fails(base, "GET", "/api/v1/messages?start=abc")
        assert "limit" in fails(base, "GET", "/api/v1/messages?limit=0")
        assert fails(base, "GET", "/api/v1/chaos") == "Chaos is not enabled"
        assert "not enabled" in fails(base, "POST", f"/api/v1/message/{uuid}/release",
                                      {"To": ["x@y.test"]})
    assert call(own, "GET", "/livez")[:2] == (200, b"ok")
    assert call(prefixed, "GET", "/readyz")[:2] == (200, b"ok")


def test_info_and_webui(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory, label="CI inbox", chaos=True, relay={
        "host": "127.0.0.1", "port": 2525, "allowed_recipients": "@corp\\.test$",
        "return_path": "bounce@corp.test"})
    smtp_send(server, rich_message())
    wait_total(own, 1)
    info = get_json(prefixed, "/api/v1/info")
    assert info["Messages"] == 1 and info["Unread"] == 1 and info["Tags"] == {}
    assert info["Database"].endswith(".db") and info["DatabaseSize"] > 0
    assert info["Version"].startswith("mailpipe ")
    assert info["RuntimeStats"]["SMTPAccepted"] == 1
    assert info["RuntimeStats"]["SMTPAcceptedSize"] > 0
    webui = get_json(own, "/api/v1/webui")
    assert webui["Label"] == "CI inbox" and webui["ChaosEnabled"] is True
    assert webui["MessageRelay"] == {
        "Enabled": True, "SMTPServer": "127.0.0.1:2525", "ReturnPath": "bounce@corp.test",
        "AllowedRecipients": "@corp\\.test$", "BlockedRecipients": "", "OverrideFrom": "",
        "PreserveMessageIDs": False}


# ---- chaos ---------------------------------------------------------------------------------


def test_chaos_triggers_change_smtp_answers(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory, chaos=True,
                                  chaos_triggers="Recipient:452:100")
    defaults = {"Sender": {"ErrorCode": 451, "Probability": 0},
                "Recipient": {"ErrorCode": 452, "Probability": 100},
                "Authentication": {"ErrorCode": 535, "Probability": 0}}
    assert get_json(own, "/api/v1/chaos") == defaults

    def smtp_answers() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
            client.ehlo()
            return client.mail("a@b.test"), client.rcpt("c@d.test")

    assert smtp_answers()[1] == (452, b"Chaos recipient error")
    status, body, _ = call(prefixed, "PUT", "/api/v1/chaos",
                           {"Sender": {"ErrorCode": 421, "Probability": 100}})
    assert status == 200
    assert json.loads(body) == {**defaults, "Sender": {"ErrorCode": 421, "Probability": 100},
                                "Recipient": {"ErrorCode": 451, "Probability": 0}}
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail("a@b.test") == (421, b"Chaos sender error")
    status, body, _ = call(own, "PUT", "/api/v1/chaos",
                           {"Authentication": {"ErrorCode": 0, "Probability": 100}})
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("user", "password")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            535, b"Chaos authentication error")
    ok_answers = call(own, "PUT", "/api/v1/chaos", {})
    assert json.loads(ok_answers[1])["Authentication"] == {"ErrorCode": 535, "Probability": 0}
    assert smtp_answers() == ((250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"))
    assert fails(own, "PUT", "/api/v1/chaos", {"Sender": {"ErrorCode": 600,
                                                          "Probability": 5}}) == (
        "error code must be between 400 and 599")
    assert fails(own, "PUT", "/api/v1/chaos", {"Recipient": {"ErrorCode": 451,
                                                             "Probability": 101}}) == (
        "probability must be between 0 and 100")
    assert "unknown trigger" in fails(own, "PUT", "/api/v1/chaos", {"Data": {}})


# ---- release ------------------------------------------------------------------------------


def test_release_relays_to_the_configured_server(mailpipe_factory: Factory) -> None:
    downstream = mailpipe_factory({"smtp": {"include_raw": True}})
    server, own, prefixed = start(mailpipe_factory, relay={
        "host": "127.0.0.1", "port": downstream.smtp_port,
        "allowed_recipients": "@corp\\.test$", "blocked_recipients": "^blocked@"})
    smtp_send(server, rich_message(), rcpt=["alice@example.test", "secret@example.test"])
    uuid = wait_total(own, 1)["messages"][0]["ID"]

    ok(own, "POST", f"/api/v1/message/{uuid}/release", {"To": ["Boss <boss@corp.test>"]})
    [relayed] = downstream.wait_for_messages(1)
    event = downstream.event(relayed["uuid"])
    assert event["envelope"]["from"] == "robot@shop.test"
    assert event["envelope"]["to"] == ["boss@corp.test"]
    headers = {name.lower(): value for name, value in event["message"]["header_list"]}
    assert headers["subject"] == "Invoice 42" and "bcc" not in headers
    assert headers["message-id"] != "<inv-42@shop.test>"
    assert headers["date"] != "Tue, 01 Dec 2026 10:20:30 +0100"
    assert [a["filename"] for a in event["attachments"]] == [None, "invoice 42.pdf",
                                                             "page.html"]

    assert fails(prefixed, "POST", f"/api/v1/message/{uuid}/release",
                 {"To": ["someone@else.test"]}) == (
        "Failed: Address do not match the allowlist: someone@else.test")
    assert fails(own, "POST", "/api/v1/message/latest/release",
                 {"To": ["blocked@corp.test"]}) == (
        "Failed: Address found on blocklist: blocked@corp.test")
    assert fails(own, "POST", f"/api/v1/message/{uuid}/release", {"To": ["not an address"]}) == (
        "Invalid email address: not an address")
    assert fails(own, "POST", f"/api/v1/message/{uuid}/release", {"To": []}) == (
        "No valid addresses found")
    assert fails(own, "POST", "/api/v1/message/nope/release", {"To": ["a@corp.test"]},
                 status=404) == "404 page not found"
    downstream.stop()
    assert fails(own, "POST", f"/api/v1/message/{uuid}/release",
                 {"To": ["boss@corp.test"]}).startswith("SMTP error: ")


# ---- the guard and authentication -----------------------------------------------------------


def test_guard_refuses_cross_site_writes_and_rebinding(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory, chaos=True)
    smtp_send(server, rich_message())
    wait_total(own, 1)
    for base in (own, prefixed):
        status, _, _ = call(base, "DELETE", "/api/v1/messages", headers={"Origin": EVIL})
        assert status == 403
        status, _, _ = call(base, "PUT", "/api/v1/chaos",
                            {"Sender": {"ErrorCode": 451, "Probability": 100}},
                            headers={"Origin": EVIL})
        assert status == 403
        # A form post (what a page may send without a preflight) is refused as such.
        status, _, _ = call(base, "PUT", "/api/v1/messages", b"IDs=x",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status in (403, 415)
        status, _, _ = call(base, "GET", "/api/v1/messages",
                            headers={"Host": "rebound.evil.example"})
        assert status == 403
    assert get_json(own, "/api/v1/messages")["total"] == 1
    assert get_json(own, "/api/v1/chaos")["Sender"]["Probability"] == 0


def test_basic_auth_guards_both_places(mailpipe_factory: Factory) -> None:
    port = free_port()
    server = mailpipe_factory({
        "http": {"auth": {"type": "basic", "username": "dev", "password": "pw"}},
        "compat": {"mailpit": {"addr": f"127.0.0.1:{port}"}}})
    wait_port(port)
    import base64

    good = {"Authorization": "Basic " + base64.b64encode(b"dev:pw").decode()}
    for base in (f"http://127.0.0.1:{port}", f"{server.api}/compat/mailpit"):
        assert call(base, "GET", "/api/v1/messages")[0] == 401
        status, body, _ = call(base, "GET", "/api/v1/messages", headers=good)
        assert status == 200 and json.loads(body)["total"] == 0


# ---- send, tags, checks ---------------------------------------------------------------------


def test_send_injects_mailpits_json(mailpipe_factory: Factory) -> None:
    import base64

    server, own, prefixed = start(mailpipe_factory)
    request = {
        "From": {"Email": "john@example.test", "Name": "John Doe"},
        "To": [{"Email": "jane@example.test", "Name": "Jane Doe"}],
        "Cc": [{"Email": "manager@example.test"}], "Bcc": ["jack@example.test"],
        "ReplyTo": [{"Email": "secretary@example.test"}],
        "Subject": "Mailpit message via the HTTP API", "Text": "Mailpit is awesome!",
        "HTML": '<p>Mailpit is <b>awesome</b>! <img src="cid:logo"></p>',
        "Attachments": [{"Content": base64.b64encode(png(50, 50)).decode(),
                         "Filename": "logo.png", "ContentID": "logo"}],
        "Headers": {"X-IP": "1.2.3.4"}, "Tags": ["Tag 1", "Tag 2"],
    }
    status, body, _ = call(prefixed, "POST", "/api/v1/send", request)
    assert status == 200, body
    sent_id = json.loads(body)["ID"]
    message = get_json(own, f"/api/v1/message/{sent_id}")
    assert message["From"] == {"Name": "John Doe", "Address": "john@example.test"}
    assert message["Bcc"] == [{"Name": "", "Address": "jack@example.test"}]
    assert message["Tags"] == ["Tag 1", "Tag 2"]
    assert message["Text"].strip() == "Mailpit is awesome!"
    assert message["Inline"][0]["ContentID"] == "logo"
    assert get_json(own, f"/api/v1/message/{sent_id}/headers")["X-Ip"] == ["1.2.3.4"]
    # It went through the capture pipeline, as SMTP mail does: mailpipe's own API has it.
    event = server.event(sent_id)
    assert event["envelope"]["to"] == ["jane@example.test", "manager@example.test",
                                       "jack@example.test"]

    for bad, error in (({"To": [{"Email": "x@y.test"}]}, "From"),
                       ({"From": {"Email": "not-an-address"}}, "From.Email"),
                       ({"From": {"Email": "a@b.test"}, "Attachments": [{"Content": "%%%",
                                                                          "Filename": "x"}]},
                        "Attachments[0].Content")):
        status, body, headers = call(own, "POST", "/api/v1/send", bad)
        assert status == 400 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["Error"].startswith(error), body
    status, body, _ = call(own, "POST", "/api/v1/send", b"{")
    assert status == 400 and "JSON" in json.loads(body)["Error"]


def test_tag_routes(mailpipe_factory: Factory) -> None:
    server, own, prefixed = start(mailpipe_factory)
    for subject in ("one", "two"):
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@b.test", "c@d.test", subject
        message.set_content(subject)
        smtp_send(server, message)
    ids = {m["Subject"]: m["ID"] for m in wait_total(own, 2)["messages"]}
    assert get_json(own, "/api/v1/tags") == []
    ok(own, "PUT", "/api/v1/tags", {"IDs": list(ids.values()), "Tags": ["Shared", "b/c"]})
    ok(prefixed, "PUT", "/api/v1/tags", {"IDs": [ids["one"]], "Tags": ["Shared", "Only one"]})
    assert get_json(own, "/api/v1/tags") == ["b/c", "Only one", "Shared"]
    listed = get_json(own, "/api/v1/messages")
    assert listed["tags"] == ["b/c", "Only one", "Shared"]
    assert {m["Subject"]: m["Tags"] for m in listed["messages"]} == {
        "one": ["Shared", "Only one"], "two": ["Shared", "b/c"]}
    assert get_json(own, "/api/v1/info")["Tags"] == {"b/c": 1, "Only one": 1, "Shared": 2}
    found = get_json(own, "/api/v1/search?query=tag:%22Only%20one%22")
    assert [m["ID"] for m in found["messages"]] == [ids["one"]]
    ok(own, "PUT", "/api/v1/tags/b%2Fc", {"Name": "Renamed"})
    ok(own, "DELETE", "/api/v1/tags/Shared")
    assert get_json(own, f"/api/v1/message/{ids['two']}")["Tags"] == ["Renamed"]
    ok(own, "PUT", "/api/v1/tags", {"IDs": [ids["two"]]})  # no Tags: none left
    assert get_json(own, "/api/v1/tags") == ["Only one"]
    assert "string" in fails(own, "PUT", "/api/v1/tags/Renamed", {"Name": 5})
    assert "IDs" in fails(own, "PUT", "/api/v1/tags", {"IDs": "x", "Tags": []})


def test_html_and_link_checks(mailpipe_factory: Factory) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Site(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200 if self.path == "/ok" else 404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: Any) -> None:
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{site.server_address[1]}"
    try:
        server, own, prefixed = start(mailpipe_factory)
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@b.test", "c@d.test", "Links"
        message.set_content(f"See {base_url}/ok")
        message.add_alternative(f'<div style="display:flex"><a href="{base_url}/ok">ok</a>'
                                f'<img src="{base_url}/gone.png"></div>', subtype="html")
        smtp_send(server, message)
        wait_total(own, 1)
        check = get_json(prefixed, "/api/v1/message/latest/html-check")
        assert set(check) == {"Total", "Warnings", "Platforms"}
        assert "css-display-flex" in [w["Slug"] for w in check["Warnings"]]
        assert check["Total"]["Nodes"] >= 3 and check["Total"]["Tests"] > 100
        links = get_json(own, "/api/v1/message/latest/link-check")
        assert links == {"Errors": 1, "Links": [
            {"URL": f"{base_url}/ok", "StatusCode": 200, "Status": "OK"},
            {"URL": f"{base_url}/gone.png", "StatusCode": 404, "Status": "Not Found"}]}
        # Outbound requests on a page's behalf: refused to other sites.
        status, _, _ = call(own, "GET", "/api/v1/message/latest/link-check",
                            headers={"Sec-Fetch-Site": "cross-site", "Origin": EVIL})
        assert status == 403
        assert "follow" in fails(own, "GET", "/api/v1/message/latest/link-check?follow=maybe")
        text_only = EmailMessage()
        text_only["From"], text_only["To"], text_only["Subject"] = "a@b.test", "c@d.test", "t"
        text_only.set_content("plain")
        smtp_send(server, text_only)
        wait_total(own, 2)
        assert fails(own, "GET", "/api/v1/message/latest/html-check") == (
            "message does not contain HTML")
        assert "not configured" in fails(own, "GET", "/api/v1/message/latest/sa-check")
        assert get_json(own, "/api/v1/webui")["SpamAssassin"] is False
    finally:
        site.shutdown()


def test_sa_check_with_a_real_spamd(spamd: str, mailpipe_factory: Factory) -> None:
    port = free_port()
    server = mailpipe_factory({"spamassassin": {"addr": spamd},
                               "compat": {"mailpit": {"addr": f"127.0.0.1:{port}"}}})
    wait_port(port)
    own = f"http://127.0.0.1:{port}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@b.test", "c@d.test", "Cheap"
    message.set_content(f"Buy now\n{GTUBE}\n")
    smtp_send(server, message)
    wait_total(own, 1)
    result = get_json(own, "/api/v1/message/latest/sa-check")
    assert result["IsSpam"] is True and result["Error"] == "" and result["Score"] >= 1000
    assert "GTUBE" in [rule["Name"] for rule in result["Rules"]]
    assert get_json(own, "/api/v1/webui")["SpamAssassin"] is True
