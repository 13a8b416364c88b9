"""Plain data shared by the SMTP protocol core, the transport and the event builder.

Nothing here does I/O: these are the values the sans-I/O core hands to whoever drives it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import datetime


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
        lines = self.text.split("\n") or [""]
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")


# ---- events the protocol core emits ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client, in order."""

    data: bytes


@dataclass(slots=True)
class MessageReceived:
    """A complete message. The core waits (buffering any pipelined input) until the driver
    calls `SMTPConnection.reply_to_message()` with the verdict of the sinks."""

    envelope: Envelope
    auth: AuthInfo
    body: MessageBody
    received_at: datetime
    violations: list[str]
    transcript: list[str] | None
    tls: bool


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


Event = Send | MessageReceived | StartTLS | Close | Violation | Trace
