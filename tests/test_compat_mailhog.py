"""MailHog's API (compat/mailhog.py) through a real `mailpipe serve`: emails sent over SMTP
with smtplib, read back by the npm `mailhog` client unchanged (tests/compat/mailhog-js) on
both the API's own listener and under /compat/mailhog/ of the main one, and every route's
shape, errors and protection over plain HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import os
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jsonschema
import mailhog as pypi_mailhog  # the PyPI client (test extras), not compat/mailhog.py
import orjson
import pytest
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st

import test_web_ui
from conftest import ROOT, MailpipeServer, free_port, require_tool
from mailpipe.app import Mailpipe
from mailpipe.compat.mailhog_message import decoded_body, message_json, part_at, part_filename
from mailpipe.config import load_config
from mailpipe.web.app import _openapi_bytes as openapi_document
from test_clients import PHPMAILER_AUTOLOAD, require_php_library, run_php

Factory = Callable[..., MailpipeServer]
JS_DIR = ROOT / "tests" / "compat" / "mailhog-js"
PREFIX = "/compat/mailhog"
browser = test_web_ui.browser  # the fixture: Debian's chromium, through Playwright
AUTH = ("hog", "s3cret")

# What the round trip sends, and what the client must read back (roundtrip.js).
EXPECT: dict[str, Any] = {
    "domain": "example.org",
    "releaseTo": "again@example.net",
    "attached": {
        "from": "zoe@example.com",
        # One word: the client's RFC 2047 Q decoding leaves "_" for a space as it is.
        "headerFrom": "Zoë <zoe@example.com>",
        "to": "bob@example.org",
        "subject": "Grüße aus Köln ✓",
        "text": "Héllo wörld: the report is attached. Straße €5",
        "qpWord": "Straße",
        "filename": "report.csv",
        "attachment": "name,amount\nÄpfel,3\n",
    },
    "html": {
        "from": "shop@example.com",
        "to": "carol@example.org",
        "cc": "dave@example.org",
        "subject": "日本語のお知らせ",
        "text": "Your order 4242 has shipped — 日本",
        "html": "<p>Your order <b>4242</b> has shipped — 日本</p>",
    },
    "plain": {
        "from": "cron@example.com",
        "to": "ops@example.org",
        "subject": "Nightly job done",
        "text": "The nightly kumquat job finished.",
        "word": "kumquat",
    },
}


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The npm client installed from the committed lock file (npm ci) when it is not yet."""
    require_tool("node")
    if not (JS_DIR / "node_modules" / "mailhog").is_dir():
        npm = require_tool("npm")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       capture_output=True, timeout=300)
    return JS_DIR


@pytest.fixture
def hog(mailpipe_factory: Factory) -> MailpipeServer:
    """mailpipe with MailHog's API on a listener of its own too."""
    port = free_port()
    server = mailpipe_factory({"compat": {"mailhog": {"addr": f"127.0.0.1:{port}"}}})
    server.extra_ports["mailhog"] = port
    return server


def places(server: MailpipeServer) -> dict[str, tuple[int, str]]:
    """Where MailHog's API is served: (port, path prefix)."""
    return {"own": (server.extra_ports["mailhog"], ""), "prefix": (server.http_port, PREFIX)}


# ---- sending ------------------------------------------------------------------------------


def send_roundtrip_emails(smtp_port: int) -> None:
    """Three emails, oldest first: UTF-8 quoted-printable text with a base64 attachment;
    text and HTML alternatives in base64 with an encoded subject; plain 7-bit."""
    a = EXPECT["attached"]
    attached = EmailMessage()
    attached["From"], attached["To"], attached["Subject"] = a["headerFrom"], a["to"], a["subject"]
    attached.set_content(a["text"], cte="quoted-printable")
    attached.add_attachment(a["attachment"].encode(), maintype="text", subtype="csv",
                            filename=a["filename"])
    h = EXPECT["html"]
    html = EmailMessage()
    html["From"], html["To"], html["Subject"] = h["from"], h["to"], h["subject"]
    html["Cc"] = h["cc"]
    html.set_content(h["text"], cte="base64")
    html.add_alternative(h["html"], subtype="html", cte="base64")
    p = EXPECT["plain"]
    plain = EmailMessage()
    plain["From"], plain["To"], plain["Subject"] = p["from"], p["to"], p["subject"]
    plain.set_content(p["text"], cte="7bit")
    for message in (attached, html, plain):
        message["Date"] = formatdate(localtime=True)
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.send_message(attached, a["from"], [a["to"]])
        client.send_message(html, h["from"], [h["to"], h["cc"]])
        client.send_message(plain, p["from"], [p["to"]])


