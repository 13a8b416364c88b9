"""The SMTP server's behaviour through real sockets against a real `mailpipe serve` process:
limits, timeouts, concurrency, big messages, pipelining, shutdown, TLS, sinks, HTTP auth,
logs, transcript, retention and start-up errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import select
import signal
import smtplib
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from conftest import (
    AsyncSMTP,
    InProc,
    MailpipeServer,
    free_port,
    port_of,
    read_reply,
    wait_until_ready,
)
from mailpipe.app import Mailpipe
from mailpipe.capture.verdicts import (
    Disconnect,
    Proceed,
    Respond,
    Stage,
    Verdict,
    VerdictContext,
)

Factory = Callable[..., MailpipeServer]

SENDER = "app@example.com"
RCPT = "dev@example.test"


# ---- helpers ----------------------------------------------------------------------------


def message(subject: str, body: str = "Hello from the tests.\r\n", to: str = RCPT) -> bytes:
    """A small RFC 5322 message with CRLF line endings, ending with CRLF."""
    text = (
        f"From: App <{SENDER}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{hashlib.sha1(subject.encode()).hexdigest()}@example.com>\r\n"
        "\r\n"
        f"{body}"
    )
    assert text.endswith("\r\n")
    return text.encode()


class RawSMTP:
    """A blocking SMTP client over a plain socket, for exact control of what is sent when."""

    def __init__(self, port: int, *, timeout: float = 10.0, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if greet:
            code, text = self.reply()
            assert code == 220, text

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed by the server; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        """One complete reply (all lines of a multi-line one): its code and its text."""
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "\n".join(x[4:].decode() for x in lines)

    def command(self, line: str) -> tuple[int, str]:
        self.send(line + "\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> str:
        got, text = self.command(line)
        assert got == code, f"{line!r}: expected {code}, got {got} {text}"
        return text

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF or reset) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
            if not chunk:
                return True
            self.buf += chunk
        return False

    def send_email(self, data: bytes, rcpts: tuple[str, ...] = (RCPT,)) -> tuple[int, str]:
        self.expect(f"MAIL FROM:<{SENDER}>", 250)
        for rcpt in rcpts:
            self.expect(f"RCPT TO:<{rcpt}>", 250)
        self.expect("DATA", 354)
        self.send(data + b".\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def metric(server: MailpipeServer, name: str, /, **labels: str) -> float:
    """The sum of a Prometheus sample over the series matching `labels`."""
    status, body, _ = server.request("GET", "/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        match = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not match or match[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; that value, or the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def by_subject(server: MailpipeServer, subject: str) -> dict[str, Any]:
    matches = [m for m in server.messages(limit=1000) if m["subject"] == subject]
    assert len(matches) == 1, f"{subject!r} stored {len(matches)} times"
    return server.event(matches[0]["uuid"])


def smtp(server: MailpipeServer, port: int | None = None) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port or server.smtp_port, timeout=15)


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("mailpipe-spool-*"))


# ---- limits -----------------------------------------------------------------------------


def test_size_parameter_above_max_message_size_is_refused_at_mail(
    mailpipe_factory: Factory,
) -> None:
    server = mailpipe_factory({"smtp": {"max_message_size": 10000}})
    client = RawSMTP(server.smtp_port)
    ehlo = client.expect("EHLO client.test", 250)
    assert "SIZE 10000" in ehlo.splitlines()
    code, text = client.command(f"MAIL FROM:<{SENDER}> SIZE=20000")
    assert code == 552, text
    assert text.startswith("5.3.4")
    # no transaction was opened: RCPT needs a MAIL first
    client.expect(f"RCPT TO:<{RCPT}>", 503)
    # a SIZE within the limit goes through on the same connection
    client.expect(f"MAIL FROM:<{SENDER}> SIZE=5000", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(message("within size") + b".\r\n")
    assert client.reply()[0] == 250
    client.expect("QUIT", 221)
    assert [m["subject"] for m in server.messages()] == ["within size"]


@pytest.mark.parametrize("chunked", [False, True], ids=["one-write", "many-writes"])
def test_oversize_data_is_read_to_its_end_then_refused_and_session_goes_on(
    mailpipe_factory: Factory, chunked: bool
) -> None:
    server = mailpipe_factory({"smtp": {"max_message_size": 10000, "spool_threshold": 4096}})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    big = message("too big", "".join(f"line {i:06d} " + "x" * 60 + "\r\n" for i in range(500)))
    assert len(big) > 30000
    if chunked:
        for start in range(0, len(big), 1000):
            client.send(big[start : start + 1000])
        client.send(b".\r\n")
    else:
        client.send(big + b".\r\n")
    code, text = client.reply()
    assert code == 552, text
    # the body was consumed: the very same connection sends a normal email
    code, text = client.send_email(message("small after big"))
    assert code == 250, text
    client.expect("QUIT", 221)
    summaries = server.messages()
    assert [m["subject"] for m in summaries] == ["small after big"]


def test_max_recipients(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"max_recipients": 3}})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    for n in range(3):
        client.expect(f"RCPT TO:<r{n}@example.test>", 250)
    code, text = client.command("RCPT TO:<r3@example.test>")
    assert code == 452, text
    client.expect("DATA", 354)
    client.send(message("three recipients") + b".\r\n")
    assert client.reply()[0] == 250
    client.expect("QUIT", 221)
    event = by_subject(server, "three recipients")
    assert event["envelope"]["to"] == [f"r{n}@example.test" for n in range(3)]


def test_max_line_length(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"max_line_length": 512}})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    # in one write
    code, text = client.command("NOOP " + "x" * 2000)
    assert code == 500, text
    client.expect("NOOP", 250)
    # dribbled in pieces: the over-long line is discarded to its end, once
    for _ in range(6):
        client.send("y" * 500)
    client.send("\r\nNOOP\r\n")
    assert client.reply()[0] == 500
    assert client.reply()[0] == 250
    # a line just within the limit is a command like any other
    client.expect(f"MAIL FROM:<{'a' * 480}@example.com>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(message("after long lines") + b".\r\n")
    assert client.reply()[0] == 250
    client.expect("QUIT", 221)
    event = by_subject(server, "after long lines")
    assert any("longer than 512" in v for v in event["session"]["violations"])


def test_max_connections(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"max_connections": 5}})
    clients = [RawSMTP(server.smtp_port) for _ in range(5)]  # each got its 220
    extra = RawSMTP(server.smtp_port, greet=False)
    code, text = extra.reply()
    assert code == 421, text
    assert extra.wait_closed(5)
    extra.close()
    # the first five are fully working
    for n, client in enumerate(clients):
        client.expect(f"EHLO c{n}.test", 250)
    code, _ = clients[0].send_email(message("one of five"))
    assert code == 250
    assert metric(server, "mailpipe_connections_refused_total", server="default") == 1
    assert metric(server, "mailpipe_connections_active", server="default") == 5
    # a freed slot is given to the next client
    clients[1].expect("QUIT", 221)
    clients[1].close()

    def admitted() -> bool:
        probe = RawSMTP(server.smtp_port, greet=False)
        try:
            return probe.reply()[0] == 220
        finally:
            probe.close()

    assert wait_for(admitted, timeout=5)
    for client in clients:
        client.close()
    assert by_subject(server, "one of five")["envelope"]["to"] == [RCPT]


# ---- timeouts ---------------------------------------------------------------------------


def test_idle_client_times_out(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"read_timeout": "1s"}})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    started = time.monotonic()
    client.sock.settimeout(6)
    code, text = client.reply()
    elapsed = time.monotonic() - started
    assert code == 421, text
    assert "timeout" in text.lower()
    assert 0.5 <= elapsed <= 3.5, elapsed
    assert client.wait_closed(3)
    client.close()
    assert "read timeout" in server.log()


def test_client_stalling_mid_data_times_out(mailpipe_factory: Factory, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = mailpipe_factory(
        {"smtp": {"read_timeout": "1s", "spool_threshold": 1000}}, env={"TMPDIR": str(spool)}
    )
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(message("never finished", "z" * 70 + "\r\n") * 100)  # spooled (> 1000 B)
    assert wait_for(lambda: spool_files(spool), timeout=5), "body was not spooled"
    started = time.monotonic()
    client.sock.settimeout(6)
    code, text = client.reply()
    assert code == 421, text
    assert time.monotonic() - started <= 3.5
    assert client.wait_closed(3)
    client.close()
    # the half-received body is dropped with its spool file, and nothing is stored
    assert wait_for(lambda: not spool_files(spool), timeout=3), spool_files(spool)
    assert server.get_json("/api/v1/messages")["total"] == 0


def test_client_disconnecting_mid_data_leaves_no_spool_file(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = mailpipe_factory({"smtp": {"spool_threshold": 1000}}, env={"TMPDIR": str(spool)})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(b"Subject: gone\r\n\r\n" + b"z" * 70_000)
    assert wait_for(lambda: spool_files(spool), timeout=5), "body was not spooled"
    client.close()
    assert wait_for(
        lambda: metric(server, "mailpipe_connections_active", server="default") == 0, timeout=5
    )
    assert wait_for(lambda: not spool_files(spool), timeout=3), spool_files(spool)


def test_client_not_reading_replies_is_dropped_after_write_timeout(
    mailpipe_factory: Factory,
) -> None:
    server = mailpipe_factory({"smtp": {"write_timeout": "1s"}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.smtp_port))
    sock.settimeout(2)
    started = time.monotonic()
    dropped = False
    with sock:
        # replies pile up unread until the server gives up on this client
        while not dropped and time.monotonic() - started < 20:
            try:
                sock.sendall(b"NOOP\r\n" * 10_000)
            except (ConnectionResetError, BrokenPipeError):
                dropped = True
            except TimeoutError:
                pass  # the server stopped reading too; the write timer still runs
    assert dropped, "the server never dropped a client that does not read"
    assert time.monotonic() - started < 15
    assert "write timeout" in server.log()
    # everyone else is still served
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("after a deaf client"))
    assert by_subject(server, "after a deaf client")["envelope"]["to"] == [RCPT]


def test_client_not_reading_replies_gets_backpressure(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"write_timeout": "60s"}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.smtp_port))
    sock.settimeout(3)
    chunk = b"NOOP\r\n" * 10_000
    sent = 0
    with sock:
        try:
            # 30 MB of commands is far more than the kernel's socket buffers can hold: it
            # only all goes through if the server keeps reading while nobody reads its replies
            while sent < 30_000_000:
                sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pass
    assert sent < 30_000_000, "the server read 30 MB of commands whose replies went unread"


def test_implicit_tls_client_that_never_handshakes_times_out(mailpipe_factory: Factory) -> None:
    port = free_port()
    mailpipe_factory(
        {
            "smtp": {
                "read_timeout": "1s",
                "servers": [
                    {
                        "name": "smtps",
                        "addr": f"127.0.0.1:{port}",
                        "tls": {"mode": "implicit", "self_signed": True},
                    }
                ],
            }
        }
    )
    silent = RawSMTP(port, greet=False)
    try:
        assert silent.wait_closed(4), "still open 4 s after connecting, with read_timeout 1s"
    finally:
        silent.close()


# ---- load -------------------------------------------------------------------------------


async def _pipelined_client(port: int, n: int, emails: int) -> list[tuple[int, str]]:
    """One connection sending `emails` emails, each body's end pipelined with the next
    MAIL/RCPT/DATA. Returns every reply after the greeting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[tuple[int, str]] = []
    try:
        assert (await read_reply(reader))[0] == 220
        envelope = f"MAIL FROM:<c{n}@example.com>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        writer.write(f"EHLO c{n}.test\r\n".encode() + envelope)
        for _ in range(4):  # EHLO, MAIL, RCPT, DATA
            replies.append(await read_reply(reader))
        for i in range(emails):
            last = i == emails - 1
            body = message(f"load c{n} m{i}") + b".\r\n"
            writer.write(body + (b"QUIT\r\n" if last else envelope))
            for _ in range(2 if last else 4):  # 250 for the body, then QUIT or MAIL/RCPT/DATA
                replies.append(await read_reply(reader))
    finally:
        writer.close()
        await writer.wait_closed()
    return replies


