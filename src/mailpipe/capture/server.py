"""The asyncio side of the SMTP server: listeners, one Protocol per connection, limits,
timeouts, STARTTLS and graceful shutdown. The SMTP conversation itself lives in the sans-I/O
`SMTPConnection`; this module only moves bytes and events between it and the world."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import cast

from mailpipe.capture.amend import amend_headers
from mailpipe.capture.message import EventOptions, SessionInfo
from mailpipe.capture.offload import EventBuilder
from mailpipe.capture.protocol import ProtocolSettings, SMTPConnection
from mailpipe.capture.spool import SPOOL_FAILED, Spooler
from mailpipe.capture.tls import server_context
from mailpipe.capture.types import (
    PROCEED,
    BodyChunk,
    BodyDropped,
    Changes,
    Close,
    Envelope,
    Event,
    MessageBody,
    MessageReceived,
    Proceed,
    Reply,
    Send,
    Stage,
    StartTLS,
    Trace,
    Verdict,
    VerdictNeeded,
    Violation,
)
from mailpipe.capture.verdicts import VerdictContext, Verdicts
from mailpipe.config import ResolvedListener, split_host_port
from mailpipe.event import CapturedEmail, new_uuid
from mailpipe.metrics import Metrics
from mailpipe.sinks.dispatch import Dispatcher

log = logging.getLogger("mailpipe.capture")

REPLY_RETRY = Reply(451, "4.3.0 Temporary failure, please retry")
REPLY_TOO_MANY = Reply(421, "4.7.0 Too many connections, try again later")
REPLY_TOO_MANY_FROM_IP = Reply(421, "4.7.0 Too many connections from your address")
REPLY_CLOSING = Reply(421, "4.3.2 Closing connection")
REPLY_CLOSED_BY_ADMIN = Reply(421, "4.3.2 Connection closed by administrator")
_now = partial(datetime.now, UTC)


def protocol_settings(
    listener: ResolvedListener, *, spool_threshold: int, transcript: bool, tls_available: bool
) -> ProtocolSettings:
    """The protocol core's settings for one listener: every limit comes from its config."""
    return ProtocolSettings(
        hostname=listener.hostname,
        max_message_size=listener.max_message_size,
        max_recipients=listener.max_recipients,
        max_line_length=listener.max_line_length,
        spool_threshold=spool_threshold,
        auth_mechanisms=tuple(listener.auth.mechanisms),
        tls_available=tls_available,
        transcript=transcript,
        trace=log.isEnabledFor(logging.DEBUG),
    )


