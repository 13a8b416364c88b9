"""The sans-I/O SMTP core, driven directly: bytes in, events out."""

from __future__ import annotations

import base64
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpipe.capture.protocol import (
    V_BARE_LF_COMMAND,
    V_BARE_LF_DATA,
    V_BARE_LF_END,
    V_EIGHT_BIT,
    V_LONG_DATA_LINE,
    V_NO_HELO,
    V_PRE_TLS_DATA,
    ProtocolSettings,
    SMTPConnection,
)
from mailpipe.capture.server import protocol_settings
from mailpipe.capture.spool import SPOOL_FAILED, Spooler
from mailpipe.capture.types import (
    BodyChunk,
    BodyDropped,
    Close,
    Disconnect,
    Envelope,
    Event,
    MessageReceived,
    Proceed,
    Reply,
    Respond,
    Send,
    Stage,
    StartTLS,
    Trace,
    VerdictNeeded,
    Violation,
)
from mailpipe.config import SMTPConfig

OK = Reply(250, "2.0.0 Ok: queued")
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.org>\r\n"


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def clock() -> datetime:
    return NOW


def make_settings(**overrides: Any) -> ProtocolSettings:
    """The settings a listener gets from the config's defaults, with `overrides`."""
    smtp = SMTPConfig()
    base = protocol_settings(
        smtp.listeners()[0], spool_threshold=smtp.spool_threshold, transcript=False,
        tls_available=False,
    )
    return replace(base, **overrides)