def send(smtp_port: int, message: str | bytes, mail_from: str = "app@example.com",
         to: tuple[str, ...] = ("dev@example.org",)) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.sendmail(mail_from, list(to), message)


def run_node(script: str, js_dir: Path, port: int, base: str, smtp_port: int,
             auth: str | None = None) -> dict[str, Any]:
    env = {**os.environ, "MAILHOG_PORT": str(port), "MAILHOG_BASE_PATH": base + "/api",
           "MAILPIPE_SMTP_PORT": str(smtp_port), "MAILPIPE_EXPECT": json.dumps(EXPECT)}
    if auth is not None:
        env["MAILHOG_AUTH"] = auth
    done = subprocess.run(["node", script], cwd=js_dir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---- the npm client -----------------------------------------------------------------------


@pytest.mark.parametrize("place", ["own", "prefix"])
def test_npm_client_round_trip(hog: MailpipeServer, node_client: Path, place: str) -> None:
    send_roundtrip_emails(hog.smtp_port)
    hog.wait_for_messages(3)
    port, base = places(hog)[place]
    seen = run_node("roundtrip.js", node_client, port, base, hog.smtp_port)
    assert seen["attachment"] == EXPECT["attached"]["attachment"]
    assert seen["text"] == EXPECT["attached"]["text"]
    assert seen["html"] == EXPECT["html"]["html"]
    # The IDs are mailpipe's uuids, and the store agrees that all of them are gone.
    assert len(seen["release"]) == 36  # the released copy, captured again and deleted
    assert len(set(seen["ids"])) == 3 and all(len(i) == 36 for i in seen["ids"])
    assert hog.messages() == []


def test_npm_client_readme_examples(hog: MailpipeServer, node_client: Path) -> None:
    send(hog.smtp_port, "From: test@example.org\r\nTo: test@example.org\r\nSubject: Fruit\r\n"
         "Content-Type: text/plain\r\n\r\nA banana a day.\r\n",
         "test@example.org", ("test@example.org",))
    send(hog.smtp_port, "From: Umlaut <u@example.com>\r\nTo: x@example.org\r\n"
         "Subject: Umlauts\r\nContent-Type: text/plain; charset=utf-8\r\n"
         "Content-Transfer-Encoding: quoted-printable\r\n\r\nSay =C3=BC=C3=A4=C3=B6 now.\r\n",
         "u@example.com", ("x@example.org",))
    hog.wait_for_messages(2)
    out = run_node("readme.js", node_client, hog.extra_ports["mailhog"], "", hog.smtp_port)
    fruit = ["From:  test@example.org", "To:  test@example.org", "Subject:  Fruit",
             "Content:  A banana a day.\r\n"]
    assert out["messages"][4:] == fruit  # the umlaut email is the newer one
    assert out["messages"][:4][2] == "Subject:  Umlauts"
    assert out["search"] == fruit
    assert out["latestFrom"] == fruit
    assert out["latestTo"] == fruit
    assert out["latestContaining"] == fruit
    assert out["encodeDecode"] == ["=C3=BC=C3=A4=C3=B6", "日本"]
    assert out["encodedSearch"] == ["Encoded search total:  1"]
    assert out["release"] == ["Release:  200"]
    assert out["deleteMessage"] == ["Status code:  200"]
    assert out["deleteAll"] == ["Status code:  200"]
    assert hog.messages() == []


def test_npm_client_with_basic_auth(mailpipe_factory: Factory, node_client: Path) -> None:
    port = free_port()
    server = mailpipe_factory({
        "compat": {"mailhog": {"addr": f"127.0.0.1:{port}"}},
        "http": {"auth": {"type": "basic", "username": AUTH[0], "password": AUTH[1]}},
    })
    send_roundtrip_emails(server.smtp_port)
    status, _ = http_get(port, "/api/v2/messages")
    assert status == 401
    seen = run_node("roundtrip.js", node_client, port, "", server.smtp_port,
                    auth=":".join(AUTH))
    assert seen["attachment"] == EXPECT["attached"]["attachment"]


def test_npm_client_under_a_base_path(mailpipe_factory: Factory, node_client: Path) -> None:
    """Behind a reverse proxy's path (http.base_path) the prefix moves under it."""
    server = mailpipe_factory({"http": {"base_path": "/mail"}}, wait=False)
    deadline = time.monotonic() + 20
    while http_get_or_none(server.http_port, "/mail/healthz") != 200:
        assert time.monotonic() < deadline and server.process.poll() is None, server.log()
        time.sleep(0.05)
    send_roundtrip_emails(server.smtp_port)
    assert http_get(server.http_port, PREFIX + "/api/v2/messages")[0] == 404
    seen = run_node("roundtrip.js", node_client, server.http_port, "/mail" + PREFIX,
                    server.smtp_port)
    assert seen["html"] == EXPECT["html"]["html"]


def test_npm_client_reads_what_phpmailer_sent(hog: MailpipeServer, node_client: Path,
                                              tmp_path: Path) -> None:
    """A PHP application's mail (Debian's PHPMailer: HTML with a text alternative, a binary
    attachment), read by the npm client: the attachment byte for byte."""
    require_php_library(PHPMAILER_AUTOLOAD)
    payload = bytes(range(256)) * 40
    (tmp_path / "invoice.pdf").write_bytes(payload)
    run_php("phpmailer_send.php", {
        "port": hog.smtp_port, "helo": "php.test", "auth_type": "PLAIN", "user": "app",
        "password": "pw",
        "messages": [{
            "from": "billing@example.com", "from_name": "Billing", "to": ["payer@example.org"],
            "cc": [], "bcc": [], "subject": "Rechnung-Nr.-4711-✓", "text": "Ihre Rechnung",
            "html": "<p>Ihre Rechnung</p>",
            "attachments": [{"path": str(tmp_path / "invoice.pdf"), "name": "invoice.pdf",
                             "content_type": "application/pdf"}],
        }],
    })
    hog.wait_for_messages(1)
    env = {**os.environ, "MAILHOG_PORT": str(hog.extra_ports["mailhog"]),
           "MAILHOG_BASE_PATH": "/api"}
    done = subprocess.run(["node", "latest.js", "payer@example.org"], cwd=node_client, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["subject"] == "Rechnung-Nr.-4711-✓"
    assert seen["from"] == "Billing <billing@example.com>"
    assert seen["to"] == "payer@example.org"
    (attachment,) = seen["attachments"]
    assert (attachment["name"], attachment["encoding"]) == ("invoice.pdf", "base64")
    assert attachment["type"].startswith("application/pdf")
    assert base64.b64decode(attachment["base64"]) == payload
    assert len(hog.messages()) == 1
    assert hog.event(seen["ID"])["authentication"]["username"] == "app"


# ---- each route over HTTP -----------------------------------------------------------------


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response.headers
    finally:
        conn.close()


def http_get_or_none(port: int, path: str) -> int | None:
    """The status, or None while nothing listens yet."""
    try:
        return http_get(port, path)[0]
    except OSError:
        return None


def http_get(port: int, path: str) -> tuple[int, Any]:
    status, body, headers = request(port, "GET", path)
    is_json = headers.get_content_type() == "application/json"
    return status, json.loads(body) if is_json and body else body


@pytest.fixture
def filled(hog: MailpipeServer) -> Iterator[MailpipeServer]:
    send_roundtrip_emails(hog.smtp_port)
    hog.wait_for_messages(3)
    yield hog


@pytest.mark.parametrize("place", ["own", "prefix"])
def test_v2_messages_shape(filled: MailpipeServer, place: str) -> None:
    port, base = places(filled)[place]
    status, result = http_get(port, base + "/api/v2/messages")
    assert status == 200
    assert (result["total"], result["count"], result["start"]) == (3, 3, 0)
    newest, html, attached = result["items"]
    assert set(newest) == {"ID", "From", "To", "Content", "Created", "MIME", "Raw", "Mailpipe"}
    assert newest["From"] == {"Relays": None, "Mailbox": "cron", "Domain": "example.com",
                              "Params": newest["From"]["Params"]}
    assert newest["To"][0]["Mailbox"] == "ops" and newest["To"][0]["Domain"] == "example.org"
    assert newest["MIME"] is None  # not a multipart
    headers = newest["Content"]["Headers"]
    assert headers["Subject"] == ["Nightly job done"]
    assert headers["Return-Path"] == ["<cron@example.com>"]  # added, as MailHog adds it
    assert "Message-ID" in headers and "Received" in headers
    assert newest["Content"]["Body"].strip() == EXPECT["plain"]["text"]
    assert newest["Raw"]["From"] == "cron@example.com"
    assert newest["Raw"]["To"] == ["ops@example.org"]
    assert newest["Raw"]["Helo"]
    assert "Subject: Nightly job done" in newest["Raw"]["Data"]
    assert newest["Content"]["Size"] == len(newest["Raw"]["Data"].encode())
    # The HTML email: multipart/alternative split into its two parts, still base64.
    assert [p["Headers"]["Content-Type"][0].split(";")[0] for p in html["MIME"]["Parts"]] \
        == ["text/plain", "text/html"]
    html_part = html["MIME"]["Parts"][1]
    assert html_part["Headers"]["Content-Transfer-Encoding"] == ["base64"]
    assert base64.b64decode(html_part["Body"]).decode().strip() == EXPECT["html"]["html"]
    assert [t["Mailbox"] for t in html["To"]] == ["carol", "dave"]
    # The attachment email: text and the attachment, its disposition as the client parses it.
    parts = attached["MIME"]["Parts"]
    assert parts[1]["Headers"]["Content-Disposition"] == ['attachment; filename="report.csv"']
    # mailpipe's extras, which MailHog clients ignore.
    extras = attached["Mailpipe"]
    assert extras["envelope"]["from"] == "zoe@example.com"
    assert extras["authentication"]["attempted"] is False
    assert any(line.startswith("C: MAIL FROM") or "MAIL FROM" in line
               for line in extras["transcript"] or ["MAIL FROM"])
    assert extras["attachments"][0]["filename"] == "report.csv"


def test_mailpipe_extras_beside_mailhogs_fields(mailpipe_factory: Factory) -> None:
    """What MailHog has no field for, under `Mailpipe`: the AUTH credentials, the envelope's
    parameters, the SMTP transcript."""
    port = free_port()
    server = mailpipe_factory({"smtp": {"transcript": True},
                               "compat": {"mailhog": {"addr": f"127.0.0.1:{port}"}}})
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.login("ann", "hunter2")
        client.sendmail("ann@example.com", ["bob@example.org"], "Subject: creds\r\n\r\nx\r\n",
                        mail_options=["BODY=8BITMIME"])
    server.wait_for_messages(1)
    _, page = http_get(port, "/api/v2/messages")
    item = page["items"][0]
    extras = item["Mailpipe"]
    assert extras["authentication"]["username"] == "ann"
    assert extras["authentication"]["password"] == "hunter2"
    assert extras["envelope"]["mail_options"] == item["From"]["Params"].split()
    assert "BODY=8BITMIME" in item["From"]["Params"].upper()
    assert "C: mail FROM:<ann@example.com> size=21 BODY=8BITMIME" in extras["transcript"]
    assert extras["session"]["transcript"] == extras["transcript"]
    assert "outcomes" in extras


def test_v2_paging_and_limits(filled: MailpipeServer) -> None:
    port = filled.extra_ports["mailhog"]
    status, page = http_get(port, "/api/v2/messages?start=2&limit=5")
    assert (status, page["total"], page["count"], page["start"]) == (200, 3, 1, 2)
    assert page["items"][0]["Content"]["Headers"]["Subject"][0].startswith("=?utf-8?")
    _, capped = http_get(port, "/api/v2/messages?limit=100000")  # MailHog caps at 250
    assert capped["count"] == 3
    _, zero = http_get(port, "/api/v2/messages?limit=0")  # 0: the default, as MailHog
    assert zero["count"] == 3
    for bad in ("start=-1", "limit=abc", "start=1e3"):
        status, error = http_get(port, f"/api/v2/messages?{bad}")
        assert status == 400, bad
        assert bad.split("=")[0] in error["error"]


def test_v2_search(filled: MailpipeServer) -> None:
    port = filled.extra_ports["mailhog"]

    def subjects(query: str) -> list[str]:
        status, result = http_get(port, "/api/v2/search?" + query)
        assert status == 200, result
        assert result["count"] == len(result["items"]) <= result["total"]
        return [item["Content"]["Headers"]["Subject"][0] for item in result["items"]]

    assert subjects("kind=from&query=CRON@example") == ["Nightly job done"]
    assert subjects("kind=to&query=dave@example.org") != []
    assert len(subjects("kind=to&query=example.org")) == 3
    assert subjects("kind=containing&query=kumquat") == ["Nightly job done"]
    # Decoded text and the body as sent both match.
    assert len(subjects("kind=containing&query=Stra%C3%9Fe")) == 1
    assert len(subjects("kind=containing&query=Stra%3DC3%3D9Fe")) == 1
    assert subjects("kind=containing&query=nothing-like-this") == []
    # `to` looks at the To header too, as MailHog's does: a list address no envelope names.
    send(filled.smtp_port, "To: team-list@example.net\r\nSubject: via list\r\n\r\nx\r\n",
         to=("member@example.org",))
    filled.wait_for_messages(4)
    assert subjects("kind=to&query=team-list@") == ["via list"]
    assert len(subjects("kind=to&query=example.org&start=1&limit=1")) == 1
    for bad, why in (("kind=subject&query=x", "kind"), ("kind=from", "query"),
                     ("query=x", "kind"), ("kind=from&query=", "query")):
        status, error = http_get(port, "/api/v2/search?" + bad)
        assert status == 400 and why in error["error"], bad


def test_v1_messages_message_and_delete(filled: MailpipeServer) -> None:
    port = filled.extra_ports["mailhog"]
    status, items = http_get(port, "/api/v1/messages")
    assert status == 200 and isinstance(items, list) and len(items) == 3
    # v1 lists oldest first, as MailHog's v1 does.
    assert items[-1]["Raw"]["From"] == "cron@example.com"
    first = items[0]
    status, one = http_get(port, f"/api/v1/messages/{first['ID']}")
    assert status == 200 and one["ID"] == first["ID"] and one["Content"] == first["Content"]
    status, body, _ = request(port, "DELETE", f"/api/v1/messages/{first['ID']}")
    assert (status, body) == (200, b"")
    status, error = http_get(port, f"/api/v1/messages/{first['ID']}")
    assert status == 404 and error == {"error": "message not found"}
    status, body, _ = request(port, "DELETE", f"/api/v1/messages/{first['ID']}")
    assert status == 404
    status, body, _ = request(port, "DELETE", "/api/v1/messages")
    assert (status, body) == (200, b"")
    assert http_get(port, "/api/v1/messages") == (200, [])
    assert http_get(port, "/api/v2/messages")[1]["total"] == 0


def test_downloads(filled: MailpipeServer) -> None:
    port = filled.extra_ports["mailhog"]
    _, result = http_get(port, "/api/v2/search?kind=from&query=zoe@example.com")
    item = result["items"][0]
    uuid = item["ID"]
    status, raw, headers = request(port, "GET", f"/api/v1/messages/{uuid}/download")
    assert status == 200 and headers["Content-Type"] == "message/rfc822"
    assert raw.decode() == item["Raw"]["Data"]
    assert f'filename="{uuid}.eml"' in headers["Content-Disposition"]
    assert headers["Content-Security-Policy"] == "sandbox"
    status, data, headers = request(port, "GET", f"/api/v1/messages/{uuid}/mime/part/1/download")
    assert status == 200
    assert data.decode() == EXPECT["attached"]["attachment"]  # base64 decoded
    assert headers["Content-Type"].startswith("text/csv")
    assert 'filename="report.csv"' in headers["Content-Disposition"]
    status, data, headers = request(port, "GET", f"/api/v1/messages/{uuid}/mime/part/0/download")
    assert data.decode().strip() == EXPECT["attached"]["text"]  # quoted-printable decoded
    assert headers["Content-Disposition"].startswith("attachment;")
    for path, code in ((f"/api/v1/messages/{uuid}/mime/part/2/download", 404),
                       (f"/api/v1/messages/{uuid}/mime/part/x/download", 400),
                       ("/api/v1/messages/nope/download", 404),
                       ("/api/v1/messages/nope/mime/part/0/download", 404)):
        assert request(port, "GET", path)[0] == code, path


def test_hostile_message_never_served_as_a_page(hog: MailpipeServer) -> None:
    """A part claiming text/html, with headers that would be ours if passed on, is served as
    a sandboxed download under our headers."""
    send(hog.smtp_port, "Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
         "--b\r\nContent-Type: text/html\r\nSet-Cookie: session=stolen\r\n"
         "Content-Disposition: inline\r\n\r\n<script>alert(1)</script>\r\n--b--\r\n")
    uuid = hog.wait_for_messages(1)[0]["uuid"]
    port = hog.extra_ports["mailhog"]
    status, data, headers = request(port, "GET", f"/api/v1/messages/{uuid}/mime/part/0/download")
    assert status == 200 and b"<script>" in data
    assert "Set-Cookie" not in headers
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["Content-Security-Policy"] == "sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_odd_messages_still_shaped(hog: MailpipeServer) -> None:
    """Bare LF, no blank line, folded and repeated headers, nested multiparts: split as
    MailHog would, never an error."""
    send(hog.smtp_port, b"Subject: folded\r\n  on two lines\r\nX-Tag: a\r\nX-Tag: b\r\n"
         b"Content-Type: multipart/mixed; boundary=\"out\"\r\n\r\npreamble\r\n--out\r\n"
         b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n"
         b"Content-Type: text/plain\r\n\r\ninner text\r\n--in--\r\n--out\r\n"
         b"Content-Type: text/plain\r\n\r\nsecond\r\n--out--\r\n")
    send(hog.smtp_port, b"no headers at all, just words\r\n")
    hog.wait_for_messages(2)
    _, result = http_get(hog.extra_ports["mailhog"], "/api/v2/messages")
    bare, nested = result["items"]
    assert bare["Content"]["Headers"] == {
        name: bare["Content"]["Headers"][name] for name in ("Message-ID", "Received",
                                                            "Return-Path")}
    assert "just words" in bare["Content"]["Body"]
    headers = nested["Content"]["Headers"]
    assert headers["Subject"] == ["folded  on two lines"]
    assert headers["X-Tag"] == ["a", "b"]
    outer = nested["MIME"]["Parts"]
    assert len(outer) == 2 and outer[1]["Body"] == "second"
    assert outer[0]["MIME"]["Parts"][0]["Body"] == "inner text"


def test_outgoing_smtp(hog: MailpipeServer) -> None:
    assert http_get(hog.extra_ports["mailhog"], "/api/v2/outgoing-smtp") == (200, {})


def jim(server: MailpipeServer, method: str, body: Any = None,
        place: str = "own") -> tuple[int, Any]:
    port, base = places(server)[place]
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body)
                                      .encode())
    headers = {"Content-Type": "application/json"} if data is not None else {}
    status, answer, _ = request(port, method, base + "/api/v2/jim", headers, data)
    return status, json.loads(answer) if answer else None


