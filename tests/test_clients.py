"""End to end through the front door: real SMTP clients, a real `mailpipe serve`, real sockets.

Clients: Python's smtplib, aiosmtplib (plus hand-written pipelining and BDAT over asyncio
streams and plain sockets), swaks, msmtp, and PHP's Symfony Mailer and PHPMailer from
Debian's packages (scripts in tests/php/). Each test starts its own mailpipe, sends, then
reads the REST API: every event fetched is validated against the schema and its `raw`
checked against `/raw`. A 250 is only sent once the store has committed the email, so the
API is read right after the client returns, never polled.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import smtplib
import socket
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiosmtplib
import pytest

from conftest import MailpipeServer, missing, require_tool

Validate = Callable[[dict[str, Any]], None]
Factory = Callable[..., MailpipeServer]

CONFIG: dict[str, Any] = {
    "smtp": {"include_raw": True, "transcript": True},
    "store": {"max_messages": 10_000},
}
# CRAM-MD5 is offered only when configured: clients prefer it, and the password is lost.
WITH_CRAM: dict[str, Any] = {
    **CONFIG,
    "smtp": {**CONFIG["smtp"], "auth": {"mechanisms": ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]}},
}
PHP_DIR = Path(__file__).resolve().parent / "php"
NO_AUTH = {"attempted": False, "mechanism": None, "username": None, "password": None}
V_BARE_LF = "bare LF line ending in message data"
V_EIGHT_BIT = "8-bit message data without BODY=8BITMIME or SMTPUTF8"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Api:
    """Reads one mailpipe back over its REST API, validating every event it returns."""

    def __init__(self, server: MailpipeServer, validate: Validate) -> None:
        self.server = server
        self.validate = validate

    def listing(self) -> dict[str, Any]:
        return self.server.get_json("/api/v1/messages?limit=1000")

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, oldest first."""
        listing = self.listing()
        assert listing["count"] == listing["total"]
        return [self.event(m["uuid"]) for m in reversed(listing["messages"])]

    def only(self) -> dict[str, Any]:
        events = self.events()
        assert len(events) == 1, [e["message"]["subject"] for e in events]
        return events[0]

    def event(self, uuid: str) -> dict[str, Any]:
        event = self.server.event(uuid)
        self.validate(event)
        assert event["uuid"] == uuid
        message = event["message"]
        raw = self.raw(uuid)
        assert message["size"] == len(raw)
        assert message["raw"].encode(message.get("raw_encoding", "utf-8")) == raw
        return event

    def raw(self, uuid: str) -> bytes:
        status, body, headers = self.server.request("GET", f"/api/v1/messages/{uuid}/raw")
        assert status == 200, body[:200]
        assert headers["Content-Type"].startswith("message/rfc822")
        return body

    def attachment(self, uuid: str, index: int) -> tuple[bytes, str, str]:
        """(decoded bytes, content type, download filename) of /attachments/{index}."""
        path = f"/api/v1/messages/{uuid}/attachments/{index}"
        status, body, headers = self.server.request("GET", path)
        assert status == 200, body[:200]
        disposition = headers["Content-Disposition"]
        extended = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition)
        plain = re.search(r'filename="([^"]*)"', disposition)
        name = unquote(extended.group(1)) if extended else plain.group(1) if plain else ""
        return body, headers["Content-Type"].split(";")[0].strip(), name

    def check_attachments(
        self, event: dict[str, Any], expected: list[tuple[str, bytes, str]]
    ) -> None:
        """Attachments are exactly `expected` [(filename, bytes, content type)], in order,
        in the event (memory mode: base64 content) and through /attachments/{i}."""
        got = event["attachments"]
        assert [a["filename"] for a in got] == [name for name, _, _ in expected]
        for index, (attachment, (name, data, content_type)) in enumerate(
            zip(got, expected, strict=True)
        ):
            assert attachment["content_type"] == content_type
            assert attachment["size"] == len(data)
            assert attachment["sha256"] == sha256(data)
            assert base64.b64decode(attachment["content"], validate=True) == data
            body, served_type, served_name = self.attachment(event["uuid"], index)
            assert body == data
            assert served_type == content_type
            assert served_name == name


@pytest.fixture
def server(mailpipe_factory: Factory) -> MailpipeServer:
    return mailpipe_factory(CONFIG)


@pytest.fixture
def api(server: MailpipeServer, validate_event: Validate) -> Api:
    return Api(server, validate_event)


@pytest.fixture
def cram_server(mailpipe_factory: Factory) -> MailpipeServer:
    return mailpipe_factory(WITH_CRAM)


def server_offering(request: pytest.FixtureRequest, mechanism: str) -> tuple[MailpipeServer, Api]:
    """The default server, or one with CRAM-MD5 added when `mechanism` needs it."""
    server = request.getfixturevalue("cram_server" if mechanism == "CRAM-MD5" else "server")
    return server, Api(server, request.getfixturevalue("validate_event"))


