"""Command and AUTH lines out of the input buffer: where a line ends (CRLF, or a bare LF the
client should not send but we take), and what happens to a line too long to be a command.

An over-long line is thrown away up to its end, however many reads that takes, so that its
tail is never read as a command; the connection answers it once. A line may be longer when it
carries AUTH data: RFC 4954 lets an AUTH line (initial response) reach 12288 octets, and
XOAUTH2 tokens do.

The reader also remembers whether any line of the connection ended with CRLF (`crlf`): the
DATA reader needs it to know how the client ends lines, and so which "." line ends the data
(see reception.py: a session "uses bare LF" while no line has ended with CRLF).
"""

from __future__ import annotations

AUTH_LINE_LENGTH = 12288


class LineReader:
    """Takes one line at a time out of the buffer it is given (sans-I/O: it keeps none)."""

    __slots__ = ("_max", "_skip", "_skip_cr", "bare_lf", "crlf", "overlong")

    def __init__(self, max_line_length: int) -> None:
        self._max = max_line_length  # longest command line, without its line end
        self._skip = False  # discarding the rest of an over-long line
        self._skip_cr = False  # ... and the bytes discarded so far ended with CR
        # Set by take(), cleared by whoever reports them: clearing them on every take()
        # would cost two stores per command for what almost never happens.
        self.bare_lf = False  # the line just taken ended with a bare LF
        self.overlong = False  # instead of a line, an over-long one was thrown away
        # Sticky: some line of this connection (command or AUTH response, before or after
        # STARTTLS) ended with CRLF, so the client knows the standard line end.
        self.crlf = False

    def take(self, buf: bytearray, auth: bool) -> str | None:
        """The next line without its line end, taken out of `buf`; None when there is no
        complete line yet, or when an over-long one was thrown away (then `overlong`).
        `auth`: the line answers an AUTH challenge, so it may be as long as AUTH's."""
        while True:
            idx = buf.find(b"\n")
            if not self._skip:
                break
            if idx < 0:
                self._discard(buf)
                return None
            # The thrown-away line's end counts like any other: how it arrived, in one read
            # or in many, must not change what is noted of the client.
            self._line_end(buf[idx - 1] == 13 if idx else self._skip_cr)
            del buf[: idx + 1]
            self._skip = False
        if idx < 0:
            if len(buf) > self._limit(buf, auth) + 1:  # +1: a CR may still be followed by LF
                self._discard(buf)
                self._skip = self.overlong = True
            return None
        end = idx
        crlf = idx > 0 and buf[idx - 1] == 13
        self._line_end(crlf)
        end -= crlf
        if end > self._max and end > self._limit(buf, auth):
            del buf[: idx + 1]
            self.overlong = True
            return None
        line = buf[:end].decode("utf-8", "replace")
        del buf[: idx + 1]
        return line

    def _line_end(self, crlf: bool) -> None:
        if crlf:
            self.crlf = True
        else:
            self.bare_lf = True

    def _discard(self, buf: bytearray) -> None:
        self._skip_cr = buf[-1:] == b"\r"
        buf.clear()

    def _limit(self, buf: bytearray, auth: bool) -> int:
        if auth or buf[:5].upper() == b"AUTH ":
            return max(self._max, AUTH_LINE_LENGTH)
        return self._max