async def test_many_concurrent_pipelining_connections(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"max_connections_per_ip": 1000}})  # all from 127.0.0.1
    clients, emails = 200, 3
    results = await asyncio.wait_for(
        asyncio.gather(*(_pipelined_client(server.smtp_port, n, emails) for n in range(clients))),
        timeout=60,
    )
    for replies in results:
        codes = [code for code, _ in replies]
        assert codes == [250, 250, 250, 354] + [250, 250, 250, 354] * (emails - 1) + [250, 221]
        queued = [text for code, text in replies if text.startswith("2.0.0 Ok: queued as")]
        assert len(queued) == emails
    # every 250 came after its commit: all are listed at once, each exactly once
    listing = server.get_json("/api/v1/messages?limit=1000")
    assert listing["total"] == clients * emails
    subjects = [m["subject"] for m in listing["messages"]]
    expected = {f"load c{n} m{i}" for n in range(clients) for i in range(emails)}
    assert len(subjects) == len(expected)
    assert set(subjects) == expected
    assert metric(server, "mailpipe_emails_accepted_total") == clients * emails


def _big_message(attachment: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"App <{SENDER}>"
    msg["To"] = RCPT
    msg["Subject"] = "big one"
    msg.set_content("A big attachment follows.\n")
    msg.add_attachment(
        attachment, maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    raw = msg.as_bytes(policy=SMTP_POLICY)
    assert raw.endswith(b"\r\n") and b"\r\n." not in raw  # no dot-stuffing needed
    return raw


@pytest.mark.slow
def test_big_spooled_message_while_small_ones_keep_flowing(
    mailpipe_factory: Factory, tmp_path: Path, validate_event: Callable[[dict[str, Any]], None]
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = mailpipe_factory(
        {
            "smtp": {
                "max_message_size": "64MB",
                "spool_threshold": "1MB",
                "attachment_storage": {"mode": "tempfile", "temp_dir": str(tmp_path / "att")},
            }
        },
        env={"TMPDIR": str(spool)},
    )
    attachment = os.urandom(15 * 1024 * 1024)
    raw = _big_message(attachment)
    assert len(raw) > 20 * 1000 * 1000
    big = RawSMTP(server.smtp_port, timeout=60)
    big.expect("EHLO big.test", 250)
    big.expect(f"MAIL FROM:<{SENDER}> SIZE={len(raw)}", 250)
    big.expect(f"RCPT TO:<{RCPT}>", 250)
    big.expect("DATA", 354)
    half = len(raw) // 2
    big.send(raw[:half])
    # the body is on its way to a temp file, not held in memory
    assert wait_for(lambda: spool_files(spool), timeout=10), "big body was not spooled"

    # a small email on another connection completes while the big one is mid-transfer
    with smtp(server) as small:
        small.sendmail(SENDER, [RCPT], message("small during big"))
    # ...which is indeed still unfinished: its session has not said anything yet
    assert select.select([big.sock], [], [], 0)[0] == []

    big.send(raw[half:] + b".\r\n")
    # and one more while the big one is being parsed and committed
    started = time.monotonic()
    with smtp(server) as small:
        small.sendmail(SENDER, [RCPT], message("small while big commits"))
    assert time.monotonic() - started < 15
    code, text = big.reply()
    assert code == 250, text
    big.expect("QUIT", 221)
    big.close()

    assert not spool_files(spool)
    event = by_subject(server, "big one")
    validate_event(event)
    status, stored_raw, _ = server.request("GET", f"/api/v1/messages/{event['uuid']}/raw")
    assert status == 200
    assert stored_raw == raw
    [described] = event["attachments"]
    assert described["filename"] == "blob.bin"
    assert described["size"] == len(attachment)
    assert described["sha256"] == hashlib.sha256(attachment).hexdigest()
    assert hashlib.sha256(Path(described["path"]).read_bytes()).hexdigest() == described["sha256"]
    status, body, _ = server.request("GET", f"/api/v1/messages/{event['uuid']}/attachments/0")
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(attachment).digest()
    by_subject(server, "small during big")
    by_subject(server, "small while big commits")


# ---- pipelining -------------------------------------------------------------------------


def test_pipelined_commands_get_replies_in_order(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    client = RawSMTP(server.smtp_port)
    rcpts = [f"p{n}@example.test" for n in range(3)]
    client.send(
        "EHLO pipe.test\r\n"
        f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n"
    )
    code, ehlo = client.reply()
    assert code == 250 and "PIPELINING" in ehlo.splitlines()
    assert [client.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
    client.send(
        message("pipelined one")
        + b".\r\n"
        + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
    )
    first = client.reply()
    assert first[0] == 250 and first[1].startswith("2.0.0 Ok: queued as"), first
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    client.send(message("pipelined two") + b".\r\nQUIT\r\n")
    second = client.reply()
    assert second[0] == 250, second
    assert client.reply()[0] == 221
    assert client.wait_closed()
    client.close()
    one, two = by_subject(server, "pipelined one"), by_subject(server, "pipelined two")
    assert one["envelope"]["to"] == rcpts
    assert two["envelope"]["to"] == [RCPT]
    assert first[1].endswith(one["uuid"]) and second[1].endswith(two["uuid"])


def test_whole_session_in_one_write(mailpipe_factory: Factory) -> None:
    """Even a client that does not wait for 354 is served in order."""
    server = mailpipe_factory()
    client = RawSMTP(server.smtp_port)
    session = b"EHLO burst.test\r\n"
    for n in range(2):
        session += f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        session += message(f"burst {n}") + b".\r\n"
    client.send(session + b"QUIT\r\n")
    codes = [client.reply()[0] for _ in range(10)]
    assert codes == [250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    client.close()
    by_subject(server, "burst 0")
    by_subject(server, "burst 1")


def test_client_closing_its_side_after_the_body_still_gets_the_reply(
    mailpipe_factory: Factory,
) -> None:
    """A client that shuts its sending side right after the "." (the EOF may arrive while the
    message awaits its verdict) still gets the message's reply, then the server closes."""
    server = mailpipe_factory()
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO eof.test", 250)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(message("closed after the dot") + b".\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    code, text = client.reply()
    assert code == 250, text
    assert client.wait_closed()
    client.close()
    by_subject(server, "closed after the dot")


# ---- graceful shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown(mailpipe_factory: Factory, sig: int) -> None:
    server = mailpipe_factory()
    busy = RawSMTP(server.smtp_port)
    busy.expect("EHLO busy.test", 250)
    busy.expect(f"MAIL FROM:<{SENDER}>", 250)
    busy.expect(f"RCPT TO:<{RCPT}>", 250)
    busy.expect("DATA", 354)
    data = message("in flight at shutdown", "".join(f"line {i}\r\n" for i in range(200)))
    busy.send(data[: len(data) // 2])
    idle = RawSMTP(server.smtp_port)
    idle.expect("EHLO idle.test", 250)

    server.process.send_signal(sig)
    code, text = idle.reply()
    assert code == 421, text
    assert idle.wait_closed()
    idle.close()
    # the listener is closed: new connections are refused
    with pytest.raises(OSError):
        RawSMTP(server.smtp_port, timeout=2)
    assert server.process.poll() is None, "exited before the message in flight finished"

    busy.send(data[len(data) // 2 :] + b".\r\n")
    code, text = busy.reply()
    assert code == 250, text
    assert busy.wait_closed()
    busy.close()
    assert server.process.wait(15) == 0
    uuid = text.rsplit(" ", 1)[-1]

    # committed before the 250: in the SQLite file, and served again after a restart
    db = server.workdir / "data" / "mailpipe.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT uuid, subject FROM messages").fetchall()
    assert rows == [(uuid, "in flight at shutdown")]
    again = mailpipe_factory({"data_dir": str(server.workdir / "data")})
    event = again.event(uuid)
    assert event["message"]["subject"] == "in flight at shutdown"
    status, raw, _ = again.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200 and raw == data


def test_second_signal_exits_at_once(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"shutdown_timeout": "30s"})
    busy = RawSMTP(server.smtp_port)
    busy.expect("EHLO busy.test", 250)
    busy.expect(f"MAIL FROM:<{SENDER}>", 250)
    busy.expect(f"RCPT TO:<{RCPT}>", 250)
    busy.expect("DATA", 354)
    busy.send(b"Subject: half\r\n\r\nhalf a bo")
    idle = RawSMTP(server.smtp_port)
    server.process.send_signal(signal.SIGTERM)
    assert idle.reply()[0] == 421  # the first signal has been handled: it is stopping
    assert server.process.poll() is None
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(5)
    assert time.monotonic() - started < 3
    assert code == 0  # the wait is skipped, the store still flushed and closed
    assert busy.wait_closed()
    busy.close()
    idle.close()


def test_shutdown_timeout_aborts_sessions_still_busy(
    mailpipe_factory: Factory, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = mailpipe_factory(
        {"shutdown_timeout": "1s", "smtp": {"spool_threshold": 1000}},
        env={"TMPDIR": str(spool)},
    )
    busy = RawSMTP(server.smtp_port)
    busy.expect("EHLO busy.test", 250)
    busy.expect(f"MAIL FROM:<{SENDER}>", 250)
    busy.expect(f"RCPT TO:<{RCPT}>", 250)
    busy.expect("DATA", 354)
    busy.send(b"Subject: stuck\r\n\r\n" + b"never ends " * 1000)
    assert wait_for(lambda: spool_files(spool), timeout=5), "body was not spooled"
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert busy.wait_closed(10)
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 6
    busy.close()
    assert "still busy at shutdown" in server.log()
    assert not spool_files(spool)  # the aborted body's spool file went with it


# ---- TLS --------------------------------------------------------------------------------


def test_starttls(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"tls": "self-signed"}})
    with smtp(server) as client:
        client.ehlo("tls.test")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=insecure_context())
        assert code == 220
        client.ehlo("tls.test")
        assert not client.has_extn("starttls")  # not offered twice
        assert isinstance(client.sock, ssl.SSLSocket)
        client.sendmail(SENDER, [RCPT], message("over starttls"))
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("in clear"))
    secure = by_subject(server, "over starttls")
    assert secure["session"]["tls"] is True
    assert secure["envelope"]["helo"] == "tls.test"
    assert by_subject(server, "in clear")["session"]["tls"] is False


def test_implicit_tls_listener_beside_a_plain_one(
    mailpipe_factory: Factory, validate_event: Callable[[dict[str, Any]], None]
) -> None:
    plain_port, smtps_port = free_port(), free_port()
    server = mailpipe_factory(
        {
            "smtp": {
                "servers": [
                    {"name": "plain", "addr": f"127.0.0.1:{plain_port}"},
                    {
                        "name": "smtps",
                        "addr": f"127.0.0.1:{smtps_port}",
                        "tls": {"mode": "implicit", "self_signed": True},
                    },
                ]
            }
        }
    )
    with smtplib.SMTP_SSL(
        "127.0.0.1", smtps_port, context=insecure_context(), timeout=15
    ) as client:
        client.ehlo("ssl.test")
        assert not client.has_extn("starttls")
        client.sendmail(SENDER, [RCPT], message("over smtps"))
    # a client speaking clear text to the TLS port is dropped; the server carries on
    confused = RawSMTP(smtps_port, greet=False)
    confused.send("EHLO confused.test\r\n")
    assert confused.wait_closed(5)
    confused.close()
    assert b"220" not in confused.buf  # no SMTP conversation without TLS
    with smtp(server, plain_port) as client:
        client.ehlo("plain.test")
        assert not client.has_extn("starttls")
        client.sendmail(SENDER, [RCPT], message("over plain"))
    secure = by_subject(server, "over smtps")
    validate_event(secure)
    assert secure["session"]["server"] == "smtps"
    assert secure["session"]["tls"] is True
    clear = by_subject(server, "over plain")
    assert clear["session"]["server"] == "plain"
    assert clear["session"]["tls"] is False
    assert clear["session"]["local_addr"].endswith(f":{plain_port}")
    assert secure["session"]["local_addr"].endswith(f":{smtps_port}")


# ---- sinks ------------------------------------------------------------------------------


def test_required_sink_failure_answers_451(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"sinks": {"jsonl": {"path": "/dev/full", "required": True}}})
    assert metric(server, "mailpipe_sink_failures_total", sink="jsonl") == 0
    with smtp(server) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SENDER, [RCPT], message("sink is full"))
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.3.0")
    assert metric(server, "mailpipe_sink_failures_total", sink="jsonl") == 1
    assert metric(server, "mailpipe_emails_accepted_total") == 0
    assert metric(server, "mailpipe_emails_rejected_total", reason="sink") == 1
    # the session survives a 451: the client may retry on the same connection
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO retry.test", 250)
    assert client.send_email(message("sink still full"))[0] == 451
    client.expect("NOOP", 250)
    client.close()
    assert metric(server, "mailpipe_sink_failures_total", sink="jsonl") == 2
    assert "sink jsonl failed" in server.log()


def test_optional_sink_failure_does_not_affect_the_250(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"sinks": {"jsonl": {"path": "/dev/full", "required": False}}})
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("optional sink broken"))
    assert by_subject(server, "optional sink broken")["envelope"]["to"] == [RCPT]
    assert wait_for(
        lambda: metric(server, "mailpipe_sink_failures_total", sink="jsonl") == 1, timeout=5
    )
    assert metric(server, "mailpipe_emails_accepted_total") == 1


def test_jsonl_sink_to_a_file(
    mailpipe_factory: Factory, tmp_path: Path, validate_event: Callable[[dict[str, Any]], None]
) -> None:
    out = tmp_path / "events.jsonl"
    server = mailpipe_factory({"sinks": {"jsonl": {"path": str(out), "required": True}}})
    with smtp(server) as client:
        for n in range(3):
            client.sendmail(SENDER, [RCPT], message(f"jsonl {n}"))
    lines = out.read_bytes().splitlines()  # required: written before each 250
    assert len(lines) == 3
    for n, line in enumerate(lines):
        event = json.loads(line)
        validate_event(event)
        assert event["message"]["subject"] == f"jsonl {n}"
        assert event == server.event(event["uuid"])


def test_jsonl_dash_prints_events_on_stdout(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(args=["--jsonl", "-"])
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("to stdout"))
    stdout = server.workdir / "stdout.log"
    lines = wait_for(lambda: stdout.read_bytes().splitlines(), timeout=5)
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "EMAIL_RECEIVED"
    assert event["message"]["subject"] == "to stdout"
    assert event == server.event(event["uuid"])


# ---- HTTP -------------------------------------------------------------------------------


def test_http_bearer_auth(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"http": {"auth": {"type": "bearer", "token": "t0ken"}}})
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("behind auth"))
    status, body, headers = server.request("GET", "/api/v1/messages")
    assert status == 401
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert b"behind auth" not in body
    status, _, _ = server.request("GET", "/api/v1/messages", {"Authorization": "Bearer wrong"})
    assert status == 401
    status, body, _ = server.request("GET", "/api/v1/messages", {"Authorization": "Bearer t0ken"})
    assert status == 200
    listing = json.loads(body)
    assert [m["subject"] for m in listing["messages"]] == ["behind auth"]
    uuid = listing["messages"][0]["uuid"]
    assert server.request("GET", f"/api/v1/messages/{uuid}/raw")[0] == 401
    assert server.request("DELETE", "/api/v1/messages")[0] == 401
    status, body, _ = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_non_loopback_http_bind_warns(mailpipe_factory: Factory) -> None:
    port = free_port()
    server = mailpipe_factory({"http": {"addr": f"0.0.0.0:{port}"}}, wait=False)
    server.http_port = port  # reached through 127.0.0.1
    wait_until_ready(server)
    warnings = [line for line in server.log().splitlines() if "WARNING" in line]
    assert any(f"0.0.0.0:{port}" in line for line in warnings), server.log()
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("wide open"))
    assert by_subject(server, "wide open")["envelope"]["from"] == SENDER


