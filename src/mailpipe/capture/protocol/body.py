"""The message body scanner: DATA's terminator and dot-unstuffing over whole buffers, the
checks every body gets (bare LF, long lines, 8-bit, would-be "." lines), and the search for
the end of the header block. Never line by line: `bytes.find`/`replace`/`count` and regexes
over large chunks.

Which "." line ends DATA depends on how the session ends its lines (SMTP smuggling,
CVE-2023-51764/51766: a server that ends DATA where the relay before it did not lets the
rest of a message run as commands). A session "uses bare LF" while every line the client
has sent outside message data on this connection (commands and AUTH responses, the DATA line
included, before and after STARTTLS) ended with a bare LF; one CRLF makes it a CRLF session
for good (`LineReader.crlf`).
- CRLF session: only <CRLF>.<CRLF> ends DATA. A "." with a bare LF or CR on either side
  (<LF>.<LF>, <CR>.<CR>, <LF>.<CRLF>, <CRLF>.<LF>, <CRLF>.<CR>...) is message data, noted
  (V_DOT_LINE). Only CRLF starts a line, so only a dot after CRLF is unstuffed.
- bare-LF session: a "." line after an LF ends DATA, its own end LF or CRLF (<LF>.<LF>,
  <CRLF>.<LF>, <LF>.<CRLF>, <CRLF>.<CRLF>); any but the last is noted (V_BARE_LF_END).
Finding out costs a CRLF body one `count` more per chunk (bare CR); the exact search for a
"." between line breaks runs only over bodies that have a bare CR or LF.
"""

from __future__ import annotations

import re

from .replies import DATA_LINE_LIMIT, V_BARE_LF_DATA, V_DOT_LINE, V_EIGHT_BIT, V_LONG_DATA_LINE

TERMINATOR = b"\r\n.\r\n"
BARE_LF_TERMINATOR = re.compile(rb"\n\.\r?\n")
# Longest incomplete terminator ("\r\n.\r") that may straddle two reads.
TERMINATOR_TAIL = 4
# Put before the body in the input buffer: the first line then starts after a CRLF, like the
# others, for the terminator search and the checks.
LINE_START = b"\r\n"
# The blank line ending the headers, seen from the LF before it.
_HEADERS_END = re.compile(rb"\n\r?\n")
EIGHT_BIT_OK = frozenset({"BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8"})


def unstuff(data: bytes, before: bytes, crlf: bool) -> bytes:
    """Remove the transparency dot (RFC 5321 4.5.2) from every line that starts with one.
    `before`: the bytes before `data` (LINE_START at the body's start). In a CRLF
    session only CRLF starts a line: a dot after a bare LF stays, as received."""
    if crlf:
        if data[:1] == b"." and before[-2:] == LINE_START:
            data = data[1:]
        elif data[:2] == b"\n." and before[-1:] == b"\r":  # CRLF split by a chunk border
            data = data[:1] + data[2:]
        return data.replace(b"\r\n.", b"\r\n")
    if data[:1] == b"." and before[-1:] == b"\n":
        data = data[1:]
    return data.replace(b"\n.", b"\n")


def _long_line_between(chunk: bytes, first: int, last: int) -> bool:
    """A line of DATA_LINE_LIMIT bytes or more (its LF not counted) between the LFs at
    `first` and `last`. From each LF, the last LF within the limit is where the next search
    starts, so a body of short lines is crossed in strides of about the limit, each one
    C-speed `rfind`: a regex looking at every line costs five times as much."""
    at = first
    while last - at > DATA_LINE_LIMIT:
        at = chunk.rfind(b"\n", at + 1, at + DATA_LINE_LIMIT + 1)
        if at < 0:
            return True
    return False


def dot_line(data: bytes) -> bool:
    """A "." between two line-break bytes (CR or LF) in `data`: in a body, which never holds
    its own terminator, a "." line that a server reading line ends differently would end
    the data at. Found by `find`: "\n." and "\r." are rare in mail."""
    for needle in (b"\n.", b"\r."):
        at = data.find(needle)
        while at >= 0:
            if data[at + 2 : at + 3] in (b"\r", b"\n"):
                return True
            at = data.find(needle, at + 2)
    return False


def copy(buf: bytearray, start: int, end: int) -> bytes:
    # One copy instead of two (slice, then bytes); views released before buf is resized.
    with memoryview(buf) as view, view[start:end] as part:
        return bytes(part)