class Driven:
    """An SMTPConnection with the body spool the transport gives it (server.py does the
    same): BodyChunk events go to a temp file in `spool_dir`, which a chunked message's body
    then is. Everything else is the connection's own."""

    def __init__(self, conn: SMTPConnection, spool_dir: str | None = None) -> None:
        self.conn = conn
        self.spooler = Spooler(spool_dir)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def _spool(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            out.append(event)
            if isinstance(event, BodyChunk):
                self.spooler.chunk(event.data)
            elif isinstance(event, BodyDropped):
                self.spooler.drop()
            elif (isinstance(event, MessageReceived) and event.chunked
                  and not self.spooler.attach(event)):
                out.pop()
                out += self._spool(self.conn.verdict(SPOOL_FAILED))
        return out

    def start(self) -> list[Event]:
        return self._spool(self.conn.start())

    def receive(self, data: bytes) -> list[Event]:
        return self._spool(self.conn.receive(data))

    def verdict(self, *args: Any, **kwargs: Any) -> list[Event]:
        return self._spool(self.conn.verdict(*args, **kwargs))

    def reply_to_message(self, *args: Any, **kwargs: Any) -> list[Event]:
        return self._spool(self.conn.reply_to_message(*args, **kwargs))

    def tls_started(self) -> list[Event]:
        return self._spool(self.conn.tls_started())

    def idle_timeout(self) -> list[Event]:
        return self._spool(self.conn.idle_timeout())

    def shutdown(self) -> list[Event]:
        return self._spool(self.conn.shutdown())

    def connection_lost(self) -> None:
        self.conn.connection_lost()
        self.spooler.drop()


def new_conn(*, tls_active: bool = False, spool_dir: str | None = None,
             held: frozenset[Any] = frozenset(), judge: Any = None, **kwargs: Any) -> Driven:
    settings = make_settings(**kwargs)
    conn = SMTPConnection(settings, clock=clock, tls_active=tls_active, held=held)
    conn.judge = judge
    return Driven(conn, spool_dir)


def connect(**kwargs: Any) -> Driven:
    conn = new_conn(**kwargs)
    conn.start()
    return conn


def sent(events: Iterable[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def replies(events: Iterable[Event]) -> list[str]:
    """Each reply line, decoded, e.g. ['250-localhost', ..., '250 HELP']."""
    return sent(events).decode().split("\r\n")[:-1]


def final_codes(events: Iterable[Event]) -> list[str]:
    """The code and enhanced code of every final reply line, e.g. ['250 2.1.0']."""
    return [" ".join(line.split()[:2]) for line in replies(events) if line[3:4] == " "]


def messages(events: Iterable[Event]) -> list[MessageReceived]:
    return [e for e in events if isinstance(e, MessageReceived)]


def violations(events: Iterable[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Violation)]


def one_message(events: list[Event]) -> MessageReceived:
    found = messages(events)
    assert len(found) == 1, events
    return found[0]


@dataclass
class Session:
    """Drives a connection like a transport would, accepting every message."""

    conn: Driven
    output: bytearray = field(default_factory=bytearray)
    received: list[MessageReceived] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @classmethod
    def start(cls, **kwargs: object) -> Session:
        conn = new_conn(**kwargs)
        session = cls(conn)
        session._handle(conn.start())
        return session

    def feed(self, data: bytes) -> list[Event]:
        before = len(self.events)
        self._handle(self.conn.receive(data))
        return self.events[before:]

    def _handle(self, events: list[Event]) -> None:
        while events:
            self.events.extend(events)
            pending, events = events, []
            for event in pending:
                if isinstance(event, Send):
                    self.output += event.data
                elif isinstance(event, MessageReceived):
                    self.received.append(event)
                    self.bodies.append(event.body.read())
                    event.body.discard()
                    events = self.conn.reply_to_message(OK)
                elif isinstance(event, StartTLS):
                    events = self.conn.tls_started()
                elif isinstance(event, VerdictNeeded):
                    events = self.conn.verdict(Proceed())


# ---- greeting, EHLO, basic commands ---------------------------------------------------


def test_greeting_uses_hostname() -> None:
    conn = new_conn(hostname="mx.test")
    assert conn.start() == [Send(b"220 mx.test ESMTP mailpipe\r\n")]


def test_ehlo_advertises_extensions() -> None:
    conn = connect(hostname="mx.test", max_message_size=1000)
    assert replies(conn.receive(b"EHLO client\r\n")) == [
        "250-mx.test",
        "250-PIPELINING",
        "250-SIZE 1000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-CHUNKING",
        "250-ENHANCEDSTATUSCODES",
        "250-AUTH PLAIN LOGIN XOAUTH2",
        "250 HELP",
    ]
    assert conn.helo == "client"


def test_auth_offers_the_configured_mechanisms_and_refuses_the_others() -> None:
    conn = connect(auth_mechanisms=("LOGIN", "CRAM-MD5"))
    assert "250-AUTH LOGIN CRAM-MD5" in replies(conn.receive(b"EHLO client\r\n"))
    assert final_codes(conn.receive(b"AUTH PLAIN " + b64("\0u\0p").encode() + b"\r\n")) == [
        "504 5.5.4"
    ]
    assert not conn.auth.attempted
    bare = connect(auth_mechanisms=())
    assert not any("AUTH" in line for line in replies(bare.receive(b"EHLO client\r\n")))
    assert final_codes(bare.receive(b"AUTH LOGIN\r\n")) == ["504 5.5.4"]


def test_ehlo_plain_size_when_unlimited_and_starttls_when_available() -> None:
    lines = replies(connect(max_message_size=0, tls_available=True).receive(b"EHLO c\r\n"))
    assert "250-SIZE" in lines
    assert "250-STARTTLS" in lines
    active = new_conn(tls_available=True, tls_active=True)
    assert "250-STARTTLS" not in replies(active.receive(b"EHLO c\r\n"))


def test_helo_and_missing_argument() -> None:
    conn = connect(hostname="mx.test")
    assert replies(conn.receive(b"HELO\r\nEHLO\r\nhelo box\r\n")) == [
        "501 5.5.4 Syntax: HELO hostname",
        "501 5.5.4 Syntax: EHLO hostname",
        "250 mx.test",
    ]
    assert conn.helo == "box"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"NOOP", "250 2.0.0 Ok"),
        (b"noop whatever", "250 2.0.0 Ok"),
        (b"RSET", "250 2.0.0 Ok"),
        (
            b"VRFY someone",
            "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (b"EXPN list", "502 5.5.1 Command not implemented"),
        (b"FOO bar", "500 5.5.2 Command unrecognized"),
        (b"", "500 5.5.2 Command unrecognized"),
        (b"STARTTLS", "502 5.5.1 Command not implemented"),
    ],
)
def test_simple_commands(line: bytes, expected: str) -> None:
    conn = connect()
    assert replies(conn.receive(b"EHLO c\r\n"))[-1] == "250 HELP"
    assert replies(conn.receive(line + b"\r\n")) == [expected]
    assert not conn.closed


def test_help() -> None:
    (line,) = replies(connect().receive(b"HELP\r\n"))
    assert line.startswith("214 2.0.0 ") and "EHLO" in line and "BDAT" in line


def test_junk_commands_are_violations_and_the_session_goes_on() -> None:
    conn = connect()
    events = conn.receive(b"GET / HTTP/1.1\r\nEXPN x\r\nNOOP\r\n")
    assert final_codes(events) == ["500 5.5.2", "502 5.5.1", "250 2.0.0"]
    assert violations(events) == ["unrecognized command 'GET'", "unimplemented command EXPN"]


def test_quit_closes_and_ignores_the_rest() -> None:
    conn = connect()
    events = conn.receive(b"QUIT\r\nNOOP\r\n")
    assert events == [Send(b"221 2.0.0 Bye\r\n"), Close()]
    assert conn.closed
    assert conn.receive(b"NOOP\r\n") == []
    assert conn.idle_timeout() == []
    assert conn.shutdown() == []


def test_commands_are_case_insensitive() -> None:
    conn = connect()
    events = conn.receive(b"ehlo c\r\nmail from:<a@b>\r\nRcPt To:<c@d>\r\ndata\r\nx\r\n.\r\n")
    msg = one_message(events)
    assert (msg.envelope.mail_from, msg.envelope.rcpt_to) == ("a@b", ["c@d"])


# ---- a whole conversation, pipelining, event order ------------------------------------


def test_full_conversation() -> None:
    conn = connect(hostname="mx.test")
    conn.receive(b"EHLO client.example\r\n")
    assert conn.receive(b"MAIL FROM:<app@example.com> BODY=8BITMIME SIZE=100\r\n") == [
        Send(b"250 2.1.0 Ok\r\n")
    ]
    assert conn.in_transaction
    assert conn.receive(b"RCPT TO:<a@example.org> NOTIFY=NEVER\r\n") == [Send(b"250 2.1.5 Ok\r\n")]
    conn.receive(b"RCPT TO:<b@example.org>\r\n")
    assert conn.receive(b"DATA\r\n") == [Send(b"354 End data with <CR><LF>.<CR><LF>\r\n")]
    assert conn.in_data
    assert conn.receive(b"Subject: hi\r\n\r\nHello\r\n") == []
    events = conn.receive(b".\r\n")
    msg = one_message(events)
    assert conn.awaiting_reply and not conn.in_data
    assert msg.envelope.mail_from == "app@example.com"
    assert msg.envelope.mail_options == ["BODY=8BITMIME", "SIZE=100"]
    assert msg.envelope.rcpt_to == ["a@example.org", "b@example.org"]
    assert msg.envelope.rcpt_options == [["NOTIFY=NEVER"], []]
    assert msg.envelope.helo == "client.example"
    assert msg.body.read() == b"Subject: hi\r\n\r\nHello\r\n"
    assert msg.body.size == len(msg.body.read())
    assert msg.received_at.tzinfo is UTC
    assert msg.violations == [] and msg.transcript is None and msg.tls is False
    assert conn.reply_to_message(OK) == [Send(b"250 2.0.0 Ok: queued\r\n")]
    assert not conn.in_transaction and not conn.awaiting_reply
    assert conn.receive(b"QUIT\r\n") == [Send(b"221 2.0.0 Bye\r\n"), Close()]


def test_pipelined_commands_get_one_send_in_order() -> None:
    conn = connect()
    events = conn.receive(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nNOOP\r\nRSET\r\n"
    )
    assert len(events) == 1 and isinstance(events[0], Send)
    assert final_codes(events) == [
        "250 HELP",
        "250 2.1.0",
        "250 2.1.5",
        "250 2.1.5",
        "250 2.0.0",
        "250 2.0.0",
    ]
    assert not conn.in_transaction  # RSET


def test_send_precedes_message_and_pipelined_input_waits_for_the_verdict() -> None:
    conn = connect()
    events = conn.receive(ENVELOPE + b"DATA\r\nbody\r\n.\r\nMAIL FROM:<x@y>\r\nQUIT\r\n")
    assert [type(e) for e in events] == [Send, MessageReceived]
    assert final_codes(events)[-1] == "354 End"
    assert conn.awaiting_reply and conn.in_transaction
    assert conn.receive(b"NOOP\r\n") == []  # buffered, not answered yet
    events = conn.reply_to_message(Reply(451, "4.3.0 Try again"))
    assert events == [
        Send(b"451 4.3.0 Try again\r\n250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n"),
        Close(),
    ]


def test_reply_to_message_close_after() -> None:
    conn = connect()
    conn.receive(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")
    events = conn.reply_to_message(Reply(554, "5.7.1 Rejected"), close_after=True)
    assert events == [Send(b"554 5.7.1 Rejected\r\n221 2.0.0 Bye\r\n"), Close()]
    assert conn.closed


def test_reply_to_message_without_a_message_is_an_error() -> None:
    conn = connect()
    with pytest.raises(RuntimeError):
        conn.reply_to_message(OK)
    conn.shutdown()
    assert conn.reply_to_message(OK) == []


def test_each_message_gets_a_fresh_envelope_and_keeps_helo_and_auth() -> None:
    session = Session.start()
    session.feed(b"EHLO c\r\nAUTH PLAIN " + b64("\0u\0p").encode() + b"\r\n")
    for rcpt in (b"one@x", b"two@x"):
        session.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\nhi\r\n.\r\n")
    first, second = session.received
    assert first.envelope is not second.envelope
    assert first.envelope.rcpt_to == ["one@x"] and second.envelope.rcpt_to == ["two@x"]
    assert first.envelope.helo == second.envelope.helo == "c"
    assert first.auth.username == second.auth.username == "u"


# ---- MAIL / RCPT / DATA ordering and limits -------------------------------------------


@pytest.mark.parametrize(
    ("arg", "address", "options"),
    [
        ("FROM:<a@b.c>", "a@b.c", []),
        ("FROM: <a@b.c>", "a@b.c", []),
        ("from:a@b.c SIZE=5", "a@b.c", ["SIZE=5"]),
        ("FROM:<>", "", []),
        ("FROM:<> BODY=8BITMIME SMTPUTF8", "", ["BODY=8BITMIME", "SMTPUTF8"]),
        ("FROM:<jürgen@bücher.de> SMTPUTF8", "jürgen@bücher.de", ["SMTPUTF8"]),
        ("FROM:<@relay:a@b.c>", "@relay:a@b.c", []),
    ],
)
def test_mail_from_is_permissive(arg: str, address: str, options: list[str]) -> None:
    conn = connect()
    events = conn.receive(b"EHLO c\r\nMAIL " + arg.encode() + b"\r\nRCPT TO:<r@x>\r\nDATA\r\n.\r\n")
    msg = one_message(events)
    assert (msg.envelope.mail_from, msg.envelope.mail_options) == (address, options)


def test_mail_and_rcpt_syntax_errors() -> None:
    conn = connect()
    events = conn.receive(
        b"EHLO c\r\nMAIL\r\nMAIL TO:<a@b>\r\nMAIL FROM:<a@b\r\nMAIL FROM:\r\n"
        b"MAIL FROM:<a@b>\r\nRCPT\r\nRCPT TO:\r\nRCPT TO:<>\r\nRCPT FROM:<x>\r\n"
    )
    assert final_codes(events)[1:] == ["501 5.5.4"] * 4 + ["250 2.1.0"] + ["501 5.5.4"] * 4


def test_missing_colon_is_tolerated_as_a_violation() -> None:
    events = connect().receive(b"EHLO c\r\nMAIL FROM <a@b>\r\nRCPT TO <c@d>\r\nDATA\r\n.\r\n")
    msg = one_message(events)
    assert (msg.envelope.mail_from, msg.envelope.rcpt_to) == ("a@b", ["c@d"])
    assert msg.violations == ["MAIL/RCPT without colon after FROM/TO"]


def test_command_order_errors() -> None:
    conn = connect()
    events = conn.receive(
        b"EHLO c\r\nRCPT TO:<a@b>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\n"
    )
    assert replies(events)[-5:] == [
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: nested MAIL command",
        "503 5.5.1 Error: need RCPT command",
    ]
    assert not conn.in_data


def test_rset_forgets_the_transaction() -> None:
    conn = connect()
    events = conn.receive(ENVELOPE + b"RSET\r\nDATA\r\nRCPT TO:<a@b>\r\n")
    assert final_codes(events)[-3:] == ["250 2.0.0", "503 5.5.1", "503 5.5.1"]


def test_mail_without_helo_is_accepted_as_a_violation() -> None:
    conn = connect()
    events = conn.receive(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
    msg = one_message(events)
    assert msg.envelope.helo == "" and conn.helo == ""
    assert msg.violations == [V_NO_HELO]
    assert violations(events) == [V_NO_HELO]


def test_size_parameter_over_the_limit_is_refused() -> None:
    conn = connect(max_message_size=1000)
    events = conn.receive(b"EHLO c\r\nMAIL FROM:<a@b> SIZE=1001\r\nMAIL FROM:<a@b> size=1000\r\n")
    assert replies(events)[-2:] == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.1.0 Ok",
    ]
    huge = connect(max_message_size=1000).receive(b"MAIL FROM:<a@b> SIZE=" + b"9" * 500 + b"\r\n")
    assert final_codes(huge) == ["552 5.3.4"]
    unlimited = connect(max_message_size=0).receive(b"MAIL FROM:<a@b> SIZE=99999999999\r\n")
    assert final_codes(unlimited) == ["250 2.1.0"]


@pytest.mark.parametrize("param", [b"SIZE=-5", b"SIZE=abc", b"SIZE=1e9", b"SIZE=", b"size",
                                   b"SIZE=+5", b"SIZE=5.0", b"SIZE=\xd9\xa5"])
def test_size_parameter_that_is_not_a_number_is_a_syntax_error(param: bytes) -> None:
    conn = connect()
    events = conn.receive(b"EHLO c\r\nMAIL FROM:<a@b> BODY=8BITMIME " + param + b"\r\n"
                          b"RCPT TO:<c@d>\r\nMAIL FROM:<a@b> SIZE=007\r\n")
    assert replies(events)[-3:] == [
        "501 5.5.4 Bad SIZE parameter: SIZE takes a decimal number of octets (RFC 1870)",
        "503 5.5.1 Error: need MAIL command",  # no transaction was started
        "250 2.1.0 Ok",
    ]


def test_unknown_mail_parameters_are_kept() -> None:
    # RFC 5321 would answer 555; a capture server takes them, and the event shows them.
    events = connect().receive(b"EHLO c\r\nMAIL FROM:<a@b> X-FOO=1 RET=HDRS SIZE=12\r\n"
                               b"RCPT TO:<c@d>\r\nDATA\r\nhello\r\n.\r\n")
    assert one_message(events).envelope.mail_options == ["X-FOO=1", "RET=HDRS", "SIZE=12"]


def test_recipient_limit() -> None:
    conn = connect(max_recipients=100)
    conn.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    rcpts = b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(102))
    codes = final_codes(conn.receive(rcpts))
    assert codes == ["250 2.1.5"] * 100 + ["452 4.5.3"] * 2
    msg = one_message(conn.receive(b"DATA\r\n.\r\n"))
    assert len(msg.envelope.rcpt_to) == 100 and msg.envelope.rcpt_to[-1] == "r99@x"


# ---- DATA -----------------------------------------------------------------------------


def deliver(body: bytes, **kwargs: object) -> MessageReceived:
    """One message through DATA: `body` is sent as is and must end with the terminator."""
    return one_message(connect(**kwargs).receive(ENVELOPE + b"DATA\r\n" + body))


def test_empty_message() -> None:
    msg = deliver(b".\r\n")
    assert msg.body.read() == b"" and msg.body.size == 0


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..leading\r\n.\r\n", b".leading\r\n"),
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"a\n..b\r\n.\r\n", b"a\n..b\r\n"),  # after a bare LF: no line start, no stuffing
        (b"a\r\n.\r\nNOOP\r\n", b"a\r\n"),
        (b"x.\r\n..\r\n.\r\n", b"x.\r\n.\r\n"),
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, body: bytes) -> None:
    assert deliver(wire).body.read() == body


