"""Receiving one message body, sans-I/O: `DataReader` for DATA, `BdatReader` for BDAT chunks.

A reader owns the body while it comes in: how much arrived, where the next terminator search
starts, the reply that will replace delivery once the body is dropped (too big, refused at its
headers), the watch for the end of the header block, the hand-out of big bodies in chunks and
the size limit. The connection feeds it its input buffer (the reader takes what belongs to
the body out of it) and acts on what `feed()` returns:

- MORE: everything given is taken or kept; feed again when more input comes;
- HEADERS: the header block is complete, in `headers`: ask the HEADERS verdict, then feed
  again (a refusal calls `fail()` first: the rest is still read, then refused);
- CHUNK: a BDAT chunk that is not the LAST one is read (`size` bytes);
- DONE: the body is complete: `body` holds it, unless `refusal` says why it is not kept;
- SKIPPED: a BDAT chunk that was refused before it came is read; answer `refusal`.

BodyChunk and BodyDropped events collect in `out`, for the connection to pass on in order.
Nothing here knows about modes, replies other than TOO_BIG, or the transaction.
"""

from __future__ import annotations

from ..types import BodyChunk, BodyDropped, Event, MessageBody
from .body import (
    BARE_LF_TERMINATOR,
    LINE_START,
    TERMINATOR,
    TERMINATOR_TAIL,
    BodyScan,
    HeaderWatch,
    copy,
    headers_end,
    unstuff,
)
from .replies import TOO_BIG, V_BARE_LF_END
from .settings import ProtocolSettings

# What feed() returns; plain ints, compared on every read.
MORE, HEADERS, CHUNK, DONE, SKIPPED = range(5)

__all__ = ["CHUNK", "DONE", "HEADERS", "MORE", "SKIPPED", "BdatReader", "DataReader"]


class _Reader:
    """What DATA and BDAT bodies share: the size limit, dropping, the hand-out of chunks."""

    __slots__ = ("_limit", "_threshold", "body", "chunked", "head", "headers", "out",
                 "raw_size", "refusal", "size")

    def __init__(self, settings: ProtocolSettings, watch_headers: bool) -> None:
        self._limit = settings.max_message_size  # 0 = unlimited
        self._threshold = settings.spool_threshold
        self.out: list[Event] = []
        self.chunked = False  # part of the body was handed out in BodyChunk events
        self.refusal: bytes | None = None  # the reply that replaces delivery once dropped
        self.raw_size = 0  # body bytes taken out of the input buffer so far
        self.size = 0  # the DATA body's or the current BDAT chunk's size on the wire
        self.head = HeaderWatch() if watch_headers else None  # while HEADERS is due
        self.headers = b""
        self.body: MessageBody | None = None

    def fail(self, reply: bytes) -> None:
        """Stop keeping the body; keep reading it, then answer `reply` instead."""
        if self.refusal is None:
            self.refusal = reply
            if self.chunked:
                self.out.append(BodyDropped())
                self.chunked = False
            self.head = None
            self._forget()

    def violations(self, mail_options: list[str]) -> list[str]:
        """What the body's checks found (DATA's only: BDAT content is binary-clean)."""
        return []

    def _forget(self) -> None:
        """Drop what is kept in memory (a subclass's)."""

    def _chunk_out(self, data: bytes) -> None:
        self.out.append(BodyChunk(data))
        self.chunked = True

    def _over_limit(self, size: int) -> bool:
        return bool(self._limit) and size > self._limit