def test_loopback_http_bind_does_not_warn(mailpipe: MailpipeServer) -> None:
    assert "reachable from other machines" not in mailpipe.log()


@pytest.mark.parametrize("which", ["smtp", "http"])
def test_port_already_in_use(mailpipe_factory: Factory, which: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = mailpipe_factory({which: {"addr": f"127.0.0.1:{port}"}}, wait=False)
        code = server.process.wait(20)
    assert code != 0
    log = server.log()
    assert "cannot listen" in log, log
    assert "address already in use" in log.lower(), log
    assert "Traceback" not in log


# ---- logs -------------------------------------------------------------------------------


def test_debug_log_masks_auth_secrets(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(args=["--log-level", "debug"])
    secrets = {"PLAIN": "pl41n-S3cret!", "LOGIN": "l0gin-S3cret?"}
    for mechanism, password in secrets.items():
        with smtp(server) as client:
            client.ehlo("auth.test")
            client.user, client.password = f"user-{mechanism}", password
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            code, _ = client.auth(mechanism, method)
            assert code == 235
            client.sendmail(SENDER, [RCPT], message(f"auth {mechanism}"))
    log = server.log()
    assert "C: ehlo auth.test" in log  # debug really shows the commands (smtplib's case)
    assert "AUTH PLAIN ****" in log
    for mechanism, password in secrets.items():
        event = by_subject(server, f"auth {mechanism}")
        assert event["authentication"]["mechanism"] == mechanism
        assert event["authentication"]["username"] == f"user-{mechanism}"
        assert event["authentication"]["password"] == password  # the event keeps it
        assert password not in log
        assert base64.b64encode(password.encode()).decode() not in log
        plain = base64.b64encode(f"\0user-{mechanism}\0{password}".encode()).decode()
        assert plain not in log


def test_json_log_format(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(args=["--log-format", "json", "--log-level", "debug"])
    with smtp(server) as client:
        client.sendmail(SENDER, [RCPT], message("json logs"))
    client = RawSMTP(server.smtp_port)
    client.send("BOGUS\nEHLO x\r\n")  # a violation and a warning
    assert client.reply()[0] == 500
    client.close()
    assert server.stop(signal.SIGTERM) == 0
    lines = server.log().splitlines()
    assert len(lines) > 5
    docs = []
    for line in lines:
        doc = json.loads(line)  # every line, not just most
        assert isinstance(doc, dict) and {"ts", "level", "msg"} <= doc.keys(), line
        docs.append(doc)
    messages = [d["msg"] for d in docs]
    assert "email accepted" in messages
    assert "stopped" in messages
    assert any(d["level"] == "warning" for d in docs)


# ---- event contents ---------------------------------------------------------------------


def test_transcript_in_event(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"transcript": True}})
    with smtp(server) as client:
        client.ehlo("transcript.test")
        client.noop()
        client.sendmail(SENDER, [RCPT], message("with transcript"))
    transcript = by_subject(server, "with transcript")["session"]["transcript"]
    assert transcript[0].startswith("S: 220 ")
    expected_in_order = [
        # as sent: smtplib writes its verbs in lower case
        "C: ehlo transcript.test",
        "S: 250-localhost",
        "S: 250 HELP",
        "C: noop",
        "S: 250 2.0.0 Ok",
        f"C: mail FROM:<{SENDER}> size=",
        "S: 250 2.1.0 Ok",
        f"C: rcpt TO:<{RCPT}>",
        "S: 250 2.1.5 Ok",
        "C: data",
        "S: 354 ",
        "C: <message data: ",
    ]
    position = 0
    for prefix in expected_in_order:
        found = [
            i for i, line in enumerate(transcript) if i >= position and line.startswith(prefix)
        ]
        assert found, f"{prefix!r} not found after line {position}: {transcript}"
        position = found[0] + 1


def test_transcript_off_by_default(mailpipe: MailpipeServer) -> None:
    with smtp(mailpipe) as client:
        client.sendmail(SENDER, [RCPT], message("no transcript"))
    assert "transcript" not in by_subject(mailpipe, "no transcript")["session"]


def test_retention_keeps_the_newest(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"store": {"max_messages": 3}})
    with smtp(server) as client:
        for n in range(5):
            client.sendmail(SENDER, [RCPT], message(f"kept? {n}"))
    listing = server.get_json("/api/v1/messages")
    assert listing["total"] == 3
    assert [m["subject"] for m in listing["messages"]] == ["kept? 4", "kept? 3", "kept? 2"]
    assert metric(server, "mailpipe_store_messages") == 3