def transcript_challenge(event: dict[str, Any]) -> bytes:
    """The CRAM-MD5 challenge the server sent in this session, from the transcript."""
    transcript = event["session"]["transcript"]
    starts = [i for i, line in enumerate(transcript) if line.upper() == "C: AUTH CRAM-MD5"]
    reply = transcript[starts[0] + 1]
    assert reply.startswith("S: 334 "), reply
    return base64.b64decode(reply[len("S: 334 ") :])


def cram_digest(password: str, challenge: bytes) -> str:
    return hmac.new(password.encode("utf-8"), challenge, "md5").hexdigest()


def check_auth(event: dict[str, Any], mechanism: str, user: str, password: str) -> None:
    """The credentials the client sent are in the event (CRAM-MD5: as the digest)."""
    if mechanism == "CRAM-MD5":
        check_cram(event, user, password)
    else:
        assert event["authentication"] == {
            "attempted": True,
            "mechanism": mechanism,
            "username": user,
            "password": password,
        }


def check_cram(event: dict[str, Any], user: str, password: str) -> None:
    auth = event["authentication"]
    assert auth["attempted"] is True
    assert auth["mechanism"] == "CRAM-MD5"
    assert auth["username"] == user
    assert re.fullmatch(r"[0-9a-f]{32}", auth["password"])
    assert auth["password"] == cram_digest(password, transcript_challenge(event))


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# ---- smtplib ------------------------------------------------------------------------------


def test_smtplib_plain_send(server: MailpipeServer, api: Api) -> None:
    raw = crlf(
        "From: Alice <alice@example.test>\n"
        "To: bob@example.test, carol@example.test\n"
        "Subject: plain smtplib\n"
        "Message-ID: <plain-1@example.test>\n"
        "\n"
        "first line\n"
        ".a line that starts with a dot\n"
        "..two dots\n"
        ".\n"
        "last line\n"
    )
    with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="client.example.test") as s:
        refused = s.sendmail("alice@example.test", ["bob@example.test", "carol@example.test"], raw)
    assert refused == {}

    event = api.only()
    assert event["event"] == "EMAIL_RECEIVED"
    assert event["envelope"]["from"] == "alice@example.test"
    assert event["envelope"]["to"] == ["bob@example.test", "carol@example.test"]
    assert event["envelope"]["helo"] == "client.example.test"
    assert event["envelope"]["mail_options"] == [f"size={len(raw)}"]
    assert event["authentication"] == NO_AUTH
    assert event["remote_addr"].startswith("127.0.0.1:")
    assert event["session"]["local_addr"] == f"127.0.0.1:{server.smtp_port}"
    assert event["session"]["tls"] is False
    assert event["session"]["violations"] == []
    # smtplib dot-stuffed the dot lines; mailpipe unstuffed them: the bytes are ours again.
    assert api.raw(event["uuid"]) == raw
    message = event["message"]
    assert message["subject"] == "plain smtplib"
    assert message["message_id"] == "<plain-1@example.test>"
    assert message["headers"]["From"] == "Alice <alice@example.test>"
    assert message["text"] == raw.split(b"\r\n\r\n", 1)[1].decode()
    assert message["body"] == message["text"]
    assert message["html"] is None
    assert message["defects"] == []
    assert event["attachments"] == []
    transcript = event["session"]["transcript"]
    assert transcript[0] == "S: 220 localhost ESMTP mailpipe"
    assert "C: ehlo client.example.test" in transcript
    assert "C: rcpt TO:<carol@example.test>" in transcript


def test_smtplib_send_message_with_attachments(server: MailpipeServer, api: Api) -> None:
    pdf = os.urandom(30_000) + b"\r\n.\r\n" + os.urandom(100)
    csv = "name;city\nZoë;Zürich\n".encode()
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.test>"
    msg["To"] = "rcpt@example.test"
    msg["Subject"] = "Attachments — ünïcödé"
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content("text body ✓\n")
    msg.add_alternative("<p>html body ✓</p>\n", subtype="html")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="résumé 📎.pdf")
    msg.add_attachment(csv, maintype="text", subtype="csv", filename="données.csv")
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        assert smtp.send_message(msg) == {}

    event = api.only()
    assert event["envelope"]["from"] == "sender@example.test"
    assert event["envelope"]["to"] == ["rcpt@example.test"]
    message = event["message"]
    assert message["subject"] == "Attachments — ünïcödé"
    assert message["message_id"] == msg["Message-ID"]
    assert message["text"].replace("\r\n", "\n") == "text body ✓\n"
    assert message["html"].replace("\r\n", "\n") == "<p>html body ✓</p>\n"
    assert message["body"] == message["text"]
    api.check_attachments(
        event,
        [("résumé 📎.pdf", pdf, "application/pdf"), ("données.csv", csv, "text/csv")],
    )
    assert all(a["disposition"] == "attachment" for a in event["attachments"])


