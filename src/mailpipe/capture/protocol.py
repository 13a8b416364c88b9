"""The SMTP server protocol as a sans-I/O state machine (h11 style).

`SMTPConnection` takes the bytes a client sent and returns events for whoever drives it:
bytes to send, complete messages, "start TLS now", "close". It never touches a socket, a
clock other than for `received_at`, or a logger, so it can be tested byte by byte.

It is deliberately permissive: mailpipe captures what applications send, so sloppy clients
(bare LF, long lines, 8-bit data without BODY=8BITMIME...) are accepted and their sins are
reported as `Violation` events instead of being refused.

DATA is never handled line by line: the body accumulates in the input buffer and every
check (terminator, dot-unstuffing, line length, 8-bit, bare LF) runs over whole buffers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import IO

from .types import (
    AuthInfo,
    Close,
    Envelope,
    Event,
    MessageBody,
    MessageReceived,
    Reply,
    Send,
    StartTLS,
    Trace,
    Violation,
)

__all__ = ["ProtocolSettings", "SMTPConnection"]


@dataclass(frozen=True, slots=True)
class ProtocolSettings:
    hostname: str = "localhost"
    max_message_size: int = 10 * 1024 * 1024  # 0 = unlimited
    max_recipients: int = 100  # 0 = unlimited
    max_line_length: int = 4096  # longest command line accepted (bytes, w/o CRLF)
    spool_threshold: int = 1024 * 1024  # a body bigger than this goes to a temp file
    spool_dir: str | None = None  # tempfile dir for spooled bodies (None = system default)
    tls_available: bool = False  # advertise STARTTLS
    transcript: bool = False  # keep the session's commands and replies
    trace: bool = False  # emit Trace events (for DEBUG logs)


# ---- states ---------------------------------------------------------------------------
# Ordered so that the hot checks are single comparisons: lines are read in states <= _AUTH,
# input is not processed at all in states >= _WAIT_REPLY.
_CMD = 0
_AUTH = 1
_DATA = 2
_BDAT = 3
_WAIT_REPLY = 4
_WAIT_TLS = 5
_CLOSED = 6

# RFC 4954 lets an AUTH line (initial response) reach 12288 octets; XOAUTH2 tokens do.
_AUTH_LINE_LENGTH = 12288
# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF, so 1000 bytes
# before the LF (counting the CR) is one too many.
_DATA_LINE_LIMIT = 1000
# Longest incomplete terminator ("\n.\r") that may straddle two reads.
_TERM_TAIL = 3
# A hostile client must not grow these without bound (or make each check O(n)).
_MAX_VIOLATIONS = 50
_MAX_TRANSCRIPT = 10_000

_TERMINATOR = re.compile(rb"\n\.\r?\n")
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % _DATA_LINE_LIMIT)
_EIGHT_BIT_OK = frozenset({"BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8"})

# ---- replies --------------------------------------------------------------------------
_R_OK = b"250 2.0.0 Ok\r\n"
_R_MAIL_OK = b"250 2.1.0 Ok\r\n"
_R_RCPT_OK = b"250 2.1.5 Ok\r\n"
_R_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_R_BYE = b"221 2.0.0 Bye\r\n"
_R_VRFY = b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
_R_HELP = (
    b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP AUTH STARTTLS\r\n"
)
_R_UNRECOGNIZED = b"500 5.5.2 Command unrecognized\r\n"
_R_NOT_IMPLEMENTED = b"502 5.5.1 Command not implemented\r\n"
_R_LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
_R_NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
_R_NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
_R_NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"
_R_DATA_AFTER_BDAT = b"503 5.5.1 Error: DATA not allowed after BDAT\r\n"
_R_TOO_MANY_RCPTS = b"452 4.5.3 Too many recipients\r\n"
_R_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
_R_LOCAL_ERROR = b"451 4.3.0 Error: local error in processing\r\n"
_R_SYNTAX_EHLO = b"501 5.5.4 Syntax: EHLO hostname\r\n"
_R_SYNTAX_HELO = b"501 5.5.4 Syntax: HELO hostname\r\n"
_R_SYNTAX_MAIL = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
_R_SYNTAX_RCPT = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
_R_SYNTAX_BDAT = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
_R_SYNTAX_AUTH = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
_R_SYNTAX_STARTTLS = b"501 5.5.4 Syntax: STARTTLS\r\n"
_R_AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
_R_AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
_R_AUTH_BAD_BASE64 = b"501 5.5.2 Invalid base64 data\r\n"
_R_AUTH_UNKNOWN = b"504 5.5.4 Unrecognized authentication type\r\n"
_R_AUTH_TWICE = b"503 5.5.1 Error: already authenticated\r\n"
_R_AUTH_IN_TRANSACTION = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
_R_334_EMPTY = b"334 \r\n"
_R_334_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
_R_334_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
_R_TLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
_R_TLS_ACTIVE = b"503 5.5.1 Error: TLS already active\r\n"

# ---- violations -----------------------------------------------------------------------
V_BARE_LF_COMMAND = "bare LF line ending in command"
V_BARE_LF_DATA = "bare LF line ending in message data"
V_LONG_DATA_LINE = f"message data line longer than {_DATA_LINE_LIMIT} bytes"
V_EIGHT_BIT = "8-bit message data without BODY=8BITMIME or SMTPUTF8"
V_NO_HELO = "MAIL without HELO/EHLO"
V_NO_COLON = "MAIL/RCPT without colon after FROM/TO"
V_PRE_TLS_DATA = "input sent before the TLS handshake discarded"

# Known SMTP verbs we do not implement: 502 rather than 500, like Postfix.
_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "BURL"})


@lru_cache(maxsize=64)
def _ehlo_reply(settings: ProtocolSettings, tls_active: bool) -> bytes:
    size = settings.max_message_size
    lines = [
        settings.hostname,
        "PIPELINING",
        f"SIZE {size}" if size else "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2",
    ]
    if settings.tls_available and not tls_active:
        lines.append("STARTTLS")
    lines.append("HELP")
    return Reply(250, "\n".join(lines)).encode()


def _unstuff(data: bytes, at_line_start: bool) -> bytes:
    """Remove the transparency dot (RFC 5321 4.5.2) from every line that starts with one."""
    if at_line_start and data[:1] == b".":
        data = data[1:]
    return data.replace(b"\n.", b"\n")


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    # One copy instead of two (slice, then bytes); views released before buf is resized.
    with memoryview(buf) as view, view[start:end] as part:
        return bytes(part)


def _strip_keyword(arg: str, keyword: str) -> tuple[str | None, bool]:
    """`FROM:<a>` -> (`<a>`, True); tolerates `FROM: <a>` and a missing colon (False)."""
    n = len(keyword)
    head = arg[: n + 1].upper()
    if head == keyword + ":":
        return arg[n + 1 :].lstrip(), True
    if head[:n] == keyword and (len(arg) == n or arg[n] in " \t"):
        return arg[n:].lstrip(), False
    return None, False


def _parse_path(rest: str) -> tuple[str | None, list[str]]:
    """`<addr> P1 P2` or `addr P1` -> (addr, [P1, P2]); None when unparseable."""
    if rest[:1] == "<":
        end = rest.find(">")
        if end < 0:
            return None, []
        return rest[1:end], rest[end + 1 :].split()
    parts = rest.split()
    if not parts:
        return None, []
    return parts[0], parts[1:]


def _size_param(params: list[str]) -> int | None:
    for param in params:
        if param[:5].upper() == "SIZE=":
            value = param[5:]
            if value.isascii() and value.isdigit():
                # int() refuses very long digit strings; anything this long is huge anyway
                return int(value) if len(value) <= 18 else 10**18
    return None


def _mask_auth(line: str) -> str:
    parts = line.split(None, 2)
    return f"{parts[0]} {parts[1]} ****" if len(parts) == 3 else line


class _BodyScan:
    """Checks over DATA content, fed whole buffers (possibly several, for spooled bodies)."""

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
            self.long_line = self.line_len >= _DATA_LINE_LIMIT
            return
        last = chunk.rfind(b"\n")
        self.long_line = (
            self.line_len + first >= _DATA_LINE_LIMIT
            or len(chunk) - last > _DATA_LINE_LIMIT
            or (last - first > _DATA_LINE_LIMIT and _LONG_LINE.search(chunk, first) is not None)
        )
        self.line_len = len(chunk) - last - 1


class _Spool:
    """A body that outgrew memory. Once finished, the MessageBody's consumer owns the file."""

    __slots__ = ("file", "path", "size")

    def __init__(self, spool_dir: str | None) -> None:
        self.file: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open on purpose
            delete=False, dir=spool_dir, prefix="mailpipe-spool-"
        )
        self.path: str = self.file.name
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> MessageBody:
        self.file.close()
        return MessageBody(path=self.path, size=self.size)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        MessageBody(path=self.path).discard()