# ---- in process: CaptureServer's own behaviour and the verdict seam ----------------------
# The server runs in the test's event loop (a real Mailpipe with its store, HTTP off), so
# verdict callables can be registered on it; clients still talk over real sockets.

async def stored(app: Mailpipe) -> int:
    assert app.store is not None
    return await app.store.count()


PLAIN = "AUTH PLAIN " + base64.b64encode(b"\0user\0secret").decode()
BODY = b"Subject: verdicts\r\nFrom: <app@example.com>\r\n\r\nHello.\r\n.\r\n"


async def run_until(client: AsyncSMTP, stage: Stage) -> tuple[int, str]:
    """Drive a session opened with greet=None up to `stage`; the reply that stage got."""
    greeting = await client.reply()
    if stage == Stage.CONNECT:
        return greeting
    steps: list[tuple[Stage, str | bytes]] = [
        (Stage.HELO, "EHLO client.test"),
        (Stage.AUTH, PLAIN),
        (Stage.MAIL, f"MAIL FROM:<{SENDER}>"),
        (Stage.RCPT, f"RCPT TO:<{RCPT}>"),
        (Stage.DATA, "DATA"),
        (Stage.HEADERS, BODY),
    ]
    for step, line in steps:
        code, text = await client.command(line)
        if step == stage or (stage == Stage.MESSAGE and step == Stage.HEADERS):
            return code, text
    raise AssertionError(stage)


