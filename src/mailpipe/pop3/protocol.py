"""The POP3 server protocol as a sans-I/O state machine: bytes in, events out.

RFC 1939 (USER/PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL), RFC 2449
(CAPA, response codes), RFC 2595 (STLS) and RFC 5034 (AUTH PLAIN). The driver
(pop3/server.py) moves bytes and answers the events that need I/O:

- `LoadMaildrop`: a client logged in; answer with `maildrop_loaded()` (the snapshot of the
  store the session works on: uuid and size of each message, oldest first);
- `FetchMessage`: RETR or TOP; answer with `message_loaded()` (the raw bytes, or None when
  the message left the store since the login);
- `Update`: QUIT after DELE; delete those uuids, answer with `update_done()`;
- `StartTLS`: upgrade the transport, then call `tls_started()`;
- `Delay`: wait before going on (after a failed login), `Send`, `Close`.

While one of those is pending, input is buffered, not read: pipelined commands
(RFC 2449 PIPELINING) are answered in order once it is answered.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from enum import IntEnum

from mailpipe.capture.protocol.auth import BadResponse, decode
from mailpipe.capture.protocol.lines import LineReader
from mailpipe.capture.types import Close, Send

# ---- events the driver acts on ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadMaildrop:
    """`username` logged in: call `maildrop_loaded()` with the store's messages."""

    username: str


@dataclass(frozen=True, slots=True)
class FetchMessage:
    """Call `message_loaded()` with the raw bytes of `uuid` (None if it is gone)."""

    uuid: str


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in the TRANSACTION state: delete `uuids` from the store, then `update_done()`."""

    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The +OK for STLS was sent before this: upgrade the transport, then `tls_started()`."""


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait this many seconds before the next event (a failed login costs the client time)."""

    seconds: float


Event = Send | Close | LoadMaildrop | FetchMessage | Update | StartTLS | Delay


# ---- settings and states ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class POP3Settings:
    hostname: str
    # username to password; None lets any login in (pop3.auth: any)
    users: dict[str, str] | None
    tls_available: bool = False  # STLS offered (TLS configured, not implicit)
    max_line_length: int = 1024
    auth_failure_delay: float = 1.0
    max_auth_failures: int = 3  # then the connection is closed
    max_errors: int = 20  # -ERR answers in a row (garbage) before the connection is closed


class State(IntEnum):
    AUTHORIZATION = 0
    TRANSACTION = 1
    UPDATE = 2


class Mode(IntEnum):
    COMMAND = 0
    SASL = 1  # the next line answers AUTH PLAIN's "+ " challenge
    WAIT = 2  # an event needing I/O is pending: input is buffered
    WAIT_TLS = 3  # the TLS handshake is under way: input is discarded
    CLOSED = 4


_AUTH, _TRANS = frozenset({State.AUTHORIZATION}), frozenset({State.TRANSACTION})
# The states each verb is legal in; a verb missing here is unknown.
COMMANDS: dict[str, frozenset[State]] = {
    "CAPA": _AUTH | _TRANS,
    "QUIT": _AUTH | _TRANS,
    "USER": _AUTH,
    "PASS": _AUTH,
    "APOP": _AUTH,
    "AUTH": _AUTH,
    "STLS": _AUTH,
    "STAT": _TRANS,
    "LIST": _TRANS,
    "UIDL": _TRANS,
    "RETR": _TRANS,
    "TOP": _TRANS,
    "DELE": _TRANS,
    "RSET": _TRANS,
    "NOOP": _TRANS,
}

# ---- replies -----------------------------------------------------------------------------

CRLF = b"\r\n"
END = b".\r\n"
OK = b"+OK\r\n"
BYE = b"+OK mailpipe POP3 server signing off\r\n"
SEND_PASS = b"+OK send PASS\r\n"
TLS_GO = b"+OK begin TLS negotiation\r\n"
CONTINUE = b"+ \r\n"
UNKNOWN = b"-ERR unknown command\r\n"
WRONG_STATE = b"-ERR command not valid in this state\r\n"
LINE_TOO_LONG = b"-ERR line too long\r\n"
NO_SUCH_MESSAGE = b"-ERR no such message\r\n"
ALREADY_DELETED = b"-ERR message already deleted\r\n"
GONE = b"-ERR message is no longer in the store\r\n"
SYNTAX = b"-ERR syntax error\r\n"
USER_FIRST = b"-ERR USER first\r\n"
BAD_LOGIN = b"-ERR [AUTH] invalid username or password\r\n"
TOO_MANY_FAILURES = b"-ERR [AUTH] too many failed logins, closing\r\n"
TOO_MANY_ERRORS = b"-ERR too many errors, closing\r\n"
NO_TLS = b"-ERR STLS not available\r\n"
TLS_ACTIVE = b"-ERR TLS already active\r\n"
AUTH_UNKNOWN = b"-ERR unsupported SASL mechanism\r\n"
AUTH_CANCELLED = b"-ERR authentication cancelled\r\n"
AUTH_MECHANISMS = b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
STORE_FAILED = b"-ERR [SYS/TEMP] the store failed, try again\r\n"
UPDATE_FAILED = b"-ERR [SYS/TEMP] some deleted messages were not removed\r\n"


# ---- messages as POP3 sends them ------------------------------------------------------------


def message_lines(raw: bytes) -> list[bytes]:
    """The message's lines without their ends: a line ends at LF, a CR before it goes with
    it (stored mail may hold bare LFs; POP3 sends every line with CRLF)."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the raw message ended with its line end (or was empty)
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def pop3_size(raw: bytes) -> int:
    """The size LIST and STAT give: the octets of the message with CRLF line ends, before
    dot-stuffing (RFC 1939 section 11). store.sqlite's MAILDROP computes the same in SQL."""
    return sum(len(line) + 2 for line in message_lines(raw))


