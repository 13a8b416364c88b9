"""Spam score (issue 15): a real spamd (Debian's) on a free port, real emails over SMTP into a
real `mailpipe serve`, the score and rules read back over HTTP and checked against what
Debian's own spamc says of the same bytes; spamd down, not configured, too large; and, for
the protocol's edges only, a fake spamd on a socket answering garbage, too much, too little
or nothing. Plus `spamassassin.start` (mailpipe's own spamd: what `make run` uses) and the
page's Spam tab in a real browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import pytest

from conftest import MailpipeServer, free_port, require_tool
from mailpipe.checks.spam import (
    SpamChecker,
    SpamNotConfigured,
    mailpit_sa_check,
)
from mailpipe.checks.spamd import ReplyParser, report_rules, request
from mailpipe.checks.spamd_daemon import become_nobody, spamd_argv
from mailpipe.children import die_with_parent
from mailpipe.config import ConfigError, load_config
from test_web_ui import Page, browser, open_page  # noqa: F401 (the browser fixtures)

# SpamAssassin's standard test string: any SpamAssassin scores it 1000 (rule GTUBE).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
READY_TIMEOUT = 120.0  # spamd loads its rules first


# ---- a real spamd ------------------------------------------------------------------------


def wait_for_spamd(addr: str, process: subprocess.Popen[bytes] | None, log: Path) -> None:
    checker = SpamChecker(addr, timeout=2.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"spamd exited ({process.returncode}):\n{log.read_text()}")
        try:
            asyncio.run(checker.ping())
            return
        except Exception:
            assert time.monotonic() < deadline, f"spamd did not start:\n{log.read_text()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's spamd on a free loopback port, with the arguments spamassassin.start uses."""
    executable = require_tool("spamd")
    port = free_port()
    log = tmp_path_factory.mktemp("spamd") / "spamd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            spamd_argv(executable, "127.0.0.1", port), stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=log_file, preexec_fn=die_with_parent(become_nobody),
        )
    addr = f"127.0.0.1:{port}"
    try:
        wait_for_spamd(addr, process, log)
        yield addr
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spamc(addr: str, *args: str, raw: bytes) -> str:
    """Debian's spamc on the same bytes: the oracle the API's answer is checked against."""
    executable = require_tool("spamc")
    host, port = addr.rsplit(":", 1)
    done = subprocess.run([executable, "-d", host, "-p", port, *args], input=raw,
                          capture_output=True, timeout=60)
    return done.stdout.decode()


# ---- emails over SMTP --------------------------------------------------------------------


def email(subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="example.com")
    message.set_content(text)
    return message