def test_smtplib_large_attachment_spooled(server: MailpipeServer, api: Api) -> None:
    # Above smtp.spool_threshold (1 MB): the body goes through a temp file while received.
    video = os.urandom(3 * 1024 * 1024)
    msg = EmailMessage()
    msg["From"] = "big@example.test"
    msg["To"] = "rcpt@example.test"
    msg["Subject"] = "three megabytes"
    msg.set_content("see attachment\n")
    msg.add_attachment(video, maintype="video", subtype="mp4", filename="clip.mp4")
    wire = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        assert smtp.sendmail("big@example.test", ["rcpt@example.test"], wire) == {}
    event = api.only()
    assert api.raw(event["uuid"]) == wire
    assert event["message"]["size"] == len(wire) > 4 * 1024 * 1024
    api.check_attachments(event, [("clip.mp4", video, "video/mp4")])


def _force_login(smtp: smtplib.SMTP, user: str, password: str) -> None:
    # What is advertised limits what `login` tries: only LOGIN is left.
    smtp.esmtp_features["auth"] = "LOGIN"
    smtp.login(user, password)


def _login_without_initial_response(smtp: smtplib.SMTP, user: str, password: str) -> None:
    smtp.user, smtp.password = user, password
    smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)


def _plain(smtp: smtplib.SMTP, user: str, password: str) -> None:
    smtp.user, smtp.password = user, password
    smtp.auth("PLAIN", smtp.auth_plain)


def _plain_without_initial_response(smtp: smtplib.SMTP, user: str, password: str) -> None:
    smtp.user, smtp.password = user, password
    smtp.auth("PLAIN", smtp.auth_plain, initial_response_ok=False)


@pytest.mark.parametrize(
    ("mechanism", "authenticate"),
    [
        ("LOGIN", _force_login),
        ("LOGIN", _login_without_initial_response),
        ("PLAIN", _plain),
        ("PLAIN", _plain_without_initial_response),
    ],
    ids=["login", "login-no-initial", "plain", "plain-no-initial"],
)
def test_smtplib_auth_captured(
    server: MailpipeServer,
    api: Api,
    mechanism: str,
    authenticate: Callable[[smtplib.SMTP, str, str], None],
) -> None:
    user, password = "dev@example.test", "p@ss word:with:colons"
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.ehlo()
        authenticate(smtp, user, password)
        smtp.sendmail("a@example.test", ["b@example.test"], b"Subject: auth\r\n\r\nhi\r\n")
    event = api.only()
    assert event["authentication"] == {
        "attempted": True,
        "mechanism": mechanism,
        "username": user,
        "password": password,
    }
    # The transcript keeps AUTH as the client sent it (the logs mask it, the event does not).
    assert any(line.startswith(f"C: AUTH {mechanism}") for line in event["session"]["transcript"])


def test_smtplib_xoauth2(server: MailpipeServer, api: Api) -> None:
    token = "ya29.token-value"
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.ehlo()
        assert "XOAUTH2" in smtp.esmtp_features["auth"].split()
        code, _ = smtp.auth(
            "XOAUTH2", lambda challenge=None: f"user=oauth@example.test\1auth=Bearer {token}\1\1"
        )
        assert code == 235
        smtp.sendmail("a@example.test", ["b@example.test"], b"Subject: oauth\r\n\r\nhi\r\n")
    assert api.only()["authentication"] == {
        "attempted": True,
        "mechanism": "XOAUTH2",
        "username": "oauth@example.test",
        "password": token,
    }


def test_smtplib_cram_md5(request: pytest.FixtureRequest) -> None:
    server, api = server_offering(request, "CRAM-MD5")
    user, password = "cram@example.test", "cram secret"
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        # smtplib prefers CRAM-MD5 when the server offers it.
        assert smtp.login(user, password)[0] == 235
        smtp.sendmail("a@example.test", ["b@example.test"], b"Subject: cram\r\n\r\nhi\r\n")
    check_cram(api.only(), user, password)


def test_smtplib_several_emails_on_one_connection(server: MailpipeServer, api: Api) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.login("same@example.test", "conn-pw")
        for i in range(3):
            raw = f"Subject: one connection {i}\r\n\r\nbody {i}\r\n".encode()
            smtp.sendmail(f"from{i}@example.test", [f"to{i}@example.test"], raw)
    events = api.events()
    assert [e["message"]["subject"] for e in events] == [f"one connection {i}" for i in range(3)]
    assert len({e["uuid"] for e in events}) == 3
    assert len({e["session"]["uuid"] for e in events}) == 1
    assert len({e["remote_addr"] for e in events}) == 1
    for i, event in enumerate(events):
        assert event["envelope"]["from"] == f"from{i}@example.test"
        assert event["envelope"]["to"] == [f"to{i}@example.test"]
        # AUTH belongs to the session: every email of it carries it.
        assert event["authentication"]["username"] == "same@example.test"
        # CRAM-MD5 is not offered by default: smtplib's next choice sends the password
        assert event["authentication"]["mechanism"] == "PLAIN"
        assert event["authentication"]["password"] == "conn-pw"
    assert [e["received_at"] for e in events] == sorted(e["received_at"] for e in events)


