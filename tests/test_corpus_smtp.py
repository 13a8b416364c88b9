"""Corpora round-tripped over SMTP through a real `mailpipe serve`.

* `tests/data/corpus/*.eml`: messages real mailers put on the wire, with a manifest of what
  each must turn into (envelope, AUTH, text/html fragments, attachments and their sha256).
  Sent with smtplib, checked in memory mode and again in tempfile mode.
* CPython's email test corpus (`test/test_email/data`, binary files included): every file
  sent over a raw socket, once as DATA (CRLF-normalised and dot-stuffed by hand) and once as
  BDAT chunks (the bytes exactly). Each must get 250 and come back byte for byte from `/raw`.

A 250 is only sent after the store committed the email, so the API is read right after it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import smtplib
import socket
import sysconfig
from collections.abc import Callable, Iterator
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from conftest import CORPUS, CORPUS_MANIFEST, MailpipeServer, start_mailpipe

Validate = Callable[[dict[str, Any]], None]

CONFIG: dict[str, Any] = {
    # the corpus was sent with CRAM-MD5 too, which is offered only when asked for
    "smtp": {"include_raw": True, "transcript": True,
             "auth": {"mechanisms": ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]}},
    "store": {"max_messages": 100_000},
}
MANIFEST = CORPUS_MANIFEST
CPYTHON_DATA = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
CPYTHON_FILES = sorted(p.name for p in CPYTHON_DATA.iterdir() if p.is_file())
# The manifest gives no CRAM-MD5 password (the digest is all that goes over the wire).
CRAM_PASSWORD = "cram pässword"
# uuids of the CPython corpus emails stored so far by this module's tests.
CPYTHON_STORED: list[str] = []
UUID_IN_REPLY = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- reading back through the API -------------------------------------------------------


def newest_uuid(server: MailpipeServer) -> str:
    found = server.get_json("/api/v1/messages?limit=1")["messages"]
    assert found, "nothing stored"
    return found[0]["uuid"]


def fetch_raw(server: MailpipeServer, uuid: str) -> bytes:
    status, body, headers = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200, body[:200]
    assert headers["Content-Type"].startswith("message/rfc822")
    return body


def fetch_event(server: MailpipeServer, uuid: str, validate: Validate) -> dict[str, Any]:
    """The event, validated, its `raw` consistent with `/raw`; returns (event)."""
    event = server.event(uuid)
    validate(event)
    assert event["uuid"] == uuid
    raw = fetch_raw(server, uuid)
    message = event["message"]
    assert message["size"] == len(raw)
    assert message["raw"].encode(message.get("raw_encoding", "utf-8")) == raw
    return event


def fetch_attachment(server: MailpipeServer, uuid: str, index: int) -> tuple[bytes, str, str]:
    """(bytes, content type, filename from Content-Disposition) of /attachments/{index}."""
    status, body, headers = server.request("GET", f"/api/v1/messages/{uuid}/attachments/{index}")
    assert status == 200, body[:200]
    disposition = headers["Content-Disposition"]
    extended = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition)
    plain = re.search(r'filename="([^"]*)"', disposition)
    assert extended or plain, disposition
    name = unquote(extended.group(1)) if extended else plain.group(1)  # type: ignore[union-attr]
    return body, headers["Content-Type"].split(";")[0].strip(), name


# ---- the corpus of real mailers, with smtplib ----------------------------------------------


def corpus_wire_bytes(entry: dict[str, Any]) -> bytes:
    """The file is dot-unstuffed DATA with CRLF line ends: exactly what /raw must return."""
    data = (CORPUS / entry["file"]).read_bytes()
    # smtplib sends bytes as they are (it only dot-stuffs and adds a final CRLF if missing),
    # so the comparison is exact only for CRLF files; make sure the corpus is one.
    assert re.search(rb"(?<!\r)\n", data) is None, f"{entry['file']} has bare LF line ends"
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def authenticate(smtp: smtplib.SMTP, mechanism: str, user: str, password: str) -> None:
    """AUTH over smtplib's connection.

    smtplib's own `auth()` encodes responses as ASCII (and CRAM-MD5 the password too), so it
    cannot send the corpus' UTF-8 credentials; those go through `docmd` instead, exactly as
    the mailers that produced the corpus sent them.
    """
    if (user + password).isascii():
        smtp.user, smtp.password = user, password
        method = {
            "PLAIN": smtp.auth_plain,
            "LOGIN": smtp.auth_login,
            "CRAM-MD5": smtp.auth_cram_md5,
        }[mechanism]
        code, _ = smtp.auth(mechanism, method)
        assert code == 235
        return

    def b64(text: str | bytes) -> str:
        raw = text.encode() if isinstance(text, str) else text
        return base64.b64encode(raw).decode("ascii")

    if mechanism == "PLAIN":
        code, _ = smtp.docmd("AUTH", "PLAIN " + b64(f"\0{user}\0{password}"))
    elif mechanism == "LOGIN":
        assert smtp.docmd("AUTH", "LOGIN")[0] == 334
        assert smtp.docmd(b64(user))[0] == 334
        code, _ = smtp.docmd(b64(password))
    else:
        code, challenge = smtp.docmd("AUTH", "CRAM-MD5")
        assert code == 334
        digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
        code, _ = smtp.docmd(b64(f"{user} {digest}"))
    assert code == 235


def cram_challenge(event: dict[str, Any]) -> bytes:
    """The CRAM-MD5 challenge the server sent, from the session transcript."""
    transcript = event["session"]["transcript"]
    start = next(i for i, line in enumerate(transcript) if line.upper() == "C: AUTH CRAM-MD5")
    reply = transcript[start + 1]
    assert reply.startswith("S: 334 "), reply
    return base64.b64decode(reply[len("S: 334 ") :])


def send_corpus_entry(server: MailpipeServer, entry: dict[str, Any]) -> tuple[str, str | None]:
    """Send one corpus message; returns (uuid, password used or None)."""
    password = None
    with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="corpus.test") as smtp:
        smtp.ehlo()
        if entry.get("auth_user") is not None:
            # No mechanism named (Symfony's entries): PLAIN, so the password is kept verbatim.
            mechanism = entry.get("auth_mech") or "PLAIN"
            password = entry.get("auth_pass")
            if password is None:
                password = CRAM_PASSWORD
            authenticate(smtp, mechanism, entry["auth_user"], password)
        refused = smtp.sendmail(entry["mail_from"], entry["rcpt"], corpus_wire_bytes(entry))
        assert refused == {}
    return newest_uuid(server), password


def check_corpus_event(
    server: MailpipeServer,
    uuid: str,
    entry: dict[str, Any],
    password: str | None,
    validate: Validate,
) -> dict[str, Any]:
    event = fetch_event(server, uuid, validate)
    sent = corpus_wire_bytes(entry)
    assert fetch_raw(server, uuid) == sent
    assert event["message"]["size"] == len(sent)

    envelope = event["envelope"]
    assert envelope["from"] == entry["mail_from"]
    assert envelope["to"] == entry["rcpt"]
    assert envelope["helo"] == "corpus.test"

    auth = event["authentication"]
    if entry.get("auth_user") is None:
        assert auth == {"attempted": False, "mechanism": None, "username": None, "password": None}
    else:
        mechanism = entry.get("auth_mech") or "PLAIN"
        assert auth["attempted"] is True
        assert auth["mechanism"] == mechanism
        assert auth["username"] == entry["auth_user"]
        if mechanism == "CRAM-MD5":
            assert password is not None
            expected = hmac.new(password.encode(), cram_challenge(event), "md5").hexdigest()
            assert auth["password"] == expected
        else:
            assert auth["password"] == entry["auth_pass"]

    message = event["message"]
    assert message["subject"] == entry["subject"]
    assert entry["text_contains"] in (message["text"] or "")
    assert message["body"] == message["text"]
    if "html_contains" in entry:
        assert entry["html_contains"] in (message["html"] or "")
    for name, values in entry.get("headers_multi", {}).items():
        found = [v for n, v in message["header_list"] if n.lower() == name.lower()]
        assert found == values
    assert "\r\n.\r\n" not in message["raw"]

    # The manifest lists attachments in the order the mailer was given them, the event in
    # document order (Symfony puts inline parts first): match them by filename.
    wanted = {a["filename"]: a for a in entry["attachments"]}
    assert len(wanted) == len(entry["attachments"])
    attachments = event["attachments"]
    assert sorted(a["filename"] for a in attachments) == sorted(wanted)
    for index, got in enumerate(attachments):
        want = wanted[got["filename"]]
        assert got["size"] == want["size"]
        assert got["sha256"] == want["sha256"]
        assert got["content_type"] == want["content_type"]
        body, content_type, name = fetch_attachment(server, uuid, index)
        assert sha256(body) == want["sha256"]
        assert len(body) == want["size"]
        assert content_type == want["content_type"]
        # The download name is the sender's, reduced to its last path component.
        assert name == re.split(r"[/\\]", want["filename"])[-1]
    return event


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_mailer_corpus_memory_mode(
    mailpipe_factory: Callable[..., MailpipeServer], validate_event: Validate, entry: dict[str, Any]
) -> None:
    server = mailpipe_factory(CONFIG)
    uuid, password = send_corpus_entry(server, entry)
    event = check_corpus_event(server, uuid, entry, password, validate_event)
    for got in event["attachments"]:
        assert "path" not in got
        assert sha256(base64.b64decode(got["content"], validate=True)) == got["sha256"]
    assert server.get_json("/api/v1/messages")["total"] == 1


def test_mailer_corpus_tempfile_mode(
    mailpipe_factory: Callable[..., MailpipeServer], validate_event: Validate, tmp_path: Path
) -> None:
    temp_dir = tmp_path / "outside" / "a" / "attachments"
    server = mailpipe_factory(
        {
            **CONFIG,
            "smtp": {
                **CONFIG["smtp"],
                "attachment_storage": {"mode": "tempfile", "temp_dir": str(temp_dir)},
            },
        }
    )
    real_dir = temp_dir.resolve()
    paths: set[Path] = set()
    for entry in MANIFEST:
        uuid, password = send_corpus_entry(server, entry)
        event = check_corpus_event(server, uuid, entry, password, validate_event)
        wanted = {a["filename"]: a for a in entry["attachments"]}
        for got in event["attachments"]:
            want = wanted[got["filename"]]
            assert "content" not in got
            path = Path(got["path"])
            assert path.is_absolute()
            assert path.resolve().parent == real_dir, (want["filename"], got["path"])
            assert sha256(path.read_bytes()) == want["sha256"]
            assert path.stat().st_size == want["size"]
            # The sender's name never picks the path.
            assert "passwd" not in path.name and ".." not in path.name
            paths.add(path)
    assert len(paths) == sum(len(e["attachments"]) for e in MANIFEST)
    assert set(real_dir.iterdir()) == {p.resolve() for p in paths}
    # "../../etc/passwd" resolved against temp_dir would land here: nothing may.
    assert not (tmp_path / "outside" / "etc").exists()
    assert not (temp_dir.parent / "etc").exists()


# ---- CPython's email test corpus, over a raw socket ---------------------------------------


class WireClient:
    """A minimal SMTP client on a plain socket: we decide every byte that goes out."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.reader = self.sock.makefile("rb")
        code, _ = self.reply()
        assert code == 220

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.reader.readline()
            assert line.endswith(b"\r\n"), f"connection closed mid-reply: {lines!r} {line!r}"
            lines.append(line[4:-2])
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> tuple[int, bytes]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.command("QUIT")
        finally:
            self.reader.close()
            self.sock.close()


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with '.' gets another one."""
    stuffed = body.replace(b"\n.", b"\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def crlf_normalised(data: bytes) -> bytes:
    """Bare LF becomes CRLF (lone CRs stay: they end no line), and the data ends with CRLF."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailpipeServer]:
    server = start_mailpipe(tmp_path_factory.mktemp("cpython-corpus"), CONFIG)
    try:
        yield server
    finally:
        server.stop()