def headers_end(buf: bytes | bytearray, start: int, end: int) -> int:
    """Where the header block ends in buf[start:end] (just past the LF of its last line,
    before the blank line), or -1. `start` must be at an LF or the start of a line."""
    match = _HEADERS_END.search(buf, start, end)
    return -1 if match is None else match.start() + 1


class HeaderWatch:
    """Looks for the end of the header block while the HEADERS verdict is due. For DATA it
    only keeps where to search the input buffer next; BDAT chunks are copied into `seen`."""

    __slots__ = ("end", "scan", "seen")

    def __init__(self) -> None:
        self.scan = 0  # where the next search starts
        self.seen = bytearray(b"\n")  # BDAT: the body so far, after an LF for the search
        self.end = -1  # BDAT: where the header block ends in `seen`, once found

    def feed(self, chunk: bytes | bytearray, limit: int) -> None:
        seen = self.seen
        seen += chunk
        self.end = headers_end(seen, self.scan, len(seen))
        self.scan = max(len(seen) - 2, 0)  # "\n\r" may straddle two chunks
        if self.end < 0 and len(seen) > limit:
            self.end = len(seen)  # a header block this big: ask with what came

    def headers(self) -> bytes:
        return bytes(self.seen[1 : self.end if self.end >= 0 else len(self.seen)])


class BodyScan:
    """Checks over DATA content, fed whole buffers (possibly several, for chunked bodies)."""

    __slots__ = ("bare_cr", "bare_lf", "dot_line", "eight_bit", "line_len", "long_line",
                 "prev_cr", "tail")

    def __init__(self) -> None:
        self.bare_lf = False
        self.bare_cr = False
        self.dot_line = False  # a "." between bare line-break bytes: see dot_line()
        self.eight_bit = False
        self.long_line = False
        self.line_len = 0  # bytes of the unfinished line at the end of the last chunk
        self.prev_cr = False  # the last chunk ended with CR
        # The last three bytes fed (the body starts a line): a CR ending a chunk is known to
        # be bare only in the next one, when the "\n.\r" it may end is in this tail.
        self.tail = LINE_START

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.eight_bit and not chunk.isascii():
            self.eight_bit = True
        if not (self.bare_lf and self.bare_cr):
            self._feed_line_ends(chunk)
        # Only a bare CR or LF makes a "." line that is not one: CRLF mail skips the search.
        if (self.bare_lf or self.bare_cr) and not self.dot_line:
            self.dot_line = dot_line(self.tail + chunk[:2]) or dot_line(chunk)
        self.tail = chunk[-3:] if len(chunk) >= 3 else (self.tail + chunk)[-3:]
        self.prev_cr = chunk[-1] == 13
        self._feed_lines(chunk)

    def _feed_line_ends(self, chunk: bytes) -> None:
        # A CR at the end of a chunk is judged with the next one, where its LF may be.
        crlfs = chunk.count(b"\r\n") + (self.prev_cr and chunk[0] == 10)
        if not self.bare_lf:
            self.bare_lf = chunk.count(b"\n") != crlfs
        if not self.bare_cr:
            self.bare_cr = chunk.count(b"\r") + self.prev_cr - (chunk[-1] == 13) != crlfs

    def _feed_lines(self, chunk: bytes) -> None:
        if self.long_line:
            return
        first = chunk.find(b"\n")
        if first < 0:
            self.line_len += len(chunk)
            self.long_line = self.line_len >= DATA_LINE_LIMIT
            return
        last = chunk.rfind(b"\n")
        self.long_line = (
            self.line_len + first >= DATA_LINE_LIMIT
            or len(chunk) - last > DATA_LINE_LIMIT
            or _long_line_between(chunk, first, last)
        )
        self.line_len = len(chunk) - last - 1

    def violations(self, mail_options: list[str], bare_terminator: bool) -> list[str]:
        found = []
        if self.bare_lf or bare_terminator:
            found.append(V_BARE_LF_DATA)
        if self.dot_line:
            found.append(V_DOT_LINE)
        if self.long_line:
            found.append(V_LONG_DATA_LINE)
        if self.eight_bit and {o.upper() for o in mail_options}.isdisjoint(EIGHT_BIT_OK):
            found.append(V_EIGHT_BIT)
        return found