SMTP_STAGES = [s for s in Stage if s != Stage.STARTTLS]  # STARTTLS: its own test


@pytest.mark.parametrize("stage", SMTP_STAGES, ids=lambda s: s.name)
async def test_a_verdict_can_refuse_any_stage_with_its_code_and_text(
    inproc: InProc, stage: Stage
) -> None:
    app = await inproc()
    seen: list[VerdictContext] = []

    async def refuse(context: VerdictContext) -> Verdict:
        seen.append(context)
        return Respond(550, "5.7.1", f"No {stage.name} today")

    app.verdicts.register(stage, refuse)
    client = await AsyncSMTP.open(port_of(app), greet=None)
    assert await run_until(client, stage) == (550, f"5.7.1 No {stage.name} today")
    assert [c.stage for c in seen] == [stage]
    if stage == Stage.CONNECT:
        assert await client.closed()
    else:
        assert (await client.command("NOOP"))[0] == 250  # the session goes on
        assert await client.command("QUIT") == (221, "2.0.0 Bye")
    client.close()
    assert await stored(app) == 0


@pytest.mark.parametrize("stage", SMTP_STAGES, ids=lambda s: s.name)
async def test_a_verdict_can_disconnect_at_any_stage(inproc: InProc, stage: Stage) -> None:
    app = await inproc()

    async def disconnect(context: VerdictContext) -> Verdict:
        return Disconnect("Go away")

    app.verdicts.register(stage, disconnect)
    client = await AsyncSMTP.open(port_of(app), greet=None)
    assert await run_until(client, stage) == (421, "4.7.0 Go away")
    assert await client.closed()
    client.close()
    assert await stored(app) == 0


