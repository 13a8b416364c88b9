"""The POP3 core without sockets: bytes in, events out (pop3/protocol.py), and the store's
maildrop sizes against the core's own count."""

from __future__ import annotations

import base64
import hashlib

import pytest

from conftest import make_email
from mailpipe.capture.types import Close, Send
from mailpipe.pop3.protocol import (
    Delay,
    Event,
    FetchMessage,
    LoadMaildrop,
    Mode,
    POP3Session,
    POP3Settings,
    StartTLS,
    State,
    Update,
    message_lines,
    pop3_size,
)
from mailpipe.store.sqlite import SQLiteStore

USERS = {"dev": "s3cret pass"}
MESSAGES = {
    "u1": b"Subject: one\r\n\r\nfirst\r\n.dot line\r\n..two dots\r\nlast\r\n",
    "u2": b"Subject: two\nX: bare LF\n\nbody line 1\nbody line 2\nbody line 3",
}
DROP = [(uuid, pop3_size(raw)) for uuid, raw in MESSAGES.items()]


def settings(**over: object) -> POP3Settings:
    values: dict[str, object] = {"hostname": "pop.test", "users": USERS,
                                 "tls_available": True, "auth_failure_delay": 0.5}
    values.update(over)
    return POP3Settings(**values)  # type: ignore[arg-type]


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


class Driver:
    """Answers the core's I/O events the way pop3/server.py does, from MESSAGES."""

    def __init__(self, **over: object) -> None:
        self.core = POP3Session(settings(**over))
        self.events: list[Event] = []
        self.deleted: tuple[str, ...] = ()
        self.run(self.core.greeting())

    def run(self, events: list[Event]) -> None:
        while events:
            event = events.pop(0)
            self.events.append(event)
            if isinstance(event, LoadMaildrop):
                events[:0] = self.core.maildrop_loaded(DROP)
            elif isinstance(event, FetchMessage):
                events[:0] = self.core.message_loaded(MESSAGES.get(event.uuid))
            elif isinstance(event, Update):
                self.deleted = event.uuids
                events[:0] = self.core.update_done(True)

    def send(self, data: bytes) -> bytes:
        start = len(self.events)
        self.run(self.core.receive_data(data))
        return sent(self.events[start:])

    def login(self) -> None:
        assert self.send(b"USER dev\r\n") == b"+OK send PASS\r\n"
        assert self.send(b"PASS s3cret pass\r\n").startswith(b"+OK maildrop has 2 messages")


def test_greeting_carries_an_apop_timestamp() -> None:
    driver = Driver()
    greeting = sent(driver.events)
    assert greeting.startswith(b"+OK ") and greeting.endswith(b"\r\n")
    assert driver.core.timestamp.encode() in greeting
    assert driver.core.timestamp.endswith("@pop.test>")


def test_user_pass_then_stat_list_uidl() -> None:
    driver = Driver()
    driver.login()
    assert driver.core.state == State.TRANSACTION
    total = sum(size for _, size in DROP)
    assert driver.send(b"STAT\r\n") == f"+OK 2 {total}\r\n".encode()
    assert driver.send(b"LIST\r\n") == (
        f"+OK\r\n1 {DROP[0][1]}\r\n2 {DROP[1][1]}\r\n.\r\n".encode())
    assert driver.send(b"list 2\r\n") == f"+OK 2 {DROP[1][1]}\r\n".encode()
    assert driver.send(b"UIDL\r\n") == b"+OK\r\n1 u1\r\n2 u2\r\n.\r\n"
    assert driver.send(b"UIDL 1\r\n") == b"+OK 1 u1\r\n"
    assert driver.send(b"LIST 3\r\n") == b"-ERR no such message\r\n"
    assert driver.send(b"LIST 0\r\n") == b"-ERR no such message\r\n"
    assert driver.send(b"LIST x\r\n") == b"-ERR syntax error\r\n"


def test_retr_is_crlf_and_dot_stuffed() -> None:
    driver = Driver()
    driver.login()
    out = driver.send(b"RETR 1\r\n")
    assert out == (b"+OK %d octets\r\nSubject: one\r\n\r\nfirst\r\n..dot line\r\n"
                   b"...two dots\r\nlast\r\n.\r\n" % len(MESSAGES["u1"]))
    assert DROP[0][1] == len(MESSAGES["u1"])  # already CRLF: the size is the stored one
    # Bare LFs become CRLF, the last line gets its line end, the size counts them.
    out = driver.send(b"RETR 2\r\n")
    body = b"Subject: two\r\nX: bare LF\r\n\r\nbody line 1\r\nbody line 2\r\nbody line 3\r\n"
    assert out == f"+OK {len(body)} octets\r\n".encode() + body + b".\r\n"
    assert DROP[1][1] == len(body)