def test_jim_fails_smtp_sessions_while_invited(hog: MailpipeServer) -> None:
    """Jim invited, changed and sent away through the API, his chances at 0 or 1 so that
    each SMTP session's fate is certain; one Jim for both places the API is served."""
    for method in ("GET", "PUT", "DELETE"):
        status, answer = jim(hog, method, {} if method == "PUT" else None)
        assert status == 404 and "not invited" in answer["error"], method
    # A field left out is 0, as MailHog decodes it: here only senders are refused.
    status, answer = jim(hog, "POST", {"AcceptChance": 1, "RejectSenderChance": 1},
                         place="prefix")
    assert status == 201
    assert answer == {**dict.fromkeys(answer, 0.0), "AcceptChance": 1.0,
                      "RejectSenderChance": 1.0}
    assert jim(hog, "GET") == (200, answer)
    assert jim(hog, "POST", {})[0] == 400  # already invited
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(hog.smtp_port, "Subject: x\r\n\r\ny\r\n")
    assert refused.value.smtp_code == 550
    jim(hog, "PUT", {"AcceptChance": 1, "rejectrecipientchance": 1})  # any case, as Go
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(hog.smtp_port, "Subject: x\r\n\r\ny\r\n")
    jim(hog, "PUT", {"AcceptChance": 1, "RejectAuthChance": 1})
    with smtplib.SMTP("127.0.0.1", hog.smtp_port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as auth:
            client.login("user", "pass")
        assert auth.value.smtp_code == 535
    # Dropped at the first command, turned away at connect: mailpipe says 421 as it closes,
    # which the client reads unless the close overtakes it.
    jim(hog, "PUT", {"AcceptChance": 1, "DisconnectChance": 1})
    with pytest.raises((smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected)) as cut:
        send(hog.smtp_port, "Subject: x\r\n\r\ny\r\n")
    assert getattr(cut.value, "smtp_code", 421) == 421
    jim(hog, "PUT", {"AcceptChance": 0})
    with pytest.raises((smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)) as cut:
        send(hog.smtp_port, "Subject: x\r\n\r\ny\r\n")
    assert getattr(cut.value, "smtp_code", 421) == 421
    assert hog.messages() == []
    assert jim(hog, "DELETE", place="prefix") == (200, None)
    assert jim(hog, "GET")[0] == 404
    send(hog.smtp_port, "Subject: Jim has gone\r\n\r\ny\r\n")
    assert [m["subject"] for m in hog.messages()] == ["Jim has gone"]


def test_jim_settings_are_checked(hog: MailpipeServer) -> None:
    cases = [
        (b"not json", "JSON object"),
        (b"[1]", "JSON object"),
        ({"AcceptChance": 2}, "AcceptChance must be a chance from 0 to 1"),
        ({"DisconnectChance": "0.5"}, "DisconnectChance must be a number"),
        ({"AcceptChance": True}, "AcceptChance must be a number"),
        ({"LinkSpeedMin": -1}, "LinkSpeedMin must not be negative"),
        ({"LinkSpeedMin": 5000, "LinkSpeedMax": 10}, "LinkSpeedMin must not be more"),
        ({"Sleepiness": 1}, "unknown setting 'Sleepiness'"),
    ]
    for body, why in cases:
        status, answer = jim(hog, "POST", body)
        assert status == 400 and why in answer["error"], body
    assert jim(hog, "GET")[0] == 404  # none of them invited him
    status, defaults = jim(hog, "POST", b"")  # no body: MailHog's defaults
    assert status == 201 and defaults["AcceptChance"] == 0.99
    assert defaults["RejectSenderChance"] == 0.05 and defaults["LinkSpeedMax"] == 10240
    status, answer = jim(hog, "PUT", {"AcceptChance": 7})
    assert status == 400 and jim(hog, "GET") == (200, defaults)  # unchanged


def test_jim_invited_at_start(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"compat": {"mailhog": {"invite_jim": True}}})
    status, settings = http_get(server.http_port, PREFIX + "/api/v2/jim")
    assert status == 200 and settings["DisconnectChance"] == 0.005