def test_smtplib_rset_noop_vrfy_help(server: MailpipeServer, api: Api) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.ehlo("helper.test")
        assert smtp.noop() == (250, b"2.0.0 Ok")
        code, text = smtp.verify("someone@example.test")
        assert code == 252
        assert text.startswith(b"2.1.5 ")
        code, help_text = smtp.docmd("HELP")
        assert code == 214
        assert help_text.startswith(b"2.0.0 ")
        for verb in (b"EHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"AUTH"):
            assert verb in help_text
        assert smtp.docmd("EXPN", "list")[0] == 502
        assert smtp.docmd("XYZZY")[0] == 500
        # A transaction abandoned with RSET leaves nothing behind.
        assert smtp.mail("dropped@example.test")[0] == 250
        assert smtp.rcpt("dropped-rcpt@example.test")[0] == 250
        assert smtp.rset() == (250, b"2.0.0 Ok")
        assert smtp.rcpt("orphan@example.test")[0] == 503  # no MAIL any more
        smtp.sendmail("kept@example.test", ["kept-rcpt@example.test"], b"Subject: k\r\n\r\nk\r\n")
    event = api.only()
    assert event["envelope"]["from"] == "kept@example.test"
    assert event["envelope"]["to"] == ["kept-rcpt@example.test"]
    assert event["envelope"]["helo"] == "helper.test"
    transcript = event["session"]["transcript"]
    for line in ("C: noop", "C: vrfy someone@example.test", "C: HELP", "C: rset", "C: EXPN list"):
        assert line in transcript
    assert "S: 502 5.5.1 Command not implemented" in transcript
    assert "unimplemented command EXPN" in event["session"]["violations"]


def test_smtplib_ehlo_features(server: MailpipeServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        code, _ = smtp.ehlo("features.test")
        assert code == 250
        for extension in (
            "pipelining",
            "size",
            "8bitmime",
            "smtputf8",
            "chunking",
            "enhancedstatuscodes",
            "auth",
        ):
            assert smtp.has_extn(extension), extension
        assert smtp.esmtp_features["size"] == str(10 * 1024 * 1024)
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "XOAUTH2"]
        # a mechanism not offered is refused
        assert smtp.docmd("AUTH", "CRAM-MD5") == (504, b"5.5.4 Unrecognized authentication type")
        assert not smtp.has_extn("starttls")  # no TLS configured
        # HELO answers without extensions.
        assert smtp.helo("plain-helo.test")[0] == 250


def test_smtplib_smtputf8_address(server: MailpipeServer, api: Api) -> None:
    sender, rcpt = "usér@exämple.test", "rcpt@ëxample.test"
    raw = crlf(f"From: {sender}\nTo: {rcpt}\nSubject: Grüße per SMTPUTF8\n\nünïcödé bödy\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8")
        refused = smtp.sendmail(sender, [rcpt], raw, mail_options=["SMTPUTF8"])
        assert refused == {}
    event = api.only()
    assert event["envelope"]["from"] == sender
    assert event["envelope"]["to"] == [rcpt]
    assert "SMTPUTF8" in event["envelope"]["mail_options"]
    assert event["session"]["violations"] == []
    assert api.raw(event["uuid"]) == raw
    assert event["message"]["headers"]["From"] == sender
    assert event["message"]["subject"] == "Grüße per SMTPUTF8"
    assert event["message"]["text"] == "ünïcödé bödy\r\n"
    assert event["message"]["raw_encoding"] == "utf-8"


@pytest.mark.parametrize(
    ("options", "violations"),
    [([], [V_EIGHT_BIT]), (["BODY=8BITMIME"], [])],
    ids=["undeclared", "8bitmime"],
)
def test_smtplib_8bit_body(
    server: MailpipeServer, api: Api, options: list[str], violations: list[str]
) -> None:
    raw = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve café\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as smtp:
        smtp.sendmail("a@example.test", ["b@example.test"], raw, mail_options=options)
    event = api.only()
    assert event["session"]["violations"] == violations
    assert api.raw(event["uuid"]) == raw
    assert event["message"]["text"] == "naïve café\r\n"


# ---- aiosmtplib and hand-written async/raw clients -----------------------------------------


def _async_message(subject: str, to: str = "rcpt@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "async@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"body of {subject}\n")
    return msg


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_aiosmtplib_auth(request: pytest.FixtureRequest, mechanism: str) -> None:
    server, api = server_offering(request, mechanism)
    user, password = "async-user", "async pässword ✓"
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, start_tls=False)
    async with smtp:
        method = {
            "PLAIN": smtp.auth_plain,
            "LOGIN": smtp.auth_login,
            "CRAM-MD5": smtp.auth_crammd5,
        }[mechanism]
        response = await method(user, password)
        assert response.code == 235
        errors, _ = await smtp.send_message(_async_message(f"aiosmtplib {mechanism}"))
        assert errors == {}
    event = await asyncio.to_thread(api.only)
    assert event["message"]["subject"] == f"aiosmtplib {mechanism}"
    check_auth(event, mechanism, user, password)