async def test_proceed_and_no_opinion_give_the_default_replies(inproc: InProc) -> None:
    app = await inproc()
    contexts: list[VerdictContext] = []

    async def proceed(context: VerdictContext) -> Verdict:
        contexts.append(context)
        return Proceed()

    async def no_opinion(context: VerdictContext) -> None:
        context.store[context.stage.name] = True  # the session's store is shared

    for stage in SMTP_STAGES:
        app.verdicts.register(stage, no_opinion)
        app.verdicts.register(stage, proceed)
    client = await AsyncSMTP.open(port_of(app), greet=None)
    code, text = await run_until(client, Stage.MESSAGE)
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
    client.close()
    assert await stored(app) == 1
    assert [c.stage for c in contexts] == SMTP_STAGES
    by_stage = {c.stage: c for c in contexts}
    assert by_stage[Stage.HELO].args == {"hostname": "client.test", "verb": "EHLO"}
    assert by_stage[Stage.AUTH].args == {"mechanism": "PLAIN", "username": "user"}
    assert by_stage[Stage.RCPT].args == {"recipient": RCPT, "params": []}
    assert by_stage[Stage.RCPT].envelope is not None
    assert by_stage[Stage.RCPT].envelope.mail_from == SENDER
    assert by_stage[Stage.HEADERS].args["headers"].startswith(b"Subject: verdicts\r\n")
    message = by_stage[Stage.MESSAGE]
    assert message.email is not None and message.email.event["message"]["subject"] == "verdicts"
    assert message.helo == "client.test" and message.auth.password == "secret"
    assert message.remote_addr.startswith("127.0.0.1:") and message.server == "default"
    assert len({c.session for c in contexts}) == 1 and len(message.store) == len(SMTP_STAGES)


