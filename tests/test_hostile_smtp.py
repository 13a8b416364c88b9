"""Hostile SMTP input (issue 9): SMTP smuggling in DATA, BDAT's length-counted boundaries,
and MAIL's SIZE parameter with garbage in it. The sans-I/O core driven directly (every split
of the input), then the same over a real socket against a real `mailpipe serve`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import MailpipeServer
from mailpipe.capture.protocol import V_BARE_LF_DATA, V_BARE_LF_END, V_DOT_LINE
from mailpipe.capture.protocol.lines import LineReader
from test_protocol import ENVELOPE, Session
from test_server import RawSMTP

Factory = Callable[..., MailpipeServer]

# What an attacker hides after a fake end of data: a second transaction of its own.
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: forged\r\n\r\nforged\r\n"
# A "." with a bare LF or CR beside it: an end of data for some servers, not for a CRLF one.
PATTERNS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\n", b"\r\n.\r"]
SIZE_GARBAGE = ["SIZE=-5", "SIZE=abc", "SIZE=1e9", "SIZE=", "SIZE", "SIZE=0x10"]
SIZE_REPLY = "5.5.4 Bad SIZE parameter: SIZE takes a decimal number of octets (RFC 1870)"


def smuggling_body(pattern: bytes, subject: str = "smuggler") -> bytes:
    """A message whose body hides SMUGGLED behind `pattern`, through its real terminator."""
    return f"Subject: {subject}\r\n\r\nhello".encode() + pattern + SMUGGLED + b".\r\n"


def every_split(wire: bytes) -> list[Session]:
    """The session fed `wire` whole, then cut in two at every byte boundary."""
    sessions = []
    for cut in range(len(wire) + 1):
        session = Session.start()
        session.feed(wire[:cut])
        session.feed(wire[cut:])
        sessions.append(session)
    return sessions


def final_replies(session: Session) -> list[str]:
    lines = bytes(session.output).decode().split("\r\n")[:-1]
    return [line[:3] for line in lines if line[3:4] == " "]


# ---- DATA in a CRLF session: only <CRLF>.<CRLF> ends it --------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_smuggled_commands_stay_in_the_message(pattern: bytes) -> None:
    wire = ENVELOPE + b"DATA\r\n" + smuggling_body(pattern) + b"QUIT\r\n"
    for cut, session in enumerate(every_split(wire)):
        assert len(session.received) == 1, cut  # one email: nothing ran as a command
        # EHLO MAIL RCPT DATA, the message's 250, QUIT: no 250 for the smuggled MAIL
        assert final_replies(session) == ["220", "250", "250", "250", "354", "250", "221"], cut
        body = session.bodies[0]
        assert body.startswith(b"Subject: smuggler\r\n\r\nhello") and body.endswith(SMUGGLED)
        assert V_DOT_LINE in session.received[0].violations, cut
        assert V_BARE_LF_END not in session.received[0].violations


def test_the_canonical_smuggling_payload_is_kept_byte_for_byte() -> None:
    session = Session.start()
    session.feed(ENVELOPE + b"DATA\r\n" + smuggling_body(b"\n.\n") + b"QUIT\r\n")
    assert session.bodies == [b"Subject: smuggler\r\n\r\nhello\n.\n" + SMUGGLED]


def test_one_crlf_line_makes_the_whole_session_crlf() -> None:
    # Bare LF from MAIL on, but EHLO ended with CRLF: "\n.\n" is data, not the end.
    session = Session.start()
    session.feed(b"EHLO c\r\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nhello\n.\nNOOP\n")
    assert session.received == [] and session.conn.in_data
    session.feed(b"\r\n.\r\nQUIT\r\n")
    assert session.bodies == [b"hello\n.\nNOOP\n\r\n"]
    assert V_DOT_LINE in session.received[0].violations


# ---- DATA in a session that uses bare LF throughout: <LF>.<LF> ends it, noted ---------


def test_a_bare_lf_session_ends_data_at_lf_dot_lf_and_says_so() -> None:
    wire = (b"EHLO c\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nfirst\n..dot\n.\n"
            b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nsecond\n.\nQUIT\n")
    for cut, session in enumerate(every_split(wire)):
        assert session.bodies == [b"first\n.dot\n", b"second\n"], cut
        for message in session.received:
            assert V_BARE_LF_END in message.violations and V_BARE_LF_DATA in message.violations
        assert final_replies(session)[-1] == "221"


def test_a_session_uses_bare_lf_while_no_line_has_ended_with_crlf() -> None:
    reader, buf = LineReader(100), bytearray(b"EHLO a\nAUTH PLAIN\nx\n")
    while reader.take(buf, False) is not None:
        pass
    assert not reader.crlf
    buf += b"NOOP\r\nNOOP\n"
    while reader.take(buf, False) is not None:
        pass
    assert reader.crlf  # for good: a later bare LF does not undo it


# ---- BDAT: length-counted, its content is never commands and nothing ends it ----------


def test_bdat_content_is_data_whatever_it_says() -> None:
    chunk = b"Subject: b\r\n\r\nx\r\n.\r\n" + SMUGGLED + b"\n.\n.\r\n"
    wire = ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n"
    for cut, session in enumerate(every_split(wire)):
        assert session.bodies == [chunk], cut  # as sent: no unstuffing, no terminator
        assert final_replies(session) == ["220", "250", "250", "250", "250", "221"], cut
        assert session.received[0].violations == []


def test_the_byte_after_a_bdat_chunk_starts_the_next_command() -> None:
    wire = ENVELOPE + b"BDAT 6\r\n.\r\nMAIBDAT 4 LAST\r\nL\r\n.NOOP\r\nQUIT\r\n"
    for cut, session in enumerate(every_split(wire)):
        assert session.bodies == [b".\r\nMAIL\r\n."], cut
        # the chunks' 250s, the message's, NOOP's and QUIT's: nothing else was a command
        assert final_replies(session)[4:] == ["250", "250", "250", "221"], cut


def test_a_bdat_count_covering_commands_takes_them_as_data() -> None:
    session = Session.start()
    session.feed(ENVELOPE + b"BDAT 12 LAST\r\nQUIT\r\nRSET\r\n")
    assert session.bodies == [b"QUIT\r\nRSET\r\n"]
    assert not session.conn.closed  # the QUIT in the chunk was data
    session.feed(b"NOOP\r\n")
    assert final_replies(session)[-1] == "250"


# ---- over a real socket, against a real `mailpipe serve` -------------------------------


def one_session(server: MailpipeServer, *lines: bytes) -> list[int]:
    """The codes of the replies to `lines` (one reply each) sent in one session."""
    client = RawSMTP(server.smtp_port)
    try:
        codes = []
        for line in lines:
            client.send(line)
            codes.append(client.reply()[0])
        return codes
    finally:
        client.close()


def test_smuggling_over_a_socket_stores_one_email_per_session(
        mailpipe_factory: Factory, validate_event: Callable[[dict[str, Any]], None]) -> None:
    server = mailpipe_factory()
    for i, pattern in enumerate(PATTERNS):
        codes = one_session(
            server, b"EHLO relay.test\r\n", b"MAIL FROM:<a@relay.test>\r\n",
            b"RCPT TO:<b@dest.test>\r\n", b"DATA\r\n",
            smuggling_body(pattern, f"smuggler {i}"), b"QUIT\r\n")
        assert codes == [250, 250, 250, 354, 250, 221], pattern
    found = server.wait_for_messages(len(PATTERNS))
    # every email was committed before its 250: no forged one from the smuggled commands
    assert server.get_json("/api/v1/messages?limit=100")["total"] == len(PATTERNS)
    for summary in found:
        event = server.event(summary["uuid"])
        validate_event(event)
        assert event["envelope"]["from"] == "a@relay.test"
        assert event["envelope"]["to"] == ["b@dest.test"]
        assert V_DOT_LINE in event["session"]["violations"]
        status, raw, _ = server.request("GET", f"/api/v1/messages/{summary['uuid']}/raw")
        assert status == 200 and raw.endswith(SMUGGLED)
        if event["message"]["subject"] == "smuggler 0":
            assert b"hello\n.\n" + SMUGGLED in raw


def test_bare_lf_session_over_a_socket_ends_data_at_lf_dot_lf(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    codes = one_session(server, b"EHLO lf.test\n", b"MAIL FROM:<a@lf.test>\n",
                        b"RCPT TO:<b@lf.test>\n", b"DATA\n", b"Subject: lf\n\nbody\n.\n",
                        b"QUIT\n")
    assert codes == [250, 250, 250, 354, 250, 221]
    (summary,) = server.wait_for_messages(1)
    event = server.event(summary["uuid"])
    assert V_BARE_LF_END in event["session"]["violations"]
    status, raw, _ = server.request("GET", f"/api/v1/messages/{summary['uuid']}/raw")
    assert (status, raw) == (200, b"Subject: lf\n\nbody\n")


def test_bdat_smuggling_over_a_socket_is_data(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    chunk = b"Subject: bdat\r\n\r\nx\r\n.\r\n" + SMUGGLED
    codes = one_session(server, b"EHLO c.test\r\n", b"MAIL FROM:<a@c.test>\r\n",
                        b"RCPT TO:<b@c.test>\r\n", b"BDAT %d LAST\r\n" % len(chunk) + chunk,
                        b"QUIT\r\n")
    assert codes == [250, 250, 250, 250, 221]
    found = server.wait_for_messages(1)
    assert server.get_json("/api/v1/messages")["total"] == 1
    status, raw, _ = server.request("GET", f"/api/v1/messages/{found[0]['uuid']}/raw")
    assert (status, raw) == (200, chunk)


def test_size_garbage_over_a_socket_answers_501(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    client = RawSMTP(server.smtp_port)
    try:
        client.expect("EHLO c.test", 250)
        for param in SIZE_GARBAGE:
            assert client.command(f"MAIL FROM:<a@c.test> {param}") == (501, SIZE_REPLY), param
        client.expect("RCPT TO:<b@c.test>", 503)  # no transaction was started
        client.expect("MAIL FROM:<a@c.test> SIZE=42 X-UNKNOWN=yes", 250)
        client.expect("QUIT", 221)
    finally:
        client.close()