def send(server: MailpipeServer, message: EmailMessage) -> str:
    """The uuid of the email, sent over SMTP and read back from the list."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    deadline = time.monotonic() + 10
    while True:
        for summary in server.messages(limit=100):
            if summary.get("subject") == message["Subject"]:
                return str(summary["uuid"])
        assert time.monotonic() < deadline, f"{message['Subject']!r} never arrived"
        time.sleep(0.05)


def spam_check(server: MailpipeServer, uuid: str) -> tuple[int, dict[str, Any]]:
    status, body, headers = server.request("GET", f"/api/v1/messages/{uuid}/spam-check")
    assert headers["Content-Type"].startswith("application/json")
    return status, json.loads(body)


def configured(addr: str, **extra: Any) -> dict[str, Any]:
    return {"spamassassin": {"addr": addr, **extra}}


# ---- a real spamd: the score and every rule ----------------------------------------------


def test_gtube_is_spam_and_a_plain_email_is_not(
    spamd: str, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    server = mailpipe_factory(configured(spamd))
    spam = send(server, email("Win big", f"Hello,\n{GTUBE}\n"))
    ham = send(server, email("Your receipt", "Hello Alice,\nthanks for your order.\n"))

    status, result = spam_check(server, spam)
    assert status == 200, result
    assert result["is_spam"] is True
    assert result["score"] >= 1000 and result["threshold"] == 5.0
    by_name = {rule["name"]: rule for rule in result["rules"]}
    assert by_name["GTUBE"]["score"] == 1000
    assert "Generic Test for Unsolicited Bulk Email" in by_name["GTUBE"]["description"]
    # The report's table adds up to the total (each score shown to one decimal).
    total = sum(rule["score"] for rule in result["rules"])
    assert abs(total - result["score"]) <= 0.05 * len(result["rules"]) + 0.05

    # The same bytes through Debian's spamc: the same rules and the same score.
    _, raw, _ = server.request("GET", f"/api/v1/messages/{spam}/raw")
    assert set(by_name) == set(spamc(spamd, "-y", raw=raw).strip().split(","))
    score, threshold = spamc(spamd, "-c", raw=raw).strip().split("/")
    assert (float(score), float(threshold)) == (result["score"], result["threshold"])

    status, result = spam_check(server, ham)
    assert status == 200, result
    assert result["is_spam"] is False and result["score"] < result["threshold"]
    assert "GTUBE" not in {rule["name"] for rule in result["rules"]}
    _, raw, _ = server.request("GET", f"/api/v1/messages/{ham}/raw")
    names = spamc(spamd, "-y", raw=raw).strip()
    assert {rule["name"] for rule in result["rules"]} == set(names.split(",") if names else [])
    for rule in result["rules"]:
        assert rule["name"] and isinstance(rule["score"], float) and rule["description"]

    status, result = spam_check(server, "00000000-0000-4000-8000-000000000000")
    assert status == 404 and result == {"error": "message not found"}


def test_mailpit_sa_check_shape(spamd: str) -> None:
    """What the Mailpit-compatible API serves at /api/v1/message/{ID}/sa-check."""
    raw = email("Win big", f"{GTUBE}\n").as_bytes()
    result = asyncio.run(mailpit_sa_check(SpamChecker(spamd), raw))
    assert set(result) == {"IsSpam", "Error", "Score", "Rules"}
    assert result["IsSpam"] is True and result["Error"] == "" and result["Score"] >= 1000
    gtube = [rule for rule in result["Rules"] if rule["Name"] == "GTUBE"]
    assert gtube and gtube[0]["Score"] == 1000
    assert set(gtube[0]) == {"Name", "Score", "Description"}

    down = asyncio.run(mailpit_sa_check(SpamChecker(f"127.0.0.1:{free_port()}"), raw))
    assert down["IsSpam"] is False and down["Rules"] == [] and down["Score"] == 0
    assert "refused the connection" in down["Error"]
    with pytest.raises(SpamNotConfigured, match="not configured"):
        asyncio.run(mailpit_sa_check(None, raw))


def test_the_reply_parser_takes_spamd_replies_in_any_pieces(spamd: str) -> None:
    """The sans-I/O parser on a real spamd's bytes, whole and one byte at a time."""
    host, port = spamd.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request("REPORT", email("Win big", f"{GTUBE}\n").as_bytes()))
        conn.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: conn.recv(65536), b""))
    whole = ReplyParser().feed(reply)
    assert whole is not None  # its Content-length says when it is whole: no need of EOF
    assert whole.verdict() == (True, 1000.0, 5.0)
    parser = ReplyParser()
    pieces = [parser.feed(reply[i : i + 1]) for i in range(len(reply))]
    assert pieces[-1] == whole and not any(pieces[:-1])
    assert "GTUBE" in {rule.name for rule in report_rules(whole.body)}


# ---- off, down, too large ----------------------------------------------------------------


def test_not_configured_says_so(mailpipe_factory: Callable[..., MailpipeServer]) -> None:
    server = mailpipe_factory()
    uuid = send(server, email("Hello", "Plain body\n"))
    status, result = spam_check(server, uuid)
    assert status == 503
    assert "spam checking is not configured" in result["error"]
    assert "spamassassin.addr" in result["error"]