async def test_aiosmtplib_smtputf8_and_helo(server: MailpipeServer, api: Api) -> None:
    msg = _async_message("async utf8", to="ünï@exämple.test")
    errors, _ = await aiosmtplib.send(
        msg, hostname="127.0.0.1", port=server.smtp_port, start_tls=False, local_hostname="a.test"
    )
    assert errors == {}
    event = await asyncio.to_thread(api.only)
    assert event["envelope"]["to"] == ["ünï@exämple.test"]
    assert event["envelope"]["helo"] == "a.test"
    assert "SMTPUTF8" in event["envelope"]["mail_options"]
    assert event["message"]["headers"]["To"] == "ünï@exämple.test"


async def test_aiosmtplib_50_concurrent_sends(server: MailpipeServer, api: Api) -> None:
    subjects = [f"concurrent #{i:02d}" for i in range(50)]

    async def send(i: int) -> None:
        errors, response = await aiosmtplib.send(
            _async_message(subjects[i], to=f"rcpt{i}@example.test"),
            hostname="127.0.0.1",
            port=server.smtp_port,
            start_tls=False,
            timeout=30,
        )
        assert errors == {}, response

    await asyncio.gather(*(send(i) for i in range(50)))
    listing = await asyncio.to_thread(api.listing)
    assert listing["total"] == 50
    summaries = listing["messages"]
    assert sorted(m["subject"] for m in summaries) == subjects  # each exactly once
    assert len({m["uuid"] for m in summaries}) == 50
    events = await asyncio.to_thread(api.events)
    for event in events:
        i = subjects.index(event["message"]["subject"])
        assert event["envelope"]["to"] == [f"rcpt{i}@example.test"]
        assert event["message"]["text"] == f"body of {subjects[i]}\r\n"
    assert len({e["session"]["uuid"] for e in events}) == 50


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        assert line.endswith(b"\r\n"), f"connection closed: {lines!r} {line!r}"
        lines.append(line[4:-2].decode())
        if line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


async def test_pipelined_session_async(server: MailpipeServer, api: Api) -> None:
    """RFC 2920 as aiosmtplib would need it (it does not pipeline): whole groups of commands,
    bodies and the next transaction in single writes, replies read afterwards."""
    bodies = [crlf(f"Subject: pipelined {i}\n\nbody {i}\n.dot\n") for i in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.smtp_port)
    try:
        assert (await _read_reply(reader))[0] == 220
        writer.write(b"EHLO pipe.test\r\n")
        code, features = await _read_reply(reader)
        assert code == 250
        assert "PIPELINING" in features.splitlines()

        def envelope(i: int) -> bytes:
            return (
                f"MAIL FROM:<p{i}@example.test>\r\n"
                f"RCPT TO:<r{i}a@example.test>\r\nRCPT TO:<r{i}b@example.test>\r\nDATA\r\n"
            ).encode()

        def stuffed(body: bytes) -> bytes:
            return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"

        writer.write(envelope(0))
        for i in range(3):
            assert [(await _read_reply(reader))[0] for _ in range(4)] == [250, 250, 250, 354]
            tail = envelope(i + 1) if i < 2 else b"QUIT\r\n"
            writer.write(stuffed(bodies[i]) + tail)  # the body and what follows, one write
            code, text = await _read_reply(reader)
            assert code == 250, text
        assert (await _read_reply(reader))[0] == 221
    finally:
        writer.close()
        await writer.wait_closed()

    events = await asyncio.to_thread(api.events)
    assert len(events) == 3
    for i, event in enumerate(events):
        assert event["envelope"]["from"] == f"p{i}@example.test"
        assert event["envelope"]["to"] == [f"r{i}a@example.test", f"r{i}b@example.test"]
        assert event["envelope"]["helo"] == "pipe.test"
        assert await asyncio.to_thread(api.raw, event["uuid"]) == bodies[i]


def _raw_reply(reader: Any) -> tuple[int, bytes]:
    lines = []
    while True:
        line = reader.readline()
        assert line.endswith(b"\r\n"), f"connection closed: {lines!r} {line!r}"
        lines.append(line[4:-2])
        if line[3:4] != b"-":
            return int(line[:3]), b"\n".join(lines)


