"""The POP3 server from the outside: a real `mailpipe serve` with `pop3` configured, emails
sent over real SMTP, downloaded with Python's poplib and Debian's fetchmail, compared with
what the HTTP API serves."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from conftest import MailpipeServer, free_port, require_tool

Factory = Callable[..., MailpipeServer]
USER, PASSWORD = "dev", "pop secret"


def start(factory: Factory, **pop3: Any) -> tuple[MailpipeServer, int]:
    port = free_port()
    settings = {"addr": f"127.0.0.1:{port}", "auth": {"username": USER, "password": PASSWORD},
                "auth_failure_delay": "50ms", **pop3}
    return factory({"pop3": settings}), port


def send(server: MailpipeServer, subject: str, body: str, to: str = "user@example.org") -> None:
    message = EmailMessage()
    message["From"] = "App <app@example.com>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)


def send_some(server: MailpipeServer, count: int) -> list[dict[str, Any]]:
    """`count` emails whose bodies hold lines POP3 must dot-stuff; their summaries, oldest
    first."""
    for i in range(count):
        send(server, f"message {i}", f"Hello {i}\n.starts with a dot\n..two\n.\nend\n")
    return list(reversed(server.wait_for_messages(count)))


def raw(server: MailpipeServer, uuid: str) -> bytes:
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200
    return body


def login(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def as_sent(lines: list[bytes]) -> bytes:
    """poplib's lines (CRLF taken off, dot-stuffing undone) as the message's bytes."""
    return b"".join(line + b"\r\n" for line in lines)


def test_poplib_downloads_what_the_api_serves(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory)
    stored = send_some(server, 3)
    client = login(port)
    assert client.getwelcome().startswith(b"+OK")
    sizes = [len(raw(server, m["uuid"])) for m in stored]
    assert client.stat() == (3, sum(sizes))
    _, listing, _ = client.list()
    assert listing == [f"{i + 1} {size}".encode() for i, size in enumerate(sizes)]
    _, uidls, _ = client.uidl()
    assert uidls == [f"{i + 1} {m['uuid']}".encode() for i, m in enumerate(stored)]
    assert client.uidl(2) == f"+OK 2 {stored[1]['uuid']}".encode()
    for number, summary in enumerate(stored, 1):
        reply, lines, _ = client.retr(number)
        expected = raw(server, summary["uuid"])
        assert as_sent(lines) == expected  # byte for byte, dots unstuffed by poplib
        assert reply == f"+OK {len(expected)} octets".encode()
        assert b".starts with a dot" in lines and b"." in lines
    _, top, _ = client.top(1, 1)
    header, _, _ = raw(server, stored[0]["uuid"]).partition(b"\r\n\r\n")
    assert as_sent(top) == header + b"\r\n\r\nHello 0\r\n"
    client.quit()
    assert server.get_json("/api/v1/messages")["total"] == 3  # reading deletes nothing


def test_dele_removes_from_the_store_at_quit_only(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory)
    stored = send_some(server, 3)
    client = login(port)
    client.dele(1)
    client.dele(3)
    with pytest.raises(poplib.error_proto, match="already deleted"):
        client.retr(1)
    assert client.stat()[0] == 1
    assert server.get_json("/api/v1/messages")["total"] == 3  # not before QUIT
    client.quit()
    left = server.get_json("/api/v1/messages")["messages"]
    assert [m["uuid"] for m in left] == [stored[1]["uuid"]]

    # RSET takes the marks back; a connection cut without QUIT deletes nothing.
    client = login(port)
    client.dele(1)
    client.rset()
    client.quit()
    client = login(port)
    client.dele(1)
    client.sock.close()
    assert server.get_json("/api/v1/messages")["total"] == 1


def test_the_maildrop_is_a_snapshot_at_login(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory)
    stored = send_some(server, 2)
    client = login(port)
    send(server, "late", "came after the login")
    server.wait_for_messages(3)
    assert client.stat()[0] == 2
    # One deleted through the HTTP API meanwhile: RETR says so, the session goes on.
    status, _, _ = server.request("DELETE", f"/api/v1/messages/{stored[0]['uuid']}")
    assert status in (200, 204)
    with pytest.raises(poplib.error_proto, match="no longer in the store"):
        client.retr(1)
    assert as_sent(client.retr(2)[1]) == raw(server, stored[1]["uuid"])
    client.quit()
    client = login(port)
    assert client.stat()[0] == 2
    client.quit()


def test_stls_with_poplib(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory, tls="self-signed")
    stored = send_some(server, 1)
    cert = server.workdir / "data" / "pop3" / "tls" / "selfsigned-cert.pem"
    context = ssl.create_default_context(cafile=str(cert))  # verified, hostname included
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(context)
    assert isinstance(client.sock, ssl.SSLSocket)
    assert "STLS" not in client.capa()
    client.user(USER)
    client.pass_(PASSWORD)
    assert as_sent(client.retr(1)[1]) == raw(server, stored[0]["uuid"])
    client.quit()


def test_implicit_tls_pop3s(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory, tls={"mode": "implicit", "self_signed": True})
    stored = send_some(server, 1)
    cert = server.workdir / "data" / "pop3" / "tls" / "selfsigned-cert.pem"
    context = ssl.create_default_context(cafile=str(cert))
    client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=10)
    assert "STLS" not in client.capa()
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.uidl(1) == f"+OK 1 {stored[0]['uuid']}".encode()
    client.quit()


def test_no_stls_without_tls(mailpipe_factory: Factory) -> None:
    _, port = start(mailpipe_factory)
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    assert "STLS" not in client.capa()
    client.quit()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"STLS\r\n")  # poplib would not ask, seeing no STLS in CAPA
        assert reader.readline() == b"-ERR STLS not available\r\n"


def test_logins_apop_auth_plain_and_failures(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory, auth=[{"username": "a", "password": "pa"},
                                                  {"username": USER, "password": PASSWORD}],
                         max_auth_failures=2)
    send_some(server, 1)
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.apop(USER, PASSWORD)  # digest over the greeting's timestamp
    assert client.stat()[0] == 1
    client.quit()
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("a")
    client.pass_("pa")
    client.quit()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"AUTH PLAIN AGRldgBwb3Agc2VjcmV0\r\nSTAT\r\nQUIT\r\n")  # \0dev\0pop secret
        assert reader.readline().startswith(b"+OK maildrop has 1 messages")
        assert reader.readline().startswith(b"+OK 1 ")
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user(USER)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] invalid"):
        client.pass_("wrong")
    client.user(USER)
    with pytest.raises(poplib.error_proto, match="too many failed logins"):
        client.pass_("wrong again")
    assert client.sock.recv(10) == b""  # closed by the server
    client.close()


def test_hostile_clients(mailpipe_factory: Factory) -> None:
    server, port = start(mailpipe_factory, max_connections=2, read_timeout="1s")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"\x00\xff\xfe\x80 garbage\r\n")
        assert reader.readline() == b"-ERR unknown command\r\n"
        sock.sendall(b"USER " + b"x" * 100_000 + b"\r\nNOOP\r\n")
        assert reader.readline() == b"-ERR line too long\r\n"
        assert reader.readline() == b"-ERR command not valid in this state\r\n"
        sock.sendall(b"JUNK\r\n" * 30)
        replies = list(iter(reader.readline, b""))  # until the server closes
        assert replies[-1] == b"-ERR too many errors, closing\r\n"
        assert 3 + len(replies) - 1 == 20  # -ERR answers in a row before the close
    # Connections are bounded, and an idle one is logged out (read_timeout).
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    for sock in (first, second):
        assert sock.makefile("rb").readline().startswith(b"+OK")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
        assert third.makefile("rb").readline().startswith(b"-ERR [SYS/TEMP] too many")
    for sock in (first, second):
        reader = sock.makefile("rb")
        assert reader.readline() == b"-ERR autologout: idle for too long\r\n"
        assert reader.readline() == b""
        sock.close()
    client = login(port)  # the server is still fine
    client.quit()
    assert server.process.poll() is None


def test_pop3_needs_auth_unless_any_is_written(mailpipe_factory: Factory,
                                               tmp_path: Path) -> None:
    from conftest import start_mailpipe

    server = start_mailpipe(tmp_path / "noauth", {"pop3": {"addr": f"127.0.0.1:{free_port()}"}},
                            wait=False)
    assert server.process.wait(20) == 2  # a configuration error
    assert "pop3.auth" in server.log()
    # `auth: any` lets any login in.
    _, port = start(mailpipe_factory, auth="any")
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("anyone")
    client.pass_("anything")
    assert client.stat() == (0, 0)
    client.quit()


def fetchmail(workdir: Path, port: int, *options: str) -> str:
    """Run Debian's fetchmail once: each message to its own file in workdir/got."""
    got = workdir / "got"
    got.mkdir(parents=True, exist_ok=True)
    rc = workdir / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {port} protocol pop3 auth password uidl\n"
        f'  user "{USER}" there with password "{PASSWORD}" is "root" here\n'
        "  no stripcr\n"
        "  sslproto ''\n"  # no TLS unless asked (fetchmail tries STLS by default)
        f"  mda \"/bin/sh -c 'cat > {got}/msg.$$'\"\n"
        f"  {' '.join(options)}\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [require_tool("fetchmail"), "-f", str(rc), "--invisible", "-v", "--nodetach"],
        env={"FETCHMAILHOME": str(workdir), "PATH": "/usr/bin:/bin", "HOME": str(workdir)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: no new mail
    return result.stdout + result.stderr


def fetched(workdir: Path) -> list[bytes]:
    return sorted(path.read_bytes() for path in (workdir / "got").iterdir())


def test_fetchmail_keeps_then_fetches_only_new_then_deletes(mailpipe_factory: Factory,
                                                           tmp_path: Path) -> None:
    server, port = start(mailpipe_factory)
    stored = send_some(server, 3)
    work = tmp_path / "fm"
    fetchmail(work, port, "keep")
    assert fetched(work) == sorted(raw(server, m["uuid"]) for m in stored)
    assert server.get_json("/api/v1/messages")["total"] == 3  # kept
    # UIDL: a second run with `keep` fetches only what it has not seen.
    send(server, "fourth", "only this one is new")
    newest = server.wait_for_messages(4)[0]
    for path in (work / "got").iterdir():
        path.unlink()
    output = fetchmail(work, port, "keep")
    assert fetched(work) == [raw(server, newest["uuid"])], output
    # Without keep fetchmail deletes what it fetched: gone from the store.
    fetchmail(work, port, "fetchall")
    assert server.get_json("/api/v1/messages")["total"] == 0


def test_fetchmail_over_stls(mailpipe_factory: Factory, tmp_path: Path) -> None:
    server, port = start(mailpipe_factory, tls="self-signed")
    stored = send_some(server, 2)
    cert = server.workdir / "data" / "pop3" / "tls" / "selfsigned-cert.pem"
    work = tmp_path / "fmtls"
    output = fetchmail(work, port, "keep", "sslproto tls1.2+", "sslcertck",
                       f"sslcertfile {cert}", "sslcommonname localhost")
    assert "STLS" in output
    assert fetched(work) == sorted(raw(server, m["uuid"]) for m in stored)
