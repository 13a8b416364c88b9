"""SpamAssassin's SPAMC/SPAMD protocol (spamd/PROTOCOL in SpamAssassin's sources), sans I/O:
the request's bytes, a reply parser fed whatever the socket gives, and the REPORT body's
table of rules. The socket side is checks/spam.py.

A request is a command line, headers and the message; the reply a status line, headers
(`Spam: True ; 15.3 / 5.0`) and a body (for REPORT the human-readable report, whose
"Content analysis details" table lists each rule that fired). spamd closes the connection
once it has answered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PROTOCOL_VERSION = "1.5"
# A REPORT reply is a few KB (the report quotes a short preview of the email, not the email):
# anything past this is not spamd talking.
MAX_REPLY = 1024 * 1024
MAX_HEADER_LINE = 8192
MAX_HEADERS = 50

_STATUS = re.compile(r"SPAMD/(\d+\.\d+) +(\d+) *(.*)")
_HEADER = re.compile(r"([A-Za-z0-9-]+) *: *(.*)")
_SPAM = re.compile(
    r"(true|false|yes|no) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.IGNORECASE
)
# The report's rule table: a line of dashes under " pts rule name  description", then per
# rule "%4s %-22s %s" (score, name, area and description), a long description or a rule's
# details ("[URIs: example.com]") continued on lines indented by 27 or more spaces.
_TABLE_RULE = re.compile(r"-{3,} +-{3,} +-{3,}")
_RULE = re.compile(r" {0,3}(-?\d+(?:\.\d+)?) +([A-Za-z0-9_.:-]+)(?: +(.*))?")
_CONTINUED = re.compile(r" {4,}(\S.*)")
# sysexits.h, as spamd answers them (EX_OK is 0).
_EXIT_NAMES = {
    64: "EX_USAGE", 65: "EX_DATAERR", 66: "EX_NOINPUT", 67: "EX_NOUSER", 68: "EX_NOHOST",
    69: "EX_UNAVAILABLE", 70: "EX_SOFTWARE", 71: "EX_OSERR", 72: "EX_OSFILE",
    73: "EX_CANTCREAT", 74: "EX_IOERR", 75: "EX_TEMPFAIL", 76: "EX_PROTOCOL",
    77: "EX_NOPERM", 78: "EX_CONFIG", 98: "EX_TOOBIG",
}


class SpamdProtocolError(Exception):
    """What came back is not a spamd reply (or not a whole one)."""


class SpamdRefused(Exception):
    """spamd answered with a non-zero status: it did not check the message."""


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    score: float
    description: str


@dataclass(frozen=True, slots=True)
class Reply:
    version: str
    code: int
    message: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def verdict(self) -> tuple[bool, float, float]:
        """(is spam, score, threshold) from the `Spam:` header."""
        value = self.headers.get("spam")
        if value is None:
            raise SpamdProtocolError("the reply has no Spam header")
        match = _SPAM.fullmatch(value.strip())
        if match is None:
            raise SpamdProtocolError(f"the Spam header is not 'True ; score / threshold': "
                                     f"{_shown(value)}")
        flag, score, threshold = match.groups()
        return flag.lower() in ("true", "yes"), float(score), float(threshold)


def request(command: str, message: bytes = b"") -> bytes:
    """A request's bytes: `command` (REPORT, SYMBOLS, CHECK, PING...) for `message`."""
    head = f"{command} SPAMC/{PROTOCOL_VERSION}\r\n"
    if command != "PING":
        head += f"Content-length: {len(message)}\r\n"
    return head.encode("ascii") + b"\r\n" + message