class SMTPConnection:
    """One SMTP session, server side. Feed it bytes, act on the events it returns."""

    def __init__(self, settings: ProtocolSettings, *, tls_active: bool = False) -> None:
        self.settings = settings
        self.tls_active = tls_active
        self.helo = ""
        self.auth = AuthInfo()
        self._state = _CMD
        self._buf = bytearray()
        self._events: list[Event] = []
        self._out: list[bytes] = []  # replies not yet wrapped in a Send
        self._log = settings.transcript or settings.trace
        self._transcript: list[str] | None = [] if settings.transcript else None
        self._violations: list[str] = []  # since the last message
        self._skip_line = False  # discarding the rest of an over-long line
        self._authenticated = False
        self._auth_next: Callable[[str], None] | None = None
        self._env: Envelope | None = None
        self._bdat_used = False
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_keep = False
        self._reset_body()

    # ---- public API -------------------------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        return self._state == _WAIT_REPLY

    @property
    def in_transaction(self) -> bool:
        # A message waiting for its verdict still has a client waiting for the reply.
        return self._env is not None or _DATA <= self._state <= _WAIT_REPLY

    @property
    def in_data(self) -> bool:
        return self._state == _DATA or self._state == _BDAT

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    def start(self) -> list[Event]:
        self._send(f"220 {self.settings.hostname} ESMTP mailpipe\r\n".encode())
        return self._take_events()

    def receive(self, data: bytes) -> list[Event]:
        state = self._state
        if state >= _WAIT_REPLY:
            if state == _WAIT_REPLY:
                self._buf += data
            elif state == _WAIT_TLS and data:
                self._violation(V_PRE_TLS_DATA)
            return self._take_events()
        self._buf += data
        self._run()
        return self._take_events()

    def reply_to_message(self, reply: Reply, *, close_after: bool = False,
                         close_reply: Reply | None = None) -> list[Event]:
        """Answer the message awaiting its verdict; with close_after, then end the session
        with `close_reply` (221 Bye unless given, e.g. a 421 when the server is closing)."""
        if self._state != _WAIT_REPLY:
            if self._state == _CLOSED:
                return []
            raise RuntimeError("no message is awaiting a reply")
        self._send(reply.encode())
        if close_after:
            self._close(close_reply.encode() if close_reply else _R_BYE)
        else:
            self._state = _CMD
            self._run()
        return self._take_events()

    def tls_started(self) -> list[Event]:
        if self._state != _WAIT_TLS:
            if self._state == _CLOSED:
                return []
            raise RuntimeError("STARTTLS was not requested")
        # RFC 3207 4.2: forget everything learnt from the client before the handshake
        self.tls_active = True
        self.helo = ""
        self.auth = AuthInfo()
        self._authenticated = False
        self._reset_transaction()
        self._buf.clear()
        self._state = _CMD
        return self._take_events()

    def idle_timeout(self) -> list[Event]:
        return self._abort(f"421 4.4.2 {self.settings.hostname} Error: timeout exceeded\r\n")

    def shutdown(self) -> list[Event]:
        return self._abort(f"421 4.3.2 {self.settings.hostname} Service shutting down\r\n")

    def close_now(self, reply: Reply) -> list[Event]:
        """End the session with `reply` in any state, even while a message awaits its verdict
        (whoever was to give it has been cancelled)."""
        return self._abort(reply.encode().decode("utf-8", "surrogateescape"))

    def connection_lost(self) -> None:
        """The client went away: drop any half-received body (and its spool file)."""
        self._reset_transaction()
        self._buf.clear()
        self._state = _CLOSED

    # ---- output -----------------------------------------------------------------------

    def _send(self, reply: bytes) -> None:
        self._out.append(reply)
        if self._log:
            for line in reply.decode("utf-8", "replace").split("\r\n")[:-1]:
                self._log_line("S", line, line)

    def _flush(self) -> None:
        if self._out:
            self._events.append(Send(b"".join(self._out)))
            self._out.clear()

    def _take_events(self) -> list[Event]:
        self._flush()
        events = self._events
        self._events = []
        return events

    def _log_line(self, direction: str, line: str, masked: str) -> None:
        transcript = self._transcript
        if transcript is not None:
            if len(transcript) < _MAX_TRANSCRIPT - 1:
                transcript.append(f"{direction}: {line}")
            elif len(transcript) == _MAX_TRANSCRIPT - 1:
                transcript.append("[transcript truncated]")
        if self.settings.trace:
            self._events.append(Trace(direction, masked))

    def _log_data(self, size: int) -> None:
        if self._log:
            text = f"<message data: {size} bytes>"
            self._log_line("C", text, text)

    def _violation(self, text: str) -> None:
        if len(self._violations) < _MAX_VIOLATIONS and text not in self._violations:
            self._violations.append(text)
            self._events.append(Violation(text))

    def _close(self, reply: bytes) -> None:
        self._send(reply)
        self._flush()
        self._events.append(Close())
        self._state = _CLOSED
        self._buf.clear()
        self._reset_transaction()

    def _abort(self, reply: str) -> list[Event]:
        if self._state == _CLOSED:
            return []
        self._close(reply.encode())
        return self._take_events()

    # ---- input loop -------------------------------------------------------------------

    def _run(self) -> None:
        # Each reader returns True only after a state change, so this cannot spin.
        while True:
            state = self._state
            if state <= _AUTH:
                more = self._read_lines()
            elif state == _DATA:
                more = self._read_data()
            elif state == _BDAT:
                more = self._read_bdat()
            else:
                return
            if not more:
                return

    def _read_lines(self) -> bool:
        buf = self._buf
        while self._state <= _AUTH:
            idx = buf.find(b"\n")
            if self._skip_line:
                if idx < 0:
                    buf.clear()
                    return False
                del buf[: idx + 1]
                self._skip_line = False
                continue
            if idx < 0:
                if len(buf) > self._line_limit(buf) + 1:  # +1: a CR may still be followed by LF
                    buf.clear()
                    self._skip_line = True
                    self._line_too_long()
                return False
            end = idx
            if idx and buf[idx - 1] == 13:
                end -= 1
            else:
                self._violation(V_BARE_LF_COMMAND)
            if end > self.settings.max_line_length and end > self._line_limit(buf):
                del buf[: idx + 1]
                self._line_too_long()
                continue
            line = buf[:end].decode("utf-8", "replace")
            del buf[: idx + 1]
            if self._state == _CMD:
                self._command(line)
            else:
                self._auth_line(line)
        return True

    def _line_limit(self, buf: bytearray) -> int:
        limit = self.settings.max_line_length
        if self._state == _AUTH or buf[:5].upper() == b"AUTH ":
            return max(limit, _AUTH_LINE_LENGTH)
        return limit

    def _line_too_long(self) -> None:
        if self._log:
            self._log_line("C", "<over-long line discarded>", "<over-long line discarded>")
        self._violation(f"command line longer than {self.settings.max_line_length} bytes")
        self._state = _CMD  # an over-long AUTH response ends the exchange too
        self._send(_R_LINE_TOO_LONG)

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        key = verb.upper()
        if self._log:
            self._log_line("C", line, _mask_auth(line) if key == "AUTH" else line)
        handler = _HANDLERS.get(key)
        if handler is None:
            self._unknown(key)
        else:
            handler(self, arg.strip())

    def _unknown(self, verb: str) -> None:
        if verb in _NOT_IMPLEMENTED:
            self._violation(f"unimplemented command {verb}")
            self._send(_R_NOT_IMPLEMENTED)
        else:
            self._violation(f"unrecognized command {verb[:32]!r}")
            self._send(_R_UNRECOGNIZED)

    # ---- commands ---------------------------------------------------------------------

    def _cmd_ehlo(self, arg: str) -> None:
        if not arg:
            self._send(_R_SYNTAX_EHLO)
            return
        self.helo = arg
        self._reset_transaction()
        self._send(_ehlo_reply(self.settings, self.tls_active))

    def _cmd_helo(self, arg: str) -> None:
        if not arg:
            self._send(_R_SYNTAX_HELO)
            return
        self.helo = arg
        self._reset_transaction()
        self._send(f"250 {self.settings.hostname}\r\n".encode())

    def _cmd_mail(self, arg: str) -> None:
        if self._env is not None:
            self._send(_R_NESTED_MAIL)
            return
        rest, colon = _strip_keyword(arg, "FROM")
        address, params = _parse_path(rest) if rest is not None else (None, [])
        if address is None:
            self._send(_R_SYNTAX_MAIL)
            return
        if not colon:
            self._violation(V_NO_COLON)
        if not self.helo:
            self._violation(V_NO_HELO)
        size = _size_param(params)
        limit = self.settings.max_message_size
        if size is not None and limit and size > limit:
            self._send(_R_TOO_BIG)
            return
        self._env = Envelope(mail_from=address, mail_options=params, helo=self.helo)
        self._send(_R_MAIL_OK)

    def _cmd_rcpt(self, arg: str) -> None:
        env = self._env
        if env is None:
            self._send(_R_NEED_MAIL)
            return
        rest, colon = _strip_keyword(arg, "TO")
        address, params = _parse_path(rest) if rest is not None else (None, [])
        if not address:
            self._send(_R_SYNTAX_RCPT)
            return
        if not colon:
            self._violation(V_NO_COLON)
        limit = self.settings.max_recipients
        if limit and len(env.rcpt_to) >= limit:
            self._send(_R_TOO_MANY_RCPTS)
            return
        env.rcpt_to.append(address)
        env.rcpt_options.append(params)
        self._send(_R_RCPT_OK)

    def _cmd_data(self, arg: str) -> None:
        env = self._env
        if env is None:
            self._send(_R_NEED_MAIL)
        elif self._bdat_used:
            self._send(_R_DATA_AFTER_BDAT)
        elif not env.rcpt_to:
            self._send(_R_NEED_RCPT)
        else:
            self._send(_R_DATA)
            self._state = _DATA
            # Put back the LF that ended the DATA line: then one search for "\n.\r\n"
            # also finds a terminator on the very first line (an empty message).
            self._buf[0:0] = b"\n"
            self._body_start = 1

    def _cmd_bdat(self, arg: str) -> None:
        parts = arg.split()
        count = parts[0] if parts else ""
        if (
            len(parts) > 2
            or not (count.isascii() and count.isdigit() and len(count) <= 18)
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            self._send(_R_SYNTAX_BDAT)
            return
        env = self._env
        self._bdat_keep = env is not None and bool(env.rcpt_to)
        if self._bdat_keep:
            self._bdat_used = True
        self._bdat_size = self._bdat_left = int(count)
        self._bdat_last = len(parts) == 2
        self._state = _BDAT

    def _cmd_rset(self, arg: str) -> None:
        self._reset_transaction()
        self._send(_R_OK)

    def _cmd_noop(self, arg: str) -> None:
        self._send(_R_OK)

    def _cmd_vrfy(self, arg: str) -> None:
        self._send(_R_VRFY)

    def _cmd_help(self, arg: str) -> None:
        self._send(_R_HELP)

    def _cmd_quit(self, arg: str) -> None:
        self._close(_R_BYE)

    def _cmd_starttls(self, arg: str) -> None:
        if not self.settings.tls_available:
            self._send(_R_NOT_IMPLEMENTED)
        elif self.tls_active:
            self._send(_R_TLS_ACTIVE)
        elif arg:
            self._send(_R_SYNTAX_STARTTLS)
        else:
            self._send(_R_TLS_READY)
            self._flush()
            self._events.append(StartTLS())
            self._state = _WAIT_TLS
            # RFC 3207 5: anything pipelined after STARTTLS was sent in clear text and
            # could be an injected command: it must not survive into the TLS session.
            if self._buf:
                self._violation(V_PRE_TLS_DATA)
                self._buf.clear()

    # ---- AUTH -------------------------------------------------------------------------

    def _cmd_auth(self, arg: str) -> None:
        if self._env is not None:
            self._send(_R_AUTH_IN_TRANSACTION)
            return
        if self._authenticated:
            self._send(_R_AUTH_TWICE)
            return
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            self._send(_R_SYNTAX_AUTH)
            return
        mechanism = mechanism.upper()
        start = _AUTH_MECHANISMS.get(mechanism)
        if start is None:
            self._send(_R_AUTH_UNKNOWN)
            return
        # A new object per attempt: messages already delivered keep the AuthInfo they had.
        self.auth = AuthInfo(attempted=True, mechanism=mechanism)
        start(self, initial.strip())

    def _auth_line(self, line: str) -> None:
        if self._log:
            self._log_line("C", line, "****")
        self._state = _CMD
        if line.strip() == "*":
            self._send(_R_AUTH_CANCELLED)
            return
        step = self._auth_next
        self._auth_next = None
        if step is not None:
            step(line)

    def _challenge(self, reply: bytes, step: Callable[[str], None]) -> None:
        self._send(reply)
        self._auth_next = step
        self._state = _AUTH

    def _decode(self, text: str) -> str | None:
        """Base64 to str; None (after answering 501) when it is not base64."""
        text = text.strip()
        if text == "=":  # RFC 4954: an empty initial response
            return ""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._send(_R_AUTH_BAD_BASE64)
            return None
        return raw.decode("utf-8", "replace")

    def _auth_ok(self) -> None:
        self._authenticated = True
        self._send(_R_AUTH_OK)

    def _plain_start(self, initial: str) -> None:
        if initial:
            self._plain_response(initial)
        else:
            self._challenge(_R_334_EMPTY, self._plain_response)

    def _plain_response(self, line: str) -> None:
        text = self._decode(line)
        if text is None:
            return
        parts = text.split("\0")
        if len(parts) >= 3:  # authzid \0 authcid \0 passwd
            self.auth.username, self.auth.password = parts[1], "\0".join(parts[2:])
        elif len(parts) == 2:
            self.auth.username, self.auth.password = parts
        else:
            self.auth.username = text
        self._auth_ok()

    def _login_start(self, initial: str) -> None:
        if initial:
            self._login_username(initial)
        else:
            self._challenge(_R_334_USERNAME, self._login_username)

    def _login_username(self, line: str) -> None:
        text = self._decode(line)
        if text is not None:
            self.auth.username = text
            self._challenge(_R_334_PASSWORD, self._login_password)

    def _login_password(self, line: str) -> None:
        text = self._decode(line)
        if text is not None:
            self.auth.password = text
            self._auth_ok()

    def _cram_start(self, initial: str) -> None:
        # CRAM-MD5 has no initial response (RFC 2195); a client that sends one is ignored.
        nonce = f"<{secrets.randbelow(10**12)}.{int(time.time())}@{self.settings.hostname}>"
        challenge = base64.b64encode(nonce.encode("utf-8", "replace"))
        self._challenge(b"334 " + challenge + b"\r\n", self._cram_response)

    def _cram_response(self, line: str) -> None:
        text = self._decode(line)
        if text is None:
            return
        user, sep, digest = text.rpartition(" ")
        self.auth.username, self.auth.password = (user, digest) if sep else (text, "")
        self._auth_ok()

    def _xoauth2_start(self, initial: str) -> None:
        if initial:
            self._xoauth2_response(initial)
        else:
            self._challenge(_R_334_EMPTY, self._xoauth2_response)

    def _xoauth2_response(self, line: str) -> None:
        text = self._decode(line)
        if text is None:
            return
        for field in text.split("\x01"):
            if field[:5] == "user=":
                self.auth.username = field[5:]
            elif field[:5] == "auth=":
                token = field[5:]
                self.auth.password = token[7:] if token[:7].lower() == "bearer " else token
        self._auth_ok()

    # ---- message bodies ---------------------------------------------------------------

    def _reset_body(self) -> None:
        self._spool: _Spool | None = None
        self._drop: bytes | None = None  # reply that replaces delivery (too big, I/O error)
        self._raw_size = 0  # body bytes received and no longer in the input buffer
        self._body_start = 0  # where the uncommitted body starts in the input buffer
        self._scan = 0  # where the next terminator search starts
        self._bol = True  # the spooled data so far ends at a line start
        self._body_scan: _BodyScan | None = None  # checks carried over spooled chunks
        self._bdat_buf = bytearray()

    def _reset_transaction(self) -> None:
        self._env = None
        self._bdat_used = False
        if self._spool is not None:
            self._spool.discard()
        self._reset_body()

    def _fail(self, reply: bytes) -> None:
        """Stop keeping the body; keep reading it, then answer `reply` instead."""
        if self._drop is None:
            self._drop = reply
            if self._spool is not None:
                self._spool.discard()
                self._spool = None
            self._bdat_buf = bytearray()

    def _spool_write(self, data: bytes) -> None:
        try:
            if self._spool is None:
                self._spool = _Spool(self.settings.spool_dir)
            self._spool.write(data)
        except OSError:
            self._fail(_R_LOCAL_ERROR)

    def _over_limit(self, size: int) -> bool:
        limit = self.settings.max_message_size
        return bool(limit) and size > limit

    def _read_data(self) -> bool:
        buf = self._buf
        match = _TERMINATOR.search(buf, self._scan)
        if match is None:
            self._hold_data()
            return False
        body_end = match.start() + 1  # the CRLF before "." belongs to the message
        raw = _copy(buf, self._body_start, body_end)
        bare_terminator = match.end() - match.start() == 3
        del buf[: match.end()]
        self._state = _CMD
        self._end_data(raw, bare_terminator)
        return True

    def _hold_data(self) -> None:
        """No terminator yet: keep the body in the buffer, or move it out when too big."""
        buf = self._buf
        cut = len(buf) - _TERM_TAIL  # these last bytes may begin the terminator
        self._scan = max(cut, 0)
        held = cut - self._body_start
        if held <= 0:
            return
        if self._drop is None and self._over_limit(self._raw_size + held):
            self._fail(_R_TOO_BIG)
        if self._drop is None and self._spool is None and held <= self.settings.spool_threshold:
            return
        chunk = _copy(buf, self._body_start, cut)
        del buf[:cut]
        self._body_start = self._scan = 0
        self._raw_size += len(chunk)
        if self._drop is None:
            self._spool_chunk(chunk)

    def _spool_chunk(self, raw: bytes) -> None:
        if self._body_scan is None:
            self._body_scan = _BodyScan()
        self._body_scan.feed(raw)
        data = _unstuff(raw, self._bol)
        if raw:
            self._bol = raw[-1] == 10
        self._spool_write(data)

    def _end_data(self, raw: bytes, bare_terminator: bool) -> None:
        size = self._raw_size + len(raw)
        self._log_data(size)
        if self._drop is None and self._over_limit(size):
            self._fail(_R_TOO_BIG)
        body: MessageBody | None = None
        if self._drop is None:
            # also when the whole body came in one read: where it lands must not
            # depend on how the input was split
            if self._spool is not None or len(raw) > self.settings.spool_threshold:
                self._spool_chunk(raw)
                body = self._finish_spool()
            else:
                self._body_scan = _BodyScan()
                self._body_scan.feed(raw)
                data = _unstuff(raw, True)
                body = MessageBody(data=data, size=len(data))
        if body is None or self._body_scan is None:
            self._refuse()
            return
        self._note_body_violations(self._body_scan, bare_terminator)
        self._deliver(body)

    def _finish_spool(self) -> MessageBody | None:
        spool = self._spool
        if spool is None:
            return None
        try:
            body = spool.finish()
        except OSError:
            self._fail(_R_LOCAL_ERROR)
            return None
        self._spool = None  # the MessageReceived's consumer owns the file now
        return body

    def _refuse(self) -> None:
        """End a transaction whose body was dropped, with the reply saying why."""
        reply = self._drop or _R_LOCAL_ERROR
        self._reset_transaction()
        self._send(reply)

    def _note_body_violations(self, scan: _BodyScan, bare_terminator: bool) -> None:
        if scan.bare_lf or bare_terminator:
            self._violation(V_BARE_LF_DATA)
        if scan.long_line:
            self._violation(V_LONG_DATA_LINE)
        if scan.eight_bit and self._env is not None:
            options = {option.upper() for option in self._env.mail_options}
            if options.isdisjoint(_EIGHT_BIT_OK):
                self._violation(V_EIGHT_BIT)

    def _read_bdat(self) -> bool:
        buf = self._buf
        left = self._bdat_left
        if left:
            take = min(left, len(buf))
            if not take:
                return False
            if self._bdat_keep:
                self._bdat_chunk(buf[:take])
            del buf[:take]
            self._bdat_left = left = left - take
            if left:
                return False
        self._state = _CMD
        self._end_bdat()
        return True

    def _bdat_chunk(self, chunk: bytearray) -> None:
        self._raw_size += len(chunk)
        if self._drop is not None:
            return
        if self._over_limit(self._raw_size):
            self._fail(_R_TOO_BIG)
        elif self._spool is not None:
            self._spool_write(bytes(chunk))
        else:
            self._bdat_buf += chunk
            if len(self._bdat_buf) > self.settings.spool_threshold:
                data = bytes(self._bdat_buf)
                self._bdat_buf = bytearray()
                self._spool_write(data)

    def _end_bdat(self) -> None:
        self._log_data(self._bdat_size)
        if not self._bdat_keep:
            self._send(_R_NEED_MAIL if self._env is None else _R_NEED_RCPT)
        elif not self._bdat_last:
            self._send(f"250 2.0.0 {self._bdat_size} bytes received\r\n".encode())
        elif self._drop is not None:
            self._refuse()
        elif self._spool is not None:
            body = self._finish_spool()
            if body is None:
                self._refuse()
            else:
                self._deliver(body)
        else:
            data = bytes(self._bdat_buf)
            self._deliver(MessageBody(data=data, size=len(data)))

    def _deliver(self, body: MessageBody) -> None:
        env = self._env or Envelope(helo=self.helo)  # never None: DATA/BDAT require MAIL
        self._env = None
        self._bdat_used = False
        self._reset_body()
        self._flush()
        self._events.append(
            MessageReceived(
                envelope=env,
                auth=self.auth,
                body=body,
                received_at=datetime.now(UTC),
                violations=self._violations,
                transcript=list(self._transcript) if self._transcript is not None else None,
                tls=self.tls_active,
            )
        )
        self._violations = []
        self._state = _WAIT_REPLY


_HANDLERS: dict[str, Callable[[SMTPConnection, str], None]] = {
    "EHLO": SMTPConnection._cmd_ehlo,
    "HELO": SMTPConnection._cmd_helo,
    "MAIL": SMTPConnection._cmd_mail,
    "RCPT": SMTPConnection._cmd_rcpt,
    "DATA": SMTPConnection._cmd_data,
    "BDAT": SMTPConnection._cmd_bdat,
    "RSET": SMTPConnection._cmd_rset,
    "NOOP": SMTPConnection._cmd_noop,
    "VRFY": SMTPConnection._cmd_vrfy,
    "HELP": SMTPConnection._cmd_help,
    "QUIT": SMTPConnection._cmd_quit,
    "AUTH": SMTPConnection._cmd_auth,
    "STARTTLS": SMTPConnection._cmd_starttls,
}

_AUTH_MECHANISMS: dict[str, Callable[[SMTPConnection, str], None]] = {
    "PLAIN": SMTPConnection._plain_start,
    "LOGIN": SMTPConnection._login_start,
    "CRAM-MD5": SMTPConnection._cram_start,
    "XOAUTH2": SMTPConnection._xoauth2_start,
}
