"""The message body scanner: DATA's terminator and dot-unstuffing over whole buffers, the
checks every body gets (bare LF, long lines, 8-bit), and the search for the end of the
header block. Never line by line: `bytes.find`/`replace` and regexes over large chunks."""

from __future__ import annotations

import re

from .replies import DATA_LINE_LIMIT, V_BARE_LF_DATA, V_EIGHT_BIT, V_LONG_DATA_LINE

TERMINATOR = re.compile(rb"\n\.\r?\n")
# Longest incomplete terminator ("\n.\r") that may straddle two reads.
TERMINATOR_TAIL = 3
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % DATA_LINE_LIMIT)
# The blank line ending the headers, seen from the LF before it.
_HEADERS_END = re.compile(rb"\n\r?\n")
EIGHT_BIT_OK = frozenset({"BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8"})


def unstuff(data: bytes, at_line_start: bool) -> bytes:
    """Remove the transparency dot (RFC 5321 4.5.2) from every line that starts with one."""
    if at_line_start and data[:1] == b".":
        data = data[1:]
    return data.replace(b"\n.", b"\n")


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

    __slots__ = ("bare_lf", "eight_bit", "line_len", "long_line", "prev_cr")

    def __init__(self) -> None:
        self.bare_lf = False
        self.eight_bit = False
        self.long_line = False
        self.line_len = 0  # bytes of the unfinished line at the end of the last chunk
        self.prev_cr = False  # the last chunk ended with CR

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.eight_bit and not chunk.isascii():
            self.eight_bit = True
        if not self.bare_lf:
            lfs = chunk.count(b"\n")
            if lfs:
                crlfs = chunk.count(b"\r\n") + (self.prev_cr and chunk[0] == 10)
                self.bare_lf = lfs != crlfs
        self.prev_cr = chunk[-1] == 13
        self._feed_lines(chunk)

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
            or (last - first > DATA_LINE_LIMIT and _LONG_LINE.search(chunk, first) is not None)
        )
        self.line_len = len(chunk) - last - 1

    def violations(self, mail_options: list[str], bare_terminator: bool) -> list[str]:
        found = []
        if self.bare_lf or bare_terminator:
            found.append(V_BARE_LF_DATA)
        if self.long_line:
            found.append(V_LONG_DATA_LINE)
        if self.eight_bit and {o.upper() for o in mail_options}.isdisjoint(EIGHT_BIT_OK):
            found.append(V_EIGHT_BIT)
        return found
