"""The body readers of the SMTP core (capture/protocol/reception.py), driven directly: the
input buffer in, what feed() says and the events it hands out. No connection, no socket."""

from __future__ import annotations

import re
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import assume, given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from mailpipe.capture.protocol import (
    V_BARE_LF_DATA,
    V_BARE_LF_END,
    V_DOT_LINE,
    V_EIGHT_BIT,
    V_LONG_DATA_LINE,
)
from mailpipe.capture.protocol.body import LINE_START, TERMINATOR, BodyScan
from mailpipe.capture.protocol.reception import (
    CHUNK,
    DONE,
    HEADERS,
    MORE,
    SKIPPED,
    BdatReader,
    DataReader,
)
from mailpipe.capture.protocol.replies import TOO_BIG
from mailpipe.capture.server import protocol_settings
from mailpipe.capture.types import BodyChunk, BodyDropped, Event
from mailpipe.config import SMTPConfig

SMALL = b"Subject: hi\r\n\r\nHello\r\n"
# (what the client sends after DATA, through the terminator; the body as received)
MESSAGES = [
    (SMALL + b".\r\n", SMALL),
    (b".\r\n", b""),  # an empty message: the terminator on the first line
    (b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n.x\r\nend\r\n.\r\n",
     b"Subject: dots\r\n\r\n.leading dot\r\n..\r\nx\r\nend\r\n"),
    (b"..starts with a dot\r\n.\r\n", b".starts with a dot\r\n"),
]
# The same, from a client whose command lines all ended with bare LF: "." after LF ends it.
BARE_LF_MESSAGES = [
    (b"Subject: bare\n\nline one\nline two\n.\n", b"Subject: bare\n\nline one\nline two\n"),
    (b"a\n..b\n.\n", b"a\n.b\n"),
    (b".\n", b""),
    (b"crlf\r\n.\n", b"crlf\r\n"),
]
ALL_MESSAGES = [(*m, False) for m in MESSAGES] + [(*m, True) for m in BARE_LF_MESSAGES]


def settings(**overrides: object):  # type: ignore[no-untyped-def]
    smtp = SMTPConfig()
    base = protocol_settings(smtp.listeners()[0], spool_threshold=smtp.spool_threshold,
                             transcript=False, tls_available=False)
    return replace(base, **overrides)  # type: ignore[arg-type]


def chunks(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyChunk))


def feed_data(pieces: list[bytes], bare_lf: bool = False,
              **overrides: object) -> tuple[DataReader, int, bytearray]:
    """Feed `pieces` one by one, as reads arrive, until the reader stops saying MORE (the
    rest only lands in the buffer, as it would while the connection reads commands).
    `bare_lf`: the session's command lines all ended with bare LF."""
    buf = bytearray()
    reader = DataReader(settings(**overrides), buf, bare_lf=bare_lf)
    step = MORE
    for piece in pieces:
        buf += piece
        if step == MORE:
            step = reader.feed(buf)
    return reader, step, buf


def received(reader: DataReader) -> bytes:
    """The body, however it came out: in memory, or handed out in chunks."""
    assert reader.body is not None
    return reader.body.data if reader.body.data is not None else chunks(reader.out)


@pytest.mark.parametrize(("wire", "body", "bare_lf"), ALL_MESSAGES)
def test_data_split_at_every_byte_boundary(wire: bytes, body: bytes, bare_lf: bool) -> None:
    for cut in range(len(wire) + 1):
        reader, step, rest = feed_data([wire[:cut], wire[cut:] + b"QUIT\r\n"], bare_lf)
        assert step == DONE, cut
        assert received(reader) == body, cut
        assert rest == b"QUIT\r\n", cut  # what follows the terminator stays in the buffer
        assert reader.refusal is None


@pytest.mark.parametrize(("wire", "body", "bare_lf"), ALL_MESSAGES)
def test_data_fed_one_byte_at_a_time_through_a_tiny_spool_threshold(
        wire: bytes, body: bytes, bare_lf: bool) -> None:
    pieces = [wire[i:i + 1] for i in range(len(wire))]
    reader, step, _ = feed_data(pieces, bare_lf, spool_threshold=4)
    assert step == DONE
    assert received(reader) == body
    terminator = len(b".\r\n") if wire.endswith(b".\r\n") else len(b".\n")
    assert reader.raw_size == reader.size == len(wire) - terminator  # dots still in