def test_top_gives_header_and_n_body_lines() -> None:
    driver = Driver()
    driver.login()
    assert driver.send(b"TOP 2 0\r\n") == b"+OK\r\nSubject: two\r\nX: bare LF\r\n\r\n.\r\n"
    assert driver.send(b"TOP 2 2\r\n") == (
        b"+OK\r\nSubject: two\r\nX: bare LF\r\n\r\nbody line 1\r\nbody line 2\r\n.\r\n")
    assert driver.send(b"TOP 1 99\r\n").endswith(b"...two dots\r\nlast\r\n.\r\n")
    assert driver.send(b"TOP 1\r\n") == b"-ERR syntax error\r\n"
    assert driver.send(b"TOP 1 -1\r\n") == b"-ERR syntax error\r\n"


def test_dele_marks_rset_unmarks_quit_updates() -> None:
    driver = Driver()
    driver.login()
    assert driver.send(b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert driver.send(b"DELE 1\r\n") == b"-ERR message already deleted\r\n"
    assert driver.send(b"RETR 1\r\n") == b"-ERR message already deleted\r\n"
    assert driver.send(b"STAT\r\n") == f"+OK 1 {DROP[1][1]}\r\n".encode()
    assert driver.send(b"LIST\r\n") == f"+OK\r\n2 {DROP[1][1]}\r\n.\r\n".encode()
    assert driver.send(b"RSET\r\n").startswith(b"+OK maildrop has 2 messages")
    assert driver.send(b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    assert driver.send(b"NOOP\r\n") == b"+OK\r\n"
    assert driver.deleted == ()  # nothing leaves the store before QUIT
    assert driver.send(b"QUIT\r\n") == b"+OK mailpipe POP3 server signing off\r\n"
    assert driver.deleted == ("u2",)
    assert isinstance(driver.events[-1], Close)
    assert driver.core.mode == Mode.CLOSED


def test_quit_without_dele_deletes_nothing() -> None:
    driver = Driver()
    driver.login()
    driver.send(b"QUIT\r\n")
    assert not any(isinstance(e, Update) for e in driver.events)
    assert isinstance(driver.events[-1], Close)


def test_commands_only_in_their_state() -> None:
    driver = Driver()
    assert driver.send(b"STAT\r\n") == b"-ERR command not valid in this state\r\n"
    assert driver.send(b"RETR 1\r\n") == b"-ERR command not valid in this state\r\n"
    assert driver.send(b"PASS x\r\n") == b"-ERR USER first\r\n"
    assert driver.send(b"FOO\r\n") == b"-ERR unknown command\r\n"
    driver.login()
    assert driver.send(b"USER dev\r\n") == b"-ERR command not valid in this state\r\n"
    assert driver.send(b"STLS\r\n") == b"-ERR command not valid in this state\r\n"


def test_bad_password_is_delayed_and_limited() -> None:
    driver = Driver(max_auth_failures=2)
    driver.send(b"USER dev\r\n")
    start = len(driver.events)
    assert driver.send(b"PASS wrong\r\n") == b"-ERR [AUTH] invalid username or password\r\n"
    assert Delay(0.5) in driver.events[start:]
    assert driver.core.state == State.AUTHORIZATION
    assert driver.send(b"PASS s3cret pass\r\n") == b"-ERR USER first\r\n"  # USER again
    driver.send(b"USER nobody\r\n")
    out = driver.send(b"PASS s3cret pass\r\nUSER dev\r\n")
    assert out == b"-ERR [AUTH] too many failed logins, closing\r\n"
    assert isinstance(driver.events[-1], Close)
    assert driver.send(b"USER dev\r\n") == b""  # closed: nothing more is read


def test_apop() -> None:
    driver = Driver()
    digest = hashlib.md5((driver.core.timestamp + USERS["dev"]).encode()).hexdigest()
    assert driver.send(f"APOP dev {digest}\r\n".encode()).startswith(b"+OK maildrop has 2")
    other = Driver()
    assert other.send(f"APOP dev {digest}\r\n".encode()).startswith(b"-ERR [AUTH]")


def test_auth_plain_initial_and_continued() -> None:
    token = base64.b64encode(b"\0dev\0s3cret pass")
    driver = Driver()
    assert driver.send(b"AUTH PLAIN " + token + b"\r\n").startswith(b"+OK maildrop has 2")
    driver = Driver()
    assert driver.send(b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(token + b"\r\n").startswith(b"+OK maildrop has 2")
    driver = Driver()
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(b"*\r\n") == b"-ERR authentication cancelled\r\n"
    assert driver.send(b"AUTH PLAIN !!notbase64\r\n").startswith(b"-ERR [AUTH]")
    assert driver.send(b"AUTH CRAM-MD5\r\n") == b"-ERR unsupported SASL mechanism\r\n"


def test_any_login_when_configured() -> None:
    driver = Driver(users=None)
    driver.send(b"USER whoever\r\n")
    assert driver.send(b"PASS anything\r\n").startswith(b"+OK maildrop has 2")


def test_capa_by_state_and_tls() -> None:
    driver = Driver()
    capa = driver.send(b"CAPA\r\n")
    assert capa.startswith(b"+OK") and capa.endswith(b"\r\n.\r\n")
    for cap in (b"TOP", b"UIDL", b"USER", b"SASL PLAIN", b"STLS", b"PIPELINING"):
        assert b"\r\n" + cap + b"\r\n" in capa
    assert b"STLS" not in Driver(tls_available=False).send(b"CAPA\r\n")
    driver.login()
    after = driver.send(b"CAPA\r\n")
    assert b"STLS" not in after and b"USER" not in after and b"UIDL" in after


def test_stls_drops_clear_text_pipelined_after_it() -> None:
    driver = Driver()
    start = len(driver.events)
    # An injection: clear text sent with STLS must not be read as if it came encrypted.
    assert driver.send(b"STLS\r\nUSER dev\r\nPASS s3cret pass\r\n") == (
        b"+OK begin TLS negotiation\r\n")
    assert isinstance(driver.events[-1], StartTLS)
    assert driver.send(b"CAPA\r\n") == b""  # the handshake is under way
    events = driver.core.tls_started()
    assert events == [] and driver.events[start:][-1] == StartTLS()
    assert driver.core.state == State.AUTHORIZATION and driver.core.username is None
    assert b"STLS" not in driver.send(b"CAPA\r\n")
    assert driver.send(b"STLS\r\n") == b"-ERR TLS already active\r\n"
    assert Driver(tls_available=False).send(b"STLS\r\n") == b"-ERR STLS not available\r\n"


def test_pipelined_commands_wait_for_the_store() -> None:
    core = POP3Session(settings())
    events = core.receive_data(b"USER dev\r\nPASS s3cret pass\r\nSTAT\r\nUIDL 2\r\n")
    assert sent(events) == b"+OK send PASS\r\n"
    assert events[-1] == LoadMaildrop("dev")
    assert core.receive_data(b"NOOP\r\n") == []  # buffered while the store is asked
    events = core.maildrop_loaded(DROP)
    assert sent(events) == (b"+OK maildrop has 2 messages (%d octets)\r\n+OK 2 %d\r\n"
                            b"+OK 2 u2\r\n+OK\r\n" % (DROP[0][1] + DROP[1][1],
                                                       DROP[0][1] + DROP[1][1]))


def test_message_gone_and_store_failures() -> None:
    core = POP3Session(settings())
    core.receive_data(b"USER dev\r\nPASS s3cret pass\r\n")
    assert sent(core.maildrop_loaded(None)).startswith(b"-ERR [SYS/TEMP]")
    assert core.state == State.AUTHORIZATION
    core.receive_data(b"USER dev\r\nPASS s3cret pass\r\n")
    core.maildrop_loaded(DROP)
    assert core.receive_data(b"RETR 1\r\n") == [FetchMessage("u1")]
    assert sent(core.message_loaded(None)) == b"-ERR message is no longer in the store\r\n"
    core.receive_data(b"RETR 1\r\n")
    assert sent(core.store_failed()).startswith(b"-ERR [SYS/TEMP]")
    core.receive_data(b"DELE 1\r\nQUIT\r\n")
    assert sent(core.update_done(False)).startswith(b"-ERR [SYS/TEMP]")


def test_garbage_and_long_lines() -> None:
    driver = Driver(max_line_length=300)
    assert driver.send(b"\x00\xff\xfe garbage \x80\r\n") == b"-ERR unknown command\r\n"
    assert driver.send(b"USER " + b"a" * 5000) == b"-ERR line too long\r\n"
    assert driver.send(b"a" * 5000 + b"\r\n") == b""  # the rest of that line is dropped
    assert driver.send(b"CAPA\r\n").startswith(b"+OK")
    out = driver.send(b"NONSENSE\r\n" * 25)
    assert out.endswith(b"-ERR too many errors, closing\r\n")
    assert out.count(b"-ERR unknown command") == 20  # max_errors, then closed
    assert isinstance(driver.events[-1], Close)


@pytest.mark.parametrize("raw", [
    b"",
    b"a",
    b"a\r",
    b"a\r\n",
    b"a\n\n",
    b"x\r\r\ny\r",
    b"\n\r\n\r\r\n.\n",
    b"\x00\xff\r\n\xc3\x28\n\x00",
    "Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9\n".encode(),
])
async def test_store_maildrop_size_is_the_core_count(store: SQLiteStore, raw: bytes) -> None:
    """LIST sizes come from SQL (no body read at login): they must equal what RETR sends."""
    email = make_email(raw=raw)
    await store.add(email)
    assert await store.maildrop() == [(email.uuid, pop3_size(raw))]
    assert pop3_size(raw) == len(b"".join(line + b"\r\n" for line in message_lines(raw)))


async def test_store_maildrop_is_oldest_first(store: SQLiteStore) -> None:
    emails = [make_email(f"n{i}") for i in range(3)]
    for email in emails:
        await store.add(email)
    assert [uuid for uuid, _ in await store.maildrop()] == [e.uuid for e in emails]