async def test_a_pipelined_batch_awaiting_a_verdict_is_answered_in_one_write(
    inproc: InProc,
) -> None:
    """MAIL's reply waits for RCPT's verdict, so the batch's replies go out together."""
    app = await inproc()
    release = asyncio.Event()

    async def later(context: VerdictContext) -> None:
        await release.wait()

    app.verdicts.register(Stage.RCPT, later)
    client = await AsyncSMTP.open(port_of(app))
    await client.command("EHLO client.test")
    client.writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
    with pytest.raises(TimeoutError):  # nothing yet, not even MAIL's 250
        await asyncio.wait_for(client.reader.read(1), 0.2)
    release.set()
    replies = [await client.reply() for _ in range(3)]
    assert [code for code, _ in replies] == [250, 250, 354]
    assert (await client.command(BODY))[0] == 250
    client.close()
    assert await stored(app) == 1


async def test_aiosmtplib_sees_a_refused_recipient_and_the_others_get_through(
    inproc: InProc,
) -> None:
    app = await inproc()

    async def no_bob(context: VerdictContext) -> Verdict | None:
        if context.args["recipient"] == "bob@example.test":
            return Respond(550, "5.1.1", "No such user here")
        return None

    app.verdicts.register(Stage.RCPT, no_bob)
    refused, _ = await aiosmtplib.send(
        message("partly refused"), sender=SENDER,
        recipients=["alice@example.test", "bob@example.test"],
        hostname="127.0.0.1", port=port_of(app),
    )
    assert refused["bob@example.test"].code == 550
    assert refused["bob@example.test"].message == "5.1.1 No such user here"
    assert "alice@example.test" not in refused
    assert await stored(app) == 1


@pytest.mark.parametrize("failure", ["raises", "hangs", "nonsense"])
@pytest.mark.parametrize("stage", [Stage.RCPT, Stage.HEADERS, Stage.MESSAGE], ids=str)
async def test_a_failing_verdict_tempfails_and_loses_nothing(
    inproc: InProc, stage: Stage, failure: str
) -> None:
    app = await inproc()
    app.verdicts.timeout = 0.3

    async def broken(context: VerdictContext) -> Verdict:
        if failure == "raises":
            raise RuntimeError("plugin bug")
        if failure == "hangs":
            await asyncio.Event().wait()
        return Respond(250, "2.0.0", "a 2xx is not a refusal")

    app.verdicts.register(stage, broken)
    client = await AsyncSMTP.open(port_of(app), greet=None)
    assert await run_until(client, stage) == (451, "4.3.0 Temporary failure, please retry")
    assert await stored(app) == 0
    # the client retries once the plugin is fixed, and the email is captured
    app.verdicts.unregister(stage, broken)
    assert (await client.command("RSET"))[0] == 250
    for line in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
        assert (await client.command(line))[0] in (250, 354)
    assert (await client.command(BODY))[0] == 250
    client.close()
    assert await stored(app) == 1


async def test_a_command_right_after_the_handshake_is_kept(inproc: InProc) -> None:
    """A client in the same event loop sends EHLO the moment the handshake ends, before
    start_tls() has returned to the session: that EHLO came through TLS and must count."""
    app = await inproc({"tls": {"mode": "starttls", "self_signed": True}})

    async def proceed(context: VerdictContext) -> Verdict:
        return Proceed()

    app.verdicts.register(Stage.STARTTLS, proceed)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), tls_context=context,
                               start_tls=True, timeout=5) as client:
        assert (await client.sendmail(SENDER, [RCPT], message("after TLS")))[0] == {}
    assert await stored(app) == 1