def stdlib_defects(raw: bytes) -> set[str]:
    """Names of the defects policy.default records for these bytes, payloads decoded."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    names: set[str] = set()
    for part in msg.walk():
        if not part.is_multipart():
            try:
                part.get_payload(decode=True)
            except Exception:
                names.add("undecodable payload")
        names.update(type(d).__name__ for d in part.defects)
    return names


def check_cpython_capture(
    server: MailpipeServer, reply: tuple[int, bytes], expected_raw: bytes, validate: Validate
) -> dict[str, Any]:
    code, text = reply
    assert code == 250, text
    uuid = newest_uuid(server)
    assert uuid not in CPYTHON_STORED
    CPYTHON_STORED.append(uuid)
    queued = UUID_IN_REPLY.search(text)
    if queued:
        assert queued.group().decode() == uuid
    event = fetch_event(server, uuid, validate)
    assert fetch_raw(server, uuid) == expected_raw
    assert event["message"]["size"] == len(expected_raw)
    assert event["envelope"] == {
        "from": "corpus@sender.test",
        "to": ["corpus@rcpt.test"],
        "helo": "cpython-corpus.test",
        "mail_options": event["envelope"]["mail_options"],
        "rcpt_options": [[]],
    }
    defects = stdlib_defects(expected_raw)
    if defects:
        joined = "\n".join(event["message"]["defects"])
        missing = {name for name in defects if name not in joined}
        assert not missing, f"defects not listed: {missing}; listed: {joined[:500]}"
    for index, attachment in enumerate(event["attachments"]):
        body, _, _ = fetch_attachment(server, uuid, index)
        assert sha256(body) == attachment["sha256"]
        assert base64.b64decode(attachment["content"]) == body
    return event


@pytest.mark.parametrize("name", CPYTHON_FILES)
def test_cpython_corpus_data(
    corpus_server: MailpipeServer, validate_event: Validate, name: str
) -> None:
    expected = crlf_normalised((CPYTHON_DATA / name).read_bytes())
    client = WireClient(corpus_server.smtp_port)
    try:
        assert client.command("EHLO cpython-corpus.test")[0] == 250
        # SMTPUTF8 covers the 8-bit files, so no "8-bit without BODY=8BITMIME" violation.
        assert client.command("MAIL FROM:<corpus@sender.test> SMTPUTF8")[0] == 250
        assert client.command("RCPT TO:<corpus@rcpt.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        wire = dot_stuff(expected)
        client.send(wire + b".\r\n")
        event = check_cpython_capture(corpus_server, client.reply(), expected, validate_event)
    finally:
        client.close()
    assert event["envelope"]["mail_options"] == ["SMTPUTF8"]
    # CRLF only and SMTPUTF8 given: the one violation possible is RFC 5321's 1000-octet
    # line limit (CRLF included), which binary files break.
    too_long = any(len(line) + 1 > 1000 for line in wire.split(b"\n"))
    expected_violations = ["message data line longer than 1000 bytes"] if too_long else []
    assert event["session"]["violations"] == expected_violations


@pytest.mark.parametrize("name", CPYTHON_FILES)
def test_cpython_corpus_bdat(
    corpus_server: MailpipeServer, validate_event: Validate, name: str
) -> None:
    exact = (CPYTHON_DATA / name).read_bytes()
    client = WireClient(corpus_server.smtp_port)
    try:
        assert client.command("EHLO cpython-corpus.test")[0] == 250
        code, _ = client.command(
            f"MAIL FROM:<corpus@sender.test> BODY=BINARYMIME SIZE={len(exact)}"
        )
        assert code == 250
        assert client.command("RCPT TO:<corpus@rcpt.test>")[0] == 250
        # Uneven chunks, so chunk borders fall mid-line and mid-CRLF.
        chunks = [exact[i : i + 997] for i in range(0, len(exact), 997)]
        for chunk in chunks:
            client.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            code, text = client.reply()
            assert code == 250, text
        client.send(b"BDAT 0 LAST\r\n")
        event = check_cpython_capture(corpus_server, client.reply(), exact, validate_event)
    finally:
        client.close()
    assert event["envelope"]["mail_options"] == ["BODY=BINARYMIME", f"SIZE={len(exact)}"]


def test_cpython_corpus_all_stored(corpus_server: MailpipeServer) -> None:
    # Runs after the per-file tests (file order): every email they got a 250 for is still
    # there, each once.
    listing = corpus_server.get_json("/api/v1/messages?limit=1000")
    assert listing["total"] == len(CPYTHON_STORED)
    assert {m["uuid"] for m in listing["messages"]} == set(CPYTHON_STORED)


def test_corpus_files_present() -> None:
    assert len(MANIFEST) >= 7
    assert all((CORPUS / e["file"]).is_file() for e in MANIFEST)
    assert len(CPYTHON_FILES) >= 60
    assert os.path.isdir(CPYTHON_DATA)
