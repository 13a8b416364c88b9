"""Fuzz: the sans-I/O SMTP core (capture/protocol/) fed valid sessions, then mutated ones,
in random chunks. Driven like the transport drives it (test_protocol's `Session`: every
message accepted, every verdict Proceed, body chunks spooled to temp files).

Valid sessions must deliver every message byte for byte whatever the chunking. Mutated ones
may be refused any way the core likes, but nothing may escape it, the work and output must
stay bounded by the input, the outcome must not depend on how the input was split, and the
session must still answer a plain `RSET`/`NOOP` afterwards unless it was closed.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import mailpipe.capture.protocol
from test_protocol import OK, Session, outcome, sent

from .strategies import (
    ValidSession,
    chunkings,
    fuzz_settings,
    mutated,
    valid_sessions,
    work_budget,
)

CORE_DIR = str(Path(mailpipe.capture.protocol.__file__).parent)
QUEUED = b"250 " + OK.text.encode() + b"\r\n"
# Listener settings that reach the paths a fuzz should: spooling, size limits, short lines.
SETTINGS = [
    {},
    {"spool_threshold": 16},
    {"max_message_size": 300, "spool_threshold": 64},
    {"max_line_length": 40, "max_recipients": 2},
]


def drive(chunks: list[bytes], settings: dict[str, int]) -> Session:
    session = Session.start(**settings)
    for chunk in chunks:
        session.feed(chunk)
    return session


@st.composite
def valid_and_split(draw: st.DrawFn) -> tuple[ValidSession, list[bytes]]:
    session = draw(valid_sessions())
    return session, draw(chunkings(session.wire))


@st.composite
def mutated_and_split(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    wire = draw(mutated(draw(valid_sessions()).wire))
    return wire, draw(chunkings(wire))


@fuzz_settings()
@given(valid_and_split())
def test_valid_sessions_deliver_every_message_intact(
    case: tuple[ValidSession, list[bytes]],
) -> None:
    valid, chunks = case
    session = drive(chunks, {"spool_threshold": 64})
    assert tuple(session.bodies) == valid.bodies
    assert session.output.count(QUEUED) == len(valid.bodies)
    assert session.output.endswith(b"221 2.0.0 Bye\r\n") and session.conn.closed


@fuzz_settings(scale=2)
@given(mutated_and_split(), st.sampled_from(SETTINGS))
def test_mutated_sessions_never_break_the_core(
    case: tuple[bytes, list[bytes]], settings: dict[str, int]
) -> None:
    wire, chunks = case
    # Every line costs the core a bounded number of steps; a loop blows this at once.
    with work_budget(CORE_DIR, 20_000 + 100 * len(wire)):
        whole = drive([wire], settings)
        pieces = drive(chunks, settings)
    # How the network split the input changes nothing the client or the sinks see.
    assert split_invariant(pieces) == split_invariant(whole)
    # At most a reply per line (or per over-long run) and a few events per reply.
    lines = wire.count(b"\n") + len(wire) // 40 + len(chunks) + 2
    assert len(pieces.events) <= 8 * lines
    assert len(pieces.output) <= 1024 * lines
    max_size = settings.get("max_message_size")
    if max_size:
        assert all(len(body) <= max_size for body in pieces.bodies)
    assert_still_answers(pieces)


def split_invariant(session: Session) -> tuple[object, ...]:
    """What the client and the sinks see of a session (test_protocol's `outcome`); the order in
    which a message's violations were noticed may follow the order its bytes arrived in."""
    output, bodies, violations, envelopes = outcome(session)
    return output, bodies, [sorted(found) for found in violations], envelopes


def test_overlong_bare_lf_line_is_reported_however_it_arrives() -> None:
    """Found by this fuzz: an over-long line's bare LF was noted only when the whole line came
    in one read."""
    wire = (b"EHLO c\r\n" + b"x" * 50 + b"\n"
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    settings = {"max_line_length": 40}
    whole = drive([wire], settings)
    split = drive([wire[:53], wire[53:]], settings)  # cut inside the over-long line
    assert sorted(whole.received[0].violations) == sorted(split.received[0].violations)


def assert_still_answers(session: Session) -> None:
    """Whatever state the input left, the session is not wedged: end a DATA body, end a half
    line, cancel an AUTH exchange, then RSET and NOOP get their 250 (unless it was closed, or
    a BDAT chunk still wants more bytes than a client would ever send)."""
    conn = session.conn
    for _ in range(4):
        if conn.closed or conn.in_data:
            if conn.in_data:
                session.feed(b"\r\n.\r\n")
            continue
        session.feed(b"\r\n*\r\n")
        if not conn.closed and not conn.in_data:
            assert sent(session.feed(b"RSET\r\nNOOP\r\n")) == b"250 2.0.0 Ok\r\n" * 2
            break
    if not conn.closed:
        assert sent(conn.idle_timeout()).startswith(b"421 ")
    assert conn.closed and conn.receive(b"NOOP\r\n") == []