async def test_starttls_verdict(inproc: InProc) -> None:
    app = await inproc({"tls": {"mode": "starttls", "self_signed": True}})

    async def no_tls(context: VerdictContext) -> Verdict:
        return Respond(454, "4.7.0", "TLS not available due to temporary reason")

    app.verdicts.register(Stage.STARTTLS, no_tls)
    client = await AsyncSMTP.open(port_of(app))
    await client.command("EHLO client.test")
    assert await client.command("STARTTLS") == (
        454, "4.7.0 TLS not available due to temporary reason"
    )
    assert (await client.command("NOOP"))[0] == 250  # still in clear text, still served
    client.close()
    app.verdicts.unregister(Stage.STARTTLS, no_tls)
    client = await AsyncSMTP.open(port_of(app))
    await client.command("EHLO client.test")
    assert await client.command("STARTTLS") == (220, "2.0.0 Ready to start TLS")
    client.close()


async def test_nothing_registered_nothing_held(inproc: InProc) -> None:
    app = await inproc()
    assert app.verdicts.held == frozenset()
    client = await AsyncSMTP.open(port_of(app), greet=None)
    assert (await run_until(client, Stage.MESSAGE))[0] == 250
    session = next(iter(app.capture.sessions()))
    assert session.conn.held == frozenset()
    assert session._asking is None  # no verdict task was ever started
    client.close()


# ---- CaptureServer itself: listeners, limits, shutdown -----------------------------------


async def send_one(port: int, subject: str) -> tuple[int, str]:
    client = await AsyncSMTP.open(port)
    try:
        for line in ("EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
            assert (await client.command(line))[0] in (250, 354)
        return await client.command(message(subject) + b".\r\n")
    finally:
        client.close()


async def test_listeners_bind_their_own_ports_and_say_which_they_are(inproc: InProc) -> None:
    app = await inproc({"servers": [
        {"name": "apps", "addr": "127.0.0.1:0", "hostname": "apps.test"},
        {"name": "tests", "addr": "127.0.0.1:0", "hostname": "tests.test"},
    ]})  # fmt: skip
    addresses = app.capture.addresses()
    assert set(addresses) == {"apps", "tests"}
    ports = {name: port_of(app, name) for name in addresses}
    assert 0 not in ports.values() and len(set(ports.values())) == 2  # the real ports
    for name, port in ports.items():
        client = await AsyncSMTP.open(port, greet=None)
        assert await client.reply() == (220, f"{name}.test ESMTP mailpipe")
        client.close()
        code, text = await send_one(port, f"via {name}")
        assert code == 250, text
    assert app.store is not None
    listing, _ = await app.store.list(limit=10)
    events = [await app.store.get(item["uuid"]) for item in listing]
    servers = {e["message"]["subject"]: e["session"]["server"] for e in events if e}
    assert servers == {"via apps": "apps", "via tests": "tests"}


async def test_max_connections_answers_421_and_frees_the_slot(inproc: InProc) -> None:
    app = await inproc({"max_connections": 1})
    port = port_of(app)
    first = await AsyncSMTP.open(port)
    second = await AsyncSMTP.open(port, greet=None)
    assert await second.reply() == (421, "4.7.0 Too many connections, try again later")
    assert await second.closed()
    second.close()
    assert (await first.command("NOOP"))[0] == 250  # the first one is untouched
    assert await first.command("QUIT") == (221, "2.0.0 Bye")
    first.close()
    for _ in range(100):  # the slot is freed once the server has seen the close
        if not any(True for _ in app.capture.sessions()):
            break
        await asyncio.sleep(0.02)
    code, text = await send_one(port, "after the slot was freed")
    assert code == 250, text


async def test_shutdown_finishes_messages_in_flight_and_421s_idle_sessions(
    inproc: InProc,
) -> None:
    app = await inproc(shutdown_timeout="10s")
    port = port_of(app)
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow_commit(context: VerdictContext) -> None:
        arrived.set()
        await release.wait()  # the message is in flight until released

    app.verdicts.register(Stage.MESSAGE, slow_commit)
    idle = await AsyncSMTP.open(port)
    busy = await AsyncSMTP.open(port)
    for line in ("EHLO busy.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
        await busy.command(line)
    busy.writer.write(message("in flight at shutdown") + b".\r\n")
    await asyncio.wait_for(arrived.wait(), 10)

    stopping = asyncio.create_task(app.shutdown())
    code, _ = await idle.reply()  # the idle session is told at once
    assert code == 421 and await idle.closed()
    with pytest.raises(OSError):  # no new connections
        await asyncio.open_connection("127.0.0.1", port)
    assert not stopping.done()
    release.set()
    code, text = await busy.reply()
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
    assert (await busy.reply())[0] == 421  # then closed, as the server is stopping
    assert await busy.closed()
    await asyncio.wait_for(stopping, 10)
    idle.close()
    busy.close()
    assert not any(True for _ in app.capture.sessions())
    # committed before the 250, so in the database the shutdown closed
    db = Path(app.config.data_dir) / "mailpipe.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)


async def test_shutdown_timeout_aborts_a_session_still_busy(inproc: InProc) -> None:
    app = await inproc(shutdown_timeout="0.3s")
    client = await AsyncSMTP.open(port_of(app))
    for line in ("EHLO slow.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
        await client.command(line)
    client.writer.write(b"Subject: never finished\r\n\r\nhalf a bo")
    await asyncio.wait_for(app.shutdown(), 10)
    assert await client.closed()
    client.close()
    assert not any(True for _ in app.capture.sessions())


async def test_an_administrator_closes_a_session_waiting_for_a_verdict(inproc: InProc) -> None:
    app = await inproc()
    asked = asyncio.Event()
    cancelled = asyncio.Event()

    async def hangs(context: VerdictContext) -> None:
        asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    app.verdicts.register(Stage.HELO, hangs)
    client = await AsyncSMTP.open(port_of(app))
    client.writer.write(b"EHLO stuck.test\r\n")
    await asyncio.wait_for(asked.wait(), 10)
    (session,) = app.capture.sessions()
    assert app.close_connection(session.id)
    assert await client.reply() == (421, "4.3.2 Connection closed by administrator")
    assert await client.closed()
    await asyncio.wait_for(cancelled.wait(), 10)
    client.close()