def test_bdat_chunking_binary(server: MailpipeServer, api: Api) -> None:
    """aiosmtplib has no CHUNKING, so BDAT goes over a plain socket: the bytes, exactly."""
    body = (
        b"\r\n.\r\n"  # an SMTP terminator inside: meaningless to BDAT
        + bytes(range(256))
        + b"\n.\n\r.\r\x00\xff"
        + os.urandom(5000)
        + b"\r\n.\r\n"
    )
    raw = b"Subject: BDAT binary\r\nContent-Type: application/octet-stream\r\n\r\n" + body
    chunks = [raw[:7], raw[7:3000], raw[3000:]]  # a border inside the header line
    with socket.create_connection(("127.0.0.1", server.smtp_port), timeout=15) as sock:
        reader = sock.makefile("rb")
        assert _raw_reply(reader)[0] == 220
        sock.sendall(b"EHLO chunky.test\r\n")
        code, features = _raw_reply(reader)
        assert b"CHUNKING" in features.split(b"\n")
        sock.sendall(
            b"MAIL FROM:<bin@example.test> BODY=BINARYMIME\r\nRCPT TO:<r@example.test>\r\n"
        )
        assert [_raw_reply(reader)[0] for _ in range(2)] == [250, 250]
        # RFC 3030 allows pipelining BDAT: all chunks and the LAST one in a single write.
        sock.sendall(
            b"".join(f"BDAT {len(c)}\r\n".encode() + c for c in chunks) + b"BDAT 0 LAST\r\n"
        )
        for chunk in chunks:
            code, text = _raw_reply(reader)
            assert code == 250
            assert text == f"2.0.0 {len(chunk)} bytes received".encode()
        code, text = _raw_reply(reader)
        assert code == 250, text
        # A second message on the same connection, one chunk marked LAST.
        second = b"Subject: BDAT second\r\n\r\nsmall\r\n"
        sock.sendall(
            b"MAIL FROM:<bin2@example.test>\r\nRCPT TO:<r2@example.test>\r\n"
            + f"BDAT {len(second)} LAST\r\n".encode()
            + second
            + b"QUIT\r\n"
        )
        assert [_raw_reply(reader)[0] for _ in range(4)] == [250, 250, 250, 221]
        reader.close()

    first, last = api.events()
    assert api.raw(first["uuid"]) == raw
    assert first["message"]["raw_encoding"] == "latin-1"
    assert first["message"]["size"] == len(raw)
    assert first["message"]["subject"] == "BDAT binary"
    assert first["envelope"]["mail_options"] == ["BODY=BINARYMIME"]
    assert api.raw(last["uuid"]) == second
    assert last["envelope"]["from"] == "bin2@example.test"
    assert first["uuid"] != last["uuid"]
    assert first["session"]["uuid"] == last["session"]["uuid"]


# ---- swaks ----------------------------------------------------------------------------------


def run_swaks(server: MailpipeServer, *args: str) -> str:
    swaks = require_tool("swaks")
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.smtp_port}", "--timeout", "15", *args],
        capture_output=True,
        timeout=60,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    return output


def test_swaks_pipeline(server: MailpipeServer, api: Api) -> None:
    output = run_swaks(
        server,
        "--pipeline",
        "--from", "swaks@example.test",
        "--to", "one@example.test,two@example.test",
        "--ehlo", "swaks-pipe.test",
        "--header", "Subject: swaks pipelined",
        "--body", "pipelined body",
    )  # fmt: skip
    # swaks' own trace: MAIL, both RCPTs and DATA went out before the first reply came back.
    lines = output.splitlines()
    sent_data = next(i for i, line in enumerate(lines) if line.strip() == "-> DATA")
    first_mail_reply = next(i for i, line in enumerate(lines) if "250 2.1.0" in line)
    assert sent_data < first_mail_reply, output
    event = api.only()
    assert event["envelope"]["from"] == "swaks@example.test"
    assert event["envelope"]["to"] == ["one@example.test", "two@example.test"]
    assert event["envelope"]["helo"] == "swaks-pipe.test"
    assert event["message"]["subject"] == "swaks pipelined"
    assert "pipelined body" in event["message"]["text"]
    assert event["session"]["violations"] == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth(request: pytest.FixtureRequest, mechanism: str) -> None:
    server, api = server_offering(request, mechanism)
    user, password = "swaks-user@example.test", "pässwörd with spaces"
    run_swaks(
        server,
        "--to", "rcpt@example.test",
        "--from", "swaks@example.test",
        "--auth", mechanism,
        "--auth-user", user,
        "--auth-password", password,
        "--header", f"Subject: swaks {mechanism}",
    )  # fmt: skip
    event = api.only()
    assert event["message"]["subject"] == f"swaks {mechanism}"
    check_auth(event, mechanism, user, password)


def test_swaks_attach_file(server: MailpipeServer, api: Api, tmp_path: Path) -> None:
    payload = os.urandom(70_000) + b"\r\n.\r\n\x00end"
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    run_swaks(
        server,
        "--to", "rcpt@example.test",
        "--from", "swaks@example.test",
        "--header", "Subject: swaks attachment",
        "--body", "see attachment",
        "--attach", f"@{path}",
    )  # fmt: skip
    event = api.only()
    assert event["message"]["subject"] == "swaks attachment"
    assert "see attachment" in event["message"]["text"]
    [attachment] = event["attachments"]
    assert attachment["filename"] == "payload.bin"
    assert attachment["content_type"] == "application/octet-stream"
    assert attachment["size"] == len(payload)
    assert attachment["sha256"] == sha256(payload)
    body, content_type, name = api.attachment(event["uuid"], 0)
    assert sha256(body) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert content_type == "application/octet-stream"
    assert name == "payload.bin"