class Relay:
    """A real SMTP server (aiosmtpd) the release delivers to."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.arrived = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        self.arrived.set()
        return "250 OK"


def test_release_to_a_real_smtp_server(filled: MailpipeServer) -> None:
    relay = Relay()
    controller = Controller(relay, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        port = filled.extra_ports["mailhog"]
        _, result = http_get(port, "/api/v2/search?kind=from&query=cron@example.com")
        uuid = result["items"][0]["ID"]
        body = json.dumps({"Host": "127.0.0.1", "Port": str(controller.port),
                           "Email": "someone@example.net"}).encode()
        status, answer, _ = request(port, "POST", f"/api/v1/messages/{uuid}/release",
                                    {"Content-Type": "application/json"}, body)
        assert (status, answer) == (200, b"")
        assert relay.arrived.wait(10)
        mail_from, rcpt, content = relay.received[0]
        assert (mail_from, rcpt) == ("cron@example.com", ["someone@example.net"])
        assert b"The nightly kumquat job finished." in content
    finally:
        controller.stop()


def test_release_errors(filled: MailpipeServer) -> None:
    port = filled.extra_ports["mailhog"]
    _, result = http_get(port, "/api/v2/messages?limit=1")
    uuid = result["items"][0]["ID"]
    json_type = {"Content-Type": "application/json"}
    closed = free_port()  # nothing listens there
    cases = [
        (b"not json", 400, "JSON"),
        (b"[]", 400, "JSON object"),
        (b'{"Host": "127.0.0.1", "Port": "25"}', 400, "Email"),
        (b'{"Host": "127.0.0.1", "Port": "0", "Email": "a@b"}', 400, "Port"),
        (b'{"Host": "127.0.0.1", "Port": "x", "Email": "a@b"}', 400, "Port"),
        (b'{"Host": "h", "Port": "25", "Email": "a@b", "Mechanism": "NTLM"}', 400, "NTLM"),
        (b'{"Name": "saved"}', 400, "saved"),
        (b'{"Host": "h", "Port": "25", "Email": "a@b", "Evil": 1}', 400, "evil"),
        (json.dumps({"Host": "127.0.0.1", "Port": closed, "Email": "a@b"}).encode(), 502,
         "release failed"),
    ]
    for body, code, why in cases:
        status, answer, _ = request(port, "POST", f"/api/v1/messages/{uuid}/release",
                                    json_type, body)
        assert status == code, (body, answer)
        assert why in json.loads(answer)["error"], (body, answer)
    status, _, _ = request(port, "POST", "/api/v1/messages/nope/release", json_type, b"{}")
    assert status == 404


def test_events_stream_new_messages(hog: MailpipeServer) -> None:
    port = hog.extra_ports["mailhog"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/api/v1/events")
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        send(hog.smtp_port, "Subject: live one\r\n\r\nstreamed\r\n")
        lines: list[bytes] = []
        while not (lines and lines[-1] == b"\n" and any(x.startswith(b"data: {") for x in lines)):
            lines.append(response.fp.readline())
        # Plain `message` events, as MailHog's UI listens for them.
        assert not any(x.startswith(b"event:") for x in lines)
        data = next(x for x in lines if x.startswith(b"data: {"))
        message = json.loads(data[len(b"data: "):])
        assert message["Content"]["Headers"]["Subject"] == ["live one"]
        assert message["ID"] == hog.messages()[0]["uuid"]
    finally:
        conn.close()


def test_events_in_a_browser_event_source(hog: MailpipeServer, browser: Any) -> None:
    """Chromium's EventSource reads the stream as MailHog's UI does: `message` events whose
    data is the message JSON."""
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{hog.extra_ports['mailhog']}/api/v2/outgoing-smtp")
        page.evaluate("""() => new Promise(opened => {
            window.got = []
            const source = new EventSource('/api/v1/events')
            source.addEventListener('message', e => window.got.push(JSON.parse(e.data)))
            source.onopen = opened
        })""")
        send(hog.smtp_port, "Subject: to the browser\r\n\r\nlive\r\n")
        page.wait_for_function("window.got.length > 0", timeout=10_000)
        got = page.evaluate("window.got")
        assert got[0]["Content"]["Headers"]["Subject"] == ["to the browser"]
        assert got[0]["ID"] == hog.messages()[0]["uuid"]
    finally:
        page.close()


def test_guard_protects_the_compat_api(filled: MailpipeServer) -> None:
    """A page on another origin cannot delete, and a rebound name cannot read, on either
    place the API is served."""
    for port, base in places(filled).values():
        status, body, _ = request(port, "DELETE", base + "/api/v1/messages",
                                  {"Origin": "http://evil.example"})
        assert status == 403 and b"cross-origin" in body
        status, body, _ = request(port, "GET", base + "/api/v2/messages",
                                  {"Host": f"evil.example:{port}"})
        assert status == 403 and b"DNS rebinding" in body
        status, body, _ = request(port, "POST", base + "/api/v1/messages/x/release",
                                  {"Content-Type": "text/plain"}, b"{}")
        assert status == 415
    assert len(filled.messages()) == 3


# ---- OpenAPI ------------------------------------------------------------------------------


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    # The app as the server builds it, unstarted: its routes are all this looks at.
    config, _ = load_config(cwd=tmp_path, overrides={"data_dir": str(tmp_path / "data")})
    compat = Mailpipe(config)._compat_app("mailhog")
    served = {(PREFIX + route.resource.canonical, route.method.lower())
              for route in compat.router.routes() if route.method != "HEAD"}
    doc = json.loads(openapi_document())
    documented = {(path, method) for path, item in doc["paths"].items()
                  if path.startswith(PREFIX + "/") for method in item if method != "parameters"}
    assert documented == served


def test_openapi_shapes_match(filled: MailpipeServer) -> None:
    doc = filled.get_json("/api/openapi.json")

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    port = filled.extra_ports["mailhog"]
    _, page = http_get(port, "/api/v2/messages")
    check(page, "MailHogMessages")
    check(http_get(port, f"/api/v1/messages/{page['items'][0]['ID']}")[1], "MailHogMessage")
    check(http_get(port, "/api/v2/search?kind=to")[1], "Error")


# ---- a Python client from PyPI ------------------------------------------------------------


def test_pypi_mailhog_client(hog: MailpipeServer) -> None:
    """`mailhog` from PyPI (it has no base path option, so on the API's own listener)."""
    send_roundtrip_emails(hog.smtp_port)
    hog.wait_for_messages(3)
    client = pypi_mailhog.Mailhog("127.0.0.1", hog.extra_ports["mailhog"])
    messages = client.messages()
    assert (messages.total, messages.count, messages.start) == (3, 3, 0)
    newest = messages.items[0]
    assert newest.get_sender() == EXPECT["plain"]["from"]
    assert newest.get_recipients() == [EXPECT["plain"]["to"]]
    assert newest.get_subject() == EXPECT["plain"]["subject"]
    assert newest.content.body.strip() == EXPECT["plain"]["text"]
    html = client.search(EXPECT["html"]["cc"], "to")
    assert html.total == 1
    assert html.items[0].get_recipients() == [EXPECT["html"]["to"], EXPECT["html"]["cc"]]
    assert len(html.items[0].mime.parts) == 2
    assert client.search("kumquat").items[0].id == newest.id
    client.delete(newest)
    assert client.messages().total == 2
    client.delete_all()
    assert client.messages().total == 0


# ---- hostile bytes ------------------------------------------------------------------------

PIECES = [b"\r\n", b"\n", b"\r", b"--b", b"--b--", b": ", b":", b" ", b"\t", b"\xff", b"\x00",
          "é".encode(), b"=", b"QUJD", b"Content-Type: multipart/mixed; boundary=b",
          b'Content-Type: multipart/alternative; boundary=""', b"Content-Transfer-Encoding: base64",
          b'Content-Disposition: attachment; filename="x\r"', b"=?utf-8?q?x?="]
EVENT = {"uuid": "u", "envelope": {"from": "a@b", "to": ["c@d"], "helo": "h"},
         "received_at": "2026-01-01T00:00:00Z"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_any_bytes_become_a_message(pieces: list[bytes]) -> None:
    """Whatever a sender wrote is shaped, serialisable, and its parts downloadable."""
    message = message_json(EVENT, b"".join(pieces))
    orjson.dumps(message)
    for index in range(3):
        part = part_at(message["MIME"], index)
        if part is not None:
            assert isinstance(decoded_body(part), bytes)
            part_filename(part)
