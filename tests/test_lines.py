"""The command-line framing of the SMTP core (capture/protocol/lines.py), driven directly."""

from __future__ import annotations

from mailpipe.capture.protocol.lines import AUTH_LINE_LENGTH, LineReader


def take_all(reader: LineReader, buf: bytearray, auth: bool = False) -> list[object]:
    """Every line the buffer holds now; "LONG" where an over-long one was thrown away."""
    got: list[object] = []
    while True:
        line = reader.take(buf, auth)
        bare_lf, overlong = reader.bare_lf, reader.overlong
        reader.bare_lf = reader.overlong = False  # the caller clears what it reported
        if line is not None:
            got.append((line, bare_lf))
        elif overlong:
            got.append("LONG")
        else:
            return got


def test_lines_split_at_every_byte_boundary() -> None:
    wire = b"EHLO a\r\nMAIL FROM:<x@y>\nNOOP\r\n"
    for cut in range(len(wire) + 1):
        reader, buf = LineReader(100), bytearray(wire[:cut])
        got = take_all(reader, buf)
        buf += wire[cut:]
        got += take_all(reader, buf)
        assert got == [("EHLO a", False), ("MAIL FROM:<x@y>", True), ("NOOP", False)], cut
        assert buf == b""


def test_an_over_long_line_is_thrown_away_to_its_end_once() -> None:
    reader = LineReader(10)
    buf = bytearray(b"NOOP " + b"x" * 20)  # no line end yet, already too long
    assert take_all(reader, buf) == ["LONG"]
    buf += b"y" * 50  # its tail, in a later read, is not a command
    assert take_all(reader, buf) == []
    buf += b"yy\r\nQUIT\r\n"
    assert take_all(reader, buf) == [("QUIT", False)]


def test_a_complete_over_long_line_and_the_exact_limit() -> None:
    reader = LineReader(10)
    buf = bytearray(b"x" * 11 + b"\r\n" + b"y" * 10 + b"\r\n")
    assert take_all(reader, buf) == ["LONG", ("y" * 10, False)]


def test_auth_lines_may_be_as_long_as_rfc_4954_allows() -> None:
    reader = LineReader(10)
    token = "t" * (AUTH_LINE_LENGTH - 20)
    buf = bytearray(f"AUTH PLAIN {token}\r\n{token}\r\n".encode())
    assert take_all(reader, buf) == [(f"AUTH PLAIN {token}", False), "LONG"]
    buf = bytearray(f"{token}\r\n".encode())
    assert take_all(reader, buf, auth=True) == [(token, False)]  # answers a 334 challenge