def test_swaks_bare_lf_data(server: MailpipeServer, api: Api, tmp_path: Path) -> None:
    # --no-data-fixup sends the file as it is (swaks would otherwise turn LF into CRLF) and
    # adds only a CRLF, which after the final "." makes the terminator.
    content = b"Subject: bare lf\nFrom: lf@example.test\n\nline one\nline two\r\n"
    path = tmp_path / "bare-lf.eml"
    path.write_bytes(content + b".")
    run_swaks(
        server,
        "--to", "rcpt@example.test",
        "--from", "lf@example.test",
        "--ehlo", "bare-lf.test",
        "--data", f"@{path}",
        "--no-data-fixup",
    )  # fmt: skip
    event = api.only()
    assert api.raw(event["uuid"]) == content
    assert V_BARE_LF in event["session"]["violations"]
    assert event["envelope"]["helo"] == "bare-lf.test"
    assert event["message"]["subject"] == "bare lf"
    assert "line two" in event["message"]["text"]


def test_swaks_ehlo_and_data(server: MailpipeServer, api: Api, tmp_path: Path) -> None:
    data = b"Subject: swaks data\r\nX-Test: yes\r\n\r\n.starts with a dot\r\nend\r\n"
    path = tmp_path / "message.eml"
    path.write_bytes(data[:-2])  # swaks ends the data with CRLF "." CRLF itself
    run_swaks(
        server,
        "--to", "rcpt@example.test",
        "--from", "<>",  # the null sender
        "--ehlo", "my-ehlo-name.example.test",
        "--data", f"@{path}",
    )  # fmt: skip
    event = api.only()
    assert event["envelope"]["helo"] == "my-ehlo-name.example.test"
    assert event["envelope"]["from"] == ""
    assert event["envelope"]["to"] == ["rcpt@example.test"]
    # swaks dot-stuffed the first body line; it arrives as written.
    assert api.raw(event["uuid"]) == data
    assert event["message"]["headers"]["X-Test"] == "yes"
    assert event["session"]["violations"] == []


# ---- msmtp ----------------------------------------------------------------------------------


def test_msmtp_auth_plain(server: MailpipeServer, api: Api, tmp_path: Path) -> None:
    msmtp = require_tool("msmtp")
    body = "hello from msmtp\n.leading dot\nünïcödé\n"
    message = (
        "From: a@x.test\nTo: rcpt@x.test\nSubject: via msmtp\n"
        "Content-Type: text/plain; charset=utf-8\n\n" + body
    ).encode()
    command = [
        msmtp,
        "--host", "127.0.0.1",
        "--port", str(server.smtp_port),
        "--from", "a@x.test",
        "--auth=plain",
        "--user", "u",
        "--passwordeval", "echo pw",
        "--tls=off",
        "--domain=msmtp.test",
        "rcpt@x.test",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        input=message,
        capture_output=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},  # no ~/.msmtprc of the user's
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    event = api.only()
    assert event["envelope"]["from"] == "a@x.test"
    assert event["envelope"]["to"] == ["rcpt@x.test"]
    assert event["envelope"]["helo"] == "msmtp.test"
    assert event["authentication"] == {
        "attempted": True,
        "mechanism": "PLAIN",
        "username": "u",
        "password": "pw",
    }
    raw = api.raw(event["uuid"])
    # msmtp adds Date and Message-ID and sends CRLF; the rest is ours, dot line included.
    assert raw.endswith(crlf(body))
    assert b"\r\nSubject: via msmtp\r\n" in raw
    assert event["message"]["subject"] == "via msmtp"
    assert event["message"]["text"] == crlf(body).decode()


# ---- PHP: Symfony Mailer and PHPMailer -------------------------------------------------------