@pytest.mark.parametrize("terminator", [b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n"])
def test_bare_lf_terminators_end_data_in_a_bare_lf_session(terminator: bytes) -> None:
    conn = connect()
    msg = one_message(conn.receive(ENVELOPE.replace(b"\r\n", b"\n") + b"DATA\nline" + terminator))
    assert msg.body.read() == b"line" + terminator.split(b".")[0]
    bare = terminator != b"\r\n.\r\n"
    assert (V_BARE_LF_DATA in msg.violations) == bare
    assert (V_BARE_LF_END in msg.violations) == bare


def test_data_checks_long_lines_and_8bit() -> None:
    assert V_LONG_DATA_LINE not in deliver(b"x" * 998 + b"\r\n.\r\n").violations
    assert V_LONG_DATA_LINE in deliver(b"x" * 999 + b"\r\n.\r\n").violations
    assert V_LONG_DATA_LINE in deliver(b"a\r\n" + b"x" * 2000 + b"\r\nb\r\n.\r\n").violations
    assert deliver(b"caf\xc3\xa9\r\n.\r\n").violations == [V_EIGHT_BIT]
    for option in (b"BODY=8BITMIME", b"SMTPUTF8"):
        conn = connect()
        events = conn.receive(
            b"EHLO c\r\nMAIL FROM:<a@b> " + option + b"\r\nRCPT TO:<c@d>\r\n"
            b"DATA\r\ncaf\xc3\xa9\r\n.\r\n"
        )
        assert one_message(events).violations == []


def test_bare_lf_commands_are_accepted_as_violations() -> None:
    conn = connect()
    events = conn.receive(b"EHLO c\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nbody\n.\n")
    msg = one_message(events)
    assert msg.body.read() == b"body\n"
    assert msg.violations == [V_BARE_LF_COMMAND, V_BARE_LF_DATA, V_BARE_LF_END]
    assert violations(events) == [V_BARE_LF_COMMAND, V_BARE_LF_DATA, V_BARE_LF_END]  # once each


def test_violations_belong_to_the_next_message_only() -> None:
    session = Session.start()
    session.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\ny\r\n.\r\n")
    session.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nok\r\n.\r\n")
    assert [m.violations for m in session.received] == [[V_NO_HELO, V_BARE_LF_DATA], []]


def test_terminator_split_at_every_byte_boundary() -> None:
    wire = ENVELOPE + b"DATA\r\n..a\r\nb\r\n.\r\n"
    whole = Session.start()
    whole.feed(wire)
    for cut in range(1, len(wire)):
        split = Session.start()
        split.feed(wire[:cut])
        split.feed(wire[cut:])
        assert split.bodies == whole.bodies == [b".a\r\nb\r\n"], cut
        assert split.output == whole.output


def test_one_byte_chunks_give_the_same_result() -> None:
    wire = (
        ENVELOPE
        + b"DATA\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        + b"..x\r\n\n\r\n" * 3
        + b".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\nab\r\n.BDAT 1 LAST\r\nz"
        + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 0 LAST\r\nQUIT\r\n"
    )
    whole = Session.start()
    whole.feed(wire)
    bytewise = Session.start()
    for i in range(len(wire)):
        bytewise.feed(wire[i : i + 1])
    assert whole.bodies == [b"", b".x\r\n\n\r\n" * 3, b"ab\r\n.z", b""]
    assert bytewise.bodies == whole.bodies
    assert bytewise.output == whole.output
    assert bytewise.conn.closed


def test_oversize_message_is_refused_and_the_session_goes_on() -> None:
    session = Session.start(max_message_size=100)
    session.feed(ENVELOPE + b"DATA\r\n")
    for _ in range(50):
        session.feed(b"x" * 78 + b"\r\n")
    assert len(session.conn._buf) < 100  # stopped keeping the body
    events = session.feed(b".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nsmall\r\n.\r\n")
    assert replies(events)[0] == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert session.bodies == [b"small\r\n"]


def test_message_of_exactly_the_maximum_size_is_accepted() -> None:
    assert deliver(b"x" * 98 + b"\r\n.\r\n", max_message_size=100).body.size == 100


def test_large_message_in_big_chunks() -> None:
    body = b"".join(b"line %d .\r\n..dot\r\n" % i for i in range(200_000))
    session = Session.start(max_message_size=0, spool_threshold=1 << 30)
    session.feed(ENVELOPE + b"DATA\r\n")
    for i in range(0, len(body), 65536):
        session.feed(body[i : i + 65536])
    session.feed(b".\r\n")
    assert session.bodies == [body.replace(b"\n..", b"\n.")]
    assert session.received[0].violations == []


# ---- spooling -------------------------------------------------------------------------


def spooled(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path))


def test_large_body_is_spooled_to_a_temp_file(tmp_path: Path) -> None:
    conn = connect(spool_threshold=100, spool_dir=str(tmp_path))
    lines = [b"..%05d-" % i + b"x" * 40 + b"\r\n" for i in range(100)]
    conn.receive(ENVELOPE + b"DATA\r\n")
    wire = b"".join(lines) + b".\r\n"
    events: list[Event] = []
    for i in range(0, len(wire), 7):  # odd chunks: stuffed dots straddle writes
        events += conn.receive(wire[i : i + 7])
    msg = one_message(events)
    assert msg.body.data is None and msg.body.path is not None
    assert Path(msg.body.path).parent == tmp_path
    assert Path(msg.body.path).name.startswith("mailpipe-spool-")
    expected = b"".join(line[1:] for line in lines)
    assert msg.body.read() == expected and msg.body.size == len(expected)
    msg.body.discard()
    assert spooled(tmp_path) == []


def test_spooled_body_checks_still_see_the_whole_message(tmp_path: Path) -> None:
    wire = b"a" * 500 + b"\n" + b"b" * 400 + b"\xff" + b"c" * 700 + b"\r\n.\r\n"
    conn = connect(spool_threshold=64, spool_dir=str(tmp_path))
    conn.receive(ENVELOPE + b"DATA\r\n")
    events: list[Event] = []
    for i in range(0, len(wire), 50):
        events += conn.receive(wire[i : i + 50])
    msg = one_message(events)
    assert msg.body.path is not None
    assert sorted(msg.violations) == sorted([V_BARE_LF_DATA, V_LONG_DATA_LINE, V_EIGHT_BIT])
    msg.body.discard()


def test_oversize_spooled_body_removes_its_file(tmp_path: Path) -> None:
    conn = connect(spool_threshold=100, max_message_size=1000, spool_dir=str(tmp_path))
    conn.receive(ENVELOPE + b"DATA\r\n" + b"y" * 500)
    assert len(spooled(tmp_path)) == 1
    conn.receive(b"y" * 600)
    assert spooled(tmp_path) == []
    events = conn.receive(b"\r\n.\r\nNOOP\r\n")
    assert final_codes(events) == ["552 5.3.4", "250 2.0.0"]
    assert spooled(tmp_path) == []


@pytest.mark.parametrize("end", ["idle_timeout", "shutdown", "connection_lost"])
def test_abandoned_spool_is_removed(tmp_path: Path, end: str) -> None:
    conn = connect(spool_threshold=10, spool_dir=str(tmp_path))
    conn.receive(ENVELOPE + b"DATA\r\n" + b"z" * 100)
    assert len(spooled(tmp_path)) == 1
    getattr(conn, end)()
    assert conn.closed and spooled(tmp_path) == []


def test_unwritable_spool_dir_answers_451(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    conn = connect(spool_threshold=10, spool_dir=missing)
    events = conn.receive(ENVELOPE + b"DATA\r\n" + b"z" * 100 + b"\r\n.\r\nNOOP\r\n")
    assert final_codes(events)[-2:] == ["451 4.3.0", "250 2.0.0"]
    assert not messages(events)


# ---- BDAT -----------------------------------------------------------------------------


def test_bdat_chunks_are_binary_and_not_unstuffed() -> None:
    conn = connect()
    chunk = b"a\r\n.\r\n..b\r\n"
    events = conn.receive(ENVELOPE + b"BDAT %d\r\n" % len(chunk) + chunk)
    assert replies(events)[-1] == f"250 2.0.0 {len(chunk)} bytes received"
    assert conn.in_transaction and not conn.in_data
    conn.receive(b"BDAT 4 LAST\r\n\x00\xff")
    assert conn.in_data
    msg = one_message(conn.receive(b"\r\n"))
    assert msg.body.read() == chunk + b"\x00\xff\r\n"
    assert msg.violations == []


def test_bdat_zero_last_and_syntax_errors() -> None:
    conn = connect()
    events = conn.receive(
        ENVELOPE + b"BDAT\r\nBDAT x\r\nBDAT 1 FIRST\r\nBDAT 1 LAST extra\r\nBDAT 0 last\r\n"
    )
    assert final_codes(events)[-4:] == ["501 5.5.4"] * 4
    assert one_message(events).body.read() == b""


def test_bdat_without_transaction_still_consumes_its_bytes() -> None:
    conn = connect()
    events = conn.receive(b"EHLO c\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n")
    assert final_codes(events)[1:] == ["503 5.5.1", "250 2.0.0"]
    events = conn.receive(b"MAIL FROM:<a@b>\r\nBDAT 6\r\nRSET\r\nNOOP\r\n")
    assert replies(events)[1:] == ["503 5.5.1 Error: need RCPT command", "250 2.0.0 Ok"]


def test_data_after_bdat_is_refused() -> None:
    conn = connect()
    events = conn.receive(ENVELOPE + b"BDAT 2\r\nabDATA\r\nBDAT 1 LAST\r\nc")
    assert replies(events)[-2:] == [
        "250 2.0.0 2 bytes received",
        "503 5.5.1 Error: DATA not allowed after BDAT",
    ]
    assert one_message(events).body.read() == b"abc"


def test_bdat_oversize_is_refused_after_last() -> None:
    conn = connect(max_message_size=10)
    events = conn.receive(
        ENVELOPE + b"BDAT 8\r\n12345678BDAT 8\r\n12345678BDAT 1 LAST\r\n9NOOP\r\n"
    )
    assert final_codes(events)[-4:] == ["250 2.0.0", "250 2.0.0", "552 5.3.4", "250 2.0.0"]
    assert not messages(events) and not conn.in_transaction


def test_bdat_spools_large_bodies(tmp_path: Path) -> None:
    conn = connect(spool_threshold=50, spool_dir=str(tmp_path))
    data = bytes(range(256)) * 2
    events = conn.receive(ENVELOPE + b"BDAT 100\r\n" + data[:100])
    events += conn.receive(b"BDAT %d LAST\r\n" % (len(data) - 100) + data[100:])
    msg = one_message(events)
    assert msg.body.path is not None and msg.body.read() == data
    msg.body.discard()
    assert spooled(tmp_path) == []


# ---- long lines -----------------------------------------------------------------------


def test_long_command_line_is_refused_and_skipped() -> None:
    conn = connect(max_line_length=100)
    events = conn.receive(b"NOOP " + b"x" * 95 + b"\r\nNOOP " + b"x" * 96 + b"\r\nNOOP\r\n")
    assert replies(events) == ["250 2.0.0 Ok", "500 5.5.2 Line too long", "250 2.0.0 Ok"]
    assert violations(events) == ["command line longer than 100 bytes"]


def test_violations_per_message_are_capped() -> None:
    conn = connect()
    junk = b"".join(b"JUNK%d\r\n" % i for i in range(200))
    events = conn.receive(junk + ENVELOPE + b"DATA\r\n.\r\n")
    assert final_codes(events).count("500 5.5.2") == 200  # all still answered
    assert len(violations(events)) == len(one_message(events).violations) == 50


def test_long_line_without_newline_is_answered_at_once_and_discarded() -> None:
    conn = connect(max_line_length=100)
    assert final_codes(conn.receive(b"x" * 150)) == ["500 5.5.2"]
    assert conn.receive(b"y" * 10_000) == []
    assert len(conn._buf) == 0
    assert final_codes(conn.receive(b"still junk\r\nNOOP\r\n")) == ["250 2.0.0"]


def test_auth_lines_may_be_longer_than_commands() -> None:
    conn = connect(max_line_length=100)
    token = b64(b"user=u\x01auth=Bearer " + b"t" * 3000 + b"\x01\x01")
    events = conn.receive(b"AUTH XOAUTH2 " + token.encode() + b"\r\n")
    assert final_codes(events) == ["235 2.7.0"]
    assert conn.auth.password == "t" * 3000


# ---- AUTH -----------------------------------------------------------------------------


def auth(conn: SMTPConnection, *lines: str) -> list[str]:
    return replies(conn.receive("".join(line + "\r\n" for line in lines).encode()))


def test_auth_plain_with_initial_response() -> None:
    conn = connect()
    assert auth(conn, "AUTH PLAIN " + b64("admin\0user@x\0sécret")) == [
        "235 2.7.0 Authentication successful"
    ]
    assert conn.auth.as_event() == {
        "attempted": True,
        "mechanism": "PLAIN",
        "username": "user@x",
        "password": "sécret",
    }


def test_auth_plain_without_initial_response() -> None:
    conn = connect()
    assert auth(conn, "auth plain") == ["334 "]
    assert auth(conn, b64("\0u\0p")) == ["235 2.7.0 Authentication successful"]
    assert (conn.auth.mechanism, conn.auth.username, conn.auth.password) == ("PLAIN", "u", "p")


def test_auth_login_both_ways() -> None:
    conn = connect()
    assert auth(conn, "AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert auth(conn, b64("user")) == ["334 UGFzc3dvcmQ6"]
    assert auth(conn, b64("pass")) == ["235 2.7.0 Authentication successful"]
    assert (conn.auth.mechanism, conn.auth.username, conn.auth.password) == (
        "LOGIN",
        "user",
        "pass",
    )
    other = connect()
    assert auth(other, "AUTH LOGIN " + b64("u2"), b64("p2"))[-1].startswith("235 ")
    assert (other.auth.username, other.auth.password) == ("u2", "p2")


def test_auth_cram_md5() -> None:
    conn = connect(hostname="mx.test", auth_mechanisms=("CRAM-MD5",))
    (challenge,) = auth(conn, "AUTH CRAM-MD5")
    assert challenge.startswith("334 ")
    assert re.fullmatch(r"<\d+\.\d+@mx\.test>", base64.b64decode(challenge[4:]).decode())
    assert auth(conn, b64("bob 0123abcd")) == ["235 2.7.0 Authentication successful"]
    assert (conn.auth.mechanism, conn.auth.username, conn.auth.password) == (
        "CRAM-MD5",
        "bob",
        "0123abcd",
    )


def test_auth_xoauth2_both_ways() -> None:
    token = b64("user=me@x\x01auth=Bearer ya29.tok\x01\x01")
    conn = connect()
    assert auth(conn, "AUTH XOAUTH2 " + token) == ["235 2.7.0 Authentication successful"]
    assert (conn.auth.username, conn.auth.password) == ("me@x", "ya29.tok")
    other = connect()
    assert auth(other, "AUTH XOAUTH2") == ["334 "]
    assert auth(other, token)[0].startswith("235 ")
    assert (other.auth.mechanism, other.auth.username) == ("XOAUTH2", "me@x")


def test_auth_cancel_bad_base64_and_unknown_mechanism() -> None:
    conn = connect()
    assert auth(conn, "AUTH LOGIN", b64("user"), "*") == [
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "501 5.7.0 Authentication cancelled",
    ]
    assert (conn.auth.attempted, conn.auth.username, conn.auth.password) == (True, "user", None)
    assert auth(conn, "AUTH PLAIN !!!notbase64") == ["501 5.5.2 Invalid base64 data"]
    assert conn.auth.attempted and conn.auth.mechanism == "PLAIN"
    assert auth(conn, "AUTH GSSAPI", "AUTH") == [
        "504 5.5.4 Unrecognized authentication type",
        "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    ]
    assert auth(conn, "AUTH PLAIN =")[0].startswith("235 ")  # "=": empty initial response


def test_auth_plain_without_authzid_and_login_with_bad_password() -> None:
    conn = connect()
    assert auth(conn, "AUTH PLAIN " + b64("u\0p"))[0].startswith("235 ")
    assert (conn.auth.username, conn.auth.password) == ("u", "p")
    other = connect()
    assert auth(other, "AUTH LOGIN " + b64("u"), "not base64!") == [
        "334 UGFzc3dvcmQ6",
        "501 5.5.2 Invalid base64 data",
    ]
    assert (other.auth.attempted, other.auth.username, other.auth.password) == (True, "u", None)
    assert final_codes(other.receive(b"NOOP\r\n")) == ["250 2.0.0"]  # back to commands


def test_auth_state_errors() -> None:
    conn = connect()
    assert final_codes(conn.receive(b"AUTH PLAIN " + b64("\0a\0b").encode() + b"\r\n")) == [
        "235 2.7.0"
    ]
    assert auth(conn, "AUTH PLAIN " + b64("\0c\0d")) == ["503 5.5.1 Error: already authenticated"]
    other = connect()
    assert auth(other, "MAIL FROM:<a@b>", "AUTH LOGIN")[-1] == (
        "503 5.5.1 Error: MAIL transaction in progress"
    )


def test_auth_secrets_are_masked_in_trace_but_kept_in_transcript() -> None:
    conn = connect(trace=True, transcript=True)
    secret = b64("\0u\0hunter2")
    events = conn.receive(f"AUTH PLAIN {secret}\r\n".encode())
    events += conn.receive(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n")
    traces = [(e.direction, e.line) for e in events if isinstance(e, Trace)]
    assert traces[:2] == [("C", "AUTH PLAIN ****"), ("S", "235 2.7.0 Authentication successful")]
    assert all(secret not in line for _, line in traces)
    transcript = one_message(events).transcript
    assert transcript is not None and f"C: AUTH PLAIN {secret}" in transcript
    login = connect(trace=True)
    events = login.receive(f"AUTH LOGIN\r\n{b64('user')}\r\n{b64('pw')}\r\n".encode())
    client = [e.line for e in events if isinstance(e, Trace) and e.direction == "C"]
    assert client == ["AUTH LOGIN", "****", "****"]


# ---- STARTTLS -------------------------------------------------------------------------


def test_starttls_resets_the_session() -> None:
    conn = connect(tls_available=True)
    conn.receive(b"EHLO c\r\nAUTH PLAIN " + b64("\0u\0p").encode() + b"\r\n")
    events = conn.receive(b"STARTTLS\r\n")
    assert events == [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert conn.receive(b"NOOP\r\n") == [Violation(V_PRE_TLS_DATA)]
    assert conn.tls_started() == []
    assert conn.tls_active and conn.helo == "" and not conn.auth.attempted
    assert "250-STARTTLS" not in replies(conn.receive(b"EHLO c\r\n"))
    events = conn.receive(b"STARTTLS\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n")
    assert final_codes(events)[0] == "503 5.5.1"
    assert one_message(events).tls is True


def test_starttls_injection_is_discarded() -> None:
    conn = connect(tls_available=True)
    events = conn.receive(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\n")
    assert [type(e) for e in events if not isinstance(e, Violation)] == [Send, StartTLS]
    assert violations(events) == [V_PRE_TLS_DATA]
    assert final_codes(events) == ["250 HELP", "220 2.0.0"]
    conn.tls_started()
    assert final_codes(conn.receive(b"RCPT TO:<v@x>\r\n")) == ["503 5.5.1"]  # no MAIL survived
    assert not conn.in_transaction


def test_starttls_with_argument_and_tls_started_misuse() -> None:
    conn = connect(tls_available=True)
    assert final_codes(conn.receive(b"STARTTLS now\r\n")) == ["501 5.5.4"]
    active = new_conn(tls_available=True, tls_active=True)
    assert replies(active.receive(b"STARTTLS\r\n")) == ["503 5.5.1 Error: TLS already active"]
    with pytest.raises(RuntimeError):
        conn.tls_started()


# ---- timeouts, shutdown, properties ---------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [b"", b"EHLO c\r\n", ENVELOPE, ENVELOPE + b"DATA\r\npartial", b"AUTH LOGIN\r\n", b"BDAT 9"],
)
def test_idle_timeout_and_shutdown_in_any_state(prefix: bytes) -> None:
    conn = connect(hostname="mx.test")
    conn.receive(prefix)
    assert conn.idle_timeout() == [
        Send(b"421 4.4.2 mx.test Error: timeout exceeded\r\n"),
        Close(),
    ]
    assert conn.closed and conn.receive(b"NOOP\r\n") == []
    other = connect(hostname="mx.test")
    other.receive(prefix)
    assert other.shutdown() == [Send(b"421 4.3.2 mx.test Service shutting down\r\n"), Close()]


def test_shutdown_while_awaiting_reply_leaves_the_body_to_its_owner(tmp_path: Path) -> None:
    conn = connect(spool_threshold=10, spool_dir=str(tmp_path))
    msg = one_message(conn.receive(ENVELOPE + b"DATA\r\n" + b"q" * 50 + b"\r\n.\r\n"))
    assert conn.shutdown()[-1] == Close()
    assert msg.body.read() == b"q" * 50 + b"\r\n"
    msg.body.discard()


def test_transaction_properties() -> None:
    conn = connect()
    states = []
    for chunk in (b"EHLO c\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\nDATA\r\n", b".\r\n"):
        conn.receive(chunk)
        states.append((conn.in_transaction, conn.in_data, conn.awaiting_reply))
    conn.reply_to_message(OK)
    states.append((conn.in_transaction, conn.in_data, conn.awaiting_reply))
    assert states == [
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
        (False, False, False),
    ]


# ---- transcript and trace -------------------------------------------------------------


def test_transcript_records_commands_and_replies_but_not_data() -> None:
    conn = new_conn(hostname="mx.test", transcript=True)
    conn.start()
    events = conn.receive(
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n..secret\r\n.\r\n"
    )
    assert one_message(events).transcript == [
        "S: 220 mx.test ESMTP mailpipe",
        "C: HELO c",
        "S: 250 mx.test",
        "C: MAIL FROM:<a@b>",
        "S: 250 2.1.0 Ok",
        "C: RCPT TO:<c@d>",
        "S: 250 2.1.5 Ok",
        "C: DATA",
        "S: 354 End data with <CR><LF>.<CR><LF>",
        "C: <message data: 10 bytes>",
    ]
    long_line = connect(transcript=True, trace=True, max_line_length=30)
    events = long_line.receive(b"x" * 50 + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n")
    assert one_message(events).transcript[1:3] == [  # type: ignore[index]
        "C: <over-long line discarded>",
        "S: 500 5.5.2 Line too long",
    ]


def test_trace_events() -> None:
    conn = connect(trace=True)
    events = conn.receive(b"NOOP\r\nBDAT 3\r\nxyz")
    assert [e for e in events if isinstance(e, Trace)] == [
        Trace("C", "NOOP"),
        Trace("S", "250 2.0.0 Ok"),
        Trace("C", "BDAT 3"),
        Trace("C", "<message data: 3 bytes>"),
        Trace("S", "503 5.5.1 Error: need MAIL command"),
    ]
    assert isinstance(events[-1], Send)  # replies still coalesced into one Send


# ---- hypothesis -----------------------------------------------------------------------

FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def drive(wire_chunks: Iterable[bytes], **kwargs: object) -> Session:
    session = Session.start(**kwargs)
    for chunk in wire_chunks:
        session.feed(chunk)
    return session


@FAST
@given(
    st.sampled_from(
        [b"", b"EHLO c\r\nAUTH LOGIN\r\n", ENVELOPE + b"DATA\r\n", ENVELOPE + b"BDAT 99\r\n"]
    ),
    st.lists(st.binary(max_size=300), max_size=20),
)
def test_random_bytes_never_break_the_core(prefix: bytes, chunks: list[bytes]) -> None:
    session = drive(
        [prefix, *chunks], max_line_length=64, spool_threshold=128, max_message_size=2048
    )
    conn = session.conn
    if not conn.closed and not conn.in_data:
        # whatever came before (half a line, an AUTH exchange), the core still answers
        assert sent(session.feed(b"\r\n*\r\nNOOP\r\n")).endswith(b"250 2.0.0 Ok\r\n")
    if not conn.closed:
        assert conn.idle_timeout()[-1] == Close()
    assert conn.closed and conn.receive(b"NOOP\r\n") == []


@FAST
@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"") + b"\r\n"), max_size=20))
def test_random_lines_in_command_mode_are_all_answered(lines: list[bytes]) -> None:
    # Lines that would start DATA/BDAT/AUTH exchanges or end the session are made junk.
    safe = [
        b"X" + line if line[:4].upper() in (b"DATA", b"BDAT", b"AUTH", b"QUIT") else line
        for line in lines
    ]
    session = drive([b"".join(safe)], max_line_length=40)
    finals = [line for line in session.output.split(b"\r\n") if line[3:4] == b" "]
    assert len(finals) == 1 + len(safe)  # greeting + one per line


COMMANDS = [
    "EHLO client",
    "HELO client",
    "MAIL FROM:<a@b.c>",
    "MAIL FROM: <> SIZE=10",
    "RCPT TO:<x@y.z>",
    "RCPT TO:<>",
    "RSET",
    "NOOP",
    "VRFY u",
    "HELP",
    "EXPN list",
    "STARTTLS",
    "DATA",
    "BDAT 1",
    "nonsense here",
    "",
    "x" * 70,
    "AUTH PLAIN " + b64("\0u\0p"),
    "AUTH PLAIN",
    "AUTH LOGIN",
    "*",
    b64("user"),
    "AUTH XOAUTH2 " + b64("user=u\x01auth=Bearer t\x01\x01"),
]


@st.composite
def line_session(draw: st.DrawFn) -> list[str]:
    """Commands, exactly one final reply expected each; DATA/BDAT are handled whole."""
    lines = draw(st.lists(st.sampled_from([c for c in COMMANDS if "AUTH" not in c]), max_size=25))
    return [c for c in lines if c not in ("DATA", "BDAT 1", "STARTTLS", "*") and c != b64("user")]


@FAST
@given(line_session(), st.sampled_from([b"\r\n", b"\n"]))
def test_every_command_line_gets_exactly_one_final_reply(lines: list[str], eol: bytes) -> None:
    wire = b"".join(line.encode() + eol for line in lines)
    session = drive([wire], max_line_length=64)
    finals = [line for line in session.output.split(b"\r\n") if line[3:4] == b" "]
    assert len(finals) == 1 + len(lines)


body_line = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b".x", b"", b"\r", b"x" * 1100, b"\xc3\xa9t\xc3\xa9"]),
)