def test_spamd_down_is_a_clear_error(
    tmp_path: Path, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    port = free_port()  # nothing listens there
    server = mailpipe_factory(configured(f"127.0.0.1:{port}"))
    uuid = send(server, email("Hello", "Plain body\n"))
    status, result = spam_check(server, uuid)
    assert status == 502
    assert result["error"] == (f"spamd at 127.0.0.1:{port} refused the connection: is it "
                               "running? (see docs/spam.md)")

    socket_path = tmp_path / "no-spamd.sock"
    server = mailpipe_factory(configured(f"unix://{socket_path}"))
    uuid = send(server, email("Hello", "Plain body\n"))
    status, result = spam_check(server, uuid)
    assert status == 502
    assert f"spamd's socket {socket_path} does not exist" in result["error"]


# ---- a fake spamd, for the protocol's edges ----------------------------------------------


class FakeSpamd:
    """A TCP peer that reads each request whole, keeps it, and answers with `answer`."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.answer: Callable[[socket.socket], None] = lambda conn: None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):  # the client half-closes once it has sent all
                data += chunk
            self.requests.append(data)
            with contextlib.suppress(OSError):  # the client hung up: what then is the test
                self.answer(conn)

    def reply(self, data: bytes) -> None:
        self.answer = lambda conn: conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_spamd() -> Iterator[FakeSpamd]:
    fake = FakeSpamd()
    yield fake
    fake.close()


def report(spam: str, table: str) -> bytes:
    body = ("Spam detection software, running on the system \"fake\", has\n"
            "identified this incoming email as possible spam.\n\n"
            "Content analysis details:   (see below)\n\n"
            " pts rule name              description\n"
            "---- ---------------------- --------------------------------------------------\n"
            + table + "\n").encode()
    head = f"SPAMD/1.1 0 EX_OK\r\nContent-length: {len(body)}\r\nSpam: {spam}\r\n\r\n"
    return head.encode() + body


def endless(conn: socket.socket) -> None:
    conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1.0 / 5.0\r\n\r\n")
    while True:
        conn.sendall(b"x" * 65536)


def silent(conn: socket.socket) -> None:
    time.sleep(3)


HOSTILE: list[tuple[str, Callable[[socket.socket], None], int, str]] = [
    ("http", lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\nhello"), 502,
     "not a spamd status line: 'HTTP/1.1 200 OK'"),
    ("binary", lambda c: c.sendall(bytes(range(256)) * 4), 502, "not a spamd status line"),
    ("nothing", lambda c: None, 502, "spamd closed the connection without answering"),
    ("refused", lambda c: c.sendall(b"SPAMD/1.0 76 Bad header line: (Content-length)\r\n"),
     502, "did not check the email: 76 Bad header line: (Content-length)"),
    ("cut", lambda c: c.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 500\r\n"
                                b"Spam: True ; 3.0 / 5.0\r\n\r\nshort"),
     502, "the reply ended after 5 of its 500 bytes"),
    ("huge length", lambda c: c.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: "
                                        b"99999999999\r\n\r\n"), 502, "announces 99999999999"),
    ("endless", endless, 502, "the reply is larger than 1048576 bytes"),
    ("no verdict", lambda c: c.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\n\r\nhi"),
     502, "the reply has no Spam header"),
    ("bad verdict", lambda c: c.sendall(b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe ; lots / 5\r\n"
                                        b"Content-length: 0\r\n\r\n"),
     502, "the Spam header is not 'True ; score / threshold': 'maybe ; lots / 5'"),
    ("bad header", lambda c: c.sendall(b"SPAMD/1.1 0 EX_OK\r\n<script>\r\n\r\n"), 502,
     "not a header line: '<script>'"),
    ("silent", silent, 504, "did not answer within 1 s (spamassassin.timeout)"),
]


def test_hostile_spamd_replies_are_clear_errors(
    fake_spamd: FakeSpamd, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    server = mailpipe_factory(configured(fake_spamd.addr, timeout="1s"))
    uuid = send(server, email("Hello", "Plain body\n"))
    _, raw, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    for name, answer, status, message in HOSTILE:
        fake_spamd.answer = answer
        got, result = spam_check(server, uuid)
        assert got == status, (name, result)
        assert result["error"].startswith(f"spamd at {fake_spamd.addr} "), (name, result)
        assert message in result["error"], (name, result)
    # Every request was a whole REPORT of the stored bytes.
    head = f"REPORT SPAMC/1.5\r\nContent-length: {len(raw)}\r\n\r\n".encode()
    assert fake_spamd.requests and all(r == head + raw for r in fake_spamd.requests)
    assert server.request("GET", "/healthz")[0] == 200


def test_report_table_edges(
    fake_spamd: FakeSpamd, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    """What GTUBE never shows: wrapped descriptions, a rule's details, two-digit and negative
    scores, a sender's text in a description (returned as text), no table at all."""
    server = mailpipe_factory(configured(fake_spamd.addr))
    uuid = send(server, email("Hello", "Plain body\n"))
    fake_spamd.reply(report("False ; -1.9 / 5.0", (
        "-1.9 BAYES_00               BODY: Bayes spam probability is 0 to 1%\n"
        "                            [score: 0.0000]\n"
        "  10 URIBL_BLOCKED          ADMINISTRATOR NOTICE: The query to URIBL was\n"
        "                            blocked.  See\n"
        "                            http://wiki.apache.org/spamassassin/DnsBlocklists\n"
        "                             [URIs: example.com]\n"
        " 0.0 A_VERY_LONG_RULE_NAME_OVER_22 <b>quoted</b> text\n"
        "-0.0 NO_RELAYS              Informational: message was not relayed via SMTP\n")))
    status, result = spam_check(server, uuid)
    assert status == 200, result
    assert (result["score"], result["threshold"], result["is_spam"]) == (-1.9, 5.0, False)
    assert result["rules"] == [
        {"name": "BAYES_00", "score": -1.9,
         "description": "BODY: Bayes spam probability is 0 to 1% [score: 0.0000]"},
        {"name": "URIBL_BLOCKED", "score": 10.0,
         "description": "ADMINISTRATOR NOTICE: The query to URIBL was blocked.  See "
                        "http://wiki.apache.org/spamassassin/DnsBlocklists [URIs: example.com]"},
        {"name": "A_VERY_LONG_RULE_NAME_OVER_22", "score": 0.0,
         "description": "<b>quoted</b> text"},
        {"name": "NO_RELAYS", "score": -0.0,
         "description": "Informational: message was not relayed via SMTP"},
    ]
    # A site's own report template without the table: the verdict, no rules.
    body = b"This email scored 7.5."
    fake_spamd.reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 7.5 / 5.0\r\nContent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, result = spam_check(server, uuid)
    assert status == 200 and result == {"score": 7.5, "threshold": 5.0, "is_spam": True,
                                        "rules": []}


def test_an_email_above_max_size_is_not_sent(
    fake_spamd: FakeSpamd, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    server = mailpipe_factory(configured(fake_spamd.addr, max_size="2KB"))
    small = send(server, email("Small", "Plain body\n"))
    large = send(server, email("Large", ("x" * 70 + "\n") * 100))
    fake_spamd.reply(report("False ; 0.1 / 5.0", " 0.1 SMALL_RULE            Small\n"))
    assert spam_check(server, small)[0] == 200
    _, raw, _ = server.request("GET", f"/api/v1/messages/{large}/raw")
    assert len(raw) > 2048
    status, result = spam_check(server, large)
    assert status == 413
    assert result["error"].startswith(f"the email is {len(raw)} bytes, more than "
                                      "spamassassin.max_size (2048 bytes)")
    assert len(fake_spamd.requests) == 1  # the small one only


# ---- the config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"addr": "spamd.example.com"}, "expected host:port"),
        ({"addr": "127.0.0.1:0"}, "spamd's port (0 is not one)"),
        ({"start": True}, "spamassassin.start needs spamassassin.addr"),
        ({"addr": "10.1.2.3:783", "start": True}, "runs spamd on loopback only"),
        ({"addr": "unix:///run/spamd.sock", "start": True}, "not on a unix socket"),
        ({"addr": "127.0.0.1:783", "max_size": 0}, "max_size"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="spamassassin") as caught:
        load_config(cwd=tmp_path, overrides={"spamassassin": section})
    assert message in str(caught.value)


def test_config_addresses(tmp_path: Path) -> None:
    config, _ = load_config(cwd=tmp_path)
    assert config.spamassassin.addr is None  # off by default
    assert (config.spamassassin.timeout, config.spamassassin.max_size) == (10.0, 500 * 1024)
    for addr, where in [("127.0.0.1:783", "127.0.0.1:783"), ("tcp://[::1]:783", "[::1]:783"),
                        ("unix:///run/spamd.sock", "/run/spamd.sock"),
                        ("unix:/run/spamd.sock", "/run/spamd.sock")]:
        config, _ = load_config(cwd=tmp_path, overrides={"spamassassin": {"addr": addr}})
        checker = SpamChecker.from_config(config.spamassassin)
        assert checker is not None and checker.where == where


# ---- spamassassin.start: mailpipe's own spamd (make run) ---------------------------------


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_start_runs_spamd_and_stops_it(mailpipe_factory: Callable[..., MailpipeServer]) -> None:
    require_tool("spamd")
    port = free_port()
    server = mailpipe_factory(configured(f"127.0.0.1:{port}", start=True))
    uuid = send(server, email("Win big", f"{GTUBE}\n"))
    wait_until(lambda: "spamd ready on" in server.log(), "spamd to start")
    status, result = spam_check(server, uuid)
    assert status == 200 and result["is_spam"] is True, result
    assert (Path(server.workdir) / "data" / "spamd.log").stat().st_size > 0

    assert server.stop(signal.SIGTERM) == 0
    assert "spamd stopped" in server.log()
    wait_until(lambda: not port_open(port), "spamd to exit", timeout=30)  # with mailpipe

    # Killed outright, mailpipe still takes its spamd with it (the parent-death signal).
    server = mailpipe_factory(configured(f"127.0.0.1:{port}", start=True))
    wait_until(lambda: "spamd ready on" in server.log(), "spamd to start")
    server.stop(signal.SIGKILL)
    wait_until(lambda: not port_open(port), "spamd to exit", timeout=30)


# ---- the page ----------------------------------------------------------------------------


def test_spam_tab_in_the_browser(
    spamd: str, mailpipe_factory: Callable[..., MailpipeServer],
    open_page: Callable[..., Page],  # noqa: F811
) -> None:
    server = mailpipe_factory(configured(spamd))
    send(server, email("Win big", f"Hello,\n{GTUBE}\n"))
    tab = open_page(server)
    page = tab.open()
    tab.open_email("Win big")
    panel = tab.tab("Spam")
    panel.locator(".spam-score").wait_for()
    assert panel.locator(".spam-total").inner_text().startswith("100")
    assert panel.locator(".spam-verdict").inner_text() == "spam"
    gtube = panel.locator(".spam-rule", has_text="GTUBE")
    assert gtube.locator(".spam-points").inner_text() == "1000.0"
    assert "Generic Test for Unsolicited Bulk Email" in gtube.inner_text()
    panel.locator(".spam-again").click()  # asks again
    panel.locator(".spam-rule", has_text="GTUBE").wait_for()

    off = mailpipe_factory()
    send(off, email("Plain", "Hello\n"))
    tab = open_page(off)
    page = tab.open()
    tab.open_email("Plain")
    notice = tab.tab("Spam").locator(".spam-off")
    notice.wait_for()
    assert "spam checking is not configured" in notice.inner_text()
    assert page.locator(".spam-again").count() == 0
