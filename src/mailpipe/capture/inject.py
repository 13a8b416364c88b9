"""Injecting a message as if a client had sent it over SMTP (the send API's way in).

An in-process client drives a real `SMTPSession` through an in-memory transport: EHLO,
MAIL, RCPT, DATA, QUIT, as an SMTP client would send them. So the message meets everything
a socket's message meets, with nothing duplicated here: the plugins at every stage (their
verdicts and MODIFY changes), the limits, the event builder, the sinks (store, workers,
jobs) and their refusals, the metrics (under the listener name "api") and the transcript.
Whatever the session answers, the caller gets: a refusal at any stage is a refusal, and
only a 2xx to the end of data is an accepted message.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace

from mailpipe.capture.server import (
    CaptureServer,
    Listener,
    ListenerMetrics,
    SMTPSession,
    protocol_settings,
)
from mailpipe.capture.types import Changes, Envelope
from mailpipe.config import ListenerLimits, ResolvedListener
from mailpipe.event import CapturedEmail

# The listener name injected messages carry (the event's session.server, metrics' labels).
API_SERVER = "api"
# What the caller hears when the session ended without answering (it closed, or broke).
_NO_REPLY = (451, "4.3.0 The capture session ended without a reply")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Injection:
    """A message to inject: its bytes, its envelope, the tags its event gets, and the
    addresses of the HTTP client and server (the session's remote_addr and local_addr)."""

    raw: bytes
    mail_from: str
    rcpt_to: list[str]
    tags: list[str] = field(default_factory=list)
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None


@dataclass(frozen=True)
class Outcome:
    """What the session answered: `stage` is where it ended (connect, helo, mail, rcpt,
    data, or message for the reply to the end of data); `uuid` is the stored event's when
    the message was accepted."""

    code: int
    text: str
    stage: str
    recipient: str | None = None
    uuid: str | None = None

    @property
    def accepted(self) -> bool:
        return self.stage == "message" and 200 <= self.code < 300


class Injector:
    """Injects messages into one CaptureServer as the listener "api", which takes the
    `smtp` section's limits (max_message_size, max_recipients, max_connections...)."""

    def __init__(self, server: CaptureServer, limits: ListenerLimits, *, transcript: bool,
                 spool_threshold: int) -> None:
        self.server = server
        values = {key: getattr(limits, key) for key in ListenerLimits.model_fields}
        values["tls"] = None  # nothing to encrypt in memory
        config = ResolvedListener(name=API_SERVER, addr=API_SERVER, **values)
        settings = protocol_settings(config, spool_threshold=spool_threshold,
                                     transcript=transcript, tls_available=False)
        self.listener = Listener(config=config, settings=settings, ssl_context=None,
                                 metrics=ListenerMetrics(server.metrics, API_SERVER))

    @property
    def max_message_size(self) -> int:
        return self.listener.config.max_message_size

    @property
    def max_recipients(self) -> int:
        return self.listener.config.max_recipients

    async def inject(self, message: Injection) -> Outcome:
        """Send `message` (its raw made CRLF first: see crlf_lines) through a session; the
        reply that ended it."""
        message = replace(message, raw=crlf_lines(message.raw))
        replies = asyncio.StreamReader()
        session = _ApiSession(self.server, self.listener, message.tags)
        transport = _MemoryTransport(replies, session, message.peer, message.local)
        session.connection_made(transport)
        try:
            return await _Client(session, replies).send(message)
        finally:
            transport.close()


class _ApiSession(SMTPSession):
    """A session whose message carries the caller's tags (as a plugin's MODIFY would give
    them, so plugins' own tags add to them) and which remembers the uuid it accepted."""

    def __init__(self, server: CaptureServer, listener: Listener, tags: list[str]) -> None:
        super().__init__(server, listener)
        self.accepted_uuid: str | None = None
        if tags:
            self._session_changes = Changes(tags=list(tags))

    def _count_accepted(self, email: CapturedEmail, envelope: Envelope) -> None:
        self.accepted_uuid = email.uuid
        super()._count_accepted(email, envelope)


class _MemoryTransport(asyncio.Transport):
    """The session's socket: what it writes goes to the client's reply stream."""

    def __init__(self, replies: asyncio.StreamReader, protocol: asyncio.Protocol,
                 peer: tuple[str, int] | None, local: tuple[str, int] | None) -> None:
        super().__init__({"peername": peer or ("api", 0), "sockname": local or ("api", 0)})
        self._replies = replies
        self._protocol = protocol
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closed:
            self._replies.feed_data(bytes(data))

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._replies.feed_eof()
        # As asyncio's transports do: the protocol hears of it on the next loop pass.
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass  # the client sends a command only after the previous reply

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closed

    def get_write_buffer_size(self) -> int:
        return 0


class _Client:
    """The SMTP client side of one injection: one command, one reply, no pipelining, so
    each refusal is known by the command it answered."""

    def __init__(self, session: _ApiSession, replies: asyncio.StreamReader) -> None:
        self.session = session
        self.replies = replies

    async def send(self, message: Injection) -> Outcome:
        code, text = await self._reply()
        if code != 220:
            return Outcome(code, text, "connect")
        peer = message.peer[0] if message.peer else "127.0.0.1"
        code, text = await self._command(f"EHLO {_address_literal(peer)}")
        if code != 250:
            return Outcome(code, text, "helo")
        code, text = await self._command(_mail_command(message))
        if code != 250:
            return Outcome(code, text, "mail")
        for rcpt in message.rcpt_to:
            code, text = await self._command(f"RCPT TO:<{rcpt}>")
            if not 200 <= code < 300:
                # All or nothing: an API call that half-delivers would surprise its caller.
                return Outcome(code, text, "rcpt", recipient=rcpt)
        code, text = await self._command("DATA")
        if code != 354:
            return Outcome(code, text, "data")
        code, text = await self._write(_LEADING_DOT.sub(b"..", message.raw) + b".\r\n")
        outcome = Outcome(code, text, "message", uuid=self.session.accepted_uuid)
        if not self.session.conn.closed:
            await self._command("QUIT")
        return outcome

    async def _command(self, line: str) -> tuple[int, str]:
        return await self._write(line.encode() + b"\r\n")

    async def _write(self, data: bytes) -> tuple[int, str]:
        if not self.session.conn.closed:  # closed: what it said last (a 421) is still to read
            self.session.data_received(data)
        return await self._reply()

    async def _reply(self) -> tuple[int, str]:
        """One reply, its lines joined by newlines without their codes (as smtplib does)."""
        lines: list[str] = []
        while True:
            try:
                line = await self.replies.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return _NO_REPLY
            lines.append(line[4:-2].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)


def _mail_command(message: Injection) -> str:
    params = [f"SIZE={len(message.raw)}"]
    if any(byte > 127 for byte in message.raw):
        params.append("BODY=8BITMIME")
    if not all(address.isascii() for address in (message.mail_from, *message.rcpt_to)):
        params.append("SMTPUTF8")
    return f"MAIL FROM:<{message.mail_from}> {' '.join(params)}"


def _address_literal(host: str) -> str:
    """EHLO's argument: the HTTP client's address as an RFC 5321 address literal."""
    return f"[IPv6:{host}]" if ":" in host else f"[{host}]"


def crlf_lines(raw: bytes) -> bytes:
    """The message with the CRLF line endings SMTP carries (what smtplib sends for bare LF
    or CR), ending with a line end: its bytes as a socket's client would have sent them.
    DATA's dot-stuffing is added and removed on the way, so a line that starts with a dot
    arrives as given."""
    data = _LINE_END.sub(b"\r\n", raw)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"