def test_data_without_terminator_wants_more_and_keeps_small_bodies_in_the_buffer() -> None:
    reader, step, buf = feed_data([SMALL])
    assert step == MORE
    assert reader.out == []  # below the spool threshold: nothing handed out yet
    assert bytes(buf) == b"\r\n" + SMALL  # a line end before the body, for the search


def test_data_big_body_is_handed_out_in_chunks_and_unstuffed_across_them() -> None:
    line = b".dotted line that goes on and on\r\n"
    wire = line * 200 + b".\r\n"
    reader, step, _ = feed_data([wire[i:i + 97] for i in range(0, len(wire), 97)],
                                spool_threshold=512)
    assert step == DONE
    assert reader.chunked
    assert reader.body is not None and reader.body.data is None  # the body is in the chunks
    assert chunks(reader.out) == line[1:] * 200
    assert len([e for e in reader.out if isinstance(e, BodyChunk)]) > 1


def test_bare_lf_and_bare_terminator_are_violations() -> None:
    reader, step, _ = feed_data([b"a\nb\r\n.\n"], bare_lf=True)
    assert step == DONE
    assert reader.bare_terminator
    assert reader.violations([]) == [V_BARE_LF_DATA, V_BARE_LF_END]
    reader, _, _ = feed_data([b"a\nb\r\n.\r\n"])
    assert not reader.bare_terminator
    assert reader.violations([]) == [V_BARE_LF_DATA]
    reader, _, _ = feed_data([b"a\r\nb\r\n.\r\n"])
    assert reader.violations([]) == []


# A "." with a bare CR or LF beside it, inside a CRLF session's body (SMTP smuggling), and
# the body kept: a "." after a bare LF or CR is data; one at the start of a CRLF line is
# stuffing (RFC 5321 4.5.2), whatever follows it.
SMUGGLED = [
    (b"\n.\n", b"\n.\n"),
    (b"\n.\r\n", b"\n.\r\n"),
    (b"\r\n.\n", b"\r\n\n"),
    (b"\r.\r", b"\r.\r"),
    (b"\r.\n", b"\r.\n"),
    (b"\r\n.\r", b"\r\n\r"),
]


@pytest.mark.parametrize(("pattern", "kept"), SMUGGLED)
def test_a_dot_beside_a_bare_line_break_does_not_end_crlf_data(pattern: bytes,
                                                               kept: bytes) -> None:
    wire = b"Subject: s\r\n\r\nbefore" + pattern + b"MAIL FROM:<evil@x>\r\n.\r\n"
    body = b"Subject: s\r\n\r\nbefore" + kept + b"MAIL FROM:<evil@x>\r\n"
    for cut in range(len(wire) + 1):
        reader, step, rest = feed_data([wire[:cut], wire[cut:] + b"QUIT\r\n"])
        assert (step, received(reader), bytes(rest)) == (DONE, body, b"QUIT\r\n"), cut
        assert V_DOT_LINE in reader.violations([]), cut
        assert not reader.bare_terminator
    # handed out a byte at a time: the pattern straddles every chunk border
    reader, step, _ = feed_data([wire[i:i + 1] for i in range(len(wire))], spool_threshold=2)
    assert (step, reader.chunked, received(reader)) == (DONE, True, body)
    assert V_DOT_LINE in reader.violations([])


@pytest.mark.parametrize("start", [b".\n", b".\r", b"..\n"])
def test_a_bare_line_break_after_a_dot_on_the_first_line_is_noted(start: bytes) -> None:
    reader, step, _ = feed_data([start + b"x\r\n.\r\n"])
    assert step == DONE
    assert received(reader) == start[1:] + b"x\r\n"  # the first line starts a line
    assert (V_DOT_LINE in reader.violations([])) == (start != b"..\n")


def test_crlf_dot_lines_and_stuffed_dots_are_not_smuggling() -> None:
    wire = b"a.\r\n..\r\n...\r\n..x\r\n.\r.\r\n.\r\n"  # the last line but one: ".\r."
    reader, step, _ = feed_data([wire])
    assert step == DONE
    assert received(reader) == b"a.\r\n.\r\n..\r\n.x\r\n\r.\r\n"
    assert reader.violations([]) == [V_DOT_LINE]  # "\r.\r" is one
    reader, _, _ = feed_data([b"a.\r\n..\r\n.x.\r\n.\r\n"])
    assert reader.violations([]) == []