class ReplyParser:
    """Fed the bytes of one reply as they arrive: `feed` returns the Reply once it is whole,
    `eof` when the connection ended. Raises SpamdProtocolError for anything else and
    SpamdRefused for a non-zero status."""

    def __init__(self, max_size: int = MAX_REPLY) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._head: tuple[str, int, str, dict[str, str]] | None = None
        self._length: int | None = None

    def feed(self, data: bytes) -> Reply | None:
        self._buffer += data
        if len(self._buffer) > self.max_size:
            raise SpamdProtocolError(f"the reply is larger than {self.max_size} bytes")
        if self._head is None and not self._read_head():
            return None
        if self._length is not None and len(self._buffer) >= self._length:
            return self._reply(bytes(self._buffer[: self._length]))
        return None

    def eof(self) -> Reply:
        """The connection ended: the reply if it is whole (one without Content-length ends
        with the connection)."""
        if self._head is None:
            if not self._buffer:
                raise SpamdProtocolError("spamd closed the connection without answering")
            # A status line on its own (errors and PONG end there), or a cut header block.
            if not self._read_head(at_eof=True):
                raise SpamdProtocolError("the reply ended inside its headers")
        if self._length is not None and len(self._buffer) < self._length:
            raise SpamdProtocolError(f"the reply ended after {len(self._buffer)} of its "
                                     f"{self._length} bytes")
        return self._reply(bytes(self._buffer))

    def _read_head(self, at_eof: bool = False) -> bool:
        end, skip = _head_end(self._buffer)
        if end < 0:
            if len(self._buffer) > MAX_HEADER_LINE * MAX_HEADERS:
                raise SpamdProtocolError("the reply's headers do not end")
            if not at_eof:
                self._check_status_line()
                return False
            end, skip = len(self._buffer), 0
        lines = bytes(self._buffer[:end]).split(b"\n")
        del self._buffer[: end + skip]
        version, code, message = _status(lines[0])
        headers = _headers(lines[1:])
        if code != 0:
            name = _EXIT_NAMES.get(code, "")
            raise SpamdRefused(f"{code} {message or name}".strip())
        self._head = (version, code, message, headers)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit() or len(length.strip()) > 12:
                raise SpamdProtocolError(f"bad Content-length {_shown(length)}")
            self._length = int(length)
            if self._length > self.max_size:
                raise SpamdProtocolError(f"the reply announces {self._length} bytes, more "
                                         f"than {self.max_size}")
        return True

    def _check_status_line(self) -> None:
        """Garbage is refused as soon as its first line is in, not after max_size bytes."""
        first, newline, _ = bytes(self._buffer).partition(b"\n")
        if newline:
            _status(first)
        elif len(first) > MAX_HEADER_LINE:
            raise SpamdProtocolError("the reply's first line is too long")

    def _reply(self, body: bytes) -> Reply:
        assert self._head is not None
        version, code, message, headers = self._head
        return Reply(version, code, message, headers, body)


def _head_end(buffer: bytearray) -> tuple[int, int]:
    """Where the header block ends and how long its blank line is (-1 when not yet in)."""
    found = [(buffer.find(sep), len(sep)) for sep in (b"\r\n\r\n", b"\n\n")]
    found = [(at, size) for at, size in found if at >= 0]
    return min(found) if found else (-1, 0)


def _status(line: bytes) -> tuple[str, int, str]:
    text = _text(line).rstrip("\r")
    match = _STATUS.fullmatch(text)
    if match is None or len(match.group(2)) > 3:
        raise SpamdProtocolError(f"not a spamd status line: {_shown(text)}")
    return match.group(1), int(match.group(2)), match.group(3).strip()


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    lines = [line for line in lines if line.strip()]
    if len(lines) > MAX_HEADERS:
        raise SpamdProtocolError(f"more than {MAX_HEADERS} headers in the reply")
    for line in lines:
        text = _text(line).rstrip("\r")
        match = _HEADER.fullmatch(text)
        if match is None or len(text) > MAX_HEADER_LINE:
            raise SpamdProtocolError(f"not a header line: {_shown(text)}")
        headers[match.group(1).lower()] = match.group(2).strip()
    return headers


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


def _shown(text: str, limit: int = 80) -> str:
    """Text from the peer, quoted and cut for an error message."""
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


@dataclass(slots=True)
class _Building:
    name: str
    score: float
    parts: list[str] = field(default_factory=list)

    def rule(self) -> Rule:
        return Rule(self.name, self.score, " ".join(part for part in self.parts if part))


def report_rules(body: bytes) -> list[Rule]:
    """The rules of a REPORT body's table, in its order; [] when it has no table (a site's
    own report template may leave it out)."""
    rules: list[Rule] = []
    current: _Building | None = None
    in_table = False
    for line in _text(body).replace("\r\n", "\n").split("\n"):
        if not in_table:
            in_table = bool(_TABLE_RULE.fullmatch(line.strip()))
            continue
        if not line.strip():
            break  # the table ends with the report's blank line
        continued = _CONTINUED.fullmatch(line.rstrip())
        if continued and current is not None:
            current.parts.append(continued.group(1))
            continue
        match = _RULE.fullmatch(line.rstrip())
        if match is None:
            break  # not the table any more
        if current is not None:
            rules.append(current.rule())
        current = _Building(match.group(2), float(match.group(1)), [match.group(3) or ""])
    if current is not None:
        rules.append(current.rule())
    return rules