def run_php(script: str, request: dict[str, Any]) -> dict[str, Any]:
    php = require_tool("php")
    result = subprocess.run(
        [php, "-d", "display_errors=stderr", str(PHP_DIR / script)],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    return json.loads(output)


def require_php_library(path: str) -> None:
    require_tool("php")
    if not Path(path).is_file():
        missing(f"{path} is missing (make test installs it from Debian's packages)")


SYMFONY_AUTOLOAD = "/usr/share/php/Symfony/Component/Mailer/autoload.php"
PHPMAILER_AUTOLOAD = "/usr/share/php/libphp-phpmailer/autoload.php"


@pytest.mark.parametrize("offered", ["default", "CRAM-MD5"])
def test_symfony_mailer(request: pytest.FixtureRequest, tmp_path: Path, offered: str) -> None:
    require_php_library(SYMFONY_AUTOLOAD)
    server, api = server_offering(request, offered)
    pdf = os.urandom(50_000) + b"\r\n.\r\n"
    csv = "a;b\nä;ö\n".encode()
    (tmp_path / "cv.pdf").write_bytes(pdf)
    (tmp_path / "data.csv").write_bytes(csv)
    user, password = "sym@user", "päss word!"
    request = {
        "port": server.smtp_port,
        "helo": "symfony.test",
        "user": user,
        "password": password,
        "from": "sender@example.test",
        "from_name": "Sénder Näme",
        "to": ["alice@example.test", "bob@example.test"],
        "cc": ["carol@example.test"],
        "bcc": ["hidden@example.test"],
        "subject": "Symfony Grüße — résumé attached ✓",
        "text": "ünïcödé text body\n.dot line\n",
        "html": "<p>ünïcödé <b>html</b> body</p>",
        "attachments": [
            {
                "path": str(tmp_path / "cv.pdf"),
                "name": "résumé 📎.pdf",
                "content_type": "application/pdf",
            },
            {
                "path": str(tmp_path / "data.csv"),
                "name": "données.csv",
                "content_type": "text/csv",
            },
        ],
    }
    sent = run_php("symfony_send.php", request)
    rcpts = ["alice@example.test", "bob@example.test", "carol@example.test", "hidden@example.test"]
    assert sent["envelope_to"] == rcpts

    event = api.only()
    envelope = event["envelope"]
    assert envelope["from"] == "sender@example.test"
    assert envelope["to"] == rcpts
    assert envelope["helo"] == "symfony.test"
    # Symfony tries CRAM-MD5, LOGIN, PLAIN, XOAUTH2 in this order, the first one offered:
    # by default that is LOGIN, and the event holds the password the app was configured with.
    if offered == "CRAM-MD5":
        check_cram(event, user, password)
    else:
        check_auth(event, "LOGIN", user, password)
    message = event["message"]
    headers = {name.lower(): value for name, value in message["header_list"]}
    assert "bcc" not in headers  # Bcc is in the envelope only
    assert headers["to"] == "alice@example.test, bob@example.test"
    assert headers["cc"] == "carol@example.test"
    assert headers["from"] == "Sénder Näme <sender@example.test>"
    assert message["subject"] == request["subject"]
    assert message["message_id"].strip("<>") == sent["message_id"]
    assert message["text"].replace("\r\n", "\n") == request["text"]
    assert "<b>html</b>" in message["html"]
    api.check_attachments(
        event,
        [("résumé 📎.pdf", pdf, "application/pdf"), ("données.csv", csv, "text/csv")],
    )
    # Symfony dot-stuffed the ".dot line" of the text part; it arrives unstuffed.
    assert b"\r\n.dot line\r\n" in api.raw(event["uuid"])
    assert "250 2.0.0 Ok" in sent["debug"]


# "": PHPMailer picks (CRAM-MD5, LOGIN, PLAIN, XOAUTH2: the first one offered, LOGIN here)
@pytest.mark.parametrize("auth_type", ["", "LOGIN", "PLAIN", "CRAM-MD5"])
def test_phpmailer_keepalive(
    request: pytest.FixtureRequest, tmp_path: Path, auth_type: str
) -> None:
    require_php_library(PHPMAILER_AUTOLOAD)
    server, api = server_offering(request, auth_type)
    report = os.urandom(40_000)
    (tmp_path / "report.bin").write_bytes(report)
    user, password = f"phpm-{auth_type.lower() or 'auto'}", "πassword:with:colons"

    def message(i: int, attachments: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "from": f"from{i}@example.test",
            "from_name": f"PHPMailer {i}",
            "to": [f"to{i}@example.test"],
            "cc": [f"cc{i}@example.test"],
            "bcc": [f"bcc{i}@example.test"],
            "subject": f"PHPMailer #{i} ✉",
            "text": f"alt text {i} ünïcödé",
            "html": f"<h1>html {i} ✓</h1>",
            "attachments": attachments,
        }

    request = {
        "port": server.smtp_port,
        "helo": "phpmailer.test",
        "auth_type": auth_type,
        "user": user,
        "password": password,
        "messages": [
            message(0, [{
                "path": str(tmp_path / "report.bin"),
                "name": "rapport annuel 📊.bin",
                "content_type": "application/octet-stream",
            }]),
            message(1, []),
        ],
    }  # fmt: skip
    sent = run_php("phpmailer_send.php", request)

    events = api.events()
    assert len(events) == 2
    assert len({e["uuid"] for e in events}) == 2
    assert events[0]["session"]["uuid"] == events[1]["session"]["uuid"]  # one connection
    for i, event in enumerate(events):
        assert event["envelope"]["from"] == f"from{i}@example.test"
        assert event["envelope"]["to"] == [
            f"to{i}@example.test",
            f"cc{i}@example.test",
            f"bcc{i}@example.test",
        ]
        assert event["envelope"]["helo"] == "phpmailer.test"
        message_doc = event["message"]
        assert message_doc["subject"] == f"PHPMailer #{i} ✉"
        assert message_doc["message_id"] == sent["message_ids"][i]
        assert message_doc["text"].strip() == f"alt text {i} ünïcödé"
        assert message_doc["html"].strip() == f"<h1>html {i} ✓</h1>"
        names = {name.lower() for name, _ in message_doc["header_list"]}
        assert "bcc" not in names
        assert message_doc["headers"]["Cc"] == f"cc{i}@example.test"
        check_auth(event, auth_type or "LOGIN", user, password)
    api.check_attachments(
        events[0], [("rapport annuel 📊.bin", report, "application/octet-stream")]
    )
    assert events[1]["attachments"] == []