@st.composite
def message_wire(draw: st.DrawFn, eol: bytes = b"\r\n") -> tuple[bytes, bytes]:
    """(wire bytes for one DATA or BDAT message, the body expected), in a session whose
    command lines end with `eol`: a CRLF session's body ends at CRLF.CRLF alone (a "." after
    a bare LF is data, not stuffed), a bare-LF session's at a "." line after any LF."""
    if draw(st.booleans()):
        lines = draw(st.lists(st.tuples(body_line, st.sampled_from([b"\r\n", b"\n"])), max_size=8))
        body = b"".join(text + line_end for text, line_end in lines)
        if eol == b"\r\n":
            if body and not body.endswith(b"\r\n"):
                body += b"\r\n"  # else ".\r\n" would not end the data
            stuffed = re.sub(rb"(^|\r\n)\.", rb"\1..", body)
            terminator = b".\r\n"
        else:
            stuffed = re.sub(rb"(^|\n)\.", rb"\1..", body)
            terminator = draw(st.sampled_from([b".\r\n", b".\n"]))
        return b"DATA" + eol + stuffed + terminator, body
    chunks = draw(st.lists(st.binary(max_size=60), min_size=1, max_size=4))
    wire = b"".join(
        b"BDAT %d%s%s%s" % (len(c), b" LAST" if i == len(chunks) - 1 else b"", eol, c)
        for i, c in enumerate(chunks)
    )
    return wire, b"".join(chunks)