@settings_(deadline=None, max_examples=300)
@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n"]), max_size=40),
       st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_body_scan_finds_every_dot_line_however_the_body_is_cut(
        parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts) + b"\r\n"  # a body ends with its last line's end
    assume(TERMINATOR not in LINE_START + body)  # that would have ended it
    scan = BodyScan()
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    for start, end in pairwise(points):
        scan.feed(body[start:end])
    assert scan.dot_line == (re.search(rb"[\r\n]\.[\r\n]", LINE_START + body) is not None)
    assert scan.bare_lf == (re.search(rb"(?<!\r)\n", body) is not None)


def test_a_bare_lf_session_ends_at_its_first_dot_line() -> None:
    wire = b"one\n.\nMAIL FROM:<next@x>\n"
    reader, step, rest = feed_data([wire], bare_lf=True)
    assert (step, received(reader), bytes(rest)) == (DONE, b"one\n", b"MAIL FROM:<next@x>\n")
    assert reader.violations([]) == [V_BARE_LF_DATA, V_BARE_LF_END]


def test_long_lines_and_eight_bit_are_violations_unless_declared() -> None:
    reader, _, _ = feed_data([b"x" * 1200 + "é\r\n".encode() + b".\r\n"])
    assert reader.violations([]) == [V_LONG_DATA_LINE, V_EIGHT_BIT]
    assert reader.violations(["BODY=8BITMIME"]) == [V_LONG_DATA_LINE]


def test_data_over_the_size_limit_is_read_to_the_end_then_refused() -> None:
    body = b"x" * 70 + b"\r\n"
    wire = body * 20 + b".\r\n"
    pieces = [wire[i:i + 50] for i in range(0, len(wire), 50)]
    reader, step, buf = feed_data([*pieces, b"NOOP\r\n"], max_message_size=1000,
                                  spool_threshold=200)
    assert step == DONE
    assert reader.refusal == TOO_BIG
    assert reader.body is None
    # chunks handed out before the limit was passed are taken back, once
    assert [type(e) for e in reader.out].count(BodyDropped) == 1
    assert isinstance(reader.out[-1], BodyDropped)
    assert buf == b"NOOP\r\n"


def test_data_exactly_at_the_size_limit_is_kept() -> None:
    body = b"y" * 98 + b"\r\n"
    reader, step, _ = feed_data([body + b".\r\n"], max_message_size=len(body))
    assert step == DONE
    assert reader.refusal is None
    assert received(reader) == body


def test_data_headers_are_reported_once_however_the_input_is_split() -> None:
    head = b"Subject: x\r\nFrom: a@b\r\n"
    wire = head + b"\r\n..body\r\n.\r\n"
    for cut in range(len(wire) + 1):
        buf = bytearray()
        reader = DataReader(settings(), buf, watch_headers=True)
        steps = [MORE]
        for piece in (wire[:cut], wire[cut:]):
            buf += piece
            if steps[-1] == DONE:
                break
            while (step := reader.feed(buf)) == HEADERS:
                steps.append(step)
                assert reader.headers == head, cut
            steps.append(step)
        assert steps.count(HEADERS) == 1, cut
        assert steps[-1] == DONE, cut
        assert received(reader) == head + b"\r\n.body\r\n", cut


def test_data_refused_at_its_headers_reads_the_rest_then_gives_the_refusal() -> None:
    buf = bytearray(b"Subject: x\r\n\r\n")
    reader = DataReader(settings(), buf, watch_headers=True)
    assert reader.feed(buf) == HEADERS
    reader.fail(b"550 5.7.1 no\r\n")
    buf += b"body\r\n.\r\n"
    assert reader.feed(buf) == DONE
    assert reader.refusal == b"550 5.7.1 no\r\n"
    assert reader.body is None
    assert buf == b""


# ---- BDAT -------------------------------------------------------------------------------