def format_addr(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")


# Why a slow client was cut (the `reason` of mailpipe_connections_timed_out)
READ_TIMEOUT, DATA_RATE = "read_timeout", "data_rate"


class ReadDeadlines:
    """When a client has been too slow, from when its bytes arrive (sans-I/O: the caller
    gives the time). A byte now and then must not keep a connection for ever (slowloris):

    - a command line must be complete within `read_timeout` of its first byte, and a client
      that sends nothing is cut after `read_timeout`;
    - a message body starts with `data_timeout` seconds of credit and each byte adds
      1/`min_data_rate` s, up to `data_timeout` (Postfix's smtpd_min_data_rate): a body done
      within `data_timeout` is never cut, a longer one must average `min_data_rate`. A body
      silent for `read_timeout` is cut too;
    - time spent waiting for a verdict or a sink is ours, not the client's: between pause()
      and resume() no clock runs. 0 disables a limit."""

    __slots__ = ("_credit", "_credit_at", "_data_timeout", "_last_byte", "_line_start",
                 "_min_rate", "_partial", "_paused", "_read_timeout")

    def __init__(self, read_timeout: float, data_timeout: float, min_data_rate: int,
                 now: float) -> None:
        self._read_timeout = read_timeout
        # Either 0 disables the body's rate: keep one flag for the hot path.
        self._min_rate = min_data_rate if data_timeout else 0
        self._data_timeout = data_timeout
        self._line_start = now  # when the current command line's clock started
        self._partial = False  # a command line has begun: more of it does not restart its clock
        self._last_byte = now  # in a body: for the idle rule
        self._credit = 0.0  # in a body: seconds left as of _credit_at
        self._credit_at = now
        self._paused = False

    def command_read(self, now: float, handled: bool, partial: bool) -> None:
        """Bytes came in command mode; `handled`: a line was completed (the core answered
        it), `partial`: a line is left incomplete."""
        if handled or not self._partial:
            self._line_start = now  # the line left incomplete began in this read
        self._partial = partial or not handled  # not handled: the bytes began or extend one

    def body_started(self, now: float) -> None:
        self._credit = self._data_timeout
        self._credit_at = self._last_byte = now

    def body_read(self, now: float, size: int) -> None:
        self._last_byte = now
        if self._min_rate:
            earned = self._credit - (now - self._credit_at) + size / self._min_rate
            self._credit = min(self._data_timeout, earned)
            self._credit_at = now

    def pause(self, now: float) -> None:
        if not self._paused:
            self._paused = True
            self._credit -= now - self._credit_at  # the client's time up to now counts

    def resume(self, now: float, partial: bool) -> bool:
        """The verdict came: the client's clocks start again (a command line buffered behind
        the verdict gets its read_timeout from now). False if they were running."""
        if not self._paused:
            return False
        self._paused = False
        self._credit_at = self._last_byte = self._line_start = now
        self._partial = partial
        return True

    def expired(self, now: float, in_body: bool) -> str | None:
        """Why the client is cut now (READ_TIMEOUT, DATA_RATE), or None."""
        if self._paused:
            return None
        timeout = self._read_timeout
        if timeout and (self._last_byte if in_body else self._line_start) + timeout - now <= 0:
            return READ_TIMEOUT
        if in_body and self._min_rate and self._credit_at + self._credit - now <= 0:
            return DATA_RATE
        return None

    def next_check(self, now: float, in_body: bool) -> float | None:
        """Seconds until a limit may be reached (while paused: a while, to look again);
        None when no limit applies in this mode."""
        timeout = self._read_timeout
        if self._paused:
            return timeout or self._data_timeout or None
        waits = []
        if timeout:
            waits.append((self._last_byte if in_body else self._line_start) + timeout - now)
        if in_body and self._min_rate:
            waits.append(self._credit_at + self._credit - now)
        return max(0.0, min(waits)) if waits else None


class ListenerMetrics:
    """One listener's labelled metrics, looked up once: `.labels()` is not free per email."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.accepted = metrics.emails_accepted.labels(name)
        self.rejected_sink = metrics.emails_rejected.labels(name, "sink")
        self.rejected_error = metrics.emails_rejected.labels(name, "error")
        self.bytes = metrics.bytes_received.labels(name)
        self.active = metrics.connections_active.labels(name)
        self.total = metrics.connections_total.labels(name)
        self.refused = metrics.connections_refused.labels(name, "max_connections")
        self.refused_per_ip = metrics.connections_refused.labels(name, "max_connections_per_ip")
        self.timed_out = metrics.connections_timed_out.labels(name, READ_TIMEOUT)
        self.too_slow = metrics.connections_timed_out.labels(name, DATA_RATE)
        self.violations = metrics.protocol_violations.labels(name)
        self.parse_latency = metrics.parse_latency


@dataclass
class Listener:
    """One configured SMTP listener and what its sessions share."""

    config: ResolvedListener
    settings: ProtocolSettings
    ssl_context: ssl.SSLContext | None
    metrics: ListenerMetrics
    sessions: set[SMTPSession] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)  # open sessions by client address
    server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def implicit_tls(self) -> bool:
        return self.config.tls is not None and self.config.tls.mode == "implicit"


class CaptureServer:
    """All listeners and their live sessions."""

    def __init__(
        self,
        listeners: list[ResolvedListener],
        *,
        dispatcher: Dispatcher,
        metrics: Metrics,
        event_options: EventOptions,
        transcript: bool,
        spool_threshold: int,
        data_dir: Path | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.verdicts = verdicts if verdicts is not None else Verdicts()
        self.metrics = metrics
        self.event_options = event_options
        self.listeners = [
            self._make_listener(item, transcript, spool_threshold, data_dir) for item in listeners
        ]
        self.stopping = False
        self.builder = EventBuilder()

    def _make_listener(
        self,
        item: ResolvedListener,
        transcript: bool,
        spool_threshold: int,
        data_dir: Path | None,
    ) -> Listener:
        context = server_context(item.tls, item.hostname, data_dir) if item.tls else None
        settings = protocol_settings(
            item,
            spool_threshold=spool_threshold,
            transcript=transcript,
            tls_available=context is not None and item.tls is not None
            and item.tls.mode == "starttls",
        )
        return Listener(
            config=item,
            settings=settings,
            ssl_context=context,
            metrics=ListenerMetrics(self.metrics, item.name),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            host, port = split_host_port(listener.config.addr)
            listener.server = await loop.create_server(
                lambda lst=listener: SMTPSession(self, lst),
                host,
                port,
                ssl=listener.ssl_context if listener.implicit_tls else None,
                # A client that never starts the handshake is idle like any other.
                ssl_handshake_timeout=listener.config.read_timeout if listener.implicit_tls
                else None,
                reuse_address=True,
                backlog=1024,
            )
            bound = listener.server.sockets[0].getsockname()
            log.info(
                "SMTP listening on %s",
                format_addr(bound),
                extra={"server": listener.name, "tls": _tls_label(listener)},
            )

    def addresses(self) -> dict[str, str]:
        """Listener name to the address it is bound to (the real port when 0 was asked)."""
        out = {}
        for listener in self.listeners:
            if listener.server and listener.server.sockets:
                out[listener.name] = format_addr(listener.server.sockets[0].getsockname())
        return out

    def sessions(self) -> Iterable[SMTPSession]:
        for listener in self.listeners:
            yield from listener.sessions

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let messages in flight finish, 421 the idle sessions."""
        self.stopping = True
        for listener in self.listeners:
            if listener.server:
                listener.server.close()
        for session in list(self.sessions()):
            session.request_close()
        deadline = time.monotonic() + timeout
        while any(True for _ in self.sessions()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions()):
            log.warning("closing session still busy at shutdown", extra={"session": session.id})
            session.abort()
        for listener in self.listeners:
            if listener.server:
                await listener.server.wait_closed()
        self.builder.close()


@dataclass(slots=True)
class _Transaction:
    uuid: str
    envelope: Envelope | None  # None until the core made it (after MAIL's verdict)
    changes: Changes


def _tls_label(listener: Listener) -> str:
    if listener.ssl_context is None:
        return "off"
    return "implicit" if listener.implicit_tls else "starttls"


class SMTPSession(asyncio.Protocol):
    """One SMTP connection: feeds received bytes to the protocol core and acts on its events."""

    def __init__(self, server: CaptureServer, listener: Listener) -> None:
        self.server = server
        self.listener = listener
        self.id = new_uuid()
        self.conn = SMTPConnection(listener.settings, clock=_now, tls_active=listener.implicit_tls,
                                   held=server.verdicts.held)
        if self.conn.held:  # verdicts the plugins give at once are given inside the core
            self.conn.judge = self._judge
        self.transport: asyncio.Transport | None = None
        self.remote_addr = ""
        self.local_addr = ""
        self.since = datetime.now(UTC)
        self.emails = 0
        self._loop = asyncio.get_running_loop()
        config = listener.config
        self._deadlines = ReadDeadlines(config.read_timeout, config.data_timeout,
                                        config.min_data_rate, self._loop.time())
        self._deadline_timer: asyncio.Handle | None = None
        self._deadline_at = 0.0  # the loop time _deadline_timer fires at
        self._client_ip: str | None = None  # counted in listener.per_ip while open
        self._in_body = False  # a message body is coming in (a verdict mid-body included)
        self._write_timer: asyncio.TimerHandle | None = None
        self._delivering: asyncio.Future[None] | None = None
        self._tls_task: asyncio.Future[None] | None = None
        # Decrypted input that came before start_tls() returned (see _start_tls).
        self._early_tls: bytearray | None = None
        self._closing = False
        self._write_blocked = False
        self._reading_paused = False  # what was last asked of the transport
        self._eof = False  # the client's EOF came while a verdict was awaited: close after it
        self._closing_after_reply = False
        self.spooler = Spooler()
        self._asking: asyncio.Future[None] | None = None
        self._held: list[bytes] = []  # replies before a verdict being asked (see _handle)
        self._store: dict[str, object] | None = None  # for verdict callables, made on demand
        # The transaction verdict callables see: its uuid (the event's), its envelope once
        # the core made it, what they want changed; and the session's changes before it.
        self._txn: _Transaction | None = None
        self._session_changes: Changes | None = None
        self._observed: VerdictContext | None = None  # the last report's (see _observe)
        self._close_reply: Reply | None = None  # why the server closes it, when not shutdown

    # ---- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote_addr = format_addr(peer)
        self.local_addr = format_addr(transport.get_extra_info("sockname"))
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else self.remote_addr
        if self._refused(transport, client_ip):
            return
        listener = self.listener
        listener.sessions.add(self)
        listener.per_ip[client_ip] += 1
        self._client_ip = client_ip
        listener.metrics.total.inc()
        listener.metrics.active.inc()
        log.info("connection opened", extra={"session": self.id, "remote": self.remote_addr,
                                              "server": listener.name})
        self._arm_deadline_timer()
        self._handle(self.conn.start())
        if self.server.stopping:
            self.request_close()

    def _refused(self, transport: asyncio.Transport, client_ip: str) -> bool:
        """421 and close when the listener is full, or full of this client's connections."""
        listener = self.listener
        config, metrics = listener.config, listener.metrics
        if len(listener.sessions) >= config.max_connections:
            reply, counter, limit = REPLY_TOO_MANY, metrics.refused, "max_connections"
        elif listener.per_ip[client_ip] >= config.max_connections_per_ip:
            reply, counter = REPLY_TOO_MANY_FROM_IP, metrics.refused_per_ip
            limit = "max_connections_per_ip"
        else:
            return False
        counter.inc()
        log.warning("refusing connection: %s reached", limit,
                    extra={"remote": self.remote_addr, "server": listener.name})
        transport.write(reply.encode())
        transport.close()
        return True

    def data_received(self, data: bytes) -> None:
        if self._early_tls is not None:
            self._early_tls += data
            return
        now = self._loop.time()
        conn, deadlines = self.conn, self._deadlines
        if conn.in_data:
            deadlines.body_read(now, len(data))
        events = conn.receive(data)
        if not (conn.in_data or conn.awaiting_reply):
            # Any event means a line was complete: a reply, a verdict asked, a violation...
            deadlines.command_read(now, bool(events), conn.buffered > 0)
        self._track_body(now)
        self._handle(events)
        if conn.awaiting_reply and not self._reading_paused:
            self._set_reading()  # input behind an awaited verdict: hold back what follows
        if self._closing:
            self.request_close()

    def eof_received(self) -> bool | None:
        if self.conn.awaiting_reply and not self.conn.tls_active:
            # Reading goes on while a verdict is awaited (_set_reading): answer first, then
            # close, as if reading had been paused and the EOF read after the reply.
            self._eof = True
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost()
        self.spooler.drop()
        for timer in (self._deadline_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if self in self.listener.sessions:
            self.listener.sessions.discard(self)
            self._uncount_ip()
            self.listener.metrics.active.dec()
            log.info("connection closed", extra={"session": self.id, "emails": self.emails})
            if "disconnect" in self.server.verdicts.observed:  # its clock read only if so
                self._observe("disconnect", None, None, {
                    "emails": self.emails,
                    "seconds": round((datetime.now(UTC) - self.since).total_seconds(), 3)})

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands (or replies would
        # pile up in memory) and give it write_timeout to catch up.
        self._write_blocked = True
        self._update_reading()
        self._write_timer = self._loop.call_later(
            self.listener.config.write_timeout, self._write_timed_out
        )

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _track_body(self, now: float) -> None:
        """Start a body's clock when one begins: after a DATA or BDAT line, or after the
        verdict that let it begin. A verdict awaited mid-body does not end the body."""
        conn = self.conn
        if conn.awaiting_reply or conn.in_data == self._in_body:
            return
        self._in_body = conn.in_data
        if self._in_body:
            self._deadlines.body_started(now)
            self._arm_deadline_timer()  # a body's deadline may come before the line's

    def _uncount_ip(self) -> None:
        per_ip, ip = self.listener.per_ip, self._client_ip
        if ip is not None:
            per_ip[ip] -= 1
            if per_ip[ip] <= 0:
                del per_ip[ip]  # or every address ever seen would stay

    def _update_reading(self) -> None:
        """A verdict asked or given, or the client stopped or resumed reading our replies:
        while a verdict is awaited the client's clocks stop (that delay is ours); then
        whether to read (_set_reading)."""
        now = self._loop.time()
        if self.conn.awaiting_reply:
            self._deadlines.pause(now)
        else:
            if self._deadlines.resume(now, self.conn.buffered > 0):
                self._arm_deadline_timer()  # the paused timer only looks now and then
            self._track_body(now)
        self._set_reading()

    def _set_reading(self) -> None:
        """Read unless the client does not read our replies, or input came while a verdict
        is awaited (the core keeps it for after the verdict; more would pile up in memory).
        A client that waits for its reply, as most do, is not paused and resumed around every
        message: two calls into the loop, and a syscall, per email. Under TLS reading pauses
        for every verdict, as an EOF cannot wait for the reply there (eof_received)."""
        transport, conn = self.transport, self.conn
        if transport is None or transport.is_closing():
            return
        awaiting = conn.awaiting_reply
        if self._eof and not awaiting:
            transport.close()
            return
        paused = self._write_blocked or (awaiting and (conn.buffered > 0 or conn.tls_active))
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # ---- events from the protocol core --------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        """Act on the core's events. The replies of one pass go out in one write (verdicts
        given at once were given inside the core: see `_judge`). A pass that ends awaiting a
        verdict holds its replies for the write of the verdict's pass: the batch's client
        waits for them all anyway, and a write and a wake-up of the client less is about
        30 µs of the awaited verdict's cost."""
        out: list[bytes] = []
        for event in events:
            kind = type(event)
            if kind is Send:
                out.append(event.data)  # type: ignore[union-attr]
                continue
            if out and (kind is Close or kind is StartTLS or kind is MessageReceived):
                self._write(out)  # what came before goes first (a message may answer now)
            if kind is VerdictNeeded:
                self._ask_later(event)  # type: ignore[arg-type]
            else:
                self._act(event)
        if out:
            if self._asking is not None:
                self._held += out
            else:
                self._write(out)

    def _write(self, out: list[bytes]) -> None:
        if self._held:
            out[:0] = self._held
            self._held.clear()
        if self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _act(self, event: Event) -> None:
        transport = self.transport
        kind = type(event)
        if kind is MessageReceived:
            self._update_reading()
            if event.chunked and not self.spooler.attach(event):  # type: ignore[union-attr]
                log.error("could not spool a message body", extra={"session": self.id})
                self.listener.metrics.rejected_error.inc()
                self._handle(self.conn.verdict(SPOOL_FAILED))
                self._update_reading()
                return
            self._delivering = self._loop.create_task(self._deliver(event))  # type: ignore[arg-type]
        elif kind is Close:
            if transport is not None:
                transport.close()
        elif kind is StartTLS:
            self._tls_task = asyncio.ensure_future(self._start_tls())
        elif kind is Violation:
            self.listener.metrics.violations.inc()
            log.warning("protocol violation: %s", event.text,  # type: ignore[union-attr]
                        extra={"session": self.id, "remote": self.remote_addr})
        elif kind is Trace:
            log.debug("%s: %s", event.direction, event.line,  # type: ignore[union-attr]
                      extra={"session": self.id})
        elif kind is BodyChunk:
            self.spooler.chunk(event.data)  # type: ignore[union-attr]
        elif kind is BodyDropped:
            self.spooler.drop()

    def _judge(self, stage: Stage, args: dict[str, object],
               envelope: Envelope | None) -> Verdict | None:
        """The core asks: a held stage's verdict if the verdict callables give it at once
        (the core then reads on in the same pass); None: it asks with VerdictNeeded."""
        if self.transport is None or self.transport.is_closing():
            return None
        return self.server.verdicts.decide_now(self._context(stage, args, envelope))

    def _ask_later(self, needed: VerdictNeeded) -> None:
        """A verdict that must be awaited: a task asks, and reading pauses meanwhile."""
        context = self._context(needed.stage, needed.args, needed.envelope)
        self._update_reading()
        self._asking = asyncio.ensure_future(self._ask(context))

    # ---- verdicts -----------------------------------------------------------------

    def _context(self, stage: Stage, args: dict[str, object], envelope: Envelope | None,
                 email: CapturedEmail | None = None) -> VerdictContext:
        if self._store is None:
            self._store = {}
        txn = self._transaction(stage, envelope)
        if txn is not None:
            message_uuid, changes = txn.uuid, txn.changes
        else:
            message_uuid = None
            changes = self._session_changes = self._session_changes or Changes()
        return VerdictContext(
            stage=stage, session=self.id, server=self.listener.name,
            remote_addr=self.remote_addr, local_addr=self.local_addr,
            tls=self.conn.tls_active, helo=self.conn.helo, auth=self.conn.auth,
            envelope=envelope, args=args, store=self._store, email=email,
            message_uuid=message_uuid, changes=changes,
        )

    def _transaction(self, stage: Stage, envelope: Envelope | None) -> _Transaction | None:
        """The transaction a stage belongs to: MAIL starts one (the core makes its envelope
        only after the verdict); later stages belong to the one whose envelope they carry."""
        if stage is Stage.MAIL:
            self._txn = _Transaction(new_uuid(), None, Changes())
            return self._txn
        if envelope is None:
            return None
        txn = self._txn
        if txn is None or (txn.envelope is not None and txn.envelope is not envelope):
            txn = self._txn = _Transaction(new_uuid(), envelope, Changes())
        txn.envelope = envelope
        return txn

    def _observe(self, what: str, envelope: Envelope | None, email: CapturedEmail | None,
                 args: dict[str, object]) -> None:
        """Tell the plugins' notification hooks, when any plugin has one."""
        verdicts = self.server.verdicts
        observer = verdicts.observer
        if observer is None or what not in verdicts.observed:
            return
        context = self._observed
        if context is not None and context.email is email and context.envelope is envelope:
            context.args = args  # the same email's next report (its hooks' contexts are made)
        else:
            if self._store is None:
                self._store = {}
            context = self._observed = VerdictContext(
                stage=Stage.MESSAGE, session=self.id, server=self.listener.name,
                remote_addr=self.remote_addr, local_addr=self.local_addr,
                tls=self.conn.tls_active, helo=self.conn.helo, auth=self.conn.auth,
                envelope=envelope, args=args, store=self._store, email=email,
                message_uuid=email.uuid if email is not None else None,
            )
        try:
            observer(what, context)
        except Exception:
            log.exception("plugin notification failed", extra={"session": self.id})

    async def _ask(self, context: VerdictContext) -> None:
        verdict = await self.server.verdicts.decide(context)
        self._asking = None
        self._answer(verdict)

    async def _message_verdict(self, received: MessageReceived,
                               email: CapturedEmail) -> Verdict:
        """The MESSAGE stage's callables, before the sinks see the message."""
        if Stage.MESSAGE not in self.conn.held:
            return PROCEED
        context = self._context(Stage.MESSAGE, {}, received.envelope, email)
        verdicts = self.server.verdicts
        verdict = verdicts.decide_now(context)
        return verdict if verdict is not None else await verdicts.decide(context)

    def _answer(self, verdict: Verdict) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._handle(self.conn.verdict(verdict))
        self._update_reading()
        if self._closing:
            self.request_close()

    async def _deliver(self, received: MessageReceived) -> None:
        reply = REPLY_RETRY
        envelope = received.envelope
        try:
            email = await self._capture(received)
            verdict = await self._message_verdict(received, email)
            if type(verdict) is not Proceed:  # refused before any sink saw it
                self._delivering = None
                self._answer(verdict)
                self._observe("email_refused", envelope, email, {"stage": "message"})
                return
            email, envelope = await self._apply_changes(received, email)
            self._observe("delivery_attempt", envelope, email, {"attempt": 1})
            delivery = await self.server.dispatcher.deliver(email)
            reply = Reply(delivery.code, f"{delivery.enhanced} {delivery.text}")
            if delivery.accepted:
                self._count_accepted(email, envelope)
                if delivery.close:
                    self._closing_after_reply = True
                self._observe("delivery_success", envelope, email, {})
                self._observe("email_accepted", envelope, email, {"size": len(email.raw)})
            else:
                self.listener.metrics.rejected_sink.inc()
                self._observe("delivery_failure", envelope, email, {"error": reply.text})
        except Exception as exc:
            log.exception("could not capture a message", extra={"session": self.id})
            self.listener.metrics.rejected_error.inc()
            self._observe("delivery_failure", envelope, None, {"error": repr(exc)})
        finally:
            received.body.discard()
            self._observed = None  # holds the email
        self._delivering = None
        self._reply(reply)

    async def _apply_changes(self, received: MessageReceived,
                             email: CapturedEmail) -> tuple[CapturedEmail, Envelope]:
        """What plugins asked to change (MODIFY), applied before any sink sees the email:
        headers into the stored message and the event (rebuilt from it), recipients into
        the envelope, tags into the event."""
        envelope = received.envelope
        txn = self._txn
        if txn is None and self._session_changes is None:  # no plugin asked: nothing to do
            return email, envelope
        changes = self._session_changes or Changes()
        if txn is not None and txn.envelope is envelope:
            changes = changes.then(txn.changes)
        if not changes:
            return email, envelope
        raw = amend_headers(email.raw, changes.add_headers, changes.set_headers)
        rcpt_to = changes.recipients_for(envelope.rcpt_to)
        if rcpt_to != envelope.rcpt_to:
            options = dict(zip(envelope.rcpt_to, envelope.rcpt_options, strict=False))
            envelope = Envelope(envelope.mail_from, envelope.mail_options, rcpt_to,
                                [options.get(rcpt, []) for rcpt in rcpt_to], envelope.helo)
        if raw is not email.raw or envelope is not received.envelope:
            body = MessageBody(data=raw, size=len(raw))
            email = await self._capture(received, body, envelope, email.uuid)
        if changes.tags:
            email.event["tags"] = list(changes.tags)
            email._json = None
        return email, envelope

    def _count_accepted(self, email: CapturedEmail, envelope: Envelope) -> None:
        self.emails += 1
        metrics = self.listener.metrics
        metrics.accepted.inc()
        metrics.bytes.inc(len(email.raw))
        if log.isEnabledFor(logging.INFO):
            # The envelope, not the event's copy of it: reading email.event would decode an
            # event built in a helper process just for this line.
            log.info("email accepted", extra={
                "uuid": email.uuid, "session": self.id, "from": envelope.mail_from,
                "to": ",".join(envelope.rcpt_to), "size": len(email.raw)})

    async def _capture(self, received: MessageReceived, body: MessageBody | None = None,
                       envelope: Envelope | None = None,
                       email_uuid: str | None = None) -> CapturedEmail:
        started = time.perf_counter()
        if email_uuid is None and self.conn.held:
            # The transaction's uuid (made now if no stage before asked for it), so that
            # plugins see the uuid the event gets.
            txn = self._transaction(Stage.MESSAGE, received.envelope)
            email_uuid = txn.uuid if txn is not None else None
        session = SessionInfo(
            uuid=self.id,
            remote_addr=self.remote_addr,
            local_addr=self.local_addr,
            server=self.listener.name,
            tls=received.tls,
        )
        email = await self.server.builder.build(
            body or received.body,
            envelope=envelope or received.envelope,
            email_uuid=email_uuid,
            auth=received.auth,
            session=session,
            received_at=received.received_at,
            options=self.server.event_options,
            violations=received.violations,
            transcript=received.transcript,
        )
        self.listener.metrics.parse_latency.observe(time.perf_counter() - started)
        return email

    def _reply(self, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        # Closed by the server (shutdown, admin): 421 after the reply; by a worker's CLOSE: 221.
        closing = (self._close_reply or REPLY_CLOSING) if self._closing else None
        close_after = self._closing or self._closing_after_reply
        self._handle(self.conn.reply_to_message(reply, close_after=close_after,
                                                close_reply=closing))
        self._update_reading()

    async def _start_tls(self) -> None:
        context = self.listener.ssl_context
        if self.transport is None or context is None:
            return
        # From here on whatever reaches data_received came through the TLS layer: a fast
        # client's first command can arrive before start_tls() returns. It is kept for
        # after tls_started(), unlike clear text pipelined after STARTTLS (discarded).
        self._early_tls = bytearray()
        try:
            transport = await self._loop.start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.listener.config.read_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._early_tls = None
            log.warning("TLS handshake failed: %s", self._handshake_failure(exc),
                        extra={"session": self.id, "remote": self.remote_addr})
            self.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        # The handshake had its own timeout: the first command's clock starts now.
        self._deadlines.command_read(self._loop.time(), True, False)
        self._handle(self.conn.tls_started())
        early, self._early_tls = self._early_tls, None
        if early and not self.transport.is_closing():
            self.data_received(bytes(early))

    def _handshake_failure(self, exc: BaseException) -> str:
        """What went wrong, in words: some of these exceptions carry no message at all."""
        if isinstance(exc, TimeoutError):
            return f"no handshake within read_timeout ({self.listener.config.read_timeout:g}s)"
        text = str(exc)
        if isinstance(exc, ConnectionError | ssl.SSLEOFError):  # uvloop's carry no text
            closed = "client closed the connection during the TLS handshake"
            return f"{closed} ({text})" if text else closed
        return text or type(exc).__name__

    # ---- timers and shutdown ------------------------------------------------------

    def _arm_deadline_timer(self) -> None:
        """Have a timer fire by the next deadline. One due no later is kept: it fires early,
        finds the deadline moved on and arms again, so a session costs a timer per
        read_timeout or so, not a cancel and a new timer at each message's start and end."""
        now = self._loop.time()
        delay = self._deadlines.next_check(now, self.conn.in_data)
        if delay is None:
            return  # no limit now; a timer left armed finds nothing when it fires
        at = now + delay
        timer = self._deadline_timer
        if timer is not None:
            if self._deadline_at <= at:
                return
            timer.cancel()
        # When it is due is kept here: uvloop's call_at gives a due-now timer as a plain Handle,
        # which has no when().
        self._deadline_at = at
        self._deadline_timer = self._loop.call_at(at, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._deadline_timer = None
        if self.conn.closed:
            return
        reason = self._deadlines.expired(self._loop.time(), self.conn.in_data)
        if reason is None:
            self._arm_deadline_timer()
            return
        extra = {"session": self.id, "remote": self.remote_addr}
        metrics = self.listener.metrics
        if reason == DATA_RATE:
            metrics.too_slow.inc()
            log.warning("data rate too low, closing", extra=extra)
            hostname = self.listener.settings.hostname
            self._handle(self.conn.close_now(
                Reply(421, f"4.4.2 {hostname} Error: data rate too low")))
        else:
            metrics.timed_out.inc()
            log.warning("read timeout, closing", extra=extra)
            self._handle(self.conn.idle_timeout())

    def _write_timed_out(self) -> None:
        log.warning("write timeout, client stopped reading", extra={"session": self.id})
        self.abort()

    def request_close(self, reply: Reply | None = None) -> None:
        """Close now if idle, else right after the message in flight gets its reply. With a
        `reply` (an administrator's close) a message awaiting its verdict does not hold the
        session: its delivery (a hanging worker, say) is cancelled and the client told."""
        self._closing = True
        if reply is not None:
            self._close_reply = reply
            pending = self._delivering or self._asking  # a message's or a stage's verdict
            if self.conn.awaiting_reply and pending is not None:
                pending.cancel()
                self._delivering = self._asking = None
                self._handle(self.conn.close_now(reply))
                return
        if not (self.conn.closed or self.conn.in_transaction or self.conn.awaiting_reply):
            reason = self._close_reply
            self._handle(self.conn.close_now(reason) if reason else self.conn.shutdown())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def info(self) -> dict[str, object]:
        if self.conn.awaiting_reply:
            state = "delivering"
        elif self.conn.in_data:
            state = "data"
        elif self.conn.in_transaction:
            state = "transaction"
        else:
            state = "idle"
        return {
            "uuid": self.id,
            "remote_addr": self.remote_addr,
            "server": self.listener.name,
            "since": self.since.isoformat(),
            "state": state,
            "emails": self.emails,
            "tls": self.conn.tls_active,
        }