class DataReader(_Reader):
    """The body after DATA, up to the "." line, dot-unstuffed, with its checks (BodyScan).

    Which "." line ends it depends on `bare_lf`, whether the session uses bare LF (no command
    line so far ended with CRLF): see body.py. Small bodies stay in the input buffer until
    the terminator comes, then are copied once; bigger ones leave it in chunks so that
    memory stays bounded."""

    __slots__ = ("_bare_lf", "_checks", "_scan", "_start", "bare_terminator")

    def __init__(self, settings: ProtocolSettings, buf: bytearray,
                 watch_headers: bool = False, bare_lf: bool = False) -> None:
        """`buf` is the connection's input buffer, just past the DATA line."""
        super().__init__(settings, watch_headers)
        # Put a line end before the body: then one search for "\r\n.\r\n" also finds a
        # terminator on the very first line (an empty message).
        buf[0:0] = LINE_START
        self._start = len(LINE_START)  # where the body not yet handed out starts in buf
        self._scan = 0  # where the next terminator search starts
        self._bare_lf = bare_lf
        self._checks: BodyScan | None = None  # carried over the chunks
        self.bare_terminator = False  # the body ended otherwise than with CRLF.CRLF

    def feed(self, buf: bytearray) -> int:
        # where the body ends: past the line end before the "." line; -1 until it comes
        if self._bare_lf:
            end = self._bare_lf_end(buf)
        else:
            end = buf.find(TERMINATOR, self._scan)
            if end >= 0:
                end += 2
        head = self.head
        if head is not None:
            stop = len(buf) if end < 0 else end
            found = headers_end(buf, head.scan, stop)
            if found >= 0 or end >= 0:
                return self._ask_headers(buf, found if found >= 0 else stop)
            head.scan = max(len(buf) - 2, 0)  # "\n\r" may straddle two reads
        if end < 0:
            return self._hold(buf)
        raw = copy(buf, self._start, end)  # the line end before "." is the body's
        del buf[: end + (3 if buf[end + 1] == 13 else 2)]  # ".\r\n" or ".\n"
        self._end(raw)
        return DONE

    def _bare_lf_end(self, buf: bytearray) -> int:
        match = BARE_LF_TERMINATOR.search(buf, self._scan)
        if match is None:
            return -1
        at = match.start()
        # at >= 1: the buffer starts with LINE_START, or with the kept TERMINATOR_TAIL
        # bytes, which hold no "\n" that a terminator could start at.
        self.bare_terminator = match.end() - at == 3 or buf[at - 1] != 13
        return at + 1

    def violations(self, mail_options: list[str]) -> list[str]:
        checks = self._checks
        if checks is None or not (self.bare_terminator or checks.bare_lf or checks.dot_line
                                  or checks.long_line or checks.eight_bit):
            return []  # the common case, without building the option set
        found = checks.violations(mail_options, self.bare_terminator)
        if self.bare_terminator:
            found.append(V_BARE_LF_END)
        return found

    def _ask_headers(self, buf: bytearray, end: int) -> int:
        self.head = None
        self.headers = unstuff(copy(buf, self._start, end), LINE_START, not self._bare_lf)
        return HEADERS

    def _hold(self, buf: bytearray) -> int:
        """No terminator yet: keep the body in the buffer, or hand it out when too big."""
        cut = len(buf) - TERMINATOR_TAIL  # these last bytes may begin the terminator
        self._scan = max(cut, 0)
        held = cut - self._start
        if held <= 0:
            return MORE
        if self.refusal is None and self._over_limit(self.raw_size + held):
            self.fail(TOO_BIG)
        if self.refusal is None and not self.chunked and held <= self._threshold:
            return MORE
        if self.head is not None:  # a header block this big: ask before it leaves the buffer
            return self._ask_headers(buf, cut)
        chunk = copy(buf, self._start, cut)
        del buf[:cut]
        self._start = self._scan = 0
        self.raw_size += len(chunk)
        if self.refusal is None:
            self._scan_out(chunk)
        return MORE

    def _scan_out(self, raw: bytes) -> None:
        checks = self._checks
        if checks is None:
            checks = self._checks = BodyScan()
        before = checks.tail  # the end of the last chunk: does `raw` start a line?
        checks.feed(raw)
        self._chunk_out(unstuff(raw, before, not self._bare_lf))

    def _end(self, raw: bytes) -> None:
        self.raw_size = self.size = self.raw_size + len(raw)
        if self.refusal is None and self._over_limit(self.size):
            self.fail(TOO_BIG)
        if self.refusal is not None:
            return
        # also when the whole body came in one read: where it lands must not depend on
        # how the input was split
        if self.chunked or len(raw) > self._threshold:
            self._scan_out(raw)
            self.body = MessageBody()
        else:
            self._checks = BodyScan()
            self._checks.feed(raw)
            data = unstuff(raw, LINE_START, not self._bare_lf)
            self.body = MessageBody(data=data, size=len(data))


class BdatReader(_Reader):
    """The BDAT chunks of one message (RFC 3030): each `begin()`, then fed until read.

    Chunks are taken as they are (no terminator, no unstuffing): a chunk is its byte count,
    so no "." line or command text inside it can end it or run (no smuggling), and the byte
    after the count starts the next command. The body is kept in memory until it passes the
    spool threshold, then handed out chunk by chunk."""

    __slots__ = ("_kept", "_left", "_skip", "last")

    def __init__(self, settings: ProtocolSettings, watch_headers: bool = False) -> None:
        super().__init__(settings, watch_headers)
        self._kept = bytearray()  # the body while it is small enough for memory
        self._left = 0  # bytes of the current chunk still to come
        self._skip = False
        self.last = False

    @classmethod
    def skipping(cls, settings: ProtocolSettings, size: int, last: bool,
                 reply: bytes) -> BdatReader:
        """Reads one chunk that was refused before it came (no transaction, or a verdict
        said no), keeping nothing; feed() then says SKIPPED and `refusal` is `reply`."""
        reader = cls(settings)
        reader.refusal = reply
        reader._skip = True
        reader.begin(size, last)
        return reader

    def begin(self, size: int, last: bool) -> None:
        self.size = self._left = size
        self.last = last

    def feed(self, buf: bytearray) -> int:
        left = self._left
        if left:
            take = min(left, len(buf))
            if not take:
                return MORE
            if self.refusal is None:
                self._keep(buf[:take])
            else:
                self.raw_size += take  # read and thrown away: no copy
            del buf[:take]
            self._left = left = left - take
            if left:
                return MORE
        return self._chunk_read()

    def _keep(self, chunk: bytearray) -> None:
        self.raw_size += len(chunk)
        if self._over_limit(self.raw_size):
            self.fail(TOO_BIG)
            return
        head = self.head
        if head is not None and head.end < 0:
            head.feed(chunk, self._threshold)
        if self.chunked:
            self._chunk_out(bytes(chunk))
        else:
            self._kept += chunk
            if len(self._kept) > self._threshold:
                data = bytes(self._kept)
                self._kept = bytearray()
                self._chunk_out(data)

    def _chunk_read(self) -> int:
        """What the chunk just read leads to; asked again after the HEADERS verdict."""
        if self._skip:
            return SKIPPED
        head = self.head
        if head is not None and (head.end >= 0 or self.last):
            self.headers = head.headers()
            self.head = None
            return HEADERS
        if not self.last:
            return CHUNK
        if self.refusal is None:
            if self.chunked:
                self.body = MessageBody()
            else:
                data = bytes(self._kept)
                self.body = MessageBody(data=data, size=len(data))
        return DONE

    def _forget(self) -> None:
        self._kept = bytearray()