def top_lines(lines: list[bytes], body_lines: int) -> list[bytes]:
    """The header, the blank line after it and the body's first `body_lines` lines (TOP)."""
    try:
        blank = lines.index(b"")
    except ValueError:
        return lines  # no body: all of it is header
    return lines[: blank + 1 + body_lines]


def multiline(first: bytes, lines: list[bytes]) -> bytes:
    """A multi-line response: the status line, the lines dot-stuffed, the ".".
    `first` ends with its CRLF."""
    out = [first]
    for line in lines:
        out.append(b"." + line + CRLF if line.startswith(b".") else line + CRLF)
    out.append(END)
    return b"".join(out)


# ---- the session ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """What a FetchMessage is for: RETR (lines None) or TOP."""

    lines: int | None


@dataclass(slots=True)
class _Maildrop:
    uuids: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)  # 0-based indexes marked by DELE


class POP3Session:
    """One POP3 connection's conversation. `greeting()` first, then `receive_data()` with
    what arrives; every method returns the events to act on, in order."""

    def __init__(self, settings: POP3Settings, *, tls_active: bool = False) -> None:
        self.settings = settings
        self.tls_active = tls_active
        self.state = State.AUTHORIZATION
        self.mode = Mode.COMMAND
        self.username: str | None = None  # given by USER, or logged in
        self.auth_failures = 0
        self.errors = 0  # -ERR answers in a row
        self._buf = bytearray()
        self._lines = LineReader(settings.max_line_length)
        self._drop = _Maildrop()
        self._pending: _Pending | None = None
        # RFC 1939 section 7: APOP's digest is over this, unique per greeting.
        self.timestamp = f"<{secrets.token_hex(8)}@{settings.hostname}>"

    # ---- the driver's calls ------------------------------------------------------------

    def greeting(self) -> list[Event]:
        return [Send(f"+OK mailpipe POP3 server ready {self.timestamp}\r\n".encode())]

    def receive_data(self, data: bytes) -> list[Event]:
        if self.mode >= Mode.WAIT_TLS:
            return []  # clear text after STLS, or after the end: never read as commands
        self._buf += data
        return self._process()

    @property
    def partial_line(self) -> bool:
        """Bytes of a line not yet complete are buffered (for the driver's read timeout)."""
        return bool(self._buf)

    def maildrop_loaded(self, messages: list[tuple[str, int]] | None) -> list[Event]:
        """The store's messages (uuid, size) oldest first, or None when it could not be read."""
        if messages is None:
            self.username = None
            return self._resume([Send(STORE_FAILED)])
        self._drop = _Maildrop([m[0] for m in messages], [m[1] for m in messages])
        self.state = State.TRANSACTION
        count, octets = self._totals()
        return self._resume([Send(f"+OK maildrop has {count} messages ({octets} octets)"
                                  "\r\n".encode())])

    def message_loaded(self, raw: bytes | None) -> list[Event]:
        pending, self._pending = self._pending, None
        assert pending is not None, "message_loaded() without a FetchMessage"
        if raw is None:
            return self._resume([Send(GONE)])
        lines = message_lines(raw)
        if pending.lines is None:
            first = f"+OK {sum(len(line) + 2 for line in lines)} octets\r\n".encode()
        else:
            lines, first = top_lines(lines, pending.lines), OK
        return self._resume([Send(multiline(first, lines))])

    def update_done(self, ok: bool) -> list[Event]:
        self.mode = Mode.CLOSED
        return [Send(BYE if ok else UPDATE_FAILED), Close()]

    def store_failed(self) -> list[Event]:
        """A pending FetchMessage could not be answered: the store failed."""
        self._pending = None
        return self._resume([Send(STORE_FAILED)])

    def tls_started(self) -> list[Event]:
        self.tls_active = True
        self.mode = Mode.COMMAND
        self.username = None  # RFC 2595: what came before the handshake is forgotten
        return self._process()

    # ---- input -------------------------------------------------------------------------

    def _resume(self, events: list[Event]) -> list[Event]:
        self.mode = Mode.COMMAND
        return events + self._process()

    def _process(self) -> list[Event]:
        """Answer the complete lines buffered, until one needs the driver."""
        events: list[Event] = []
        while self.mode <= Mode.SASL:
            line = self._lines.take(self._buf, self.mode == Mode.SASL)
            if line is None:
                if not self._lines.overlong:
                    break
                self._lines.overlong = False
                self.mode = Mode.COMMAND
                answer: list[Event] = [Send(LINE_TOO_LONG)]
            elif self.mode == Mode.SASL:
                answer = self._sasl_response(line)
            else:
                answer = self._command(line)
            events.extend(self._count_errors(answer))
        return events

    def _count_errors(self, events: list[Event]) -> list[Event]:
        """Close a connection that gets nothing but errors (garbage, a scanner)."""
        sent = [e for e in events if isinstance(e, Send)]
        if not sent or not sent[-1].data.startswith(b"-ERR"):
            self.errors = 0
            return events
        self.errors += 1
        if self.errors >= self.settings.max_errors and self.mode != Mode.CLOSED:
            return events + self._close(TOO_MANY_ERRORS)
        return events

    def _close(self, reply: bytes) -> list[Event]:
        self.mode = Mode.CLOSED
        self._buf.clear()
        return [Send(reply), Close()]

    def _command(self, line: str) -> list[Event]:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        states = COMMANDS.get(verb)
        if states is None:
            return [Send(UNKNOWN)]
        if self.state not in states:
            return [Send(WRONG_STATE)]
        handler = getattr(self, f"_do_{verb.lower()}")
        return handler(arg)  # type: ignore[no-any-return]

    # ---- AUTHORIZATION -------------------------------------------------------------------

    def _do_capa(self, arg: str) -> list[Event]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.state == State.AUTHORIZATION:
            caps += [b"USER", b"SASL PLAIN"]
            if self.settings.tls_available and not self.tls_active:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION mailpipe")
        return [Send(multiline(b"+OK capability list follows\r\n", caps))]

    def _do_quit(self, arg: str) -> list[Event]:
        if self.state == State.AUTHORIZATION:
            return self._close(BYE)
        self.state = State.UPDATE
        deleted = tuple(self._drop.uuids[i] for i in sorted(self._drop.deleted))
        if not deleted:
            return self.update_done(True)
        self.mode = Mode.WAIT
        return [Update(deleted)]

    def _do_user(self, arg: str) -> list[Event]:
        if not arg.strip():
            return [Send(SYNTAX)]
        self.username = arg.strip()
        return [Send(SEND_PASS)]

    def _do_pass(self, arg: str) -> list[Event]:
        if self.username is None:
            return [Send(USER_FIRST)]
        # RFC 1939 allows spaces in a password: the whole rest of the line is it.
        return self._login(self.username, self._password_ok(self.username, arg))

    def _do_apop(self, arg: str) -> list[Event]:
        name, _, digest = arg.strip().rpartition(" ")
        if not name or len(digest) != 32:
            return [Send(SYNTAX)]
        users = self.settings.users
        password = None if users is None else users.get(name)
        if users is None:
            ok = True
        elif password is None:
            ok = False
        else:
            expected = hashlib.md5((self.timestamp + password).encode()).hexdigest()
            ok = hmac.compare_digest(expected, digest.lower())
        return self._login(name, ok)

    def _do_auth(self, arg: str) -> list[Event]:
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            return [Send(AUTH_MECHANISMS)]
        if mechanism.upper() != "PLAIN":
            return [Send(AUTH_UNKNOWN)]
        if initial:
            return self._sasl_response(initial)
        self.mode = Mode.SASL
        return [Send(CONTINUE)]

    def _sasl_response(self, line: str) -> list[Event]:
        self.mode = Mode.COMMAND
        if line.strip() == "*":
            return [Send(AUTH_CANCELLED)]
        try:
            _authzid, username, password = decode(line).split("\0")
        except (BadResponse, ValueError):
            return self._login("", False)
        return self._login(username, self._password_ok(username, password))

    def _do_stls(self, arg: str) -> list[Event]:
        if self.tls_active:
            return [Send(TLS_ACTIVE)]
        if not self.settings.tls_available:
            return [Send(NO_TLS)]
        self.mode = Mode.WAIT_TLS
        self._buf.clear()  # clear text pipelined after STLS must not count as encrypted
        return [Send(TLS_GO), StartTLS()]

    def _password_ok(self, username: str, password: str) -> bool:
        users = self.settings.users
        if users is None:
            return True
        expected = users.get(username)
        # Compared even for an unknown user, so that timing does not tell which names exist.
        given, wanted = password.encode(), (expected or secrets.token_hex(16)).encode()
        return hmac.compare_digest(given, wanted) and expected is not None

    def _login(self, username: str, ok: bool) -> list[Event]:
        if ok:
            self.username = username
            self.mode = Mode.WAIT
            return [LoadMaildrop(username)]
        self.username = None
        self.auth_failures += 1
        delay: list[Event] = [Delay(self.settings.auth_failure_delay)]
        if self.auth_failures >= self.settings.max_auth_failures:
            return delay + self._close(TOO_MANY_FAILURES)
        return [*delay, Send(BAD_LOGIN)]

    # ---- TRANSACTION -------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        live = [s for i, s in enumerate(self._drop.sizes) if i not in self._drop.deleted]
        return len(live), sum(live)

    def _message(self, arg: str) -> int | bytes:
        """The 0-based index `arg` names, or the reply refusing it."""
        text = arg.strip()
        if not text.isdigit() or not text.isascii():
            return SYNTAX
        number = int(text)
        if not 1 <= number <= len(self._drop.uuids):
            return NO_SUCH_MESSAGE
        if number - 1 in self._drop.deleted:
            return ALREADY_DELETED
        return number - 1

    def _listing(self, arg: str, value: list[str]) -> list[Event]:
        """LIST and UIDL: one message's line, or all of them (not deleted)."""
        if arg.strip():
            index = self._message(arg)
            if isinstance(index, bytes):
                return [Send(index)]
            return [Send(f"+OK {index + 1} {value[index]}\r\n".encode())]
        lines = [f"{i + 1} {v}".encode() for i, v in enumerate(value)
                 if i not in self._drop.deleted]
        return [Send(multiline(b"+OK\r\n", lines))]

    def _do_stat(self, arg: str) -> list[Event]:
        count, octets = self._totals()
        return [Send(f"+OK {count} {octets}\r\n".encode())]

    def _do_list(self, arg: str) -> list[Event]:
        return self._listing(arg, [str(size) for size in self._drop.sizes])

    def _do_uidl(self, arg: str) -> list[Event]:
        return self._listing(arg, self._drop.uuids)

    def _do_retr(self, arg: str) -> list[Event]:
        return self._fetch(arg, None)

    def _do_top(self, arg: str) -> list[Event]:
        message, _, count = arg.strip().partition(" ")
        if not count.isdigit() or not count.isascii():
            return [Send(SYNTAX)]
        return self._fetch(message, int(count))

    def _fetch(self, arg: str, lines: int | None) -> list[Event]:
        index = self._message(arg)
        if isinstance(index, bytes):
            return [Send(index)]
        self._pending = _Pending(lines)
        self.mode = Mode.WAIT
        return [FetchMessage(self._drop.uuids[index])]

    def _do_dele(self, arg: str) -> list[Event]:
        index = self._message(arg)
        if isinstance(index, bytes):
            return [Send(index)]
        self._drop.deleted.add(index)
        return [Send(f"+OK message {index + 1} deleted\r\n".encode())]

    def _do_rset(self, arg: str) -> list[Event]:
        self._drop.deleted.clear()
        count, octets = self._totals()
        return [Send(f"+OK maildrop has {count} messages ({octets} octets)\r\n".encode())]

    def _do_noop(self, arg: str) -> list[Event]:
        return [Send(OK)]