def feed_bdat(reader: BdatReader, data: bytes, last: bool, cut: int) -> int:
    """One chunk, given in two reads split at `cut`."""
    reader.begin(len(data), last)
    buf = bytearray(data[:cut])
    step = reader.feed(buf)
    if cut < len(data):
        assert step == MORE
        buf += data[cut:] + b"NEXT"
        step = reader.feed(buf)
        assert buf == b"NEXT"  # the bytes after the chunk are left for the commands
    return step


def test_bdat_chunks_split_at_every_byte_boundary_are_taken_as_they_are() -> None:
    parts = [b"Subject: b\r\n\r\n.not unstuffed\n", b"\x00binary\xff", b"end\r\n"]
    for cut in range(len(parts[0]) + 1):
        reader = BdatReader(settings())
        assert feed_bdat(reader, parts[0], False, cut) == CHUNK
        assert feed_bdat(reader, parts[1], False, min(cut, len(parts[1]))) == CHUNK
        assert feed_bdat(reader, parts[2], True, min(cut, len(parts[2]))) == DONE
        assert reader.body is not None and reader.body.data == b"".join(parts)
        assert reader.size == len(parts[2])  # the current chunk's, for its reply
        assert reader.raw_size == sum(map(len, parts))


def test_bdat_zero_length_last_chunk_ends_the_body() -> None:
    reader = BdatReader(settings())
    assert feed_bdat(reader, b"abc", False, 3) == CHUNK
    reader.begin(0, True)
    assert reader.feed(bytearray()) == DONE
    assert reader.body is not None and reader.body.data == b"abc"


def test_bdat_big_body_is_handed_out_once_past_the_threshold() -> None:
    reader = BdatReader(settings(spool_threshold=10))
    assert feed_bdat(reader, b"12345", False, 2) == CHUNK
    assert reader.out == []
    assert feed_bdat(reader, b"6789012", False, 3) == CHUNK
    assert feed_bdat(reader, b"abc", True, 1) == DONE
    assert reader.chunked
    assert chunks(reader.out) == b"123456789012abc"
    assert reader.body is not None and reader.body.data is None


def test_bdat_over_the_size_limit_reads_every_chunk_then_refuses() -> None:
    reader = BdatReader(settings(max_message_size=10, spool_threshold=4))
    assert feed_bdat(reader, b"123456", False, 6) == CHUNK
    assert feed_bdat(reader, b"789012", False, 2) == CHUNK  # still read, and answered
    assert feed_bdat(reader, b"345", True, 0) == DONE
    assert reader.refusal == TOO_BIG
    assert reader.body is None
    assert isinstance(reader.out[-1], BodyDropped)
    assert reader.raw_size == 15


def test_bdat_headers_come_at_the_chunk_that_ends_them() -> None:
    reader = BdatReader(settings(), watch_headers=True)
    assert feed_bdat(reader, b"Subject: x\r\n", False, 5) == CHUNK
    assert feed_bdat(reader, b"\r\nbody", False, 1) == HEADERS
    assert reader.headers == b"Subject: x\r\n"
    assert reader.feed(bytearray()) == CHUNK  # fed again once the verdict said go on
    assert feed_bdat(reader, b"\r\n", True, 2) == DONE
    assert reader.body is not None and reader.body.data == b"Subject: x\r\n\r\nbody\r\n"


def test_bdat_refused_at_its_headers_answers_its_chunks_then_refuses() -> None:
    reader = BdatReader(settings(), watch_headers=True)
    assert feed_bdat(reader, b"Subject: x\r\n\r\n", False, 3) == HEADERS
    reader.fail(b"550 5.7.1 no\r\n")
    assert reader.feed(bytearray()) == CHUNK
    assert feed_bdat(reader, b"more", True, 2) == DONE
    assert reader.refusal == b"550 5.7.1 no\r\n"


def test_bdat_skipping_reads_a_refused_chunk_and_keeps_nothing() -> None:
    reader = BdatReader.skipping(settings(), 8, False, b"503 need MAIL\r\n")
    buf = bytearray(b"1234")
    assert reader.feed(buf) == MORE
    buf += b"5678RSET\r\n"
    assert reader.feed(buf) == SKIPPED
    assert buf == b"RSET\r\n"
    assert reader.refusal == b"503 need MAIL\r\n"
    assert reader.out == []
    assert reader.body is None