@st.composite
def full_session(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A session of one to three messages; its command lines all end with CRLF, or (one in
    four) all with bare LF."""
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    parts: list[bytes] = []
    bodies: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        extra = draw(st.lists(st.sampled_from(COMMANDS[:12] + COMMANDS[14:18]), max_size=4))
        parts += [c.encode() + eol for c in extra]
        parts.append(b"RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n".replace(b"\r\n", eol))
        wire, body = draw(message_wire(eol))
        parts.append(wire)
        bodies.append(body)
    parts.append(b"QUIT" + eol)
    return b"".join(parts), bodies


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(wire) + 1) for c in cuts})
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]


def outcome(session: Session) -> tuple[bytes, list[bytes], list[list[str]], list[object]]:
    envelopes = [m.envelope for m in session.received]
    return (
        bytes(session.output),
        session.bodies,
        [m.violations for m in session.received],
        envelopes,
    )


SPLIT_SETTINGS = [
    {},
    {"spool_threshold": 16},
    {"max_message_size": 200, "spool_threshold": 50},
    {"max_line_length": 40},
]


@FAST
@given(
    full_session(), st.lists(st.integers(min_value=0), max_size=12), st.sampled_from(SPLIT_SETTINGS)
)
def test_splitting_input_never_changes_the_outcome(
    session_wire: tuple[bytes, list[bytes]], cuts: list[int], kwargs: dict[str, int]
) -> None:
    wire, bodies = session_wire
    whole = drive([wire], **kwargs)
    pieces = drive(split(wire, cuts), **kwargs)
    assert outcome(pieces) == outcome(whole)
    assert whole.conn.closed
    if not kwargs.get("max_message_size"):
        assert whole.bodies == bodies


def test_random_splits_of_a_spooled_message_match(tmp_path: Path) -> None:
    rng = random.Random(1234)
    lines = [
        b"." * rng.randint(0, 3) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 30)))
        for _ in range(300)
    ]
    lines = [line.replace(b"\n", b"") for line in lines]
    body = b"".join(line + rng.choice([b"\r\n", b"\n"]) for line in lines) + b"\r\n"
    # a CRLF session: only CRLF starts a line, so a dot after a bare LF is not stuffed
    stuffed = re.sub(rb"(^|\r\n)\.", rb"\1..", body)
    wire = ENVELOPE + b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n"
    whole = drive([wire], spool_threshold=1 << 20)
    assert whole.bodies == [body]
    for _ in range(30):
        cuts = [rng.randrange(len(wire)) for _ in range(rng.randint(1, 40))]
        pieces = drive(split(wire, cuts), spool_threshold=64, spool_dir=str(tmp_path))
        assert outcome(pieces) == outcome(whole)
    assert spooled(tmp_path) == []


# ---- verdicts at every stage ----------------------------------------------------------

# stage -> (settings, input before the stage, the input that reaches it, the default reply)
STAGES: dict[Stage, tuple[dict[str, Any], bytes, bytes, str]] = {
    Stage.CONNECT: ({}, b"", b"", "220"),
    Stage.HELO: ({}, b"", b"EHLO client.example\r\n", "250"),
    Stage.AUTH: ({}, b"EHLO c\r\n", b"AUTH PLAIN " + b64("\0u\0p").encode() + b"\r\n",
                 "235 2.7.0"),
    Stage.STARTTLS: ({"tls_available": True}, b"EHLO c\r\n", b"STARTTLS\r\n", "220 2.0.0"),
    Stage.MAIL: ({}, b"EHLO c\r\n", b"MAIL FROM:<app@example.com> SIZE=10\r\n", "250 2.1.0"),
    Stage.RCPT: ({}, b"EHLO c\r\nMAIL FROM:<a@b>\r\n", b"RCPT TO:<user@example.org>\r\n",
                 "250 2.1.5"),
    Stage.DATA: ({}, ENVELOPE, b"DATA\r\n", "354"),
}
REFUSED = Respond(451, "4.7.1", "Not now")


def held_at(stage: Stage, **extra: Any) -> tuple[Driven, list[Event], VerdictNeeded]:
    """A connection holding `stage`, driven up to it, with a NOOP pipelined behind."""
    kwargs, before, trigger, _ = STAGES[stage]
    conn = new_conn(held=frozenset({stage}), **kwargs, **extra)
    events = conn.start()
    events += conn.receive(before + trigger + (b"NOOP\r\n" if stage != Stage.STARTTLS else b""))
    needed = [e for e in events if isinstance(e, VerdictNeeded)]
    assert len(needed) == 1 and needed[0].stage == stage, events
    assert conn.awaiting_reply and conn.waiting_stage == stage
    return conn, events, needed[0]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_held_stage_waits_and_proceed_gives_the_default_reply(stage: Stage) -> None:
    conn, events, _ = held_at(stage)
    assert conn.receive(b"NOOP\r\n") == []  # buffered while the verdict is awaited
    before = len(replies(events))
    events += conn.verdict(Proceed())
    answered = [line for line in replies(events)[before:] if line[3:4] == " "]
    assert answered[0].startswith(STAGES[stage][3])
    if stage not in (Stage.DATA, Stage.STARTTLS):  # DATA reads the NOOPs as body
        assert answered[1:] == ["250 2.0.0 Ok", "250 2.0.0 Ok"]


@pytest.mark.parametrize("stage", [s for s in STAGES if s != Stage.CONNECT])
def test_a_held_stage_can_be_refused_and_the_session_goes_on(stage: Stage) -> None:
    conn, events, _ = held_at(stage)
    before = len(replies(events))
    events += conn.verdict(REFUSED)
    answered = replies(events)[before:]
    assert answered[0] == "451 4.7.1 Not now"
    if stage != Stage.STARTTLS:
        assert answered[1:] == ["250 2.0.0 Ok"]
    assert not conn.closed and not any(isinstance(e, StartTLS) for e in events)


def test_refusals_undo_what_the_command_would_have_done() -> None:
    conn, _, _ = held_at(Stage.MAIL)
    conn.verdict(REFUSED)
    assert final_codes(conn.receive(b"RCPT TO:<x@y>\r\n")) == ["503 5.5.1"]
    conn, _, _ = held_at(Stage.RCPT)
    conn.verdict(REFUSED)
    assert final_codes(conn.receive(b"DATA\r\n")) == ["503 5.5.1"]
    conn, _, _ = held_at(Stage.AUTH)
    conn.verdict(Respond(535, "5.7.8", "Authentication credentials invalid"))
    assert conn.auth.username == "u" and conn.auth.password == "p"  # captured all the same
    conn.receive(b"AUTH PLAIN " + b64("\0v\0q").encode() + b"\r\n")  # not authenticated: may retry
    assert final_codes(conn.verdict(Proceed())) == ["235 2.7.0"]
    conn, _, _ = held_at(Stage.HELO)
    conn.verdict(REFUSED)
    assert conn.helo == ""


def test_a_refused_connection_is_closed() -> None:
    conn, events, _ = held_at(Stage.CONNECT)
    assert sent(events) == b""  # no greeting before the verdict
    events = conn.verdict(Respond(554, "5.7.1", "No service"))
    assert events == [Send(b"554 5.7.1 No service\r\n"), Close()]


@pytest.mark.parametrize("stage", list(STAGES))
def test_disconnect_at_any_stage(stage: Stage) -> None:
    conn, _, _ = held_at(stage)
    events = conn.verdict(Disconnect("Bye now"))
    assert events == [Send(b"421 4.7.0 Bye now\r\n"), Close()]
    assert conn.closed


def test_stage_arguments_and_envelope() -> None:
    _, _, needed = held_at(Stage.MAIL)
    assert needed.args == {"sender": "app@example.com", "params": ["SIZE=10"]}
    _, _, needed = held_at(Stage.RCPT)
    assert needed.args == {"recipient": "user@example.org", "params": []}
    assert needed.envelope is not None and needed.envelope.mail_from == "a@b"
    _, _, needed = held_at(Stage.HELO)
    assert needed.args == {"hostname": "client.example", "verb": "EHLO"}
    _, _, needed = held_at(Stage.AUTH)
    assert needed.args == {"mechanism": "PLAIN", "username": "u"}


def test_only_4xx_and_5xx_may_refuse_a_command() -> None:
    conn, _, _ = held_at(Stage.RCPT)
    with pytest.raises(ValueError):
        conn.verdict(Respond(250, "2.1.5", "Fine"))
    assert final_codes(conn.verdict(Proceed()))[0] == "250 2.1.5"


def test_nothing_is_held_when_no_stage_is_asked_for() -> None:
    session = drive([ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"])
    assert not any(isinstance(e, VerdictNeeded) for e in session.events)


def test_the_end_of_the_message_uses_the_same_verdict() -> None:
    conn = connect()
    one_message(conn.receive(ENVELOPE + b"DATA\r\nhi\r\n.\r\n"))
    assert conn.waiting_stage == Stage.MESSAGE
    assert replies(conn.verdict(Proceed())) == ["250 2.0.0 Ok"]
    one_message(conn.receive(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\n"))
    assert replies(conn.verdict(Respond(554, "5.7.1", "Spam"))) == ["554 5.7.1 Spam"]
    assert not conn.in_transaction


HEADERS_WIRE = b"Subject: held\r\nX-Two: 2\r\n\r\nline one\r\n..dot\r\n.\r\n"


def test_headers_verdict_in_data_sees_the_header_block() -> None:
    conn = connect(held=frozenset({Stage.HEADERS}))
    events = conn.receive(ENVELOPE + b"DATA\r\n" + HEADERS_WIRE + b"NOOP\r\n")
    needed = [e for e in events if isinstance(e, VerdictNeeded)]
    assert [n.stage for n in needed] == [Stage.HEADERS]
    assert needed[0].args == {"headers": b"Subject: held\r\nX-Two: 2\r\n"}
    assert not messages(events)
    events = conn.verdict(Proceed())
    assert one_message(events).body.data == b"Subject: held\r\nX-Two: 2\r\n\r\nline one\r\n.dot\r\n"


def test_headers_refused_in_data_reads_the_rest_then_answers() -> None:
    conn = connect(held=frozenset({Stage.HEADERS}))
    conn.receive(ENVELOPE + b"DATA\r\nSubject: held\r\n\r\nfirst part ")
    assert conn.waiting_stage == Stage.HEADERS
    events = conn.verdict(Respond(550, "5.7.1", "Bad headers"))
    assert sent(events) == b"" and conn.in_data  # the body is still being read
    events = conn.receive(b"second part\r\n.\r\nNOOP\r\n")
    assert replies(events) == ["550 5.7.1 Bad headers", "250 2.0.0 Ok"]
    assert not messages(events) and not conn.in_transaction


@pytest.mark.parametrize("cut", [1, 5, 14, 16, 17, 30])
def test_headers_found_however_the_input_is_split(cut: int) -> None:
    conn = connect(held=frozenset({Stage.HEADERS}))
    conn.receive(ENVELOPE + b"DATA\r\n")
    events = conn.receive(HEADERS_WIRE[:cut]) + conn.receive(HEADERS_WIRE[cut:])
    needed = [e for e in events if isinstance(e, VerdictNeeded)]
    assert needed and needed[0].args["headers"] == b"Subject: held\r\nX-Two: 2\r\n"


def test_a_message_without_a_blank_line_is_all_headers() -> None:
    conn = connect(held=frozenset({Stage.HEADERS}))
    events = conn.receive(ENVELOPE + b"DATA\r\nSubject: only\r\n.\r\n")
    assert [e.args for e in events if isinstance(e, VerdictNeeded)] == [
        {"headers": b"Subject: only\r\n"}
    ]
    assert one_message(conn.verdict(Proceed())).body.data == b"Subject: only\r\n"


def test_headers_verdict_in_bdat_comes_at_the_chunk_that_ends_them() -> None:
    conn = connect(held=frozenset({Stage.HEADERS}))
    events = conn.receive(ENVELOPE + b"BDAT 10\r\nSubject: x")
    assert final_codes(events)[-1] == "250 2.0.0" and conn.waiting_stage is None
    events = conn.receive(b"BDAT 8\r\n\r\n\r\nbody")
    assert [e.args for e in events if isinstance(e, VerdictNeeded)] == [
        {"headers": b"Subject: x\r\n"}
    ]
    events = conn.verdict(Respond(552, "5.3.4", "No"))
    assert replies(events) == ["250 2.0.0 8 bytes received"]  # refused at the end
    events = conn.receive(b"BDAT 4 LAST\r\nmore")
    assert replies(events) == ["552 5.3.4 No"] and not messages(events)


def test_data_verdict_refusing_bdat_reads_the_chunk() -> None:
    conn = connect(held=frozenset({Stage.DATA}))
    events = conn.receive(ENVELOPE + b"BDAT 5\r\nhello")
    assert [e.args for e in events if isinstance(e, VerdictNeeded)] == [{"verb": "BDAT"}]
    events = conn.verdict(REFUSED)
    assert replies(events) == ["451 4.7.1 Not now"]
    events = conn.receive(b"BDAT 3 LAST\r\nabcNOOP\r\n")
    assert final_codes(events) == ["503 5.5.1", "250 2.0.0"]


def test_data_verdict_proceeding_bdat_keeps_the_chunks() -> None:
    conn = connect(held=frozenset({Stage.DATA}))
    conn.receive(ENVELOPE + b"BDAT 5\r\nhello")
    events = conn.verdict(Proceed()) + conn.receive(b"BDAT 3 LAST\r\nabc")
    assert one_message(events).body.data == b"helloabc"


def test_clock_gives_received_at_and_the_cram_md5_nonce() -> None:
    conn = connect(auth_mechanisms=("CRAM-MD5",))
    events = conn.receive(b"EHLO c\r\nAUTH CRAM-MD5\r\n")
    challenge = base64.b64decode(replies(events)[-1][4:]).decode()
    assert f".{int(NOW.timestamp())}@" in challenge
    conn.receive(b64("u digest").encode() + b"\r\n")
    msg = one_message(conn.receive(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"))
    assert msg.received_at == NOW


ALL_STAGES = frozenset(Stage) - {Stage.MESSAGE}


@FAST
@given(full_session(), st.lists(st.integers(min_value=0), max_size=12))
def test_holding_every_stage_and_proceeding_changes_nothing(
    session_wire: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    wire, _ = session_wire
    plain = drive([wire])
    held = drive(split(wire, cuts), held=ALL_STAGES)
    assert outcome(held) == outcome(plain)
    assert sum(isinstance(e, VerdictNeeded) for e in held.events) >= 2  # CONNECT, HELO...


@FAST
@given(full_session(), st.lists(st.integers(min_value=0), max_size=12))
def test_a_judge_answering_at_once_or_not_changes_nothing(
    session_wire: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    """Verdicts the judge gives at once and verdicts asked with VerdictNeeded, alternating,
    come to the same replies and messages as holding nothing."""
    wire, _ = session_wire
    asked: list[Stage] = []

    def judge(stage: Stage, args: dict[str, object], envelope: Envelope | None) -> Any:
        asked.append(stage)
        return Proceed() if len(asked) % 2 else None

    plain = drive([wire])
    judged = drive(split(wire, cuts), held=ALL_STAGES, judge=judge)
    assert outcome(judged) == outcome(plain)
    needed = sum(isinstance(e, VerdictNeeded) for e in judged.events)
    assert asked[0] == Stage.CONNECT and needed == len(asked) // 2


@pytest.mark.parametrize("stage", [s for s in STAGES if s != Stage.CONNECT])
def test_a_judge_refusing_at_once_refuses_that_command_only(stage: Stage) -> None:
    seen: list[tuple[Stage, dict[str, object], Envelope | None]] = []

    def judge(at: Stage, args: dict[str, object], envelope: Envelope | None) -> Any:
        seen.append((at, args, envelope))
        return REFUSED if at == stage else Proceed()

    kwargs, before, trigger, _ = STAGES[stage]
    conn = new_conn(held=frozenset({stage}), judge=judge, **kwargs)
    events = conn.start() + conn.receive(before + trigger + b"NOOP\r\n")
    assert not any(isinstance(e, VerdictNeeded) for e in events)
    assert not conn.awaiting_reply
    answered = [line for line in replies(events) if line[3:4] == " "]
    assert answered[-2:] == ["451 4.7.1 Not now", "250 2.0.0 Ok"]
    assert [at for at, _, _ in seen] == [stage]
    if stage == Stage.RCPT:
        _, args, envelope = seen[0]
        assert args["recipient"] == "user@example.org" and envelope.mail_from == "a@b"
