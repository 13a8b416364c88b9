"""Plain data shared by the SMTP protocol core, the transport and the event builder.

Nothing here does I/O: these are the values the sans-I/O core hands to whoever drives it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum


@dataclass(slots=True)
class Envelope:
    """One mail transaction's envelope, as the client gave it."""

    mail_from: str = ""
    mail_options: list[str] = field(default_factory=list)
    rcpt_to: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)
    helo: str = ""


@dataclass(slots=True)
class AuthInfo:
    """Credentials captured from AUTH; never verified."""

    attempted: bool = False
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None

    def as_event(self) -> dict[str, object]:
        return {
            "attempted": self.attempted,
            "mechanism": self.mechanism,
            "username": self.username,
            "password": self.password,
        }


@dataclass(slots=True)
class MessageBody:
    """The message as received (dot-unstuffed), in memory or spooled to a temp file.

    A spooled body is owned by whoever receives the MessageReceived event: it must call
    `discard()` once done with it.
    """

    data: bytes | None = None
    path: str | None = None
    size: int = 0

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            return b""
        with open(self.path, "rb") as fh:
            return fh.read()

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply; `text` may hold several lines separated by newlines."""

    code: int
    text: str

    def encode(self) -> bytes:
        if "\n" not in self.text:  # one line, as the reply to every email is
            return f"{self.code} {self.text}\r\n".encode("utf-8", "surrogateescape")
        lines = self.text.split("\n")
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")


# ---- verdicts --------------------------------------------------------------------------


class Stage(IntEnum):
    """A point of the session where the driver may be asked for a verdict before the core
    answers. MESSAGE is always held (the sinks' verdict); the others only when asked for."""

    CONNECT = 0  # before the greeting
    HELO = 1  # HELO or EHLO, before its 250
    AUTH = 2  # credentials captured, before the 235
    STARTTLS = 3  # before the 220 that starts the handshake
    MAIL = 4
    RCPT = 5
    DATA = 6  # DATA, or the first BDAT of a transaction, before the body is read
    HEADERS = 7  # the blank line ending the header block has arrived
    MESSAGE = 8  # the whole message has arrived


@dataclass(frozen=True, slots=True)
class Proceed:
    """Go on as if nobody had been asked: the default reply."""


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer with this reply instead (4xx/5xx; any code at the end of a message)."""

    code: int
    enhanced: str
    text: str

    def reply(self) -> Reply:
        return Reply(self.code, f"{self.enhanced} {self.text}" if self.enhanced else self.text)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Answer 421 and close the connection."""

    text: str = "Service not available, closing transmission channel"
    enhanced: str = "4.7.0"

    def reply(self) -> Reply:
        return Reply(421, f"{self.enhanced} {self.text}")


Verdict = Proceed | Respond | Disconnect
PROCEED = Proceed()


@dataclass(slots=True)
class Changes:
    """What verdict givers (plugins' MODIFY) asked to change in a message before the sinks
    get it: headers to add or set, recipients rewritten (one, or the whole list), tags."""

    add_headers: list[tuple[str, str]] = field(default_factory=list)
    set_headers: list[tuple[str, str]] = field(default_factory=list)
    recipients: dict[str, list[str]] = field(default_factory=dict)
    rcpt_to: list[str] | None = None
    tags: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.add_headers or self.set_headers or self.recipients
                    or self.rcpt_to is not None or self.tags)

    def then(self, later: Changes) -> Changes:
        """These changes followed by `later`'s (the session's, then the transaction's)."""
        return Changes(
            self.add_headers + later.add_headers,
            self.set_headers + later.set_headers,
            {**self.recipients, **later.recipients},
            later.rcpt_to if later.rcpt_to is not None else self.rcpt_to,
            self.tags + [t for t in later.tags if t not in self.tags],
        )

    def recipients_for(self, rcpt_to: list[str]) -> list[str]:
        if self.rcpt_to is not None:
            return list(self.rcpt_to)
        out: list[str] = []
        for rcpt in rcpt_to:
            out.extend(self.recipients.get(rcpt, [rcpt]))
        return out


# ---- events the protocol core emits ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Part of a body too big to keep in memory (dot-unstuffed): the driver stores it (see
    `capture.spool`); the MessageReceived that follows says the body continues there."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyDropped:
    """The body whose chunks were handed out will never complete: throw them away."""


@dataclass(frozen=True, slots=True)
class VerdictNeeded:
    """The core waits (buffering pipelined input) at `stage` until the driver calls
    `SMTPConnection.verdict()`. `args` are the stage's own: hostname, mechanism and username,
    sender or recipient and params, headers (bytes)."""

    stage: Stage
    args: dict[str, object]
    envelope: Envelope | None


@dataclass(slots=True)
class MessageReceived:
    """A complete message: the verdict of the MESSAGE stage. The core waits (buffering any
    pipelined input) until the driver calls `SMTPConnection.verdict()` with the sinks' answer.
    With `chunked`, the body came first as BodyChunk events and `body` holds nothing."""

    envelope: Envelope
    auth: AuthInfo
    body: MessageBody
    received_at: datetime
    violations: list[str]
    transcript: list[str] | None
    tls: bool
    chunked: bool = False


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 for STARTTLS has been queued in a Send before this; upgrade the transport now,
    then call `SMTPConnection.tls_started()`."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once the Sends before this are written."""


@dataclass(frozen=True, slots=True)
class Violation:
    """A protocol violation tolerated for the client's sake; log it at WARN."""

    text: str


@dataclass(frozen=True, slots=True)
class Trace:
    """A command or reply line for DEBUG logs; AUTH secrets are masked here."""

    direction: str  # "C" or "S"
    line: str


Event = (
    Send | MessageReceived | StartTLS | Close | Violation | Trace | BodyChunk | BodyDropped
    | VerdictNeeded
)
